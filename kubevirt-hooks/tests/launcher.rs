//! The hook binary driven the way virt-launcher drives hook sidecars (the crate's `collector`, after
//! KubeVirt's `pkg/hooks/manager.go`): its socket appears at start, only it is collected (not the
//! sockets in its private subdirectory), Info lists the three Callbacks versions, every version's
//! OnDefineDomain returns the mutated domain with the monitor at the compute container's path, bad
//! input gets InvalidArgument naming the problem, PreCloudInitIso returns its input, Shutdown and
//! SIGTERM end it cleanly. The plugin binary mode answers MutateDomain.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_kubevirt_hooks::collector::{self, Collected};
use endophyte_kubevirt_hooks::domain::monitor_args;

const HOOK: &str = env!("CARGO_BIN_EXE_endophyte-kubevirt-hook");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join(name),
    )
    .unwrap()
}

struct Hook(Child);

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Hook {
    Hook(
        Command::new(HOOK)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("CONTAINER_NAME")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_for(p: &Path) -> Duration {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sigterm(h: &mut Hook) -> std::process::ExitStatus {
    // SAFETY: kill(2) on the pid of a child we own and have not yet reaped.
    unsafe { libc::kill(h.0.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(s) = h.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "the hook did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_hook_answers_virt_launcher_in_every_version() {
    let tmp = tempfile::tempdir().unwrap();
    // virt-launcher's /var/run/kubevirt-hooks; the sidecar container's emptyDir is its hook-sidecar-0.
    let hooks = tmp.path().join("hooks");
    let mine = hooks.join("hook-sidecar-0");
    let compute = PathBuf::from("/var/run/kubevirt-hooks/hook-sidecar-0");
    let mut hook = start(&[
        "--socket-dir",
        &mine.display().to_string(),
        "--compute-dir",
        &compute.display().to_string(),
        "--qemu-uid",
        &own_uid(),
    ]);
    let appeared = wait_for(&mine.join("endophyte.sock"));
    eprintln!("the hook socket appeared {appeared:?} after the start");
    // A socket that is not gRPC, in the private directory: a collector that dialed it would fail.
    let _decoy = UnixListener::bind(mine.join("endophyte").join("not-grpc.sock")).unwrap();

    let rt = rt();
    let found: Vec<Collected> = rt
        .block_on(collector::collect(&hooks, 1, Duration::from_secs(10)))
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let c = &found[0];
    assert_eq!(c.socket, mine.join("endophyte.sock"));
    assert_eq!(c.info.name, "endophyte");
    assert_eq!(c.version, "v1alpha3");
    for v in ["v1alpha1", "v1alpha2", "v1alpha3"] {
        assert!(
            c.info.versions.iter().any(|x| x == v),
            "{:?}",
            c.info.versions
        );
    }
    assert!(c.subscribes("OnDefineDomain") && c.subscribes("Shutdown"));

    let xml = fixture("domains/kubevirt-containerdisk.xml");
    let vmi = fixture("vmi.json");
    let qmp = compute.join("endophyte/qmp.sock").display().to_string();
    let mut results = vec![];
    for v in ["v1alpha1", "v1alpha2", "v1alpha3"] {
        let out = rt.block_on(c.on_define_domain_as(v, &xml, &vmi)).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        for a in monitor_args(&qmp) {
            assert!(
                text.contains(&format!("<qemu:arg value=\"{a}\"/>")),
                "{v}: {text}"
            );
        }
        results.push(out);
    }
    assert!(
        results.windows(2).all(|w| w[0] == w[1]),
        "versions disagree"
    );
    // A second define of the defined domain changes nothing more.
    let again = rt.block_on(c.on_define_domain(&results[0], &vmi)).unwrap();
    assert_eq!(again, results[0]);

    let t = Instant::now();
    let e = rt
        .block_on(c.on_define_domain(b"<domain><name>x</domain>", &vmi))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("malformed at byte"), "{}", e.message());
    let e = rt
        .block_on(c.on_define_domain(&xml, b"{\"metadata\": 3}"))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("VirtualMachineInstance"),
        "{}",
        e.message()
    );
    let no_backups = br#"{"metadata": {"name": "a", "namespace": "b", "uid": "6d1c0e4e-9b1a-4c57-a1b7-3f8a0e1b2c3d"}}"#;
    let e = rt
        .block_on(c.on_define_domain(&xml, no_backups))
        .unwrap_err();
    assert!(
        e.message().contains("endophyte.io/backups"),
        "{}",
        e.message()
    );
    eprintln!("three refusals took {:?}", t.elapsed());

    let cloud = br#"{"dataSource": "NoCloud", "userData": "\#cloud-config\n"}"#;
    assert_eq!(
        rt.block_on(c.pre_cloud_init_iso(cloud, &vmi)).unwrap(),
        cloud
    );
    // QEMU never opened the monitor here, so there is no sidecar to stop.
    rt.block_on(c.shutdown()).unwrap();

    assert!(sigterm(&mut hook).success());
    assert!(
        !mine.join("endophyte.sock").exists(),
        "the socket outlived the hook"
    );
}

#[test]
fn the_plugin_mutates_the_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kubevirt-plugin/endophyte");
    let mut hook = start(&[
        "--plugin",
        "--socket-dir",
        &dir.display().to_string(),
        "--qemu-uid",
        &own_uid(),
    ]);
    let sock = dir.join("endophyte.sock");
    wait_for(&sock);
    let rt = rt();
    let xml = fixture("domains/libvirt-plain.xml");
    let vmi = fixture("vmi.json");
    let out = rt
        .block_on(collector::mutate_domain(&sock, &xml, &vmi, "Boot"))
        .unwrap();
    let qmp = dir.join("endophyte/qmp.sock").display().to_string();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(&monitor_args(&qmp)[1]), "{text}");
    assert!(text.contains("xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\""));
    let e = rt
        .block_on(collector::mutate_domain(&sock, b"<vm/>", &vmi, "Boot"))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("<vm>"), "{}", e.message());
    assert!(sigterm(&mut hook).success());
}

/// This process's own uid: the private directory stays this test's to clean up.
fn own_uid() -> String {
    // SAFETY: getuid(2) has no preconditions.
    unsafe { libc::getuid() }.to_string()
}
