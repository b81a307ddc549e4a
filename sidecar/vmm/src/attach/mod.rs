//! The attach protocol as a VMM kind: any VMM that links the attach agent (testvm does), as a source
//! ([`AttachSource`]) and, on a backup, as a target ([`launch::AttachLauncher`]).
//!
//! The source maps guest RAM read-only through the agent's memfds and uses its dirty log (KVM's bitmap or
//! ring, harvested by the agent). For testing the engine's other path, it can also act as a VMM that only
//! hands over full snapshots ([`Tracking::FullSnapshot`]): each snapshot pauses the guest, streams every
//! page from the mapping, saves the state and resumes. That costs a pause as long as reading all of RAM;
//! it exists so that the snapshot path runs against a real guest before a VMM that needs it does.
//!
//! vCPU and device state: the agent's JSON, as a [`VmState`] of format [`STATE_FORMAT`].

pub mod launch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use endophyte_attach::client::{AttachClient, ClientError};

use crate::{
    Capabilities, DirtyLog, Geometry, Harvest, Region, SnapshotCut, SnapshotPage, Snapshots,
    SourceVmm, Tracking, VmState, VmmError,
};

/// The [`VmState::format`] of attach-protocol VMMs: the agent's `save_state` JSON.
pub const STATE_FORMAT: &str = "testvm";
/// Its version.
pub const STATE_VERSION: u32 = 1;

fn failed(op: &'static str) -> impl FnOnce(ClientError) -> VmmError {
    move |e| VmmError::Failed {
        op,
        message: e.to_string(),
    }
}

/// Wraps an agent's saved state as a [`VmState`].
///
/// # Errors
/// The state does not serialize (never for a JSON value), or is too large.
pub fn wrap_state(state: &serde_json::Value) -> Result<VmState, VmmError> {
    let bytes = serde_json::to_vec(state).map_err(|e| VmmError::Failed {
        op: "encoding the VM state",
        message: e.to_string(),
    })?;
    VmState::new(STATE_FORMAT, STATE_VERSION, bytes).map_err(|e| VmmError::Failed {
        op: "saving the VM state",
        message: e.to_string(),
    })
}

/// Opens a [`VmState`] saved by [`wrap_state`].
///
/// # Errors
/// [`VmmError::StateFormat`] for another format or version; the bytes are not JSON.
pub fn unwrap_state(state: &VmState, vmm: &str) -> Result<serde_json::Value, VmmError> {
    if state.format != STATE_FORMAT || state.version != STATE_VERSION {
        return Err(VmmError::StateFormat {
            vmm: vmm.to_string(),
            expected: STATE_FORMAT,
            found: state.format.clone(),
            version: state.version,
        });
    }
    serde_json::from_slice(&state.data).map_err(|e| VmmError::Failed {
        op: "reading the VM state",
        message: format!("not the agent's JSON: {e}"),
    })
}

/// A source VMM reached through the attach protocol. See the module docs.
pub struct AttachSource {
    client: AttachClient,
    name: String,
    geometry: Geometry,
    caps: Capabilities,
    /// Whether the guest is paused by us (a snapshot of a paused guest leaves it paused).
    paused: AtomicBool,
}

impl AttachSource {
    /// Attaches to the agent at `socket` and maps guest RAM read-only, populated (no page-table fault in
    /// an epoch's pause). `tracking` picks the dirty log (when the VMM has one) or full snapshots.
    ///
    /// # Errors
    /// Attaching failed; the VMM has no guest RAM; the dirty log was asked of a VMM without one.
    pub fn connect(socket: &std::path::Path, tracking: Tracking) -> Result<Self, VmmError> {
        let client =
            AttachClient::connect(socket, "endophyte-sidecar").map_err(|e| VmmError::Failed {
                op: "attaching",
                message: e.to_string(),
            })?;
        let info = client.info().clone();
        let name = format!(
            "{} (attach protocol v{}, {})",
            info.vmm,
            client.version(),
            socket.display()
        );
        let geometry = Geometry {
            page_size: info.page_size,
            regions: info
                .regions
                .iter()
                .map(|r| Region {
                    addr: r.gpa,
                    size_bytes: r.size_bytes,
                })
                .collect(),
        };
        if geometry.mem_bytes() == 0 {
            return Err(VmmError::Failed {
                op: "attaching",
                message: format!("{name} has no guest RAM regions"),
            });
        }
        if tracking == Tracking::DirtyLog && !info.features.dirty_log {
            return Err(VmmError::Unsupported {
                vmm: name,
                what: "report dirty pages (it has no dirty log; use full snapshots)",
            });
        }
        let caps = Capabilities {
            tracking,
            throttle: info.features.throttle,
            // Held output comes with harvests, which a snapshot-only source does not make.
            output_hold: info.features.hold_console && tracking == Tracking::DirtyLog,
            ram_hash: true,
            pause_in_snapshot: false,
        };
        Ok(Self {
            client,
            name,
            geometry,
            caps,
            paused: AtomicBool::new(!info.running),
        })
    }

    /// The attach connection, for tools that need more than the boundary (inspection, tests).
    pub fn client(&self) -> &AttachClient {
        &self.client
    }

    fn unsupported(&self, what: &'static str) -> VmmError {
        VmmError::Unsupported {
            vmm: self.name.clone(),
            what,
        }
    }
}

impl SourceVmm for AttachSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        (self.caps.tracking == Tracking::DirtyLog).then_some(self as &dyn DirtyLog)
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        (self.caps.tracking == Tracking::FullSnapshot).then_some(self as &dyn Snapshots)
    }

    fn pause(&self) -> Result<Duration, VmmError> {
        let d = self.client.pause().map_err(failed("pausing the guest"))?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(d)
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.client.resume().map_err(failed("resuming the guest"))?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn arm_guard(&self, timeout: Duration, generation: u64) -> Result<bool, VmmError> {
        if !self.client.info().features.guard {
            return Ok(false);
        }
        self.client
            .arm_guard(timeout, generation)
            .map_err(failed("arming the run guard"))?;
        Ok(true)
    }

    fn keep_alive(&self) -> Result<(), VmmError> {
        if !self.client.info().features.guard {
            return Ok(());
        }
        match self.client.keep_alive() {
            Err(endophyte_attach::ClientError::Refused {
                code: endophyte_attach::ErrorCode::BadState,
                message,
                ..
            }) => Err(VmmError::GuardTripped(message)),
            r => r.map_err(failed("keeping the run guard alive")),
        }
    }

    fn disarm_guard(&self) -> Result<(), VmmError> {
        if !self.client.info().features.guard {
            return Ok(());
        }
        self.client
            .disarm_guard()
            .map_err(failed("disarming the run guard"))
    }

    fn save_state(&self) -> Result<VmState, VmmError> {
        let s = self
            .client
            .save_state()
            .map_err(failed("saving vCPU and device state"))?;
        wrap_state(&s)
    }

    fn set_throttle(&self, fraction: f64) -> Result<(), VmmError> {
        if !self.caps.throttle {
            return Err(self.unsupported("throttle its vCPUs"));
        }
        self.client
            .set_throttle(fraction)
            .map_err(failed("setting the vCPU throttle"))
    }

    fn hold_output(&self, hold: bool) -> Result<(), VmmError> {
        if !self.caps.output_hold {
            return Err(self.unsupported("hold guest output"));
        }
        self.client
            .hold_console(hold)
            .map_err(failed("holding console output"))
    }

    fn ram_hash(&self) -> Result<String, VmmError> {
        self.client.vmm_hash().map_err(failed("hashing guest RAM"))
    }

    fn shutdown(&self) -> Result<(), VmmError> {
        self.client
            .shutdown()
            .map_err(failed("shutting the VMM down"))
    }
}

impl DirtyLog for AttachSource {
    fn start(&self) -> Result<(), VmmError> {
        self.client
            .start_dirty_log()
            .map_err(failed("starting dirty logging"))
    }

    fn stop(&self) -> Result<(), VmmError> {
        self.client
            .stop_dirty_log()
            .map_err(failed("stopping dirty logging"))
    }

    fn harvest(&self) -> Result<Harvest, VmmError> {
        let h = self
            .client
            .harvest()
            .map_err(failed("harvesting dirty pages"))?;
        Ok(Harvest {
            seq: h.seq,
            bitmaps: h.bitmaps,
            output: h.console,
        })
    }

    fn release(&self, seq: u64, consumed: bool) -> Result<(), VmmError> {
        self.client
            .release(seq, consumed)
            .map_err(failed("releasing a harvest"))
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        self.client
            .read(addr, buf)
            .map_err(failed("reading guest RAM"))
    }
}

impl Snapshots for AttachSource {
    fn snapshot(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError> {
        let t0 = Instant::now();
        let was_paused = self.paused.load(Ordering::SeqCst);
        if !was_paused {
            self.pause()?;
        }
        let cut = (|| {
            let hash = ram_hash.then(|| self.ram_hash()).transpose()?;
            let ps = self.geometry.page_size as usize;
            let mut page = vec![0u8; ps];
            for r in &self.geometry.regions {
                for off in (0..r.size_bytes).step_by(ps) {
                    self.read(r.addr + off, &mut page)?;
                    sink((r.addr + off, Some(&page))).map_err(VmmError::Abandoned)?;
                }
            }
            Ok::<_, VmmError>((self.save_state()?, hash))
        })();
        if !was_paused {
            self.resume()?;
        }
        let (state, ram_hash) = cut?;
        Ok(SnapshotCut {
            state,
            pause: if was_paused {
                Duration::ZERO
            } else {
                t0.elapsed()
            },
            ram_hash,
            paused_at: None,
        })
    }
}
