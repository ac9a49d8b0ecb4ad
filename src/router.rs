//! Stage 8, router: owns a workload's routing objects and reads and writes the canary's
//! share of traffic.
//!
//! The [`Router`] trait speaks only of a workload ([`Routes`], [`Target`]) and a canary weight
//! (the primary gets the rest), so the controller does not know whether App Mesh objects
//! ([`appmesh::AppMesh`]) or a Gateway API `HTTPRoute` ([`gatewayapi::GatewayApi`]) carry the
//! weights; [`Routers`] sends each workload to the one it names. The router
//! creates its objects, re-applies them when they drift, and names the ones that exist but
//! belong to someone else (meshcanary then leaves the workload alone). A write is
//! one update guarded by `resourceVersion` (a conflict re-reads and retries), followed by a
//! read-back that must show the weight written.

pub mod appmesh;
pub mod gatewayapi;

use std::collections::BTreeMap;
use std::future::Future;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject, PostParams};

/// The field manager of every server-side apply meshcanary makes.
pub const FIELD_MANAGER: &str = "meshcanary";

/// Which router carries a workload's weights (`meshcanary.io/router`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RouterKind {
    /// An App Mesh `VirtualRouter` (and its VirtualNodes and VirtualService).
    #[default]
    AppMesh,
    /// A Gateway API `HTTPRoute`'s `backendRefs` weights.
    GatewayApi,
}

impl RouterKind {
    pub const ALL: [RouterKind; 2] = [RouterKind::AppMesh, RouterKind::GatewayApi];

    /// The name users write (annotation and flag).
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::AppMesh => "app-mesh",
            RouterKind::GatewayApi => "gateway-api",
        }
    }
}

impl std::str::FromStr for RouterKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RouterKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a router: expected app-mesh or gateway-api"))
    }
}

impl std::fmt::Display for RouterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Gateway (`meshcanary.io/gateway: [namespace/]name`) a created HTTPRoute attaches to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    /// `None`: the workload's namespace.
    pub namespace: Option<String>,
    pub name: String,
}

impl std::str::FromStr for GatewayRef {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        };
        match s.split_once('/') {
            Some((ns, name)) if valid(ns) && valid(name) => Ok(GatewayRef {
                namespace: Some(ns.to_owned()),
                name: name.to_owned(),
            }),
            None if valid(s) => Ok(GatewayRef {
                namespace: None,
                name: s.to_owned(),
            }),
            _ => Err(()),
        }
    }
}

/// Which HTTPRoute carries a Gateway API workload's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpRouteRef {
    /// meshcanary creates and owns the route `NAME`, attached to the Service `NAME` (GAMMA,
    /// east-west) or to a Gateway (north-south).
    Own { gateway: Option<GatewayRef> },
    /// The user's route of this name (`meshcanary.io/route`): only the weights of its
    /// `NAME-primary` and `NAME-canary` backends are meshcanary's.
    Existing(String),
}

/// The object a workload's weights live in: what reading and setting a weight needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub router: RouterKind,
    pub namespace: String,
    /// The workload `NAME` (its arms are `NAME-primary` and `NAME-canary`).
    pub name: String,
    /// The routing object's name: `NAME`, or the user's HTTPRoute.
    pub route: String,
}

impl Target {
    /// A workload's target from its router and route reference.
    pub fn new(router: RouterKind, namespace: &str, name: &str, route: &HttpRouteRef) -> Target {
        let route = match (router, route) {
            (RouterKind::GatewayApi, HttpRouteRef::Existing(r)) => r.clone(),
            _ => name.to_owned(),
        };
        Target {
            router,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            route,
        }
    }
}

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
    pub router: RouterKind,
    /// For [`RouterKind::GatewayApi`]: the route that carries the weights.
    pub http_route: HttpRouteRef,
}

impl Routes {
    /// Where this workload's weights live.
    pub fn target(&self) -> Target {
        Target::new(self.router, &self.namespace, &self.name, &self.http_route)
    }

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
    /// The API does not serve the kind at all (its CRDs are not installed).
    #[error("{what} is not served by the API server: {why}")]
    Unserved { what: String, why: String },
    /// The mesh or gateway says it does not use the routing object; `weight` is what the
    /// object holds all the same.
    #[error("{what} is not in effect: {why}")]
    NotAccepted {
        what: String,
        why: String,
        weight: u8,
    },
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
            RouterError::Unserved { .. } => "unserved",
            RouterError::NotAccepted { .. } => "not_accepted",
        }
    }
}

/// How often a weight write that meets a conflict is tried in all.
const ATTEMPTS: u32 = 5;

/// Read the routing object `name` (`what` names it in errors); a missing one is
/// [`RouterError::NotFound`].
async fn get(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
) -> Result<DynamicObject, RouterError> {
    match api.get(name).await {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(s)) if s.is_not_found() => Err(RouterError::NotFound {
            what: what.to_owned(),
        }),
        Err(source) => Err(RouterError::Api {
            op: "reading",
            what: what.to_owned(),
            source,
        }),
    }
}

/// Give the canary `weight` in the routing object `name`, then read it back: the body of
/// every router's [`Router::set_canary_weight`], which differ only in how they `read` and
/// `write` the weight in the object.
///
/// The object is read, edited in place by `write` (not at all when `read` already shows
/// `weight`; a weight it cannot read is overwritten) and sent back whole with the
/// `resourceVersion` it was read at, so a concurrent writer makes the update a conflict:
/// that re-reads and tries again, [`ATTEMPTS`] times in all. The read-back must show
/// `weight` ([`RouterError::Unverified`] otherwise).
async fn replace_weight(
    api: &Api<DynamicObject>,
    (name, what): (&str, &str),
    weight: u8,
    read: impl Fn(&DynamicObject) -> Result<u8, RouterError>,
    write: impl Fn(&mut DynamicObject) -> Result<(), RouterError>,
) -> Result<(), RouterError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut object = get(api, name, what).await?;
        if read(&object).ok() == Some(weight) {
            return Ok(());
        }
        write(&mut object)?;
        match api.replace(name, &PostParams::default(), &object).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.is_conflict() && attempt < ATTEMPTS => continue,
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                return Err(RouterError::Conflict {
                    what: what.to_owned(),
                    attempts: attempt,
                })
            }
            Err(source) => {
                return Err(RouterError::Api {
                    op: "updating",
                    what: what.to_owned(),
                    source,
                })
            }
        }
    }
    let got = read(&get(api, name, what).await?)?;
    if got == weight {
        Ok(())
    } else {
        Err(RouterError::Unverified {
            what: what.to_owned(),
            wanted: weight,
            got,
        })
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
        target: &Target,
    ) -> impl Future<Output = Result<u8, RouterError>> + Send;

    /// Give the canary `weight` percent and the primary the rest; return once a read-back
    /// shows it.
    ///
    /// ### Errors
    /// As [`Router::canary_weight`], plus conflicts that do not settle and a read-back that
    /// disagrees.
    fn set_canary_weight(
        &self,
        target: &Target,
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

/// Every router, each workload sent to the one its [`Target`] or [`Routes`] names.
#[derive(Clone)]
pub struct Routers {
    pub app_mesh: appmesh::AppMesh,
    pub gateway_api: gatewayapi::GatewayApi,
}

impl Router for Routers {
    async fn canary_weight(&self, target: &Target) -> Result<u8, RouterError> {
        match target.router {
            RouterKind::AppMesh => self.app_mesh.canary_weight(target).await,
            RouterKind::GatewayApi => self.gateway_api.canary_weight(target).await,
        }
    }

    async fn set_canary_weight(&self, target: &Target, weight: u8) -> Result<(), RouterError> {
        match target.router {
            RouterKind::AppMesh => self.app_mesh.set_canary_weight(target, weight).await,
            RouterKind::GatewayApi => self.gateway_api.set_canary_weight(target, weight).await,
        }
    }

    async fn ensure_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        match routes.router {
            RouterKind::AppMesh => self.app_mesh.ensure_routes(routes).await,
            RouterKind::GatewayApi => self.gateway_api.ensure_routes(routes).await,
        }
    }

    async fn foreign_routes(&self, routes: &Routes) -> Result<Vec<Foreign>, RouterError> {
        match routes.router {
            RouterKind::AppMesh => self.app_mesh.foreign_routes(routes).await,
            RouterKind::GatewayApi => self.gateway_api.foreign_routes(routes).await,
        }
    }

    async fn adopt_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        match routes.router {
            RouterKind::AppMesh => self.app_mesh.adopt_routes(routes).await,
            RouterKind::GatewayApi => self.gateway_api.adopt_routes(routes).await,
        }
    }
}
