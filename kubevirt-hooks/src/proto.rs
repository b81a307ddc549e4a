//! KubeVirt's hook and plugin gRPC messages and services, generated from `proto/` (written for this
//! project from KubeVirt's published package, message and field numbers).
#![allow(missing_docs, clippy::all)]

/// `kubevirt.hooks.info`: discovery.
pub mod info {
    tonic::include_proto!("kubevirt.hooks.info");
}
/// `kubevirt.hooks.v1alpha1`: OnDefineDomain.
pub mod v1alpha1 {
    tonic::include_proto!("kubevirt.hooks.v1alpha1");
}
/// `kubevirt.hooks.v1alpha2`: OnDefineDomain, PreCloudInitIso.
pub mod v1alpha2 {
    tonic::include_proto!("kubevirt.hooks.v1alpha2");
}
/// `kubevirt.hooks.v1alpha3`: OnDefineDomain, PreCloudInitIso, Shutdown.
pub mod v1alpha3 {
    tonic::include_proto!("kubevirt.hooks.v1alpha3");
}
/// `kubevirt.hooks.plugins.v1alpha1`: the plugin's DomainHookService.
pub mod plugins_v1alpha1 {
    tonic::include_proto!("kubevirt.hooks.plugins.v1alpha1");
}
