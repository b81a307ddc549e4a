//! The services API's server side: one [`pb::services_server::Services`] per node, serving sessions
//! on the node's services socket (a Unix socket, mode 0600, bound by [`crate::control::bind_unix`]).

use std::path::PathBuf;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{ServiceRegistry, API_VERSIONS};

/// The code generated from `proto/services_v1.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("endophyte.services.v1");
}

use pb::service_message::Msg;

/// The node's side of every session.
#[derive(Clone)]
pub struct ServicesServer {
    registry: ServiceRegistry,
    node: String,
    vms: VmList,
    role: NodeRole,
}

/// Which hooks a node serves: a sidecar asks for contributions and runs migrations; a backup
/// restores. A Register for a hook the node never calls is refused rather than left silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRole {
    /// `HOOK_EPOCH` and `HOOK_MIGRATION`.
    Sidecar,
    /// `HOOK_RESTORE`.
    Backup,
}

impl NodeRole {
    fn serves(self, h: pb::Hook) -> bool {
        match self {
            NodeRole::Sidecar => matches!(h, pb::Hook::Epoch | pb::Hook::Migration),
            NodeRole::Backup => h == pb::Hook::Restore,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NodeRole::Sidecar => {
                "a sidecar serves the epoch and migration hooks (restore is a backup's)"
            }
            NodeRole::Backup => {
                "a backup serves the restore hook (epoch and migration are a sidecar's)"
            }
        }
    }
}

/// The VMs a node serves services for, read at each registration (a backup's replicas come and go).
pub type VmList = std::sync::Arc<dyn Fn() -> Vec<String> + Send + Sync>;

impl ServicesServer {
    /// A server for node `node` in `role`, which serves services for the VMs `vms` lists,
    /// registering into `registry`.
    pub fn new(registry: ServiceRegistry, node: String, vms: VmList, role: NodeRole) -> Self {
        Self {
            registry,
            node,
            vms,
            role,
        }
    }
}

/// Checks a Register: a served version, a name of `[a-z0-9][a-z0-9-]{0,62}`, at least one known hook.
///
/// # Errors
/// `FAILED_PRECONDITION` for a version this node does not serve (naming those it does),
/// `INVALID_ARGUMENT` for a bad name or hooks.
pub fn check_register(r: &pb::Register) -> Result<Vec<pb::Hook>, Status> {
    if !API_VERSIONS.contains(&r.api_version) {
        return Err(Status::failed_precondition(format!(
            "services API version {} is not served here: this node serves {:?}",
            r.api_version, API_VERSIONS
        )));
    }
    if !endophyte_wire::contrib::valid_name(r.name.as_bytes()) {
        return Err(Status::invalid_argument(format!(
            "service name {:?} must match [a-z0-9][a-z0-9-]{{0,62}}",
            r.name
        )));
    }
    let mut hooks = vec![];
    for &h in &r.hooks {
        match pb::Hook::try_from(h) {
            Ok(pb::Hook::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "hook {h} is not one of epoch (1), migration (2), restore (3)"
                )))
            }
            Ok(h) if !hooks.contains(&h) => hooks.push(h),
            Ok(_) => {}
        }
    }
    if hooks.is_empty() {
        return Err(Status::invalid_argument(
            "a service must register for at least one hook",
        ));
    }
    Ok(hooks)
}

type NodeStream = Pin<Box<dyn Stream<Item = Result<pb::NodeMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::services_server::Services for ServicesServer {
    type SessionStream = NodeStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::ServiceMessage>>,
    ) -> Result<Response<NodeStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session ended before its Register"))?;
        let Some(Msg::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message of a session must be a Register",
            ));
        };
        let hooks = check_register(&reg)?;
        if let Some(h) = hooks.iter().find(|h| !self.role.serves(**h)) {
            return Err(Status::invalid_argument(format!(
                "hook {} is not served here: {}",
                super::hook_name(*h),
                self.role.describe()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let session = self
            .registry
            .register(&reg.name, hooks, reg.api_version, tx.clone())
            .map_err(Status::already_exists)?;
        let registered = pb::NodeMessage {
            msg: Some(pb::node_message::Msg::Registered(pb::Registered {
                node: self.node.clone(),
                vms: (self.vms)(),
                api_version: reg.api_version,
            })),
        };
        let _ = tx.send(Ok(registered)).await;
        let registry = self.registry.clone();
        tokio::spawn(async move {
            // The session lives until the service closes its stream or the connection goes.
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(Msg::Register(_)) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "this session is registered already",
                            )))
                            .await;
                        break;
                    }
                    Some(m) => registry.on_message(&reg.name, session, m),
                    None => {}
                }
            }
            registry.unregister(&reg.name, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves `server` on `listener` (bound at `path`) until the process ends, then removes the socket.
pub async fn serve(listener: tokio::net::UnixListener, path: PathBuf, server: ServicesServer) {
    let r = tonic::transport::Server::builder()
        .add_service(pb::services_server::ServicesServer::new(server))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await;
    let _ = std::fs::remove_file(&path);
    if let Err(e) = r {
        tracing::error!(path = %path.display(), "the services socket failed: {e}");
    }
}

/// A client of the services API on the Unix socket `path` (for services written in Rust, the
/// example in `examples/kv-service` and the tests).
///
/// # Errors
/// The socket cannot be connected to.
pub async fn connect(
    path: &std::path::Path,
) -> Result<pb::services_client::ServicesClient<tonic::transport::Channel>, tonic::transport::Error>
{
    let path = path.to_owned();
    // The URI is required by the API and unused: the connector reaches the socket.
    let ch = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await?;
    Ok(pb::services_client::ServicesClient::new(ch))
}
