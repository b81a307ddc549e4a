//! KubeVirt integration: the hook sidecar and plugin servers that attach an Endophyte sidecar to a VM.
//!
//! Empty on purpose for now: it needs the sidecar's replication and migration first.
