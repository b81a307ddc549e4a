//! virt-launcher's side of the hook protocol, as KubeVirt's hook manager (`pkg/hooks/manager.go`)
//! behaves: poll the hook directory's subdirectories every 300 ms for sockets (skipping deeper
//! directories), dial each, call `Info` with a 1 s deadline, use the highest Callbacks version it lists
//! of v1alpha3, v1alpha2 and v1alpha1, then call `OnDefineDomain` and `Shutdown` with a 1 minute
//! deadline. Also the plugin's `MutateDomain`. The tests drive the hook with it; an operator can too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::{info, plugins_v1alpha1 as plugins, v1alpha1, v1alpha2, v1alpha3};

/// How often the directory is polled.
pub const POLL: Duration = Duration::from_millis(300);
/// The `Info` deadline.
pub const INFO_DEADLINE: Duration = Duration::from_secs(1);
/// The deadline of every callback.
pub const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// A collected hook: where it listens and what it said.
#[derive(Clone, Debug)]
pub struct Collected {
    /// Its socket.
    pub socket: PathBuf,
    /// The Callbacks version used.
    pub version: String,
    /// Its `Info` answer.
    pub info: info::InfoResult,
}

/// Connects a gRPC channel to the Unix socket `path`.
///
/// # Errors
/// The socket cannot be reached.
pub async fn dial(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is not used: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(1))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
}

/// Polls `dir` (virt-launcher's `/var/run/kubevirt-hooks`) until `count` hooks answered `Info`, or
/// `timeout`.
///
/// # Errors
/// A hook's `Info` failed or listed no supported version (virt-launcher then fails the VM), or fewer
/// than `count` hooks answered in time.
pub async fn collect(
    dir: &Path,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Collected>> {
    let start = Instant::now();
    let mut found: Vec<Collected> = vec![];
    loop {
        for sub in std::fs::read_dir(dir)?.flatten() {
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(sub.path())?.flatten() {
                if e.file_type()?.is_dir() {
                    continue;
                }
                // Sockets are told apart by file name across sidecars.
                if found
                    .iter()
                    .any(|c| c.socket.file_name() == Some(&e.file_name()))
                {
                    continue;
                }
                let Ok(ch) = dial(&e.path()).await else {
                    continue; // Not ready yet.
                };
                let mut c = info::info_client::InfoClient::new(ch);
                let mut req = tonic::Request::new(info::InfoParams {});
                req.set_timeout(INFO_DEADLINE);
                let info = c.info(req).await?.into_inner();
                let version = ["v1alpha3", "v1alpha2", "v1alpha1"]
                    .into_iter()
                    .find(|v| info.versions.iter().any(|x| x == v))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "hook {} lists no supported version: {:?}",
                            e.path().display(),
                            info.versions
                        )
                    })?;
                found.push(Collected {
                    socket: e.path(),
                    version: version.into(),
                    info,
                });
            }
        }
        if found.len() >= count {
            return Ok(found);
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "{} of {count} hook sockets answered within {timeout:?}",
                found.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn deadline<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(CALL_DEADLINE);
    r
}

impl Collected {
    /// Whether it subscribed to hook point `name`.
    pub fn subscribes(&self, name: &str) -> bool {
        self.info.hook_points.iter().any(|p| p.name == name)
    }

    /// `OnDefineDomain` with the version collected: the domain XML to define.
    ///
    /// # Errors
    /// The call's status.
    pub async fn on_define_domain(&self, xml: &[u8], vmi: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        self.on_define_domain_as(&self.version, xml, vmi).await
    }

    /// `OnDefineDomain` of Callbacks version `version`.
    ///
    /// # Errors
    /// The call's status (`Unimplemented` for an unknown version).
    pub async fn on_define_domain_as(
        &self,
        version: &str,
        xml: &[u8],
        vmi: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        let ch = dial(&self.socket)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (domain_xml, vmi) = (xml.to_vec(), vmi.to_vec());
        Ok(match version {
            "v1alpha1" => {
                v1alpha1::callbacks_client::CallbacksClient::new(ch)
                    .on_define_domain(deadline(v1alpha1::OnDefineDomainParams { domain_xml, vmi }))
                    .await?
                    .into_inner()
                    .domain_xml
            }
            "v1alpha2" => {
                v1alpha2::callbacks_client::CallbacksClient::new(ch)
                    .on_define_domain(deadline(v1alpha2::OnDefineDomainParams { domain_xml, vmi }))
                    .await?
                    .into_inner()
                    .domain_xml
            }
            "v1alpha3" => {
                v1alpha3::callbacks_client::CallbacksClient::new(ch)
                    .on_define_domain(deadline(v1alpha3::OnDefineDomainParams { domain_xml, vmi }))
                    .await?
                    .into_inner()
                    .domain_xml
            }
            v => return Err(tonic::Status::unimplemented(format!("version {v}"))),
        })
    }

    /// v1alpha3 `PreCloudInitIso`: the cloud-init data (JSON) back.
    ///
    /// # Errors
    /// The call's status.
    pub async fn pre_cloud_init_iso(
        &self,
        cloud_init_data: &[u8],
        vmi: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        let ch = dial(&self.socket)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(v1alpha3::callbacks_client::CallbacksClient::new(ch)
            .pre_cloud_init_iso(deadline(v1alpha3::PreCloudInitIsoParams {
                cloud_init_no_cloud_source: vec![],
                vmi: vmi.to_vec(),
                cloud_init_data: cloud_init_data.to_vec(),
            }))
            .await?
            .into_inner()
            .cloud_init_data)
    }

    /// v1alpha3 `Shutdown`.
    ///
    /// # Errors
    /// The call's status.
    pub async fn shutdown(&self) -> Result<(), tonic::Status> {
        let ch = dial(&self.socket)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        v1alpha3::callbacks_client::CallbacksClient::new(ch)
            .shutdown(deadline(v1alpha3::ShutdownParams {}))
            .await?;
        Ok(())
    }
}

/// The plugin's `MutateDomain` on `socket`, as virt-launcher calls it (domain type `libvirt`).
///
/// # Errors
/// The socket cannot be reached, or the call's status.
pub async fn mutate_domain(
    socket: &Path,
    xml: &[u8],
    vmi: &[u8],
    invocation_context: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let ch = dial(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(
        plugins::domain_hook_service_client::DomainHookServiceClient::new(ch)
            .mutate_domain(deadline(plugins::MutateDomainRequest {
                domain_type: "libvirt".into(),
                domain: xml.to_vec(),
                vmi: vmi.to_vec(),
                sidecar_context: Some(plugins::SidecarContext {
                    invocation_context: invocation_context.into(),
                }),
            }))
            .await?
            .into_inner()
            .domain,
    )
}
