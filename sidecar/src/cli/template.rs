//! `endophyte target-template`: the `endophyte backup --target-qemu` command template for a libvirt
//! domain, from the command line libvirt would run for it (`virsh domxml-to-native qemu-argv`), so that
//! a backup's QEMU has the source's machine and devices ([`endophyte_qemu::launch::libvirt`]).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

/// `endophyte target-template`'s flags.
#[derive(Args)]
pub struct TemplateArgs {
    /// The domain's XML (`virsh dumpxml --migratable DOMAIN`, or what a KubeVirt hook defined).
    #[arg(long)]
    libvirt_xml: PathBuf,
    /// The libvirt connection that translates it.
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
}

/// Prints the template, shell-quoted, on one line.
pub fn target_template(a: TemplateArgs) -> anyhow::Result<()> {
    let o = Command::new("virsh")
        .args(["-c", &a.connect, "domxml-to-native", "qemu-argv", "--xml"])
        .arg(&a.libvirt_xml)
        .output()
        .context("running virsh (apt-get install libvirt-clients)")?;
    if !o.status.success() {
        bail!(
            "virsh domxml-to-native {}: {}",
            a.libvirt_xml.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let argv = String::from_utf8_lossy(&o.stdout);
    let t = endophyte_qemu::launch::libvirt::template_from_native(&argv)
        .with_context(|| format!("the QEMU command line of {}", a.libvirt_xml.display()))?;
    println!("{}", shell_words::join(t));
    Ok(())
}
