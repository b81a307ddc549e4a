//! Assembles the QEMU guest (`qemu-guest/guest.S`, GNU as), testvm's hotset workload for QEMU, into a
//! 32-bit multiboot ELF that `testvm::qemu_guest` embeds for QEMU's `-kernel`.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running {cmd:?}: {e} (binutils is needed: apt-get install binutils)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = PathBuf::from("qemu-guest/guest.S");
    let script = PathBuf::from("qemu-guest/guest.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let obj = out.join("qemu-guest.o");
    let elf = out.join("qemu-guest.elf");
    run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args(["-m", "elf_i386", "-T"])
        .arg(&script)
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
}
