//! The lab: the whole loop on real components, for the lab test, `examples/lab.rs` (the
//! demo and the time-to-rollback benchmark).
//!
//! - a real control plane (etcd, kube-apiserver, kube-controller-manager) and the kubelet
//!   stand-in, with two nodes: `node-a` runs the primary pods, `node-b` the canary pods;
//! - per role, the test app behind a real Envoy sidecar on its own loopback address (the
//!   pod IP the kubelet stand-in reports for that role's pods; one pod per role);
//! - a gateway Envoy in front of both (the apex), whose weighted route follows the
//!   VirtualRouter: the stand-in for App Mesh's controller watches the VirtualRouter and
//!   rewrites the gateway's file-based route configuration atomically (write, then rename;
//!   Envoy reloads it from the watched directory);
//! - or, with [`LabOptions::router`] `gateway-api`, the Istio and Gateway API shape: the
//!   sidecars are real Envoys configured with Istio's names and ports (`istio-proxy`
//!   container, stats on :15090, `inbound|9898||`, Istio's tag names), the namespace is
//!   labelled `istio-injection=enabled`, the controllers run `--router gateway-api`, and
//!   podinfo's HTTPRoute attaches to the Gateway `apex`; the gateway Envoy follows that
//!   route's weights and its stand-in controller marks the route Accepted, as a Gateway API
//!   implementation does;
//! - one `meshcanary agent` process per node, as the DaemonSet's pods: a Pod object per
//!   agent (so the controller finds them), the agents' read-only ServiceAccount with the
//!   RBAC of `manifests/` (impersonated);
//! - two `meshcanary controller` processes, as the Deployment's replicas: the controller's
//!   ServiceAccount (impersonated), one Lease between them, and a token with the peer
//!   audience from the TokenRequest API (what the projected volume holds in a cluster).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use meshcanary::rollout::Status;
use meshcanary::router::RouterKind;

use super::kube::{ControlPlane, Kubelet, Placement};
use super::{free_port, App, Sidecar, TempDir};

/// The namespace the lab's workload runs in.
pub const NAMESPACE: &str = "test";
pub const WORKLOAD: &str = "podinfo";
const NODES: [&str; 2] = ["node-a", "node-b"];
/// The agents' statsd port when the sink is on.
const STATSD_PORT: u16 = meshcanary::statsd::DEFAULT_PORT;

/// How the lab is laid out.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// The `meshcanary` binary the agents run.
    pub meshcanary: PathBuf,
    /// The first three octets of the lab's loopback addresses (`127.0.0` gives 127.0.0.2
    /// for the primary pod, .3 for the canary pod, .4 and .5 for the agents, .6 and .7 for
    /// the controllers).
    pub net: String,
    pub decision_interval: Duration,
    pub lease_duration: Duration,
    /// The agents' window (the checks' analysis window).
    pub window: Duration,
    /// Where agents write their logs (and the lab its files).
    pub dir: Option<PathBuf>,
    /// Run Prometheus as the agents' remote-write receiver (full tier every 5 s).
    pub prometheus: bool,
    /// App Mesh (a VirtualRouter, App Mesh's sidecars) or the Gateway API (an HTTPRoute,
    /// Istio's sidecars).
    pub router: RouterKind,
    /// Sidecars send per-request latency to their node's agent through Envoy's DogStatsD
    /// sink (agents listen on port 8125 of their address).
    pub statsd: bool,
    /// The sidecars' stats flush interval, which is when their Prometheus histograms move:
    /// 1 s here by default, to keep tests short; Envoy's (and App Mesh's, Istio's) is 5 s.
    pub envoy_flush: String,
}

impl LabOptions {
    pub fn new(meshcanary: PathBuf) -> Self {
        LabOptions {
            meshcanary,
            net: format!("127.{}.{}", 100 + fastrand::u8(..100), fastrand::u8(1..250)),
            decision_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(5),
            window: Duration::from_secs(10),
            dir: None,
            prometheus: true,
            router: RouterKind::AppMesh,
            statsd: false,
            envoy_flush: "1s".into(),
        }
    }
}

/// One role's pod: the test app behind its sidecar.
pub struct PodSide {
    pub ip: String,
    pub app: App,
    pub sidecar: Sidecar,
}

/// A `meshcanary agent` or `meshcanary controller` process.
pub struct AgentProcess {
    pub node: String,
    pub pod: String,
    pub ip: String,
    child: Option<Child>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
}

impl AgentProcess {
    fn spawn(&mut self, bin: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(bin)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting meshcanary agent");
        self.child = Some(child);
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}:9102/metrics", self.ip)
    }

    /// SIGKILL: no Lease release, no drain.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway Envoy and its route file.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.follower.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running lab. Everything stops when it is dropped.
pub struct Lab {
    pub options: LabOptions,
    pub agents: BTreeMap<String, AgentProcess>,
    /// The controller replicas, by pod name.
    pub controllers: BTreeMap<String, AgentProcess>,
    pub gateway: Gateway,
    pub primary: PodSide,
    pub canary: PodSide,
    /// Envoy admin port of both sidecars (on their own IPs), set on the pod template.
    pub admin_port: u16,
    kubelet: Kubelet,
    pub client: Client,
    pub cp: ControlPlane,
    /// The agents' remote-write receiver, if [`LabOptions::prometheus`].
    pub prometheus: Option<super::Prometheus>,
    pub dir: PathBuf,
    /// A Flagger Canary says podinfo's policy: its Deployment has no meshcanary.io/ keys.
    pub from_canary: bool,
    _tmp: Option<TempDir>,
}

impl Lab {
    pub async fn start(options: LabOptions) -> Lab {
        let (tmp, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d).expect("lab dir");
                (None, d.clone())
            }
            None => {
                let t = TempDir::new("lab");
                let p = t.path.clone();
                (Some(t), p)
            }
        };
        let net = options.net.clone();
        let ip = |n: u8| format!("{net}.{n}");
        let cp = ControlPlane::start().await;
        cp.mesh_namespace(NAMESPACE).await;
        let istio = options.router == RouterKind::GatewayApi;
        if istio {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
                Api::all(cp.client().await);
            let label = serde_json::json!({"metadata": {"labels": {"istio-injection": "enabled"}}});
            namespaces
                .patch(NAMESPACE, &PatchParams::default(), &Patch::Merge(&label))
                .await
                .expect("labelling the namespace for Istio");
        }
        let manifests = super::repo().join("manifests");
        cp.kubectl(&[
            "apply",
            "-f",
            manifests.join("namespace.yaml").to_str().unwrap(),
        ]);
        cp.kubectl(&["apply", "-f", manifests.join("rbac.yaml").to_str().unwrap()]);
        // A cluster without Flagger: meshcanary's copy of its Canary CRD.
        cp.kubectl(&[
            "apply",
            "-k",
            manifests.join("canary-crd").to_str().unwrap(),
        ]);
        let (primary_ip, canary_ip) = (ip(2), ip(3));
        let placement: Placement = {
            let (primary_ip, canary_ip) = (primary_ip.clone(), canary_ip.clone());
            Arc::new(move |pod: &Pod| {
                let annotated = pod
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("lab.meshcanary.io/pod-ip"))
                    .cloned();
                let bound = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                if let (Some(ip), Some(node)) = (annotated, bound) {
                    return (node, ip);
                }
                let primary = pod
                    .metadata
                    .name
                    .as_deref()
                    .unwrap_or_default()
                    .contains("-primary-");
                if primary {
                    ("node-a".into(), primary_ip.clone())
                } else {
                    ("node-b".into(), canary_ip.clone())
                }
            })
        };
        let client = cp.client().await;
        let kubelet = Kubelet::start(client.clone(), placement);
        // The pods' sidecars: one admin port for both (it is on the pod template). Istio's
        // serve their stats on its own port, 15090, on each pod's address.
        let admin_port = free_port();
        let stats_port = istio.then_some(meshcanary::discover::ISTIO_STATS_PORT);
        // Each pod's node agent: node-a (the primary) is at .4, node-b (the canary) at .5.
        let statsd = options.statsd;
        let flush = options.envoy_flush.as_str();
        let side = |ip: String, role: &'static str, agent: String| async move {
            let app = App::start().await;
            let sink = format!("{agent}:{STATSD_PORT}");
            let sidecar = Sidecar::start_at(
                &ip,
                admin_port,
                free_port(),
                app.port,
                &format!("{WORKLOAD}-{role}"),
                flush,
                stats_port,
                statsd.then_some(sink.as_str()),
            )
            .await;
            PodSide { ip, app, sidecar }
        };
        let primary = side(primary_ip, "primary", ip(4)).await;
        let canary = side(canary_ip, "canary", ip(5)).await;
        let gateway = Gateway::start(&dir, &client, &primary, &canary, options.router).await;
        let prometheus = if options.prometheus {
            Some(super::Prometheus::start().await)
        } else {
            None
        };
        let mut lab = Lab {
            prometheus,
            agents: BTreeMap::new(),
            controllers: BTreeMap::new(),
            gateway,
            primary,
            canary,
            admin_port,
            kubelet,
            client,
            cp,
            dir,
            options,
            from_canary: false,
            _tmp: tmp,
        };
        lab.start_agents().await;
        lab.start_controllers();
        lab
    }

    async fn start_agents(&mut self) {
        let kubeconfig = self.kubeconfig("agent", self.cp.agent_kubeconfig());
        for (i, node) in NODES.iter().enumerate() {
            let ip = format!("{}.{}", self.options.net, 4 + i);
            let pod_name = format!("meshcanary-{node}");
            self.create_agent_pod(node, &pod_name, &ip).await;
            let secs = |d: Duration| format!("{}ms", d.as_millis());
            let remote_write: Vec<String> = match &self.prometheus {
                Some(p) => vec![
                    "--remote-write-url".into(),
                    p.write_url(),
                    "--remote-write-queue-dir".into(),
                    self.dir.join(format!("queue-{node}")).display().to_string(),
                    "--full-interval".into(),
                    "5s".into(),
                    "--full-timeout".into(),
                    "2s".into(),
                ],
                None => vec!["--full-interval".into(), "0".into()],
            };
            let statsd: Vec<String> = if self.options.statsd {
                vec!["--statsd-listen".into(), format!("{ip}:{STATSD_PORT}")]
            } else {
                Vec::new()
            };
            let selector: Vec<String> = if self.options.router == RouterKind::GatewayApi {
                vec![
                    "--namespace-selector".into(),
                    "istio-injection=enabled".into(),
                ]
            } else {
                Vec::new()
            };
            let mut agent = AgentProcess {
                node: (*node).to_owned(),
                pod: pod_name.clone(),
                ip: ip.clone(),
                child: None,
                args: [
                    "agent",
                    "--listen",
                    &format!("{ip}:9102"),
                    "--peer-listen",
                    &format!("{ip}:9103"),
                    "--window",
                    &secs(self.options.window),
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .chain(remote_write)
                .chain(selector)
                .chain(statsd)
                .collect(),
                envs: vec![
                    ("NODE_NAME".into(), (*node).to_owned()),
                    ("POD_NAME".into(), pod_name),
                    ("POD_NAMESPACE".into(), "meshcanary".into()),
                    ("KUBECONFIG".into(), kubeconfig.to_str().unwrap().to_owned()),
                    (
                        "RUST_LOG".into(),
                        std::env::var("LAB_AGENT_LOG").unwrap_or_else(|_| "meshcanary=info".into()),
                    ),
                ],
                log: self.dir.join(format!("agent-{node}.log")),
            };
            agent.spawn(&self.options.meshcanary);
            self.agents.insert((*node).to_owned(), agent);
        }
    }

    /// A Pod object for a node's agent, as the DaemonSet creates it (the stand-in kubelet
    /// runs it at `ip`).
    async fn create_agent_pod(&self, node: &str, pod_name: &str, ip: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "meshcanary");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": pod_name,
                "labels": {"app.kubernetes.io/name": "meshcanary", "app.kubernetes.io/component": "agent"},
                "annotations": {"lab.meshcanary.io/pod-ip": ip},
            },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "meshcanary",
                "containers": [{"name": "meshcanary", "image": "meshcanary/meshcanary:0.1.0"}],
            },
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("creating an agent pod");
    }

    /// The controller replicas: the controller's ServiceAccount, a peer-audience token, one
    /// Lease between them.
    fn start_controllers(&mut self) {
        let kubeconfig = self.kubeconfig("controller", self.cp.controller_kubeconfig());
        let token = self.dir.join("peer-token");
        let out = self.cp.kubectl(&[
            "create",
            "token",
            "meshcanary-controller",
            "-n",
            "meshcanary",
            "--audience",
            "meshcanary-peers",
            "--duration",
            "2h",
        ]);
        std::fs::write(&token, out.trim()).expect("writing the peer token");
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        for i in 0..2 {
            let ip = format!("{}.{}", self.options.net, 6 + i);
            let pod = format!("meshcanary-controller-{i}");
            let mut controller = AgentProcess {
                node: String::new(),
                pod: pod.clone(),
                ip: ip.clone(),
                child: None,
                args: [
                    "controller",
                    "--listen",
                    &format!("{ip}:9102"),
                    "--peer-token-file",
                    token.to_str().unwrap(),
                    "--window",
                    &secs(self.options.window),
                    "--decision-interval",
                    &secs(self.options.decision_interval),
                    "--lease-duration",
                    &secs(self.options.lease_duration),
                    "--router",
                    self.options.router.as_str(),
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
                envs: vec![
                    ("POD_NAME".into(), pod.clone()),
                    ("POD_NAMESPACE".into(), "meshcanary".into()),
                    ("KUBECONFIG".into(), kubeconfig.to_str().unwrap().to_owned()),
                    (
                        "RUST_LOG".into(),
                        std::env::var("LAB_AGENT_LOG").unwrap_or_else(|_| "meshcanary=info".into()),
                    ),
                ],
                log: self.dir.join(format!("{pod}.log")),
            };
            controller.spawn(&self.options.meshcanary);
            self.controllers.insert(pod, controller);
        }
    }

    /// A ServiceAccount's kubeconfig (impersonated, so the processes run with exactly the
    /// RBAC of `manifests/`), written for them.
    fn kubeconfig(&self, role: &str, kc: kube::config::Kubeconfig) -> PathBuf {
        let path = self.dir.join(format!("{role}-kubeconfig"));
        // JSON is YAML.
        std::fs::write(&path, serde_json::to_vec(&kc).unwrap()).expect("kubeconfig");
        path
    }

    /// Delete a node's agent Pod and kill its process, as a drained or evicted DaemonSet
    /// pod: the controller no longer knows an agent for that node.
    pub async fn delete_agent_pod(&mut self, node: &str) {
        self.kill_agent(node);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "meshcanary");
        let name = self.agents[node].pod.clone();
        pods.delete(&name, &kube::api::DeleteParams::default().grace_period(0))
            .await
            .expect("deleting an agent pod");
        super::eventually_async(Duration::from_secs(10), "the agent pod gone", || async {
            pods.get_opt(&name).await.ok().flatten().is_none()
        })
        .await;
    }

    /// Recreate a deleted agent Pod and start its process again.
    pub async fn recreate_agent_pod(&mut self, node: &str) {
        let (pod, ip) = {
            let a = &self.agents[node];
            (a.pod.clone(), a.ip.clone())
        };
        self.create_agent_pod(node, &pod, &ip).await;
        self.restart_agent(node);
    }

    /// Kill a node's agent (SIGKILL).
    pub fn kill_agent(&mut self, node: &str) {
        self.agents.get_mut(node).expect("a lab node").kill();
    }

    /// Start a killed agent again (same pod, same identity).
    pub fn restart_agent(&mut self, node: &str) {
        let bin = self.options.meshcanary.clone();
        let agent = self.agents.get_mut(node).expect("a lab node");
        agent.kill();
        agent.spawn(&bin);
    }

    /// The identity holding the controller Lease.
    pub async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "meshcanary");
        let lease = leases.get_opt("meshcanary-leader").await.ok()??;
        let spec = lease.spec?;
        spec.holder_identity.filter(|h| !h.is_empty())
    }

    /// The controller replica holding the Lease.
    pub async fn leader_controller(&self) -> Option<String> {
        let leader = self.leader().await?;
        self.controllers.contains_key(&leader).then_some(leader)
    }

    /// Kill a controller replica (SIGKILL: no Lease release).
    pub fn kill_controller(&mut self, pod: &str) {
        self.controllers.get_mut(pod).expect("a controller").kill();
    }

    /// Start a killed controller replica again.
    pub fn restart_controller(&mut self, pod: &str) {
        let bin = self.options.meshcanary.clone();
        let c = self.controllers.get_mut(pod).expect("a controller");
        c.kill();
        c.spawn(&bin);
    }

    /// Apply a Flagger Canary (as `kubectl apply` would, server-side), once its CRD is
    /// served; from then on podinfo's Deployment carries no `meshcanary.io/` keys.
    pub async fn apply_canary(&mut self, canary: &serde_json::Value) {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            NAMESPACE,
            &meshcanary::canary::api_resource(),
        );
        let name = canary["metadata"]["name"].as_str().expect("a Canary name");
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(error) = api
            .patch(
                name,
                &PatchParams::apply("lab").force(),
                &Patch::Apply(canary),
            )
            .await
        {
            // The CRD takes a moment to be served.
            assert!(Instant::now() < deadline, "applying the Canary: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.from_canary = true;
    }

    /// Apply `podinfo` with `image` and the walkthrough's annotations plus `extra` (none
    /// when a Canary says the policy).
    pub async fn deploy(&self, image: &str, annotations: &BTreeMap<String, String>) {
        let mut a = if self.from_canary {
            serde_json::json!({})
        } else {
            serde_json::json!({
                "meshcanary.io/enabled": "true",
                "meshcanary.io/port": "9898",
            })
        };
        let istio = self.options.router == RouterKind::GatewayApi;
        if istio {
            // North-south: the route meshcanary creates attaches to the lab's Gateway.
            a["meshcanary.io/gateway"] = serde_json::json!(GATEWAY);
        }
        for (k, v) in annotations {
            a[k] = serde_json::json!(v);
        }
        // Istio's injector adds istio-proxy to the pod (here the template already has it);
        // its stats are on 15090, the istio data plane's default port.
        let (sidecar, pod_annotations) = if istio {
            ("istio-proxy", serde_json::json!({}))
        } else {
            (
                "envoy",
                serde_json::json!({"meshcanary.io/envoy-admin-port": self.admin_port.to_string()}),
            )
        };
        let d = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": WORKLOAD, "namespace": NAMESPACE, "annotations": a},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": WORKLOAD}},
                "template": {
                    "metadata": {
                        "labels": {"app": WORKLOAD},
                        "annotations": pod_annotations,
                    },
                    "spec": {"containers": [
                        {"name": WORKLOAD, "image": image, "ports": [{"containerPort": 9898}]},
                        {"name": sidecar, "image": "envoy:v1.40"},
                    ]},
                },
            },
        });
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        api.patch(
            WORKLOAD,
            &PatchParams::apply("lab").force(),
            &Patch::Apply(&d),
        )
        .await
        .expect("applying podinfo");
    }

    pub async fn status(&self) -> Option<Status> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let d = api.get_opt(WORKLOAD).await.ok()??;
        let s = d.metadata.annotations?.get("meshcanary.io/status")?.clone();
        serde_json::from_str(&s).ok()
    }

    /// The canary weight in the VirtualRouter, or the HTTPRoute.
    pub async fn router_weight(&self) -> Option<u8> {
        read_router_weight(&self.client, self.options.router).await
    }

    /// Requests the gateway has sent to the canary so far.
    pub async fn gateway_canary_requests(&self) -> u64 {
        let url = format!(
            "http://127.0.0.1:{}/stats?filter=^cluster\\.{WORKLOAD}-canary\\.upstream_rq_total$",
            self.gateway.admin_port
        );
        super::get(&url)
            .await
            .ok()
            .and_then(|(_, body)| body.rsplit(": ").next()?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The apex: the gateway's listener.
    pub fn apex_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway.port)
    }

    /// `hey` against `url` (bounded: it stops by itself after `duration`).
    pub fn hey(&self, url: &str, concurrency: u32, qps: u32, duration: Duration) -> Hey {
        let bin = std::env::var_os("HEY_BIN").unwrap_or_else(|| "hey".into());
        let child = Command::new(bin)
            .args(["-z", &format!("{}s", duration.as_secs().max(1))])
            .args(["-c", &concurrency.to_string(), "-q", &qps.to_string()])
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting hey (Debian package `hey`)");
        Hey(child)
    }

    /// meshcanary's Kubernetes events about `podinfo`, oldest first.
    pub async fn events(&self) -> Vec<LabEvent> {
        use k8s_openapi::api::events::v1::Event;
        let api: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let mut list: Vec<Event> = api
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        // meshcanary's own events, as `kubectl describe canary` shows Flagger's.
        list.retain(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(WORKLOAD)
                && e.reporting_controller.as_deref() == Some("meshcanary")
        });
        list.sort_by_key(|e| {
            e.series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or(e.event_time.as_ref().map(|t| t.0))
        });
        list.into_iter()
            .map(|e| LabEvent {
                id: format!(
                    "{}/{}",
                    e.metadata.name.unwrap_or_default(),
                    e.series.as_ref().map_or(1, |s| s.count)
                ),
                type_: e.type_.unwrap_or_default(),
                reason: e.reason.unwrap_or_default(),
                note: e.note.unwrap_or_default(),
            })
            .collect()
    }

    /// Wait for `cond` on the status, polling every 100 ms.
    pub async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        cond: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.status().await {
                if cond(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status {:?}; agent logs in {}",
                self.status().await,
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One Kubernetes event of the workload; `id` changes when a series repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabEvent {
    pub id: String,
    pub type_: String,
    pub reason: String,
    pub note: String,
}

/// A running `hey`, stopped when dropped.
pub struct Hey(Child);

impl Drop for Hey {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Gateway the lab's HTTPRoute attaches to (in the route's namespace).
pub const GATEWAY: &str = "apex";
/// The controller name the lab's Gateway API stand-in writes into route status.
const GATEWAY_CONTROLLER: &str = "lab.meshcanary.io/gateway";

async fn read_router_weight(client: &Client, router: RouterKind) -> Option<u8> {
    match router {
        RouterKind::AppMesh => {
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                NAMESPACE,
                &meshcanary::router::appmesh::resource("VirtualRouter"),
            );
            let vr = api.get_opt(WORKLOAD).await.ok()??;
            meshcanary::router::appmesh::read_weight(vr.data.get("spec")?, WORKLOAD).ok()
        }
        RouterKind::GatewayApi => {
            let route = http_routes(client).get_opt(WORKLOAD).await.ok()??;
            meshcanary::router::gatewayapi::read_weight(
                route.data.get("spec")?,
                NAMESPACE,
                WORKLOAD,
            )
            .ok()
        }
    }
}

fn http_routes(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &meshcanary::router::gatewayapi::resource("v1"),
    )
}

/// As a Gateway API implementation does: mark podinfo's route Accepted by the Gateway
/// `apex`, once it names it and has no such status yet.
async fn accept_route(client: &Client) {
    let routes = http_routes(client);
    let Ok(Some(route)) = routes.get_opt(WORKLOAD).await else {
        return;
    };
    let attached = route.data["spec"]["parentRefs"]
        .as_array()
        .is_some_and(|p| p.iter().any(|r| r["name"] == GATEWAY));
    let accepted = route.data["status"]["parents"]
        .as_array()
        .is_some_and(|p| p.iter().any(|s| s["controllerName"] == GATEWAY_CONTROLLER));
    if !attached || accepted {
        return;
    }
    let status = accepted_status(route.metadata.generation.unwrap_or(1));
    if let Err(e) = routes
        .patch_status(WORKLOAD, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        eprintln!("lab: marking the HTTPRoute accepted failed: {e}");
    }
}

/// The status a Gateway API implementation writes for a route the Gateway `apex` accepts.
pub fn accepted_status(generation: i64) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    serde_json::json!({"status": {"parents": [{
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY},
        "controllerName": GATEWAY_CONTROLLER,
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "the lab's gateway routes by it",
             "lastTransitionTime": now, "observedGeneration": generation},
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "podinfo-primary and podinfo-canary resolved",
             "lastTransitionTime": now, "observedGeneration": generation}
        ]
    }]}})
}

impl Gateway {
    async fn start(
        dir: &Path,
        client: &Client,
        primary: &PodSide,
        canary: &PodSide,
        router: RouterKind,
    ) -> Gateway {
        let routes = dir.join("gateway-routes");
        std::fs::create_dir_all(&routes).expect("route dir");
        write_routes(&routes, 0);
        let (port, admin_port) = (free_port(), free_port());
        let cluster = |name: &str, side: &PodSide| {
            format!(
                "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
                side.ip, side.sidecar.ingress_port
            )
        };
        let config = format!(
            r#"node: {{ id: gateway, cluster: gateway }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: apex
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: apex
          rds:
            route_config_name: apex
            config_source:
              resource_api_version: V3
              path_config_source:
                path: {path}
                watched_directory: {{ path: {watched} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
{primary}{canary}"#,
            path = routes.join("routes.yaml").display(),
            watched = routes.display(),
            primary = cluster(&format!("{WORKLOAD}-primary"), primary),
            canary = cluster(&format!("{WORKLOAD}-canary"), canary),
        );
        let file = dir.join("gateway.yaml");
        std::fs::write(&file, config).expect("gateway config");
        let child = Command::new(super::envoy_bin())
            .arg("-c")
            .arg(&file)
            .args(["--disable-hot-restart", "-l", "error"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("gateway.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .expect("starting the gateway Envoy");
        super::wait_ok(
            &format!("http://127.0.0.1:{admin_port}/ready"),
            Duration::from_secs(20),
            "the gateway Envoy",
        )
        .await;
        // The App Mesh controller's stand-in (follow the VirtualRouter), or the Gateway API
        // implementation's (accept the route, follow its weights).
        let client = client.clone();
        let follower = tokio::spawn(async move {
            let mut current = 0u8;
            loop {
                if router == RouterKind::GatewayApi {
                    accept_route(&client).await;
                }
                if let Some(w) = read_router_weight(&client, router).await {
                    if w != current {
                        write_routes(&routes, w);
                        current = w;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Gateway {
            port,
            admin_port,
            child,
            follower,
        }
    }
}

/// Write the gateway's route configuration for a canary weight, atomically.
fn write_routes(dir: &Path, canary_weight: u8) {
    let primary_weight = 100 - u32::from(canary_weight);
    let body = format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: apex
  virtual_hosts:
  - name: apex
    domains: ["*"]
    routes:
    - match: {{ prefix: "/" }}
      route:
        timeout: 30s
        weighted_clusters:
          clusters:
          - {{ name: {WORKLOAD}-primary, weight: {primary_weight} }}
          - {{ name: {WORKLOAD}-canary, weight: {canary_weight} }}
"#
    );
    let tmp = dir.join(".routes.yaml.tmp");
    std::fs::write(&tmp, body).expect("writing routes");
    std::fs::rename(&tmp, dir.join("routes.yaml")).expect("renaming routes");
}
