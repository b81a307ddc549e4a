//! An example Endophyte service: a small key-value store whose state lives in this process, outside
//! guest RAM, and still follows the VM exactly (docs/services.md).
//!
//! - Next to the sidecar (hooks `epoch`, `migration`): at each epoch's pause it contributes its whole
//!   state; it answers switchover requests (ready, after `--hold-ms`, or `--veto`).
//! - Next to a backup (hook `restore`): when the VM resumes there (a migration's target, a promote) it
//!   takes the state of the committed epoch and serves from it.
//!
//! Clients read and write it on `--api` (a Unix socket, one command per line): `SET key value` (OK),
//! `GET key` (`VALUE value` or `NONE`), `DUMP` (the state as JSON). Every event goes to `--log` as a
//! JSON line ([`store::Event`]): what it contributed to which epoch, what it restored; tests and
//! `endophyte demo services` check a twin's restored state against it.
//!
//! For tests of the node's policies it can misbehave on purpose: `--slow-ms` (answer contributions
//! late), `--fail` (answer them with an error), `--crash-after` (exit abruptly after N contributions).

pub mod session;
pub mod store;

use std::path::PathBuf;

/// The service's flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Opts {
    /// The node's services socket (a sidecar's or a backup's `--services-socket`).
    #[arg(long)]
    pub services: PathBuf,
    /// The name to register under.
    #[arg(long, default_value = "kv")]
    pub name: String,
    /// Hooks to register for: `epoch,migration` next to a sidecar, `restore` next to a backup.
    #[arg(long, value_delimiter = ',', default_value = "epoch,migration")]
    pub hooks: Vec<String>,
    /// The services API version to ask for (the node refuses one it does not serve).
    #[arg(long, default_value_t = 1)]
    pub api_version: u32,
    /// The store's own API socket (SET / GET / DUMP lines).
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Where events go, one JSON line each.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Answer each contribution request this late, ms.
    #[arg(long, default_value_t = 0)]
    pub slow_ms: u64,
    /// Answer contribution requests with an error.
    #[arg(long)]
    pub fail: bool,
    /// Exit abruptly (status 3) on the contribution request after this many contributions.
    #[arg(long)]
    pub crash_after: Option<u64>,
    /// Hold a switchover this long before answering ready, ms.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Veto every switchover with this reason.
    #[arg(long)]
    pub veto: Option<String>,
}

/// Runs the service until its session ends.
///
/// # Errors
/// The node cannot be reached or refused the registration (its reason is in the error), the API
/// socket or the log cannot be opened.
pub fn run(o: Opts) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(session::serve(o))
}
