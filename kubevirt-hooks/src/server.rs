//! The gRPC services virt-launcher calls: `kubevirt.hooks.info.Info` and the hook `Callbacks` of
//! v1alpha1, v1alpha2 and v1alpha3 (the hook sidecar), or the plugin's
//! `kubevirt.hooks.plugins.v1alpha1.DomainHookService` (VEP-190). Each define mutates the domain
//! ([`crate::domain`]) and hands the VM's settings ([`crate::vmi`]) to the [`Supervisor`]; a domain or VMI
//! that cannot be read gets `InvalidArgument` naming what is wrong.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain;
use crate::proto::{info, plugins_v1alpha1 as plugins, v1alpha1, v1alpha2, v1alpha3};
use crate::supervisor::Supervisor;
use crate::vmi::Attachment;

/// KubeVirt's hook socket directory inside a hook sidecar container (`pkg/hooks/hooks.go`).
pub const HOOKS_DIR: &str = "/var/run/kubevirt-hooks";
/// The plugin's socket directory (VEP-190: `/var/run/kubevirt-plugin/<plugin>/`).
pub const PLUGIN_DIR: &str = "/var/run/kubevirt-plugin/endophyte";
/// The gRPC socket's file name (virt-launcher dedupes sockets by name across sidecars: unique).
pub const SOCKET: &str = "endophyte.sock";
/// The private subdirectory, which virt-launcher's collector skips, for every other socket.
pub const PRIVATE: &str = "endophyte";
/// The name `Info` reports, which virt-launcher logs.
pub const HOOK_NAME: &str = "endophyte";
/// The Callbacks versions served, oldest first.
pub const VERSIONS: [&str; 3] = ["v1alpha1", "v1alpha2", "v1alpha3"];

/// What every service shares: the monitor path to add (as QEMU sees it) and the supervisor.
#[derive(Clone)]
pub struct Hook {
    /// The monitor socket path written into the domain, as the compute container (QEMU) sees it.
    pub qmp_for_qemu: String,
    /// Runs the sidecar.
    pub supervisor: Arc<Supervisor>,
}

impl Hook {
    /// One define: the mutated domain XML.
    ///
    /// # Errors
    /// `InvalidArgument` for a domain or VMI that cannot be read or settings that cannot be used.
    pub fn define(&self, xml: &[u8], vmi: &[u8]) -> Result<Vec<u8>, Status> {
        let a = Attachment::from_vmi(vmi).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let m = domain::add_monitor(xml, &self.qmp_for_qemu)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(vm = %a.vm_id, changed = m.changed, monitor = %self.qmp_for_qemu, "domain defined");
        self.supervisor.attach(a);
        Ok(m.xml)
    }
}

#[tonic::async_trait]
impl info::info_server::Info for Hook {
    async fn info(
        &self,
        _: Request<info::InfoParams>,
    ) -> Result<Response<info::InfoResult>, Status> {
        let point = |name: &str| info::HookPoint {
            name: name.into(),
            priority: 0,
        };
        Ok(Response::new(info::InfoResult {
            name: HOOK_NAME.into(),
            hook_points: vec![point("OnDefineDomain"), point("Shutdown")],
            versions: VERSIONS.map(String::from).to_vec(),
        }))
    }
}

#[tonic::async_trait]
impl v1alpha1::callbacks_server::Callbacks for Hook {
    async fn on_define_domain(
        &self,
        r: Request<v1alpha1::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha1::OnDefineDomainResult>, Status> {
        let p = r.into_inner();
        Ok(Response::new(v1alpha1::OnDefineDomainResult {
            domain_xml: self.define(&p.domain_xml, &p.vmi)?,
        }))
    }
}

#[tonic::async_trait]
impl v1alpha2::callbacks_server::Callbacks for Hook {
    async fn on_define_domain(
        &self,
        r: Request<v1alpha2::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha2::OnDefineDomainResult>, Status> {
        let p = r.into_inner();
        Ok(Response::new(v1alpha2::OnDefineDomainResult {
            domain_xml: self.define(&p.domain_xml, &p.vmi)?,
        }))
    }

    async fn pre_cloud_init_iso(
        &self,
        r: Request<v1alpha2::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha2::PreCloudInitIsoResult>, Status> {
        let p = r.into_inner();
        Ok(Response::new(v1alpha2::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
            cloud_init_data: p.cloud_init_data,
        }))
    }
}

#[tonic::async_trait]
impl v1alpha3::callbacks_server::Callbacks for Hook {
    async fn on_define_domain(
        &self,
        r: Request<v1alpha3::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha3::OnDefineDomainResult>, Status> {
        let p = r.into_inner();
        Ok(Response::new(v1alpha3::OnDefineDomainResult {
            domain_xml: self.define(&p.domain_xml, &p.vmi)?,
        }))
    }

    async fn pre_cloud_init_iso(
        &self,
        r: Request<v1alpha3::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha3::PreCloudInitIsoResult>, Status> {
        let p = r.into_inner();
        Ok(Response::new(v1alpha3::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
            cloud_init_data: p.cloud_init_data,
        }))
    }

    async fn shutdown(
        &self,
        _: Request<v1alpha3::ShutdownParams>,
    ) -> Result<Response<v1alpha3::ShutdownResult>, Status> {
        tracing::info!("Shutdown: stopping replication");
        self.supervisor.shutdown().await;
        Ok(Response::new(v1alpha3::ShutdownResult {}))
    }
}

#[tonic::async_trait]
impl plugins::domain_hook_service_server::DomainHookService for Hook {
    async fn mutate_domain(
        &self,
        r: Request<plugins::MutateDomainRequest>,
    ) -> Result<Response<plugins::MutateDomainResponse>, Status> {
        let p = r.into_inner();
        if p.domain_type != "libvirt" {
            return Err(Status::invalid_argument(format!(
                "domain_type {:?}: only \"libvirt\" domains can be mutated",
                p.domain_type
            )));
        }
        let context = p.sidecar_context.map(|c| c.invocation_context);
        tracing::info!(?context, "MutateDomain");
        Ok(Response::new(plugins::MutateDomainResponse {
            domain: self.define(&p.domain, &p.vmi)?,
        }))
    }
}
