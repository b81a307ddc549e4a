//! The services API with a real gRPC client (tonic's, over the node's services socket): a service
//! registers with a running sidecar and a running backup and both list it in their status; it leaves
//! when its session ends; an unknown API version, a bad name, no hooks, a second session of the same
//! name and a session that does not start with a Register are each refused with the reason.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use endophyte_engine::services::pb;
use endophyte_engine::services::pb::services_client::ServicesClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn client(path: &Path) -> ServicesClient<tonic::transport::Channel> {
    endophyte_engine::services::grpc::connect(path)
        .await
        .unwrap()
}

fn register(version: u32, name: &str, hooks: &[pb::Hook]) -> pb::ServiceMessage {
    pb::ServiceMessage {
        msg: Some(pb::service_message::Msg::Register(pb::Register {
            api_version: version,
            name: name.into(),
            hooks: hooks.iter().map(|h| *h as i32).collect(),
        })),
    }
}

/// Opens a session whose first message is `first`; returns the sender (dropping it ends the
/// session) and the first answer, or the refusal.
async fn open(
    path: &Path,
    first: pb::ServiceMessage,
) -> Result<
    (
        mpsc::Sender<pb::ServiceMessage>,
        pb::Registered,
        tonic::Streaming<pb::NodeMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut c = client(path).await;
    let mut inbound = c.session(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.msg) {
        Some(pb::node_message::Msg::Registered(r)) => Ok((tx, r, inbound)),
        other => panic!("the first answer is not Registered: {other:?}"),
    }
}

fn services_in(ctl: &Path) -> Vec<serde_json::Value> {
    endophyte_engine::control::request(ctl, "GET", "/v1/status", None).unwrap()["services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn services_register_with_a_sidecar_and_a_backup_and_bad_registrations_are_refused() {
    if !kvm_available() {
        return;
    }
    let tmp0 = tempfile::tempdir().unwrap();
    let b_svc: PathBuf = tmp0.path().join("b1.services");
    let b_ctl: PathBuf = tmp0.path().join("b1.ctl");
    let b1_flags = [
        format!("--services-socket={}", b_svc.display()),
        format!("--control-socket={}", b_ctl.display()),
    ];
    let b1_flags: Vec<&str> = b1_flags.iter().map(String::as_str).collect();
    let OneBackup {
        tmp,
        certs,
        a1,
        sock,
        vmm: _vm,
        b1: _b1,
        ..
    } = one_backup(&b1_flags, "16MiB", "hotset:size=1M,rate=500");
    let ctl = tmp.path().join("sidecar.ctl");
    let svc = tmp.path().join("sidecar.services");
    let mut args = base_args(&sock, &certs, &tmp.path().join("hashes.jsonl"));
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        format!("--services-socket={}", svc.display()),
    ]);
    let sidecar = sidecar_start(&args);
    wait_path(&svc);
    wait_path(&b_svc);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A service and its twin register; both nodes list them.
    let hooks = [pb::Hook::Epoch, pb::Hook::Migration];
    let (keep, reg, _in) = rt
        .block_on(open(&svc, register(1, "kv-store", &hooks)))
        .unwrap();
    assert_eq!(
        (reg.node.as_str(), reg.vms.as_slice(), reg.api_version),
        ("primary", &["vm1".to_string()][..], 1)
    );
    let (keep_b, reg_b, _in_b) = rt
        .block_on(open(&b_svc, register(1, "kv-store", &[pb::Hook::Restore])))
        .unwrap();
    assert_eq!(reg_b.node, "b1");
    // The sidecar lists it beside its own console gate, an in-process service (API version 0).
    let s = services_in(&ctl);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0]["name"], "console");
    assert_eq!(s[0]["api_version"], 0);
    assert_eq!(s[1]["name"], "kv-store");
    assert_eq!(s[1]["hooks"], serde_json::json!(["epoch", "migration"]));
    let sb = services_in(&b_ctl);
    assert_eq!(sb[0]["hooks"], serde_json::json!(["restore"]), "{sb:?}");

    // Refusals, each with its reason.
    let refused = |first: pb::ServiceMessage| match rt.block_on(open(&svc, first)) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    let e = refused(register(2, "other", &hooks));
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("version 2") && e.message().contains("[1]"),
        "{e}"
    );
    let e = refused(register(1, "Bad Name", &hooks));
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = refused(register(1, "empty", &[]));
    assert!(e.message().contains("at least one hook"), "{e}");
    let e = refused(register(1, "kv-store", &hooks));
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    // A hook this node never calls: restores happen on backups.
    let e = refused(register(1, "twin", &[pb::Hook::Restore]));
    assert!(e.message().contains("restore is a backup's"), "{e}");
    let e = refused(pb::ServiceMessage {
        msg: Some(pb::service_message::Msg::Contribution(pb::Contribution {
            epoch: 1,
            data: vec![1],
            ..Default::default()
        })),
    });
    assert!(e.message().contains("must be a Register"), "{e}");
    assert_eq!(services_in(&ctl).len(), 2);

    // The service goes: its registration with it.
    drop((keep, _in));
    let t = Instant::now();
    while services_in(&ctl).iter().any(|s| s["name"] == "kv-store") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the service is still listed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((keep_b, _in_b));
    let report = sidecar_stop(sidecar);
    assert!(report["epochs"].as_u64() > Some(0), "{report}");
}
