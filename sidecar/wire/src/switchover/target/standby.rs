//! The warm-up: a standby VMM started while the guest still runs on the source, and the target's answer
//! once it is as ready as it gets (`SwitchoverStandby`).

use std::time::Instant;

use super::{Phase, TargetAction, TargetSwitchover};
use crate::msg::Message;
use crate::receiver::PathKey;

impl TargetSwitchover {
    pub(super) fn warm_up(&mut self, path: PathKey, generation: u64, now: Instant) {
        if generation <= self.fence.generation {
            return;
        }
        match &mut self.phase {
            Phase::Idle => {
                self.phase = Phase::Standby {
                    since: now,
                    generation,
                    path,
                    loaded: None,
                };
                self.actions.push_back(TargetAction::StartStandby);
            }
            // The source tries again (its last migration failed before the switchover): the standby
            // still waits, for longer now, and the source hears again that it is ready, on its new path.
            // Without this answer it would wait its whole standby bound.
            Phase::Standby {
                since,
                generation: g,
                path: p,
                loaded,
            } if *g == generation => {
                *since = now;
                *p = path;
                if let Some(preloaded) = *loaded {
                    self.out.push_back((
                        path,
                        Message::SwitchoverStandby {
                            generation,
                            preloaded,
                        },
                    ));
                }
            }
            _ => {}
        }
    }

    /// The warm-up's standby VMM started, or not (then the switchover starts one itself, and the source
    /// is told at once that no better standby will come). Once started, the driver answers
    /// [`TargetSwitchover::handle_standby_loaded`] when it is as ready as it gets.
    pub fn handle_standby(&mut self, result: Result<(), String>) {
        if result.is_err() {
            self.handle_standby_loaded(false);
            if matches!(self.phase, Phase::Standby { .. }) {
                self.phase = Phase::Idle;
            }
        }
    }

    /// The standby VMM is as ready as it gets: it runs and, when `preloaded`, loaded the replica ahead
    /// of the switchover. Tells the source ([`Message::SwitchoverStandby`], on the warm-up's path), which
    /// may have held the switchover back for it.
    pub fn handle_standby_loaded(&mut self, preloaded: bool) {
        if let Phase::Standby {
            generation,
            path,
            loaded,
            ..
        } = &mut self.phase
        {
            *loaded = Some(preloaded);
            self.out.push_back((
                *path,
                Message::SwitchoverStandby {
                    generation: *generation,
                    preloaded,
                },
            ));
        }
    }
}
