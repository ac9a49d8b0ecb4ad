//! The objects the controller creates for an opted-in Deployment `NAME`, built as plain
//! values (pure functions, unit-tested): `NAME-primary` and the Services `NAME`,
//! `NAME-primary`, `NAME-canary`. The routing objects are the router's ([`Routes`] is what
//! it is given). Every object has an owner reference to `NAME`, so deleting `NAME` deletes
//! them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{json, Value};

use crate::annotations;
use crate::router::{HttpRouteRef, RouterKind, Routes, Target};

/// The hash of a pod template that names a revision: FNV-1a over its JSON, in hex.
/// Stable across processes (field order is fixed by the types, maps are sorted).
pub fn template_hash(template: Option<&PodTemplateSpec>) -> String {
    let bytes = template
        .and_then(|t| serde_json::to_vec(t).ok())
        .unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What a Deployment's shape allows meshcanary to build, derived once per reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    /// The Services' port name (`http`, or a Canary's `service.portName`).
    pub port_name: String,
    /// `NAME`'s selector labels: the canary pods.
    pub canary_labels: BTreeMap<String, String>,
    /// The same with every value equal to `NAME` turned into `NAME-primary`.
    pub primary_labels: BTreeMap<String, String>,
    owner: Value,
    /// The router that carries the weights, and for the Gateway API which route.
    pub router: RouterKind,
    pub http_route: HttpRouteRef,
    /// A Canary's `autoscalerRef`: the primary gets its own copy.
    pub autoscaler: Option<crate::canary::AutoscalerRef>,
}

/// Why a Deployment cannot be bootstrapped as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("spec.selector.matchLabels needs a label whose value is the Deployment's name {0:?} (as Flagger requires), so NAME-primary can select its own pods")]
    Selector(String),
    #[error("no service port: set meshcanary.io/port or declare a containerPort on a container other than {0:?}")]
    Port(String),
    #[error("the Deployment has no uid yet")]
    Uid,
}

impl Plan {
    /// ### Errors
    /// The selector has no label valued `NAME`, no port is known, or the object is unsaved.
    pub fn new(
        dep: &Deployment,
        port: Option<u16>,
        envoy_container: &str,
    ) -> Result<Self, ShapeError> {
        let name = dep.metadata.name.clone().unwrap_or_default();
        let namespace = dep.metadata.namespace.clone().unwrap_or_default();
        let canary_labels = dep
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        if !canary_labels.values().any(|v| *v == name) {
            return Err(ShapeError::Selector(name));
        }
        let primary_labels = primary_labels(&canary_labels, &name);
        let port = match port {
            Some(p) => p,
            None => container_port(dep, envoy_container)
                .ok_or_else(|| ShapeError::Port(envoy_container.into()))?,
        };
        let uid = dep.metadata.uid.clone().ok_or(ShapeError::Uid)?;
        let owner = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
            "uid": uid,
            "controller": true,
        });
        Ok(Plan {
            name,
            namespace,
            port,
            port_name: "http".into(),
            canary_labels,
            primary_labels,
            owner,
            router: RouterKind::default(),
            http_route: HttpRouteRef::Own { gateway: None },
            autoscaler: None,
        })
    }

    /// The same plan with its weights carried by `router` (and, for the Gateway API, `route`).
    #[must_use]
    pub fn routed(mut self, (router, route): (RouterKind, HttpRouteRef)) -> Self {
        self.router = router;
        self.http_route = route;
        self
    }

    /// The same plan for a Flagger Canary: the Canary owns every object (as with Flagger,
    /// so what Flagger created for it is already its own), and the Services' port has the
    /// Canary's name.
    #[must_use]
    pub fn for_canary(
        mut self,
        canary: &kube::api::DynamicObject,
        port_name: &str,
        autoscaler: Option<crate::canary::AutoscalerRef>,
    ) -> Self {
        self.autoscaler = autoscaler;
        self.owner = json!({
            "apiVersion": format!("{}/{}", crate::canary::GROUP, crate::canary::VERSION),
            "kind": crate::canary::KIND,
            "name": canary.metadata.name,
            "uid": canary.metadata.uid,
            "controller": true,
        });
        port_name.clone_into(&mut self.port_name);
        self
    }

    /// Where the workload's weights live.
    pub fn target(&self) -> Target {
        self.routes().target()
    }

    pub fn primary_name(&self) -> String {
        format!("{}-primary", self.name)
    }

    fn meta(&self, name: &str) -> Value {
        self.routes().meta(name)
    }

    /// `NAME-primary`: `template` (the canary's, at bootstrap or promotion) with primary
    /// labels, `replicas` replicas, and the revision it was copied from.
    pub fn primary(&self, canary: &Deployment, replicas: i32) -> Value {
        let spec = canary.spec.clone().unwrap_or_default();
        let hash = template_hash(Some(&spec.template));
        let mut template = serde_json::to_value(&spec.template).unwrap_or(Value::Null);
        let mut labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels = primary_labels(&labels, &self.name);
        template["metadata"]["labels"] = json!(labels);
        let mut meta = self.meta(&self.primary_name());
        meta["annotations"] = json!({ annotations::REVISION: hash });
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": self.primary_labels},
                "template": template,
            }
        })
    }

    /// `NAME-primary`'s HorizontalPodAutoscaler: the canary's `source` (as read, in its own
    /// API version) pointed at `NAME-primary`, as Flagger copies it.
    pub fn primary_autoscaler(&self, source: &kube::api::DynamicObject) -> Value {
        let mut spec = source.data["spec"].clone();
        spec["scaleTargetRef"] = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": self.primary_name(),
        });
        let api_version = source
            .types
            .as_ref()
            .map_or("autoscaling/v2", |t| t.api_version.as_str());
        json!({
            "apiVersion": api_version,
            "kind": "HorizontalPodAutoscaler",
            "metadata": self.meta(&self.primary_name()),
            "spec": spec,
        })
    }

    /// Services `NAME` (to the primary, as Flagger's apex), `NAME-primary` and `NAME-canary`.
    pub fn services(&self) -> Vec<(String, Value)> {
        let service = |name: String, selector: &BTreeMap<String, String>| {
            let body = json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta(&name),
                "spec": {
                    "selector": selector,
                    "ports": [{"name": self.port_name, "port": self.port, "targetPort": self.port, "protocol": "TCP"}],
                }
            });
            (name, body)
        };
        vec![
            service(self.name.clone(), &self.primary_labels),
            service(self.primary_name(), &self.primary_labels),
            service(format!("{}-canary", self.name), &self.canary_labels),
        ]
    }

    /// What the router needs to build the routing objects.
    pub fn routes(&self) -> Routes {
        Routes {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: self.port,
            primary_labels: self.primary_labels.clone(),
            canary_labels: self.canary_labels.clone(),
            owner: self.owner.clone(),
            router: self.router,
            http_route: self.http_route.clone(),
        }
    }

    /// `NAME`'s uid (every object meshcanary creates names it as owner).
    pub fn owner_uid(&self) -> &str {
        self.owner["uid"].as_str().unwrap_or_default()
    }
}

/// Labels with every value equal to `name` turned into `name-primary`.
pub fn primary_labels(labels: &BTreeMap<String, String>, name: &str) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| {
            let v = if v == name {
                format!("{name}-primary")
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// The first containerPort of the first container that is not the sidecar.
fn container_port(dep: &Deployment, envoy_container: &str) -> Option<u16> {
    dep.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .filter(|c| c.name != envoy_container)
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn podinfo() -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "podinfo", "namespace": "test", "uid": "u-1",
                          "annotations": {"meshcanary.io/enabled": "true"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "template": {
                    "metadata": {"labels": {"app": "podinfo", "tier": "web"},
                                 "annotations": {"meshcanary.io/envoy-admin-port": "15000", "keep": "me"}},
                    "spec": {"containers": [
                        {"name": "envoy", "image": "envoy", "ports": [{"containerPort": 9901}]},
                        {"name": "podinfo", "image": "podinfo:6.0.0", "ports": [{"containerPort": 9898}]}
                    ]}
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_plan_derives_labels_and_port_from_the_deployment() {
        let p = Plan::new(&podinfo(), None, "envoy").unwrap();
        assert_eq!(p.port, 9898);
        assert_eq!(p.primary_labels["app"], "podinfo-primary");
        assert_eq!(p.canary_labels["app"], "podinfo");
        assert_eq!(Plan::new(&podinfo(), Some(80), "envoy").unwrap().port, 80);
        let mut d = podinfo();
        d.spec.as_mut().unwrap().selector.match_labels =
            Some([("app".to_owned(), "web".to_owned())].into());
        assert!(matches!(
            Plan::new(&d, None, "envoy"),
            Err(ShapeError::Selector(_))
        ));
    }

    #[test]
    fn the_primary_is_the_template_with_primary_labels() {
        let d = podinfo();
        let p = Plan::new(&d, None, "envoy").unwrap();
        let primary = p.primary(&d, 2);
        assert_eq!(primary["metadata"]["name"], "podinfo-primary");
        assert_eq!(
            primary["spec"]["selector"]["matchLabels"]["app"],
            "podinfo-primary"
        );
        assert_eq!(
            primary["spec"]["template"]["metadata"]["labels"]["app"],
            "podinfo-primary"
        );
        assert_eq!(
            primary["spec"]["template"]["metadata"]["labels"]["tier"],
            "web"
        );
        // Pod annotations (the Envoy admin port, say) are part of the template.
        assert_eq!(
            primary["spec"]["template"]["metadata"]["annotations"],
            json!({"meshcanary.io/envoy-admin-port": "15000", "keep": "me"})
        );
        assert_eq!(
            primary["spec"]["template"]["spec"]["containers"][1]["image"],
            "podinfo:6.0.0"
        );
        let hash = template_hash(Some(&d.spec.as_ref().unwrap().template));
        assert_eq!(
            primary["metadata"]["annotations"][annotations::REVISION],
            hash
        );
        assert_eq!(primary["metadata"]["ownerReferences"][0]["uid"], "u-1");
    }

    #[test]
    fn mesh_objects_follow_flaggers_model() {
        let p = Plan::new(&podinfo(), None, "envoy").unwrap();
        let names: Vec<String> = p.services().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["podinfo", "podinfo-primary", "podinfo-canary"]);
        assert_eq!(
            p.services()[0].1["spec"]["selector"]["app"],
            "podinfo-primary"
        );
        assert_eq!(p.routes().owner_uid(), "u-1");
    }

    #[test]
    fn the_template_hash_is_stable_and_sensitive() {
        let d = podinfo();
        let t = &d.spec.as_ref().unwrap().template;
        assert_eq!(template_hash(Some(t)), template_hash(Some(&t.clone())));
        let mut t2 = t.clone();
        t2.spec.as_mut().unwrap().containers[1].image = Some("podinfo:6.0.1".into());
        assert_ne!(template_hash(Some(t)), template_hash(Some(&t2)));
    }
}
