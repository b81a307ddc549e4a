//! Deterministic simulation of a migration's switchover (see `common`): the sender and its source
//! switchover against backups whose targets drive a simulated VMM, over virtual links. Each run checks,
//! besides the outcome, that the guest never ran in two places (checked at every simulated millisecond),
//! that a VM restored on the target holds exactly the final epoch's memory image, and how long the source
//! guest stood still.

mod common;

use std::time::Duration;

use common::*;
use endophyte_wire::switchover::{FenceState, SwitchoverOutcome, TargetEvent, Timeouts};
use endophyte_wire::Message;

/// Two backups (b0, b1), replicating for a while; the switchover goes to b1.
fn replicated(seed: u64, link: LinkCfg) -> Sim {
    let mut sim = Sim::new(seed, 2, 2, 128, link, 1);
    for _ in 0..10 {
        sim.guest_writes(20);
        sim.cut_epoch();
        sim.run_for(20);
    }
    sim.settle();
    sim
}

fn timeouts() -> Timeouts {
    Timeouts::default()
}

/// The VM runs on the target with the final epoch's image, and the source stopped for good.
fn assert_switched(sim: &Sim, target: usize) {
    let r = &sim.replicas[target];
    assert!(r.vmm.running, "the target VM does not run");
    assert!(sim.source_stopped);
    let e = sim.epoch;
    assert_eq!(r.vmm.restored_epoch, Some(e));
    assert!(
        r.vmm.ram.as_deref() == Some(&sim.snapshots[&e][..]),
        "the target VM's RAM is not the final epoch's image"
    );
    assert_eq!(r.target.fence().state, FenceState::Running);
}

#[test]
fn a_switchover_over_lossy_links_runs_the_final_epoch_on_the_target() {
    for seed in 1..=6 {
        let mut sim = replicated(seed, LOSSY);
        sim.guest_writes(30);
        sim.begin_switchover(1, timeouts());
        let o = sim.run_until_outcome(30_000);
        assert!(
            matches!(o, SwitchoverOutcome::SwitchedOver { .. }),
            "seed {seed}: {o:?}"
        );
        assert_switched(&sim, 1);
        // The other backup holds the final epoch too, and replication into the running VM is refused.
        sim.settle_backups(&[0]);
        assert!(sim.replicas[1].target.holds_vm());
    }
}

#[test]
fn a_lost_commit_is_sent_again_and_the_switchover_completes() {
    let mut sim = replicated(2, CLEAN);
    sim.drop_rule = Some(Box::new(|m| matches!(m, Message::SwitchoverCommit { .. })));
    let start = sim.now;
    sim.begin_switchover(1, timeouts());
    let o = sim.run_until_outcome(30_000);
    assert!(matches!(o, SwitchoverOutcome::SwitchedOver { .. }), "{o:?}");
    assert!(sim.drop_rule.is_none(), "the commit was never dropped");
    assert_switched(&sim, 1);
    // The guest stood still for the resend interval: the commit went again after 1 s.
    let took = sim.now - start;
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "took {took:?}"
    );
}

#[test]
fn a_target_killed_after_ready_leaves_the_guest_paused_and_running_nowhere() {
    let mut sim = replicated(3, CLEAN);
    // The target dies between preparing the VM and hearing the commit.
    sim.drop_rule = Some(Box::new(|m| matches!(m, Message::SwitchoverCommit { .. })));
    sim.begin_switchover(1, timeouts());
    for _ in 0..5_000 {
        sim.step();
        if sim.replicas[1].target.fence().state == FenceState::Prepared && sim.drop_rule.is_none() {
            break;
        }
    }
    sim.kill_backup(1, 500);
    let o = sim.run_until_outcome(30_000);
    assert!(matches!(o, SwitchoverOutcome::InDoubt { .. }), "{o:?}");
    assert!(
        sim.source_paused && !sim.source_stopped,
        "the source must stay paused"
    );
    assert!(
        !sim.replicas[1].vmm.running,
        "the prepared VM must never run without the commit"
    );
}

#[test]
fn an_abort_that_crosses_ready_resumes_the_source_and_stops_the_target_vm() {
    // 100 ms each way, exactly: the source gives up waiting for Ready 2 s after sending Switchover (about
    // 200 ms after the pause), and the target's three 633 ms steps end within 100 ms of that, so its
    // Ready and the source's Abort are on the wire at the same time.
    let link = LinkCfg {
        loss: 0.0,
        delay_ms: 100,
        jitter_ms: 0,
    };
    let mut sim = replicated(4, link);
    sim.replicas[1].vmm.step = Duration::from_millis(633);
    let t = Timeouts {
        ready: Duration::from_millis(2_000),
        ..timeouts()
    };
    sim.begin_switchover(1, t);
    let o = sim.run_until_outcome(30_000);
    assert!(matches!(o, SwitchoverOutcome::Abandoned { .. }), "{o:?}");
    assert!(!sim.source_paused, "the source resumes");
    sim.run_for(1_000);
    let r = &sim.replicas[1];
    // It did get the VM ready (so its Ready crossed the Abort), then dropped it on the Abort.
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, TargetEvent::Prepared { .. })),
        "the target never got ready: {:?}",
        r.events
    );
    assert!(
        !r.vmm.running && r.vmm.ram.is_none(),
        "the prepared VM was not stopped"
    );
    assert_eq!(r.target.fence().state, FenceState::Aborted);
    assert!(!r.target.holds_vm());
}

#[test]
fn a_stale_generation_is_refused_and_the_source_resumes_at_once() {
    let mut sim = replicated(5, CLEAN);
    // The target saw a later generation already (the VM ran elsewhere under it).
    sim.generation = 0;
    sim.replicas[1].target = endophyte_wire::switchover::TargetSwitchover::new(
        "vm".into(),
        endophyte_wire::Fence {
            generation: 7,
            state: FenceState::Departed,
            ..Default::default()
        },
        false,
    );
    let start = sim.now;
    sim.begin_switchover(1, timeouts());
    let o = sim.run_until_outcome(30_000);
    match o {
        SwitchoverOutcome::Abandoned { why, .. } => assert!(why.contains("stale"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(
        sim.now - start < Duration::from_millis(200),
        "took {:?}",
        sim.now - start
    );
    assert!(!sim.replicas[1].vmm.running);
}

#[test]
fn a_target_failing_to_restore_answers_at_once_and_the_source_resumes() {
    let mut sim = replicated(6, CLEAN);
    sim.replicas[1].vmm.fail_restore = Some("the VMM refused the state".into());
    let start = sim.now;
    sim.begin_switchover(1, timeouts());
    let o = sim.run_until_outcome(30_000);
    match o {
        SwitchoverOutcome::Abandoned { why, .. } => {
            assert!(why.contains("refused the state"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        sim.now - start < Duration::from_millis(200),
        "took {:?}",
        sim.now - start
    );
    assert_eq!(sim.replicas[1].target.fence().state, FenceState::Aborted);
    // Replication to it goes on: it is a backup again.
    sim.guest_writes(10);
    sim.cut_epoch();
    sim.settle();
}

#[test]
fn a_target_whose_disk_fails_on_the_final_epoch_resumes_the_source_at_once() {
    let mut sim = replicated(7, CLEAN);
    sim.replicas[1].fail_store = Some(sim.epoch + 1);
    sim.guest_writes(10);
    let start = sim.now;
    sim.begin_switchover(1, timeouts());
    let o = sim.run_until_outcome(30_000);
    match o {
        SwitchoverOutcome::Abandoned { why, .. } => {
            assert!(why.contains("No space left"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        sim.now - start < Duration::from_millis(200),
        "took {:?}",
        sim.now - start
    );
    assert!(sim.peer_errors.iter().any(|e| e.contains("No space left")));
}

#[test]
fn paths_dying_during_the_final_epoch_resume_the_source_and_the_target_catches_up() {
    let mut sim = replicated(8, CLEAN);
    sim.guest_writes(40);
    sim.begin_switchover(1, timeouts());
    sim.run_for(1);
    for p in 0..2 {
        sim.path_down(1, p);
    }
    let o = sim.run_until_outcome(1_000);
    assert!(matches!(o, SwitchoverOutcome::Abandoned { .. }), "{o:?}");
    assert!(!sim.source_paused);
    assert_eq!(sim.replicas[1].target.fence().state, FenceState::None);
    // The paths come back; the backup resyncs and holds the latest epoch again.
    for p in 0..2 {
        sim.path_up(1, p);
    }
    sim.guest_writes(10);
    sim.cut_epoch();
    sim.settle();
}

#[test]
fn a_warm_up_is_answered_once_the_standby_is_ready_and_the_switchover_uses_it() {
    for seed in 1..=3 {
        let mut sim = replicated(seed, CLEAN);
        sim.warm_up(1);
        sim.run_for(2_000);
        assert_eq!(sim.standby_ready, [(1, 1, true)], "seed {seed}");
        assert!(sim.replicas[1].vmm.standby, "the standby runs");
        sim.guest_writes(30);
        sim.begin_switchover(1, timeouts());
        let o = sim.run_until_outcome(30_000);
        assert!(
            matches!(o, SwitchoverOutcome::SwitchedOver { .. }),
            "seed {seed}: {o:?}"
        );
        assert_switched(&sim, 1);
        assert!(
            !sim.replicas[1].vmm.standby,
            "the switchover took the standby"
        );
    }
}

#[test]
fn a_standby_that_fails_to_start_is_answered_too_and_the_switchover_launches_its_own() {
    let mut sim = replicated(7, CLEAN);
    sim.replicas[1].vmm.fail_standby = Some("no such QEMU".into());
    sim.warm_up(1);
    sim.run_for(500);
    // The source is told at once, so that it does not wait for a standby that will not come.
    assert_eq!(sim.standby_ready, [(1, 1, false)]);
    sim.begin_switchover(1, timeouts());
    let o = sim.run_until_outcome(10_000);
    assert!(matches!(o, SwitchoverOutcome::SwitchedOver { .. }), "{o:?}");
    assert_switched(&sim, 1);
}

#[test]
fn a_warm_up_of_a_stale_generation_starts_nothing_and_is_not_answered() {
    let mut sim = replicated(8, CLEAN);
    // The primary died and b1 promoted the VM (generation 1).
    sim.source_stopped = true;
    let (epoch, t) = (sim.epoch, sim.t());
    let state = endophyte_wire::VmState::new("sim", 1, epoch.to_le_bytes().to_vec()).unwrap();
    sim.replicas[1]
        .target
        .handle_promote((epoch, 0), state, false, t)
        .unwrap();
    sim.run_for(500);
    // b1 runs the VM under generation 1 now; a warm-up for generation 1 is stale there.
    sim.warm_up(1);
    sim.run_for(500);
    assert!(sim.standby_ready.is_empty(), "{:?}", sim.standby_ready);
    assert!(!sim.replicas[1].vmm.standby);
}
