//! The `endophyte` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use endophyte::config::{BackupSpec, SidecarConfig};

#[derive(Parser)]
#[command(
    name = "endophyte",
    version,
    about = "Replicates a running KVM VM's memory to backup nodes and live-migrates it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate a VM (reached through its VMM's attach socket) to backups, in epochs.
    Sidecar(Box<SidecarArgs>),
    /// Run a backup node: accept paths, keep a replica per VM.
    Backup {
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: SocketAddr,
        /// Directory for replicas (one subdirectory per VM).
        #[arg(long)]
        data_dir: PathBuf,
        /// Certificate directory (ca.pem, <node>.pem, <node>.key).
        #[arg(long)]
        certs: PathBuf,
        /// This node's name.
        #[arg(long)]
        node: String,
        /// Epochs staged per VM at once.
        #[arg(long, default_value_t = 4)]
        max_staged_epochs: usize,
        /// Test hook: abort halfway through applying this epoch.
        #[arg(long, hide = true)]
        crash_during_apply: Option<u64>,
        /// Test hook: abort with a switchover prepared (VMM started, VM restored, not yet answered).
        #[arg(long, hide = true)]
        crash_during_switchover: bool,
        /// Serve the control API on this Unix socket (`endophyte status`, `endophyte promote`).
        #[arg(long)]
        control_socket: Option<PathBuf>,
        /// Recover every replica (redo interrupted commits), print each VM's committed epoch as JSON, exit.
        #[arg(long)]
        recover_only: bool,
    },
    /// Run a relay: forward paths' UDP datagrams to a backup without decrypting them.
    Relay {
        /// Routes as LISTEN=UPSTREAM, e.g. 0.0.0.0:7500=10.0.0.2:7400 (repeatable).
        #[arg(long = "route", required = true)]
        routes: Vec<String>,
    },
    /// Manage a network's identity: its CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Check, through the attach socket, that the RAM the sidecar maps is the VMM's (prints JSON).
    Inspect {
        /// The VMM's attach socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Boot a testvm guest and serve it over the attach protocol (what the demo and tests run as the VMM).
    #[command(hide = true)]
    TestvmServe {
        /// Attach socket to create.
        #[arg(long)]
        attach_socket: PathBuf,
        /// Guest RAM.
        #[arg(long, default_value = "256MiB", value_parser = endophyte::config::parse_bytes)]
        mem: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Workload (testvm syntax).
        #[arg(long, default_value = "hotset:size=64M,rate=20000")]
        workload: String,
        /// Fill RAM with PRNG data first.
        #[arg(long)]
        fill: bool,
        /// Start with no VM and wait for a client to restore one (a migration target).
        #[arg(long)]
        standby: bool,
    },
    /// Live-migrate a VM to one of its backups: converge, then switch over (through its sidecar's control
    /// socket). Exits non-zero when the migration fails; the VM then still runs on the source.
    Migrate {
        /// The VM (its sidecar's socket is CONTROL_DIR/VM.ctl unless --control says otherwise).
        vm: String,
        /// Target backup node (one of the sidecar's backups).
        #[arg(long)]
        to: String,
        /// Downtime budget.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        downtime: Duration,
        /// Give up converging after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// At the deadline, switch over anyway, above budget.
        #[arg(long)]
        force: bool,
        /// Have the target hash guest RAM before resuming it, and compare with the source (adds the hash to
        /// the downtime; reported apart).
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        control: ControlArgs,
        /// `table` for people (with a progress line), `json` for scripts.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Failover: start a VM on this backup node from its last committed epoch (through the backup's control
    /// socket). Refused while the primary's lease is live (it was heard from in the last 3 s) unless forced.
    Promote {
        /// The VM.
        vm: String,
        /// The backup's control socket (its `--control-socket`).
        #[arg(long, default_value = "/run/endophyte/backup.ctl")]
        control: PathBuf,
        /// Promote even though the primary may still run.
        #[arg(long)]
        force: bool,
        /// Hash guest RAM before resuming it, and print the hash.
        #[arg(long)]
        verify: bool,
    },
    /// Show a sidecar's replication (epochs, backups and their paths, RPO, throttle) or a backup's replicas
    /// (committed epochs, the primaries' leases, fences), through its control socket.
    Status {
        /// The VM (its sidecar's socket is CONTROL_DIR/VM.ctl unless --control says otherwise).
        vm: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Change a running sidecar's settings (through its control socket); prints what is now in force.
    Set {
        /// The VM (its sidecar's socket is CONTROL_DIR/VM.ctl unless --control says otherwise).
        vm: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
        /// New cap on what the sidecar sends (e.g. 20MB/s), or `none` to lift it.
        #[arg(long)]
        max_bandwidth: String,
    },
    /// Self-contained demonstrations on loopback; with no subcommand, the migration demo.
    Demo {
        #[command(subcommand)]
        cmd: Option<DemoCmd>,
    },
}

/// Where a sidecar's control socket is.
#[derive(Args)]
struct ControlArgs {
    /// The sidecar's control socket (its `--control-socket`).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory of sidecars' control sockets, named VM.ctl.
    #[arg(long, default_value = "/run/endophyte")]
    control_dir: PathBuf,
}

impl ControlArgs {
    fn socket(&self, vm: Option<&str>) -> anyhow::Result<PathBuf> {
        match (&self.control, vm) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(vm)) => Ok(self.control_dir.join(format!("{vm}.ctl"))),
            (None, None) => bail!("name the VM or give --control SOCKET"),
        }
    }
}

/// How a command prints its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Aligned text for a terminal.
    Table,
    /// One JSON object.
    Json,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a network: a new CA in DIR (ca.pem, ca.key).
    Init {
        /// Directory.
        #[arg(long)]
        dir: PathBuf,
        /// The network's name.
        #[arg(long)]
        network: String,
    },
    /// Sign a node certificate with the CA in DIR (<node>.pem, <node>.key).
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node names (DNS-style), one certificate each.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DemoCmd {
    /// Start testvm, a sidecar and two backups on loopback; replicate; print a JSON summary.
    Replicate(endophyte::demo::ReplicateArgs),
    /// Start testvm, a sidecar, two backups and relays on loopback; replicate; migrate the running guest
    /// to a backup; check it runs there; print a summary.
    Migrate(endophyte::demo::MigrateArgs),
}

#[derive(Args)]
struct SidecarArgs {
    /// TOML configuration; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The VM's name.
    #[arg(long)]
    vm_id: Option<String>,
    /// The VMM's attach socket.
    #[arg(long)]
    attach_socket: Option<PathBuf>,
    /// Certificate directory.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This node's name.
    #[arg(long)]
    node: Option<String>,
    /// Epoch length in ms.
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Staging buffer size (e.g. 32MiB).
    #[arg(long, value_parser = endophyte::config::parse_bytes)]
    staging: Option<u64>,
    /// Paths per backup.
    #[arg(long)]
    paths: Option<usize>,
    /// Backups that must commit an epoch for it to be durable.
    #[arg(long)]
    quorum: Option<usize>,
    /// A backup: name=NODE,addr=IP:PORT[,paths=N][,via=RELAY+RELAY] (repeatable; replaces the file's list).
    #[arg(long = "backup", value_parser = BackupSpec::parse)]
    backups: Vec<BackupSpec>,
    /// Send chunks uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Throttle curve, e.g. linear:start=0.5,max=0.9 or exponential:start=0.3,max=0.95,steepness=4.
    #[arg(long)]
    curve: Option<String>,
    /// What to do when an epoch overflows the staging buffer.
    #[arg(long, value_enum)]
    emergency: Option<endophyte::config::Emergency>,
    /// Congestion controller of the paths: cubic (default, loss-based) or bbr (random loss on a long path
    /// does not cut the rate; for lossy WAN paths).
    #[arg(long, value_enum)]
    congestion: Option<endophyte::tls::Congestion>,
    /// Cap on what the sidecar sends, all paths together (e.g. 20MB/s).
    #[arg(long, value_parser = endophyte::config::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Stop after this long (e.g. 20s), at an epoch boundary.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Append the VMM's guest RAM hash at every epoch's pause to this file (JSON lines; for tests).
    #[arg(long)]
    ram_hashes: Option<PathBuf>,
    /// Write the final report (JSON) here as well as to stdout.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Append released guest console output to this file (default: stderr).
    #[arg(long)]
    console_out: Option<PathBuf>,
    /// Serve the control API on this Unix socket (for `endophyte status`, `set` and `migrate`; they look for
    /// /run/endophyte/VM.ctl by default).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The VM's current generation (fencing token; see `fence.json` on the node it was started on).
    #[arg(long)]
    generation: Option<u64>,
    /// Release guest console output at once instead of when its epoch is durable.
    #[arg(long)]
    no_output_commit: bool,
}

fn sidecar_config(a: &SidecarArgs) -> anyhow::Result<SidecarConfig> {
    let mut c = match &a.config {
        Some(p) => SidecarConfig::from_file(p)?,
        None => SidecarConfig::default(),
    };
    if let Some(v) = &a.vm_id {
        c.vm_id = v.clone();
    }
    if let Some(v) = &a.attach_socket {
        c.attach_socket = v.clone();
    }
    if let Some(v) = &a.certs {
        c.certs = v.clone();
    }
    if let Some(v) = &a.node {
        c.node = v.clone();
    }
    if let Some(v) = a.epoch_ms {
        c.epoch_ms = v;
        c.explicit.epoch_ms = true;
    }
    if let Some(v) = a.staging {
        c.staging = v;
        c.explicit.staging = true;
    }
    if let Some(v) = a.paths {
        c.paths_per_backup = v;
    }
    if let Some(v) = a.quorum {
        c.quorum = v;
    }
    if !a.backups.is_empty() {
        c.backups = a.backups.clone();
    }
    if a.no_compress {
        c.compress = false;
    }
    if let Some(v) = &a.curve {
        c.curve = v.clone();
    }
    if let Some(v) = a.congestion {
        c.congestion = v;
    }
    if let Some(v) = a.emergency {
        c.emergency = v;
    }
    if let Some(v) = a.max_bandwidth {
        c.max_bandwidth = Some(v);
    }
    if let Some(v) = &a.control_socket {
        c.control_socket = Some(v.clone());
    }
    if let Some(v) = a.generation {
        c.generation = v;
    }
    if a.no_output_commit {
        c.output_commit = false;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Inspect { socket } => {
            let r = endophyte::inspect::inspect(&socket)
                .with_context(|| format!("inspecting the VM behind {}", socket.display()))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !r.hashes_match {
                bail!("guest RAM seen by the sidecar differs from the VMM's");
            }
        }
        Cmd::Certs { cmd } => match cmd {
            CertsCmd::Init { dir, network } => {
                endophyte::tls::init_network(&dir, &network)?;
                println!("network {network:?}: CA written to {}", dir.display());
            }
            CertsCmd::Issue { dir, nodes } => {
                for n in nodes {
                    endophyte::tls::issue_node(&dir, &n)?;
                    println!("node {n:?}: {0}/{n}.pem, {0}/{n}.key", dir.display());
                }
            }
        },
        Cmd::Backup {
            listen,
            data_dir,
            certs,
            node,
            max_staged_epochs,
            crash_during_apply,
            crash_during_switchover,
            control_socket,
            recover_only,
        } => {
            let identity = endophyte::tls::Identity::load(&certs, &node)
                .with_context(|| format!("loading node {node:?}'s certificates"))?;
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let cfg = endophyte::backup::BackupConfig {
                listen,
                data_dir,
                max_staged_epochs,
                crash: endophyte::store::CrashPoint {
                    during_apply: crash_during_apply,
                    during_switchover: crash_during_switchover,
                },
                control_socket,
            };
            let node = endophyte::backup::BackupNode::new(identity, cfg);
            let recovered = node.recover_all()?;
            if recover_only {
                let m: serde_json::Map<String, serde_json::Value> = recovered
                    .into_iter()
                    .map(|(vm, e)| (vm, serde_json::json!({ "committed_epoch": e })))
                    .collect();
                println!("{}", serde_json::Value::Object(m));
                return Ok(());
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(node.serve())?;
        }
        Cmd::Relay { routes } => {
            let mut parsed = vec![];
            for r in &routes {
                let (l, u) = r
                    .split_once('=')
                    .with_context(|| format!("route {r:?} is not LISTEN=UPSTREAM"))?;
                let l: SocketAddr = l
                    .parse()
                    .with_context(|| format!("route {r:?}: bad listen address"))?;
                let u: SocketAddr = u
                    .parse()
                    .with_context(|| format!("route {r:?}: bad upstream address"))?;
                parsed.push((l, u));
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(async move {
                    let mut tasks = vec![];
                    for (l, u) in parsed {
                        let route = endophyte::relay::Route::bind(l, u)
                            .await
                            .with_context(|| format!("binding {l}"))?;
                        eprintln!("relay {} -> {u}", route.local_addr()?);
                        tasks.push(tokio::spawn(route.run()));
                    }
                    for t in tasks {
                        t.await??;
                    }
                    anyhow::Ok(())
                })?;
        }
        Cmd::Sidecar(a) => {
            let cfg = sidecar_config(&a)?;
            let report = endophyte::replicate::run_sidecar(
                cfg,
                endophyte::replicate::RunOptions {
                    duration: a.duration,
                    duration_after_initial_copy: false,
                    ram_hashes: a.ram_hashes.clone(),
                    final_hash_only: false,
                    report: a.report.clone(),
                    console_out: a.console_out.clone(),
                },
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::TestvmServe {
            attach_socket,
            mem,
            vcpus,
            workload,
            fill,
            standby,
        } => {
            if standby {
                // The restored VM's console goes through a gate too, so that a sidecar attached to it
                // can hold output until its epoch is durable.
                let gate = testvm::agent::ConsoleGate::new(Box::new(
                    testvm::agent::ConsoleToStderr::default(),
                ));
                let for_vm = gate.clone();
                let host = std::sync::Arc::new(
                    testvm::agent::VmHost::new(
                        None,
                        testvm::DirtySource::Bitmap,
                        Box::new(move || Box::new(for_vm.clone())),
                    )
                    .with_console_gate(gate),
                );
                testvm::agent::serve_on_socket(host, &attach_socket, None)?;
                return Ok(());
            }
            let mut w = testvm::WorkloadConfig::parse(&workload)
                .map_err(|e| anyhow::anyhow!("workload {workload:?}: {e}"))?;
            w.fill = fill;
            let gate = testvm::agent::ConsoleGate::new(Box::new(
                testvm::agent::ConsoleToStderr::default(),
            ));
            let vm = testvm::Vm::boot(testvm::VmConfig {
                mem_bytes: mem,
                vcpus,
                workload: w,
                verify_dirty: false,
                dirty_source: testvm::DirtySource::Bitmap,
                console: Box::new(gate.clone()),
            })
            .context("booting the VM")?;
            vm.resume()?;
            let host = std::sync::Arc::new(
                testvm::agent::VmHost::new(
                    Some(vm),
                    testvm::DirtySource::Bitmap,
                    Box::new(|| Box::new(testvm::agent::ConsoleToStderr::default())),
                )
                .with_console_gate(gate),
            );
            testvm::agent::serve_on_socket(host, &attach_socket, None)?;
        }
        Cmd::Migrate {
            vm,
            to,
            downtime,
            deadline,
            force,
            verify,
            control,
            output,
        } => {
            let socket = control.socket(Some(&vm))?;
            let req = endophyte::migrate::MigrateRequest {
                to,
                downtime_ms: downtime.as_millis().max(1) as u64,
                deadline_ms: deadline.as_millis().max(1) as u64,
                force,
                verify,
            };
            let st = endophyte::migrate::run_cli(&socket, &req, output == Output::Table)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
                Output::Table => print!("{}", endophyte::migrate::summary(&st)),
            }
            if st.phase != endophyte::migrate::Phase::Done {
                bail!(
                    "migration of {vm} failed: {}",
                    st.error.as_deref().unwrap_or("no reason given")
                );
            }
        }
        Cmd::Promote {
            vm,
            control,
            force,
            verify,
        } => {
            let req = endophyte::backup::PromoteRequest {
                vm: vm.clone(),
                force,
                verify,
            };
            let v = endophyte::control::request(
                &control,
                "POST",
                "/v1/promote",
                Some(&serde_json::to_value(&req)?),
            )
            .with_context(|| format!("promoting {vm}"))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Status {
            vm,
            control,
            output,
        } => {
            let control = control.socket(vm.as_deref())?;
            let v = endophyte::control::request(&control, "GET", "/v1/status", None)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table if v.get("vms").is_some() => {
                    print!("{}", endophyte::control::backup_table(&v))
                }
                Output::Table => {
                    let s: endophyte::control::SidecarStatus = serde_json::from_value(v)
                        .context("the sidecar's status has an unexpected shape")?;
                    print!("{}", endophyte::control::status_table(&s));
                }
            }
        }
        Cmd::Set {
            vm,
            control,
            max_bandwidth,
        } => {
            let control = control.socket(vm.as_deref())?;
            let bytes_per_s = match max_bandwidth.trim() {
                "none" | "unlimited" | "off" => None,
                r => Some(
                    endophyte::config::parse_rate(r)
                        .map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?,
                ),
            };
            let v = endophyte::control::request(
                &control,
                "PUT",
                "/v1/max-bandwidth",
                Some(&serde_json::json!({ "bytes_per_s": bytes_per_s })),
            )?;
            println!("{v}");
        }
        Cmd::Demo { cmd } => match cmd {
            Some(DemoCmd::Replicate(args)) => endophyte::demo::replicate(args)?,
            Some(DemoCmd::Migrate(args)) => endophyte::demo::migrate(args)?,
            None => {
                // The migration demo with every default.
                use clap::FromArgMatches;
                let m = <endophyte::demo::MigrateArgs as clap::Args>::augment_args(
                    clap::Command::new("demo").no_binary_name(true),
                )
                .try_get_matches_from(Vec::<String>::new())?;
                endophyte::demo::migrate(endophyte::demo::MigrateArgs::from_arg_matches(&m)?)?
            }
        },
    }
    Ok(())
}
