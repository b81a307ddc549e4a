//! What the demo, the tests and the bench check a running system with, independently of the code under
//! test: the guest's own page counter (in its RAM, through an attach connection), file hashes, the epoch a
//! backup's replica file holds on disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_attach::client::AttachClient;

/// Sum of the guest's own pages-written counters, found by their magic in the first 64 MiB of guest RAM.
pub fn guest_pages_written(c: &AttachClient) -> anyhow::Result<u64> {
    use testvm::guest;
    let page = c.info().page_size;
    let limit = c
        .info()
        .regions
        .iter()
        .map(|r| r.gpa + r.size_bytes)
        .max()
        .unwrap_or(0)
        .min(64 << 20);
    let read = |gpa: u64| -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        c.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    let mut total = 0;
    let mut found = 0;
    for g in (0..limit).step_by(page as usize) {
        if read(g + guest::status::MAGIC as u64)? == guest::STATUS_MAGIC {
            total += read(g + guest::status::PAGES_WRITTEN as u64)?;
            found += 1;
        }
    }
    if found == 0 {
        bail!("no guest status record found");
    }
    Ok(total)
}

/// BLAKE3 of a file, hex.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h).with_context(|| format!("hashing {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// The epoch a backup's replica file holds durably, from its `state.json` (its last checkpoint).
pub fn checkpoint_on_disk(vm_dir: &Path) -> anyhow::Result<u64> {
    let p = vm_dir.join("state.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
    )
    .with_context(|| format!("parsing {}", p.display()))?;
    v["checkpoint_epoch"]
        .as_u64()
        .with_context(|| format!("{} has no checkpoint_epoch", p.display()))
}

/// Waits (up to `limit`) until the backup checkpointed `epoch` (it does within about 2 s of committing it,
/// sooner when idle); returns the last checkpoint seen.
pub fn wait_checkpoint(vm_dir: &Path, epoch: u64, limit: Duration) -> anyhow::Result<u64> {
    let t = Instant::now();
    loop {
        let c = checkpoint_on_disk(vm_dir)?;
        if c >= epoch || t.elapsed() > limit {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
