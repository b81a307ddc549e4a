//! The `endophyte` command: the command line over `endophyte-engine` (and, with the default `demo`
//! feature, `endophyte-demo`).
//!
//! - `cli::sidecar`: `endophyte sidecar`; `cli::backup`: `endophyte backup`;
//! - `cli::ops`: `migrate`, `promote`, `status`, `set` through the daemons' control sockets;
//! - `cli::admin`: `relay`, `certs`, `inspect`;
//! - `cli::export`: `export` (a replica as a QEMU stream file or a libvirt save image);
//! - `cli::template`: `target-template` (a backup's QEMU command for a libvirt domain).

mod cli;

use clap::{Parser, Subcommand};

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
    /// Replicate a VM (reached through testvm's attach socket or a QEMU monitor) to backups, in epochs.
    Sidecar(Box<cli::sidecar::SidecarArgs>),
    /// Run a backup node: accept paths, keep a replica per VM, start VMs for switchovers and promotes.
    Backup(Box<cli::backup::BackupArgs>),
    /// Run a relay: forward paths' UDP datagrams to a backup without decrypting them.
    Relay(cli::admin::RelayArgs),
    /// Manage a network's identity: its CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: cli::admin::CertsCmd,
    },
    /// Check, through the attach socket, that the RAM the sidecar maps is the VMM's (prints JSON).
    Inspect(cli::admin::InspectArgs),
    /// Live-migrate a VM to one of its backups: converge, then switch over (through its sidecar's control
    /// socket). Exits non-zero when the migration fails; the VM then still runs on the source.
    Migrate(cli::ops::MigrateArgs),
    /// Failover: start a VM on this backup node from its last committed epoch (through the backup's control
    /// socket). Refused while the primary's lease is live (it was heard from in the last 3 s) unless forced.
    Promote(cli::ops::PromoteArgs),
    /// Show a sidecar's replication (epochs, backups and their paths, RPO, throttle) or a backup's replicas
    /// (committed epochs, the primaries' leases, fences), through its control socket.
    Status(cli::ops::StatusArgs),
    /// Write a backup's replica of a QEMU VM (its last committed epoch) as a QEMU migration stream file
    /// (`-incoming "exec:cat FILE"`) or a libvirt save image (`virsh restore`); prints JSON. The backup
    /// serving the replica must be stopped.
    Export(cli::export::ExportArgs),
    /// Print the `endophyte backup --target-qemu` command template for a libvirt domain: the QEMU command
    /// line libvirt would run for it (`virsh domxml-to-native`), its monitor at {qmp} and its other
    /// sockets and files in the VM's directory ({dir}).
    TargetTemplate(cli::template::TemplateArgs),
    /// Change a running sidecar's settings (through its control socket); prints what is now in force.
    Set(cli::ops::SetArgs),
    /// Boot a testvm guest and serve it over the attach protocol (what the demo and tests run as the VMM).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    TestvmServe(endophyte_demo::serve::ServeArgs),
    /// Run the example key-value service of `examples/kv-service` (what the services demo and tests run).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    ExampleKv(endophyte_demo::kv::Opts),
    /// Self-contained demonstrations on loopback; with no subcommand, the migration demo.
    #[cfg(feature = "demo")]
    Demo {
        #[command(subcommand)]
        cmd: Option<DemoCmd>,
    },
}

#[cfg(feature = "demo")]
#[derive(Subcommand)]
enum DemoCmd {
    /// Start testvm, a sidecar and two backups on loopback; replicate; print a JSON summary.
    Replicate(endophyte_demo::replicate::ReplicateArgs),
    /// Start testvm, a sidecar, two backups and relays on loopback; replicate; migrate the running guest
    /// to a backup; check it runs there; print a summary.
    Migrate(endophyte_demo::migrate::MigrateArgs),
    /// Start a QEMU/KVM guest and two backups that start VMs as QEMUs; replicate; migrate the guest to
    /// one backup; kill it there and promote the replica on the other; check each guest goes on.
    Qemu(endophyte_demo::qemu::QemuArgs),
    /// Start testvm, a sidecar, two backups and the example key-value service with a twin on each
    /// backup; replicate while writing to the service; migrate, then kill and promote; check the twins
    /// restored exactly the committed epoch's service state.
    Services(endophyte_demo::services::ServicesArgs),
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
        Cmd::Sidecar(a) => cli::sidecar::run(&a),
        Cmd::Backup(a) => cli::backup::run(*a),
        Cmd::Relay(a) => cli::admin::relay(a),
        Cmd::Certs { cmd } => cli::admin::certs(cmd),
        Cmd::Inspect(a) => cli::admin::inspect(a),
        Cmd::Migrate(a) => cli::ops::migrate(a),
        Cmd::Promote(a) => cli::ops::promote(a),
        Cmd::Status(a) => cli::ops::status(a),
        Cmd::Set(a) => cli::ops::set(a),
        Cmd::Export(a) => cli::export::export(a),
        Cmd::TargetTemplate(a) => cli::template::target_template(a),
        #[cfg(feature = "demo")]
        Cmd::TestvmServe(a) => endophyte_demo::serve::run(a),
        #[cfg(feature = "demo")]
        Cmd::ExampleKv(o) => endophyte_demo::kv::run(o),
        #[cfg(feature = "demo")]
        Cmd::Demo { cmd } => match cmd {
            Some(DemoCmd::Replicate(args)) => endophyte_demo::replicate::replicate(args),
            Some(DemoCmd::Migrate(args)) => endophyte_demo::migrate::migrate(args),
            Some(DemoCmd::Qemu(args)) => endophyte_demo::qemu::demo(args),
            Some(DemoCmd::Services(args)) => endophyte_demo::services::demo(args),
            None => {
                // The migration demo with every default.
                use clap::FromArgMatches;
                let m = <endophyte_demo::migrate::MigrateArgs as clap::Args>::augment_args(
                    clap::Command::new("demo").no_binary_name(true),
                )
                .try_get_matches_from(Vec::<String>::new())?;
                endophyte_demo::migrate::migrate(
                    endophyte_demo::migrate::MigrateArgs::from_arg_matches(&m)?,
                )
            }
        },
    }
}
