//! The agent's run guard: the VMM side of failing closed. A sidecar arms it on its connection; from then
//! on the agent (a library inside the VMM, so it outlives any sidecar) pauses the guest by itself when that
//! connection is silent for the guard's timeout (a hung or stopped sidecar) or closes (a dead one), and
//! refuses every resume until a sidecar arms the guard again, which a sidecar does only once it holds the
//! VM's current generation (docs/fencing.md).
//!
//! A connection busy with a request counts as alive: a long request (hashing all of RAM) is the agent's
//! own work, not the sidecar's silence.

use std::time::{Duration, Instant};

use crate::agent::TargetError;

#[derive(Debug)]
struct Armed {
    conn: u64,
    client: String,
    timeout: Duration,
    last: Instant,
    busy: bool,
    generation: u64,
}

/// The guard's state, shared by every connection of one agent.
#[derive(Debug, Default)]
pub(crate) struct Guard {
    armed: Option<Armed>,
    /// Why the guard last tripped; cleared by the next arming.
    tripped: Option<String>,
}

impl Guard {
    /// Connection `conn` (client `client`) arms the guard.
    pub fn arm(
        &mut self,
        conn: u64,
        client: &str,
        timeout: Duration,
        generation: u64,
        now: Instant,
    ) -> Result<(), TargetError> {
        if timeout.is_zero() {
            return Err(TargetError {
                code: crate::proto::ErrorCode::BadRequest,
                message: "a guard timeout of 0 ms would pause the guest at once".into(),
            });
        }
        if let Some(a) = self.armed.as_ref().filter(|a| a.conn != conn) {
            return Err(TargetError::bad_state(format!(
                "the run guard is held by {:?} (attach connection {}, generation {}): one sidecar guards a guest",
                a.client, a.conn, a.generation
            )));
        }
        if let Some(why) = self.tripped.take() {
            tracing::warn!(
                client,
                generation,
                "run guard armed again after it tripped ({why})"
            );
        }
        self.armed = Some(Armed {
            conn,
            client: client.to_owned(),
            timeout,
            last: now,
            busy: false,
            generation,
        });
        Ok(())
    }

    /// Connection `conn` disarms the guard it holds (no effect otherwise).
    pub fn disarm(&mut self, conn: u64) {
        if self.held_by(conn) {
            self.armed = None;
        }
    }

    /// Whether `conn` holds the armed guard.
    pub fn held_by(&self, conn: u64) -> bool {
        self.armed.as_ref().is_some_and(|a| a.conn == conn)
    }

    /// A request on `conn` starts (`busy`) or ends: proof of life when `conn` holds the guard.
    pub fn touch(&mut self, conn: u64, busy: bool, now: Instant) {
        if let Some(a) = self.armed.as_mut().filter(|a| a.conn == conn) {
            a.last = now;
            a.busy = busy;
        }
    }

    /// Time passed: the reason to pause the guest now, if the holder went silent past its timeout. The
    /// guard is then tripped.
    pub fn check(&mut self, now: Instant) -> Option<String> {
        let a = self.armed.as_ref()?;
        if a.busy || now.saturating_duration_since(a.last) < a.timeout {
            return None;
        }
        let why = format!(
            "{:?} (generation {}) sent nothing for {:?}",
            a.client, a.generation, a.timeout
        );
        self.trip(why.clone());
        Some(why)
    }

    /// Connection `conn` closed: the reason to pause the guest now, if it held the guard.
    pub fn closed(&mut self, conn: u64) -> Option<String> {
        let a = self.armed.as_ref().filter(|a| a.conn == conn)?;
        let why = format!(
            "the attach connection of {:?} (generation {}) closed",
            a.client, a.generation
        );
        self.trip(why.clone());
        Some(why)
    }

    fn trip(&mut self, why: String) {
        self.armed = None;
        self.tripped = Some(why);
    }

    /// Whether connection `conn` may resume the guest: not after a trip unless it armed the guard since,
    /// and never while another connection guards the guest (a woken stale sidecar is not its owner).
    pub fn may_resume(&self, conn: u64) -> Result<(), TargetError> {
        if let Some(a) = self.armed.as_ref().filter(|a| a.conn != conn) {
            return Err(TargetError::bad_state(format!(
                "the guest is guarded by {:?} (attach connection {}, generation {}): only it may resume it",
                a.client, a.conn, a.generation
            )));
        }
        match &self.tripped {
            Some(why) if !self.held_by(conn) => Err(TargetError::bad_state(format!(
                "the run guard paused the guest ({why}); only a sidecar that arms the guard again (holding \
                 the VM's current generation) may resume it"
            ))),
            _ => Ok(()),
        }
    }

    /// A keep-alive on `conn`: refused, naming the trip, when `conn` holds no guard.
    pub fn keep_alive(&self, conn: u64) -> Result<(), TargetError> {
        if self.held_by(conn) {
            return Ok(());
        }
        Err(TargetError::bad_state(match &self.tripped {
            Some(why) => format!("the run guard tripped and paused the guest: {why}"),
            None => "this connection holds no run guard".to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn silence_trips_the_guard_and_only_a_new_arming_may_resume() {
        let t0 = Instant::now();
        let mut g = Guard::default();
        g.arm(1, "sidecar", S, 3, t0).unwrap();
        assert!(g.arm(2, "other", S, 3, t0).is_err(), "one holder");
        g.touch(1, false, t0 + S / 2);
        assert_eq!(g.check(t0 + S), None);
        // Busy past the timeout is alive.
        g.touch(1, true, t0 + S);
        assert_eq!(g.check(t0 + 5 * S), None);
        g.touch(1, false, t0 + 5 * S);
        let why = g.check(t0 + 6 * S).expect("tripped");
        assert!(
            why.contains("sidecar") && why.contains("generation 3"),
            "{why}"
        );
        assert!(g.may_resume(1).is_err() && g.may_resume(2).is_err());
        assert!(g.keep_alive(1).unwrap_err().message.contains("tripped"));
        g.arm(2, "next", S, 4, t0 + 7 * S).unwrap();
        g.may_resume(2).unwrap();
        assert!(g.may_resume(1).is_err());
    }

    #[test]
    fn a_closed_holder_trips_and_a_disarmed_guard_never_does() {
        let t0 = Instant::now();
        let mut g = Guard::default();
        g.arm(1, "sidecar", S, 1, t0).unwrap();
        assert_eq!(g.closed(2), None);
        assert!(g.closed(1).unwrap().contains("closed"));
        let mut g = Guard::default();
        g.arm(1, "sidecar", S, 1, t0).unwrap();
        g.disarm(1);
        assert_eq!(g.check(t0 + 10 * S), None);
        assert_eq!(g.closed(1), None);
        g.may_resume(2).unwrap();
    }
}
