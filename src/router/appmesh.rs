//! The App Mesh router: the weighted targets of `VirtualRouter` `NAME`'s routes.
//!
//! It owns the workload's mesh objects, following Flagger's model: VirtualNodes
//! `NAME-primary` and `NAME-canary`, VirtualRouter `NAME` and VirtualService `NAME`, each
//! with an owner reference to `NAME`.
//!
//! meshcanary creates the router with one `httpRoute` whose `weightedTargets` name
//! `NAME-canary` and `NAME-primary`. Every route that names both gets the weights; other
//! fields (and what App Mesh's controller adds, such as `awsName` and `meshRef`) are kept
//! as read, because the write is a full update of the object as read, guarded by its
//! `resourceVersion`.

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{Foreign, Router, RouterError, Routes, Target};

/// `appmesh.k8s.aws/v1beta2`, the version App Mesh's controller serves.
pub const GROUP: &str = "appmesh.k8s.aws";
pub const VERSION: &str = "v1beta2";

/// The API resource of an App Mesh kind (`VirtualRouter`, `VirtualNode`, `VirtualService`).
pub fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, kind))
}

/// App Mesh `VirtualRouter` weights through the Kubernetes API.
#[derive(Clone)]
pub struct AppMesh {
    client: Client,
    resource: ApiResource,
    /// A watch cache of every VirtualRouter, if started: the weight read at every tick of
    /// every workload comes from memory instead of one GET each (writes and their
    /// read-back still go to the API).
    cache: Option<Store<DynamicObject>>,
}

impl AppMesh {
    pub fn new(client: Client) -> Self {
        AppMesh {
            client,
            resource: resource("VirtualRouter"),
            cache: None,
        }
    }

    /// Read weights from a watch cache of the VirtualRouters (kept until `shutdown`; watch
    /// errors are logged and retried with backoff). Until it has synced, and for a router
    /// it does not hold yet, reads go to the API.
    #[must_use]
    pub fn with_cache(mut self, shutdown: watch::Receiver<bool>) -> Self {
        let writer = reflector::store::Writer::<DynamicObject>::new(self.resource.clone());
        let store = writer.as_reader();
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &self.resource);
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        crate::shutdown::spawn_until(stream, shutdown, |error| {
            tracing::warn!(%error, "Watching VirtualRouters failed; reading them from the API meanwhile");
        });
        self.cache = Some(store);
        self
    }

    /// The router from the cache, if it is synced and holds it.
    fn cached(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<DynamicObject>> {
        let store = self.cache.as_ref()?;
        let synced = futures_util::FutureExt::now_or_never(store.wait_until_ready())
            .is_some_and(|r| r.is_ok());
        if !synced {
            return None;
        }
        store.get(&ObjectRef::new_with(name, self.resource.clone()).within(namespace))
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<DynamicObject, RouterError> {
        super::get(&self.api(namespace), name, &what(namespace, name)).await
    }
}

fn what(namespace: &str, name: &str) -> String {
    format!("VirtualRouter {namespace}/{name}")
}

/// The canary weight in a router's spec: the weight of `NAME-canary` over the sum, in the
/// first route that names both targets.
///
/// ### Errors
/// No route names both, or a weight is not a number.
pub fn read_weight(spec: &Value, name: &str) -> Result<u8, String> {
    let (canary, primary) = (format!("{name}-canary"), format!("{name}-primary"));
    for targets in weighted_targets(spec) {
        let weight_of = |node: &str| {
            targets
                .iter()
                .find(|t| t["virtualNodeRef"]["name"] == node)
                .map(|t| t["weight"].as_u64())
        };
        match (weight_of(&canary), weight_of(&primary)) {
            (Some(Some(c)), Some(Some(p))) if c.saturating_add(p) > 0 => {
                // In u128: weights are the cluster's numbers, and c * 100 must not wrap.
                let share = u128::from(c) * 100 / (u128::from(c) + u128::from(p));
                return u8::try_from(share).map_err(|e| e.to_string());
            }
            (Some(_), Some(_)) => {
                return Err("weights are not whole numbers with a positive sum".into())
            }
            _ => {}
        }
    }
    Err(format!(
        "no route has weighted targets {canary} and {primary}"
    ))
}

/// Set the weights in every route that names both targets; `false` if none does.
pub fn write_weight(spec: &mut Value, name: &str, weight: u8) -> bool {
    let (canary, primary) = (format!("{name}-canary"), format!("{name}-primary"));
    let mut found = false;
    let Some(routes) = spec["routes"].as_array_mut() else {
        return false;
    };
    for route in routes {
        for kind in ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"] {
            let Some(targets) = route[kind]["action"]["weightedTargets"].as_array_mut() else {
                continue;
            };
            let names: Vec<&str> = targets
                .iter()
                .filter_map(|t| t["virtualNodeRef"]["name"].as_str())
                .collect();
            if !(names.contains(&canary.as_str()) && names.contains(&primary.as_str())) {
                continue;
            }
            for t in targets.iter_mut() {
                let node = t["virtualNodeRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if node == canary {
                    t["weight"] = Value::from(weight);
                } else if node == primary {
                    t["weight"] = Value::from(100 - weight);
                }
            }
            found = true;
        }
    }
    found
}

fn weighted_targets(spec: &Value) -> impl Iterator<Item = &Vec<Value>> {
    spec["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|route| {
            ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"]
                .into_iter()
                .filter_map(move |kind| route[kind]["action"]["weightedTargets"].as_array())
        })
}

fn object(routes: &Routes, kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind,
        "metadata": routes.meta(name),
        "spec": spec,
    })
}

/// VirtualNodes `NAME-primary` and `NAME-canary`. `meshRef` and `awsName` are left to
/// App Mesh's controller (server-side apply keeps fields other managers own).
pub fn virtual_nodes(routes: &Routes) -> Vec<(String, Value)> {
    [
        ("primary", &routes.primary_labels),
        ("canary", &routes.canary_labels),
    ]
    .into_iter()
    .map(|(role, labels)| {
        let name = format!("{}-{role}", routes.name);
        let spec = json!({
            "podSelector": {"matchLabels": labels},
            "listeners": [{"portMapping": {"port": routes.port, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{name}.{}.svc.cluster.local", routes.namespace)}},
        });
        (name.clone(), object(routes, "VirtualNode", &name, spec))
    })
    .collect()
}

/// VirtualRouter `NAME`: one route, all traffic to the primary. Created once, never
/// re-applied: its weights belong to the router from then on.
pub fn virtual_router(routes: &Routes) -> Value {
    let name = &routes.name;
    let spec = json!({
        "listeners": [{"portMapping": {"port": routes.port, "protocol": "http"}}],
        "routes": [{
            "name": name,
            "httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [
                    {"virtualNodeRef": {"name": format!("{name}-canary")}, "weight": 0},
                    {"virtualNodeRef": {"name": format!("{name}-primary")}, "weight": 100},
                ]},
            },
        }],
    });
    object(routes, "VirtualRouter", name, spec)
}

/// VirtualService `NAME`, provided by the router.
pub fn virtual_service(routes: &Routes) -> Value {
    let spec = json!({"provider": {"virtualRouter": {"virtualRouterRef": {"name": routes.name}}}});
    object(routes, "VirtualService", &routes.name, spec)
}

impl AppMesh {
    fn api_of(&self, namespace: &str, kind: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &resource(kind))
    }

    /// The objects this router keeps for a workload, by kind and name.
    fn objects(routes: &Routes) -> Vec<(&'static str, String)> {
        let mut out: Vec<(&'static str, String)> = virtual_nodes(routes)
            .into_iter()
            .map(|(n, _)| ("VirtualNode", n))
            .collect();
        out.push(("VirtualRouter", routes.name.clone()));
        out.push(("VirtualService", routes.name.clone()));
        out
    }

    async fn apply(
        &self,
        routes: &Routes,
        kind: &str,
        name: &str,
        body: &Value,
    ) -> Result<(), RouterError> {
        self.api_of(&routes.namespace, kind)
            .patch(
                name,
                &PatchParams::apply(super::FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|source| RouterError::Api {
                op: "applying",
                what: format!("{kind} {}/{name}", routes.namespace),
                source,
            })?;
        Ok(())
    }
}

impl Router for AppMesh {
    async fn canary_weight(&self, target: &Target) -> Result<u8, RouterError> {
        let (namespace, name) = (target.namespace.as_str(), target.name.as_str());
        let spec = match self.cached(namespace, name) {
            Some(router) => router.data["spec"].clone(),
            None => self.get(namespace, name).await?.data["spec"].clone(),
        };
        read_weight(&spec, name).map_err(|why| RouterError::Malformed {
            what: what(namespace, name),
            why,
        })
    }

    async fn set_canary_weight(&self, target: &Target, weight: u8) -> Result<(), RouterError> {
        let (namespace, name) = (target.namespace.as_str(), target.name.as_str());
        let what = what(namespace, name);
        let malformed = |why| RouterError::Malformed {
            what: what.clone(),
            why,
        };
        super::replace_weight(
            &self.api(namespace),
            (name, &what),
            weight,
            |router| read_weight(&router.data["spec"], name).map_err(malformed),
            |router| {
                write_weight(&mut router.data["spec"], name, weight)
                    .then_some(())
                    .ok_or_else(|| {
                        malformed(format!(
                            "no route has weighted targets {name}-canary and {name}-primary"
                        ))
                    })
            },
        )
        .await
    }

    async fn ensure_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        let ns = &routes.namespace;
        let nodes = virtual_nodes(routes);
        futures_util::future::try_join_all(
            nodes
                .iter()
                .map(|(name, node)| self.apply(routes, "VirtualNode", name, node)),
        )
        .await?;
        // Created only if absent: an existing router's weights are the rollout's.
        let router: DynamicObject =
            serde_json::from_value(virtual_router(routes)).map_err(|e| RouterError::Malformed {
                what: what(ns, &routes.name),
                why: e.to_string(),
            })?;
        match self.api(ns).create(&PostParams::default(), &router).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(source) => {
                return Err(RouterError::Api {
                    op: "creating",
                    what: what(ns, &routes.name),
                    source,
                })
            }
        }
        self.apply(
            routes,
            "VirtualService",
            &routes.name,
            &virtual_service(routes),
        )
        .await
    }

    async fn adopt_routes(&self, routes: &Routes) -> Result<(), RouterError> {
        let ns = &routes.namespace;
        for foreign in self.foreign_routes(routes).await? {
            if !foreign.orphan {
                continue;
            }
            self.api_of(ns, foreign.kind)
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

    async fn foreign_routes(&self, routes: &Routes) -> Result<Vec<Foreign>, RouterError> {
        let ns = &routes.namespace;
        let objects = Self::objects(routes);
        let reads = objects.iter().map(|(kind, name)| async move {
            self.api_of(ns, kind)
                .get_opt(name)
                .await
                .map_err(|source| RouterError::Api {
                    op: "reading",
                    what: format!("{kind} {ns}/{name}"),
                    source,
                })
        });
        let found = futures_util::future::try_join_all(reads).await?;
        Ok(objects
            .iter()
            .zip(found)
            .filter_map(|((kind, name), o)| {
                Foreign::of(kind, ns, name, &o?.metadata, routes.owner_uid())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(c: u64, p: u64) -> Value {
        json!({
            "awsName": "podinfo_test",
            "listeners": [{"portMapping": {"port": 9898, "protocol": "http"}}],
            "routes": [{"name": "podinfo", "httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": [
                {"virtualNodeRef": {"name": "podinfo-canary"}, "weight": c},
                {"virtualNodeRef": {"name": "podinfo-primary"}, "weight": p}
            ]}}}]
        })
    }

    #[test]
    fn weights_read_and_write_in_place() {
        assert_eq!(read_weight(&spec(0, 100), "podinfo"), Ok(0));
        assert_eq!(read_weight(&spec(1, 3), "podinfo"), Ok(25));
        let mut s = spec(0, 100);
        assert!(write_weight(&mut s, "podinfo", 30));
        assert_eq!(read_weight(&s, "podinfo"), Ok(30));
        assert_eq!(s["awsName"], "podinfo_test", "other fields are kept");
        assert_eq!(
            s["routes"][0]["httpRoute"]["action"]["weightedTargets"][1]["weight"],
            70
        );
    }

    fn podinfo() -> Routes {
        Routes {
            namespace: "test".into(),
            name: "podinfo".into(),
            port: 9898,
            primary_labels: [("app".to_owned(), "podinfo-primary".to_owned())].into(),
            canary_labels: [("app".to_owned(), "podinfo".to_owned())].into(),
            owner: json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo", "uid": "u-1", "controller": true}),
            router: crate::router::RouterKind::AppMesh,
            http_route: crate::router::HttpRouteRef::Own { gateway: None },
        }
    }

    #[test]
    fn mesh_objects_follow_flaggers_model() {
        let r = podinfo();
        let nodes = virtual_nodes(&r);
        assert_eq!(
            nodes[0].1["spec"]["serviceDiscovery"]["dns"]["hostname"],
            "podinfo-primary.test.svc.cluster.local"
        );
        assert_eq!(
            nodes[1].1["spec"]["podSelector"]["matchLabels"]["app"],
            "podinfo"
        );
        let router = virtual_router(&r);
        assert_eq!(read_weight(&router["spec"], "podinfo"), Ok(0));
        assert_eq!(router["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            virtual_service(&r)["spec"]["provider"]["virtualRouter"]["virtualRouterRef"]["name"],
            "podinfo"
        );
        let kinds: Vec<String> = AppMesh::objects(&r)
            .into_iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        assert_eq!(
            kinds,
            [
                "VirtualNode podinfo-primary",
                "VirtualNode podinfo-canary",
                "VirtualRouter podinfo",
                "VirtualService podinfo"
            ]
        );
    }

    #[test]
    fn a_router_meshcanary_did_not_shape_is_malformed() {
        assert!(read_weight(&json!({"routes": []}), "podinfo").is_err());
        assert!(read_weight(&spec(0, 0), "podinfo").is_err());
        let mut s = spec(0, 100);
        assert!(!write_weight(&mut s, "other", 5));
    }
}
