//! Stage 8, router: owns a workload's routing objects and reads and writes the canary's
//! share of traffic.
//!
//! The [`Router`] trait speaks only of a workload ([`Routes`]) and a canary weight (the
//! primary gets the rest), so the controller does not know whether App Mesh objects
//! ([`appmesh::AppMesh`]) or, later, a Gateway API `HTTPRoute` carry the weights. The router
//! creates its objects, re-applies them when they drift, and names the ones that exist but
//! belong to someone else (meshcanary then leaves the workload alone). A write is
//! one update guarded by `resourceVersion` (a conflict re-reads and retries), followed by a
//! read-back that must show the weight written.

pub mod appmesh;

use std::collections::BTreeMap;
use std::future::Future;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The field manager of every server-side apply meshcanary makes.
pub const FIELD_MANAGER: &str = "meshcanary";

/// What a router needs to build a workload's routing objects: the workload, its port, the
/// selectors of both arms, and the owner reference (to `NAME`) every object carries, so
/// deleting `NAME` deletes them and meshcanary can tell its objects from others'.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub primary_labels: BTreeMap<String, String>,
    pub canary_labels: BTreeMap<String, String>,
    /// An `ownerReferences` entry naming `NAME` (apiVersion, kind, name, uid, controller).
    pub owner: serde_json::Value,
}

impl Routes {
    /// `NAME`'s uid, from the owner reference.
    pub fn owner_uid(&self) -> &str {
        self.owner["uid"].as_str().unwrap_or_default()
    }

    /// Metadata of an object meshcanary owns: name, namespace, the managed-by label and the
    /// owner reference.
    pub fn meta(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": "meshcanary"},
            "ownerReferences": [self.owner],
        })
    }
}

/// Whether an object with `metadata` is owned by the object with `uid` (meshcanary's
/// objects name `NAME` as their owner; anything else is someone else's).
pub fn owned_by(metadata: &ObjectMeta, uid: &str) -> bool {
    metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid)
}

/// An existing object that `NAME` does not own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// No controller owns it (an orphan): it may be adopted when the user asks.
    pub orphan: bool,
}

impl Foreign {
    /// The object `kind namespace/name` with `metadata`, if `NAME` (`uid`) does not own it.
    pub fn of(
        kind: &'static str,
        namespace: &str,
        name: &str,
        metadata: &ObjectMeta,
        uid: &str,
    ) -> Option<Foreign> {
        if owned_by(metadata, uid) {
            return None;
        }
        let controlled = metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true));
        Some(Foreign {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            orphan: !controlled,
        })
    }
}

/// `Kind namespace/name`, as Events and logs name it.
impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The merge patch that makes `NAME` (the owner reference in `routes`) an orphan's owner.
pub fn adoption(routes: &Routes) -> serde_json::Value {
    serde_json::json!({"metadata": {"ownerReferences": [routes.owner]}})
}

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

    /// Create the workload's routing objects, or re-apply the ones that drifted; the
    /// weights of an existing object are the router's and stay as they are.
    ///
    /// ### Errors
    /// An API call failed (retried at the next tick).
    fn ensure_routes(
        &self,
        routes: &Routes,
    ) -> impl Future<Output = Result<(), RouterError>> + Send;

    /// The routing objects of the workload that exist and are not owned by `NAME`
    /// (meshcanary does not take them over, unless they are orphans and the user asks).
    ///
    /// ### Errors
    /// An API call failed.
    fn foreign_routes(
        &self,
        routes: &Routes,
    ) -> impl Future<Output = Result<Vec<Foreign>, RouterError>> + Send;

    /// Make `NAME` the owner of the workload's routing objects that have no controlling
    /// owner ([`adoption`]); the others are left as they are.
    ///
    /// ### Errors
    /// An API call failed.
    fn adopt_routes(&self, routes: &Routes)
        -> impl Future<Output = Result<(), RouterError>> + Send;
}
