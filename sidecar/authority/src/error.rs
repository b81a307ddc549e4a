//! The authority's errors: transient (retried) or permanent (fail fast).

use endophyte_wire::authority::Refusal;

/// What went wrong talking to the authority.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// etcd refused or failed the call (unreachable, no leader, connection reset).
    #[error("etcd at {endpoints}: {op}: {} ({:?})", .source.message(), .source.code())]
    Etcd {
        /// The endpoints.
        endpoints: String,
        /// The call.
        op: &'static str,
        /// The gRPC status.
        source: tonic::Status,
    },
    /// An endpoint is not a URI.
    #[error("etcd endpoint {endpoint:?} is not a valid URI: {why}")]
    BadEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        why: String,
    },
    /// The call did not finish within the bound.
    #[error("etcd at {endpoints} did not answer {op} within {timeout:?}")]
    Timeout {
        /// The endpoints.
        endpoints: String,
        /// The call.
        op: &'static str,
        /// The bound.
        timeout: std::time::Duration,
    },
    /// A key under the prefix holds something that is not an Endophyte record.
    #[error("authority key {key} is not an Endophyte record: {why}")]
    Malformed {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
    /// The authority refuses the act.
    #[error("VM {vm:?}: {refusal}")]
    Refused {
        /// The VM.
        vm: String,
        /// Why.
        refusal: Refusal,
    },
    /// A hand-over did not land, and the record still names this node at its generation (read back).
    #[error("VM {vm:?}: the hand-over did not land; this node still holds generation {generation}: {why}")]
    NotLanded {
        /// The VM.
        vm: String,
        /// The generation still held.
        generation: u64,
        /// Why it did not land.
        why: String,
    },
    /// A lease of this same node still guards the record and did not expire in time.
    #[error("VM {vm:?}: an earlier lease of node {node:?} still guards generation {generation} after {waited:?}; another process of this node may hold it")]
    StillHeld {
        /// The VM.
        vm: String,
        /// The node.
        node: String,
        /// The generation.
        generation: u64,
        /// How long the claim waited.
        waited: std::time::Duration,
    },
}

impl AuthorityError {
    /// Whether retrying cannot help: a refusal, a malformed record, a hold kept by another process.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Malformed { .. }
                | Self::Refused { .. }
                | Self::StillHeld { .. }
                | Self::BadEndpoint { .. }
        )
    }

    /// The refusal, if the authority refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}
