//! A deterministic simulation of one VM's replication and switchover: one sender, several backups (each a
//! receiver, an in-memory replica and a switchover target with a simulated VMM), virtual links with loss,
//! delay, jitter (so reordering) and paths that die; a virtual clock.
//!
//! The checks are independent of the protocol's own bookkeeping: every time a receiver commits an epoch,
//! its replica image must equal the sender's memory image snapshotted at that epoch's pause, byte for
//! byte; a VM restored on a target must hold the memory image of the final epoch; and the guest never runs
//! on the source and a target at once.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use endophyte_wire::switchover::{
    Fence, SwitchoverOutcome, TargetAction, TargetEvent, TargetSwitchover, Timeouts,
};
use endophyte_wire::{
    Action, ChunkBuilder, EpochStart, ErrorCode, Event, Hello, Message, PageChunk, Receiver,
    Sender, SenderConfig, Switchover, VmState,
};

pub const PS: usize = 4096;
pub const SESSION: u64 = 7;

/// xorshift64*: small, deterministic.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

#[derive(Clone, Copy)]
pub struct LinkCfg {
    pub loss: f64,
    pub delay_ms: u64,
    pub jitter_ms: u64,
}

pub const LOSSY: LinkCfg = LinkCfg {
    loss: 0.05,
    delay_ms: 5,
    jitter_ms: 25,
};

pub const CLEAN: LinkCfg = LinkCfg {
    loss: 0.0,
    delay_ms: 2,
    jitter_ms: 2,
};

struct Packet {
    at: Duration,
    backup: usize,
    path: usize,
    to_backup: bool,
    /// The path's incarnation when sent; packets of a dead incarnation are lost with it.
    life: u32,
    bytes: Vec<u8>,
}

/// The simulated VMM on a target: what it holds, and how its steps go.
#[derive(Default)]
pub struct SimVmm {
    /// Guest RAM of the restored VM (a copy of the replica at the restore).
    pub ram: Option<Vec<u8>>,
    /// The epoch whose image it was restored from.
    pub restored_epoch: Option<u64>,
    pub running: bool,
    /// Fail the next restore with this message.
    pub fail_restore: Option<String>,
    /// Fail the next standby start with this message.
    pub fail_standby: Option<String>,
    /// A standby runs (started by a warm-up, not yet used or stopped).
    pub standby: bool,
    /// Each step takes this long.
    pub step: Duration,
    /// The action in progress and when it completes.
    busy: Option<(TargetAction, Duration)>,
}

pub struct Replica {
    pub rx: Receiver,
    pub image: Vec<u8>,
    journal: HashMap<u64, BTreeMap<u32, PageChunk>>,
    pub instance: u64,
    pub target: TargetSwitchover,
    pub vmm: SimVmm,
    /// Killed: it neither receives nor answers anything.
    pub dead: bool,
    /// Fail storing any chunk of this epoch (a full disk).
    pub fail_store: Option<u64>,
    /// What its switchover target reported, in order.
    pub events: Vec<TargetEvent>,
}

impl Replica {
    fn new(mem: usize, instance: u64, committed: u64, session: u64, image: Vec<u8>) -> Self {
        Self {
            rx: Receiver::new(
                "vm".into(),
                PS as u64,
                mem as u64,
                committed,
                session,
                instance,
                "b".into(),
                4,
            ),
            image,
            journal: HashMap::new(),
            instance,
            target: TargetSwitchover::new("vm".into(), Fence::default(), false),
            vmm: SimVmm {
                step: Duration::from_millis(2),
                ..SimVmm::default()
            },
            dead: false,
            fail_store: None,
            events: vec![],
        }
    }
}

/// Drops the first message from the source that matches.
pub type DropRule = Box<dyn FnMut(&Message) -> bool>;

pub struct Sim {
    pub now: Duration,
    pub base: Instant,
    pub rng: Rng,
    pub mem: Vec<u8>,
    pub pages: usize,
    pub snapshots: BTreeMap<u64, Vec<u8>>,
    dirty_since: BTreeMap<u64, Vec<usize>>,
    pub sender: Sender,
    pub replicas: Vec<Replica>,
    pub paths: Vec<Vec<(bool, u32)>>,
    pub link: LinkCfg,
    wire: Vec<Packet>,
    pub epoch: u64,
    pub commits_checked: usize,
    pub durable_seen: u64,
    /// The source guest is paused for a switchover (from the final pause until the outcome).
    pub source_paused: bool,
    /// The source guest was stopped for good (switched over).
    pub source_stopped: bool,
    pub outcome: Option<(Duration, SwitchoverOutcome)>,
    pub peer_errors: Vec<String>,
    pub drop_rule: Option<DropRule>,
    pub generation: u64,
    /// The sender's standby answers: (backup, generation, preloaded).
    pub standby_ready: Vec<(usize, u64, bool)>,
    /// Every chunk put on the wire to a backup: (sim time, backup, epoch).
    pub chunks_sent: Vec<(Duration, usize, u64)>,
}

impl Sim {
    pub fn new(
        seed: u64,
        backups: usize,
        paths: usize,
        pages: usize,
        link: LinkCfg,
        quorum: usize,
    ) -> Self {
        let mem = vec![0u8; pages * PS];
        let cfg = SenderConfig {
            window_chunks_per_path: 4,
            retransmit_after: Duration::from_millis(200),
            end_retransmit_after: Duration::from_millis(200),
            ping_interval: Duration::from_millis(100),
            quorum,
            max_epochs_in_flight: 4,
            session: SESSION,
        };
        let mut s = Self {
            now: Duration::ZERO,
            base: Instant::now(),
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            mem,
            pages,
            snapshots: BTreeMap::new(),
            dirty_since: BTreeMap::new(),
            sender: Sender::new(cfg, &vec![paths; backups]),
            replicas: (0..backups)
                .map(|b| Replica::new(pages * PS, 100 + b as u64, 0, 0, vec![0u8; pages * PS]))
                .collect(),
            paths: vec![vec![(false, 0); paths]; backups],
            link,
            wire: vec![],
            epoch: 0,
            commits_checked: 0,
            durable_seen: 0,
            source_paused: false,
            source_stopped: false,
            outcome: None,
            peer_errors: vec![],
            drop_rule: None,
            generation: 0,
            standby_ready: vec![],
            chunks_sent: vec![],
        };
        s.snapshots.insert(0, s.mem.clone());
        for b in 0..backups {
            for p in 0..paths {
                s.path_up(b, p);
            }
        }
        s
    }

    pub fn t(&self) -> Instant {
        self.base + self.now
    }

    pub fn path_up(&mut self, b: usize, p: usize) {
        self.paths[b][p].0 = true;
        self.paths[b][p].1 += 1;
        // The handshake itself is not simulated as lossy: a path is up once Hello/Welcome went through.
        let r = &mut self.replicas[b];
        r.rx.handle_message(
            p as u64,
            Message::Hello(Hello {
                session: SESSION,
                path: p as u32,
                page_size: PS as u32,
                mem_bytes: (self.pages * PS) as u64,
                vm_id: "vm".into(),
                generation: 0,
            }),
        )
        .unwrap();
        let Some((_, Message::Welcome(w))) = r.rx.poll_transmit() else {
            panic!("no welcome")
        };
        self.drive_replica(b);
        let now = self.t();
        self.sender.handle_path_up(b, p, &w, now);
    }

    pub fn path_down(&mut self, b: usize, p: usize) {
        self.paths[b][p].0 = false;
        let now = self.t();
        self.sender.handle_path_down(b, p, now);
    }

    /// The guest writes `n` random pages (random content, some zeroed). A paused guest writes nothing.
    pub fn guest_writes(&mut self, n: usize) {
        if self.source_paused || self.source_stopped {
            return;
        }
        for _ in 0..n {
            let page = self.rng.below(self.pages as u64) as usize;
            let zero = self.rng.chance(0.1);
            let fill = self.rng.next();
            let bytes = &mut self.mem[page * PS..(page + 1) * PS];
            for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
                let v = if zero { 0 } else { fill ^ (i as u64) };
                w.copy_from_slice(&v.to_le_bytes());
            }
            self.dirty_since
                .entry(self.epoch + 1)
                .or_default()
                .push(page);
        }
    }

    fn chunks_of(
        &self,
        epoch: u64,
        pages: impl IntoIterator<Item = usize>,
        image: &[u8],
    ) -> Vec<PageChunk> {
        let mut b = ChunkBuilder::new(epoch, PS, 8);
        let mut out = vec![];
        for p in pages {
            b.push((p * PS) as u64, &image[p * PS..(p + 1) * PS]);
            if b.is_full() {
                out.push(b.finish(true));
            }
        }
        if !b.is_empty() {
            out.push(b.finish(true));
        }
        out
    }

    /// Epoch boundary: snapshot memory (the pause), then stream the delta, plus a full image to resyncing
    /// backups. Returns false when back-pressure let the epoch run longer.
    pub fn cut_epoch(&mut self) -> bool {
        if !self.sender.can_begin_epoch() {
            // Back-pressure: this epoch runs longer; its dirty pages keep accumulating.
            return false;
        }
        self.epoch += 1;
        let e = self.epoch;
        let snap = self.mem.clone();
        let mut delta: Vec<usize> = self.dirty_since.get(&e).cloned().unwrap_or_default();
        delta.sort_unstable();
        delta.dedup();
        let shared = self.chunks_of(e, delta.iter().copied(), &snap);
        for b in 0..self.replicas.len() {
            match self.sender.begin_epoch(b, e) {
                EpochStart::NotStreaming => continue,
                EpochStart::Delta => {}
                EpochStart::Resync { from, from_session } => {
                    // Pages changed since the epoch it holds, as of this pause (all pages when that epoch
                    // is not from this session's history); the shared delta follows.
                    let mut changed: Vec<usize> = if from_session == SESSION || from == 0 {
                        self.dirty_since
                            .range(from + 1..e)
                            .flat_map(|(_, v)| v.iter().copied())
                            .collect()
                    } else {
                        (0..self.pages).collect()
                    };
                    changed.sort_unstable();
                    changed.dedup();
                    for c in self.chunks_of(e, changed, &snap) {
                        assert!(self.sender.push_chunk(b, c));
                    }
                }
            }
            for c in &shared {
                assert!(self.sender.push_chunk(b, c.clone()));
            }
            assert!(self.sender.end_epoch(b, e));
        }
        self.snapshots.insert(e, snap);
        true
    }

    /// A migration to `target` starts converging: the warm-up for the next generation goes out.
    pub fn warm_up(&mut self, target: usize) {
        let generation = self.generation + 1;
        self.sender
            .queue_message(target, Message::SwitchoverWarmup { generation });
    }

    /// The final pause of a migration to backup `target`: the guest stops, the final epoch is cut and the
    /// switchover begins with the next generation.
    pub fn begin_switchover(&mut self, target: usize, timeouts: Timeouts) {
        self.source_paused = true;
        while !self.cut_epoch() {
            self.run_for(1);
        }
        self.generation += 1;
        let request = Switchover {
            generation: self.generation,
            session: SESSION,
            epoch: self.epoch,
            verify: false,
            state: VmState::new("sim", 1, self.epoch.to_le_bytes().to_vec()).unwrap(),
        };
        let now = self.t();
        self.sender
            .begin_switchover(target, format!("b{target}"), request, timeouts, now);
    }

    pub fn send(&mut self, b: usize, p: usize, to_backup: bool, msg: &Message) {
        let (up, life) = self.paths[b][p];
        if !up || self.rng.chance(self.link.loss) || (!to_backup && self.replicas[b].dead) {
            return;
        }
        if to_backup {
            if let Some(rule) = &mut self.drop_rule {
                if rule(msg) {
                    self.drop_rule = None;
                    return;
                }
            }
        }
        if let (true, Message::Chunk { chunk, .. }) = (to_backup, msg) {
            self.chunks_sent.push((self.now, b, chunk.epoch));
        }
        let delay = self.link.delay_ms + self.rng.below(self.link.jitter_ms + 1);
        self.wire.push(Packet {
            at: self.now + Duration::from_millis(delay),
            backup: b,
            path: p,
            to_backup,
            life,
            bytes: msg.encode().to_vec(),
        });
    }

    fn drive_sender(&mut self) {
        let now = self.t();
        if self.sender.poll_timeout().is_some_and(|t| t <= now) {
            self.sender.handle_timeout(now);
        }
        while let Some(tx) = self.sender.poll_transmit(now) {
            self.send(tx.backup, tx.path, true, &tx.msg);
        }
        while let Some(ev) = self.sender.poll_event() {
            match ev {
                Event::Durable { epoch } => {
                    assert!(epoch > self.durable_seen, "durable went backwards");
                    self.durable_seen = epoch;
                }
                Event::PeerError { message, .. } => self.peer_errors.push(message),
                // An authority that always hands over at once (these simulations model none).
                Event::HandOver { .. } => self.sender.handle_switchover_authority(
                    endophyte_wire::switchover::AuthorityVerdict::HandedOver,
                    now,
                ),
                Event::Switchover(o) => {
                    match &o {
                        SwitchoverOutcome::SwitchedOver { .. } => {
                            self.source_stopped = true;
                            self.source_paused = false;
                        }
                        SwitchoverOutcome::Abandoned { .. } => self.source_paused = false,
                        SwitchoverOutcome::InDoubt { .. } => {}
                    }
                    assert!(self.outcome.is_none(), "two outcomes");
                    self.outcome = Some((self.now, o));
                }
                Event::StandbyReady {
                    backup,
                    generation,
                    preloaded,
                } => self.standby_ready.push((backup, generation, preloaded)),
                Event::NeedsResync { .. }
                | Event::BackupCommitted { .. }
                | Event::BackupLost { .. } => {}
            }
        }
        // A second transmit round: an outcome may have queued an Abort.
        while let Some(tx) = self.sender.poll_transmit(now) {
            self.send(tx.backup, tx.path, true, &tx.msg);
        }
        self.check_one_copy();
    }

    /// The invariant of the whole switchover: the guest never runs in two places.
    fn check_one_copy(&self) {
        let source_runs = !self.source_paused && !self.source_stopped;
        let targets_running = self.replicas.iter().filter(|r| r.vmm.running).count();
        assert!(
            targets_running + usize::from(source_runs) <= 1,
            "the guest runs in {} places at {:?}",
            targets_running + usize::from(source_runs),
            self.now
        );
    }

    /// Executes the target's actions against the simulated VMM, each taking `vmm.step` of virtual time.
    fn drive_target(&mut self, b: usize) {
        let now = self.now;
        let t = self.t();
        loop {
            let r = &mut self.replicas[b];
            if r.dead {
                return;
            }
            if let Some((a, due)) = r.vmm.busy.take() {
                if due > now {
                    r.vmm.busy = Some((a, due));
                    break;
                }
                match a {
                    TargetAction::Launch => {
                        r.vmm.standby = false;
                        r.target.handle_launched(Ok(1000 + b as u32), t)
                    }
                    TargetAction::RecordFence { .. } => r.target.handle_fence_recorded(Ok(()), t),
                    TargetAction::Restore { state } => {
                        let res = match r.vmm.fail_restore.take() {
                            Some(e) => Err(e),
                            None => {
                                let epoch = u64::from_le_bytes(state.data[..8].try_into().unwrap());
                                assert_eq!(
                                    r.rx.committed_epoch(),
                                    epoch,
                                    "restored from a replica not at the final epoch"
                                );
                                r.vmm.ram = Some(r.image.clone());
                                r.vmm.restored_epoch = Some(epoch);
                                Ok(())
                            }
                        };
                        r.target.handle_restored(res, t)
                    }
                    TargetAction::HashRam => r.target.handle_hashed(Ok("h".into()), t),
                    TargetAction::ClaimHold { .. } => r.target.handle_hold_claimed(Ok(()), t),
                    TargetAction::Resume => {
                        r.vmm.running = true;
                        r.target.handle_resumed(Ok(()), t)
                    }
                    TargetAction::StartStandby => match r.vmm.fail_standby.take() {
                        Some(e) => r.target.handle_standby(Err(e)),
                        None => {
                            r.vmm.standby = true;
                            r.target.handle_standby(Ok(()));
                            // The simulated VMM loads the replica within the step.
                            r.target.handle_standby_loaded(true);
                        }
                    },
                    TargetAction::StopStandby => r.vmm.standby = false,
                    TargetAction::StopVm | TargetAction::KillLeftover { .. } => {
                        r.vmm.running = false;
                        r.vmm.ram = None;
                    }
                }
                continue;
            }
            let Some(a) = r.target.poll_action() else {
                break;
            };
            r.vmm.busy = Some((a, now + r.vmm.step));
        }
        let r = &mut self.replicas[b];
        while let Some(ev) = r.target.poll_event() {
            if let TargetEvent::Running { .. } = ev {
                assert!(r.vmm.running);
            }
            r.events.push(ev);
        }
        if r.target.poll_timeout().is_some_and(|d| d <= t) {
            r.target.handle_timeout(t);
        }
        while let Some((p, msg)) = self.replicas[b].target.poll_transmit() {
            self.send(b, p as usize, false, &msg);
        }
    }

    fn drive_replica(&mut self, b: usize) {
        loop {
            let r = &mut self.replicas[b];
            let Some(a) = r.rx.poll_action() else { break };
            match a {
                Action::Store { epoch, seq, chunk } => {
                    if r.fail_store == Some(epoch) {
                        r.rx.store_failed(epoch, seq, "No space left on device");
                        continue;
                    }
                    r.journal.entry(epoch).or_default().insert(seq, chunk);
                    r.rx.chunk_stored(epoch, seq).unwrap();
                }
                Action::Commit { end } => {
                    let chunks = r.journal.remove(&end.epoch).unwrap_or_default();
                    for (_, c) in chunks {
                        let d = c.decode(PS as u64, r.image.len() as u64).unwrap();
                        for (gpa, data) in d.pages() {
                            let dst = &mut r.image[gpa as usize..gpa as usize + PS];
                            match data {
                                Some(d) => dst.copy_from_slice(d),
                                None => dst.fill(0),
                            }
                        }
                    }
                    assert!(
                        r.image == self.snapshots[&end.epoch],
                        "backup {b}: replica after committing epoch {} differs from the memory image at its pause",
                        end.epoch
                    );
                    self.commits_checked += 1;
                    r.rx.epoch_committed(end.epoch).unwrap();
                }
                Action::Discard { epoch } => {
                    r.journal.remove(&epoch);
                }
            }
        }
        while let Some((p, msg)) = self.replicas[b].rx.poll_transmit() {
            self.send(b, p as usize, false, &msg);
        }
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due: Vec<Packet> = vec![];
        let mut i = 0;
        while i < self.wire.len() {
            if self.wire[i].at <= now {
                due.push(self.wire.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|p| p.at);
        for pkt in due {
            let (up, life) = self.paths[pkt.backup][pkt.path];
            if !up || life != pkt.life {
                continue;
            }
            let mut d = endophyte_wire::FrameDecoder::new(8 << 20);
            d.push(&pkt.bytes);
            let msg = Message::decode(d.next_frame().unwrap().unwrap()).unwrap();
            let t = self.t();
            if pkt.to_backup {
                let b = pkt.backup;
                let r = &mut self.replicas[b];
                if r.dead {
                    continue;
                }
                let point = (r.rx.committed_epoch(), r.rx.committed_session());
                if r.target.handle_message(pkt.path as u64, &msg, point, t) {
                    self.drive_target(b);
                } else if r.target.holds_vm() {
                    // Fenced, as the backup's driver does: nothing goes into a prepared or running VM's RAM.
                    if !matches!(msg, Message::Ping { .. } | Message::Pong { .. }) {
                        let refusal = Message::Error {
                            code: ErrorCode::Fenced,
                            message: "the VM is prepared or runs here".into(),
                        };
                        self.send(b, pkt.path, false, &refusal);
                    }
                } else {
                    let _ = r.rx.handle_message(pkt.path as u64, msg);
                    self.drive_replica(b);
                }
            } else {
                self.sender
                    .handle_message(pkt.backup, pkt.path, msg, t)
                    .unwrap();
            }
        }
    }

    pub fn step(&mut self) {
        self.now += Duration::from_millis(1);
        self.deliver();
        for b in 0..self.replicas.len() {
            self.drive_target(b);
        }
        self.drive_sender();
    }

    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    /// Runs until the switchover has an outcome (at most `limit_ms`).
    pub fn run_until_outcome(&mut self, limit_ms: u64) -> SwitchoverOutcome {
        for _ in 0..limit_ms {
            self.step();
            if let Some((_, o)) = &self.outcome {
                return o.clone();
            }
        }
        panic!("no switchover outcome after {limit_ms} ms");
    }

    /// Lets in-flight work finish; then every backup must hold the last epoch.
    pub fn settle(&mut self) {
        self.settle_backups(&(0..self.replicas.len()).collect::<Vec<_>>());
    }

    /// As [`Sim::settle`], for some backups.
    pub fn settle_backups(&mut self, backups: &[usize]) {
        for _ in 0..60_000 {
            self.step();
            if backups
                .iter()
                .all(|&b| self.sender.committed(b) == self.epoch)
            {
                return;
            }
        }
        let c: Vec<u64> = self
            .replicas
            .iter()
            .map(|r| r.rx.committed_epoch())
            .collect();
        panic!("did not converge on epoch {}: committed {c:?}", self.epoch);
    }

    /// The backup process restarts and one path reconnects to the new instance at once, while the sender
    /// still believes the other paths up (their connections to the old instance have not timed out yet).
    pub fn restart_backup_silently(&mut self, b: usize) {
        let committed = self.replicas[b].rx.committed_epoch();
        let session = self.replicas[b].rx.committed_session();
        let image = self.replicas[b].image.clone();
        let instance = self.replicas[b].instance + 1000;
        for p in &mut self.paths[b] {
            // Whatever is in flight to or from the old instance is lost with it; sends go nowhere.
            p.0 = false;
            p.1 += 1;
        }
        self.replicas[b] = Replica::new(self.pages * PS, instance, committed, session, image);
        self.path_up(b, 0);
    }

    /// The stale paths time out and reconnect.
    pub fn reconnect_stale_paths(&mut self, b: usize) {
        let now = self.t();
        for p in 1..self.paths[b].len() {
            self.sender.handle_path_down(b, p, now);
            self.path_up(b, p);
        }
    }

    pub fn restart_backup(&mut self, b: usize) {
        let committed = self.replicas[b].rx.committed_epoch();
        let session = self.replicas[b].rx.committed_session();
        assert!(
            committed == 0 || session == SESSION,
            "a committed epoch without its session"
        );
        let image = self.replicas[b].image.clone();
        let instance = self.replicas[b].instance + 1000;
        for p in 0..self.paths[b].len() {
            self.path_down(b, p);
        }
        self.drive_sender();
        self.replicas[b] = Replica::new(self.pages * PS, instance, committed, session, image);
    }

    /// The backup process is killed: it answers nothing more, and after `detect_ms` its paths are seen
    /// down (the transport's idle timeout).
    pub fn kill_backup(&mut self, b: usize, detect_ms: u64) {
        // Its VMM is a process of its own: a VM it prepared stays paused, one it resumed runs on.
        self.replicas[b].dead = true;
        self.run_for(detect_ms);
        for p in 0..self.paths[b].len() {
            self.path_down(b, p);
        }
    }
}
