//! Where the authority is and how holds on it are kept.

use std::time::Duration;

use endophyte_wire::authority::HoldTiming;
use serde::Deserialize;

/// The `[authority]` section of a sidecar's or backup's configuration (`--etcd` on the command line).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// etcd v3 endpoints, `http://host:port` (every member of the cluster, or any).
    pub etcd: Vec<String>,
    /// Key prefix under which VMs' records live.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The holder's lease TTL, milliseconds (the server counts whole seconds; rounded up).
    #[serde(default = "default_ttl_ms")]
    pub ttl_ms: u64,
    /// How long a fence may take to act once decided (noticing it and the VMM's pause), milliseconds.
    #[serde(default = "default_action_ms")]
    pub fence_action_ms: u64,
    /// Bound on each call to etcd, milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    "/endophyte".into()
}
fn default_ttl_ms() -> u64 {
    5000
}
fn default_action_ms() -> u64 {
    500
}
fn default_timeout_ms() -> u64 {
    1000
}

impl AuthorityConfig {
    /// An authority at `endpoints` with the defaults: prefix `/endophyte`, TTL 5 s, fence action 500 ms,
    /// calls bounded at 1 s.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            etcd: endpoints,
            prefix: default_prefix(),
            ttl_ms: default_ttl_ms(),
            fence_action_ms: default_action_ms(),
            timeout_ms: default_timeout_ms(),
        }
    }

    /// The lease TTL, rounded up to the whole seconds the server grants.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_ms.div_ceil(1000).max(1))
    }

    /// Bound on each call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// How holds are kept.
    pub fn timing(&self) -> HoldTiming {
        HoldTiming::new(self.ttl(), Duration::from_millis(self.fence_action_ms))
    }

    /// Checks the endpoints and timing.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("authority.etcd lists no endpoint".into());
        }
        if let Some(e) = self
            .etcd
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10)
        {
            return Err(format!(
                "authority.etcd endpoint {e:?} is not http://HOST:PORT"
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(format!(
                "authority.prefix {:?} must start with '/' and not end with one",
                self.prefix
            ));
        }
        if self.timeout() * 2 >= self.ttl() {
            return Err(format!(
                "authority.timeout_ms {} must be under half the TTL ({:?})",
                self.timeout_ms,
                self.ttl()
            ));
        }
        self.timing().check().map_err(|e| e.to_string())
    }
}
