//! `endophyte inspect` (and any client checking an agent): attach to a VMM, pause it briefly, and check that the guest RAM this process sees
//! through its own read-only mapping is byte for byte what the VMM sees.

use std::path::Path;
use std::time::Instant;

use crate::{AttachClient, ClientError};
use serde::Serialize;

/// What an inspection found.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// VMM name and version.
    pub vmm: String,
    /// Attach protocol version in use.
    pub protocol_version: u16,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes (all regions).
    pub mem_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// How long the VMM took to stop its vCPUs, microseconds.
    pub pause_us: u64,
    /// How long the VM stood still in total, microseconds.
    pub paused_for_us: u64,
    /// BLAKE3 of guest RAM through this process's mapping.
    pub sidecar_hash: String,
    /// BLAKE3 of guest RAM computed by the VMM.
    pub vmm_hash: String,
    /// Whether the two agree.
    pub hashes_match: bool,
}

/// Attaches to the agent at `socket`, pauses the VM, hashes guest RAM on both sides, resumes it (if it
/// was running).
///
/// # Errors
/// [`ClientError`] if attaching or any request fails; the VM is resumed on a best-effort basis.
pub fn inspect(socket: &Path) -> Result<Inspection, ClientError> {
    let client = AttachClient::connect(
        socket,
        concat!("endophyte-inspect ", env!("CARGO_PKG_VERSION")),
    )?;
    let was_running = client.info().running;
    let t0 = Instant::now();
    let pause = client.pause()?;
    let hashes = (|| Ok::<_, ClientError>((client.local_hash(), client.vmm_hash()?)))();
    if was_running {
        client.resume()?;
    }
    let paused_for = t0.elapsed();
    let (sidecar_hash, vmm_hash) = hashes?;
    let info = client.info();
    Ok(Inspection {
        vmm: info.vmm.clone(),
        protocol_version: client.version(),
        vcpus: info.vcpus,
        mem_bytes: info.regions.iter().map(|r| r.size_bytes).sum(),
        page_size: info.page_size,
        pause_us: pause.as_micros() as u64,
        paused_for_us: paused_for.as_micros() as u64,
        hashes_match: sidecar_hash == vmm_hash,
        sidecar_hash,
        vmm_hash,
    })
}
