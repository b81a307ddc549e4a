//! The console output commit as a service: guest console output is held by the epoch it was produced
//! in and released once that epoch is durable, so that nothing the guest printed is seen before the
//! state that printed it would survive a failover (Remus' output commit).
//!
//! It is an in-process service ([`super::LocalService`]) on `HOOK_EPOCH`: the epoch loop hands it the
//! guest's output as the VMM reports it ([`ConsoleGate::push`]); its contribution at each pause is
//! the cut (what it was handed so far belongs to that epoch; it contributes no bytes to the replica),
//! and each durable notice releases what the durable epochs produced.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use super::LocalService;

/// Guest output by the epoch that produced it.
pub struct ConsoleGate {
    /// Output since the last cut.
    pending: Vec<u8>,
    held: BTreeMap<u64, Vec<u8>>,
    out: Box<dyn Write + Send>,
    /// Bytes released once their epoch was durable.
    pub released: u64,
}

/// A shared handle on the gate: the epoch loop pushes, the services registry cuts and releases.
#[derive(Clone)]
pub struct Console(Arc<Mutex<ConsoleGate>>);

impl Console {
    /// A gate releasing into `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(ConsoleGate {
            pending: Vec::new(),
            held: BTreeMap::new(),
            out,
            released: 0,
        })))
    }

    /// The gate itself.
    pub fn lock(&self) -> MutexGuard<'_, ConsoleGate> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConsoleGate {
    /// Guest output the VMM reported, produced in the epoch being cut.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Cuts: what was pushed so far belongs to `epoch`.
    pub fn cut(&mut self, epoch: u64) {
        if !self.pending.is_empty() {
            let bytes = std::mem::take(&mut self.pending);
            self.held.entry(epoch).or_default().extend(bytes);
        }
    }

    /// Releases what epochs up to `durable` produced.
    pub fn release_through(&mut self, durable: u64) {
        while self
            .held
            .first_key_value()
            .is_some_and(|(&e, _)| e <= durable)
        {
            let (_, bytes) = self.held.pop_first().expect("non-empty");
            self.released += bytes.len() as u64;
            let _ = self.out.write_all(&bytes);
        }
        let _ = self.out.flush();
    }

    /// Releases everything still held or pushed, durable or not (replication stops, the VM goes on or
    /// left); returns how many bytes that was.
    pub fn release_all(&mut self) -> u64 {
        let mut rest: Vec<u8> = std::mem::take(&mut self.held)
            .into_values()
            .flatten()
            .collect();
        rest.append(&mut self.pending);
        let _ = self.out.write_all(&rest);
        let _ = self.out.flush();
        rest.len() as u64
    }
}

impl LocalService for Console {
    fn contribute(&mut self, epoch: u64) -> Result<Vec<u8>, String> {
        self.lock().cut(epoch);
        Ok(Vec::new())
    }

    fn durable(&mut self, epoch: u64) {
        self.lock().release_through(epoch);
    }
}
