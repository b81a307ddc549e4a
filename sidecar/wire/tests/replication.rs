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
