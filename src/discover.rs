//! Stage 1, discover: which Envoy sidecars this agent scrapes, and what each one serves.
//!
//! Targets are given statically (`--target ns/workload/role=http://host:9901`, for local use)
//! or found by the Kubernetes pod watch of this node ([`pods`]); both give the same
//! [`Target`] shape, so nothing downstream knows which.

pub mod pods;

use crate::window::{Role, WindowKey};

/// Namespace used when a static target names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One Envoy sidecar to scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Unique and stable while the target lives (the pod name, or `host:port` for static ones).
    pub id: String,
    /// The window its traffic folds into.
    pub key: WindowKey,
    /// Envoy admin base URL, e.g. `http://10.0.3.7:9901`.
    pub admin_url: String,
    /// The pod's name (`kubernetes_pod_name`); for static targets the same as `id`.
    pub pod: String,
    /// What kind of sidecar it is: how its stats name the inbound cluster.
    pub data_plane: DataPlane,
}

/// The container Istio injects.
pub const ISTIO_CONTAINER: &str = "istio-proxy";
/// Istio's inbound clusters: `inbound|PORT||` (the service name part is empty for sidecars).
pub const ISTIO_INBOUND: &str = r"^inbound\|[0-9]+\|\|";
/// Where Istio's sidecar serves Envoy's stats merged for Prometheus.
pub const ISTIO_STATS_PORT: u16 = 15090;

/// The kind of Envoy sidecar a pod runs, chosen from what is injected into it
/// (`meshcanary.io/data-plane` or the agent's `--data-plane` to say it outright).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DataPlane {
    /// App Mesh's `envoy` container: admin port 9901, inbound clusters `cds_ingress_*`
    /// (`--cluster-regex`), Envoy's default tag names.
    #[default]
    AppMesh,
    /// Istio's `istio-proxy`: stats on :15090, inbound clusters `inbound|PORT||`, Istio's tag
    /// names (`cluster_name`, `response_code`).
    Istio,
    /// Any other Envoy: admin port from `meshcanary.io/envoy-admin-port` and inbound cluster
    /// regex from `meshcanary.io/cluster-regex` (else `--cluster-regex`).
    Envoy { cluster_regex: Option<String> },
}

impl DataPlane {
    /// The names users write (annotation and flag).
    pub const NAMES: [&'static str; 3] = ["app-mesh", "istio", "envoy"];

    pub fn name(&self) -> &'static str {
        match self {
            DataPlane::AppMesh => "app-mesh",
            DataPlane::Istio => "istio",
            DataPlane::Envoy { .. } => "envoy",
        }
    }

    /// The port the stats are scraped on unless the pod says otherwise.
    pub fn default_port(&self) -> u16 {
        match self {
            DataPlane::Istio => ISTIO_STATS_PORT,
            _ => crate::annotations::DEFAULT_ENVOY_ADMIN_PORT,
        }
    }

    /// The kind named `name` (an `envoy` kind without its own regex).
    pub fn named(name: &str) -> Option<DataPlane> {
        match name {
            "app-mesh" => Some(DataPlane::AppMesh),
            "istio" => Some(DataPlane::Istio),
            "envoy" => Some(DataPlane::Envoy {
                cluster_regex: None,
            }),
            _ => None,
        }
    }
}

impl Target {
    /// `host:port` of the admin URL: the `instance` label, as Prometheus would set it.
    pub fn instance(&self) -> &str {
        self.admin_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
    }
}

/// Parse `[namespace/]workload/role=URL`.
///
/// ### Errors
/// A message naming the part that is wrong and the expected form.
pub fn parse_static_target(spec: &str) -> Result<Target, String> {
    let form = "expected [namespace/]workload/role=http://host:port";
    let (who, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("target {spec:?}: missing '=URL' ({form})"))?;
    let parts: Vec<&str> = who.split('/').collect();
    let (namespace, workload, role) = match parts.as_slice() {
        [w, r] => (DEFAULT_NAMESPACE, *w, *r),
        [n, w, r] => (*n, *w, *r),
        _ => return Err(format!("target {spec:?}: {form}")),
    };
    if namespace.is_empty() || workload.is_empty() {
        return Err(format!(
            "target {spec:?}: empty namespace or workload ({form})"
        ));
    }
    let role: Role = role.parse().map_err(|e| format!("target {spec:?}: {e}"))?;
    let id = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if id.is_empty() {
        return Err(format!("target {spec:?}: empty URL ({form})"));
    }
    Ok(Target {
        pod: id.clone(),
        id,
        key: WindowKey {
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            role,
        },
        admin_url: url.to_owned(),
        data_plane: DataPlane::AppMesh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_targets() {
        let t = parse_static_target("podinfo/canary=http://127.0.0.1:9901").unwrap();
        assert_eq!(t.key.to_string(), "default/podinfo/canary");
        assert_eq!(t.id, "127.0.0.1:9901");
        let t = parse_static_target("test/podinfo/primary=http://10.0.0.1:9901/").unwrap();
        assert_eq!(t.key.namespace, "test");
        assert_eq!(t.key.role, Role::Primary);
        for bad in [
            "podinfo/canary",
            "podinfo=http://x:1",
            "a/b/c/d=http://x:1",
            "podinfo/blue=http://x:1",
            "/canary=http://x:1",
            "podinfo/canary=",
        ] {
            assert!(parse_static_target(bad).is_err(), "{bad}");
        }
    }
}
