//! Unit tests of the parent module.

use super::*;

fn sw(generation: u64) -> Message {
    Message::Switchover(Switchover {
        generation,
        session: 5,
        epoch: 9,
        verify: true,
        state: VmState::new("testvm", 1, vec![7]).unwrap(),
    })
}

/// Does every action at once, successfully, 1 ms each; returns what it did.
fn drive(m: &mut TargetSwitchover, now: &mut Instant) -> Vec<TargetAction> {
    let mut done = vec![];
    while let Some(a) = m.poll_action() {
        *now += Duration::from_millis(1);
        match &a {
            TargetAction::Launch => m.handle_launched(Ok(42), *now),
            TargetAction::RecordFence { .. } => m.handle_fence_recorded(Ok(()), *now),
            TargetAction::Restore { .. } => m.handle_restored(Ok(()), *now),
            TargetAction::HashRam => m.handle_hashed(Ok("abc".into()), *now),
            TargetAction::Resume => m.handle_resumed(Ok(()), *now),
            TargetAction::StartStandby => m.handle_standby(Ok(())),
            _ => {}
        }
        done.push(a);
    }
    done
}

#[test]
fn switchover_records_prepared_before_restoring_and_running_before_resuming() {
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    assert!(m.handle_message(3, &sw(1), (9, 5), now));
    let done = drive(&mut m, &mut now);
    let kinds: Vec<&str> = done
        .iter()
        .map(|a| match a {
            TargetAction::Launch => "launch",
            TargetAction::RecordFence { fence, .. } if fence.state == FenceState::Prepared => {
                "prepared"
            }
            TargetAction::Restore { .. } => "restore",
            TargetAction::HashRam => "hash",
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["launch", "prepared", "restore", "hash"]);
    assert!(m.holds_vm());
    let Some((3, Message::SwitchoverReady(r))) = m.poll_transmit() else {
        panic!("no ready")
    };
    assert_eq!(
        (r.generation, r.ram_hash.as_str(), r.spawn_us),
        (1, "abc", 1000)
    );
    m.handle_message(3, &Message::SwitchoverCommit { generation: 1 }, (9, 5), now);
    let done = drive(&mut m, &mut now);
    assert!(matches!(
        &done[0],
        TargetAction::RecordFence { fence, durable: true } if fence.state == FenceState::Running
    ));
    assert_eq!(done[1], TargetAction::Resume);
    assert_eq!(
        m.poll_transmit(),
        Some((
            3,
            Message::SwitchedOver {
                generation: 1,
                resume_us: 1000
            }
        ))
    );
    assert!(m.runs_here());
    // A repeated commit is answered the same way.
    m.handle_message(4, &Message::SwitchoverCommit { generation: 1 }, (9, 5), now);
    assert!(matches!(
        m.poll_transmit(),
        Some((4, Message::SwitchedOver { .. }))
    ));
}

#[test]
fn stale_generations_and_wrong_replicas_are_refused() {
    let now = Instant::now();
    let fence = Fence {
        generation: 3,
        state: FenceState::Departed,
        ..Fence::default()
    };
    let mut m = TargetSwitchover::new("vm".into(), fence, false);
    m.handle_message(1, &sw(3), (9, 5), now);
    assert!(matches!(
        m.poll_transmit(),
        Some((1, Message::Error { code: ErrorCode::Fenced, message })) if message.contains("stale")
    ));
    m.handle_message(1, &sw(4), (8, 5), now);
    assert!(matches!(
        m.poll_transmit(),
        Some((
            1,
            Message::Error {
                code: ErrorCode::SwitchoverFailed,
                ..
            }
        ))
    ));
    assert!(m.poll_action().is_none() && !m.holds_vm());
}

#[test]
fn a_failed_restore_stops_the_vmm_and_gives_the_generation_up() {
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    m.handle_message(1, &sw(2), (9, 5), now);
    while let Some(a) = m.poll_action() {
        now += Duration::from_millis(1);
        match a {
            TargetAction::Launch => m.handle_launched(Ok(7), now),
            TargetAction::RecordFence { .. } => m.handle_fence_recorded(Ok(()), now),
            TargetAction::Restore { .. } => m.handle_restored(Err("bad state".into()), now),
            TargetAction::StopVm => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(m.fence().state, FenceState::Aborted);
    assert!(matches!(
        m.poll_transmit(),
        Some((1, Message::Error { code: ErrorCode::SwitchoverFailed, message })) if message.contains("bad state")
    ));
    // The generation never starts here afterwards.
    m.handle_message(1, &sw(2), (9, 5), now);
    assert!(matches!(
        m.poll_transmit(),
        Some((
            1,
            Message::Error {
                code: ErrorCode::Fenced,
                ..
            }
        ))
    ));
}

#[test]
fn a_failed_commit_record_never_resumes_and_says_so() {
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    m.handle_message(1, &sw(2), (9, 5), now);
    drive(&mut m, &mut now);
    m.poll_transmit();
    m.handle_message(1, &Message::SwitchoverCommit { generation: 2 }, (9, 5), now);
    let mut resumed = false;
    while let Some(a) = m.poll_action() {
        match a {
            TargetAction::RecordFence { fence, .. } if fence.state == FenceState::Running => {
                m.handle_fence_recorded(Err("EIO".into()), now)
            }
            TargetAction::Resume => resumed = true,
            _ => m.handle_fence_recorded(Ok(()), now),
        }
    }
    assert!(!resumed && !m.holds_vm());
    assert!(matches!(
        m.poll_transmit(),
        Some((
            1,
            Message::Error {
                code: ErrorCode::SwitchoverFailed,
                ..
            }
        ))
    ));
}

#[test]
fn after_a_crash_a_prepared_vm_is_killed_and_a_dead_running_vm_has_departed() {
    let fence = Fence {
        generation: 2,
        state: FenceState::Prepared,
        vmm_pid: 99,
        ..Fence::default()
    };
    let mut m = TargetSwitchover::new("vm".into(), fence, true);
    assert_eq!(
        m.poll_action(),
        Some(TargetAction::KillLeftover { pid: 99 })
    );
    assert!(
        matches!(m.poll_action(), Some(TargetAction::RecordFence { fence, .. }) if fence.state == FenceState::Aborted)
    );
    let fence = Fence {
        generation: 2,
        state: FenceState::Running,
        vmm_pid: 99,
        ..Fence::default()
    };
    assert!(TargetSwitchover::new("vm".into(), fence.clone(), true).runs_here());
    let mut m = TargetSwitchover::new("vm".into(), fence, false);
    assert!(!m.holds_vm());
    assert!(
        matches!(m.poll_action(), Some(TargetAction::RecordFence { fence, .. }) if fence.state == FenceState::Departed)
    );
}

#[test]
fn promote_prepares_and_resumes_without_a_source() {
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    let g = m
        .handle_promote(
            (9, 5),
            VmState::new("testvm", 1, vec![1]).unwrap(),
            false,
            now,
        )
        .unwrap();
    assert_eq!(g, 1);
    drive(&mut m, &mut now);
    let mut running = false;
    while let Some(e) = m.poll_event() {
        running |= matches!(
            e,
            TargetEvent::Running {
                origin: Origin::Promote,
                ..
            }
        );
    }
    assert!(running && m.runs_here());
    assert!(m.poll_transmit().is_none());
    assert!(m
        .handle_promote(
            (9, 5),
            VmState::new("testvm", 1, vec![1]).unwrap(),
            false,
            now
        )
        .unwrap_err()
        .contains("already runs"));
}

#[test]
fn an_unused_prepared_vm_is_given_up_after_a_minute() {
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    m.handle_message(1, &sw(2), (9, 5), now);
    drive(&mut m, &mut now);
    let t = m.poll_timeout().unwrap();
    m.handle_timeout(t);
    assert_eq!(m.poll_action(), Some(TargetAction::StopVm));
    assert_eq!(m.fence().state, FenceState::Aborted);
}

#[test]
fn a_warm_up_asked_again_for_the_same_generation_is_answered_again_on_the_new_path() {
    // A migration that failed before its switchover (a veto, a missed deadline) leaves the standby
    // waiting; the retry's warm-up must hear that it is ready, or the source waits its whole bound.
    let mut now = Instant::now();
    let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false);
    let warm = Message::SwitchoverWarmup { generation: 1 };
    assert!(m.handle_message(3, &warm, (9, 5), now));
    assert!(matches!(
        drive(&mut m, &mut now)[..],
        [TargetAction::StartStandby]
    ));
    // Still loading: a repeated warm-up is answered once the standby is ready, on the newest path.
    assert!(m.handle_message(4, &warm, (9, 5), now));
    assert!(m.poll_transmit().is_none());
    m.handle_standby_loaded(true);
    assert!(matches!(
        m.poll_transmit(),
        Some((
            4,
            Message::SwitchoverStandby {
                generation: 1,
                preloaded: true
            }
        ))
    ));
    // Ready: the next warm-up gets its answer at once, and starts no second VMM.
    now += STANDBY_TIMEOUT / 2;
    assert!(m.handle_message(5, &warm, (9, 5), now));
    assert!(drive(&mut m, &mut now).is_empty());
    assert!(matches!(
        m.poll_transmit(),
        Some((
            5,
            Message::SwitchoverStandby {
                generation: 1,
                preloaded: true
            }
        ))
    ));
    // The standby waits a full bound from the last warm-up.
    m.handle_timeout(now + STANDBY_TIMEOUT / 2 + Duration::from_millis(1));
    assert!(m.has_standby());
    m.handle_timeout(now + STANDBY_TIMEOUT);
    assert!(!m.has_standby());
}

/// Under a fencing authority the commit claims the generation first; a refused claim gives the generation
/// up (the VM never resumes, the source hears `SwitchoverFailed`), a landed one records `running` and
/// resumes.
#[test]
fn under_an_authority_the_commit_claims_before_recording_running_and_a_refusal_never_resumes() {
    for claim_ok in [true, false] {
        let mut now = Instant::now();
        let mut m = TargetSwitchover::new("vm".into(), Fence::default(), false).with_authority();
        m.handle_message(3, &sw(1), (9, 5), now);
        drive(&mut m, &mut now);
        assert!(matches!(
            m.poll_transmit(),
            Some((3, Message::SwitchoverReady(_)))
        ));
        m.handle_message(3, &Message::SwitchoverCommit { generation: 1 }, (9, 5), now);
        assert_eq!(
            m.poll_action(),
            Some(TargetAction::ClaimHold { generation: 1 })
        );
        // Nothing is recorded or resumed before the claim's answer.
        assert_eq!(m.poll_action(), None);
        let r = if claim_ok {
            Ok(())
        } else {
            Err("the authority says node \"b2\" holds it".to_string())
        };
        m.handle_hold_claimed(r, now);
        let done = drive(&mut m, &mut now);
        if claim_ok {
            assert!(matches!(
                &done[0],
                TargetAction::RecordFence { fence, durable: true } if fence.state == FenceState::Running
            ));
            assert_eq!(done[1], TargetAction::Resume);
            assert!(m.runs_here());
        } else {
            assert!(done.contains(&TargetAction::StopVm), "{done:?}");
            assert!(!done.contains(&TargetAction::Resume), "{done:?}");
            assert!(!m.holds_vm());
            assert!(matches!(
                m.poll_transmit(),
                Some((3, Message::Error { code: ErrorCode::SwitchoverFailed, message })) if message.contains("b2")
            ));
        }
    }
}
