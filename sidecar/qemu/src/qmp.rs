//! A QMP client: QEMU's JSON monitor protocol over a Unix socket, one JSON object per line
//! (`docs/interop/qmp-spec.rst` in QEMU).
//!
//! The client reads the greeting, leaves capabilities negotiation (`qmp_capabilities`), then runs one
//! command at a time: each carries an `id`, and the answer with that `id` is its result; events that arrive
//! meanwhile are queued ([`Qmp::events`]). A command can carry a file descriptor (`SCM_RIGHTS` on the same
//! `sendmsg` as its line), as `getfd` needs.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached, read or written.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU closed the monitor.
    #[error("QMP socket {path}: QEMU closed the monitor")]
    Closed {
        /// The socket.
        path: String,
    },
    /// What came is not QMP.
    #[error("QMP socket {path}: {what}")]
    Protocol {
        /// The socket.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// QEMU refused the command; its class and description.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class (e.g. `GenericError`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP socket {path}: no answer to {command} within {limit:?}")]
    Timeout {
        /// The socket.
        path: String,
        /// The command.
        command: String,
        /// How long it waited.
        limit: Duration,
    },
}

/// QEMU's version, from the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// How many events a connection keeps: older ones are dropped, so that a long-lived connection nobody
/// drains stays bounded.
pub const MAX_EVENTS: usize = 1024;

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, ...).
    pub name: String,
    /// Its data (`null` when none).
    pub data: Value,
    /// QEMU's timestamp, microseconds since the Unix epoch.
    pub at_us: u64,
}

/// A QMP connection. See the module docs.
pub struct Qmp {
    path: String,
    r: BufReader<UnixStream>,
    w: UnixStream,
    version: QemuVersion,
    package: String,
    next_id: u64,
    events: std::collections::VecDeque<Event>,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and leaves negotiation mode. Commands time out
    /// after `timeout`.
    ///
    /// # Errors
    /// Not reachable, not QMP, or negotiation refused.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let p = path.display().to_string();
        let io = |source| QmpError::Io {
            path: p.clone(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut r = BufReader::new(s.try_clone().map_err(io)?);
        let mut line = String::new();
        if r.read_line(&mut line).map_err(io)? == 0 {
            return Err(QmpError::Closed { path: p });
        }
        let g: Greeting = serde_json::from_str(&line).map_err(|e| QmpError::Protocol {
            path: p.clone(),
            what: format!("not a QMP greeting ({e}): {}", line.trim()),
        })?;
        let mut q = Self {
            path: p,
            r,
            w: s,
            version: g.qmp.version.qemu,
            package: g.qmp.version.package,
            next_id: 1,
            events: std::collections::VecDeque::new(),
            timeout,
        };
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// QEMU's version.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// QEMU's package string (e.g. `Debian 1:7.2+dfsg-7`).
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The socket's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `command` with `arguments` (`Null` for none); returns its `return` value.
    ///
    /// # Errors
    /// [`QmpError::Command`] with QEMU's reason; the connection failed.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None)
    }

    /// Runs `command` and decodes its result as `T`.
    ///
    /// # Errors
    /// As [`Qmp::execute`]; a result of another shape ([`QmpError::Protocol`]).
    pub fn query<T: DeserializeOwned>(&mut self, command: &str) -> Result<T, QmpError> {
        let v = self.execute(command, Value::Null)?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol {
            path: self.path.clone(),
            what: format!("{command} answered an unexpected shape: {e}"),
        })
    }

    /// As [`Qmp::execute`], passing `fd` along (`getfd`, `add-fd`).
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<RawFd>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("JSON serializes");
        line.push(b'\n');
        let io = |source| QmpError::Io {
            path: self.path.clone(),
            source,
        };
        match fd {
            Some(fd) => {
                let n = self
                    .w
                    .send_with_fd(&line[..], fd)
                    .map_err(|e| io(e.into()))?;
                self.w.write_all(&line[n..]).map_err(io)?;
            }
            None => self.w.write_all(&line).map_err(io)?,
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_object(command, deadline)?;
            if v.get("event").is_some() {
                self.queue_event(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    fn read_object(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            match self.r.read_line(&mut line) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            path: self.path.clone(),
                            command: command.to_string(),
                            limit: self.timeout,
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol {
            path: self.path.clone(),
            what: format!("not JSON ({e}): {}", line.trim()),
        })
    }

    fn queue_event(&mut self, v: Value) {
        let ts = &v["timestamp"];
        let at_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000
            + ts["microseconds"].as_u64().unwrap_or(0);
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            name: v["event"].as_str().unwrap_or("?").to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            at_us,
        });
    }

    /// Waits up to `limit` for an event that `want` accepts (events already queued first); every event
    /// seen stays queued.
    ///
    /// # Errors
    /// The connection failed.
    pub fn wait_event(
        &mut self,
        limit: Duration,
        mut want: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, QmpError> {
        if let Some(e) = self.events.iter().find(|e| want(e)) {
            return Ok(Some(e.clone()));
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.read_object("an event", deadline) {
                Ok(v) if v.get("event").is_some() => {
                    self.queue_event(v);
                    let e = self.events.back().expect("just queued");
                    if want(e) {
                        return Ok(Some(e.clone()));
                    }
                }
                Ok(_) => {}
                Err(QmpError::Timeout { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The events received so far (the last [`MAX_EVENTS`]), oldest first; they stay until
    /// [`Qmp::clear_events`].
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// Forgets the events received so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// Runs a human monitor command (HMP), for what QMP lacks (`info ramblock`); returns its text.
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let v = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }
}

/// `query-status`.
#[derive(Clone, Debug, Deserialize)]
pub struct StatusInfo {
    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
}

/// `query-migrate` (the fields used here).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ... (absent before any migration).
    #[serde(default)]
    pub status: Option<String>,
    /// The guest's downtime of the last migration, ms.
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
    /// Whether something blocks migration (QEMU >= 6.0).
    #[serde(default)]
    pub blocked_reasons: Option<Vec<String>>,
}

impl MigrationInfo {
    /// Whether a migration is under way (anyone's).
    pub fn active(&self) -> bool {
        !matches!(
            self.status.as_deref(),
            None | Some("none" | "completed" | "failed" | "cancelled")
        )
    }
}

/// One entry of `query-migrate-capabilities`.
#[derive(Clone, Debug, Deserialize)]
pub struct CapabilityState {
    /// Its name.
    pub capability: String,
    /// Whether it is on.
    pub state: bool,
}
