//! The operator's commands against a running sidecar or backup, through its control socket: `migrate`,
//! `promote`, `status`, `set`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use endophyte_engine::control::{self, BackupNodeStatus, PromoteRequest, SidecarStatus};
use endophyte_engine::migrate::{self, MigrateRequest, Phase};

/// Where a sidecar's control socket is.
#[derive(Args)]
pub struct ControlArgs {
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
pub enum Output {
    /// Aligned text for a terminal.
    Table,
    /// One JSON object.
    Json,
}

/// `endophyte migrate`'s flags.
#[derive(Args)]
pub struct MigrateArgs {
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
}

/// Migrates and prints how it went.
///
/// # Errors
/// The sidecar cannot be reached, refused, or the migration failed (the VM then still runs on the source).
pub fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let socket = a.control.socket(Some(&a.vm))?;
    let req = MigrateRequest {
        to: a.to,
        downtime_ms: a.downtime.as_millis().max(1) as u64,
        deadline_ms: a.deadline.as_millis().max(1) as u64,
        force: a.force,
        verify: a.verify,
    };
    let st = migrate::run_cli(&socket, &req, a.output == Output::Table)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Output::Table => print!("{}", migrate::summary(&st)),
    }
    if st.phase != Phase::Done {
        bail!(
            "migration of {} failed: {}",
            a.vm,
            st.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// `endophyte promote`'s flags.
#[derive(Args)]
pub struct PromoteArgs {
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
}

/// Promotes and prints the answer.
///
/// # Errors
/// The backup cannot be reached or refused (its message says why).
pub fn promote(a: PromoteArgs) -> anyhow::Result<()> {
    let req = PromoteRequest {
        vm: a.vm.clone(),
        force: a.force,
        verify: a.verify,
    };
    let v = control::request(
        &a.control,
        "POST",
        "/v1/promote",
        Some(&serde_json::to_value(&req)?),
    )
    .with_context(|| format!("promoting {}", a.vm))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `endophyte status`'s flags.
#[derive(Args)]
pub struct StatusArgs {
    /// The VM (its sidecar's socket is CONTROL_DIR/VM.ctl unless --control says otherwise).
    vm: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

/// Prints a sidecar's or a backup's status.
///
/// # Errors
/// The daemon cannot be reached, or answers something that is neither.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let socket = a.control.socket(a.vm.as_deref())?;
    let v = control::request(&socket, "GET", "/v1/status", None)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Table if v.get("vms").is_some() => {
            let s: BackupNodeStatus =
                serde_json::from_value(v).context("the backup's status has an unexpected shape")?;
            print!("{}", control::backup_table(&s))
        }
        Output::Table => {
            let s: SidecarStatus = serde_json::from_value(v)
                .context("the sidecar's status has an unexpected shape")?;
            print!("{}", control::status_table(&s));
        }
    }
    Ok(())
}

/// `endophyte set`'s flags.
#[derive(Args)]
pub struct SetArgs {
    /// The VM (its sidecar's socket is CONTROL_DIR/VM.ctl unless --control says otherwise).
    vm: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// New cap on what the sidecar sends (e.g. 20MB/s), or `none` to lift it.
    #[arg(long)]
    max_bandwidth: String,
}

/// Changes a running sidecar's settings and prints what is in force.
///
/// # Errors
/// A bad value, or the sidecar cannot be reached or refused.
pub fn set(a: SetArgs) -> anyhow::Result<()> {
    let socket = a.control.socket(a.vm.as_deref())?;
    let bytes_per_s = match a.max_bandwidth.trim() {
        "none" | "unlimited" | "off" => None,
        r => Some(
            endophyte_engine::config::parse_rate(r)
                .map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?,
        ),
    };
    let v = control::request(
        &socket,
        "PUT",
        "/v1/max-bandwidth",
        Some(&serde_json::json!({ "bytes_per_s": bytes_per_s })),
    )?;
    println!("{v}");
    Ok(())
}
