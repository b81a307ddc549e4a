//! Services: subsystems that take part in epochs, migrations and failover through a versioned API
//! (`proto/services_v1.proto`, docs/services.md), served on a node's services socket by the sidecar and
//! by the backup.
//!
//! - this module: the registry of a node's services (remote sessions and in-process ones alike) and
//!   what `endophyte status` and the metrics show of them;
//! - [`rounds`]: what the node asks of them and waits for, bounded: contributions at an epoch's pause,
//!   switchover verdicts, restores; and what it only tells: durable epochs, migration phases;
//! - [`console`]: the console output commit, an in-process service on the same hooks;
//! - [`grpc`]: the API's server side (sessions, registration, version checks) and its generated code
//!   ([`pb`]).

pub mod console;
pub mod grpc;
pub mod rounds;

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use grpc::pb;
pub use rounds::{ContributeRound, SwitchoverVerdict};

/// The API versions this node serves (the `api_version` of a Register).
pub const API_VERSIONS: [u32; 1] = [1];

/// What happens to an epoch when a service's contribution is late or failed (`service_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServicePolicy {
    /// The epoch commits without it; the service's twin keeps its older contribution (and its epoch).
    #[default]
    Skip,
    /// The epoch's cut is abandoned (the guest resumes, its pages stay dirty) and tried again after
    /// an epoch length: the replica does not advance while a registered service fails.
    Fail,
    /// The guest stays paused and the service is asked again, until it answers, its session ends or
    /// the sidecar stops.
    Pause,
}

/// A registered service as `GET /v1/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its name, unique on the node.
    pub name: String,
    /// The hook points it registered for (`epoch`, `migration`, `restore`).
    pub hooks: Vec<String>,
    /// The API version its session speaks (0: in-process).
    pub api_version: u32,
    /// Since it registered, ms.
    pub registered_ms_ago: f64,
    /// Bytes of its last contribution taken into an epoch.
    #[serde(default)]
    pub last_contribution_bytes: u64,
    /// From the ask to its last answer, ms.
    #[serde(default)]
    pub last_contribution_ms: f64,
    /// Contributions taken into epochs.
    #[serde(default)]
    pub contributions: u64,
    /// Asks it was late for, failed or answered out of bounds.
    #[serde(default)]
    pub failures: u64,
    /// What went wrong last (late, failed, too large, a restore's error), if anything did.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// An in-process service: the node calls it directly, on the same hooks and at the same points as a
/// remote one. Calls must return at once (they run inside the epoch's pause).
pub trait LocalService: Send {
    /// The epoch's contribution (`Err`: why there is none).
    fn contribute(&mut self, epoch: u64) -> Result<Vec<u8>, String>;
    /// Epochs up to `epoch` are durable.
    fn durable(&mut self, epoch: u64);
}

/// How the node reaches a service.
enum Link {
    /// A session's outbound stream.
    Remote(mpsc::Sender<Result<pb::NodeMessage, tonic::Status>>),
    /// In this process.
    Local(Box<dyn LocalService>),
}

/// An answer a service gave, with when it came.
#[derive(Clone, Debug)]
struct Answer<T> {
    key: u64,
    value: T,
    at: Instant,
}

/// One registered service.
struct Entry {
    hooks: Vec<pb::Hook>,
    since: Instant,
    /// Which session holds the name (a newer session of the same name is refused while it lives).
    session: u64,
    link: Link,
    /// Its answer to the last ContributeRequest: epoch, data or error.
    contribution: Option<Answer<Result<Bytes, String>>>,
    /// Its answer to the last SwitchoverRequest: generation, veto reason (empty: ready).
    verdict: Option<Answer<String>>,
    /// Its answer to the last Restore: epoch, error (empty: restored).
    restored: Option<Answer<String>>,
    status: ServiceStatus,
}

impl Entry {
    fn has(&self, h: pb::Hook) -> bool {
        self.hooks.contains(&h)
    }

    /// Queues `m` for a remote service; a full or closed queue is the service's failure.
    fn send(&self, m: pb::node_message::Msg) -> Result<(), String> {
        match &self.link {
            Link::Remote(tx) => tx
                .try_send(Ok(pb::NodeMessage { msg: Some(m) }))
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        "its session's queue is full (it does not read)".to_string()
                    }
                    mpsc::error::TrySendError::Closed(_) => "its session ended".to_string(),
                }),
            Link::Local(_) => Ok(()),
        }
    }

    fn failed(&mut self, why: String) {
        self.status.failures += 1;
        self.status.last_error = Some(why);
    }
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    next_session: u64,
}

/// The services registered with one node. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct ServiceRegistry {
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

impl ServiceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(
        &self,
        name: &str,
        hooks: Vec<pb::Hook>,
        api_version: u32,
        link: Link,
    ) -> Result<u64, String> {
        let mut g = self.lock();
        if g.entries.contains_key(name) {
            return Err(format!(
                "a service named {name:?} is registered already (its session is open)"
            ));
        }
        g.next_session += 1;
        let session = g.next_session;
        let status = ServiceStatus {
            name: name.to_owned(),
            hooks: hooks.iter().map(|h| hook_name(*h).to_owned()).collect(),
            api_version,
            ..ServiceStatus::default()
        };
        g.entries.insert(
            name.to_owned(),
            Entry {
                hooks,
                since: Instant::now(),
                session,
                link,
                contribution: None,
                verdict: None,
                restored: None,
                status,
            },
        );
        tracing::info!(service = name, "service registered");
        Ok(session)
    }

    /// Registers a remote service's session, whose outbound stream is `tx`; returns the session's id.
    ///
    /// # Errors
    /// A service of that name is registered (its session still lives): the message says so.
    fn register(
        &self,
        name: &str,
        hooks: Vec<pb::Hook>,
        api_version: u32,
        tx: mpsc::Sender<Result<pb::NodeMessage, tonic::Status>>,
    ) -> Result<u64, String> {
        self.insert(name, hooks, api_version, Link::Remote(tx))
    }

    /// Registers an in-process service under `name` for `hooks` (API version 0 in the status).
    ///
    /// # Errors
    /// A service of that name is registered.
    pub fn register_local(
        &self,
        name: &str,
        hooks: Vec<pb::Hook>,
        service: Box<dyn LocalService>,
    ) -> Result<(), String> {
        self.insert(name, hooks, 0, Link::Local(service))
            .map(|_| ())
    }

    /// Ends session `session` of `name` (the service went away); whoever waits for it stops waiting.
    fn unregister(&self, name: &str, session: u64) {
        let mut g = self.lock();
        if g.entries.get(name).is_some_and(|e| e.session == session) {
            g.entries.remove(name);
            tracing::warn!(service = name, "service unregistered (its session ended)");
        }
        drop(g);
        self.inner.1.notify_all();
    }

    /// A message from session `session` of `name`.
    fn on_message(&self, name: &str, session: u64, m: pb::service_message::Msg) {
        use pb::service_message::Msg;
        let mut g = self.lock();
        let Some(e) = g.entries.get_mut(name).filter(|e| e.session == session) else {
            return;
        };
        let at = Instant::now();
        match m {
            Msg::Contribution(c) => {
                let value = if c.error.is_empty() {
                    Ok(Bytes::from(c.data))
                } else {
                    Err(c.error)
                };
                e.contribution = Some(Answer {
                    key: c.epoch,
                    value,
                    at,
                });
            }
            Msg::Verdict(v) => {
                e.verdict = Some(Answer {
                    key: v.generation,
                    value: v.veto,
                    at,
                })
            }
            Msg::Restored(r) => {
                e.restored = Some(Answer {
                    key: r.epoch,
                    value: r.error,
                    at,
                })
            }
            Msg::Register(_) => {}
        }
        drop(g);
        self.inner.1.notify_all();
    }

    /// Ends every remote session with `UNAVAILABLE` and `why` (the node stops serving them), so that
    /// services learn the reason instead of seeing their connection drop. Returns how many it ended.
    pub fn close_all(&self, why: &str) -> usize {
        let g = self.lock();
        let mut n = 0;
        for e in g.entries.values() {
            if let Link::Remote(tx) = &e.link {
                let _ = tx.try_send(Err(tonic::Status::unavailable(why.to_owned())));
                n += 1;
            }
        }
        n
    }

    /// The registered services, by name.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.lock()
            .entries
            .values()
            .map(|e| ServiceStatus {
                registered_ms_ago: e.since.elapsed().as_secs_f64() * 1e3,
                ..e.status.clone()
            })
            .collect()
    }
}

/// The services as lines for a terminal (nothing when none is registered).
pub fn services_table(services: &[ServiceStatus]) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    if services.is_empty() {
        return t;
    }
    let _ = writeln!(
        t,
        "{:<20} {:<24} {:>4} {:>14} {:>10} {:>9} {:>6}  LAST ERROR",
        "SERVICE", "HOOKS", "API", "REGISTERED", "LAST BYTES", "LAST MS", "FAILED"
    );
    for s in services {
        let _ = writeln!(
            t,
            "{:<20} {:<24} {:>4} {:>14} {:>10} {:>9.2} {:>6}  {}",
            s.name,
            s.hooks.join(","),
            s.api_version,
            format!("{:.1} s ago", s.registered_ms_ago / 1e3),
            s.last_contribution_bytes,
            s.last_contribution_ms,
            s.failures,
            s.last_error.as_deref().unwrap_or("-")
        );
    }
    t
}

/// A hook's name in status and docs.
pub fn hook_name(h: pb::Hook) -> &'static str {
    match h {
        pb::Hook::Epoch => "epoch",
        pb::Hook::Migration => "migration",
        pb::Hook::Restore => "restore",
        pb::Hook::Unspecified => "unspecified",
    }
}

/// Adds the services' series to a scrape (both nodes serve them; docs/metrics.md).
pub fn scrape_into(out: &mut crate::metrics::Scrape, services: &[ServiceStatus]) {
    let by = |f: fn(&ServiceStatus) -> f64| {
        services
            .iter()
            .map(move |s| (vec![("service", s.name.clone())], f(s)))
            .collect::<Vec<_>>()
    };
    out.gauge(
        "endophyte_services",
        "Services registered on this node (the console gate included)",
        services.len() as f64,
    );
    out.gauges(
        "endophyte_service_last_contribution_bytes",
        "Bytes of each service's last contribution taken into an epoch",
        by(|s| s.last_contribution_bytes as f64),
    );
    out.gauges(
        "endophyte_service_last_contribution_seconds",
        "From the ask to each service's last answer",
        by(|s| s.last_contribution_ms / 1e3),
    );
    out.counters(
        "endophyte_service_contributions",
        "Contributions each service made to epochs",
        services
            .iter()
            .map(|s| (vec![("service", s.name.clone())], s.contributions)),
    );
    out.counters(
        "endophyte_service_failures",
        "Asks each service was late for, failed or answered out of bounds (vetoes included)",
        services
            .iter()
            .map(|s| (vec![("service", s.name.clone())], s.failures)),
    );
}
