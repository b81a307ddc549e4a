//! Sidecar configuration: a TOML file, overridden by flags, with defaults for everything but the VM and
//! its backups.
//!
//! ```toml
//! vm_id = "vm-a"
//! attach_socket = "/run/endophyte/vm-a.sock"  # a testvm VMM; or, for QEMU:
//! # qmp = "/run/endophyte/vm-a.qmp"   # one of its QMP monitors
//! tracking = "dirty-log"             # or "full-snapshot": one snapshot per epoch, diffed by page hashes
//! certs = "/etc/endophyte/certs"     # ca.pem, <node>.pem, <node>.key
//! node = "primary-1"
//! epoch_ms = 100                     # epoch length
//! staging = "32MiB"                  # bounded staging buffer for one epoch's dirty pages
//! paths_per_backup = 4
//! quorum = 1                         # backups that must commit an epoch before it is durable
//! compress = true
//! output_commit = true               # hold guest console output until its epoch is durable
//! curve = "linear:start=0.5,max=0.9" # pressure -> vCPU throttle (crate throttle-curves)
//! emergency = "pause"                # or "discard", when an epoch overflows staging
//! self_fence = "pause"               # or "stop", "off": when no quorum of backups answers in time
//! fence_after_ms = 2000              # that time; each backup's lease must be safely longer
//! congestion = "cubic"               # or "bbr" for lossy WAN paths: the paths' congestion controller
//! max_bandwidth = "20MB/s"           # optional cap on what the sidecar sends
//! control_socket = "/run/endophyte/vm-a.ctl"  # optional control API (`endophyte status`, `endophyte set`)
//! metrics_listen = "0.0.0.0:9400"    # optional: GET /metrics over TCP too (the control socket always has it)
//! services_socket = "/run/endophyte/vm-a.svc"  # optional services API (docs/services.md)
//! service_deadline_ms = 50           # how long a service has to contribute, inside the epoch's pause
//! service_max_bytes = "256KiB"       # the most one service contributes to one epoch (at most 1 MiB)
//! service_policy = "skip"            # or "fail", "pause": a late or failing service's epoch
//! service_hold_ms = 5000             # how long a service may hold a switchover
//!
//! [[backup]]
//! name = "backup-1"                  # its certificate's name
//! addr = "10.0.0.2:7400"
//! via = ["10.0.0.9:7500"]            # relays; paths alternate direct, via[0], via[1], ...
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is invalid; the message names the key and line.
    #[error("{path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A value is out of range or missing.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Parses a byte size: a number with an optional unit (`B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `KB`, `MB`,
/// `GB`; binary for the `i` and one-letter forms, decimal for `KB`/`MB`/`GB`).
///
/// # Errors
/// A message naming the bad input.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 32MiB)"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "M" | "MiB" | "m" => 1024.0 * 1024.0,
        "G" | "GiB" | "g" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    Ok((n * mult) as u64)
}

fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        N(u64),
        S(String),
    }
    match B::deserialize(d)? {
        B::N(n) => Ok(n),
        B::S(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses a rate: a byte size per second, `/s` optional (`20MB/s`, `1GiB/s`, `5000000`).
///
/// # Errors
/// A message naming the bad input.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match parse_bytes(t)? {
        0 => Err(format!("{s:?}: a bandwidth cap must be above 0")),
        n => Ok(n),
    }
}

fn de_opt_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum R {
        N(u64),
        S(String),
    }
    match R::deserialize(d)? {
        R::N(n) => Ok(Some(n)),
        R::S(s) => parse_rate(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// What to do when an epoch's dirty pages overflow the staging buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Emergency {
    /// Keep the guest paused while the pages are sent: the replica stays consistent, the guest stands still.
    #[default]
    Pause,
    /// Abandon the pause, give the pages back to the VMM and let the guest run; the epoch ends later, the
    /// replica falls behind (the RPO grows).
    Discard,
}

/// What the sidecar does to its guest when no quorum of backups answered within `fence_after_ms`
/// ([`endophyte_wire::lease`]): a backup may promote once its lease runs out, and the old copy must have
/// stopped by then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SelfFencePolicy {
    /// Pause the guest; resume it when a quorum answers again and no newer generation runs elsewhere.
    #[default]
    Pause,
    /// Stop the VM for good.
    Stop,
    /// Never fence (a backup's promote after its lease can then leave two copies running).
    Off,
}

/// How the sidecar learns which pages changed, for a VMM that offers a choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrackingMode {
    /// The VMM's dirty log (KVM's bitmap or ring): only written pages are read and sent.
    #[default]
    DirtyLog,
    /// A full snapshot per epoch, diffed against per-page hashes: for VMMs without a usable dirty log
    /// (with the attach protocol, mainly to exercise that path).
    FullSnapshot,
}

/// One backup node and how to reach it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupSpec {
    /// Node name: the DNS name in its certificate.
    pub name: String,
    /// UDP address of its replication endpoint.
    pub addr: SocketAddr,
    /// Paths to it (defaults to the sidecar's `paths_per_backup`).
    #[serde(default)]
    pub paths: Option<usize>,
    /// Relays in front of it; path `i` goes direct when `i % (via.len() + 1) == 0`, else through
    /// `via[i % (via.len() + 1) - 1]`.
    #[serde(default)]
    pub via: Vec<SocketAddr>,
}

impl BackupSpec {
    /// Parses the flag form `name=b1,addr=127.0.0.1:7400[,paths=4][,via=ADDR+ADDR]`.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (mut name, mut addr, mut paths, mut via) = (None, None, None, vec![]);
        for kv in s.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("backup {s:?}: {kv:?} is not key=value"))?;
            match k.trim() {
                "name" => name = Some(v.to_string()),
                "addr" => {
                    addr = Some(
                        v.parse()
                            .map_err(|_| format!("backup {s:?}: addr {v:?} is not ip:port"))?,
                    )
                }
                "paths" => {
                    paths = Some(
                        v.parse()
                            .map_err(|_| format!("backup {s:?}: paths {v:?} is not a number"))?,
                    )
                }
                "via" => {
                    for a in v.split('+') {
                        via.push(
                            a.parse()
                                .map_err(|_| format!("backup {s:?}: relay {a:?} is not ip:port"))?,
                        );
                    }
                }
                other => {
                    return Err(format!(
                        "backup {s:?}: unknown key {other:?} (name, addr, paths, via)"
                    ))
                }
            }
        }
        Ok(Self {
            name: name.ok_or_else(|| format!("backup {s:?}: name= is missing"))?,
            addr: addr.ok_or_else(|| format!("backup {s:?}: addr= is missing"))?,
            paths,
            via,
        })
    }
}

fn d_guard_ms() -> u64 {
    1500
}

fn d_epoch_ms() -> u64 {
    100
}
fn d_staging() -> u64 {
    32 << 20
}
fn d_paths() -> usize {
    4
}
fn d_quorum() -> usize {
    1
}
fn d_true() -> bool {
    true
}
fn d_chunk_pages() -> u32 {
    64
}
fn d_unacked() -> u64 {
    16 << 20
}
fn d_fence_after_ms() -> u64 {
    endophyte_wire::lease::DEFAULT_FENCE_AFTER.as_millis() as u64
}

fn d_service_deadline_ms() -> u64 {
    50
}
fn d_service_max_bytes() -> u64 {
    256 << 10
}
fn d_service_hold_ms() -> u64 {
    5000
}

fn d_curve() -> String {
    "linear:start=0.5,max=0.9".into()
}

/// The sidecar's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The VM's name, unique in the network.
    #[serde(default)]
    pub vm_id: String,
    /// The VMM's attach socket (testvm, or any VMM linking the attach agent); or
    #[serde(default)]
    pub attach_socket: PathBuf,
    /// a QMP monitor socket of a QEMU (e.g. the extra monitor a libvirt domain or a KubeVirt hook adds).
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// How changed pages are found (`dirty-log`, the default, or `full-snapshot`).
    #[serde(default)]
    pub tracking: TrackingMode,
    /// Certificate directory.
    #[serde(default)]
    pub certs: PathBuf,
    /// This node's name (selects `<node>.pem`).
    #[serde(default)]
    pub node: String,
    /// Epoch length, ms.
    #[serde(default = "d_epoch_ms")]
    pub epoch_ms: u64,
    /// Staging buffer size, bytes.
    #[serde(default = "d_staging", deserialize_with = "de_bytes")]
    pub staging: u64,
    /// Paths per backup unless the backup says otherwise.
    #[serde(default = "d_paths")]
    pub paths_per_backup: usize,
    /// Backups that must commit an epoch for it to be durable.
    #[serde(default = "d_quorum")]
    pub quorum: usize,
    /// lz4-compress chunks.
    #[serde(default = "d_true")]
    pub compress: bool,
    /// Hold guest console output until its epoch is durable.
    #[serde(default = "d_true")]
    pub output_commit: bool,
    /// Pages per chunk.
    #[serde(default = "d_chunk_pages")]
    pub chunk_pages: u32,
    /// Encoded chunk bytes in flight (unacknowledged by a backup) before the sidecar waits.
    #[serde(default = "d_unacked", deserialize_with = "de_bytes")]
    pub max_unacked: u64,
    /// Cap on what the sidecar sends, all paths and backups together, bytes/s (`"20MB/s"`, or a number);
    /// none by default. QEMU has the same knob (`max-bandwidth`); it lets throttling be exercised on loopback.
    #[serde(default, deserialize_with = "de_opt_rate")]
    pub max_bandwidth: Option<u64>,
    /// Emergency policy when staging overflows.
    #[serde(default)]
    pub emergency: Emergency,
    /// Self-fencing when the backups go silent (`pause`, the default, `stop` or `off`).
    #[serde(default)]
    pub self_fence: SelfFencePolicy,
    /// The self-fence bound, ms: fence once fewer than `fence_quorum` backups answered a ping sent this
    /// recently. Each backup's lease (announced in its Welcome) must be safely longer
    /// ([`endophyte_wire::lease::check_timing`]); the sidecar refuses a backup whose lease is not.
    #[serde(default = "d_fence_after_ms")]
    pub fence_after_ms: u64,
    /// Backups that must keep answering; `quorum` when unset. A promote is safe once more backups than
    /// `backups - fence_quorum` lost the primary for their lease (docs/migration.md).
    #[serde(default)]
    pub fence_quorum: Option<usize>,
    /// Congestion controller of the paths (`cubic`, the default, or `bbr`).
    #[serde(default)]
    pub congestion: crate::tls::Congestion,
    /// Throttle curve, in `throttle_curves` string form (e.g. `exponential:start=0.3,max=0.95,steepness=4`).
    #[serde(default = "d_curve")]
    pub curve: String,
    /// Control API socket ([`crate::control`]): `endophyte status` and `endophyte set` talk to it. None by
    /// default.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Services API socket ([`crate::services`], gRPC, `proto/services_v1.proto`). None by default.
    #[serde(default)]
    pub services_socket: Option<PathBuf>,
    /// How long a service has to answer an epoch's ContributeRequest, ms (1-10000). It is part of the
    /// epoch's pause while any service takes part in epochs.
    #[serde(default = "d_service_deadline_ms")]
    pub service_deadline_ms: u64,
    /// The most bytes one service contributes to one epoch (at most 1 MiB).
    #[serde(default = "d_service_max_bytes", deserialize_with = "de_bytes")]
    pub service_max_bytes: u64,
    /// What a late or failing contribution does to its epoch ([`crate::services::ServicePolicy`]).
    #[serde(default)]
    pub service_policy: crate::services::ServicePolicy,
    /// How long services may hold a converged migration's switchover before it fails, ms.
    #[serde(default = "d_service_hold_ms")]
    pub service_hold_ms: u64,
    /// TCP address serving `GET /metrics` alone (Prometheus text; [`crate::metrics`]), for a Prometheus
    /// that cannot reach the control socket. None by default.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The VM's current generation (its fencing token): 0 for a VM that never migrated; a VM started on a
    /// node by a switchover or promote runs under the generation in that node's `fence.json`. A
    /// migration switches over with the next one.
    #[serde(default)]
    pub generation: u64,
    /// The fencing authority (etcd; docs/fencing.md). With one, the sidecar claims the VM at start (its
    /// generation comes from there, not from `generation`), keeps the hold alive, and pauses the guest
    /// once it cannot show an acknowledged keep-alive; the backups' lease self-fence is then off.
    #[serde(default)]
    pub authority: Option<endophyte_authority::AuthorityConfig>,
    /// The VMM's run guard, ms: the VMM pauses the guest by itself once this sidecar sends nothing for
    /// this long or dies (fail closed). With an authority it must end well within the hold.
    #[serde(default = "d_guard_ms")]
    pub guard_ms: u64,
    /// The backups.
    #[serde(default, rename = "backup")]
    pub backups: Vec<BackupSpec>,
    /// Whether `epoch_ms`, `staging` and `max_unacked` were set by the operator (file or flags). Those not
    /// set follow the measured bandwidth-delay product ([`crate::throttle::tune`]).
    #[serde(skip)]
    pub explicit: Explicit,
}

/// Which tunables the operator set; see [`SidecarConfig::explicit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    /// `epoch_ms` was set.
    pub epoch_ms: bool,
    /// `staging` was set.
    pub staging: bool,
    /// `max_unacked` was set.
    pub max_unacked: bool,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl SidecarConfig {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Toml`] (with toml's line and key).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let toml_err = |e: toml::de::Error| ConfigError::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut c: SidecarConfig = toml::from_str(&text).map_err(toml_err)?;
        let table: toml::Table = toml::from_str(&text).map_err(toml_err)?;
        c.explicit = Explicit {
            epoch_ms: table.contains_key("epoch_ms"),
            staging: table.contains_key("staging"),
            max_unacked: table.contains_key("max_unacked"),
        };
        Ok(c)
    }

    /// The self-fence bound.
    pub fn fence_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.fence_after_ms)
    }

    /// How often each path is pinged: a quarter of the fence bound, at most once a second, so that a
    /// healthy backup answers several times within the bound.
    pub fn ping_interval(&self) -> std::time::Duration {
        (self.fence_after() / 4).min(std::time::Duration::from_secs(1))
    }

    /// How long a service has to contribute.
    pub fn service_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.service_deadline_ms)
    }

    /// How long services may hold a switchover.
    pub fn service_hold(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.service_hold_ms)
    }

    /// Backups that must keep answering for the guest to run.
    pub fn fence_quorum(&self) -> usize {
        self.fence_quorum.unwrap_or(self.quorum)
    }

    /// Checks the settings make sense together.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vm_id.is_empty() {
            return bad("vm_id is required".into());
        }
        if let Some(a) = &self.authority {
            a.validate().map_err(ConfigError::Invalid)?;
            // A hung sidecar renews nothing: its guard must pause the guest (watchdog tick and the pause
            // included) before its last renewal's lease can end.
            let t = a.timing();
            let guard = std::time::Duration::from_millis(self.guard_ms + 50) + t.action_bound;
            if guard + t.keepalive_every >= t.safe_for() {
                return bad(format!(
                    "guard_ms {} is too long for the authority's TTL {:?}: a hung sidecar's guest must be \
                     paused (guard, watchdog, pause) within {:?}",
                    self.guard_ms,
                    t.ttl,
                    t.safe_for().saturating_sub(t.keepalive_every)
                ));
            }
        }
        if self.guard_ms < 100 {
            return bad(format!("guard_ms {} is under 100", self.guard_ms));
        }
        match (self.attach_socket.as_os_str().is_empty(), &self.qmp) {
            (true, None) => {
                return bad("the VMM is required: attach_socket (testvm) or qmp (QEMU)".into())
            }
            (false, Some(_)) => return bad("attach_socket and qmp name two VMMs: give one".into()),
            _ => {}
        }
        if self.node.is_empty() || self.certs.as_os_str().is_empty() {
            return bad("certs and node are required (make them with `endophyte certs`)".into());
        }
        if self.backups.is_empty() {
            return bad("at least one [[backup]] is required".into());
        }
        if self.quorum == 0 || self.quorum > self.backups.len() {
            return bad(format!(
                "quorum {} must be between 1 and the number of backups ({})",
                self.quorum,
                self.backups.len()
            ));
        }
        if !(1..=10_000).contains(&self.service_deadline_ms) {
            return bad(format!(
                "service_deadline_ms {} must be between 1 and 10000",
                self.service_deadline_ms
            ));
        }
        let cap = endophyte_wire::contrib::MAX_CONTRIBUTION_BYTES as u64;
        if self.service_max_bytes > cap {
            return bad(format!(
                "service_max_bytes {} exceeds the wire's cap of {cap} bytes per contribution",
                self.service_max_bytes
            ));
        }
        if self.service_hold_ms == 0 {
            return bad("service_hold_ms must be above 0".into());
        }
        if let Some(q) = self.fence_quorum {
            if q == 0 || q > self.backups.len() {
                return bad(format!(
                    "fence_quorum {q} must be between 1 and the number of backups ({})",
                    self.backups.len()
                ));
            }
        }
        if !(400..=60_000).contains(&self.fence_after_ms) {
            return bad(format!(
                "fence_after_ms {} must be in 400..=60000",
                self.fence_after_ms
            ));
        }
        endophyte_wire::lease::check_pings(self.fence_after(), self.ping_interval())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.epoch_ms == 0 || self.epoch_ms > 60_000 {
            return bad(format!("epoch_ms {} must be in 1..=60000", self.epoch_ms));
        }
        if self.staging < 1 << 20 {
            return bad(format!(
                "staging {} bytes is below the 1 MiB minimum",
                self.staging
            ));
        }
        throttle_curves::Curve::parse(&self.curve)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for b in &self.backups {
            let p = b.paths.unwrap_or(self.paths_per_backup);
            if p == 0 || p > 64 {
                return bad(format!("backup {}: paths {p} must be in 1..=64", b.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_backups() {
        let c: SidecarConfig = toml::from_str(
            r#"
            vm_id = "vm-a"
            staging = "8MiB"
            [[backup]]
            name = "b1"
            addr = "127.0.0.1:7400"
            via = ["127.0.0.1:7500"]
        "#,
        )
        .unwrap();
        assert_eq!(c.staging, 8 << 20);
        assert_eq!(c.epoch_ms, 100);
        assert_eq!(c.backups[0].via.len(), 1);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = toml::from_str::<SidecarConfig>("epoch_ms = \"fast\"").unwrap_err();
        assert!(e.to_string().contains("epoch_ms"), "{e}");
        let e = toml::from_str::<SidecarConfig>("stagin = 3").unwrap_err();
        assert!(e.to_string().contains("stagin"), "{e}");
        let e = BackupSpec::parse("name=b1,addr=nowhere").unwrap_err();
        assert!(e.contains("addr"), "{e}");
        let c = SidecarConfig {
            vm_id: "v".into(),
            attach_socket: "/s".into(),
            certs: "/c".into(),
            node: "n".into(),
            backups: vec![BackupSpec::parse("name=b1,addr=127.0.0.1:1").unwrap()],
            quorum: 2,
            ..SidecarConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("quorum"));
    }

    #[test]
    fn a_file_says_which_tunables_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "vm_id = \"v\"\nstaging = \"64MiB\"\n").unwrap();
        let c = SidecarConfig::from_file(&p).unwrap();
        assert_eq!(c.staging, 64 << 20);
        assert!(c.explicit.staging && !c.explicit.epoch_ms && !c.explicit.max_unacked);
        std::fs::write(&p, "epoch_ms = 0.5\n").unwrap();
        let e = SidecarConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("s.toml") && e.contains("epoch_ms"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("20MB").unwrap(), 20_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_rate("20MB/s").unwrap(), 20_000_000);
        assert_eq!(parse_rate("1GiB/s").unwrap(), 1 << 30);
        assert!(parse_rate("0/s").unwrap_err().contains("above 0"));
        let c: SidecarConfig = toml::from_str("max_bandwidth = \"20MB/s\"").unwrap();
        assert_eq!(c.max_bandwidth, Some(20_000_000));
    }
}
