//! `endophyte export`: a backup's replica of a QEMU VM (its last committed epoch) written as a file QEMU
//! or libvirt restores.
//!
//! It reads the replica directory itself, so the backup serving it must be stopped first (the directory's
//! lock says when it is not), and it refuses a replica a VM runs on. Journals of committed epochs that the
//! backup had not yet checkpointed are redone first, as a restarting backup would, so the export is of the
//! newest committed epoch.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use endophyte_engine::store::{self, CrashPoint, DirLock, ReplicaStore};
use endophyte_qemu::QemuState;

/// What `endophyte export` writes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// A plain QEMU migration stream: `qemu-system-x86_64 <the VM's options> -incoming "exec:cat FILE"`.
    Qemu,
    /// A libvirt save image (needs `--domain-xml`): `virsh restore FILE`.
    Libvirt,
}

/// `endophyte export`'s flags.
#[derive(Args)]
pub struct ExportArgs {
    /// The backup's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The VM (its directory under the data directory).
    #[arg(long)]
    vm: String,
    /// What to write.
    #[arg(long, value_enum, default_value = "qemu")]
    format: Format,
    /// The file to write (must not exist).
    #[arg(long)]
    output: PathBuf,
    /// The domain's XML (`virsh dumpxml --migratable DOMAIN` on the source), for `--format libvirt`.
    #[arg(long)]
    domain_xml: Option<PathBuf>,
    /// Have `virsh restore` leave the guest paused (default: it resumes it).
    #[arg(long)]
    paused: bool,
}

/// Writes the export and prints what it wrote as JSON.
///
/// # Errors
/// The directory is locked, holds no replica, holds a running VM's RAM, or its last committed epoch has
/// no QEMU state; the XML is missing or not a domain; the output exists or cannot be written (a partial
/// output is removed).
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let dir = a.data_dir.join(&a.vm);
    let xml = match (a.format, &a.domain_xml) {
        (Format::Libvirt, Some(p)) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        (Format::Libvirt, None) => {
            bail!("--format libvirt needs --domain-xml (virsh dumpxml --migratable DOMAIN)")
        }
        (Format::Qemu, Some(_)) => bail!("--domain-xml is for --format libvirt"),
        (Format::Qemu, None) => None,
    };
    let Some(id) = store::identify(&dir).context("reading the replica's state.json")? else {
        bail!("{} holds no replica (no state.json)", dir.display());
    };
    let _lock = DirLock::acquire(&dir)?;
    if let Some(r) = endophyte_engine::fence::load(&dir)? {
        if r.fence.holds_vm() {
            bail!(
                "VM {:?} is {} on this node under generation {}: its replica file is that VM's RAM, not an epoch",
                id.vm_id,
                r.fence.state.as_str(),
                r.fence.generation
            );
        }
    }
    let replica = ReplicaStore::open(
        &dir,
        &id.vm_id,
        id.mem_bytes,
        id.page_size,
        CrashPoint::default(),
    )?;
    let epoch = replica.committed_epoch();
    let Some(vm_state) = replica.vm_state() else {
        bail!(
            "epoch {epoch} of VM {:?} carries no VM state (no epoch committed yet, or its VMM sent none)",
            id.vm_id
        );
    };
    let state = QemuState::from_vm_state(vm_state)
        .with_context(|| format!("epoch {epoch} of VM {:?}", id.vm_id))?;
    let image = File::open(replica.image_path())
        .with_context(|| format!("opening {}", replica.image_path().display()))?;
    let mut out = File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let written = match &xml {
        None => endophyte_qemu::export::qemu_stream(&state, &image, &mut out),
        Some(xml) => endophyte_qemu::export::libvirt_save(&state, &image, xml, !a.paused, &mut out),
    };
    let bytes = match written {
        Ok(n) => n,
        Err(e) => {
            drop(out);
            remove_partial(&a.output);
            return Err(e).with_context(|| format!("exporting to {}", a.output.display()));
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "vm": id.vm_id,
            "epoch": epoch,
            "format": format!("{:?}", a.format).to_lowercase(),
            "output": a.output,
            "bytes": bytes,
            "machine": state.machine,
            "qemu_version": state.qemu_version,
        })
    );
    Ok(())
}

fn remove_partial(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        tracing::warn!("removing the partial export {}: {e}", p.display());
    }
}
