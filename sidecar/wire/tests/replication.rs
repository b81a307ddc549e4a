//! Deterministic simulation of epoch replication (see `common`): one sender, several receivers, virtual
//! links with loss, delay, jitter and paths that die; every commit is checked against the sender's memory
//! image at that epoch's pause.

mod common;

use common::*;

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
        assert!(
            sim.peer_errors.is_empty(),
            "seed {seed}: {:?}",
            sim.peer_errors
        );
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

/// The backups the first `n` chunk transmits go to, in the sender's order; everything it transmits now
/// goes on the wire as usual.
fn first_chunks(sim: &mut Sim, n: usize) -> Vec<usize> {
    let now = sim.t();
    let mut order = vec![];
    while let Some(t) = sim.sender.poll_transmit(now) {
        if matches!(t.msg, endophyte_wire::Message::Chunk { .. }) {
            order.push(t.backup);
        }
        sim.send(t.backup, t.path, true, &t.msg);
    }
    order.truncate(n);
    order
}

#[test]
fn a_prioritized_backup_is_served_first_and_the_others_still_get_their_epochs() {
    let mut sim = Sim::new(11, 2, 2, 2048, CLEAN, 2);
    sim.guest_writes(1500);
    sim.cut_epoch();
    assert_eq!(
        first_chunks(&mut sim, 4),
        vec![0, 0, 0, 0],
        "index order by default"
    );
    sim.settle();
    sim.sender.set_priority(Some(1));
    sim.guest_writes(1500);
    sim.cut_epoch();
    // Backup 1's window (2 paths x 4 chunks) goes out before any of backup 0's chunks.
    assert_eq!(first_chunks(&mut sim, 9), [vec![1; 8], vec![0]].concat());
    sim.settle();
    sim.sender.set_priority(None);
    sim.guest_writes(100);
    sim.cut_epoch();
    sim.settle();
    assert!(sim.peer_errors.is_empty(), "{:?}", sim.peer_errors);
}

#[test]
fn a_backup_served_alone_commits_its_epoch_before_the_others_get_a_chunk_of_it() {
    let mut sim = Sim::new(13, 2, 2, 2048, CLEAN, 2);
    sim.guest_writes(500);
    sim.cut_epoch();
    sim.settle();
    sim.sender.set_priority(Some(1));
    let e = sim.epoch + 1;
    sim.sender.serve_alone_until(1, e);
    sim.guest_writes(1500);
    assert!(sim.cut_epoch());
    let mut committed_at = None;
    for _ in 0..10_000 {
        sim.step();
        if sim.sender.committed(1) >= e {
            committed_at = Some(sim.now);
            break;
        }
    }
    let committed_at = committed_at.expect("backup 1 commits the epoch it is served alone");
    let to = |sim: &Sim, b: usize| {
        sim.chunks_sent
            .iter()
            .filter(|(_, x, ep)| *x == b && *ep == e)
            .map(|(t, _, _)| *t)
            .collect::<Vec<_>>()
    };
    assert!(!to(&sim, 1).is_empty());
    // Chunks go out in the step that delivered the commit at the earliest.
    assert!(
        to(&sim, 0).iter().all(|t| *t >= committed_at),
        "backup 0 got chunks of {e} before 1 committed it at {committed_at:?}: {:?}",
        to(&sim, 0)
    );
    // Then backup 0 gets the epoch too, and both hold it.
    sim.settle();
    let later = to(&sim, 0);
    assert!(!later.is_empty() && later.iter().all(|t| *t >= committed_at));
    assert_eq!(sim.sender.committed(0), e);
    // The hold is over: with the priority lifted, backup 0 is served in index order again.
    sim.sender.set_priority(None);
    sim.guest_writes(1500);
    sim.cut_epoch();
    assert_eq!(first_chunks(&mut sim, 1), vec![0]);
    sim.settle();
    assert!(sim.peer_errors.is_empty(), "{:?}", sim.peer_errors);
}

#[test]
fn min_rtt_is_the_lowest_ping_sample() {
    let mut sim = Sim::new(12, 1, 2, 1024, LOSSY, 1);
    assert_eq!(sim.sender.min_rtt(0), None, "nothing measured yet");
    for _ in 0..10 {
        sim.guest_writes(300);
        sim.cut_epoch();
        sim.run_for(100);
    }
    sim.settle();
    // LOSSY: 5 ms each way plus up to 25 ms of jitter, so samples lie in 10..=60 ms and the lowest of
    // many is near the bottom, below the smoothed value.
    let min = sim.sender.min_rtt(0).expect("pings answered");
    let smoothed = sim.sender.rtt(0).expect("pings answered");
    assert!(min >= std::time::Duration::from_millis(10), "{min:?}");
    assert!(min < smoothed, "min {min:?}, smoothed {smoothed:?}");
}
