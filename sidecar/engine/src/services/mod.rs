//! Services: subsystems in their own processes that take part in epochs, migrations and failover
//! through a versioned gRPC API (`proto/services_v1.proto`, docs/services.md), served on a node's
//! services socket by the sidecar and by the backup.
//!
//! - this module: the registry of a node's registered services and what `endophyte status` shows of
//!   them;
//! - [`grpc`]: the API's server side (sessions, registration, version checks) and its generated code
//!   ([`pb`]).
//!
//! Built so far: registration with version, name and hook checks, sessions that end the registration
//! when the service goes, the listing in both nodes' status. Epoch contributions, durable notices,
//! migration phases and restores follow (issue 17).

pub mod grpc;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use grpc::pb;

/// The API versions this node serves (the `api_version` of a Register).
pub const API_VERSIONS: [u32; 1] = [1];

/// A registered service as `GET /v1/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its name, unique on the node.
    pub name: String,
    /// The hook points it registered for (`epoch`, `migration`, `restore`).
    pub hooks: Vec<String>,
    /// The API version its session speaks.
    pub api_version: u32,
    /// Since it registered, ms.
    pub registered_ms_ago: f64,
}

/// One registered service.
struct Entry {
    hooks: Vec<pb::Hook>,
    api_version: u32,
    since: Instant,
    /// Which session holds the name (a newer session of the same name is refused while it lives).
    session: u64,
}

/// The services registered with one node. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct ServiceRegistry {
    inner: Arc<Mutex<BTreeMap<String, Entry>>>,
    next_session: Arc<std::sync::atomic::AtomicU64>,
}

impl ServiceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `name` for `hooks`; returns the session's id.
    ///
    /// # Errors
    /// A service of that name is registered (its session still lives): the message says so.
    fn register(&self, name: &str, hooks: Vec<pb::Hook>, api_version: u32) -> Result<u64, String> {
        let mut g = self.lock();
        if g.contains_key(name) {
            return Err(format!(
                "a service named {name:?} is registered already (its session is open)"
            ));
        }
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        g.insert(
            name.to_owned(),
            Entry {
                hooks,
                api_version,
                since: Instant::now(),
                session,
            },
        );
        tracing::info!(service = name, "service registered");
        Ok(session)
    }

    /// Ends session `session` of `name` (the service went away).
    fn unregister(&self, name: &str, session: u64) {
        let mut g = self.lock();
        if g.get(name).is_some_and(|e| e.session == session) {
            g.remove(name);
            tracing::info!(service = name, "service unregistered (its session ended)");
        }
    }

    /// The registered services, by name.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.lock()
            .iter()
            .map(|(name, e)| ServiceStatus {
                name: name.clone(),
                hooks: e.hooks.iter().map(|h| hook_name(*h).to_owned()).collect(),
                api_version: e.api_version,
                registered_ms_ago: e.since.elapsed().as_secs_f64() * 1e3,
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
        "{:<20} {:<24} {:>4} {:>14}",
        "SERVICE", "HOOKS", "API", "REGISTERED"
    );
    for s in services {
        let _ = writeln!(
            t,
            "{:<20} {:<24} {:>4} {:>14}",
            s.name,
            s.hooks.join(","),
            s.api_version,
            format!("{:.1} s ago", s.registered_ms_ago / 1e3)
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
