//! What the hook reads from the VirtualMachineInstance (the JSON virt-launcher passes with each call):
//! the VM's name and namespace and the `endophyte.io/*` annotations that say where and how to replicate
//! it. KubeVirt copies a VirtualMachine's `spec.template.metadata.annotations` onto its VMIs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use endophyte_engine::config::BackupSpec;
use serde::Deserialize;

/// `;`-separated backups, each in `endophyte sidecar --backup` form:
/// `name=NODE,addr=IP:PORT[,paths=N][,via=RELAY+RELAY]`.
pub const BACKUPS: &str = "endophyte.io/backups";
/// The VM's name in the Endophyte network (default `vm-<uid>`: the UID of the VirtualMachine that owns
/// the VMI, stable across its restarts, or the VMI's own for a VMI without one). Names built from
/// namespace and name collide (`team-a/db` and `team/a-db` both read `team-a-db`); UIDs do not.
pub const VM_ID: &str = "endophyte.io/vm-id";
/// The node name whose certificate the sidecar presents (default: the VM id).
pub const NODE: &str = "endophyte.io/node";
/// A TOML file of sidecar settings inside the hook container (e.g. from a ConfigMap); the annotations
/// override it.
pub const CONFIG: &str = "endophyte.io/config";
/// More `endophyte sidecar` flags, shell-quoted (e.g. `--quorum 1 --max-bandwidth 100MB/s`).
pub const SIDECAR_ARGS: &str = "endophyte.io/sidecar-args";

/// Flags the hook sets itself, which [`SIDECAR_ARGS`] may not carry.
const RESERVED: &[&str] = &[
    "--qmp",
    "--attach-socket",
    "--vm-id",
    "--node",
    "--certs",
    "--control-socket",
    "--backup",
    "--config",
    // Fencing is the operator's, not the VM owner's: annotations cannot switch it off or pick a
    // generation.
    "--self-fence",
    "--fence-after-ms",
    "--generation",
    "--guard-ms",
    "--etcd",
    "--authority-ttl-ms",
];

/// Why a VMI cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum VmiError {
    /// The bytes are not a VMI object.
    #[error("the VMI is not valid JSON of a VirtualMachineInstance: {0}")]
    Json(#[from] serde_json::Error),
    /// The VMI has neither backups nor a configuration file.
    #[error(
        "the VMI has no {BACKUPS} annotation (nor {CONFIG}): there is nowhere to replicate it"
    )]
    NoBackups,
    /// A backup entry does not parse.
    #[error("annotation {BACKUPS}: {0}")]
    BadBackup(String),
    /// The extra flags do not split or carry a reserved flag.
    #[error("annotation {SIDECAR_ARGS}: {0}")]
    BadArgs(String),
    /// Neither the VMI nor its owner has a UID, and no [`VM_ID`] annotation names the VM.
    #[error("the VMI has no metadata.uid (nor an owning VirtualMachine's): give the VM an {VM_ID} annotation")]
    NoUid,
    /// An annotation's value is empty or unusable as a name.
    #[error("annotation {key}: {value:?} is not a name (letters, digits, '-', '_', '.')")]
    BadName {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

#[derive(Deserialize)]
struct Vmi {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default, rename = "ownerReferences")]
    owners: Vec<Owner>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Owner {
    kind: String,
    uid: String,
}

/// How one VM is replicated: the sidecar's identity, backups and extra flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The VM id (`--vm-id`).
    pub vm_id: String,
    /// The node name (`--node`).
    pub node: String,
    /// The backups (`--backup`, each checked by the sidecar's own parser).
    pub backups: Vec<String>,
    /// A TOML settings file (`--config`).
    pub config: Option<PathBuf>,
    /// More flags, split.
    pub args: Vec<String>,
}

impl Attachment {
    /// Reads the attachment from a VMI's JSON.
    ///
    /// # Errors
    /// [`VmiError`] naming the field or annotation at fault.
    pub fn from_vmi(json: &[u8]) -> Result<Self, VmiError> {
        let vmi: Vmi = serde_json::from_slice(json)?;
        let m = vmi.metadata;
        let a = &m.annotations;
        let vm_id = match a.get(VM_ID) {
            Some(v) => name(VM_ID, v)?,
            None => {
                let uid = m
                    .owners
                    .iter()
                    .find(|o| o.kind == "VirtualMachine")
                    .map(|o| o.uid.as_str())
                    .or(m.uid.as_deref())
                    .ok_or(VmiError::NoUid)?;
                name("metadata.uid", &format!("vm-{uid}"))?
            }
        };
        let node = match a.get(NODE) {
            Some(v) => name(NODE, v)?,
            None => vm_id.clone(),
        };
        let backups: Vec<String> = a
            .get(BACKUPS)
            .map(|v| {
                v.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        for b in &backups {
            BackupSpec::parse(b).map_err(VmiError::BadBackup)?;
        }
        let config = a.get(CONFIG).map(PathBuf::from);
        if backups.is_empty() && config.is_none() {
            return Err(VmiError::NoBackups);
        }
        let args = match a.get(SIDECAR_ARGS) {
            Some(v) => shell_words::split(v).map_err(|e| VmiError::BadArgs(e.to_string()))?,
            None => vec![],
        };
        if let Some(bad) = args.iter().find(|f| {
            RESERVED
                .iter()
                .any(|r| *f == r || f.starts_with(&format!("{r}=")))
        }) {
            return Err(VmiError::BadArgs(format!(
                "{bad} is set by the hook itself"
            )));
        }
        Ok(Self {
            vm_id,
            node,
            backups,
            config,
            args,
        })
    }
}

fn name(key: &'static str, v: &str) -> Result<String, VmiError> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(VmiError::BadName {
            key,
            value: v.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(annotations: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": "db",
                "namespace": "prod",
                "uid": "1f2e3d4c-0000-4000-8000-00000000aaaa",
                "ownerReferences": [{"kind": "VirtualMachine", "name": "db", "uid": "9a8b7c6d-0000-4000-8000-00000000bbbb"}],
                "annotations": annotations
            },
            "spec": {"domain": {"devices": {}}}
        }))
        .unwrap()
    }

    #[test]
    fn annotations_become_the_sidecars_settings() {
        let a = Attachment::from_vmi(&vmi(serde_json::json!({
            BACKUPS: "name=b1,addr=10.0.0.5:7400; name=b2,addr=10.0.0.6:7400,paths=2",
            SIDECAR_ARGS: "--quorum 1 --max-bandwidth '100MB/s'",
        })))
        .unwrap();
        // The owning VirtualMachine's UID: stable across the VMI's restarts, unique across namespaces.
        assert_eq!(a.vm_id, "vm-9a8b7c6d-0000-4000-8000-00000000bbbb");
        assert_eq!(a.node, a.vm_id);
        assert_eq!(a.backups.len(), 2);
        assert_eq!(a.args, ["--quorum", "1", "--max-bandwidth", "100MB/s"]);
    }

    #[test]
    fn bad_annotations_are_named() {
        let e = |v| Attachment::from_vmi(&vmi(v)).unwrap_err().to_string();
        assert!(e(serde_json::json!({})).contains(BACKUPS));
        let bad = e(serde_json::json!({BACKUPS: "name=b1,addr=nowhere"}));
        assert!(bad.contains(BACKUPS) && bad.contains("nowhere"), "{bad}");
        let bad =
            e(serde_json::json!({BACKUPS: "name=b1,addr=10.0.0.5:1", SIDECAR_ARGS: "--qmp /x"}));
        assert!(bad.contains("--qmp"), "{bad}");
        for flag in [
            "--self-fence off",
            "--generation 9",
            "--etcd=http://x:1",
            "--guard-ms 100000",
        ] {
            let bad =
                e(serde_json::json!({BACKUPS: "name=b1,addr=10.0.0.5:1", SIDECAR_ARGS: flag}));
            assert!(bad.contains("set by the hook"), "{flag}: {bad}");
        }
        let no_uid = Attachment::from_vmi(
            &serde_json::to_vec(&serde_json::json!({
                "metadata": {"name": "db", "annotations": {BACKUPS: "name=b1,addr=10.0.0.5:1"}}
            }))
            .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(no_uid.contains("uid") && no_uid.contains(VM_ID), "{no_uid}");
        let bad = e(serde_json::json!({BACKUPS: "name=b1,addr=10.0.0.5:1", VM_ID: "a/b"}));
        assert!(bad.contains(VM_ID), "{bad}");
        let bad = Attachment::from_vmi(b"{\"kind\": 1}")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("VirtualMachineInstance"), "{bad}");
    }
}
