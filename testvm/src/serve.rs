//! Serving a testvm VM over the attach protocol, as the tests, the demo and the bench run it: booted
//! (a guest running a workload) or on standby (no VM until a client restores one, as a migration or
//! failover target). The console goes through a [`ConsoleGate`] either way, so that a sidecar can hold
//! guest output until its epoch is durable, on a restored VM as on a booted one.

use std::path::Path;
use std::sync::Arc;

use crate::agent::{serve_on_socket, ConsoleGate, ConsoleToStderr, VmHost};
use crate::dirty::DirtySource;
use crate::vm::{Vm, VmConfig, VmError};

/// Errors of [`serve_booted`] and [`serve_standby`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The VM did not boot.
    #[error("booting the VM: {0}")]
    Boot(#[from] VmError),
    /// The socket could not be served, or the guest stopped on a fault.
    #[error(transparent)]
    Serve(#[from] std::io::Error),
}

/// How the served VMM behaves, beyond its VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Declare no vCPU throttle and refuse `set_throttle` (a VMM without one, for testing).
    pub no_throttle: bool,
    /// Leave the booted guest paused.
    pub paused: bool,
}

fn host(vm: Option<Vm>, dirty: DirtySource, gate: ConsoleGate, opts: ServeOptions) -> Arc<VmHost> {
    let for_vm = gate.clone();
    let host =
        VmHost::new(vm, dirty, Box::new(move || Box::new(for_vm.clone()))).with_console_gate(gate);
    Arc::new(if opts.no_throttle {
        host.without_throttle()
    } else {
        host
    })
}

/// Boots a VM from `cfg` (its console replaced by a gate in front of stderr) and serves it on `socket`
/// until a client asks for shutdown.
///
/// # Errors
/// [`ServeError`].
pub fn serve_booted(
    mut cfg: VmConfig,
    socket: &Path,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    let gate = ConsoleGate::new(Box::new(ConsoleToStderr::default()));
    cfg.console = Box::new(gate.clone());
    let dirty = cfg.dirty_source;
    let vm = Vm::boot(cfg)?;
    if !opts.paused {
        vm.resume()?;
    }
    serve_on_socket(host(Some(vm), dirty, gate, opts), socket, None)?;
    Ok(())
}

/// Serves a VMM with no VM on `socket`, waiting for a client to restore one, until a client asks for
/// shutdown.
///
/// # Errors
/// [`ServeError::Serve`].
pub fn serve_standby(
    socket: &Path,
    dirty: DirtySource,
    opts: ServeOptions,
) -> Result<(), ServeError> {
    let gate = ConsoleGate::new(Box::new(ConsoleToStderr::default()));
    serve_on_socket(host(None, dirty, gate, opts), socket, None)?;
    Ok(())
}
