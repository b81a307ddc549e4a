//! The deployment manifests (`manifests/`): rendered by kubectl's own kustomize where kubectl is
//! installed (offline; no cluster can run here), every document a Kubernetes object with a DNS-1123
//! name, the workloads' selectors matching their pods and their mounts naming volumes, and the
//! Endophyte parts read by the code that will read them in a cluster: the VM's annotations by the hook's
//! own VMI reader, its hookSidecars entry by KubeVirt's field set, the Plugin's socket as the plugin
//! serves it, the image's binaries as the manifests call them.

use std::path::{Path, PathBuf};
use std::process::Command;

use endophyte_kubevirt_hooks::server::{PLUGIN_DIR, SOCKET};
use endophyte_kubevirt_hooks::vmi::Attachment;
use serde::Deserialize;
use serde_yaml::Value;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// The documents the kustomization lists, with certificates made for its secret generator.
fn documents() -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(manifests()).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let kust: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let certs = dir.join("certs");
    endophyte_engine::tls::init_network(&certs, "example").unwrap();
    for g in kust["secretGenerator"].as_sequence().unwrap() {
        for f in g["files"].as_sequence().unwrap() {
            let f = f.as_str().unwrap();
            if let Some(node) = f
                .strip_prefix("certs/")
                .and_then(|n| n.strip_suffix(".pem"))
            {
                if node != "ca" {
                    endophyte_engine::tls::issue_node(&certs, node).unwrap();
                }
            }
            assert!(dir.join(f).exists(), "the secret generator's {f}");
        }
    }
    let text = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8(o.stdout).unwrap()
        }
        Err(_) => {
            eprintln!("kubectl is not installed: reading the kustomization's resources directly");
            kust["resources"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|r| std::fs::read_to_string(dir.join(r.as_str().unwrap())).unwrap())
                .collect::<Vec<_>>()
                .join("\n---\n")
        }
    };
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn dns1123(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[test]
fn every_document_is_a_named_kubernetes_object() {
    let docs = documents();
    assert!(docs.len() >= 12, "{} documents", docs.len());
    for d in &docs {
        let kind = d["kind"].as_str().expect("kind");
        assert!(
            d["apiVersion"].as_str().is_some_and(|v| !v.is_empty()),
            "{kind}"
        );
        let name = d["metadata"]["name"].as_str().expect("metadata.name");
        assert!(dns1123(name), "{kind} {name}");
    }
}

#[test]
fn workloads_select_their_pods_and_mount_their_volumes() {
    let docs = documents();
    let sts = find(&docs, "StatefulSet", "endophyte-backup");
    let pod = &sts["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in sts["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "selector {k:?}");
    }
    let mut volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for t in sts["spec"]["volumeClaimTemplates"].as_sequence().unwrap() {
        volumes.push(t["metadata"]["name"].as_str().unwrap());
    }
    for c in pod["spec"]["containers"].as_sequence().unwrap() {
        for m in c["volumeMounts"].as_sequence().unwrap() {
            assert!(volumes.contains(&m["name"].as_str().unwrap()), "{m:?}");
        }
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "backup");
        assert!(args.contains(&"--certs=/etc/endophyte/certs"));
    }
    let secret = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .unwrap();
    find(&docs, "Secret", secret);
    let headless = find(&docs, "Service", "endophyte-backup");
    assert_eq!(
        headless["spec"]["selector"]["app.kubernetes.io/name"],
        "endophyte-backup"
    );
    assert_eq!(sts["spec"]["serviceName"], "endophyte-backup");
}

/// KubeVirt's hook sidecar entry (`pkg/hooks/hooks.go` `HookSidecar`): nothing else is read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct HookSidecar {
    image: String,
    #[serde(default)]
    image_pull_policy: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    config_map: Option<serde_json::Value>,
    #[serde(default)]
    pvc: Option<Pvc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Pvc {
    name: String,
    volume_path: String,
    #[allow(dead_code)]
    shared_compute_path: String,
}

#[test]
fn the_vm_and_the_plugin_say_what_the_hook_reads() {
    let docs = documents();
    let vm = find(&docs, "VirtualMachine", "vm-fedora");
    let meta = &vm["spec"]["template"]["metadata"];
    let annotations = &meta["annotations"];
    // The VMI virt-launcher passes carries the template's annotations.
    let vmi = serde_json::json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm-fedora", "namespace": vm["metadata"]["namespace"].as_str().unwrap(),
                     "uid": "2b7e1f0a-5c3d-4e8f-9a6b-1c2d3e4f5a6b",
                     "annotations": serde_json::to_value(annotations).unwrap()},
    });
    let a = Attachment::from_vmi(&serde_json::to_vec(&vmi).unwrap()).unwrap();
    assert_eq!(a.backups.len(), 2);
    // Its node certificate is in the namespace's Secret.
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["namespace"] == "default")
        .unwrap();
    assert!(
        secret["data"].get(format!("{}.pem", a.node)).is_some(),
        "no certificate for {}",
        a.node
    );
    let hooks: Vec<HookSidecar> = serde_json::from_str(
        annotations["hooks.kubevirt.io/hookSidecars"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(hooks.len(), 1);
    let containerfile = std::fs::read_to_string(manifests().join("../Containerfile")).unwrap();
    assert!(
        containerfile.contains(&hooks[0].command[0]),
        "{} is not installed by the Containerfile",
        hooks[0].command[0]
    );
    let pvc = hooks[0].pvc.as_ref().unwrap();
    let certs = hooks[0].args.iter().position(|x| x == "--certs").unwrap();
    assert_eq!(hooks[0].args[certs + 1], pvc.volume_path);
    find(&docs, "PersistentVolumeClaim", &pvc.name);

    let plugin = find(&docs, "Plugin", "endophyte");
    assert_eq!(plugin["apiVersion"], "plugin.kubevirt.io/v1alpha1");
    let socket = plugin["spec"]["domainHooks"][0]["sidecar"]["socketPath"]
        .as_str()
        .unwrap();
    assert_eq!(socket, format!("{PLUGIN_DIR}/{SOCKET}"));
    let map = plugin["spec"]["mutatingAdmissionPolicies"][0]["name"]
        .as_str()
        .unwrap();
    let policy = find(&docs, "MutatingAdmissionPolicy", map);
    let patch = policy["spec"]["mutations"][0]["jsonPatch"]["expression"]
        .as_str()
        .unwrap();
    assert!(patch.contains("--plugin") && patch.contains(&hooks[0].command[0]));
    assert!(
        patch.contains(&format!("mountPath: \"{PLUGIN_DIR}/\"")),
        "{patch}"
    );
    let binding = find(&docs, "MutatingAdmissionPolicyBinding", map);
    assert_eq!(binding["spec"]["policyName"], map);

    let kv = find(&docs, "KubeVirt", "kubevirt");
    let gates = &kv["spec"]["configuration"]["developerConfiguration"]["featureGates"];
    assert!(gates.as_sequence().unwrap().iter().any(|g| g == "Sidecar"));
}
