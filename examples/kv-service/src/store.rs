//! The key-value store itself, and its record of what it did (`--log`, JSON lines), which is what
//! tests and the demo check a twin's restored state against.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The store's state: what it contributes at each epoch and restores from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The keys and their values.
    pub map: BTreeMap<String, String>,
    /// Writes applied since the store started (or since the state it restored).
    pub writes: u64,
}

impl State {
    /// The contribution's bytes: JSON of the state (a `BTreeMap`, so the same state gives the same
    /// bytes).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a state serializes")
    }

    /// Reads a contribution back.
    ///
    /// # Errors
    /// The bytes are not a state.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_slice(bytes).map_err(|e| format!("the contribution is no kv state: {e}"))
    }

    /// BLAKE3 of [`State::encode`], hex.
    pub fn hash(&self) -> String {
        blake3::hash(&self.encode()).to_hex().to_string()
    }
}

/// One line of the log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Registered with `node`.
    Registered {
        /// The node's name.
        node: String,
    },
    /// Contributed `state` to `epoch`.
    Contributed {
        /// The epoch.
        epoch: u64,
        /// BLAKE3 of the bytes.
        hash: String,
        /// The state.
        state: State,
    },
    /// Epochs up to `epoch` are durable.
    Durable {
        /// The epoch.
        epoch: u64,
    },
    /// A migration phase.
    Phase {
        /// Its name (`converge`, `prepared`, `committed`, `aborted`).
        phase: String,
        /// Why, when aborted.
        reason: String,
    },
    /// Answered a switchover request (`veto` empty: ready).
    Verdict {
        /// The generation asked about.
        generation: u64,
        /// The veto's reason, if it vetoed.
        veto: String,
    },
    /// Restored `state`, contributed at `contributed_epoch`, as of committed epoch `epoch`.
    Restored {
        /// The committed epoch the VM resumes from.
        epoch: u64,
        /// The epoch the state was contributed at.
        contributed_epoch: u64,
        /// BLAKE3 of the restored bytes.
        hash: String,
        /// The state.
        state: State,
    },
}

/// Appends events to the log file, one line each.
pub struct Log(Option<std::fs::File>);

impl Log {
    /// A log at `path` (appended), or none.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        Ok(Self(match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        }))
    }

    /// Appends `e` (one write, so a reader never sees half a line).
    pub fn write(&mut self, e: &Event) {
        if let Some(f) = &mut self.0 {
            let mut line = serde_json::to_vec(e).expect("an event serializes");
            line.push(b'\n');
            if let Err(err) = f.write_all(&line) {
                tracing::error!("writing the log: {err}");
            }
        }
    }
}

/// Reads a log back (for tests and the demo).
///
/// # Errors
/// Unreadable, or a line that is no event.
pub fn read_log(path: &Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}
