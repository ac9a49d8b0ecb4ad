//! The whole loop across two nodes on real components (see `tests/support/lab.rs`): the
//! primary pod on node-a, the canary pod on node-b, one agent process per node, traffic
//! through a gateway Envoy that follows the VirtualRouter, driven by `lab/ci.yaml`: a
//! shortened reference walkthrough. A healthy new image is promoted; a second one, hit by
//! `/status/500` straight at the canary, is rolled back and the gateway stops sending it
//! traffic.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::lab::{Lab, LabOptions};
use support::scenario::{self, Scenario};

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
    let text = std::fs::read_to_string(support::repo().join("lab/ci.yaml")).unwrap();
    let scenario = Scenario::parse(&text).expect("lab/ci.yaml parses");
    let results = scenario::run(&mut lab, &scenario, |line| eprintln!("{line}")).await;

    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(
            r.as_expected(),
            "{}; logs in {}",
            r.summary(),
            lab.dir.display()
        );
    }
    // The rollback: the router and then the gateway stopped sending to the canary.
    let ttr = results[1].ttr_router.expect("the router reached weight 0");
    let gateway = results[1].ttr_gateway.expect("the gateway stopped");
    assert!(
        gateway <= ttr + 2.0,
        "the gateway followed the router: {gateway} s vs {ttr} s"
    );
    // The canary pod is on node-b, the primary on node-a: whichever agent leads judged
    // both nodes' windows.
    let leader = lab.leader_node().await.expect("a leader");
    let url = lab.agents[&leader].metrics_url();
    assert_eq!(metric(&url, "meshcanary_peers_known ").await, 2.0);
    assert_eq!(metric(&url, "meshcanary_peers_up ").await, 2.0);
    assert!(metric(&url, "meshcanary_peer_polls_total{result=\"ok\"}").await > 5.0);
    let other = lab.agents.keys().find(|n| **n != leader).unwrap().clone();
    let peer_url = lab.agents[&other].metrics_url();
    assert!(metric(&peer_url, "meshcanary_peer_requests_total{result=\"ok\"}").await > 5.0);
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
    eprintln!("rolled back {ttr:.1} s after the fault started (leader on {leader})");
}
