//! A single-member etcd on loopback, started from the `etcd` binary (Debian's `etcd-server`): for the
//! tests and the demo, which need a real authority and have no cluster. It is killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Authority, AuthorityConfig, EtcdAuthority};

/// A running etcd owned by this process.
pub struct LocalEtcd {
    child: Child,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory.
    pub dir: PathBuf,
}

/// Errors starting a local etcd.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    /// The binary could not be run.
    #[error("starting etcd ({bin}): {source}; install Debian's etcd-server")]
    Spawn {
        /// The binary.
        bin: String,
        /// The error.
        source: std::io::Error,
    },
    /// It did not answer in time.
    #[error("etcd at {url} did not answer within {waited:?} (its log: {log})")]
    NotReady {
        /// Its URL.
        url: String,
        /// How long it was given.
        waited: Duration,
        /// Where it logged.
        log: String,
    },
    /// No free port.
    #[error("finding a free loopback port: {0}")]
    Port(std::io::Error),
}

fn free_port() -> Result<u16, LocalEtcdError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(LocalEtcdError::Port)?;
    Ok(l.local_addr().map_err(LocalEtcdError::Port)?.port())
}

impl LocalEtcd {
    /// Starts etcd with its data (and `etcd.log`) under `dir`, on free loopback ports, and waits until it
    /// answers (on a tokio runtime of its own: call it outside any runtime). `ETCD_BIN` overrides the
    /// binary (`etcd` on `PATH`).
    ///
    /// # Errors
    /// [`LocalEtcdError`], naming the binary or the log.
    pub fn start(dir: &Path) -> Result<Self, LocalEtcdError> {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let _ = std::fs::create_dir_all(dir);
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|source| LocalEtcdError::Spawn {
            bin: bin.clone(),
            source,
        })?;
        let child = Command::new(&bin)
            .args(["--name", "endophyte-local", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("endophyte-local={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| LocalEtcdError::Spawn {
                bin: bin.clone(),
                source,
            })?)
            .stderr(log)
            .spawn()
            .map_err(|source| LocalEtcdError::Spawn {
                bin: bin.clone(),
                source,
            })?;
        let me = Self {
            child,
            url,
            dir: dir.to_owned(),
        };
        me.wait_ready(Duration::from_secs(20), &log_path)?;
        Ok(me)
    }

    fn wait_ready(&self, within: Duration, log: &Path) -> Result<(), LocalEtcdError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let auth = {
            let _in = rt.enter();
            EtcdAuthority::connect(&self.config()).expect("a loopback URL is valid")
        };
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if rt.block_on(auth.observe("readiness-probe")).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LocalEtcdError::NotReady {
            url: self.url.clone(),
            waited: within,
            log: log.display().to_string(),
        })
    }

    /// An authority configuration pointing at this etcd, with the defaults.
    pub fn config(&self) -> AuthorityConfig {
        AuthorityConfig::new(vec![self.url.clone()])
    }

    /// The process id (tests stop and continue it to cut the authority off).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
