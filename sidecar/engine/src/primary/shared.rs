//! What the epoch loop, the path driver and the control API share: the [`Sender`] and the bookkeeping
//! around it, under one mutex, with a condition variable the epoch loop waits on and a notifier that wakes
//! the driver.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use endophyte_wire::switchover::SwitchoverOutcome;
use endophyte_wire::Sender;

use super::metrics::PrimaryMetrics;
use super::migration::MigrationCtl;

/// Facts fixed for the run.
pub(super) struct Meta {
    /// VM name.
    pub vm_id: String,
    /// This node's name.
    pub node: String,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Backup names, in configuration order.
    pub backups: Vec<String>,
    /// The self-fence bound each backup's lease is checked against (`None`: self-fencing is off).
    pub fence_after: Option<Duration>,
}

/// The self-fence as the control API and metrics see it.
#[derive(Clone, Debug, Default)]
pub(super) struct FenceView {
    /// The guest is fenced now.
    pub fenced: bool,
    /// Times the guest was fenced in this run.
    pub fences: u64,
    /// Backups that answered within the bound at the last check.
    pub answering: usize,
}

/// The epoch loop's latest figures, published for the control API.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Live {
    pub epoch: u64,
    pub epoch_ms: u64,
    pub throttle: f64,
    pub pressure: f64,
    pub dirty_rate: f64,
    pub drain_rate: f64,
    pub emergencies: u64,
}

/// When each epoch paused, and what that says about durability: the RPO samples and when the initial
/// full copy became durable.
pub(super) struct Durability {
    pub started: Instant,
    /// Pause instant of each epoch not yet durable (and of the newest durable one).
    pub pause_at: BTreeMap<u64, Instant>,
    /// When the last page of an epoch went to the sender, for a VMM whose switchover snapshot streams
    /// while the guest runs (QEMU's pre-copy): the commit lag that predicts downtime counts from there,
    /// not from the cut (the stream before it is not downtime then).
    pub handed_at: BTreeMap<u64, Instant>,
    /// The run's first epoch (the initial full copy).
    pub first_epoch: Option<u64>,
    /// RPO is sampled once epochs cut after the initial full copy became durable start to become durable.
    pub steady_from: Option<u64>,
    /// From the start until the initial copy was durable.
    pub initial_sync: Option<Duration>,
    /// Age of the durable epoch, ms, every 10 ms in steady state.
    pub rpo_samples: Vec<f64>,
    /// The newest durable epoch seen (counts `endophyte_epochs_committed_total`).
    last_durable: u64,
    /// Where RPO samples and durable epochs are counted for Prometheus.
    metrics: PrimaryMetrics,
}

impl Durability {
    fn new(metrics: PrimaryMetrics) -> Self {
        Self {
            last_durable: 0,
            metrics,
            started: Instant::now(),
            pause_at: BTreeMap::new(),
            handed_at: BTreeMap::new(),
            first_epoch: None,
            steady_from: None,
            initial_sync: None,
            rpo_samples: Vec::new(),
        }
    }

    /// `epoch` became durable; notes when the initial copy did.
    pub fn on_durable(&mut self, epoch: u64) {
        // Epochs of this run only: a backup's older commits are not this run's work.
        let floor = self.first_epoch.map_or(epoch, |f| f.saturating_sub(1));
        let from = self.last_durable.max(floor);
        if epoch > from {
            self.metrics.epochs_committed.inc_by(epoch - from);
        }
        self.last_durable = self.last_durable.max(epoch);
        if self.steady_from.is_none() && self.first_epoch.is_some_and(|f| epoch >= f) {
            let cut = self.pause_at.keys().next_back().copied().unwrap_or(epoch);
            self.steady_from = Some(cut + 1);
            self.initial_sync = Some(self.started.elapsed());
            tracing::info!(
                epoch,
                ms = self.started.elapsed().as_millis() as u64,
                "initial copy durable"
            );
        }
    }

    /// The age of the durable epoch `durable`'s pause now, ms, once it is of this run.
    pub fn rpo_now(&self, durable: u64) -> Option<f64> {
        self.pause_at
            .get(&durable)
            .filter(|_| self.first_epoch.is_some_and(|f| durable >= f))
            .map(|at| at.elapsed().as_secs_f64() * 1e3)
    }

    /// Takes an RPO sample (in steady state) and forgets pauses older than the durable epoch.
    pub fn sample(&mut self, durable: u64) {
        let steady = self.steady_from.is_some_and(|s| durable >= s);
        if let Some(&at) = self.pause_at.get(&durable).filter(|_| steady) {
            let age = at.elapsed().as_secs_f64();
            self.metrics.rpo.observe(age);
            if self.rpo_samples.len() < 4_000_000 {
                self.rpo_samples.push(age * 1e3);
            }
        }
        let floor = self.first_epoch.unwrap_or(0).max(durable);
        while self
            .pause_at
            .first_key_value()
            .is_some_and(|(&e, _)| e < floor)
        {
            self.pause_at.pop_first();
        }
        while self
            .handed_at
            .first_key_value()
            .is_some_and(|(&e, _)| e < floor)
        {
            self.handed_at.pop_first();
        }
    }
}

/// Counters the driver keeps.
#[derive(Default)]
pub(super) struct Counters {
    /// Frame bytes written to paths, all backups, retransmissions included.
    pub wire_bytes: u64,
    /// Path failures seen.
    pub path_failures: u64,
    /// Times a backup was resynced (first contact included).
    pub resyncs: u64,
    /// Errors backups reported.
    pub peer_errors: Vec<String>,
    /// Per backup: the last error seen on its paths (refusal, path failure), for `endophyte status`.
    pub last_error: Vec<Option<String>>,
    /// Per backup: its last connection attempt was refused for good (TLS, Hello), none came up since.
    pub refused: Vec<bool>,
}

/// Everything under the lock.
pub(super) struct Inner {
    pub sender: Sender,
    /// Per backup, per path: where frames for it go while it is up.
    pub paths: Vec<Vec<Option<crate::transport::PathTx>>>,
    pub durability: Durability,
    pub counters: Counters,
    /// Bandwidth cap in force (`--max-bandwidth`, changed at run time through the control API).
    pub max_bandwidth: Option<u64>,
    /// What the epoch loop last measured and decided.
    pub live: Live,
    /// Why epochs wait, when the VMM cannot take one now (another migration of the VM runs, say).
    pub waiting: Option<String>,
    /// The migration requested through the control API, if any (the last one, once finished).
    pub migration: Option<MigrationCtl>,
    /// How the switchover in progress ended (set by the driver, taken by the epoch loop).
    pub switch_outcome: Option<SwitchoverOutcome>,
    /// A client read the finished migration's status (the sidecar waits for that before exiting).
    pub final_fetched: bool,
    /// Per backup, from an epoch's pause until that backup committed it, ms (EWMA, weight 1/4): what a
    /// switchover's final transfer takes.
    pub commit_lag_ms: Vec<Option<f64>>,
    /// A backup said the VM runs there now (under a newer generation): taken by the self-fence.
    pub superseded: Option<String>,
    /// The self-fence's state.
    pub fence: FenceView,
    /// A permanent error: the run ends with it (no retry can help).
    pub fatal: Option<String>,
}

/// The shared state. See the module docs.
pub(super) struct Shared {
    inner: Mutex<Inner>,
    pub meta: Meta,
    /// Histograms and event counters for `GET /metrics` (atomic: outside the lock).
    pub metrics: PrimaryMetrics,
    /// Services registered on the services socket, and the console gate (their own lock).
    pub services: crate::services::ServiceRegistry,
    /// The hold on the VM at the fencing authority, once claimed (none without an authority).
    pub hold: std::sync::OnceLock<Arc<endophyte_authority::Hold>>,
    /// The console output commit (a service; its own lock).
    pub console: crate::services::console::Console,
    /// Signalled whenever the driver changed something the epoch loop may wait for.
    pub cv: Condvar,
    /// Wakes the driver (something to send).
    pub wake: tokio::sync::Notify,
    /// A stop was asked (signal, `--duration`): the loop cuts a final epoch and ends.
    stop: AtomicBool,
}

impl Shared {
    pub fn new(
        sender: Sender,
        paths: &[usize],
        meta: Meta,
        console: crate::services::console::Console,
        max_bandwidth: Option<u64>,
        epoch_ms: u64,
    ) -> Self {
        let metrics = PrimaryMetrics::new();
        Self {
            inner: Mutex::new(Inner {
                sender,
                paths: paths.iter().map(|&n| vec![None; n]).collect(),
                durability: Durability::new(metrics.clone()),
                counters: Counters {
                    last_error: vec![None; paths.len()],
                    refused: vec![false; paths.len()],
                    ..Counters::default()
                },
                max_bandwidth,
                live: Live {
                    epoch_ms,
                    ..Live::default()
                },
                waiting: None,
                migration: None,
                switch_outcome: None,
                final_fetched: false,
                commit_lag_ms: vec![None; paths.len()],
                superseded: None,
                fence: FenceView::default(),
                fatal: None,
            }),
            meta,
            metrics,
            services: crate::services::ServiceRegistry::new(),
            hold: std::sync::OnceLock::new(),
            console,
            cv: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the run to end at the next epoch boundary; ends every wait.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Ends the run with a permanent error `why` (the first one wins): every wait ends, no final epoch
    /// is cut, the command exits non-zero with it.
    pub fn fail(&self, why: String) {
        {
            let mut g = self.lock();
            if g.fatal.is_none() {
                tracing::error!("{why}");
                g.fatal = Some(why);
            }
        }
        self.request_stop();
    }

    /// The permanent error the run ends with, if any.
    pub fn fatal(&self) -> Option<String> {
        self.lock().fatal.clone()
    }

    /// Whether a stop was asked.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits (up to `limit`) until `ok` holds; returns whether it does. A permanent error ends the wait
    /// (false).
    pub fn wait_until(&self, limit: Duration, mut ok: impl FnMut(&Inner) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            if g.fatal.is_some() {
                return false;
            }
            if ok(&g) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            g = self
                .cv
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
