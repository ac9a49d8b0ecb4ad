//! Kubernetes discovery: the Envoy sidecars on this node that belong to opted-in workloads.
//!
//! Three kube-runtime reflectors keep local caches: Pods with `spec.nodeName=$NODE_NAME`
//! (so each agent sees only its node's pods), Namespaces matching the mesh label selector,
//! and Deployments' metadata only (for the opt-in annotation). Once a second the target set is derived
//! from the caches by the pure [`targets`] and published on a watch channel when it
//! changes; the agent starts and stops scrape tasks from it.
//!
//! A pod is a target when it runs in a mesh namespace, is Running with an IP, has an Envoy
//! sidecar (its [`DataPlane`]: `istio-proxy` is Istio's, `--envoy-container` App Mesh's, or
//! what `meshcanary.io/data-plane` or `--data-plane` says), and its Deployment (through its ReplicaSet: `NAME-<pod-template-hash>`) is
//! opted in (role `canary`), or is `NAME-primary` of an opted-in `NAME` (role `primary`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;

use super::{DataPlane, Target, ISTIO_CONTAINER};
use crate::annotations;
use crate::placement::deployment_of;
use crate::window::{Role, WindowKey};
use crate::workload::WorkloadId;

/// What discovery needs to know.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub node_name: String,
    /// Label selector of mesh namespaces.
    pub namespace_selector: String,
    pub envoy_container: String,
    /// The data plane of every pod (`--data-plane`); `None` detects it per pod.
    pub data_plane: Option<DataPlane>,
}

/// Why a pod on this node is not a target (for debug logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    NotMeshNamespace,
    NotRunning,
    NoEnvoy,
    NoDeployment,
    NotOptedIn,
    BadAdminPort,
    /// `meshcanary.io/data-plane` names no data plane, or `meshcanary.io/cluster-regex`
    /// is not a regex.
    BadDataPlane,
}

/// The data plane of a pod: its annotation, else `forced`, else what is injected into it;
/// `None` when the sidecar it needs is not there.
fn data_plane_of(
    pod: &Pod,
    envoy_container: &str,
    forced: Option<&DataPlane>,
) -> Result<DataPlane, Skip> {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter());
    // Istio's native sidecar mode injects istio-proxy as a restartable init container.
    let init = spec
        .into_iter()
        .flat_map(|s| s.init_containers.iter().flatten());
    let has = |name: &str| {
        containers
            .clone()
            .chain(init.clone())
            .any(|c| c.name == name)
    };
    let annotations = pod.annotations();
    let mut kind = match annotations.get(annotations::DATA_PLANE) {
        Some(v) => DataPlane::named(v.trim()).ok_or(Skip::BadDataPlane)?,
        None => match forced {
            Some(kind) => kind.clone(),
            None if has(ISTIO_CONTAINER) => DataPlane::Istio,
            None => DataPlane::AppMesh,
        },
    };
    match &mut kind {
        DataPlane::AppMesh if !has(envoy_container) => return Err(Skip::NoEnvoy),
        DataPlane::Istio if !has(ISTIO_CONTAINER) => return Err(Skip::NoEnvoy),
        DataPlane::Envoy { cluster_regex } => {
            if let Some(re) = annotations.get(annotations::CLUSTER_REGEX) {
                regex::Regex::new(re).map_err(|_| Skip::BadDataPlane)?;
                *cluster_regex = Some(re.clone());
            }
        }
        _ => {}
    }
    Ok(kind)
}

/// The target a pod is, or why it is not one. Pure.
///
/// ### Errors
/// The [`Skip`] reason.
pub fn target_of(
    pod: &Pod,
    mesh_namespaces: &BTreeSet<String>,
    opted_in: &BTreeSet<WorkloadId>,
    envoy_container: &str,
    forced: Option<&DataPlane>,
) -> Result<Target, Skip> {
    let ns = pod.namespace().unwrap_or_default();
    if !mesh_namespaces.contains(&ns) {
        return Err(Skip::NotMeshNamespace);
    }
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    let Some(ip) = ip.filter(|_| running && pod.metadata.deletion_timestamp.is_none()) else {
        return Err(Skip::NotRunning);
    };
    let data_plane = data_plane_of(pod, envoy_container, forced)?;
    let deployment = deployment_of(pod).ok_or(Skip::NoDeployment)?;
    let (workload, role) = if opted_in.contains(&WorkloadId::new(&*ns, &*deployment)) {
        (deployment, Role::Canary)
    } else {
        match deployment.strip_suffix("-primary") {
            Some(base) if opted_in.contains(&WorkloadId::new(&*ns, base)) => {
                (base.to_owned(), Role::Primary)
            }
            _ => return Err(Skip::NotOptedIn),
        }
    };
    let port = annotations::envoy_admin_port(pod.annotations(), data_plane.default_port())
        .map_err(|_| Skip::BadAdminPort)?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Ok(Target {
        id: format!("{ns}/{}", pod.name_any()),
        key: WindowKey {
            namespace: ns,
            workload,
            role,
        },
        admin_url: format!("http://{host}:{port}"),
        pod: pod.name_any(),
        data_plane,
    })
}

/// Every target among `pods`, sorted by id. Pure.
pub fn targets(
    pods: &[impl std::borrow::Borrow<Pod>],
    mesh_namespaces: &BTreeSet<String>,
    opted_in: &BTreeSet<WorkloadId>,
    envoy_container: &str,
    forced: Option<&DataPlane>,
) -> Vec<Target> {
    let mut out: Vec<Target> = pods
        .iter()
        .filter_map(|p| {
            target_of(
                p.borrow(),
                mesh_namespaces,
                opted_in,
                envoy_container,
                forced,
            )
            .ok()
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The opted-in Deployments (namespace, name) among `deployments`' metadata, with those a
/// Flagger Canary has meshcanary run ([`annotations::CANARY`]). Pure.
pub fn opted_in<'a>(deployments: impl IntoIterator<Item = &'a ObjectMeta>) -> BTreeSet<WorkloadId> {
    deployments
        .into_iter()
        .filter(|m| m.annotations.as_ref().is_some_and(annotations::managed))
        .map(|m| {
            WorkloadId::new(
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Keep a reflector's store filled until `shutdown`; errors are logged and retried with
/// backoff.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    shutdown: watch::Receiver<bool>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects();
    crate::shutdown::spawn_until(stream, shutdown, move |error| {
        tracing::warn!(%error, what, "Watch failed; retrying");
    });
    store
}

/// Start discovery; the receiver holds the current targets (empty until the caches sync).
pub fn start(
    client: Client,
    config: DiscoveryConfig,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Vec<Target>> {
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name)),
        "pods",
        shutdown.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().labels(&config.namespace_selector),
        "namespaces",
        shutdown.clone(),
    );
    // Metadata only: the agent reads the opt-in annotation and nothing else of a
    // Deployment (a fraction of the bytes and memory of full objects).
    let deployments = reflect(
        Api::<PartialObjectMeta<Deployment>>::all(client),
        watcher::Config::default(),
        "deployments",
        shutdown.clone(),
    );
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        for store in [
            pods.wait_until_ready().await,
            namespaces.wait_until_ready().await,
            deployments.wait_until_ready().await,
        ] {
            if store.is_err() {
                return;
            }
        }
        tracing::info!(node = %config.node_name, "Discovery caches synced");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = crate::shutdown::stopping(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            let mesh: BTreeSet<String> = namespaces.state().iter().map(|n| n.name_any()).collect();
            let next = targets(
                &pods.state(),
                &mesh,
                &opted_in(deployments.state().iter().map(|d| &d.metadata)),
                &config.envoy_container,
                config.data_plane.as_ref(),
            );
            tx.send_if_modified(|current: &mut Vec<Target>| {
                if *current == next {
                    return false;
                }
                let before: BTreeMap<&str, &Target> = current.iter().map(|t| (t.id.as_str(), t)).collect();
                for t in &next {
                    if !before.contains_key(t.id.as_str()) {
                        tracing::info!(target_id = %t.id, key = %t.key, url = %t.admin_url, "Target discovered");
                    }
                }
                *current = next.clone();
                true
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, rs: &str, hash: &str, extra: serde_json::Value) -> Pod {
        let mut p = json!({
            "metadata": {"name": format!("{rs}-abcde"), "namespace": ns,
                          "labels": {"pod-template-hash": hash},
                          "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "u", "controller": true}]},
            "spec": {"containers": [{"name": "app"}, {"name": "envoy"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        });
        if let Some(a) = extra.get("annotations") {
            p["metadata"]["annotations"] = a.clone();
        }
        if let Some(s) = extra.get("status") {
            p["status"] = s.clone();
        }
        serde_json::from_value(p).unwrap()
    }

    fn dep(ns: &str, name: &str, enabled: bool) -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns,
            "annotations": {"meshcanary.io/enabled": enabled.to_string()}}}))
        .unwrap()
    }

    #[test]
    fn roles_come_from_the_owning_deployment() {
        let mesh: BTreeSet<String> = ["test".to_owned()].into();
        let pods = vec![
            pod("test", "podinfo-5d8f7", "5d8f7", json!({})),
            pod(
                "test",
                "podinfo-primary-77c9",
                "77c9",
                json!({"annotations": {"meshcanary.io/envoy-admin-port": "15000"}}),
            ),
            pod("test", "other-1234", "1234", json!({})),
            pod(
                "test",
                "podinfo-5d8f7",
                "5d8f7",
                json!({"status": {"phase": "Pending"}}),
            ),
            pod("elsewhere", "podinfo-5d8f7", "5d8f7", json!({})),
        ];
        let deps = [
            dep("test", "podinfo", true),
            dep("test", "podinfo-primary", false),
            dep("test", "other", false),
            dep("elsewhere", "podinfo", true),
        ];
        let t = targets(
            &pods,
            &mesh,
            &opted_in(deps.iter().map(|d| &d.metadata)),
            "envoy",
            None,
        );
        assert_eq!(t.len(), 2, "{t:#?}");
        assert_eq!(t[0].key.to_string(), "test/podinfo/canary");
        assert_eq!(t[0].admin_url, "http://10.0.0.7:9901");
        assert_eq!(t[1].key.to_string(), "test/podinfo/primary");
        assert_eq!(t[1].admin_url, "http://10.0.0.7:15000");
    }

    #[test]
    fn each_reason_to_skip_is_named() {
        let mesh: BTreeSet<String> = ["test".to_owned()].into();
        let opted: BTreeSet<WorkloadId> = [WorkloadId::new("test", "podinfo")].into();
        let check = |p: Pod| target_of(&p, &mesh, &opted, "envoy", None).err();
        assert_eq!(
            check(pod("x", "podinfo-1", "1", json!({}))),
            Some(Skip::NotMeshNamespace)
        );
        assert_eq!(
            check(pod(
                "test",
                "podinfo-1",
                "1",
                json!({"status": {"phase": "Running"}})
            )),
            Some(Skip::NotRunning)
        );
        assert_eq!(
            check(pod("test", "other-1", "1", json!({}))),
            Some(Skip::NotOptedIn)
        );
        assert_eq!(
            check(pod(
                "test",
                "podinfo-1",
                "1",
                json!({"annotations": {"meshcanary.io/envoy-admin-port": "x"}})
            )),
            Some(Skip::BadAdminPort)
        );
        let mut p = pod("test", "podinfo-1", "1", json!({}));
        p.spec
            .as_mut()
            .unwrap()
            .containers
            .retain(|c| c.name != "envoy");
        assert_eq!(check(p), Some(Skip::NoEnvoy));
        let mut p = pod("test", "podinfo-1", "1", json!({}));
        p.metadata.owner_references = None;
        assert_eq!(check(p), Some(Skip::NoDeployment));
        assert_eq!(check(pod("test", "podinfo-1", "1", json!({}))), None);
        assert_eq!(
            check(pod(
                "test",
                "podinfo-1",
                "1",
                json!({"annotations": {"meshcanary.io/data-plane": "linkerd"}})
            )),
            Some(Skip::BadDataPlane)
        );
    }

    /// A pod as Istio's injector leaves it: `istio-proxy` as a container, or as a native
    /// sidecar (a restartable init container).
    fn istio_pod(native: bool, annotations: serde_json::Value) -> Pod {
        let mut p = pod(
            "test",
            "podinfo-1",
            "1",
            json!({"annotations": annotations}),
        );
        let spec = p.spec.as_mut().unwrap();
        spec.containers.retain(|c| c.name != "envoy");
        let proxy: k8s_openapi::api::core::v1::Container =
            serde_json::from_value(json!({"name": "istio-proxy"})).unwrap();
        if native {
            spec.init_containers = Some(vec![proxy]);
        } else {
            spec.containers.push(proxy);
        }
        p
    }

    #[test]
    fn the_data_plane_comes_from_what_is_injected() {
        let mesh: BTreeSet<String> = ["test".to_owned()].into();
        let opted: BTreeSet<WorkloadId> = [WorkloadId::new("test", "podinfo")].into();
        let of = |p: &Pod, forced: Option<&DataPlane>| target_of(p, &mesh, &opted, "envoy", forced);
        for native in [false, true] {
            let t = of(&istio_pod(native, json!({})), None).unwrap();
            assert_eq!(t.data_plane, DataPlane::Istio);
            assert_eq!(
                t.admin_url, "http://10.0.0.7:15090",
                "Istio's merged stats port"
            );
        }
        let t = of(&pod("test", "podinfo-1", "1", json!({})), None).unwrap();
        assert_eq!(
            (t.data_plane, t.admin_url.as_str()),
            (DataPlane::AppMesh, "http://10.0.0.7:9901")
        );
        // Forced by flag: an App Mesh pod is not Istio's.
        assert_eq!(
            of(
                &pod("test", "podinfo-1", "1", json!({})),
                Some(&DataPlane::Istio)
            )
            .err(),
            Some(Skip::NoEnvoy)
        );
        // A plain Envoy, named by annotation, with its own port and regex.
        let plain = pod(
            "test",
            "podinfo-1",
            "1",
            json!({"annotations": {"meshcanary.io/data-plane": "envoy",
                "meshcanary.io/envoy-admin-port": "19000", "meshcanary.io/cluster-regex": "^local_app$"}}),
        );
        let t = of(&plain, None).unwrap();
        assert_eq!(
            t.data_plane,
            DataPlane::Envoy {
                cluster_regex: Some("^local_app$".into())
            }
        );
        assert_eq!(t.admin_url, "http://10.0.0.7:19000");
        let bad = pod(
            "test",
            "podinfo-1",
            "1",
            json!({"annotations": {"meshcanary.io/data-plane": "envoy", "meshcanary.io/cluster-regex": "(("}}),
        );
        assert_eq!(of(&bad, None).err(), Some(Skip::BadDataPlane));
    }
}
