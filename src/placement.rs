//! Where a workload's pods run: the controller's cache of every pod's node, stripped to what
//! it needs (name, owner, node, phase), and the pure index built from it once per tick.
//!
//! The controller uses it twice: an agent's answer counts only for workloads that have a pod
//! on that agent's node (an agent cannot speak for pods it does not host), and a workload
//! with a pod on a node whose agent does not answer halts (a node without an agent is
//! unobserved, not healthy).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;

use crate::workload::WorkloadId;

/// The Deployment that owns a pod through its ReplicaSet (`NAME-<pod-template-hash>`), by
/// name.
pub fn deployment_of(pod: &Pod) -> Option<String> {
    let rs = pod
        .owner_references()
        .iter()
        .find(|o| o.kind == "ReplicaSet" && o.controller == Some(true))?;
    match pod.labels().get("pod-template-hash") {
        Some(hash) => rs.name.strip_suffix(&format!("-{hash}")).map(str::to_owned),
        None => rs.name.rsplit_once('-').map(|(d, _)| d.to_owned()),
    }
}

/// The workload a pod serves: its Deployment `NAME`, or `NAME` for `NAME-primary`.
pub fn workload_of(pod: &Pod) -> Option<WorkloadId> {
    let deployment = deployment_of(pod)?;
    let name = deployment
        .strip_suffix("-primary")
        .map_or(deployment.as_str(), |base| base);
    Some(WorkloadId::new(pod.namespace().unwrap_or_default(), name))
}

/// Nodes per workload, of pods that are scheduled, Running and not being deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIndex {
    nodes: HashMap<WorkloadId, BTreeSet<String>>,
}

impl NodeIndex {
    /// Index `pods`. Pure.
    pub fn of(pods: &[impl std::borrow::Borrow<Pod>]) -> NodeIndex {
        let mut nodes: HashMap<WorkloadId, BTreeSet<String>> = HashMap::new();
        for pod in pods.iter().map(std::borrow::Borrow::borrow) {
            if pod.metadata.deletion_timestamp.is_some()
                || pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
            {
                continue;
            }
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if let Some(id) = workload_of(pod) {
                nodes.entry(id).or_default().insert(node);
            }
        }
        NodeIndex { nodes }
    }

    /// The nodes that run the workload's pods (empty if none).
    pub fn nodes(&self, id: &WorkloadId) -> impl Iterator<Item = &str> {
        self.nodes.get(id).into_iter().flatten().map(String::as_str)
    }

    /// Whether a pod of the workload runs on `node`.
    pub fn runs_on(&self, id: &WorkloadId, node: &str) -> bool {
        self.nodes.get(id).is_some_and(|n| n.contains(node))
    }
}

/// The pod cache. Every pod of the cluster is watched, but only its name, namespace, owner,
/// template-hash label, node and phase are kept (about 300 bytes a pod).
#[derive(Clone)]
pub struct Placement {
    store: Store<Pod>,
}

impl Placement {
    /// Start watching until `shutdown`; errors are logged and retried with backoff.
    pub fn watch(client: Client, shutdown: watch::Receiver<bool>) -> Placement {
        let (store, writer) = reflector::store::<Pod>();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<Pod>::all(client), watcher::Config::default()).modify(strip),
        )
        .default_backoff()
        .touched_objects();
        crate::shutdown::spawn_until(stream, shutdown, |error| {
            tracing::warn!(%error, "Watching pods (where workloads run) failed; retrying");
        });
        Placement { store }
    }

    /// The index now, or `None` until the first list is done.
    pub fn index(&self) -> Option<NodeIndex> {
        let state: Vec<Arc<Pod>> = self.store.state();
        if state.is_empty() && !self.synced() {
            return None;
        }
        Some(NodeIndex::of(&state))
    }

    fn synced(&self) -> bool {
        futures_util::FutureExt::now_or_never(self.store.wait_until_ready())
            .is_some_and(|r| r.is_ok())
    }
}

/// Keep only what [`NodeIndex`] reads.
fn strip(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.managed_fields = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == "pod-template-hash");
    }
    let node_name = pod.spec.as_mut().and_then(|s| s.node_name.take());
    pod.spec = Some(PodSpec {
        node_name,
        containers: Vec::new(),
        ..PodSpec::default()
    });
    let phase = pod.status.as_mut().and_then(|s| s.phase.take());
    pod.status = Some(PodStatus {
        phase,
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, rs: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{rs}-x"), "namespace": ns,
                         "labels": {"pod-template-hash": rs.rsplit_once('-').unwrap().1, "app": "a"},
                         "annotations": {"big": "x"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "u", "controller": true}]},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "i"}]},
            "status": {"phase": phase, "podIP": "10.0.0.1"}
        }))
        .unwrap()
    }

    #[test]
    fn the_index_maps_both_arms_to_the_workload_and_skips_pods_not_running() {
        let mut stripped = pod("test", "podinfo-primary-abc12", "node-a", "Running");
        strip(&mut stripped);
        assert!(stripped.metadata.annotations.is_none());
        assert_eq!(stripped.spec.as_ref().unwrap().containers.len(), 0);
        let pods = [
            stripped,
            pod("test", "podinfo-def34", "node-b", "Running"),
            pod("test", "podinfo-def34", "node-c", "Pending"),
            pod("other", "podinfo-def34", "node-d", "Running"),
        ];
        let index = NodeIndex::of(&pods);
        let id = WorkloadId::new("test", "podinfo");
        assert_eq!(index.nodes(&id).collect::<Vec<_>>(), ["node-a", "node-b"]);
        assert!(index.runs_on(&id, "node-b"));
        assert!(!index.runs_on(&id, "node-c"));
        assert!(!index.runs_on(&WorkloadId::new("test", "other"), "node-a"));
    }
}
