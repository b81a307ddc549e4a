//! [`Authority`] on etcd v3 (its gRPC API, from `proto/etcd_v3.proto`): the record and the lease key of a
//! VM under `<prefix>/vms/<vm>/`, read together by one range request, written by one transaction per
//! plan.
//!
//! Values are JSON: the record `{"generation":2,"holder":"b1","state":"running"}`, the lease key
//! `{"node":"b1","generation":2}` (attached to that node's etcd lease).

use std::time::Duration;

use endophyte_wire::authority::{LeaseKeyOp, LeaseView, Observed, Record, RecordState, TxnPlan};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::{Authority, AuthorityConfig, AuthorityError, BoxFuture};

#[allow(missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;

/// An etcd v3 cluster as the fencing authority.
#[derive(Clone)]
pub struct EtcdAuthority {
    channel: Channel,
    endpoints: String,
    prefix: String,
    timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct RecordJson {
    generation: u64,
    holder: String,
    state: String,
}

#[derive(Serialize, Deserialize)]
struct LeaseJson {
    node: String,
    generation: u64,
}

/// The end of the range of keys starting with `prefix` (etcd's prefix convention: last byte + 1).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdAuthority {
    /// A client of the cluster in `cfg`. Connections are made lazily: an unreachable cluster fails the
    /// first call (transiently), not this. Call it inside the tokio runtime that will use the client
    /// (its connection task lives there).
    ///
    /// # Errors
    /// [`AuthorityError::BadEndpoint`] for an endpoint that is not a URI.
    pub fn connect(cfg: &AuthorityConfig) -> Result<Self, AuthorityError> {
        let mut eps = Vec::new();
        for e in &cfg.etcd {
            let ep = Endpoint::from_shared(e.clone())
                .map_err(|err| AuthorityError::BadEndpoint {
                    endpoint: e.clone(),
                    why: err.to_string(),
                })?
                .connect_timeout(cfg.timeout())
                .timeout(cfg.timeout())
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(cfg.timeout())
                .keep_alive_while_idle(true);
            eps.push(ep);
        }
        let channel = match eps.len() {
            1 => eps.pop().expect("one endpoint").connect_lazy(),
            _ => Channel::balance_list(eps.into_iter()),
        };
        Ok(Self {
            channel,
            endpoints: cfg.etcd.join(","),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout(),
        })
    }

    fn dir(&self, vm: &str) -> String {
        format!("{}/vms/{vm}/", self.prefix)
    }

    fn record_key(&self, vm: &str) -> String {
        format!("{}record", self.dir(vm))
    }

    fn lease_key(&self, vm: &str) -> String {
        format!("{}lease", self.dir(vm))
    }

    /// Runs `f` bounded by the call timeout, naming `op` in errors.
    async fn bounded<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, AuthorityError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(AuthorityError::Etcd {
                endpoints: self.endpoints.clone(),
                op,
                source,
            }),
            Err(_) => Err(AuthorityError::Timeout {
                endpoints: self.endpoints.clone(),
                op,
                timeout: self.timeout,
            }),
        }
    }

    async fn observe_impl(&self, vm: &str) -> Result<Observed, AuthorityError> {
        let dir = self.dir(vm).into_bytes();
        let req = pb::RangeRequest {
            range_end: prefix_end(&dir),
            key: dir,
        };
        let mut kv = KvClient::new(self.channel.clone());
        let resp = self.bounded("range", kv.range(req)).await?.into_inner();
        let mut seen = Observed::default();
        for item in resp.kvs {
            let key = String::from_utf8_lossy(&item.key).into_owned();
            let malformed = |why: String| AuthorityError::Malformed {
                key: key.clone(),
                why,
            };
            if key == self.record_key(vm) {
                let r: RecordJson =
                    serde_json::from_slice(&item.value).map_err(|e| malformed(e.to_string()))?;
                let state = RecordState::parse(&r.state)
                    .ok_or_else(|| malformed(format!("unknown state {:?}", r.state)))?;
                seen.record = Some((
                    Record {
                        generation: r.generation,
                        holder: r.holder,
                        state,
                    },
                    item.mod_revision,
                ));
            } else if key == self.lease_key(vm) {
                let l: LeaseJson =
                    serde_json::from_slice(&item.value).map_err(|e| malformed(e.to_string()))?;
                seen.lease = Some(LeaseView {
                    node: l.node,
                    generation: l.generation,
                    lease_id: item.lease,
                    remaining: None,
                });
            }
        }
        if let Some(l) = seen.lease.as_mut().filter(|l| l.lease_id != 0) {
            let mut lease = LeaseClient::new(self.channel.clone());
            let ttl = self
                .bounded(
                    "lease time-to-live",
                    lease.lease_time_to_live(pb::LeaseTimeToLiveRequest {
                        id: l.lease_id,
                        keys: false,
                    }),
                )
                .await?
                .into_inner();
            l.remaining = Some(Duration::from_secs(ttl.ttl.max(0) as u64));
        }
        Ok(seen)
    }

    async fn apply_impl(
        &self,
        vm: &str,
        node: &str,
        plan: &TxnPlan,
        lease: i64,
    ) -> Result<bool, AuthorityError> {
        let rk = self.record_key(vm).into_bytes();
        let lk = self.lease_key(vm).into_bytes();
        let cmp = |key: &[u8], target: CompareTarget, union: TargetUnion| pb::Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: key.to_vec(),
            target_union: Some(union),
        };
        let mut compare = vec![if plan.expect_revision == 0 {
            cmp(&rk, CompareTarget::Create, TargetUnion::CreateRevision(0))
        } else {
            cmp(
                &rk,
                CompareTarget::Mod,
                TargetUnion::ModRevision(plan.expect_revision),
            )
        }];
        if plan.require_lease_absent {
            compare.push(cmp(
                &lk,
                CompareTarget::Create,
                TargetUnion::CreateRevision(0),
            ));
        }
        if let Some(l) = plan.require_lease {
            compare.push(cmp(&lk, CompareTarget::Lease, TargetUnion::Lease(l)));
        }
        let put = |key: Vec<u8>, value: Vec<u8>, lease: i64| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key,
                value,
                lease,
            })),
        };
        let record = serde_json::to_vec(&RecordJson {
            generation: plan.record.generation,
            holder: plan.record.holder.clone(),
            state: plan.record.state.as_str().into(),
        })
        .expect("a record serializes");
        let mut success = vec![put(rk, record, 0)];
        if plan.lease_key == LeaseKeyOp::OwnLease {
            let v = serde_json::to_vec(&LeaseJson {
                node: node.to_owned(),
                generation: plan.record.generation,
            })
            .expect("a lease key serializes");
            success.push(put(lk, v, lease));
        }
        let mut kv = KvClient::new(self.channel.clone());
        let resp = self
            .bounded(
                "txn",
                kv.txn(pb::TxnRequest {
                    compare,
                    success,
                    failure: vec![],
                }),
            )
            .await?
            .into_inner();
        Ok(resp.succeeded)
    }

    async fn keep_alive_impl(&self, id: i64) -> Result<Duration, AuthorityError> {
        let mut lease = LeaseClient::new(self.channel.clone());
        let f = async move {
            let req = tokio_stream::once(pb::LeaseKeepAliveRequest { id });
            let mut answers = lease.lease_keep_alive(req).await?.into_inner();
            let ttl = answers.message().await?.map_or(0, |r| r.ttl);
            Ok(Duration::from_secs(ttl.max(0) as u64))
        };
        self.bounded("lease keep-alive", f).await
    }
}

impl Authority for EtcdAuthority {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints)
    }

    fn observe<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<Observed, AuthorityError>> {
        Box::pin(self.observe_impl(vm))
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, AuthorityError>> {
        Box::pin(async move {
            let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
            let mut lease = LeaseClient::new(self.channel.clone());
            let r = self
                .bounded(
                    "lease grant",
                    lease.lease_grant(pb::LeaseGrantRequest { ttl: secs, id: 0 }),
                )
                .await?
                .into_inner();
            if !r.error.is_empty() || r.id == 0 {
                return Err(AuthorityError::Etcd {
                    endpoints: self.endpoints.clone(),
                    op: "lease grant",
                    source: tonic::Status::unavailable(r.error),
                });
            }
            Ok(r.id)
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, AuthorityError>> {
        Box::pin(self.keep_alive_impl(lease))
    }

    fn apply<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        plan: &'a TxnPlan,
        lease: i64,
    ) -> BoxFuture<'a, Result<bool, AuthorityError>> {
        Box::pin(self.apply_impl(vm, node, plan, lease))
    }

    fn revoke(&self, id: i64) -> BoxFuture<'_, Result<(), AuthorityError>> {
        Box::pin(async move {
            let mut lease = LeaseClient::new(self.channel.clone());
            match self
                .bounded(
                    "lease revoke",
                    lease.lease_revoke(pb::LeaseRevokeRequest { id }),
                )
                .await
            {
                Ok(_) => Ok(()),
                // Already gone is what a revoke wants.
                Err(AuthorityError::Etcd { source, .. })
                    if source.code() == tonic::Code::NotFound =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
    }
}
