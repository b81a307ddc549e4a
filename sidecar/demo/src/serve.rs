//! `endophyte testvm-serve`: a testvm VMM served over the attach protocol, started by the demo, the tests,
//! the bench, and a backup's default target command (`--standby`). The same as the `testvm` binary's
//! `serve` and `standby`, built into `endophyte` so that one binary runs a whole demo.

use std::path::PathBuf;

use anyhow::Context;
use testvm::serve::{serve_booted, serve_standby, ServeOptions};

/// Arguments of `endophyte testvm-serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Attach socket to create.
    #[arg(long)]
    pub attach_socket: PathBuf,
    /// Guest RAM.
    #[arg(long, default_value = "256MiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Workload (testvm syntax).
    #[arg(long, default_value = "hotset:size=64M,rate=20000")]
    pub workload: String,
    /// Fill RAM with PRNG data first.
    #[arg(long)]
    pub fill: bool,
    /// Start with no VM and wait for a client to restore one (a migration or failover target).
    #[arg(long)]
    pub standby: bool,
    /// Declare no vCPU throttle and refuse to throttle (a VMM without one, for testing).
    #[arg(long)]
    pub no_throttle: bool,
}

/// Serves until a client asks the VMM to shut down.
///
/// # Errors
/// A bad workload, a VM that does not boot, a socket that cannot be served, a guest fault.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let opts = ServeOptions {
        no_throttle: a.no_throttle,
        paused: false,
    };
    if a.standby {
        return Ok(serve_standby(
            &a.attach_socket,
            testvm::DirtySource::Bitmap,
            opts,
        )?);
    }
    let mut w = testvm::WorkloadConfig::parse(&a.workload)
        .map_err(|e| anyhow::anyhow!("workload {:?}: {e}", a.workload))?;
    w.fill = a.fill;
    let cfg = testvm::VmConfig {
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        workload: w,
        verify_dirty: false,
        dirty_source: testvm::DirtySource::Bitmap,
        console: Box::new(std::io::sink()),
    };
    serve_booted(cfg, &a.attach_socket, opts).context("testvm-serve")
}
