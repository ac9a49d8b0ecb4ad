//! The controller at scale (`scripts/bench.sh controller`): one real `meshcanary controller`
//! process against N agent endpoints and W workloads under analysis, on a real control
//! plane (etcd, kube-apiserver, kube-controller-manager, the kubelet stand-in).
//!
//! The agents are real peer servers (`meshcanary::peers::serve::PeerServer`: real HTTP, the
//! controller's token checked by TokenReview), all in this process, each on its own loopback
//! address and with its own Pod object on its own node; each serves windows that a feeder
//! records every second for the workloads whose pods run on its node (the canary of workload
//! `i` on node `2i mod N`, its primary on node `2i+1 mod N`), as scrapes would. The
//! workloads are real rollouts: created, bootstrapped by the controller, then given a new
//! revision with a one-hour interval, so they stay under analysis for the whole measurement.
//!
//! Once every workload is analysing, it measures the controller process for `--seconds`: its
//! CPU (from `/proc`) and its tick time (`meshcanary_controller_tick_seconds`, p50 and p99
//! interpolated in the histogram's buckets, as `histogram_quantile` does), and prints one
//! line. Everything runs on loopback and stops by itself.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshcanary::window::{Delta, Role, WindowKey};
use support::kube::{ControlPlane, Kubelet, Placement};

#[derive(Parser)]
struct Args {
    /// Agent endpoints (one node each).
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Workloads under analysis.
    #[arg(long, default_value_t = 10)]
    workloads: usize,
    /// Measurement after the warm-up.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The `meshcanary` binary (release).
    #[arg(long)]
    meshcanary: PathBuf,
}

const NS: &str = "bench";

fn agent_ip(j: usize) -> String {
    format!("127.1.{}.{}", j / 250, j % 250 + 1)
}

fn nodes_of(i: usize, agents: usize) -> (usize, usize) {
    ((2 * i) % agents, (2 * i + 1) % agents)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let cp = ControlPlane::start().await;
    let manifests = support::repo().join("manifests");
    for f in ["namespace.yaml", "rbac.yaml"] {
        cp.kubectl(&["apply", "-f", manifests.join(f).to_str().unwrap()]);
    }
    cp.mesh_namespace(NS).await;
    let client = cp.client().await;
    let agents = args.agents;
    // The kubelet stand-in: agents on their annotated node and IP; workload `wI`'s canary
    // pods on node 2I, its primary's on node 2I+1.
    let placement: Placement = Arc::new(move |pod: &Pod| {
        let a = pod.metadata.annotations.as_ref();
        if let Some(ip) = a.and_then(|a| a.get("bench.meshcanary.io/pod-ip")) {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            return (node.unwrap_or_default(), ip.clone());
        }
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let i: usize = name
            .trim_start_matches('w')
            .split('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let (canary, primary) = nodes_of(i, agents);
        let node = if name.contains("-primary-") {
            primary
        } else {
            canary
        };
        (format!("node-{node}"), "127.0.0.1".into())
    });
    let _kubelet = Kubelet::start(client.clone(), placement);

    // The agents: Pod objects, peer servers, and windows fed every second.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "meshcanary");
    let agent_client = cp.agent_client().await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut shared = Vec::new();
    for j in 0..agents {
        let ip = agent_ip(j);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("agent-{j}"),
                "labels": {"app.kubernetes.io/name": "meshcanary", "app.kubernetes.io/component": "agent"},
                "annotations": {"bench.meshcanary.io/pod-ip": ip},
            },
            "spec": {"nodeName": format!("node-{j}"), "containers": [{"name": "meshcanary", "image": "meshcanary"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let config = support::RunningAgent::config(&[], 1 << 20, |c| {
            c.listen = None;
            c.window.slots = 30;
        });
        let agent = meshcanary::agent::Agent::new(config).unwrap();
        let s = agent.shared();
        let reviewer = meshcanary::peers::auth::Reviewer::new(
            agent_client.clone(),
            "meshcanary-peers".into(),
            "system:serviceaccount:meshcanary:meshcanary-controller".into(),
            s.metrics.peers.token_reviews.clone(),
        );
        let server = meshcanary::peers::serve::PeerServer {
            windows: Arc::clone(&s.windows),
            metrics: s.metrics.peers.clone(),
            http_metrics: s.metrics.http.clone(),
            node: format!("node-{j}"),
            reviewer: Some(Arc::new(reviewer)),
            limits: meshcanary::telemetry::HttpLimits::default(),
        };
        let listener = meshcanary::telemetry::listen(format!("{ip}:9103").parse().unwrap())
            .expect("binding an agent's peer port");
        tokio::spawn(server.serve(listener, rx.clone()));
        shared.push(s);
    }
    // Which windows each agent feeds: (agent, key).
    let mut feeds: Vec<(usize, WindowKey)> = Vec::new();
    for i in 0..args.workloads {
        let (canary, primary) = nodes_of(i, agents);
        for (node, role) in [(canary, Role::Canary), (primary, Role::Primary)] {
            feeds.push((
                node,
                WindowKey {
                    namespace: NS.into(),
                    workload: format!("w{i}"),
                    role,
                },
            ));
        }
    }
    let feeder = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = meshcanary::clock::unix_ms();
                for (node, key) in &feeds {
                    let delta = Delta {
                        requests: if key.role == Role::Canary { 20 } else { 200 },
                        errors: 0,
                        latency: None,
                        edges_ms: Vec::new(),
                        reset: false,
                        since_ms: now - 1000,
                    };
                    meshcanary::telemetry::lock(&shared[*node].windows)
                        .entry(key)
                        .record(&delta, now);
                }
            }
        })
    };

    // The controller, as the Deployment runs it.
    let dir = support::TempDir::new("bench-controller");
    let token = cp.kubectl(&[
        "create",
        "token",
        "meshcanary-controller",
        "-n",
        "meshcanary",
        "--audience",
        "meshcanary-peers",
    ]);
    std::fs::write(dir.path.join("token"), token.trim()).unwrap();
    let kc = dir.path.join("kubeconfig");
    std::fs::write(
        &kc,
        serde_json::to_vec(&cp.controller_kubeconfig()).unwrap(),
    )
    .unwrap();
    let port = support::free_port();
    let log = std::fs::File::create(dir.path.join("controller.log")).unwrap();
    let mut controller = std::process::Command::new(&args.meshcanary)
        .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--peer-token-file")
        .arg(dir.path.join("token"))
        .env("KUBECONFIG", &kc)
        .env("POD_NAME", "bench-controller")
        .env("POD_NAMESPACE", "meshcanary")
        .env(
            "MESHCANARY_LOG",
            std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "meshcanary=warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting meshcanary controller");
    let pid = controller.id();

    // The workloads: created, initialized, then a new revision with a one-hour interval.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for i in 0..args.workloads {
        let name = format!("w{i}");
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {
                "meshcanary.io/enabled": "true", "meshcanary.io/interval": "1h",
                "meshcanary.io/step-weights": "50", "meshcanary.io/port": "9898",
                "meshcanary.io/progress-deadline": "2h"}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                    {"name": "app", "image": "podinfo:1"}, {"name": "envoy", "image": "envoy"}]}}
            }
        }))
        .unwrap();
        deployments
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let phase = |d: &Deployment| -> Option<meshcanary::rollout::Status> {
        let s = d
            .metadata
            .annotations
            .as_ref()?
            .get("meshcanary.io/status")?;
        serde_json::from_str(s).ok()
    };
    let mut revised = vec![false; args.workloads];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the workloads did not all reach analysis within 10 minutes (see {})",
            dir.path.display()
        );
        let list = deployments.list(&Default::default()).await.unwrap().items;
        let mut analysing = 0;
        for d in &list {
            let name = d.metadata.name.clone().unwrap_or_default();
            let Some(i) = name.strip_prefix('w').and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            let Some(s) = phase(d) else { continue };
            use meshcanary::rollout::Phase;
            if s.phase == Phase::Initialized && !revised[i] {
                let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "podinfo:2"}]}}}});
                deployments
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await
                    .unwrap();
                revised[i] = true;
            }
            if s.phase == Phase::Progressing && s.analysing && s.canary_weight > 0 {
                analysing += 1;
            }
        }
        if analysing == args.workloads {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "bench: {} workloads under analysis after {:.0} s; warming up",
        args.workloads,
        started.elapsed().as_secs_f64()
    );
    if std::env::var_os("BENCH_TRACE_STATUS").is_some() {
        // Diagnostics: how w0's status changes during the steady analysis.
        let mut last: std::collections::BTreeMap<String, String> = Default::default();
        for _ in 0..20 {
            for d in deployments.list(&Default::default()).await.unwrap().items {
                let name = d.metadata.name.clone().unwrap_or_default();
                let a = d.metadata.annotations.clone().unwrap_or_default();
                let s = format!(
                    "{} generation {:?}/{:?} replicas {:?} status {:?}",
                    a.get("meshcanary.io/status")
                        .map(|s| s.contains("notReady"))
                        .unwrap_or_default(),
                    d.metadata.generation,
                    d.status.as_ref().and_then(|s| s.observed_generation),
                    d.spec.as_ref().and_then(|s| s.replicas),
                    d.status.as_ref().map(|s| (
                        s.replicas,
                        s.ready_replicas,
                        s.available_replicas,
                        s.updated_replicas
                    ))
                );
                if last.get(&name) != Some(&s) {
                    eprintln!("bench: {name} {s}");
                    last.insert(name, s);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let url = format!("http://127.0.0.1:{port}/metrics");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (b0, c0, t0) = (buckets(&url).await, cpu_seconds(pid), Instant::now());
    let api0 = api_requests(&client).await;
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (b1, c1, wall) = (buckets(&url).await, cpu_seconds(pid), t0.elapsed());
    let api1 = api_requests(&client).await;
    assert_eq!(b0.len(), b1.len(), "the same buckets");
    let diff: Vec<(f64, f64)> = b1
        .iter()
        .zip(&b0)
        .map(|((le, n1), (_, n0))| (*le, n1 - n0))
        .collect();
    let ticks = diff.last().map_or(0.0, |x| x.1);
    let (p50, p99) = (quantile(&diff, 0.5), quantile(&diff, 0.99));
    let cores = (c1 - c0) / wall.as_secs_f64();
    let polls_ok = metric(&url, "meshcanary_peer_polls_total{result=\"ok\"}").await;
    println!(
        "controller at {} agents, {} workloads: tick p50 {:.0} ms, p99 {:.0} ms, {:.3} cores ({} ticks, {} ok polls so far)",
        args.agents,
        args.workloads,
        p50 * 1000.0,
        p99 * 1000.0,
        cores,
        ticks,
        polls_ok
    );
    // What the apiserver served meanwhile (everyone's requests: the controller's, and the
    // bench's own kubelet stand-in listing pods), per second, largest first.
    let mut rates: Vec<(String, f64)> = api1
        .iter()
        .map(|(k, n)| {
            (
                k.clone(),
                (n - api0.get(k).copied().unwrap_or(0.0)) / wall.as_secs_f64(),
            )
        })
        .filter(|(_, r)| *r >= 0.5)
        .collect();
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shown: Vec<String> = rates
        .iter()
        .take(6)
        .map(|(k, r)| format!("{k} {r:.1}/s"))
        .collect();
    eprintln!("bench: apiserver requests: {}", shown.join(", "));
    let _ = controller.kill();
    // The controller's log outlives the run's directory.
    let _ = std::fs::copy(
        dir.path.join("controller.log"),
        "/tmp/meshcanary-bench-controller.log",
    );
    let _ = controller.wait();
    let _ = stop.send(true);
    feeder.abort();
}

/// The apiserver's request counters by verb and resource (from its /metrics).
async fn api_requests(client: &kube::Client) -> std::collections::BTreeMap<String, f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
        };
        let key = format!("{} {}", label("verb"), label("resource"));
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_insert(0.0) += n;
    }
    out
}

/// The controller process's user+system CPU so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// The tick histogram's cumulative buckets, (le, count) in the order of `le`.
async fn buckets(url: &str) -> Vec<(f64, f64)> {
    let (_, body) = support::get(url).await.unwrap();
    let mut out = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("meshcanary_controller_tick_seconds_bucket{le=\"")
        else {
            continue;
        };
        let (le, n) = rest.split_once("\"} ").unwrap();
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        out.push((le, n.trim().parse::<f64>().unwrap()));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `histogram_quantile`: linear interpolation within the bucket that holds the rank.
fn quantile(cumulative: &[(f64, f64)], q: f64) -> f64 {
    let total = cumulative.last().map_or(0.0, |x| x.1);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in cumulative {
        if n >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let within = if n > prev.1 {
                (rank - prev.1) / (n - prev.1)
            } else {
                1.0
            };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, n);
    }
    prev.0
}

async fn metric(url: &str, name: &str) -> f64 {
    support::counter(
        &support::get(url).await.map(|r| r.1).unwrap_or_default(),
        name,
    )
}
