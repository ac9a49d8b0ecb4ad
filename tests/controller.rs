//! The rollout controller against a real kube-apiserver and kube-controller-manager, with
//! windows fed deterministically (a scripted `WindowSource`): bootstrap, promotion, rollback,
//! restart on a new revision, a killed leader resuming, two agents with leader election,
//! invalid annotations, an apiserver restart, and garbage collection.
//!
//! One control plane serves every scenario (each in its own namespace), run one after the
//! other: starting a control plane costs more than most scenarios. Each scenario is its own
//! test (`harness = false`, libtest-mimic), named by its function: a failing one fails only
//! itself, and `cargo test --test controller -- rollback` runs only that one (the control
//! plane starts only when a selected scenario needs it).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use meshcanary::cli::ControllerProcessMetrics;
use meshcanary::controller::{Controller, ControllerConfig, LeaseConfig};
use meshcanary::rollout::{Phase, Status};
use meshcanary::router::appmesh::{self, AppMesh};
use meshcanary::router::gatewayapi::GatewayApi;
use meshcanary::router::{HttpRouteRef, Router as _, RouterKind, Routers, Target};
use meshcanary::window::{Summary, Totals, WindowPair, WindowSource};
use support::kube::{ControlPlane, Kubelet};
use tokio::sync::watch;

/// Windows the test sets; every workload sees the same pair.
#[derive(Clone, Default)]
struct Script(Arc<Mutex<Option<WindowPair>>>);

impl Script {
    fn set(&self, pair: WindowPair) {
        *self.0.lock().unwrap() = Some(pair);
    }
}

impl WindowSource for Script {
    fn pair(&self, _: &str, _: &str, _: u64) -> Option<WindowPair> {
        self.0.lock().unwrap().clone()
    }
}

fn window(success: f64) -> WindowPair {
    let requests = 400;
    let errors = ((1.0 - success) * requests as f64).round() as u64;
    WindowPair {
        canary: Summary {
            requests,
            errors,
            success_rate: Some(success),
            p99_ms: Some(20.0),
            age_ms: Some(100),
            ..Summary::default()
        },
        canary_totals: Totals {
            requests,
            errors,
            buckets: vec![],
        },
        primary_totals: Totals {
            requests: 4000,
            errors: 0,
            buckets: vec![],
        },
        edges_ms: vec![],
        stale: None,
        no_inbound: vec![],
    }
}

/// A controller task that can be stopped gracefully or killed (aborted: no Lease release).
struct Agent {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    metrics: Arc<ControllerProcessMetrics>,
    heartbeat: meshcanary::telemetry::Heartbeat,
}

impl Agent {
    async fn start(cp: &ControlPlane, windows: Script, identity: &str, lease: bool) -> Agent {
        let client = cp.controller_client().await;
        let config = ControllerConfig {
            decision_interval: Duration::from_millis(200),
            lease: lease.then(|| LeaseConfig {
                namespace: "meshcanary".into(),
                name: "meshcanary-test".into(),
                duration: Duration::from_secs(3),
            }),
            envoy_container: "envoy".into(),
            router: RouterKind::AppMesh,
            canaries: meshcanary::canary::Taking::OptedIn,
            identity: identity.into(),
            liveness_bound: Duration::from_secs(2),
            resync: Duration::from_secs(2),
        };
        let metrics = Arc::new(ControllerProcessMetrics::new());
        let heartbeat = meshcanary::telemetry::Heartbeat::default();
        let controller = Controller::new(
            client.clone(),
            routers(&client),
            windows,
            config,
            metrics.controller.clone(),
        )
        .with_heartbeat(heartbeat.clone());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            controller.run(rx).await.expect("controller runs");
        });
        Agent {
            task,
            stop,
            metrics,
            heartbeat,
        }
    }

    fn is_leader(&self) -> bool {
        support::counter(&self.metrics.registry.encode(), "meshcanary_leader ") == 1.0
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    fn kill(self) {
        self.task.abort();
    }
}

fn podinfo(ns: &str, image: &str, extra: &[(&str, &str)]) -> Deployment {
    let mut annotations = serde_json::json!({
        "meshcanary.io/enabled": "true",
        "meshcanary.io/interval": "1s",
        "meshcanary.io/threshold": "3",
    });
    for (k, v) in extra {
        annotations[*k] = serde_json::json!(v);
    }
    deployment(ns, "podinfo", image, annotations)
}

/// A Deployment `name` in podinfo's shape (app label `name`, an Envoy sidecar).
fn deployment(ns: &str, name: &str, image: &str, annotations: serde_json::Value) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [
                    {"name": "podinfo", "image": image, "ports": [{"containerPort": 9898}]},
                    {"name": "envoy", "image": "envoy:v1.40", "ports": [{"containerPort": 9901}]}
                ]}
            }
        }
    }))
    .unwrap()
}

fn routers(client: &Client) -> Routers {
    Routers {
        app_mesh: AppMesh::new(client.clone()),
        gateway_api: GatewayApi::new(client.clone()),
    }
}

struct Scenario {
    client: Client,
    ns: String,
    /// Where podinfo's weights live (App Mesh unless a scenario says otherwise).
    target: Target,
}

impl Scenario {
    async fn new(cp: &ControlPlane, ns: &str) -> Scenario {
        cp.mesh_namespace(ns).await;
        Scenario {
            client: cp.client().await,
            ns: ns.into(),
            target: Target::new(
                RouterKind::AppMesh,
                ns,
                "podinfo",
                &HttpRouteRef::Own { gateway: None },
            ),
        }
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create(&self, d: &Deployment) {
        self.deployments()
            .create(&PostParams::default(), d)
            .await
            .expect("creating podinfo");
    }

    async fn set_image(&self, image: &str) {
        let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "podinfo", "image": image}]}}}});
        self.deployments()
            .patch(
                "podinfo",
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .expect("updating the image");
    }

    async fn status(&self) -> Option<Status> {
        let d = self.deployments().get_opt("podinfo").await.ok()??;
        let s = d.metadata.annotations?.get("meshcanary.io/status")?.clone();
        serde_json::from_str(&s).ok()
    }

    async fn phase_is(&self, phase: Phase, within: Duration) -> Status {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.status().await {
                if s.phase == phase {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: waited {within:?} for {phase:?}, at {s:?}; events {:#?}",
                    self.ns,
                    self.events().await
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no status within {within:?}",
                self.ns
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn weight(&self) -> Option<u8> {
        routers(&self.client).canary_weight(&self.target).await.ok()
    }

    async fn replicas(&self, name: &str) -> Option<i32> {
        self.deployments().get_opt(name).await.ok()??.spec?.replicas
    }

    /// Events on podinfo in the order they happened (each message once).
    async fn events(&self) -> Vec<String> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let lp = ListParams::default().fields("involvedObject.name=podinfo");
        let mut list: Vec<Event> = api.list(&lp).await.map(|l| l.items).unwrap_or_default();
        list.retain(|e| e.reporting_component.as_deref() == Some("meshcanary"));
        list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        list.into_iter().filter_map(|e| e.message).collect()
    }

    /// The events, once the last one is `last` (Events are published after the status).
    async fn events_ending(&self, last: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events().await;
            if events.last().map(String::as_str) == Some(last) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{}: events never ended with {last:?}: {events:#?}",
                self.ns
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Record every distinct canary weight the router shows until `until` holds.
    async fn record_weights(&self, within: Duration, until: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<u8> = Vec::new();
        loop {
            if let Some(w) = self.weight().await {
                if seen.last() != Some(&w) {
                    seen.push(w);
                }
            }
            if until(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{}: weights so far {seen:?}; status {:?}; events {:#?}",
                self.ns,
                self.status().await,
                self.events().await
            );
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// Create podinfo with `extra` annotations, wait until it is initialized, start a new
    /// revision and wait until the router shows `weight`; the weights seen so far.
    async fn analysing(&self, extra: &[(&str, &str)], weight: u8) -> Vec<u8> {
        self.create(&podinfo(&self.ns, "podinfo:6.0.0", extra))
            .await;
        self.phase_is(Phase::Initialized, Duration::from_secs(60))
            .await;
        self.set_image("podinfo:6.0.1").await;
        self.record_weights(Duration::from_secs(30), |w| w.contains(&weight))
            .await
    }

    async fn cleanup(&self) {
        let _ = self
            .deployments()
            .delete("podinfo", &Default::default())
            .await;
    }
}

const ADVANCES: [&str; 6] = [
    "Advance podinfo.{ns} canary weight 2",
    "Advance podinfo.{ns} canary weight 5",
    "Advance podinfo.{ns} canary weight 10",
    "Advance podinfo.{ns} canary weight 20",
    "Advance podinfo.{ns} canary weight 30",
    "Advance podinfo.{ns} canary weight 50",
];

/// The control plane every scenario runs on, with the stand-in kubelet and `manifests/`
/// applied; started by the first scenario that runs.
struct World {
    cp: ControlPlane,
    _kubelet: Kubelet,
}

impl World {
    async fn start() -> World {
        let cp = ControlPlane::start().await;
        // Every pod runs on node-a, except the primaries of namespace `disc`, on node-b.
        let kubelet = Kubelet::start(
            cp.client().await,
            Arc::new(|pod| {
                let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                let primary = pod
                    .metadata
                    .name
                    .as_deref()
                    .unwrap_or_default()
                    .contains("-primary-");
                let node = if ns == "disc" && primary {
                    "node-b"
                } else {
                    "node-a"
                };
                (node.into(), "127.0.0.1".into())
            }),
        );
        // The manifests pass the apiserver's validation, then install the agent's RBAC,
        // which every scenario runs under.
        let manifests = support::repo().join("manifests");
        // A server-side dry run cannot create the namespace its other objects go in.
        cp.kubectl(&[
            "apply",
            "-f",
            manifests.join("namespace.yaml").to_str().unwrap(),
        ]);
        // The manifests' PodDisruptionBudget is `policy/v1` (every supported cluster; the
        // beta was removed in 1.25), which this 1.20 apiserver does not serve yet: it gets
        // the same object as `policy/v1beta1` (same fields), everything else as written.
        let built = cp.kubectl(&["kustomize", manifests.to_str().unwrap()]);
        assert!(
            built.contains("apiVersion: policy/v1\nkind: PodDisruptionBudget"),
            "{built}"
        );
        let built = built.replace(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget",
            "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget",
        );
        // The statsd Service's `internalTrafficPolicy` (GA in 1.26) is not a field of this
        // apiserver's Service: the rest of the Service is checked without it.
        assert!(
            built.contains("  internalTrafficPolicy: Local\n"),
            "{built}"
        );
        let built = built.replace("  internalTrafficPolicy: Local\n", "");
        let tmp = support::TempDir::new("manifests");
        let all = tmp.path.join("all.yaml");
        std::fs::write(&all, built).unwrap();
        let all = all.to_str().unwrap();
        let out = cp.kubectl(&["apply", "--dry-run=server", "-f", all]);
        for created in [
            "daemonset.apps/meshcanary created (server dry run)",
            "deployment.apps/meshcanary-controller created (server dry run)",
            "poddisruptionbudget.policy/meshcanary-controller created (server dry run)",
            "networkpolicy.networking.k8s.io/meshcanary-agent-peers created (server dry run)",
            "service/meshcanary-statsd created (server dry run)",
        ] {
            assert!(out.contains(created), "{out}");
        }
        cp.kubectl(&["apply", "-f", all]);
        // Flagger's Canary CRD as meshcanary ships it for clusters without Flagger.
        let out = cp.kubectl(&[
            "apply",
            "-k",
            manifests.join("canary-crd").to_str().unwrap(),
        ]);
        assert!(
            out.contains("customresourcedefinition.apiextensions.k8s.io/canaries.flagger.app"),
            "{out}"
        );
        for ar in [
            meshcanary::canary::api_resource(),
            meshcanary::controller::alerts::provider_resource(),
        ] {
            let api: Api<DynamicObject> = Api::all_with(cp.client().await, &ar);
            support::eventually_async(Duration::from_secs(30), "Flagger's CRDs served", || async {
                api.list(&ListParams::default()).await.is_ok()
            })
            .await;
        }
        World {
            cp,
            _kubelet: kubelet,
        }
    }
}

/// The world, once started; `Err` once its start failed (the other scenarios then fail at
/// once instead of starting it again).
type Shared = Arc<Mutex<Option<Result<World, ()>>>>;

/// One test per scenario (`cargo test --test controller -- rollback` runs one), in this
/// order, one at a time on one control plane: scenarios stop and restart its apiserver,
/// and each has its own namespace. A failing scenario fails only its own test.
fn main() -> std::process::ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "meshcanary=info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime"),
    );
    let world: Shared = Arc::default();
    let mut trials = Vec::new();
    macro_rules! scenario {
        ($what:literal, $id:ident, |$w:ident| $body:expr) => {{
            let (rt, world) = (Arc::clone(&rt), Arc::clone(&world));
            trials.push(libtest_mimic::Trial::test(stringify!($id), move || {
                let mut guard = world
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                rt.block_on(async {
                    if guard.is_none() {
                        // Marked failed first: a panic in the start leaves it so.
                        *guard = Some(Err(()));
                        *guard = Some(Ok(World::start().await));
                    }
                    let Some(Ok($w)) = guard.as_mut() else {
                        panic!("the control plane did not start (see the first scenario)");
                    };
                    let t = Instant::now();
                    $body;
                    eprintln!("{:<72} {:>5.1} s", $what, t.elapsed().as_secs_f64());
                });
                Ok(())
            }));
        }};
    }
    scenario!(
        "RBAC: the agent cannot write workloads, Services or routes; the controller can",
        rbac,
        |w| rbac(&w.cp)
    );
    scenario!(
        "bootstrap creates exactly the objects, owned by NAME",
        bootstrap,
        |w| bootstrap(&w.cp).await
    );
    scenario!(
        "objects NAME needs owned by someone else: a Warning, nothing changed",
        ownership_conflict,
        |w| ownership_conflict(&w.cp).await
    );
    scenario!(
        "a promotion walks 2..50, promotes, scales the canary to 0",
        promotion,
        |w| promotion(&w.cp).await
    );
    scenario!(
        "failing windows roll back after threshold failed checks",
        rollback,
        |w| rollback(&w.cp).await
    );
    scenario!(
        "Gateway API: a user's HTTPRoute keeps its rules; a refused one halts",
        gateway_api_route,
        |w| gateway_api_route(&w.cp).await
    );
    scenario!(
        "a concurrent writer: weight writes retry on conflict and never drop its change",
        concurrent_writer,
        |w| concurrent_writer(&w.cp).await
    );
    scenario!(
        "Gateway API: meshcanary's own HTTPRoute attaches to the Service NAME",
        gateway_api_own_route,
        |w| gateway_api_own_route(&w.cp).await
    );
    scenario!(
        "Flagger Canaries: opted in run as written, with Flagger's status; others untouched",
        flagger_canary,
        |w| flagger_canary(&w.cp).await
    );
    scenario!(
        "Flagger webhooks: every type's success and failure path, Flagger's payloads",
        flagger_webhooks,
        |w| flagger_webhooks(&w.cp).await
    );
    scenario!(
        "Flagger alerts: Slack, Teams (Secret), Discord, generic; severities; a missing provider",
        flagger_alerts,
        |w| flagger_alerts(&w.cp).await
    );
    scenario!(
        "a new revision mid-analysis restarts it",
        new_revision,
        |w| new_revision(&w.cp).await
    );
    scenario!(
        "a killed agent restarted resumes: no step repeated or skipped",
        resume,
        |w| resume(&w.cp).await
    );
    scenario!(
        "two agents: only the leader writes; the other takes over",
        two_agents,
        |w| two_agents(&w.cp).await
    );
    scenario!("losing the Lease stops writes at once", lease_lost, |w| {
        lease_lost(&w.cp).await
    });
    scenario!(
        "invalid annotations: a Warning event, nothing created",
        invalid,
        |w| invalid(&w.cp).await
    );
    scenario!(
        "bad annotation, opt-out, bad status mid-analysis: primary first",
        let_go,
        |w| let_go(&w.cp).await
    );
    scenario!(
        "an apiserver restart mid-rollout is survived",
        apiserver_restart,
        |w| apiserver_restart(&mut w.cp).await
    );
    scenario!(
        "discovery: each node's agent scrapes its own opted-in sidecars",
        discovery,
        |w| discovery(&w.cp).await
    );
    scenario!(
        "discovery: an Istio sidecar is found by its istio-proxy and counted exactly",
        istio_discovery,
        |w| istio_discovery(&w.cp).await
    );
    scenario!(
        "peers: only the controller's token, for its audience, gets windows",
        peer_auth,
        |w| peer_auth(&w.cp).await
    );
    scenario!(
        "deleting NAME removes what meshcanary created",
        garbage_collection,
        |w| garbage_collection(&w.cp).await
    );
    // Last: run before `apiserver_restart`, its 20 s outage left that scenario's canary
    // Deployment unready after the restart, twice in two runs. The cause is not found yet
    // (the stand-in kubelet, the controller-manager and this scenario's own controller all
    // recover); until it is, nothing runs after this scenario.
    scenario!(
        "apiserver down 20 s at start: the controller waits, leads, promotes",
        apiserver_down_at_start,
        |w| apiserver_down_at_start(&mut w.cp).await
    );
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the control plane (its processes) before the exit, which runs no destructor.
    let started = world
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    rt.block_on(async move { drop(started) });
    conclusion.exit_code()
}

/// What each ServiceAccount of `manifests/` may do, as the apiserver's authorizer answers
/// `kubectl auth can-i --as=system:serviceaccount:meshcanary:...`.
fn rbac(cp: &ControlPlane) {
    let writes = ["create", "patch", "update", "delete"];
    let objects = [
        "deployments.apps",
        "services",
        "virtualrouters.appmesh.k8s.aws",
        "virtualnodes.appmesh.k8s.aws",
        "virtualservices.appmesh.k8s.aws",
        "httproutes.gateway.networking.k8s.io",
    ];
    for ns in ["default", "kube-system", "meshcanary", "test"] {
        for verb in writes {
            for object in objects {
                assert!(
                    !cp.can_i("meshcanary", verb, object, ns),
                    "the agent may {verb} {object} in {ns}"
                );
            }
        }
        for verb in ["list", "watch"] {
            assert!(cp.can_i("meshcanary", verb, "deployments.apps", ns));
            assert!(cp.can_i("meshcanary", verb, "pods", ns));
        }
        assert!(!cp.can_i("meshcanary", "get", "secrets", ns));
        // The controller's writes, everywhere a workload may live.
        for (verb, object) in [
            ("create", "deployments.apps"),
            ("patch", "deployments.apps"),
            ("create", "services"),
            ("patch", "services"),
            ("update", "virtualrouters.appmesh.k8s.aws"),
            ("patch", "virtualnodes.appmesh.k8s.aws"),
            ("update", "httproutes.gateway.networking.k8s.io"),
            ("create", "events.events.k8s.io"),
            ("list", "canaries.flagger.app"),
            ("watch", "canaries.flagger.app"),
            ("patch", "canaries.flagger.app/status"),
            ("patch", "horizontalpodautoscalers.autoscaling"),
        ] {
            assert!(
                cp.can_i("meshcanary-controller", verb, object, ns),
                "the controller may not {verb} {object} in {ns}"
            );
        }
        assert!(!cp.can_i("meshcanary-controller", "delete", "deployments.apps", ns));
        // A Canary's spec is the user's: meshcanary writes only its status.
        for verb in writes {
            assert!(!cp.can_i("meshcanary-controller", verb, "canaries.flagger.app", ns));
            assert!(!cp.can_i("meshcanary", verb, "canaries.flagger.app/status", ns));
        }
        // Secrets: only the one an AlertProvider names, read by name; never listed.
        assert!(cp.can_i("meshcanary-controller", "get", "secrets", ns));
        for verb in ["list", "watch", "create", "patch", "update", "delete"] {
            assert!(
                !cp.can_i("meshcanary-controller", verb, "secrets", ns),
                "{verb} secrets"
            );
        }
        assert!(cp.can_i(
            "meshcanary-controller",
            "get",
            "alertproviders.flagger.app",
            ns
        ));
    }
    assert!(!cp.can_i(
        "meshcanary",
        "patch",
        "leases.coordination.k8s.io",
        "meshcanary"
    ));
    assert!(cp.can_i(
        "meshcanary-controller",
        "patch",
        "leases.coordination.k8s.io",
        "meshcanary"
    ));
}

/// `NAME-primary` or a routing object that exists and is not NAME's is not taken over:
/// a Warning Event names it, and nothing is created or changed (no status either).
async fn ownership_conflict(cp: &ControlPlane) {
    for (ns, kind) in [("own-svc", "Service"), ("own-vr", "VirtualRouter")] {
        let s = Scenario::new(cp, ns).await;
        let foreign = match kind {
            "Service" => {
                let services: Api<Service> = Api::namespaced(s.client.clone(), ns);
                // Shaped as Flagger leaves it: the same port, another selector.
                let svc: Service = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "podinfo-primary"},
                    "spec": {"selector": {"app": "someone-else"},
                             "ports": [{"name": "http", "port": 9898, "targetPort": 9898}]}
                }))
                .unwrap();
                services.create(&PostParams::default(), &svc).await.unwrap();
                format!("Service {ns}/podinfo-primary")
            }
            _ => {
                // Controlled by another object: never taken over, even with adopt.
                let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
                    Api::namespaced(s.client.clone(), ns);
                let owner = cms
                    .create(
                        &PostParams::default(),
                        &serde_json::from_value(
                            serde_json::json!({"metadata": {"name": "someone-else"}}),
                        )
                        .unwrap(),
                    )
                    .await
                    .unwrap();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(s.client.clone(), ns, &appmesh::resource("VirtualRouter"));
                let vr: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualRouter",
                    "metadata": {"name": "podinfo", "ownerReferences": [{
                        "apiVersion": "v1", "kind": "ConfigMap", "name": "someone-else",
                        "uid": owner.metadata.uid.unwrap(), "controller": true}]},
                    "spec": {"listeners": [{"portMapping": {"port": 80, "protocol": "http"}}], "routes": []}
                }))
                .unwrap();
                api.create(&PostParams::default(), &vr).await.unwrap();
                format!("VirtualRouter {ns}/podinfo")
            }
        };
        let agent = Agent::start(cp, Script::default(), "a", false).await;
        let adopt: &[(&str, &str)] = if kind == "Service" {
            &[]
        } else {
            &[("meshcanary.io/adopt", "true")]
        };
        s.create(&podinfo(ns, "podinfo:6.0.0", adopt)).await;
        support::eventually_async(
            Duration::from_secs(20),
            "an OwnershipConflict Warning",
            || async { s.events().await.iter().any(|e| e.contains(&foreign)) },
        )
        .await;
        let events = s.events().await;
        assert_eq!(events.len(), 1, "{events:#?}");
        assert!(
            events[0].contains("not owned by Deployment") && events[0].contains("leaves podinfo"),
            "{events:#?}"
        );
        // An absence takes time to show: five more ticks, still nothing created, no
        // status, no repeated Event.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(s.status().await.is_none(), "no status is written");
        assert!(s
            .deployments()
            .get_opt("podinfo-primary")
            .await
            .unwrap()
            .is_none());
        let services: Api<Service> = Api::namespaced(s.client.clone(), ns);
        let names: Vec<String> = services
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|x| x.metadata.name)
            .collect();
        let expected: &[&str] = if kind == "Service" {
            &["podinfo-primary"]
        } else {
            &[]
        };
        assert_eq!(names, expected);
        assert_eq!(s.events().await.len(), 1);
        if kind == "Service" {
            // An orphan (no controlling owner, as Flagger leaves its objects after
            // `kubectl delete canary --cascade=orphan`) is adopted when the user asks.
            assert!(events[0].contains("meshcanary.io/adopt"), "{events:#?}");
            let patch =
                serde_json::json!({"metadata": {"annotations": {"meshcanary.io/adopt": "true"}}});
            s.deployments()
                .patch("podinfo", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            s.phase_is(Phase::Initialized, Duration::from_secs(60))
                .await;
            let svc = services.get("podinfo-primary").await.unwrap();
            let owners = svc.metadata.owner_references.unwrap_or_default();
            assert!(owners
                .iter()
                .any(|o| o.name == "podinfo" && o.controller == Some(true)));
            assert_eq!(
                svc.spec.unwrap().selector.unwrap()["app"],
                "podinfo-primary"
            );
        } else {
            assert!(!events[0].contains("meshcanary.io/adopt"), "{events:#?}");
        }
        agent.stop().await;
        s.cleanup().await;
    }
}

async fn bootstrap(cp: &ControlPlane) {
    let s = Scenario::new(cp, "boot").await;
    let windows = Script::default();
    let agent = Agent::start(cp, windows, "a", false).await;
    s.create(&podinfo("boot", "podinfo:6.0.0", &[])).await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    let primary = s.deployments().get("podinfo-primary").await.unwrap();
    let spec = primary.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        spec.selector.match_labels.unwrap()["app"],
        "podinfo-primary"
    );
    assert_eq!(
        spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("podinfo:6.0.0")
    );
    support::eventually_async(
        Duration::from_secs(10),
        "the canary scaled to 0 once the primary is ready",
        || async { s.replicas("podinfo").await == Some(0) },
    )
    .await;
    let owner_is_podinfo =
        |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.unwrap_or_default()
                .iter()
                .any(|r| r.kind == "Deployment" && r.name == "podinfo")
        };
    assert!(owner_is_podinfo(primary.metadata.owner_references));
    let services: Api<Service> = Api::namespaced(s.client.clone(), "boot");
    let mut names: Vec<String> = services
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|x| {
            assert!(owner_is_podinfo(x.metadata.owner_references.clone()));
            x.metadata.name.unwrap()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["podinfo", "podinfo-canary", "podinfo-primary"]);
    let svc = services.get("podinfo").await.unwrap().spec.unwrap();
    assert_eq!(svc.selector.unwrap()["app"], "podinfo-primary");
    assert_eq!(svc.ports.unwrap()[0].port, 9898);
    for (kind, expected) in [
        ("VirtualNode", vec!["podinfo-canary", "podinfo-primary"]),
        ("VirtualRouter", vec!["podinfo"]),
        ("VirtualService", vec!["podinfo"]),
    ] {
        let api: Api<DynamicObject> =
            Api::namespaced_with(s.client.clone(), "boot", &appmesh::resource(kind));
        let list = api.list(&ListParams::default()).await.unwrap().items;
        let mut names: Vec<String> = list
            .iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, expected, "{kind}");
        for o in &list {
            assert!(
                owner_is_podinfo(o.metadata.owner_references.clone()),
                "{kind} owner"
            );
        }
    }
    let vn: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), "boot", &appmesh::resource("VirtualNode"));
    let primary_vn = vn.get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary_vn.data["spec"]["serviceDiscovery"]["dns"]["hostname"],
        "podinfo-primary.boot.svc.cluster.local"
    );
    assert_eq!(
        primary_vn.data["spec"]["listeners"][0]["portMapping"]["port"],
        9898
    );
    // Fields App Mesh's controller sets survive meshcanary's next apply.
    let patch = serde_json::json!({"spec": {"meshRef": {"name": "global", "uid": "m-1"}, "awsName": "podinfo-primary_boot"}});
    vn.patch("podinfo-primary", &PatchParams::apply("appmesh-controller"), &Patch::Apply(&serde_json::json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualNode", "metadata": {"name": "podinfo-primary"}, "spec": patch["spec"]
    }))).await.unwrap();
    assert_eq!(s.weight().await, Some(0));
    let events = s.events_ending("Initialization done! podinfo.boot").await;
    assert_eq!(
        events,
        [
            "Initializing podinfo.boot",
            "Initialization done! podinfo.boot"
        ]
    );
    agent.stop().await;
    // A restarted agent re-applies and keeps App Mesh's fields.
    let agent = Agent::start(cp, Script::default(), "a", false).await;
    s.set_image("podinfo:6.0.1").await;
    s.phase_is(Phase::Progressing, Duration::from_secs(30))
        .await;
    let after = vn.get("podinfo-primary").await.unwrap();
    assert_eq!(after.data["spec"]["awsName"], "podinfo-primary_boot");
    // Drift: someone points the owned Service elsewhere; the next resync puts it back.
    let services: Api<Service> = Api::namespaced(s.client.clone(), "boot");
    let patch = serde_json::json!({"spec": {"selector": {"app": "elsewhere"}}});
    services
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    support::eventually_async(
        Duration::from_secs(10),
        "the drifted Service re-applied",
        || async {
            let svc = services.get("podinfo").await.unwrap();
            svc.spec
                .unwrap()
                .selector
                .unwrap()
                .get("app")
                .map(String::as_str)
                == Some("podinfo-primary")
        },
    )
    .await;
    agent.stop().await;
    s.cleanup().await;
}

async fn promotion(cp: &ControlPlane) {
    let s = Scenario::new(cp, "promote").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    s.create(&podinfo("promote", "podinfo:6.0.0", &[])).await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    s.set_image("podinfo:6.0.1").await;
    let weights = s
        .record_weights(Duration::from_secs(90), |w| {
            w.last() == Some(&0) && w.len() > 1
        })
        .await;
    assert_eq!(weights, [0, 2, 5, 10, 20, 30, 50, 0]);
    let st = s.phase_is(Phase::Succeeded, Duration::from_secs(60)).await;
    assert_eq!(st.canary_weight, 0);
    let primary = s.deployments().get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("podinfo:6.0.1")
    );
    support::eventually_async(Duration::from_secs(30), "canary scaled to 0", || async {
        s.replicas("podinfo").await == Some(0)
    })
    .await;
    let ns = "promote";
    let mut expected = vec![
        format!("Initializing podinfo.{ns}"),
        format!("Initialization done! podinfo.{ns}"),
        format!("New revision detected! Scaling up podinfo.{ns}"),
        format!("Starting canary analysis for podinfo.{ns}"),
    ];
    expected.extend(ADVANCES.iter().map(|a| a.replace("{ns}", ns)));
    expected.extend([
        format!("Copying podinfo.{ns} template spec to podinfo-primary.{ns}"),
        "Routing all traffic to primary".to_owned(),
        format!("Promotion completed! Scaling down podinfo.{ns}"),
    ]);
    assert_eq!(s.events_ending(expected.last().unwrap()).await, expected);
    let m = agent.metrics.registry.encode();
    assert_eq!(support::counter(&m, "meshcanary_decisions_total{namespace=\"promote\",workload=\"podinfo\",kind=\"promote\"}"), 1.0);
    let writes = support::counter(&m, "meshcanary_weight_applied_seconds_count");
    assert!(writes >= 7.0, "{m}");
    let mean_ms = support::counter(&m, "meshcanary_weight_applied_seconds_sum") / writes * 1000.0;
    eprintln!("decision to verified weight: mean {mean_ms:.1} ms over {writes} writes");
    agent.stop().await;
    s.cleanup().await;
}

async fn rollback(cp: &ControlPlane) {
    let s = Scenario::new(cp, "rollback").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows.clone(), "a", false).await;
    s.analysing(&[("meshcanary.io/judge", "threshold")], 5)
        .await;
    windows.set(window(0.5396));
    let st = s.phase_is(Phase::Failed, Duration::from_secs(30)).await;
    assert_eq!((st.canary_weight, st.failed_checks), (0, 3));
    // The status is written first, then the router follows it.
    support::eventually_async(Duration::from_secs(10), "weight 0", || async {
        s.weight().await == Some(0)
    })
    .await;
    support::eventually_async(Duration::from_secs(30), "canary scaled to 0", || async {
        s.replicas("podinfo").await == Some(0)
    })
    .await;
    let events = s
        .events_ending("Canary failed! Scaling down podinfo.rollback")
        .await;
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "Halt podinfo.rollback advancement success rate 53.96% < 99%",
            "Rolling back podinfo.rollback failed checks threshold reached 3",
            "Canary failed! Scaling down podinfo.rollback",
        ]
    );
    let primary = s.deployments().get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("podinfo:6.0.0"),
        "the primary keeps the old revision"
    );
    agent.stop().await;
    s.cleanup().await;
}

fn http_routes(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &meshcanary::router::gatewayapi::resource("v1"),
    )
}

/// The user's route: a header rule with a filter to a third Service, then the rule that
/// carries the canary, with a field meshcanary has no reason to know (`timeouts`).
fn users_route() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "podinfo-web"},
        "spec": {
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["podinfo.example.com"],
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-beta", "value": "yes"}]}],
                    "filters": [{"type": "RequestHeaderModifier",
                                 "requestHeaderModifier": {"add": [{"name": "x-tier", "value": "beta"}]}}],
                    "backendRefs": [{"name": "podinfo-beta", "port": 9898}]
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "timeouts": {"request": "10s"},
                    "backendRefs": [
                        {"name": "podinfo-primary", "port": 9898, "weight": 100},
                        {"name": "podinfo-canary", "port": 9898, "weight": 0}
                    ]
                }
            ]
        }
    })
}

/// The spec as stored, with the two arms' weights blanked: what must never change.
async fn route_without_weights(routes: &Api<DynamicObject>) -> (String, serde_json::Value) {
    let route = routes.get("podinfo-web").await.expect("reading the route");
    let mut spec = route.data["spec"].clone();
    let header_rule = serde_json::to_string(&spec["rules"][0]).unwrap();
    for b in spec["rules"][1]["backendRefs"].as_array_mut().unwrap() {
        b["weight"] = serde_json::Value::Null;
    }
    (header_rule, spec)
}

impl Scenario {
    /// Create the user's route ([`users_route`]) and make it podinfo's weights' home.
    async fn with_users_route(&mut self) -> Api<DynamicObject> {
        self.target = Target::new(
            RouterKind::GatewayApi,
            &self.ns,
            "podinfo",
            &HttpRouteRef::Existing("podinfo-web".into()),
        );
        let routes = http_routes(&self.client, &self.ns);
        let route: DynamicObject = serde_json::from_value(users_route()).unwrap();
        routes
            .create(&PostParams::default(), &route)
            .await
            .expect("creating the user's HTTPRoute");
        routes
    }
}

async fn gateway_api_route(cp: &ControlPlane) {
    let ns = "gwapi";
    let mut s = Scenario::new(cp, ns).await;
    let routes = s.with_users_route().await;
    let before = route_without_weights(&routes).await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows.clone(), "a", false).await;
    let annotations = [
        ("meshcanary.io/router", "gateway-api"),
        ("meshcanary.io/route", "podinfo-web"),
        ("meshcanary.io/judge", "threshold"),
    ];
    s.create(&podinfo(ns, "podinfo:6.0.0", &annotations)).await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    s.set_image("podinfo:6.0.1").await;
    let weights = s
        .record_weights(Duration::from_secs(90), |w| {
            w.last() == Some(&0) && w.len() > 1
        })
        .await;
    assert_eq!(weights, [0, 2, 5, 10, 20, 30, 50, 0]);
    s.phase_is(Phase::Succeeded, Duration::from_secs(60)).await;
    assert_eq!(
        route_without_weights(&routes).await,
        before,
        "a promotion changed more than the two weights"
    );
    // meshcanary created no route of its own and no App Mesh object.
    assert!(routes.get_opt("podinfo").await.unwrap().is_none());
    let vr: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &appmesh::resource("VirtualRouter"));
    assert!(vr.get_opt("podinfo").await.unwrap().is_none());

    // A rollback: only the weights again.
    s.set_image("podinfo:6.0.2").await;
    s.record_weights(Duration::from_secs(30), |w| w.contains(&5))
        .await;
    windows.set(window(0.5396));
    s.phase_is(Phase::Failed, Duration::from_secs(30)).await;
    support::eventually_async(Duration::from_secs(10), "weight 0", || async {
        s.weight().await == Some(0)
    })
    .await;
    assert_eq!(
        route_without_weights(&routes).await,
        before,
        "a rollback changed more than the two weights"
    );

    // The route's parent refuses it: the next rollout halts with a Warning naming why.
    windows.set(window(1.0));
    let refused = serde_json::json!({"status": {"parents": [{
        "parentRef": {"name": "public", "namespace": "gateways"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
            "message": "no listener allows routes from gwapi",
            "lastTransitionTime": "2026-12-03T00:00:00Z", "observedGeneration": 1}]
    }]}});
    routes
        .patch_status(
            "podinfo-web",
            &PatchParams::default(),
            &Patch::Merge(&refused),
        )
        .await
        .expect("writing the route's status");
    s.set_image("podinfo:6.0.3").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let warning = loop {
        let events = s.events().await;
        if let Some(e) = events.iter().find(|e| e.contains("Accepted=False")) {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no refusal Event: {events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        warning.contains("NotAllowedByListeners") && warning.contains("halts podinfo.gwapi"),
        "{warning}"
    );
    // Halted: five ticks refused (200 ms each); the analysis reads "no data" (so
    // progress-deadline bounds it) and goes no further than its first step.
    let refusals =
        "meshcanary_controller_errors_total{operation=\"setting weights\",reason=\"not_accepted\"}";
    support::eventually(Duration::from_secs(10), "five refused ticks", || {
        support::counter(&agent.metrics.registry.encode(), refusals) >= 5.0
    })
    .await;
    assert_eq!(
        s.weight().await,
        None,
        "the refused route's weight is not read as healthy"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = s.events().await;
        if events
            .iter()
            .any(|e| e.contains("its route is not accepted by the gateway or mesh"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no halt for the refused route: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let raw = routes.get("podinfo-web").await.unwrap();
    let held = meshcanary::router::gatewayapi::read_weight(&raw.data["spec"], ns, "podinfo");
    assert!(matches!(held, Ok(0 | 2)), "{held:?}");
    let st = s.status().await.unwrap();
    assert!(
        st.phase == Phase::Progressing && st.canary_weight <= 2,
        "{st:?}"
    );
    // Accepted again: the rollout goes on.
    let accepted = serde_json::json!({"status": {"parents": []}});
    routes
        .patch_status(
            "podinfo-web",
            &PatchParams::default(),
            &Patch::Merge(&accepted),
        )
        .await
        .unwrap();
    s.record_weights(Duration::from_secs(30), |w| w.contains(&5))
        .await;
    agent.stop().await;
    s.cleanup().await;
}

/// Another writer (a GitOps tool, a person with kubectl) updates the user's route while
/// the router sets weights: every weight write lands whole or fails as a `Conflict`, never
/// as a raw 409, and no write of the router's drops the other writer's change (each update
/// carries the `resourceVersion` it read).
async fn concurrent_writer(cp: &ControlPlane) {
    let ns = "race";
    let mut s = Scenario::new(cp, ns).await;
    let routes = s.with_users_route().await;
    let target = s.target.clone();
    // The other writer: bumps an annotation every 10 ms or so (a write takes about as long
    // here, so about half of the router's updates meet a conflict; flat out, nearly every
    // one would, and a write could conflict out 5 times running), and keeps the last value
    // it saw accepted.
    let (stop, mut stopped) = watch::channel(false);
    let writer = {
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut last = 0u32;
            for n in 1.. {
                if *stopped.borrow_and_update() {
                    break;
                }
                let patch = serde_json::json!({"metadata": {"annotations": {"other-writer": n.to_string()}}});
                if routes
                    .patch(
                        "podinfo-web",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .is_ok()
                {
                    last = n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            last
        })
    };
    let refused_before = conflicts_on_routes(&s.client).await;
    let router = GatewayApi::new(s.client.clone());
    let (mut landed, mut conflicts) = (0, 0);
    for weight in [5u8, 10, 20, 30, 50, 0, 2, 40, 60, 0]
        .into_iter()
        .cycle()
        .take(40)
    {
        match router.set_canary_weight(&target, weight).await {
            Ok(()) => landed += 1,
            Err(meshcanary::router::RouterError::Conflict { attempts, .. }) => {
                assert_eq!(attempts, 5, "a conflict error only after every attempt");
                conflicts += 1;
            }
            Err(e) => panic!("setting weight {weight} beside another writer: {e}"),
        }
    }
    stop.send(true).unwrap();
    let last = writer.await.expect("the other writer");
    let refused = conflicts_on_routes(&s.client).await - refused_before;
    router
        .set_canary_weight(&target, 7)
        .await
        .expect("a last weight write, alone");
    let route = routes.get("podinfo-web").await.expect("reading the route");
    assert_eq!(
        route.annotations().get("other-writer").map(String::as_str),
        Some(last.to_string().as_str()),
        "the other writer's last change survives the router's writes"
    );
    assert_eq!(router.canary_weight(&target).await.expect("the weight"), 7);
    assert!(last > 0, "the other writer never wrote");
    assert!(landed > 0, "no weight write landed ({conflicts} conflicts)");
    assert!(
        refused > 0.0,
        "the API server refused no update as a conflict: the retry was not exercised"
    );
    eprintln!("  {landed} weight writes landed, {conflicts} conflicted out, after {refused} updates refused as conflicts; the other writer wrote {last} times");
}

/// Updates of HTTPRoutes the API server has answered 409 Conflict, from its own metrics.
async fn conflicts_on_routes(client: &Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client
        .request_text(request)
        .await
        .expect("the API server's metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(r#"code="409""#)
                && l.contains(r#"resource="httproutes""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn gateway_api_own_route(cp: &ControlPlane) {
    let ns = "gwown";
    let mut s = Scenario::new(cp, ns).await;
    s.target = Target::new(
        RouterKind::GatewayApi,
        ns,
        "podinfo",
        &HttpRouteRef::Own { gateway: None },
    );
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows.clone(), "a", false).await;
    s.analysing(&[("meshcanary.io/router", "gateway-api")], 2)
        .await;
    let route = http_routes(&s.client, ns).get("podinfo").await.unwrap();
    let uid = s.deployments().get("podinfo").await.unwrap().metadata.uid;
    assert_eq!(
        route.metadata.owner_references.unwrap()[0].uid,
        uid.unwrap(),
        "owned by podinfo"
    );
    assert_eq!(
        route.data["spec"]["parentRefs"],
        serde_json::json!([{"group": "", "kind": "Service", "name": "podinfo", "port": 9898}])
    );
    let vr: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &appmesh::resource("VirtualRouter"));
    assert!(vr.get_opt("podinfo").await.unwrap().is_none());
    // The lab's Gateway API stand-in's status is one the CRD takes, and the route is read
    // as accepted with it.
    let routes = http_routes(&s.client, ns);
    let written = routes
        .patch_status(
            "podinfo",
            &PatchParams::default(),
            &Patch::Merge(&support::lab::accepted_status(1)),
        )
        .await
        .expect("the lab's accepted status");
    assert_eq!(
        written.data["status"]["parents"][0]["conditions"][0]["status"], "True",
        "{:?}",
        written.data
    );
    assert_eq!(
        routes.get("podinfo").await.unwrap().data["status"],
        written.data["status"]
    );
    assert_eq!(s.weight().await, Some(2));
    // The agents report a sidecar without inbound-cluster stats: one Warning naming it.
    let mut blind = window(1.0);
    blind.no_inbound = vec!["podinfo-7d9f-x2x4q".into()];
    windows.set(blind);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = s.events().await;
        if let Some(e) = events
            .iter()
            .find(|e| e.contains("export no stats of their inbound cluster"))
        {
            assert!(
                e.contains("podinfo-7d9f-x2x4q") && e.contains("proxyStatsMatcher"),
                "{e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no NoInboundStats Event: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    s.cleanup().await;
}

/// A Flagger Canary `name` targeting the Deployment `name`: the reference walkthrough's
/// spec at a 1 s interval, threshold 3, with `extra` merged into `spec.analysis`.
fn canary(ns: &str, name: &str, opted_in: bool, extra: serde_json::Value) -> DynamicObject {
    let mut annotations = serde_json::json!({});
    if opted_in {
        annotations["meshcanary.io/enabled"] = "true".into();
    }
    let mut analysis = serde_json::json!({
        "interval": "1s",
        "threshold": 3,
        "stepWeights": [2, 5, 10, 20, 30, 50],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "1m"}],
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        analysis[k] = v.clone();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "flagger.app/v1beta1",
        "kind": "Canary",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {
            "provider": "appmesh:v1beta2",
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "progressDeadlineSeconds": 60,
            "service": {"port": 9898},
            "analysis": analysis,
        }
    }))
    .unwrap()
}

fn hpa_resource() -> kube::discovery::ApiResource {
    meshcanary::canary::AutoscalerRef {
        api_version: "autoscaling/v2beta2".into(),
        name: String::new(),
    }
    .api_resource()
}

/// `canary` with `autoscalerRef` to its target's HorizontalPodAutoscaler (`v2beta2`: this
/// apiserver is 1.20), which the scenario creates.
fn autoscaled(mut canary: DynamicObject) -> DynamicObject {
    let name = canary.metadata.name.clone().unwrap();
    canary.data["spec"]["autoscalerRef"] = serde_json::json!({
        "apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler", "name": name,
    });
    canary
}

/// Create the Deployment podinfo and its Canary `c` in `ns`.
async fn with_canary(s: &Scenario, canaries: &Api<DynamicObject>, c: &DynamicObject) {
    s.create(&deployment(
        &s.ns,
        "podinfo",
        "podinfo:6.0.0",
        serde_json::json!({}),
    ))
    .await;
    canaries.create(&PostParams::default(), c).await.unwrap();
}

/// Events meshcanary published on the Canary `name`, in order.
async fn canary_events(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!(
        "involvedObject.name={name},involvedObject.kind=Canary"
    ));
    let mut list: Vec<Event> = api.list(&lp).await.map(|l| l.items).unwrap_or_default();
    list.retain(|e| e.reporting_component.as_deref() == Some("meshcanary"));
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Three Canaries in one namespace: one opted in runs the walkthrough (bootstrap owned by
/// the Canary, promotion, Flagger's status and events on the Canary), one without the
/// opt-in and one asking for traffic mirroring (a field not honoured) are left untouched.
async fn flagger_canary(cp: &ControlPlane) {
    let ns = "flagger";
    let s = Scenario::new(cp, ns).await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    let canaries: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &meshcanary::canary::api_resource());
    let hpa: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "podinfo", "namespace": ns},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
                 "minReplicas": 2, "maxReplicas": 4,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 99}}}]},
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(s.client.clone(), ns, &hpa_resource())
        .create(&PostParams::default(), &hpa)
        .await
        .unwrap();
    for name in ["podinfo", "quiet", "mirrored"] {
        s.create(&deployment(
            ns,
            name,
            "podinfo:6.0.0",
            serde_json::json!({}),
        ))
        .await;
    }
    let mirror = serde_json::json!({"mirror": true, "mirrorWeight": 100});
    for c in [
        canary(ns, "quiet", false, serde_json::json!({})),
        canary(ns, "mirrored", true, mirror),
        autoscaled(canary(ns, "podinfo", true, serde_json::json!({}))),
    ] {
        canaries.create(&PostParams::default(), &c).await.unwrap();
    }
    let phase = |c: &DynamicObject| c.data["status"]["phase"].as_str().map(str::to_owned);
    support::eventually_async(Duration::from_secs(60), "podinfo Initialized", || async {
        let c = canaries.get("podinfo").await.unwrap();
        phase(&c).as_deref() == Some("Initialized")
    })
    .await;
    let c = canaries.get("podinfo").await.unwrap();
    let status = &c.data["status"];
    assert_eq!(status["canaryWeight"], 0);
    assert_eq!(status["conditions"][0]["type"], "Promoted");
    assert_eq!(status["conditions"][0]["status"], "True");
    // The Canary owns what meshcanary created, as with Flagger.
    let primary = s.deployments().get("podinfo-primary").await.unwrap();
    let owner = &primary.metadata.owner_references.unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Canary", c.metadata.uid.as_deref().unwrap())
    );
    let services: Api<Service> = Api::namespaced(s.client.clone(), ns);
    let svc = services.get("podinfo-canary").await.unwrap();
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 9898);
    // The primary has its own copy of the canary's HorizontalPodAutoscaler.
    let hpas: Api<DynamicObject> = Api::namespaced_with(s.client.clone(), ns, &hpa_resource());
    let copy = hpas.get("podinfo-primary").await.unwrap();
    assert_eq!(
        copy.data["spec"]["scaleTargetRef"]["name"],
        "podinfo-primary"
    );
    assert_eq!(copy.data["spec"]["maxReplicas"], 4);
    assert_eq!(
        copy.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Canary"
    );
    // The target is marked, so the agents scrape it.
    let dep = s.deployments().get("podinfo").await.unwrap();
    assert_eq!(
        dep.metadata
            .annotations
            .unwrap()
            .get("meshcanary.io/canary")
            .map(String::as_str),
        Some("podinfo")
    );

    // A release runs as an annotated one does, told on the Canary.
    s.set_image("podinfo:6.0.1").await;
    let weights = s
        .record_weights(Duration::from_secs(90), |w| {
            w.last() == Some(&0) && w.len() > 1
        })
        .await;
    assert_eq!(weights, [0, 2, 5, 10, 20, 30, 50, 0]);
    support::eventually_async(Duration::from_secs(60), "podinfo Succeeded", || async {
        let c = canaries.get("podinfo").await.unwrap();
        phase(&c).as_deref() == Some("Succeeded")
    })
    .await;
    let events: Vec<String> = canary_events(&s.client, ns, "podinfo")
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    for expected in [
        format!("Initialization done! podinfo.{ns}"),
        format!("Starting canary analysis for podinfo.{ns}"),
        format!("Advance podinfo.{ns} canary weight 50"),
        format!("Promotion completed! Scaling down podinfo.{ns}"),
    ] {
        assert!(
            events.contains(&expected),
            "{expected:?} not in {events:#?}"
        );
    }
    let table = cp.kubectl(&["get", "canaries", "-n", ns, "-o", "wide"]);
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "STATUS",
        "WEIGHT",
        "FAILEDCHECKS",
        "INTERVAL",
        "STEPWEIGHTS",
        "LASTTRANSITIONTIME",
    ] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("podinfo ") && l.contains("Succeeded")),
        "{table}"
    );

    // The mirroring Canary: one Warning naming the field, nothing created.
    let events = canary_events(&s.client, ns, "mirrored").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].0, "UnsupportedField");
    assert!(events[0].1.contains("spec.analysis.mirror "), "{events:#?}");
    // The Canary without the opt-in: nothing at all.
    assert!(canary_events(&s.client, ns, "quiet").await.is_empty());
    for name in ["quiet", "mirrored"] {
        let c = canaries.get(name).await.unwrap();
        assert!(
            c.data.get("status").is_none_or(serde_json::Value::is_null),
            "{name}: {:?}",
            c.data
        );
        assert!(s
            .deployments()
            .get_opt(&format!("{name}-primary"))
            .await
            .unwrap()
            .is_none());
        assert_eq!(s.replicas(name).await, Some(2), "{name} untouched");
        let d = s.deployments().get(name).await.unwrap();
        assert!(
            !d.annotations()
                .keys()
                .any(|k| k.starts_with("meshcanary.io/")),
            "{name}: {:?}",
            d.annotations()
        );
    }

    // Taking the opt-in off lets the Deployment go: the agents stop scraping it.
    let patch = serde_json::json!({"metadata": {"annotations": {"meshcanary.io/enabled": null}}});
    canaries
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    support::eventually_async(Duration::from_secs(30), "podinfo unmarked", || async {
        let d = s.deployments().get("podinfo").await.unwrap();
        !d.annotations().contains_key("meshcanary.io/canary")
    })
    .await;
    agent.stop().await;
    for name in ["podinfo", "quiet", "mirrored"] {
        let _ = canaries.delete(name, &Default::default()).await;
        let _ = s.deployments().delete(name, &Default::default()).await;
    }
}

/// Every webhook type against a local receiver, each in its success and failure path, with
/// Flagger's payloads: gates that hold the rollout until they answer 200, pre-rollout and
/// rollout hooks whose failures (an error status, a hook that hangs past its timeout) are
/// failed checks that roll back, a rollback hook, post-rollout and event hooks whose
/// failures cost the rollout nothing.
async fn flagger_webhooks(cp: &ControlPlane) {
    use support::receiver::{Receiver, Reply};
    let ns = "hooks";
    let s = Scenario::new(cp, ns).await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    let rx = Receiver::start().await;
    let kinds = [
        "confirm-rollout",
        "pre-rollout",
        "rollout",
        "confirm-traffic-increase",
        "confirm-promotion",
        "post-rollout",
        "rollback",
        "event",
    ];
    let hooks: Vec<serde_json::Value> = kinds
        .iter()
        .map(|k| {
            serde_json::json!({"name": format!("{k}-hook"), "type": k, "url": rx.url(&format!("/{k}")),
                               "timeout": "1s", "metadata": {"cmd": format!("run {k}")}})
        })
        .collect();
    rx.reply("/confirm-rollout", Reply::Status(403));
    rx.reply("/confirm-promotion", Reply::Status(403));
    rx.reply("/rollback", Reply::Status(403));
    let canaries: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &meshcanary::canary::api_resource());
    let hooked = canary(
        ns,
        "podinfo",
        true,
        serde_json::json!({"threshold": 2, "webhooks": hooks}),
    );
    with_canary(&s, &canaries, &hooked).await;
    // The Canary in phase `want` for a revision other than `before`'s.
    let revision = |c: &DynamicObject| c.data["status"]["lastAppliedSpec"].clone();
    let phase_after = |want: &'static str, before: serde_json::Value, within: u64| {
        let canaries = canaries.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(within);
            loop {
                let c = canaries.get("podinfo").await.unwrap();
                if c.data["status"]["phase"] == want && revision(&c) != before {
                    return c;
                }
                assert!(
                    Instant::now() < deadline,
                    "never {want}: {}",
                    c.data["status"]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let initialized = phase_after("Initialized", serde_json::Value::Null, 60).await;

    // confirm-rollout closed: Waiting, the canary not scaled up.
    s.set_image("podinfo:6.0.1").await;
    phase_after("Waiting", revision(&initialized), 30).await;
    support::eventually(Duration::from_secs(10), "the gate asked twice", || {
        rx.count("/confirm-rollout") >= 2
    })
    .await;
    assert_eq!(
        s.replicas("podinfo").await,
        Some(0),
        "not scaled up behind a closed gate"
    );
    let asked = &rx.posts("/confirm-rollout")[0];
    assert_eq!(asked["name"], "podinfo");
    assert_eq!(asked["namespace"], ns);
    assert_eq!(asked["phase"], "Waiting");
    assert_eq!(asked["metadata"]["cmd"], "run confirm-rollout");
    assert!(
        asked["checksum"].as_str().is_some_and(|c| !c.is_empty()),
        "{asked}"
    );
    // Opened: pre-rollout, rollout hooks and every traffic increase, up to the promotion
    // gate, which holds at the last step.
    rx.reply("/confirm-rollout", Reply::Status(200));
    let held = phase_after("WaitingPromotion", revision(&initialized), 60).await;
    assert_eq!(held.data["status"]["canaryWeight"], 50);
    assert_eq!(s.weight().await, Some(50));
    assert_eq!(rx.posts("/pre-rollout")[0]["phase"], "Progressing");
    assert!(
        rx.count("/rollout") >= 6,
        "a rollout call per step: {}",
        rx.count("/rollout")
    );
    assert!(rx.count("/confirm-traffic-increase") >= 5);
    assert!(rx.count("/rollback") >= 1, "the rollback hook is polled");
    rx.reply("/confirm-promotion", Reply::Status(200));
    let promoted = phase_after("Succeeded", revision(&initialized), 60).await;
    support::eventually(Duration::from_secs(10), "post-rollout called", || {
        rx.count("/post-rollout") == 1
    })
    .await;
    assert_eq!(rx.posts("/post-rollout")[0]["phase"], "Succeeded");
    let events = rx.posts("/event");
    let told = |m: &str| events.iter().any(|e| e["metadata"]["eventMessage"] == m);
    assert!(
        told("Promotion completed! Scaling down podinfo.hooks"),
        "{events:#?}"
    );
    let e = &events[0];
    assert_eq!(e["metadata"]["eventType"], "Normal");
    assert!(
        e["metadata"]["timestamp"]
            .as_str()
            .is_some_and(|t| t.parse::<u64>().is_ok()),
        "{e}"
    );

    // A failing pre-rollout hook: failed checks, no traffic, rolled back; post-rollout told.
    rx.reply("/pre-rollout", Reply::Status(500));
    s.set_image("podinfo:6.0.2").await;
    let failed = phase_after("Failed", revision(&promoted), 60).await;
    assert_eq!(failed.data["status"]["failedChecks"], 2);
    let messages: Vec<String> = canary_events(&s.client, ns, "podinfo")
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("Halt podinfo.hooks advancement pre-rollout check pre-rollout-hook failed: answered HTTP 500")),
        "{messages:#?}"
    );
    support::eventually(
        Duration::from_secs(10),
        "post-rollout told of the rollback",
        || {
            rx.posts("/post-rollout")
                .last()
                .is_some_and(|p| p["phase"] == "Failed")
        },
    )
    .await;

    // A rollout hook that hangs past its 1 s timeout: failed checks, rolled back, and a
    // WebhookFailed Warning that says what happened.
    rx.reply("/pre-rollout", Reply::Status(200));
    rx.reply("/rollout", Reply::Hang);
    s.set_image("podinfo:6.0.3").await;
    let hung = phase_after("Failed", revision(&failed), 60).await;
    let events = canary_events(&s.client, ns, "podinfo").await;
    assert!(
        events.iter().any(|(r, m)| r == "WebhookFailed"
            && m == "Webhook rollout-hook (rollout) of podinfo.hooks failed: no answer within 1s"),
        "{events:#?}"
    );

    // The rollback hook answering 200 mid-analysis rolls back; a closed traffic gate holds
    // the first step until then; failing event and post-rollout hooks cost nothing.
    rx.reply("/rollout", Reply::Status(200));
    rx.reply("/confirm-traffic-increase", Reply::Status(403));
    rx.reply("/event", Reply::Status(500));
    rx.reply("/post-rollout", Reply::Status(500));
    s.set_image("podinfo:6.0.4").await;
    support::eventually_async(Duration::from_secs(30), "held at weight 2", || async {
        let c = canaries.get("podinfo").await.unwrap();
        c.data["status"]["canaryWeight"] == 2 && rx.count("/confirm-traffic-increase") >= 8
    })
    .await;
    assert_eq!(s.weight().await, Some(2));
    rx.reply("/rollback", Reply::Status(200));
    phase_after("Failed", revision(&hung), 30).await;
    let messages: Vec<String> = canary_events(&s.client, ns, "podinfo")
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert!(
        messages.contains(
            &"Rolling back podinfo.hooks manual webhook invoked: rollback-hook".to_owned()
        ),
        "{messages:#?}"
    );
    let m = agent.metrics.registry.encode();
    for (kind, result) in [
        ("event", "status"),
        ("rollout", "timeout"),
        ("pre-rollout", "status"),
        ("confirm-rollout", "status"),
        ("confirm-rollout", "ok"),
    ] {
        let line = format!("meshcanary_webhook_calls_total{{kind=\"{kind}\",result=\"{result}\"}}");
        assert!(support::counter(&m, &line) >= 1.0, "{line}: {m}");
    }
    agent.stop().await;
    let _ = canaries.delete("podinfo", &Default::default()).await;
    s.cleanup().await;
}

/// A Canary's alerts to AlertProviders of each type meshcanary posts to, at a local
/// receiver: Slack (the address inline), Microsoft Teams (the address in a Secret),
/// Discord (Slack's body at its `/slack` path) and generic JSON, one of them taking only
/// errors; a provider that does not exist is a Warning, never a stuck rollout.
async fn flagger_alerts(cp: &ControlPlane) {
    use k8s_openapi::api::core::v1::Secret;
    use meshcanary::controller::alerts::provider_resource;
    use support::receiver::Receiver;
    let ns = "alerts";
    let s = Scenario::new(cp, ns).await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows.clone(), "a", false).await;
    let rx = Receiver::start().await;
    let providers: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &provider_resource());
    let provider = |name: &str, spec: serde_json::Value| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flagger.app/v1beta1", "kind": "AlertProvider",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
        .unwrap()
    };
    for p in [
        provider(
            "slack",
            serde_json::json!({"type": "slack", "channel": "deploys", "username": "flagger", "address": rx.url("/slack-hook")}),
        ),
        provider(
            "teams",
            serde_json::json!({"type": "msteams", "secretRef": {"name": "teams-url"}}),
        ),
        provider(
            "discord",
            serde_json::json!({"type": "discord", "channel": "c", "address": rx.url("/discord")}),
        ),
        provider(
            "pager",
            serde_json::json!({"type": "generic", "address": rx.url("/pager")}),
        ),
    ] {
        providers.create(&PostParams::default(), &p).await.unwrap();
    }
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "teams-url", "namespace": ns},
        "stringData": {"address": rx.url("/teams")},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let alerts = serde_json::json!({"alerts": [
        {"name": "team", "severity": "info", "providerRef": {"name": "slack"}},
        {"name": "teams", "providerRef": {"name": "teams", "namespace": ns}},
        {"name": "discord", "severity": "warn", "providerRef": {"name": "discord"}},
        {"name": "on-call", "severity": "error", "providerRef": {"name": "pager"}},
        {"name": "gone", "severity": "error", "providerRef": {"name": "no-such-provider"}},
    ]});
    let canaries: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), ns, &meshcanary::canary::api_resource());
    with_canary(&s, &canaries, &canary(ns, "podinfo", true, alerts)).await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    s.set_image("podinfo:6.0.1").await;
    s.phase_is(Phase::Succeeded, Duration::from_secs(60)).await;
    support::eventually(Duration::from_secs(10), "the promotion told", || {
        rx.count("/slack-hook") >= 2 && rx.count("/teams") >= 2
    })
    .await;
    let slack = rx.posts("/slack-hook");
    assert_eq!(slack[0]["channel"], "deploys");
    assert_eq!(slack[0]["username"], "flagger");
    assert_eq!(slack[0]["attachments"][0]["author_name"], "podinfo.alerts");
    assert_eq!(
        slack[0]["attachments"][0]["text"],
        "New revision detected, progressing canary analysis."
    );
    assert_eq!(
        slack[1]["attachments"][0]["text"],
        "Canary analysis completed successfully, promotion finished."
    );
    assert_eq!(slack[1]["attachments"][0]["color"], "good");
    let teams = rx.posts("/teams");
    assert_eq!(teams[0]["@type"], "MessageCard");
    assert_eq!(
        teams[0]["sections"][0]["activitySubtitle"],
        "podinfo.alerts"
    );
    // warn and error providers heard nothing of a healthy release.
    assert_eq!(rx.count("/discord/slack") + rx.count("/pager"), 0);

    // A failing release: halts (warn) and the rollback (error) reach the others too.
    s.set_image("podinfo:6.0.2").await;
    s.phase_is(Phase::Progressing, Duration::from_secs(30))
        .await;
    windows.set(window(0.5));
    s.phase_is(Phase::Failed, Duration::from_secs(60)).await;
    support::eventually(Duration::from_secs(10), "the rollback told", || {
        rx.count("/pager") == 1 && rx.count("/discord/slack") >= 2
    })
    .await;
    let pager = &rx.posts("/pager")[0];
    assert_eq!(pager["severity"], "error");
    assert_eq!(pager["name"], "podinfo");
    assert_eq!(
        pager["message"],
        "Canary analysis failed, Deployment scaled to zero."
    );
    assert!(
        pager["fields"]["Reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("Rolling back podinfo.alerts")),
        "{pager}"
    );
    let discord = rx.posts("/discord/slack");
    assert_eq!(discord.last().unwrap()["attachments"][0]["color"], "danger");
    assert!(
        discord[0]["attachments"][0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("Halt podinfo.alerts advancement")),
        "{discord:#?}"
    );
    let slack = rx.posts("/slack-hook");
    assert_eq!(slack.last().unwrap()["attachments"][0]["color"], "danger");
    // The missing provider: one Warning naming it, and the rollout was not held up.
    support::eventually_async(Duration::from_secs(10), "AlertFailed", || async {
        canary_events(&s.client, ns, "podinfo")
            .await
            .iter()
            .any(|(r, m)| {
                r == "AlertFailed"
                    && m.contains("AlertProvider alerts/no-such-provider does not exist")
            })
    })
    .await;
    let m = agent.metrics.registry.encode();
    assert!(
        support::counter(
            &m,
            "meshcanary_alerts_total{severity=\"error\",result=\"ok\"}"
        ) >= 3.0,
        "{m}"
    );
    assert!(
        support::counter(
            &m,
            "meshcanary_alerts_total{severity=\"error\",result=\"not_found\"}"
        ) >= 1.0,
        "{m}"
    );
    agent.stop().await;
    let _ = canaries.delete("podinfo", &Default::default()).await;
    s.cleanup().await;
}

async fn new_revision(cp: &ControlPlane) {
    let s = Scenario::new(cp, "restart").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    s.analysing(&[], 10).await;
    s.set_image("podinfo:6.0.2").await;
    let second_zero = |w: &[u8]| w.iter().skip(1).position(|&x| x == 0).map(|i| i + 1);
    let weights = s
        .record_weights(Duration::from_secs(90), |w| {
            second_zero(w).is_some_and(|i| w[i + 1..].ends_with(&[50, 0]))
        })
        .await;
    let i = second_zero(&weights).unwrap();
    assert!(weights[..i].contains(&10), "{weights:?}");
    assert_eq!(
        weights[i + 1..],
        [2, 5, 10, 20, 30, 50, 0],
        "after the restart every step again: {weights:?}"
    );
    s.phase_is(Phase::Succeeded, Duration::from_secs(30)).await;
    assert!(s
        .events()
        .await
        .contains(&"New revision detected! Restarting analysis for podinfo.restart".to_owned()));
    let primary = s.deployments().get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("podinfo:6.0.2")
    );
    agent.stop().await;
    s.cleanup().await;
}

async fn resume(cp: &ControlPlane) {
    let s = Scenario::new(cp, "resume").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows.clone(), "a", false).await;
    let before = s.analysing(&[("meshcanary.io/interval", "2s")], 10).await;
    agent.kill();
    let at_kill = s.status().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent = Agent::start(cp, windows, "b", false).await;
    let mut weights = before.clone();
    let rest = s
        .record_weights(Duration::from_secs(90), |w| {
            w.last() == Some(&0) && w.len() > 1
        })
        .await;
    weights.extend(rest.into_iter().skip_while(|w| before.contains(w)));
    assert_eq!(
        weights,
        [0, 2, 5, 10, 20, 30, 50, 0],
        "killed at {at_kill:?}"
    );
    s.phase_is(Phase::Succeeded, Duration::from_secs(30)).await;
    let events = s.events().await;
    for a in ADVANCES {
        let a = a.replace("{ns}", "resume");
        assert_eq!(
            events.iter().filter(|e| **e == a).count(),
            1,
            "{a} once: {events:#?}"
        );
    }
    agent.stop().await;
    s.cleanup().await;
}

async fn two_agents(cp: &ControlPlane) {
    let s = Scenario::new(cp, "leader").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let a = Agent::start(cp, windows.clone(), "agent-a", true).await;
    let b = Agent::start(cp, windows.clone(), "agent-b", true).await;
    support::eventually(Duration::from_secs(30), "a leader", || {
        a.is_leader() || b.is_leader()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.is_leader() ^ b.is_leader(), "exactly one leader");
    s.analysing(&[("meshcanary.io/interval", "2s")], 5).await;
    // Only the leader wrote: the follower made no decisions.
    let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
    let decisions = |ag: &Agent| {
        support::counter(&ag.metrics.registry.encode(), "meshcanary_decisions_total{namespace=\"leader\",workload=\"podinfo\",kind=\"advance\"}")
    };
    assert!(decisions(&leader) >= 2.0);
    assert_eq!(decisions(&follower), 0.0);
    leader.kill();
    let weights = s
        .record_weights(Duration::from_secs(90), |w| {
            w.last() == Some(&0) && w.len() > 1
        })
        .await;
    assert!(weights.ends_with(&[30, 50, 0]), "{weights:?}");
    s.phase_is(Phase::Succeeded, Duration::from_secs(30)).await;
    assert!(follower.is_leader());
    assert!(decisions(&follower) >= 1.0);
    follower.stop().await;
    s.cleanup().await;
}

async fn invalid(cp: &ControlPlane) {
    let s = Scenario::new(cp, "invalid").await;
    let agent = Agent::start(cp, Script::default(), "a", false).await;
    s.create(&podinfo(
        "invalid",
        "podinfo:6.0.0",
        &[("meshcanary.io/step-weights", "10,5")],
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let e = s.events().await;
        if !e.is_empty() {
            break e;
        }
        assert!(Instant::now() < deadline, "no Warning event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(events, ["annotation meshcanary.io/step-weights has value \"10,5\": expected increasing whole percentages from 1 to 99, comma separated; meshcanary leaves podinfo.invalid untouched"]);
    let api: Api<Event> = Api::namespaced(s.client.clone(), "invalid");
    let items = api.list(&ListParams::default()).await.unwrap().items;
    let e = items
        .iter()
        .find(|e| e.reporting_component.as_deref() == Some("meshcanary"))
        .unwrap();
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s
        .deployments()
        .get_opt("podinfo-primary")
        .await
        .unwrap()
        .is_none());
    assert!(s.status().await.is_none());
    assert_eq!(s.replicas("podinfo").await, Some(2), "untouched");
    let m = agent.metrics.registry.encode();
    assert_eq!(
        support::counter(
            &m,
            "meshcanary_rollout_invalid_config{namespace=\"invalid\""
        ),
        1.0
    );
    agent.stop().await;
    s.cleanup().await;
}

/// What happens to an analysis that meshcanary must stop: a bad annotation and an opt-out
/// route everything to the primary before letting go; a status that does not parse is a
/// Warning and a fresh start that analyses the canary again.
async fn let_go(cp: &ControlPlane) {
    let s = Scenario::new(cp, "letgo").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    s.analysing(&[("meshcanary.io/interval", "60s")], 2).await;
    let annotate = |key: &'static str, value: Option<&'static str>| {
        let api = s.deployments();
        async move {
            let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
            api.patch("podinfo", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("annotating podinfo");
        }
    };
    let back_to =
        |want: u8| s.record_weights(Duration::from_secs(30), move |w| w.last() == Some(&want));
    // A bad annotation mid-analysis.
    annotate("meshcanary.io/step-weights", Some("10,5")).await;
    back_to(0).await;
    s.events_ending("annotation meshcanary.io/step-weights has value \"10,5\": expected increasing whole percentages from 1 to 99, comma separated; meshcanary leaves podinfo.letgo untouched").await;
    assert!(s.events().await.contains(&"Routing all traffic to primary: its configuration is invalid; meshcanary stops the analysis of podinfo.letgo".to_owned()));
    assert_eq!(s.status().await.unwrap().phase, Phase::Initialized);
    // Fixed: the revision is analysed from the start.
    annotate("meshcanary.io/step-weights", None).await;
    back_to(2).await;
    // Opted out mid-analysis.
    annotate("meshcanary.io/enabled", Some("false")).await;
    back_to(0).await;
    s.events_ending("Routing all traffic to primary: meshcanary.io/enabled is no longer \"true\"; meshcanary stops the analysis of podinfo.letgo").await;
    // Back in, with a status that is not one meshcanary wrote: a Warning, a fresh start from
    // the primary's revision, and the canary (a different revision) is analysed again.
    annotate(
        "meshcanary.io/status",
        Some("{\"phase\":\"Progressing\",\"canaryWeight\":250}"),
    )
    .await;
    annotate("meshcanary.io/enabled", Some("true")).await;
    back_to(2).await;
    let events = s.events().await;
    assert!(
        events
            .iter()
            .any(|e| e
                .starts_with("annotation meshcanary.io/status is not a status meshcanary wrote")),
        "{events:#?}"
    );
    agent.stop().await;
    s.cleanup().await;
}

/// A controller that starts while the apiserver is down keeps its loop (and `/healthz`)
/// alive, joins the election once the apiserver is back and runs a rollout to the end; a
/// controller whose loop is killed turns `/healthz` bad within its liveness bound.
async fn apiserver_down_at_start(cp: &mut ControlPlane) {
    let s = Scenario::new(cp, "coldstart").await;
    s.create(&podinfo("coldstart", "podinfo:6.0.0", &[])).await;
    let windows = Script::default();
    windows.set(window(1.0));
    cp.stop_apiserver();
    let agent = Agent::start(cp, windows, "cold", true).await;
    let listener = meshcanary::telemetry::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let healthz = format!("http://{}/healthz", listener.local_addr().unwrap());
    let metrics = Arc::clone(&agent.metrics);
    let endpoints = meshcanary::telemetry::Endpoints {
        metrics: Arc::new(move || metrics.registry.encode()),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        heartbeat: agent.heartbeat.clone(),
    };
    let (stop_http, rx) = watch::channel(false);
    tokio::spawn(meshcanary::telemetry::serve(
        listener,
        endpoints,
        meshcanary::telemetry::HttpServer {
            name: "telemetry",
            limits: meshcanary::telemetry::HttpLimits::default(),
            metrics: agent.metrics.http.clone(),
        },
        rx,
    ));
    // The outage: 20 s, during which the loop keeps beating (bound 2 s) and nobody leads.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(20) {
        let (status, _) = support::get(&healthz).await.unwrap();
        assert_eq!(status, 200, "/healthz while the apiserver is down");
        assert!(!agent.is_leader());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cp.start_apiserver().await;
    let s = Scenario::new(cp, "coldstart").await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    assert!(agent.is_leader());
    s.set_image("podinfo:6.0.1").await;
    s.phase_is(Phase::Succeeded, Duration::from_secs(60)).await;
    // The loop dies: /healthz says so within the bound, so the kubelet would restart it.
    let heartbeat = agent.heartbeat.clone();
    agent.kill();
    support::eventually_async(Duration::from_secs(10), "/healthz failing", || {
        let url = healthz.clone();
        async move { matches!(support::get(&url).await, Ok((503, _))) }
    })
    .await;
    let (_, body) = support::get(&healthz).await.unwrap();
    assert!(
        body.contains("the controller loop has not run for"),
        "{body}"
    );
    assert!(heartbeat.check(meshcanary::clock::unix_ms()).is_err());
    let _ = stop_http.send(true);
    s.cleanup().await;
}

async fn apiserver_restart(cp: &mut ControlPlane) {
    let s = Scenario::new(cp, "outage").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "a", false).await;
    s.analysing(&[("meshcanary.io/interval", "2s")], 5).await;
    cp.restart_apiserver().await;
    let s = Scenario::new(cp, "outage").await;
    s.record_weights(Duration::from_secs(120), |w| w.contains(&50))
        .await;
    s.phase_is(Phase::Succeeded, Duration::from_secs(60)).await;
    let events = s.events().await;
    for a in ADVANCES {
        let a = a.replace("{ns}", "outage");
        assert!(
            events.iter().filter(|e| **e == a).count() <= 1,
            "{a} at most once: {events:#?}"
        );
    }
    agent.stop().await;
    s.cleanup().await;
}

async fn garbage_collection(cp: &ControlPlane) {
    let s = Scenario::new(cp, "gc").await;
    let agent = Agent::start(cp, Script::default(), "a", false).await;
    s.create(&podinfo("gc", "podinfo:6.0.0", &[])).await;
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    agent.stop().await;
    s.deployments()
        .delete("podinfo", &Default::default())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(s.client.clone(), "gc");
    let routers: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), "gc", &appmesh::resource("VirtualRouter"));
    let nodes: Api<DynamicObject> =
        Api::namespaced_with(s.client.clone(), "gc", &appmesh::resource("VirtualNode"));
    support::eventually_async(Duration::from_secs(60), "everything collected", || async {
        s.deployments()
            .list(&ListParams::default())
            .await
            .is_ok_and(|l| l.items.is_empty())
            && services
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
            && routers
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
            && nodes
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
    })
    .await;
}

async fn discovery(cp: &ControlPlane) {
    use meshcanary::discover::pods::{self, DiscoveryConfig};
    let s = Scenario::new(cp, "disc").await;
    // A non-mesh namespace with the same workload: never scraped.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(s.client.clone());
    let plain = serde_json::from_value(serde_json::json!({"metadata": {"name": "plain"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &plain)
        .await
        .unwrap();
    let body =
        std::fs::read(support::repo().join("tests/fixtures/envoy-1.40-1-clusters.prom")).unwrap();
    let admin =
        support::FakeAdmin::start(support::FakeAdmin::ok(&body, true), Duration::ZERO).await;
    let port = admin.port.to_string();
    let with_port = |ns: &str| {
        let mut d = podinfo(ns, "podinfo:6.0.0", &[]);
        let t = d
            .spec
            .as_mut()
            .unwrap()
            .template
            .metadata
            .get_or_insert_with(Default::default);
        t.annotations = Some([("meshcanary.io/envoy-admin-port".to_owned(), port.clone())].into());
        d
    };
    let agent = Agent::start(cp, Script::default(), "a", false).await;
    s.create(&with_port("disc")).await;
    let plain_deployments: Api<Deployment> = Api::namespaced(s.client.clone(), "plain");
    plain_deployments
        .create(&PostParams::default(), &with_port("plain"))
        .await
        .unwrap();
    s.phase_is(Phase::Initialized, Duration::from_secs(60))
        .await;
    s.set_image("podinfo:6.0.1").await;
    s.phase_is(Phase::Progressing, Duration::from_secs(30))
        .await;
    // The analysis halts (the script has no windows): node-b has the two primary pods,
    // node-a the two canary pods.
    let (stop, rx) = watch::channel(false);
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let config = DiscoveryConfig {
            node_name: node.into(),
            namespace_selector: "appmesh.k8s.aws/sidecarInjectorWebhook=enabled".into(),
            envoy_container: "envoy".into(),
            data_plane: None,
        };
        let targets = pods::start(cp.agent_client().await, config, rx.clone());
        let config = support::RunningAgent::config(&[], 32 << 20, |_| {});
        agents.push(support::RunningAgent::launch(config, Some(targets)).await);
    }
    let keys = |a: &support::RunningAgent| {
        let mut k: Vec<String> = a
            .shared
            .target_statuses()
            .iter()
            .filter(|t| t.up)
            .map(|t| t.target.key.to_string())
            // Another scenario that failed may have left its workload behind.
            .filter(|k| k.starts_with("disc/"))
            .collect();
        k.sort();
        k
    };
    support::eventually(
        Duration::from_secs(30),
        "both nodes scraping their own pods",
        || {
            keys(&agents[0]) == ["disc/podinfo/canary", "disc/podinfo/canary"]
                && keys(&agents[1]) == ["disc/podinfo/primary", "disc/podinfo/primary"]
        },
    )
    .await;
    let ids: Vec<String> = agents[0]
        .shared
        .target_statuses()
        .iter()
        .map(|t| t.target.id.clone())
        .filter(|id| id.starts_with("disc/"))
        .collect();
    assert!(
        ids.iter().all(|id| id.starts_with("disc/podinfo-")),
        "{ids:?}"
    );
    let now = meshcanary::clock::unix_ms();
    assert!(agents[0]
        .shared
        .summaries(now)
        .iter()
        .any(|(k, _)| k.to_string() == "disc/podinfo/canary"));
    // The canary scaled to 0: its targets and its window go; node-b is unaffected.
    agent.stop().await;
    let zero = serde_json::json!({"spec": {"replicas": 0}});
    s.deployments()
        .patch("podinfo", &PatchParams::default(), &Patch::Merge(&zero))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the canary's targets and window dropped",
        || {
            agents[0].shared.target_statuses().is_empty()
                && agents[0]
                    .shared
                    .summaries(meshcanary::clock::unix_ms())
                    .is_empty()
        },
    )
    .await;
    assert_eq!(keys(&agents[1]).len(), 2, "node-b keeps its primaries");
    let _ = stop.send(true);
    for a in agents {
        a.shutdown().await;
    }
    s.cleanup().await;
    let _ = plain_deployments
        .delete("podinfo", &Default::default())
        .await;
}

/// A pod as Istio's injector leaves it (an `istio-proxy` container, in a namespace labelled
/// `istio-injection=enabled`), its sidecar a real Envoy shaped as Istio's: the agent finds it
/// as the istio data plane, scrapes its stats port and reads Istio's names exactly.
async fn istio_discovery(cp: &ControlPlane) {
    use meshcanary::discover::pods::{self, DiscoveryConfig};
    use meshcanary::discover::DataPlane;
    let ns = "istio-disc";
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cp.client().await);
    let labelled = serde_json::from_value(serde_json::json!({"metadata": {"name": ns,
        "labels": {"istio-injection": "enabled"}}}))
    .unwrap();
    let _ = namespaces.create(&PostParams::default(), &labelled).await;
    let s = Scenario::new(cp, ns).await;
    let app = support::App::start().await;
    let sidecar = support::Sidecar::start_istio(app.port, "1s").await;
    let stats_port = sidecar.istio_stats_port.unwrap().to_string();
    let mut d = podinfo(ns, "podinfo:6.0.0", &[]);
    let template = &mut d.spec.as_mut().unwrap().template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations = Some([("meshcanary.io/envoy-admin-port".to_owned(), stats_port)].into());
    let containers = &mut template.spec.as_mut().unwrap().containers;
    containers.retain(|c| c.name != "envoy");
    containers.push(
        serde_json::from_value(
            serde_json::json!({"name": "istio-proxy", "image": "istio/proxyv2"}),
        )
        .unwrap(),
    );
    // Discovery needs only the opt-in: no controller runs, so podinfo's pods are canaries.
    s.create(&d).await;
    let (stop, rx) = watch::channel(false);
    let config = DiscoveryConfig {
        node_name: "node-a".into(),
        namespace_selector: "istio-injection=enabled".into(),
        envoy_container: "envoy".into(),
        data_plane: None,
    };
    let targets = pods::start(cp.agent_client().await, config, rx);
    let agent = support::RunningAgent::launch(
        support::RunningAgent::config(&[], 32 << 20, |_| {}),
        Some(targets),
    )
    .await;
    support::eventually(
        Duration::from_secs(30),
        "the Istio sidecars scraped",
        || {
            let up = agent.shared.target_statuses();
            up.len() == 2
                && up
                    .iter()
                    .all(|t| t.up && t.target.data_plane == DataPlane::Istio)
        },
    )
    .await;
    let url = agent.shared.target_statuses()[0].target.admin_url.clone();
    assert_eq!(url, sidecar.stats_url(), "scraped on the stats port");
    let ok = sidecar.drive("/", 30).await;
    let failed = sidecar.drive("/status/503", 10).await;
    assert!(ok.iter().all(|&c| c == 200) && failed.iter().all(|&c| c == 503));
    // Both replicas' targets are the same Envoy here (one pod IP): every request counts twice.
    let canary = || {
        agent
            .shared
            .summaries(meshcanary::clock::unix_ms())
            .into_iter()
            .find(|(k, _)| k.to_string() == format!("{ns}/podinfo/canary"))
            .map(|(_, s)| s)
            .unwrap_or_default()
    };
    support::eventually(Duration::from_secs(15), "80 requests in the window", || {
        canary().requests == 80
    })
    .await;
    assert_eq!(canary().errors, 20, "Istio's response_code label read");
    let m = agent.shared.render_metrics();
    assert_eq!(
        support::counter(&m, "meshcanary_scrape_no_inbound_cluster_total "),
        0.0,
        "{m}"
    );
    let _ = stop.send(true);
    agent.shutdown().await;
    s.cleanup().await;
}

async fn lease_lost(cp: &ControlPlane) {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let s = Scenario::new(cp, "lost").await;
    let windows = Script::default();
    windows.set(window(1.0));
    let agent = Agent::start(cp, windows, "agent-x", true).await;
    support::eventually(Duration::from_secs(30), "leader", || agent.is_leader()).await;
    s.analysing(&[("meshcanary.io/interval", "2s")], 5).await;
    // Someone else takes the Lease and keeps renewing it, as a newly elected leader would.
    let leases: Api<Lease> = Api::namespaced(cp.client().await, "meshcanary");
    let thief = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                let now =
                    serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now())).unwrap();
                let steal = serde_json::json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 3}});
                let _ = leases
                    .patch(
                        "meshcanary-test",
                        &PatchParams::default(),
                        &Patch::Merge(&steal),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let stolen = Instant::now();
    support::eventually(Duration::from_secs(10), "leadership lost", || {
        !agent.is_leader()
    })
    .await;
    eprintln!(
        "leadership lost {:.1} s after the Lease was taken",
        stolen.elapsed().as_secs_f64()
    );
    // A write already in flight when the flag turned may still land; none may start after.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = (s.status().await, s.weight().await);
    // Three step intervals: a leader would have advanced at least once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        (s.status().await, s.weight().await),
        before,
        "no write after losing the Lease"
    );
    assert!(!agent.is_leader());
    thief.abort();
    agent.stop().await;
    leases
        .delete("meshcanary-test", &Default::default())
        .await
        .unwrap();
    s.cleanup().await;
}

async fn peer_auth(cp: &ControlPlane) {
    use meshcanary::peers::auth::Reviewer;
    use meshcanary::peers::serve::PeerServer;
    use prost::Message as _;
    let config = support::RunningAgent::config(&[], 1 << 20, |_| {});
    let agent = meshcanary::agent::Agent::new(config).unwrap();
    let shared = agent.shared();
    let reviewer = Arc::new(Reviewer::new(
        cp.agent_client().await,
        "meshcanary-peers".into(),
        "system:serviceaccount:meshcanary:meshcanary-controller".into(),
        shared.metrics.peers.token_reviews.clone(),
    ));
    let limits = meshcanary::telemetry::HttpLimits {
        max_connections: 32,
        header_timeout: Duration::from_secs(2),
    };
    let server = PeerServer {
        windows: Arc::clone(&shared.windows),
        metrics: shared.metrics.peers.clone(),
        http_metrics: shared.metrics.http.clone(),
        node: "node-a".into(),
        reviewer: Some(Arc::clone(&reviewer)),
        limits,
    };
    let listener = meshcanary::telemetry::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!(
        "http://{}/v1/windows?since=0",
        listener.local_addr().unwrap()
    );
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(listener, rx));
    cp.kubectl(&["create", "serviceaccount", "intruder", "-n", "meshcanary"]);
    let token = |sa: &str, audience: &str| {
        let t = cp.kubectl(&[
            "create",
            "token",
            sa,
            "-n",
            "meshcanary",
            "--audience",
            audience,
        ]);
        format!("Bearer {}", t.trim())
    };
    let good = token("meshcanary-controller", "meshcanary-peers");
    for (auth, want) in [
        (Some(good.clone()), 200),
        (Some(good.clone()), 200), // the cached verdict
        (None, 401),
        (
            Some(token(
                "meshcanary-controller",
                "https://kubernetes.default.svc",
            )),
            401,
        ),
        // Another agent (a compromised node) is not the controller.
        (Some(token("meshcanary", "meshcanary-peers")), 401),
        (Some(token("intruder", "meshcanary-peers")), 401),
        (Some("Bearer not-a-token".into()), 401),
    ] {
        let (status, body) = support::get_with(&url, auth.as_deref()).await.unwrap();
        assert_eq!(status, want, "{}", String::from_utf8_lossy(&body));
        if status == 200 {
            let reply = meshcanary::peers::WindowsReply::decode(body).expect("a protobuf reply");
            assert_eq!(reply.node, "node-a");
        }
    }
    let metrics = shared.render_metrics();
    for (result, n) in [
        ("ok", 2.0),
        ("no_token", 1.0),
        ("token_rejected", 2.0),
        ("wrong_user", 2.0),
    ] {
        assert_eq!(
            support::counter(
                &metrics,
                &format!("meshcanary_peer_requests_total{{result=\"{result}\"}}")
            ),
            n,
            "{result}"
        );
    }
    hostile_clients(
        &shared,
        &reviewer,
        &url,
        limits,
        &good,
        rx_for_telemetry(&stop),
    )
    .await;
    let _ = stop.send(true);
    let _ = task.await;
}

fn rx_for_telemetry(stop: &watch::Sender<bool>) -> watch::Receiver<bool> {
    stop.subscribe()
}

/// A TCP connection to `addr`, or `None` if it is not made within 3 s.
async fn connect(addr: std::net::SocketAddr) -> Option<tokio::net::TcpStream> {
    tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The peer and telemetry ports under hostile clients for 8 s: thousands of connections
/// that send nothing, some that trickle a header a byte at a time, and requests with
/// made-up tokens. The controller's keep-alive poll and fresh `/metrics` requests keep
/// being answered, open connections stay at the cap, idle ones are closed, the token
/// cache stays bounded and keeps the agents' own verdict.
async fn hostile_clients(
    shared: &Arc<meshcanary::agent::Shared>,
    reviewer: &Arc<meshcanary::peers::auth::Reviewer>,
    peer_url: &str,
    limits: meshcanary::telemetry::HttpLimits,
    good: &str,
    shutdown: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = meshcanary::telemetry::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let telemetry_addr = listener.local_addr().unwrap();
    let metrics_url = format!("http://{telemetry_addr}/metrics");
    let rendered = Arc::clone(shared);
    let endpoints = meshcanary::telemetry::Endpoints {
        metrics: Arc::new(move || rendered.render_metrics()),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        heartbeat: meshcanary::telemetry::Heartbeat::default(),
    };
    let server = meshcanary::telemetry::HttpServer {
        name: "telemetry",
        limits,
        metrics: shared.metrics.http.clone(),
    };
    tokio::spawn(meshcanary::telemetry::serve(
        listener, endpoints, server, shutdown,
    ));
    let peer_addr: std::net::SocketAddr = peer_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let reviews_ok =
        |m: &str| support::counter(m, r#"meshcanary_peer_token_reviews_total{result="ok"}"#);
    let reviews_before = reviews_ok(&shared.render_metrics());
    // The controller's poller: one keep-alive connection, established before the flood.
    let poller = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let poll = |client: &hyper_util::client::legacy::Client<_, _>| {
        let req = http::Request::get(peer_url)
            .header(http::header::AUTHORIZATION, good)
            .body(http_body_util::Empty::new())
            .unwrap();
        let fut = client.request(req);
        async move {
            use http_body_util::BodyExt as _;
            match tokio::time::timeout(Duration::from_secs(3), fut).await {
                Ok(Ok(resp)) => {
                    let ok = resp.status() == 200;
                    let _ = resp.into_body().collect().await;
                    ok
                }
                _ => false,
            }
        }
    };
    assert!(poll(&poller).await, "the poller works before the flood");
    let rss_before = rss_kib();
    let flood_for = Duration::from_secs(8);
    let until = Instant::now() + flood_for;
    let mut idle = tokio::task::JoinSet::new();
    // 950 per port: under the listen backlog (1024), so that every connection the client
    // sees as open is one the server will accept (past the backlog the kernel holds the
    // handshake half-done, and an idle client then never hears of the server at all).
    for addr in [peer_addr, telemetry_addr] {
        for _ in 0..900 {
            idle.spawn(async move {
                let mut s = connect(addr).await?;
                // Sends nothing; did the server close it within its header timeout (plus
                // the flood, during which it may wait its turn)?
                let mut buf = [0u8; 64];
                let closed = tokio::time::timeout(Duration::from_secs(16), s.read(&mut buf))
                    .await
                    .is_ok();
                Some(closed)
            });
        }
        for _ in 0..50 {
            idle.spawn(async move {
                let mut s = connect(addr).await?;
                let _ = s
                    .write_all(b"GET /v1/windows HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await;
                // A byte every 300 ms: never a whole header.
                while Instant::now() < until + Duration::from_secs(8) {
                    if s.write_all(b"a").await.is_err() {
                        return Some(true);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Some(false)
            });
        }
    }
    // Made-up tokens, more than the cache holds, 16 at a time.
    let forged = tokio::spawn({
        let url = peer_url.to_owned();
        async move {
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for i in 0..(meshcanary::peers::auth::MAX_CACHED + 200) {
                let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
                let url = url.clone();
                set.spawn(async move {
                    let _permit = permit;
                    let token = format!("Bearer forged-{i}-{}", fastrand::u64(..));
                    for _ in 0..3 {
                        if let Ok((status, _)) = support::get_with(&url, Some(&token)).await {
                            return status;
                        }
                    }
                    0
                });
            }
            let mut refused = 0;
            while let Some(status) = set.join_next().await {
                refused += usize::from(status.unwrap_or(0) == 401);
            }
            refused
        }
    });
    let (mut polls, mut polls_ok, mut scrapes, mut scrapes_ok, mut most_open) =
        (0, 0, 0, 0, 0.0f64);
    while Instant::now() < until {
        polls += 1;
        polls_ok += usize::from(poll(&poller).await);
        if polls % 2 == 0 {
            scrapes += 1;
            if let Ok((200, body)) = support::get(&metrics_url).await {
                scrapes_ok += 1;
                for server in ["peers", "telemetry"] {
                    most_open = most_open.max(support::counter(
                        &body,
                        &format!("meshcanary_http_connections{{server=\"{server}\"}}"),
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = forged.await.unwrap();
    let mut connected = 0;
    let mut closed = 0;
    while let Some(r) = idle.join_next().await {
        if let Some(c) = r.unwrap() {
            connected += 1;
            closed += usize::from(c);
        }
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    let metrics = shared.render_metrics();
    eprintln!(
        "hostile clients: polls {polls_ok}/{polls}, /metrics {scrapes_ok}/{scrapes}, most open {most_open}, \
         idle/slow connected {connected} closed {closed}, forged refused {refused}, cached {}, RSS +{grown_mib} MiB",
        reviewer.cached()
    );
    assert_eq!(polls_ok, polls, "the controller's polls kept succeeding");
    assert!(polls >= 20, "{polls} polls");
    assert!(
        scrapes_ok * 10 >= scrapes * 9,
        "/metrics answered {scrapes_ok} of {scrapes}"
    );
    assert!(
        most_open <= limits.max_connections as f64,
        "open connections {most_open} over the cap"
    );
    assert!(
        connected >= 1800,
        "only {connected} hostile connections got through"
    );
    assert_eq!(
        closed, connected,
        "every idle or trickling connection was closed"
    );
    assert!(
        refused > meshcanary::peers::auth::MAX_CACHED,
        "forged tokens refused: {refused}"
    );
    assert!(reviewer.cached() <= meshcanary::peers::auth::MAX_CACHED);
    assert_eq!(
        reviews_ok(&metrics),
        reviews_before,
        "the agents' own verdict stayed cached through the flood"
    );
    assert!(
        support::counter(
            &metrics,
            r#"meshcanary_http_timeouts_total{server="peers"}"#
        ) + support::counter(&metrics, r#"meshcanary_http_refused_total{server="peers"}"#)
            > 0.0
    );
    assert!(grown_mib < 64, "RSS grew {grown_mib} MiB");
    assert!(poll(&poller).await, "still answering after the flood");
}
