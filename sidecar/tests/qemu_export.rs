//! `endophyte export`: a backup's replica of a QEMU guest written as a plain migration stream and as a
//! libvirt save image, each restored by a new QEMU (`-incoming "exec:..."`) whose RAM, by its own
//! `pmemsave`, is the replica's and whose guest goes on from the replica's counter. The libvirt image is
//! read the way libvirt reads it (its header struct, then the stream after `data_len`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;
use endophyte_qemu::source::hash::pmem_hash;
use serde_json::Value;

fn export(args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("export")
        .args(args)
        .env("RUST_LOG", log_level())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts the guest's machine from `incoming` (paused), checks its RAM by its own pmemsave against
/// `want_hash`, resumes it and returns its counter right after, checked to advance.
fn restore(dir: &Path, elf: &Path, incoming: &str, want_hash: &str) -> u64 {
    let qmp = dir.join("restored.qmp");
    let mut child = Command::new("qemu-system-x86_64")
        .args(vm_args(
            &format!("memory-backend-ram,id=mem0,size={MEM_MIB}M"),
            elf,
            1,
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("restored.serial").display()))
        .args(["-S", "-incoming", incoming])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("restored.err")).unwrap())
        .spawn()
        .unwrap();
    let mut q = connect(&qmp);
    let said = || std::fs::read_to_string(dir.join("restored.err")).unwrap_or_default();
    let t = Instant::now();
    loop {
        let m = q
            .execute("query-migrate", Value::Null)
            .unwrap_or_else(|e| panic!("QEMU loading {incoming:?}: {e}; it said: {}", said()));
        match m["status"].as_str() {
            Some("completed") => break,
            Some("failed") => panic!("QEMU refused the export: {m} {}", said()),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "load did not end: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pmem_hash(&mut q, dir, MEM_MIB << 20).unwrap(), want_hash);
    q.execute("cont", Value::Null).unwrap();
    let p0 = pages(&mut q);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = pages(&mut q);
    assert!(p1 > p0, "the restored guest does not run: {p0} then {p1}");
    let _ = child.kill();
    let _ = child.wait();
    p0
}

#[test]
fn a_replica_exports_as_a_qemu_stream_and_a_libvirt_save_image_that_restore() {
    if !kvm_available() || !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "test", &["primary", "b1"]);
    let elf = guest_elf(tmp.path());
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let mut b1 = backup(&certs, "b1", a1, &d1, &[]);
    let mut vm = boot(tmp.path(), 2000, true);
    let ctl = tmp.path().join("sidecar.ctl");
    let mut args = sidecar_args(&vm.sidecar_qmp, &certs, &ctl);
    args.push(format!("--backup=name=b1,addr={a1}"));
    let sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(90), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });
    let d1s = d1.display().to_string();
    let out = |name: &str| -> PathBuf { tmp.path().join(name) };
    let stream = out("vm1.stream");
    let stream_s = stream.display().to_string();

    // The backup serving the replica holds it.
    let o = export(&["--data-dir", &d1s, "--vm", "vm1", "--output", &stream_s]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("locked"), "{}", stderr(&o));
    assert!(!stream.exists(), "a refused export left a file");

    // The primary and the backup stop; the replica stays.
    drop(sidecar);
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    b1.kill();
    let (want, in_replica) = replica_hash_and_counter(&d1.join("vm1"), MEM_MIB << 20);

    // A plain stream: QEMU loads it with exec:cat.
    let o = export(&["--data-dir", &d1s, "--vm", "vm1", "--output", &stream_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        report["bytes"].as_u64(),
        Some(std::fs::metadata(&stream).unwrap().len())
    );
    let p = restore(tmp.path(), &elf, &format!("exec:cat {stream_s}"), &want);
    assert!(p >= in_replica, "{p} < {in_replica}");

    // Bad requests name what is wrong and write nothing.
    let image = out("vm1.save");
    let image_s = image.display().to_string();
    let xml = out("domain.xml");
    let xml_s = xml.display().to_string();
    let libvirt = ["--data-dir", &d1s, "--vm", "vm1", "--format", "libvirt"];
    let o = export(&[&libvirt[..], &["--output", &image_s]].concat());
    assert!(stderr(&o).contains("--domain-xml"), "{}", stderr(&o));
    std::fs::write(&xml, "<vm><name>x</name></vm>").unwrap();
    let o = export(
        &[
            &libvirt[..],
            &["--output", &image_s, "--domain-xml", &xml_s],
        ]
        .concat(),
    );
    assert!(stderr(&o).contains("not <domain>"), "{}", stderr(&o));
    assert!(!image.exists());
    let o = export(&["--data-dir", &d1s, "--vm", "vm2", "--output", &image_s]);
    assert!(stderr(&o).contains("no replica"), "{}", stderr(&o));
    let o = export(&["--data-dir", &d1s, "--vm", "vm1", "--output", &stream_s]);
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));

    // A libvirt save image, read as libvirt reads it.
    let domain =
        "<domain type='kvm'>\n  <name>vm1</name>\n  <memory unit='MiB'>64</memory>\n</domain>\n";
    std::fs::write(&xml, domain).unwrap();
    let o = export(
        &[
            &libvirt[..],
            &["--output", &image_s, "--domain-xml", &xml_s],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = std::fs::read(&image).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(img[at..at + 4].try_into().unwrap());
    assert_eq!(&img[..16], b"LibvirtQemudSave");
    assert_eq!(u32_at(16), 2, "version");
    let data_len = u32_at(20) as usize;
    assert_eq!(u32_at(24), 1, "was_running");
    assert_eq!(u32_at(28), 0, "raw format");
    assert_eq!(u32_at(32), 0, "no cookie");
    let xml_end = 92 + domain.len();
    assert_eq!(&img[92..xml_end], domain.as_bytes());
    assert_eq!(img[xml_end], 0);
    assert!(data_len >= domain.len() + 1 + 64 * 1024, "{data_len}");
    assert!(img[xml_end..92 + data_len].iter().all(|&b| b == 0));
    // The stream after the header and data_len is QEMU's, byte for byte the plain export.
    assert_eq!(&img[92 + data_len..], &std::fs::read(&stream).unwrap()[..]);
    let p = restore(
        tmp.path(),
        &elf,
        &format!("exec:tail -c +{} {image_s}", 92 + data_len + 1),
        &want,
    );
    assert!(p >= in_replica, "{p} < {in_replica}");
}
