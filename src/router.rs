//! Stage 8, router: reads and writes the canary's share of traffic.
//!
//! The [`Router`] trait speaks only of a workload and a canary weight (the primary gets the
//! rest), so the controller does not know whether an App Mesh `VirtualRouter`
//! ([`appmesh::AppMesh`]) or, later, a Gateway API `HTTPRoute` carries the weights. A write is
//! one update guarded by `resourceVersion` (a conflict re-reads and retries), followed by a
//! read-back that must show the weight written.

pub mod appmesh;

use std::future::Future;

/// Why a weight could not be read or set.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} is malformed: {why}")]
    Malformed { what: String, why: String },
    #[error("{op} {what}: {source}")]
    Api {
        op: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating {what}: still conflicting after {attempts} attempts")]
    Conflict { what: String, attempts: u32 },
    #[error("{what}: wrote canary weight {wanted} but read back {got}")]
    Unverified { what: String, wanted: u8, got: u8 },
}

impl RouterError {
    /// A fixed name for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            RouterError::NotFound { .. } => "not_found",
            RouterError::Malformed { .. } => "malformed",
            RouterError::Api { .. } => "api",
            RouterError::Conflict { .. } => "conflict",
            RouterError::Unverified { .. } => "unverified",
        }
    }
}

/// Moves traffic between a workload's primary and canary.
pub trait Router: Send + Sync + 'static {
    /// The canary's current weight (0 to 100).
    ///
    /// ### Errors
    /// The routing object is missing, unreadable or not shaped as meshcanary created it.
    fn canary_weight(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<u8, RouterError>> + Send;

    /// Give the canary `weight` percent and the primary the rest; return once a read-back
    /// shows it.
    ///
    /// ### Errors
    /// As [`Router::canary_weight`], plus conflicts that do not settle and a read-back that
    /// disagrees.
    fn set_canary_weight(
        &self,
        namespace: &str,
        name: &str,
        weight: u8,
    ) -> impl Future<Output = Result<(), RouterError>> + Send;
}
