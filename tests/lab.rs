//! The whole loop across two nodes on real components (see `tests/support/lab.rs`): the
//! primary pod on node-a, the canary pod on node-b, one agent process per node, traffic
//! through a gateway Envoy that follows the VirtualRouter, driven by `lab/ci.yaml`: a
//! shortened reference walkthrough. A healthy new image is promoted; a second one, hit by
//! `/status/500` straight at the canary, is rolled back and the gateway stops sending it
//! traffic. Then the reliability checks, each a scenario in `lab/`: the leader killed
//! mid-rollout, a peer agent killed, the apiserver restarted, ten healthy promotions; and
//! the ways a rollout used to get stuck: the canary's Envoy or app dying mid-analysis, a
//! canary too quiet to fill its window. Last, the walkthrough once more on the lab's Istio
//! and Gateway API shape.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::lab::{Lab, LabOptions};
use support::scenario::{self, RolloutResult, Scenario};

async fn metric(url: &str, name: &str) -> f64 {
    match support::get(url).await {
        Ok((_, body)) => support::counter(&body, name),
        Err(_) => 0.0,
    }
}

fn scenario(file: &str) -> Scenario {
    let text = std::fs::read_to_string(support::repo().join("lab").join(file)).unwrap();
    Scenario::parse(&text).unwrap_or_else(|e| panic!("lab/{file}: {e}"))
}

/// The canary weight only rose until its peak (50), then went to 0 with the promotion: no
/// step repeated or undone.
fn steps_in_order(r: &RolloutResult) {
    let w: Vec<u8> = r.weights.iter().map(|x| x.1).collect();
    let peak = w.iter().copied().max().unwrap_or(0);
    let at = w.iter().position(|x| *x == peak).unwrap_or(0);
    assert!(
        peak == 50
            && w[..=at].windows(2).all(|p| p[0] < p[1])
            && w[at + 1..].iter().all(|x| *x == 0),
        "weights not in step order: {:?}",
        r.weights
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_across_two_nodes() {
    let mut options = LabOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_meshcanary")));
    options.window = Duration::from_secs(30);
    let mut lab = Lab::start(options).await;
    let started = Instant::now();
    let mut report = Vec::new();
    macro_rules! check {
        ($name:literal, $body:expr) => {{
            let t = Instant::now();
            $body;
            report.push(format!(
                "{:<64} ok in {:>5.1} s",
                $name,
                t.elapsed().as_secs_f64()
            ));
            eprintln!("{}", report.last().unwrap());
        }};
    }
    check!(
        "walkthrough (lab/ci.yaml): promotion, then rollback",
        walkthrough(&mut lab).await
    );
    check!(
        "the canary's Envoy dies: rolled back within threshold x interval (+1 tick)",
        {
            let r = run_one(&mut lab, "canary-envoy-killed.yaml").await;
            within_threshold_intervals(
                &r,
                "canary-envoy-killed.yaml",
                lab.options.decision_interval,
            );
        }
    );
    check!(
        "the canary's app dies: rolled back within threshold x interval (+1 tick)",
        {
            let r = run_one(&mut lab, "canary-app-killed.yaml").await;
            within_threshold_intervals(&r, "canary-app-killed.yaml", lab.options.decision_interval);
        }
    );
    check!(
        "a quiet canary (0.25 rps) is judged over its steps and promoted",
        {
            let r = run_one(&mut lab, "low-traffic.yaml").await;
            let w: Vec<u8> = r.weights.iter().map(|x| x.1).collect();
            assert_eq!(w, [0, 5, 20, 0], "{:?}", r.weights);
        }
    );
    check!(
        "leader killed mid-rollout: the other controller finishes it",
        {
            let r = run_one(&mut lab, "leader-killed.yaml").await;
            assert!(r.killed_at.is_some(), "the leader was killed");
            steps_in_order(&r);
        }
    );
    check!(
        "peer killed: decisions halt while its node is stale, then resume",
        {
            let r = run_one(&mut lab, "peer-killed.yaml").await;
            let (killed, back) = (r.killed_at.unwrap(), r.restarted_at.unwrap());
            // Past the staleness limit (3 s) plus a tick, nothing moves until the peer is back.
            let moved: Vec<&(f64, u8)> = r
                .weights
                .iter()
                .filter(|(t, _)| *t > killed + 4.0 && *t < back)
                .collect();
            assert!(moved.is_empty(), "weights changed while a node was silent: {:?} (killed at {killed:.1} s, back at {back:.1} s)", r.weights);
            steps_in_order(&r);
        }
    );
    check!(
        "agent pod deleted: the canary's node is unobserved, halt (Event), then resume",
        {
            let r = run_one(&mut lab, "agent-pod-deleted.yaml").await;
            let (killed, back) = (r.killed_at.unwrap(), r.restarted_at.unwrap());
            let moved: Vec<&(f64, u8)> = r
                .weights
                .iter()
                .filter(|(t, _)| *t > killed + 2.0 && *t < back)
                .collect();
            assert!(moved.is_empty(), "weights changed while the canary's node had no agent: {:?} (deleted at {killed:.1} s, back at {back:.1} s)", r.weights);
            steps_in_order(&r);
            let events = lab.events().await;
            assert!(
                events.iter().any(|e| e.note
                    == "Halt podinfo.test advancement: no meshcanary agent answers on a node that runs its pods"),
                "{events:#?}"
            );
        }
    );
    check!("apiserver restarted mid-rollout: the promotion goes on", {
        let r = run_one(&mut lab, "apiserver-restart.yaml").await;
        steps_in_order(&r);
    });
    check!(
        "Prometheus down 60 s mid-rollout: promoted, no sample lost",
        prometheus_down(&mut lab).await
    );
    check!(
        "a healthy canary promoted 10 times in a row, no false rollback",
        {
            let results = run(&mut lab, "healthy-10.yaml").await;
            assert_eq!(results.len(), 10);
            for r in &results {
                assert!(!r.false_rollback(), "{}", r.summary());
            }
        }
    );
    drop(lab);
    check!(
        "Istio sidecars and a Gateway API HTTPRoute: the walkthrough again",
        istio_and_the_gateway_api().await
    );
    check!(
        "Flagger's Canary (lab/ci-canary.yaml) as written: promotion, then rollback",
        flagger_canary().await
    );
    eprintln!(
        "lab checks in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        report.join("\n")
    );
}

/// The lab in its Gateway API shape (`--router gateway-api`, Istio-shaped sidecars): the
/// same shortened walkthrough, with the weights in podinfo's HTTPRoute (accepted by the
/// lab's Gateway) and no App Mesh object anywhere.
async fn istio_and_the_gateway_api() {
    let mut options = LabOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_meshcanary")));
    options.window = Duration::from_secs(30);
    options.prometheus = false;
    options.router = meshcanary::router::RouterKind::GatewayApi;
    // And with the sidecars' DogStatsD sinks on: Istio's tags name the inbound cluster
    // `inbound|9898||`, `|` and all.
    options.statsd = true;
    let mut lab = Lab::start(options).await;
    walkthrough(&mut lab).await;
    let routes: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        lab.client.clone(),
        support::lab::NAMESPACE,
        &meshcanary::router::gatewayapi::resource("v1"),
    );
    let route = routes
        .get(support::lab::WORKLOAD)
        .await
        .expect("podinfo's HTTPRoute");
    assert_eq!(
        route.data["spec"]["parentRefs"][0]["name"],
        support::lab::GATEWAY
    );
    assert_eq!(
        route.data["status"]["parents"][0]["conditions"][0]["status"], "True",
        "accepted: {:?}",
        route.data["status"]
    );
    let routers: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        lab.client.clone(),
        support::lab::NAMESPACE,
        &meshcanary::router::appmesh::resource("VirtualRouter"),
    );
    assert!(routers
        .get_opt(support::lab::WORKLOAD)
        .await
        .unwrap()
        .is_none());
    for agent in lab.agents.values() {
        let url = agent.metrics_url();
        assert_eq!(
            metric(&url, "meshcanary_scrape_no_inbound_cluster_total ").await,
            0.0
        );
        assert!(metric(&url, "meshcanary_scrapes_total{tier=\"fast\"}").await > 10.0);
        // Each node's sidecar sent its requests' latency to its agent, and every line was
        // understood (while pods of one role come and go, two can share the role's one
        // address here, so `ambiguous` and `unknown_pod` lines are possible).
        assert!(
            metric(&url, "meshcanary_statsd_lines_total{outcome=\"latency\"}").await > 10.0,
            "{}",
            agent.node
        );
        for outcome in ["malformed", "sampled"] {
            let name = format!("meshcanary_statsd_lines_total{{outcome=\"{outcome}\"}}");
            assert_eq!(metric(&url, &name).await, 0.0, "{outcome}");
        }
    }
}

/// The walkthrough with its policy in Flagger's Canary (the reference one, its interval
/// shortened to 2 s): the same promotion and rollback, told on the Canary in Flagger's
/// status and events.
async fn flagger_canary() {
    let mut options = LabOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_meshcanary")));
    options.window = Duration::from_secs(30);
    options.prometheus = false;
    let mut lab = Lab::start(options).await;
    let results = run(&mut lab, "ci-canary.yaml").await;
    assert_eq!(results.len(), 2);
    steps_in_order(&results[0]);
    let ttr = results[1].ttr_router.expect("the router reached weight 0");
    let canaries: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        lab.client.clone(),
        support::lab::NAMESPACE,
        &meshcanary::canary::api_resource(),
    );
    let canary = canaries.get(support::lab::WORKLOAD).await.unwrap();
    let status = &canary.data["status"];
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(status["canaryWeight"], 0);
    assert_eq!(status["conditions"][0]["status"], "False");
    let table = lab
        .cp
        .kubectl(&["get", "canaries", "-n", support::lab::NAMESPACE]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("podinfo ") && l.contains("Failed")),
        "{table}"
    );
    // Nothing of meshcanary's policy on the Deployment: the Canary said it all.
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(lab.client.clone(), support::lab::NAMESPACE);
    let d = deployments.get(support::lab::WORKLOAD).await.unwrap();
    let keys: Vec<&String> = d
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("meshcanary.io/"))
        .collect();
    assert_eq!(keys, ["meshcanary.io/canary", "meshcanary.io/status"]);
    eprintln!("from the Canary: rolled back {ttr:.1} s after the fault started");
}

/// A dead canary is rolled back within `threshold` x `interval` of its death (the
/// scenario's policy), plus one decision tick, not halted at its weight. The tick: the
/// death shows after 3 s of silence, then `threshold` - 1 more intervals are counted on
/// 1 s ticks, and the write and read-back of the weight come on top (measured 15.5 s and
/// 15.7 s against 15 s in two CI runs after the split, 13-15 s in others).
fn within_threshold_intervals(r: &RolloutResult, file: &str, tick: Duration) {
    let s = scenario(file);
    let annotations = s.annotations();
    let get = |k: &str| annotations[&format!("meshcanary.io/{k}")].clone();
    let interval = meshcanary::config::parse_duration(&get("interval")).unwrap();
    let threshold: f64 = get("threshold").parse().unwrap();
    let limit = threshold * interval.as_secs_f64() + tick.as_secs_f64();
    let ttr = r.ttr_router.expect("rolled back");
    assert!(r.killed_at.is_some(), "the fault killed something");
    assert!(
        ttr <= limit,
        "{file}: weight 0 after {ttr:.1} s, over {limit} s"
    );
    eprintln!("{file}: weight 0 {ttr:.1} s after the kill (limit {limit} s)");
}

async fn run(lab: &mut Lab, file: &str) -> Vec<RolloutResult> {
    let s = scenario(file);
    let results = scenario::run(lab, &s, |line| eprintln!("{line}")).await;
    for r in &results {
        assert!(
            r.as_expected(),
            "{file}: {}; logs in {}",
            r.summary(),
            lab.dir.display()
        );
    }
    results
}

async fn run_one(lab: &mut Lab, file: &str) -> RolloutResult {
    run(lab, file).await.remove(0)
}

async fn prometheus_down(lab: &mut Lab) {
    let started_ms = meshcanary::clock::unix_ms();
    let r = run_one(lab, "prometheus-down.yaml").await;
    steps_in_order(&r);
    let outage_s = r.restarted_at.unwrap() - r.fault_at.unwrap();
    assert!(outage_s >= 60.0, "the outage lasted {outage_s:.1} s");
    // Every agent's queue drains into the returned Prometheus.
    for agent in lab.agents.values() {
        let url = agent.metrics_url();
        support::eventually_async(
            Duration::from_secs(60),
            "the remote-write queue drained",
            || {
                let url = url.clone();
                async move {
                    match support::get(&url).await {
                        Ok((_, body)) => body
                            .lines()
                            .filter(|l| l.starts_with("meshcanary_remote_write_queue_samples"))
                            .all(|l| l.ends_with(" 0")),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
    }
    for agent in lab.agents.values() {
        let dropped = metric(
            &agent.metrics_url(),
            "meshcanary_remote_write_samples_total{outcome=\"dropped_http_4xx\"}",
        )
        .await;
        assert_eq!(
            dropped, 0.0,
            "Prometheus rejected samples of {}",
            agent.node
        );
    }
    // Each sidecar's series has a sample every full scrape (5 s) through the outage.
    let prometheus = lab.prometheus.as_ref().expect("the lab runs Prometheus");
    let range = (meshcanary::clock::unix_ms() - started_ms) / 1000 + 5;
    let series = prometheus
        .query(&format!(
            "envoy_server_uptime{{kubernetes_namespace=\"test\"}}[{range}s]"
        ))
        .await;
    assert!(!series.is_empty(), "no sidecar series in Prometheus");
    let outage_from = started_ms as f64 / 1000.0 + 5.0;
    let mut checked = 0;
    for s in &series {
        let ts: Vec<f64> = s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[0].as_f64().unwrap())
            .collect();
        // Only pods that lived through the outage (a canary pod comes and goes).
        if ts.first().is_none_or(|t| *t > outage_from)
            || ts.last().is_none_or(|t| *t < outage_from + outage_s)
        {
            continue;
        }
        let gap = ts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
        assert!(gap < 8.0, "a {gap:.1} s gap in {}", s["metric"]);
        checked += 1;
    }
    assert!(checked >= 1, "no series spans the outage: {series:?}");
}

async fn walkthrough(lab: &mut Lab) {
    let results = run(lab, "ci.yaml").await;
    assert_eq!(results.len(), 2);
    // The rollback: the router and then the gateway stopped sending to the canary.
    let ttr = results[1].ttr_router.expect("the router reached weight 0");
    let gateway = results[1].ttr_gateway.expect("the gateway stopped");
    assert!(
        gateway <= ttr + 2.0,
        "the gateway followed the router: {gateway} s vs {ttr} s"
    );
    // The canary pod is on node-b, the primary on node-a: the leading controller polled
    // both nodes' agents, and each agent answered it.
    let leader = lab.leader_controller().await.expect("a leader");
    let url = lab.controllers[&leader].metrics_url();
    assert_eq!(metric(&url, "meshcanary_peers_known ").await, 2.0);
    assert_eq!(metric(&url, "meshcanary_peers_up ").await, 2.0);
    assert!(metric(&url, "meshcanary_peer_polls_total{result=\"ok\"}").await > 5.0);
    for agent in lab.agents.values() {
        let peer_url = agent.metrics_url();
        assert!(metric(&peer_url, "meshcanary_peer_requests_total{result=\"ok\"}").await > 5.0);
    }
    assert!(
        lab.gateway_canary_requests().await > 20,
        "the canary got its share"
    );
    let events = lab.events().await;
    let notes: Vec<&str> = events.iter().map(|e| e.note.as_str()).collect();
    for want in [
        "Advance podinfo.test canary weight 2",
        "Advance podinfo.test canary weight 50",
        "Promotion completed! Scaling down podinfo.test",
        "Canary failed! Scaling down podinfo.test",
    ] {
        assert!(
            notes.iter().any(|r| r.starts_with(want)),
            "no event {want:?} in {notes:#?}"
        );
    }
    eprintln!("rolled back {ttr:.1} s after the fault started (leader {leader})");
}
