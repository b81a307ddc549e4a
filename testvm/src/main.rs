//! The `testvm` binary: run a KVM guest workload, harvesting and checking its dirty pages, or serve it to
//! a sidecar over the attach protocol.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use testvm::agent::{ConsoleToStderr, VmHost};
use testvm::layout::parse_bytes;
use testvm::run::{run, RunOptions};
use testvm::serve::ServeOptions;
use testvm::{DirtySource, Vm, VmConfig, WorkloadConfig};

#[derive(Parser)]
#[command(
    name = "testvm",
    version,
    about = "A tiny KVM VMM running Endophyte's guest workloads"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// What VM to boot (shared by `run` and `serve`).
#[derive(clap::Args)]
struct VmArgs {
    /// Guest RAM (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Workload: idle | hotset[:size=S,rate=R] | uniform[:rate=R] | scan[:stride=N,rate=R]; rates in
    /// pages/s for all vCPUs together, 0 = as fast as the guest can.
    #[arg(long, default_value = "hotset:size=64M,rate=20000", value_parser = parse_workload)]
    workload: WorkloadConfig,
    /// Fill all of RAM with PRNG output before the workload starts.
    #[arg(long)]
    fill: bool,
    /// KVM dirty-page source.
    #[arg(long, value_enum, default_value = "bitmap")]
    dirty_source: DirtySource,
}

impl VmArgs {
    fn workload(&self) -> WorkloadConfig {
        WorkloadConfig {
            fill: self.fill,
            ..self.workload.clone()
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM, run a workload, harvest dirty pages periodically, report.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        /// How long to run (e.g. 10s, 500ms).
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
        /// Harvest interval in milliseconds.
        #[arg(long, default_value_t = 50)]
        harvest_ms: u64,
        /// Have the guest log every page it writes and check the harvests against it.
        #[arg(long)]
        verify_dirty: bool,
        /// Throttle fraction (0..0.99) for the whole run.
        #[arg(long, default_value_t = 0.0)]
        throttle: f64,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Boot a VM and serve it over the attach protocol; a sidecar drives harvests, pause, throttle.
    /// Runs until a client asks for shutdown (or --duration passes, if given).
    Serve {
        /// Unix socket to listen on.
        #[arg(long)]
        attach_socket: std::path::PathBuf,
        #[command(flatten)]
        vm: VmArgs,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Stop after this long even without a shutdown request.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Declare no vCPU throttle and refuse to throttle (a VMM without one, for testing).
        #[arg(long)]
        no_throttle: bool,
    },
    /// Wait on the attach socket, with no VM, for a client to restore one (migration or failover target).
    Standby {
        /// Unix socket to listen on.
        #[arg(long)]
        attach_socket: std::path::PathBuf,
        /// KVM dirty-page source for the restored VM.
        #[arg(long, value_enum, default_value = "bitmap")]
        dirty_source: DirtySource,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s).ok_or_else(|| format!("{s:?} is not a size like 256M or 1G"))
}

fn parse_workload(s: &str) -> Result<WorkloadConfig, String> {
    WorkloadConfig::parse(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10s or 500ms");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .ok_or_else(bad)?;
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Where guest serial output goes: stderr, line by line with a prefix.
fn console_factory() -> testvm::agent::ConsoleFactory {
    Box::new(|| Box::new(ConsoleToStderr::default()))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            vm,
            duration,
            harvest_ms,
            verify_dirty,
            throttle,
            output,
        } => {
            if harvest_ms == 0 {
                bail!("--harvest-ms must be at least 1");
            }
            let report = run(RunOptions {
                mem_bytes: vm.mem,
                vcpus: vm.vcpus,
                workload: vm.workload(),
                duration,
                harvest_interval: Duration::from_millis(harvest_ms),
                verify_dirty,
                dirty_source: vm.dirty_source,
                throttle,
                console: Box::new(ConsoleToStderr::default()),
            })
            .context("testvm run")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&report)?),
                Output::Text => {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
            }
            if let Some(f) = &report.fault {
                bail!("the guest stopped: {f}");
            }
            if report.missed_pages.unwrap_or(0) > 0 {
                bail!(
                    "dirty tracking missed {} pages the guest wrote",
                    report.missed_pages.unwrap_or(0)
                );
            }
        }
        Cmd::Serve {
            attach_socket,
            vm: args,
            paused,
            duration: Some(duration),
            no_throttle,
        } => {
            // A bounded run: no console gate needed, the VM is dropped when the time is up.
            let dirty_source = args.dirty_source;
            let vm = Vm::boot(VmConfig {
                mem_bytes: args.mem,
                vcpus: args.vcpus,
                workload: args.workload(),
                verify_dirty: false,
                dirty_source,
                console: Box::new(ConsoleToStderr::default()),
            })
            .context("booting the VM")?;
            if !paused {
                vm.resume()?;
            }
            let host = VmHost::new(Some(vm), dirty_source, console_factory());
            let host = if no_throttle {
                host.without_throttle()
            } else {
                host
            };
            testvm::agent::serve_on_socket(
                std::sync::Arc::new(host),
                &attach_socket,
                Some(duration),
            )?;
        }
        Cmd::Serve {
            attach_socket,
            vm: args,
            paused,
            duration: None,
            no_throttle,
        } => {
            let cfg = VmConfig {
                mem_bytes: args.mem,
                vcpus: args.vcpus,
                workload: args.workload(),
                verify_dirty: false,
                dirty_source: args.dirty_source,
                console: Box::new(ConsoleToStderr::default()),
            };
            let opts = ServeOptions {
                no_throttle,
                paused,
            };
            testvm::serve::serve_booted(cfg, &attach_socket, opts)?;
        }
        Cmd::Standby {
            attach_socket,
            dirty_source,
        } => {
            testvm::serve::serve_standby(&attach_socket, dirty_source, ServeOptions::default())?;
        }
    }
    Ok(())
}
