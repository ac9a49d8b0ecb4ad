//! The whole loop across two nodes on real components (see `tests/support/lab.rs`): the
//! primary pod on node-a, the canary pod on node-b, one agent process per node, traffic
//! through a gateway Envoy that follows the VirtualRouter. A shortened version of the
//! reference walkthrough: a healthy new image is promoted; a second one, hit by
//! `/status/500` straight at the canary, is rolled back and the gateway stops sending it
//! traffic.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshcanary::rollout::Phase;
use support::lab::{Lab, LabOptions};

fn walkthrough() -> BTreeMap<String, String> {
    [
        ("meshcanary.io/step-weights", "2,5,10,20,30,50"),
        ("meshcanary.io/interval", "2s"),
        ("meshcanary.io/threshold", "5"),
        ("meshcanary.io/success-rate-min", "99"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn metric(url: &str, name: &str) -> f64 {
    match support::get(url).await {
        Ok((_, body)) => support::counter(&body, name),
        Err(_) => 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_then_rollback_across_two_nodes() {
    let mut options = LabOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_meshcanary")));
    options.window = Duration::from_secs(30);
    let mut lab = Lab::start(options).await;
    let policy = walkthrough();

    lab.deploy("podinfo:6.0.0", &policy).await;
    lab.wait_status(Duration::from_secs(90), "Initialized", |s| {
        s.phase == Phase::Initialized
    })
    .await;
    let leader = loop {
        if let Some(node) = lab.leader_node().await {
            break node;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // 1. A healthy release under the walkthrough's load at the apex is promoted, with the
    //    traffic following the weights.
    let apex = lab.apex_url();
    let load = lab.hey(&apex, 2, 20, Duration::from_secs(240));
    lab.deploy("podinfo:6.0.1", &policy).await;
    lab.wait_status(Duration::from_secs(30), "Progressing", |s| {
        s.phase == Phase::Progressing
    })
    .await;
    let mut peak = 0;
    let promoted = Instant::now();
    loop {
        let s = lab.status().await.expect("a status");
        assert_ne!(s.phase, Phase::Failed, "a healthy canary was rolled back");
        if s.phase == Phase::Succeeded {
            break;
        }
        peak = peak.max(lab.router_weight().await.unwrap_or(0));
        assert!(
            promoted.elapsed() < Duration::from_secs(150),
            "no promotion within 150 s: {s:?}; logs in {}",
            lab.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(peak >= 30, "the canary weight peaked at {peak}");
    assert!(
        lab.gateway_canary_requests().await > 50,
        "the gateway sent the canary its share"
    );
    // The leader saw both nodes: its own and the peer.
    let leader_metrics = lab.agents[&leader].metrics_url();
    assert_eq!(metric(&leader_metrics, "meshcanary_peers_up ").await, 2.0);
    assert!(
        metric(
            &leader_metrics,
            "meshcanary_peer_polls_total{result=\"ok\"}"
        )
        .await
            > 5.0
    );
    let events = lab.events().await;
    let reasons: Vec<&str> = events.iter().map(|e| e.2.as_str()).collect();
    for want in [
        "Advance podinfo.test canary weight 2",
        "Advance podinfo.test canary weight 50",
        "Promotion completed! Scaling down podinfo.test",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "no event {want:?} in {reasons:#?}"
        );
    }

    // 2. A bad release: errors straight at the canary once it has traffic.
    lab.deploy("podinfo:6.0.2", &policy).await;
    lab.wait_status(Duration::from_secs(60), "weight 5", |s| {
        s.phase == Phase::Progressing && s.canary_weight >= 5
    })
    .await;
    let havoc_url = format!("{}/status/500", lab.canary.sidecar.ingress_url());
    let havoc = lab.hey(&havoc_url, 1, 5, Duration::from_secs(120));
    let fault = Instant::now();
    lab.wait_status(Duration::from_secs(60), "Failed", |s| {
        s.phase == Phase::Failed
    })
    .await;
    let ttr = fault.elapsed();
    drop(havoc);
    support::eventually_async(
        Duration::from_secs(10),
        "the VirtualRouter back at canary weight 0",
        || async { lab.router_weight().await == Some(0) },
    )
    .await;
    // The gateway follows: after a moment to reload, it sends the canary nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = lab.gateway_canary_requests().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lab.gateway_canary_requests().await,
        before,
        "the gateway still sends requests to the canary"
    );
    drop(load);
    let events = lab.events().await;
    assert!(
        events.iter().any(
            |e| e.0 == "Warning" && e.2.starts_with("Canary failed! Scaling down podinfo.test")
        ),
        "{events:#?}"
    );
    eprintln!(
        "rolled back {:.1} s after the fault started (leader on {leader})",
        ttr.as_secs_f64()
    );
    lab.kill_agent("node-a");
}
