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
