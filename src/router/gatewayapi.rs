//! The Gateway API router: the `backendRefs` weights of an `HTTPRoute`
//! (`gateway.networking.k8s.io/v1`, or `v1beta1` where only that is served).
//!
//! Two ways to own a route, chosen per workload:
//!
//! - by reference (`meshcanary.io/route: ROUTE`): the user's route. meshcanary changes only
//!   the `weight` of the backendRefs that name the Services `NAME-primary` and `NAME-canary`,
//!   in every rule that names both; every other rule, match, filter and backend stays as the
//!   user wrote it. It never creates, owns or re-applies that route.
//! - its own: the route `NAME`, created once with one rule sending everything to
//!   `NAME-primary`, attached to the Service `NAME` (GAMMA, east-west mesh traffic) or to the
//!   Gateway of `meshcanary.io/gateway` (north-south), owned by `NAME` like every other
//!   object meshcanary creates.
//!
//! A weight change is a full update of the route as read, guarded by its `resourceVersion`
//! (a conflict re-reads and retries), then a read-back. A route whose `status.parents` say
//! it is not `Accepted` (or its references not resolved) is an error naming the condition:
//! its weights move no traffic, so no analysis may read "healthy" from it.
//!
//! The types are the kube-rs project's `gateway-api` crate's, used through serde: the objects
//! travel as `DynamicObject`s, and the weights are edited in the JSON as read, so a field
//! the crate does not know yet survives a write.

use gateway_api::httproutes::{
    HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteSpec, HttpRouteStatus,
};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::Client;
use serde_json::{json, Value};

use super::{Foreign, HttpRouteRef, Router, RouterError, Routes, Target};

pub const GROUP: &str = "gateway.networking.k8s.io";
pub const KIND: &str = "HTTPRoute";
/// The versions meshcanary speaks, preferred first.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// The API resource of `HTTPRoute` at `version`.
pub fn resource(version: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, version, KIND))
}

/// HTTPRoute weights through the Kubernetes API.
#[derive(Clone)]
pub struct GatewayApi {
    client: Client,
    /// The served version, found at first use (a failed lookup is retried at the next).
    resource: std::sync::Arc<tokio::sync::OnceCell<ApiResource>>,
}

impl GatewayApi {
    pub fn new(client: Client) -> Self {
        GatewayApi {
            client,
            resource: std::sync::Arc::default(),
        }
    }

    /// The HTTPRoute resource at the first of [`VERSIONS`] the API server serves.
    async fn resource(&self) -> Result<&ApiResource, RouterError> {
        self.resource
            .get_or_try_init(|| async {
                let mut unserved = Vec::new();
                for version in VERSIONS {
                    let gvk = GroupVersionKind::gvk(GROUP, version, KIND);
                    match kube::discovery::pinned_kind(&self.client, &gvk).await {
                        Ok((resource, _)) => return Ok(resource),
                        Err(kube::Error::Api(s)) if s.is_not_found() => {
                            unserved.push(format!("{GROUP}/{version}"));
                        }
                        Err(kube::Error::Discovery(e)) => unserved.push(format!("{GROUP}/{version} ({e})")),
                        Err(source) => {
                            return Err(RouterError::Api {
                                op: "discovering",
                                what: format!("{KIND} in {GROUP}/{version}"),
                                source,
                            })
                        }
                    }
                }
                Err(RouterError::Unserved {
                    what: format!("{KIND} ({GROUP})"),
                    why: format!(
                        "none of {} is served; install the Gateway API CRDs (standard channel) or use meshcanary.io/router: app-mesh",
                        unserved.join(", ")
                    ),
                })
            })
            .await
    }

    async fn api(&self, namespace: &str) -> Result<Api<DynamicObject>, RouterError> {
        let resource = self.resource().await?;
        Ok(Api::namespaced_with(
            self.client.clone(),
            namespace,
            resource,
        ))
    }

    async fn get(&self, namespace: &str, route: &str) -> Result<DynamicObject, RouterError> {
        super::get(&self.api(namespace).await?, route, &what(namespace, route)).await
    }

    /// The canary weight of a route as read.
    fn weight_in(target: &Target, route: &DynamicObject) -> Result<u8, RouterError> {
        read_weight(&route.data["spec"], &target.namespace, &target.name).map_err(|why| {
            RouterError::Malformed {
                what: what(&target.namespace, &target.route),
                why,
            }
        })
    }
}

fn what(namespace: &str, route: &str) -> String {
    format!("{KIND} {namespace}/{route}")
}

/// The Service a backendRef names, if it names one in the route's `namespace` (a Service is
/// the default kind of the core group; a backend of another kind or namespace is not an arm).
fn service_of<'a>(backend: &'a Value, namespace: &str) -> Option<&'a str> {
    let core = backend.get("group").is_none_or(|g| g == "");
    let service = backend.get("kind").is_none_or(|k| k == "Service");
    let here = backend.get("namespace").is_none_or(|n| n == namespace);
    (core && service && here)
        .then(|| backend["name"].as_str())
        .flatten()
}

/// The rules that name both arms of `NAME`: (rule's backendRefs, canary index, primary index).
fn arms<'a>(
    spec: &'a Value,
    namespace: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let (canary, primary) = (format!("{name}-canary"), format!("{name}-primary"));
    spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(move |(i, rule)| {
            let backends = rule["backendRefs"].as_array()?;
            let find = |svc: &str| {
                backends
                    .iter()
                    .position(|b| service_of(b, namespace) == Some(svc))
            };
            Some((i, find(&canary)?, find(&primary)?))
        })
}

/// A backendRef's weight: 1 when it is not set (the Gateway API's default).
fn weight_field(backend: &Value) -> Option<u64> {
    match backend.get("weight") {
        None | Some(Value::Null) => Some(1),
        Some(w) => w.as_u64(),
    }
}

/// The canary weight in a route's spec: the weight of `NAME-canary` over the sum with
/// `NAME-primary`, in the first rule that names both.
///
/// ### Errors
/// No rule names both, or their weights are not whole numbers with a positive sum.
pub fn read_weight(spec: &Value, namespace: &str, name: &str) -> Result<u8, String> {
    let Some((rule, c, p)) = arms(spec, namespace, name).next() else {
        return Err(format!(
            "no rule has backendRefs to both Services {name}-primary and {name}-canary (add them, weights 100 and 0, to the rule that should carry the canary)"
        ));
    };
    let backends = &spec["rules"][rule]["backendRefs"];
    match (weight_field(&backends[c]), weight_field(&backends[p])) {
        (Some(c), Some(p)) if c.saturating_add(p) > 0 => {
            let share = u128::from(c) * 100 / (u128::from(c) + u128::from(p));
            u8::try_from(share).map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "rule {rule}: the weights of {name}-canary and {name}-primary are not whole numbers with a positive sum"
        )),
    }
}

/// Set the weights of both arms in every rule that names both; `false` if none does.
/// Nothing else in the spec changes.
pub fn write_weight(spec: &mut Value, namespace: &str, name: &str, weight: u8) -> bool {
    let found: Vec<(usize, usize, usize)> = arms(spec, namespace, name).collect();
    for &(rule, c, p) in &found {
        let backends = &mut spec["rules"][rule]["backendRefs"];
        backends[c]["weight"] = json!(weight);
        backends[p]["weight"] = json!(100 - u32::from(weight));
    }
    !found.is_empty()
}

/// Why a route's parents do not route by it, if one says so: the first parent whose
/// `Accepted` or `ResolvedRefs` condition is `False`. A route no implementation has
/// answered for yet (no status) is not refused.
pub fn not_accepted(status: &Value) -> Option<String> {
    if status.is_null() {
        return None;
    }
    let status: HttpRouteStatus = match serde_json::from_value(status.clone()) {
        Ok(s) => s,
        Err(e) => return Some(format!("its status does not parse ({e})")),
    };
    status.parents.iter().find_map(|parent| {
        let refused = parent.conditions.iter().find(|c| {
            (c.type_ == "Accepted" || c.type_ == "ResolvedRefs") && c.status == "False"
        })?;
        let r = &parent.parent_ref;
        let kind = r.kind.as_deref().unwrap_or("Gateway");
        let at = r
            .namespace
            .as_deref()
            .map_or_else(|| r.name.clone(), |ns| format!("{ns}/{}", r.name));
        Some(format!(
            "parent {kind} {at} ({}) has {}=False, reason {}: {}",
            parent.controller_name, refused.type_, refused.reason, refused.message
        ))
    })
}

/// The route meshcanary creates for a workload: one rule, everything to `NAME-primary`,
/// attached to the Service `NAME` (GAMMA) or to a Gateway.
pub fn http_route(routes: &Routes, api_version: &str) -> Value {
    let gateway = match &routes.http_route {
        HttpRouteRef::Own { gateway } => gateway.as_ref(),
        HttpRouteRef::Existing(_) => None,
    };
    let parent = match gateway {
        None => HttpRouteParentRefs {
            group: Some(String::new()),
            kind: Some("Service".into()),
            name: routes.name.clone(),
            port: Some(i32::from(routes.port)),
            ..HttpRouteParentRefs::default()
        },
        Some(g) => HttpRouteParentRefs {
            group: Some(GROUP.into()),
            kind: Some("Gateway".into()),
            name: g.name.clone(),
            namespace: g.namespace.clone(),
            ..HttpRouteParentRefs::default()
        },
    };
    let backend = |service: String, weight: i32| HttpRouteRulesBackendRefs {
        name: service,
        port: Some(i32::from(routes.port)),
        weight: Some(weight),
        ..HttpRouteRulesBackendRefs::default()
    };
    let spec = HttpRouteSpec {
        parent_refs: Some(vec![parent]),
        rules: Some(vec![HttpRouteRules {
            backend_refs: Some(vec![
                backend(format!("{}-primary", routes.name), 100),
                backend(format!("{}-canary", routes.name), 0),
            ]),
            ..HttpRouteRules::default()
        }]),
        ..HttpRouteSpec::default()
    };
    json!({
        "apiVersion": format!("{GROUP}/{api_version}"),
        "kind": KIND,
        "metadata": routes.meta(&routes.name),
        "spec": spec,
    })
}

impl Router for GatewayApi {
    /// The weight, once the route's parents are checked: a refused route's weight is
    /// returned inside [`RouterError::NotAccepted`]. Writes do not check (a weight of 0
    /// must go out whatever the route's status).
    async fn canary_weight(&self, target: &Target) -> Result<u8, RouterError> {
        let route = self.get(&target.namespace, &target.route).await?;
        let weight = Self::weight_in(target, &route)?;
        match not_accepted(&route.data["status"]) {
            Some(why) => Err(RouterError::NotAccepted {
                what: what(&target.namespace, &target.route),
                why,
                weight,
            }),
            None => Ok(weight),
        }
    }

    async fn set_canary_weight(&self, target: &Target, weight: u8) -> Result<(), RouterError> {
        let (namespace, name, route) = (
            target.namespace.as_str(),
            target.name.as_str(),
            target.route.as_str(),
        );
        super::replace_weight(
            &self.api(namespace).await?,
            (route, &what(namespace, route)),
            weight,
            |route| Self::weight_in(target, route),
            |object| {
                write_weight(&mut object.data["spec"], namespace, name, weight)
                    .then_some(())
                    .ok_or_else(|| RouterError::Malformed {
                        what: what(namespace, route),
                        why: format!(
                            "no rule has backendRefs to both {name}-primary and {name}-canary"
                        ),
                    })
            },
        )
        .await
    }

    async fn ensure_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        let ns = &routes.namespace;
        match &routes.http_route {
            HttpRouteRef::Existing(route) => {
                // The user's route: only checked, never written here.
                let found = self.get(ns, route).await.map_err(|e| match e {
                    RouterError::NotFound { what } => RouterError::NotFound {
                        what: format!("{what} (meshcanary.io/route)"),
                    },
                    e => e,
                })?;
                read_weight(&found.data["spec"], ns, &routes.name)
                    .map(drop)
                    .map_err(|why| RouterError::Malformed {
                        what: what(ns, route),
                        why,
                    })
            }
            HttpRouteRef::Own { .. } => {
                let version = self.resource().await?.version.clone();
                // Created only if absent: an existing route's weights are the rollout's.
                let body = http_route(routes, &version);
                let route: DynamicObject =
                    serde_json::from_value(body).map_err(|e| RouterError::Malformed {
                        what: what(ns, &routes.name),
                        why: e.to_string(),
                    })?;
                match self
                    .api(ns)
                    .await?
                    .create(&PostParams::default(), &route)
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
                    Err(source) => Err(RouterError::Api {
                        op: "creating",
                        what: what(ns, &routes.name),
                        source,
                    }),
                }
            }
        }
    }

    async fn foreign_routes(&self, routes: &Routes) -> Result<Vec<Foreign>, RouterError> {
        // The user's route is theirs by design; only the route meshcanary would create can
        // be someone else's.
        if let HttpRouteRef::Existing(_) = routes.http_route {
            return Ok(Vec::new());
        }
        let ns = &routes.namespace;
        let found = self
            .api(ns)
            .await?
            .get_opt(&routes.name)
            .await
            .map_err(|source| RouterError::Api {
                op: "reading",
                what: what(ns, &routes.name),
                source,
            })?;
        Ok(found
            .and_then(|o| Foreign::of(KIND, ns, &routes.name, &o.metadata, routes.owner_uid()))
            .into_iter()
            .collect())
    }

    async fn adopt_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        for foreign in self.foreign_routes(routes).await? {
            if !foreign.orphan {
                continue;
            }
            self.api(&routes.namespace)
                .await?
                .patch(
                    &foreign.name,
                    &PatchParams::default(),
                    &Patch::Merge(&super::adoption(routes)),
                )
                .await
                .map_err(|source| RouterError::Api {
                    op: "adopting",
                    what: foreign.to_string(),
                    source,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{GatewayRef, RouterKind};

    fn podinfo(http_route: HttpRouteRef) -> Routes {
        Routes {
            namespace: "test".into(),
            name: "podinfo".into(),
            port: 9898,
            primary_labels: [("app".to_owned(), "podinfo-primary".to_owned())].into(),
            canary_labels: [("app".to_owned(), "podinfo".to_owned())].into(),
            owner: json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo", "uid": "u-1", "controller": true}),
            router: RouterKind::GatewayApi,
            http_route,
        }
    }

    /// A user's route: a header rule to a third Service with a filter, then the canary rule.
    fn users_spec() -> Value {
        json!({
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["podinfo.example.com"],
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-beta", "value": "yes"}]}],
                    "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-tier", "value": "beta"}]}}],
                    "backendRefs": [{"name": "podinfo-beta", "port": 9898}]
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"name": "podinfo-primary", "port": 9898, "weight": 100},
                        {"name": "podinfo-canary", "port": 9898, "weight": 0},
                        {"name": "podinfo-canary", "namespace": "other", "port": 9898, "weight": 7}
                    ]
                }
            ]
        })
    }

    #[test]
    fn weights_change_and_nothing_else() {
        let mut spec = users_spec();
        assert_eq!(read_weight(&spec, "test", "podinfo"), Ok(0));
        assert!(write_weight(&mut spec, "test", "podinfo", 30));
        assert_eq!(read_weight(&spec, "test", "podinfo"), Ok(30));
        let mut expected = users_spec();
        expected["rules"][1]["backendRefs"][0]["weight"] = json!(70);
        expected["rules"][1]["backendRefs"][1]["weight"] = json!(30);
        assert_eq!(spec, expected, "only the two arms' weights moved");
    }

    #[test]
    fn an_unset_weight_is_one_and_a_foreign_backend_is_not_an_arm() {
        let spec = json!({"rules": [{"backendRefs": [
            {"name": "podinfo-primary"},
            {"name": "podinfo-canary"}
        ]}]});
        assert_eq!(read_weight(&spec, "test", "podinfo"), Ok(50));
        for other in [
            json!({"name": "podinfo-canary", "kind": "ServiceImport", "group": "multicluster.x-k8s.io"}),
            json!({"name": "podinfo-canary", "namespace": "elsewhere"}),
        ] {
            let spec = json!({"rules": [{"backendRefs": [{"name": "podinfo-primary"}, other]}]});
            let err = read_weight(&spec, "test", "podinfo").unwrap_err();
            assert!(err.contains("no rule has backendRefs"), "{err}");
            let mut copy = spec.clone();
            assert!(!write_weight(&mut copy, "test", "podinfo", 10));
            assert_eq!(copy, spec);
        }
        let zero = json!({"rules": [{"backendRefs": [
            {"name": "podinfo-primary", "weight": 0}, {"name": "podinfo-canary", "weight": 0}
        ]}]});
        assert!(read_weight(&zero, "test", "podinfo").is_err());
    }

    #[test]
    fn a_refused_route_names_the_condition() {
        assert_eq!(not_accepted(&Value::Null), None);
        let status = |t: &str, s: &str| {
            json!({"parents": [{
                "parentRef": {"name": "public", "namespace": "gateways"},
                "controllerName": "example.com/gateway",
                "conditions": [{"type": t, "status": s, "reason": "NotAllowedByListeners",
                    "message": "no listener allows routes from test", "lastTransitionTime": "2026-12-03T00:00:00Z", "observedGeneration": 1}]
            }]})
        };
        assert_eq!(not_accepted(&status("Accepted", "True")), None);
        let why = not_accepted(&status("Accepted", "False")).unwrap();
        assert_eq!(why, "parent Gateway gateways/public (example.com/gateway) has Accepted=False, reason NotAllowedByListeners: no listener allows routes from test");
        assert!(not_accepted(&status("ResolvedRefs", "False")).is_some());
    }

    #[test]
    fn a_created_route_sends_everything_to_the_primary() {
        let routes = podinfo(HttpRouteRef::Own { gateway: None });
        let mesh = http_route(&routes, "v1");
        assert_eq!(mesh["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(mesh["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            mesh["spec"]["parentRefs"],
            json!([{"group": "", "kind": "Service", "name": "podinfo", "port": 9898}])
        );
        assert_eq!(read_weight(&mesh["spec"], "test", "podinfo"), Ok(0));
        let north = http_route(
            &podinfo(HttpRouteRef::Own {
                gateway: Some(GatewayRef {
                    namespace: Some("gateways".into()),
                    name: "public".into(),
                }),
            }),
            "v1beta1",
        );
        assert_eq!(
            north["spec"]["parentRefs"],
            json!([{"group": GROUP, "kind": "Gateway", "name": "public", "namespace": "gateways"}])
        );
        // The crate's types read it back: the shape is the Gateway API's.
        let typed: HttpRouteSpec = serde_json::from_value(north["spec"].clone()).unwrap();
        assert_eq!(
            typed.rules.unwrap()[0].backend_refs.as_ref().unwrap().len(),
            2
        );
    }
}
