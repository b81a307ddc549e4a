//! Deterministic simulation of epoch replication: one sender, several receivers, virtual links with loss,
//! delay, jitter (so reordering) and paths that die; a virtual clock.
//!
//! The check is independent of the protocol's own bookkeeping: every time a receiver commits an epoch, its
//! replica image must equal the sender's memory image snapshotted at that epoch's pause, byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use endophyte_wire::{
    Action, ChunkBuilder, EpochStart, Event, Hello, Message, PageChunk, Receiver, Sender,
    SenderConfig,
};

const PS: usize = 4096;
const SESSION: u64 = 7;

/// xorshift64*: small, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

#[derive(Clone, Copy)]
struct LinkCfg {
    loss: f64,
    delay_ms: u64,
    jitter_ms: u64,
}

struct Packet {
    at: Duration,
    backup: usize,
    path: usize,
    to_backup: bool,
    /// The path's incarnation when sent; packets of a dead incarnation are lost with it.
    life: u32,
    bytes: Vec<u8>,
}

struct Replica {
    rx: Receiver,
    image: Vec<u8>,
    journal: HashMap<u64, BTreeMap<u32, PageChunk>>,
    instance: u64,
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
        }
    }
}

struct Sim {
    now: Duration,
    base: Instant,
    rng: Rng,
    mem: Vec<u8>,
    pages: usize,
    snapshots: BTreeMap<u64, Vec<u8>>,
    dirty_since: BTreeMap<u64, Vec<usize>>,
    sender: Sender,
    replicas: Vec<Replica>,
    paths: Vec<Vec<(bool, u32)>>,
    link: LinkCfg,
    wire: Vec<Packet>,
    epoch: u64,
    commits_checked: usize,
    durable_seen: u64,
}

impl Sim {
    fn new(
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
        };
        s.snapshots.insert(0, s.mem.clone());
        for b in 0..backups {
            for p in 0..paths {
                s.path_up(b, p);
            }
        }
        s
    }

    fn t(&self) -> Instant {
        self.base + self.now
    }

    fn path_up(&mut self, b: usize, p: usize) {
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

    fn path_down(&mut self, b: usize, p: usize) {
        self.paths[b][p].0 = false;
        self.sender.handle_path_down(b, p);
    }

    /// The guest writes `n` random pages (random content, some zeroed).
    fn guest_writes(&mut self, n: usize) {
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
    /// backups.
    fn cut_epoch(&mut self) {
        if !self.sender.can_begin_epoch() {
            // Back-pressure: this epoch runs longer; its dirty pages keep accumulating.
            return;
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
    }

    fn send(&mut self, b: usize, p: usize, to_backup: bool, msg: &Message) {
        let (up, life) = self.paths[b][p];
        if !up || self.rng.chance(self.link.loss) {
            return;
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
                Event::PeerError { message, .. } => panic!("peer error in a clean run: {message}"),
                Event::NeedsResync { .. }
                | Event::BackupCommitted { .. }
                | Event::BackupLost { .. } => {}
            }
        }
    }

    fn drive_replica(&mut self, b: usize) {
        loop {
            let r = &mut self.replicas[b];
            let Some(a) = r.rx.poll_action() else { break };
            match a {
                Action::Store { epoch, seq, chunk } => {
                    r.journal.entry(epoch).or_default().insert(seq, chunk);
                    r.rx.chunk_stored(epoch, seq).unwrap();
                }
                Action::Commit { end } => {
                    let chunks = r.journal.remove(&end.epoch).unwrap();
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
                    if r.image != self.snapshots[&end.epoch] {
                        let bad: Vec<usize> = (0..self.pages)
                            .filter(|&p| {
                                r.image[p * PS..(p + 1) * PS]
                                    != self.snapshots[&end.epoch][p * PS..(p + 1) * PS]
                            })
                            .collect();
                        eprintln!(
                            "epoch {} base {} committed-before {} bad pages {bad:?}",
                            end.epoch,
                            end.base_epoch,
                            r.rx.committed_epoch()
                        );
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
            if pkt.to_backup {
                self.replicas[pkt.backup]
                    .rx
                    .handle_message(pkt.path as u64, msg)
                    .unwrap();
                self.drive_replica(pkt.backup);
            } else {
                let t = self.t();
                self.sender
                    .handle_message(pkt.backup, pkt.path, msg, t)
                    .unwrap();
            }
        }
    }

    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        self.deliver();
        self.drive_sender();
    }

    fn run_for(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    /// Lets in-flight work finish; then every backup must hold the last epoch.
    fn settle(&mut self) {
        for _ in 0..60_000 {
            self.step();
            if (0..self.replicas.len()).all(|b| self.sender.committed(b) == self.epoch) {
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
    fn restart_backup_silently(&mut self, b: usize) {
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
    fn reconnect_stale_paths(&mut self, b: usize) {
        for p in 1..self.paths[b].len() {
            self.sender.handle_path_down(b, p);
            self.path_up(b, p);
        }
    }

    fn restart_backup(&mut self, b: usize) {
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
}

const LOSSY: LinkCfg = LinkCfg {
    loss: 0.05,
    delay_ms: 5,
    jitter_ms: 25,
};

#[test]
fn lossy_reordering_links_commit_exact_images() {
    for seed in 1..=6 {
        let mut sim = Sim::new(seed, 3, 3, 256, LOSSY, 2);
        for _ in 0..25 {
            let n = 5 + sim.rng.below(60) as usize;
            sim.guest_writes(n);
            sim.cut_epoch();
            sim.run_for(50);
        }
        sim.settle();
        assert!(sim.epoch >= 10, "seed {seed}: only {} epochs", sim.epoch);
        assert!(
            sim.commits_checked as u64 >= 2 * sim.epoch,
            "seed {seed}: only {} commits",
            sim.commits_checked
        );
        assert_eq!(sim.durable_seen, sim.epoch);
    }
}

#[test]
fn a_path_that_dies_mid_epoch_loses_nothing() {
    for seed in 1..=6 {
        let mut sim = Sim::new(
            seed,
            2,
            4,
            512,
            LinkCfg {
                loss: 0.0,
                delay_ms: 10,
                jitter_ms: 10,
            },
            2,
        );
        for round in 0..20 {
            sim.guest_writes(200);
            sim.cut_epoch();
            sim.run_for(3);
            if round == 5 {
                // Mid-epoch: chunks of this epoch are in flight on every path.
                sim.path_down(0, 1);
                sim.path_down(1, 3);
            }
            if round == 12 {
                sim.path_up(0, 1);
            }
            sim.run_for(40);
        }
        sim.settle();
        assert_eq!(sim.durable_seen, sim.epoch);
    }
}

#[test]
fn a_restarted_backup_resyncs_from_its_committed_epoch() {
    for seed in 1..=6 {
        let mut sim = Sim::new(seed, 2, 2, 256, LOSSY, 1);
        for round in 0..24 {
            sim.guest_writes(40);
            sim.cut_epoch();
            sim.run_for(30);
            if round == 8 {
                sim.restart_backup(1);
            }
            if round == 10 {
                for p in 0..2 {
                    sim.path_up(1, p);
                }
            }
        }
        sim.settle();
    }
}

#[test]
fn a_backup_cut_off_entirely_catches_up() {
    let mut sim = Sim::new(3, 2, 3, 256, LOSSY, 1);
    for round in 0..30 {
        sim.guest_writes(30);
        sim.cut_epoch();
        sim.run_for(20);
        if round == 4 {
            for p in 0..3 {
                sim.path_down(1, p);
            }
        }
        if round == 20 {
            for p in 0..3 {
                sim.path_up(1, p);
            }
        }
    }
    sim.settle();
}

#[test]
fn a_backup_restarted_behind_live_looking_paths_resyncs() {
    for seed in 1..=6 {
        let mut sim = Sim::new(seed, 2, 3, 256, LOSSY, 1);
        for round in 0..24 {
            sim.guest_writes(40);
            sim.cut_epoch();
            sim.run_for(30);
            if round == 8 {
                sim.restart_backup_silently(1);
            }
            if round == 12 {
                sim.reconnect_stale_paths(1);
            }
        }
        sim.settle();
    }
}
