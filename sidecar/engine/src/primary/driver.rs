//! The path driver: a tokio task that owns nothing but the paths' channels. It feeds what the paths say
//! into the [`endophyte_wire::Sender`], sends what the sender asks (within the bandwidth cap), and records
//! what its events mean: durability, output release, commit lags, a switchover's outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use endophyte_wire::{Event, Message};
use tokio::sync::mpsc;

use super::shared::Shared;
use crate::config::BackupSpec;
use crate::transport::{PathEvent, PathTarget};

/// The paths of backup `spec`: path `i` goes direct or through a relay, alternating.
pub(super) fn targets(spec: &BackupSpec, n: usize) -> Vec<PathTarget> {
    (0..n)
        .map(|i| {
            let k = i % (spec.via.len() + 1);
            let via = (k > 0).then(|| spec.via[k - 1]);
            PathTarget {
                addr: via.unwrap_or(spec.addr),
                server_name: spec.name.clone(),
                via,
            }
        })
        .collect()
}

/// A token bucket for `--max-bandwidth`: `rate` bytes/s, bursts up to 50 ms worth (at least 1 MiB).
/// Sending may overdraw it; nothing more goes out until it is back above zero.
struct Bucket {
    limit: u64,
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate_bytes_per_s: u64) -> Self {
        Self {
            limit: rate_bytes_per_s,
            rate: rate_bytes_per_s as f64,
            tokens: 0.0,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let burst = (self.rate * 0.05).max(1048576.0);
        self.tokens = (self.tokens + self.rate * (now - self.at).as_secs_f64()).min(burst);
        self.at = now;
    }

    /// When the bucket is back above zero (now if it is).
    fn ready_at(&self) -> Instant {
        if self.tokens >= 0.0 {
            self.at
        } else {
            self.at + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Runs until every path task is gone.
///
/// Cancel safety: meant to run as its own task until the runtime shuts down.
pub(super) async fn drive(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<((usize, usize), PathEvent)>,
) {
    let mut rpo_tick = tokio::time::interval(Duration::from_millis(10));
    let mut bucket: Option<Bucket> = None;
    let mut hand_overs = Vec::new();
    loop {
        let timeout = step(&shared, &mut bucket, &mut hand_overs);
        for (generation, target) in hand_overs.drain(..) {
            hand_over(&shared, generation, target);
        }
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => {
                let Some(((b, p), ev)) = ev else { return };
                on_path_event(&shared, b, p, ev);
            }
            _ = shared.wake.notified() => {}
            _ = sleep => {}
            _ = rpo_tick.tick() => {
                let mut g = shared.lock();
                let d = g.sender.durable_epoch();
                g.durability.sample(d);
            }
        }
    }
}

/// One round: timeouts, transmits (within the cap), events. Returns when to come back, and the hand-overs
/// the fencing authority is to be asked for (after the lock is released).
fn step(
    shared: &Shared,
    bucket: &mut Option<Bucket>,
    hand_overs: &mut Vec<(u64, String)>,
) -> Option<Instant> {
    let mut g = shared.lock();
    let g = &mut *g;
    let now = Instant::now();
    // The cap may change at run time (`PUT /v1/max-bandwidth`).
    if bucket.as_ref().map(|b| b.limit) != g.max_bandwidth {
        *bucket = g.max_bandwidth.map(Bucket::new);
    }
    if g.sender.poll_timeout().is_some_and(|t| t <= now) {
        g.sender.handle_timeout(now);
    }
    if let Some(b) = bucket.as_mut() {
        b.refill(now);
    }
    while bucket.as_ref().is_none_or(|b| b.tokens >= 0.0) {
        let Some(t) = g.sender.poll_transmit(now) else {
            break;
        };
        if let Some(tx) = &g.paths[t.backup][t.path] {
            let frame = t.msg.encode();
            g.counters.wire_bytes += frame.len() as u64;
            if let Some(b) = bucket.as_mut() {
                b.tokens -= frame.len() as f64;
            }
            // Pings and pongs go as datagrams: liveness does not wait behind chunks.
            match &t.msg {
                Message::Ping { .. } | Message::Pong { .. } => {
                    let _ = tx.send_message(&t.msg);
                }
                _ => {
                    let _ = tx.send(frame);
                }
            }
        }
    }
    while let Some(ev) = g.sender.poll_event() {
        match ev {
            Event::Durable { epoch } => {
                tracing::debug!(epoch, "durable");
                // The console gate releases what this epoch held; remote services are told.
                shared.services.durable(epoch);
                g.durability.on_durable(epoch);
            }
            Event::NeedsResync { backup, committed } => {
                g.counters.resyncs += 1;
                tracing::info!(
                    backup,
                    committed,
                    "backup joins; resync from its committed epoch"
                );
            }
            Event::BackupLost { backup } => {
                tracing::warn!(
                    backup,
                    "backup lost its last path; it will resync when it returns"
                )
            }
            Event::BackupCommitted { backup, epoch } => {
                let d = &g.durability;
                if let Some(at) = d.handed_at.get(&epoch).or(d.pause_at.get(&epoch)) {
                    let lag = at.elapsed().as_secs_f64() * 1e3;
                    tracing::debug!(epoch, backup, lag_ms = lag, "commit lag");
                    let l = &mut g.commit_lag_ms[backup];
                    *l = Some(l.map_or(lag, |o| o * 0.75 + lag * 0.25));
                }
            }
            Event::PeerError {
                backup,
                path,
                code,
                message,
            } => {
                tracing::warn!(backup, path, ?code, "backup refused: {message}");
                g.counters
                    .peer_errors
                    .push(format!("backup {backup} path {path}: {message}"));
                g.counters.last_error[backup] = Some(format!("{code:?}: {message}"));
                note_superseded(g, backup, Some(code), message);
            }
            Event::StandbyReady {
                backup,
                generation,
                preloaded,
            } => {
                tracing::info!(
                    backup,
                    generation,
                    preloaded,
                    "the target's standby VMM is ready"
                );
                if let Some(m) = g.migration.as_mut().filter(|m| m.target == backup) {
                    m.standby = Some((generation, preloaded));
                }
            }
            Event::Switchover(outcome) => g.switch_outcome = Some(outcome),
            Event::HandOver { generation, target } => hand_overs.push((generation, target)),
        }
    }
    shared.cv.notify_all();
    let limited = bucket
        .as_ref()
        .filter(|b| b.tokens < 0.0)
        .map(Bucket::ready_at);
    match (g.sender.poll_timeout(), limited) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The switchover's commit point under a fencing authority: asks it to hand `generation` to `target` (off
/// this task, which must not wait on etcd), and tells the sender its verdict.
fn hand_over(shared: &Arc<Shared>, generation: u64, target: String) {
    use endophyte_authority::AuthorityError;
    use endophyte_wire::switchover::AuthorityVerdict;
    let Some(hold) = shared.hold.get().cloned() else {
        let why = "no fencing authority hold to hand over".to_string();
        shared
            .lock()
            .sender
            .handle_switchover_authority(AuthorityVerdict::NotHandedOver { why }, Instant::now());
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let t0 = Instant::now();
        let verdict = match hold.hand_over(&target).await {
            Ok(g) => {
                tracing::info!(generation = g, %target, took_ms = t0.elapsed().as_secs_f64() * 1e3,
                    "the fencing authority handed the VM over: the switchover's commit point");
                AuthorityVerdict::HandedOver
            }
            Err(e @ AuthorityError::NotLanded { .. }) => {
                AuthorityVerdict::NotHandedOver { why: e.to_string() }
            }
            Err(e) => AuthorityVerdict::Unknown { why: e.to_string() },
        };
        tracing::debug!(generation, "hand-over verdict in");
        shared
            .lock()
            .sender
            .handle_switchover_authority(verdict, Instant::now());
        shared.wake.notify_one();
    });
}

fn on_path_event(shared: &Shared, b: usize, p: usize, ev: PathEvent) {
    let mut g = shared.lock();
    let now = Instant::now();
    match ev {
        PathEvent::Up { welcome, tx } => {
            tracing::info!(backup = b, path = p, node = %welcome.node, committed = welcome.committed_epoch, "path up");
            if let Some(after) = shared.meta.fence_after {
                let lease = Duration::from_millis(welcome.lease_ms.into());
                if let Err(e) = endophyte_wire::lease::check_timing(after, lease, &welcome.node) {
                    // Permanent: no retry changes either bound.
                    drop(g);
                    shared.fail(e.to_string());
                    return;
                }
            }
            g.paths[b][p] = Some(tx);
            g.counters.refused[b] = false;
            g.sender.handle_path_up(b, p, &welcome, now);
        }
        PathEvent::Message(m) => {
            if let Err(e) = g.sender.handle_message(b, p, m, now) {
                tracing::warn!("{e}");
                g.paths[b][p] = None;
            }
        }
        PathEvent::Refused { why, code } => {
            tracing::warn!(backup = b, path = p, "path refused: {why}");
            path_lost(&mut g, b, p, &why, now);
            note_superseded(&mut g, b, code, why);
            if g.superseded.is_some() {
                // The self-fence ends the run with that reason.
                return;
            }
            g.counters.refused[b] = true;
            // Every backup refuses this sidecar (its certificate, its Hello): nothing can replicate, and
            // retrying will not change that.
            if g.counters.refused.iter().all(|&r| r) {
                let why = (0..g.counters.refused.len())
                    .map(|b| {
                        format!(
                            "{}: {}",
                            shared.meta.backups[b],
                            g.counters.last_error[b].as_deref().unwrap_or("refused")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                drop(g);
                shared.fail(format!("every backup refused this sidecar: {why}"));
            }
        }
        PathEvent::Down(why) => {
            tracing::warn!(backup = b, path = p, "path down: {why}");
            path_lost(&mut g, b, p, &why, now);
        }
    }
}

/// Path `p` of backup `b` ended (`why`): counted, kept as the backup's last error, told to the sender.
fn path_lost(g: &mut super::shared::Inner, b: usize, p: usize, why: &str, now: Instant) {
    if g.paths[b][p].take().is_some() {
        g.counters.path_failures += 1;
    }
    g.counters.last_error[b] = Some(format!("path {p}: {why}"));
    g.sender.handle_path_down(b, p, now);
}

/// Backup `backup` answered with `code`: `Fenced` means the VM runs there now, which outside this
/// sidecar's own switchover is a newer generation; the self-fence then fences for good.
fn note_superseded(
    g: &mut super::shared::Inner,
    backup: usize,
    code: Option<endophyte_wire::ErrorCode>,
    message: String,
) {
    if code == Some(endophyte_wire::ErrorCode::Fenced) && !own_switchover(g, backup) {
        g.superseded.get_or_insert(message);
    }
}

/// Whether this sidecar's own switchover to `backup` runs (its target holds the VM prepared, then
/// running, and refuses replication into it with `Fenced`).
fn own_switchover(g: &super::shared::Inner, backup: usize) -> bool {
    g.migration
        .as_ref()
        .is_some_and(|m| m.target == backup && m.phase != crate::migrate::Phase::Converging)
}
