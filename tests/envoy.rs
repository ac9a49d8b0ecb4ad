//! The agent against real Envoy 1.40 sidecars: known traffic in, exact numbers out.

mod support;

use std::time::Duration;

use meshcanary::window::{Role, Summary, WindowKey};
use support::{eventually, App, RunningAgent, Sidecar};

fn key(role: Role) -> WindowKey {
    WindowKey {
        namespace: "test".into(),
        workload: "podinfo".into(),
        role,
    }
}

fn summary(agent: &RunningAgent, role: Role) -> Summary {
    let now = meshcanary::clock::unix_ms();
    agent
        .shared
        .summaries(now)
        .into_iter()
        .find(|(k, _)| *k == key(role))
        .map(|(_, s)| s)
        .unwrap_or_default()
}

async fn ready(agent: &RunningAgent) {
    let ready = agent.shared.ready.clone();
    eventually(Duration::from_secs(10), "every target scraped once", || {
        ready.load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_equals_the_injected_ratio_exactly() {
    exact_success_rate(|_| {}).await;
}

/// The same when the full tier runs at every fast tick: one request serves both tiers,
/// and the fast tier reads the inbound lines of the full body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_is_exact_when_one_request_serves_both_tiers() {
    let metrics = exact_success_rate(|c| {
        c.full_interval = Some(c.fast_interval);
        c.full_timeout = c.fast_timeout;
    })
    .await;
    // No filtered request was made: every fast reading came from a full body.
    assert!(support::counter(&metrics, r#"meshcanary_scrapes_total{tier="fast"}"#) >= 2.0);
    assert!(support::counter(&metrics, r#"meshcanary_scraped_bytes_total{tier="full"}"#) > 0.0);
    assert!(
        !metrics.contains(r#"meshcanary_scraped_bytes_total{tier="fast"}"#),
        "{metrics}"
    );
}

/// When that shared request fails (here: the full body is over the cap), the fast tier
/// makes its own filtered request in the same tick and the window is exact all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_tier_asks_on_its_own_when_the_shared_request_fails() {
    let metrics = exact_success_rate(|c| {
        c.full_interval = Some(c.fast_interval);
        c.full_timeout = c.fast_timeout;
        c.max_body_bytes = 16 << 10;
    })
    .await;
    assert!(
        support::counter(
            &metrics,
            r#"meshcanary_scrape_errors_total{tier="full",reason="body_too_large"}"#
        ) >= 2.0,
        "{metrics}"
    );
    assert!(support::counter(&metrics, r#"meshcanary_scraped_bytes_total{tier="fast"}"#) > 0.0);
    assert!(
        !metrics.contains(r#"meshcanary_scrape_errors_total{tier="fast""#),
        "{metrics}"
    );
}

/// Drive 54 successes and 46 failures through a real Envoy; the window must hold exactly
/// those. Returns the agent's metrics.
async fn exact_success_rate(adjust: impl FnOnce(&mut meshcanary::agent::AgentConfig)) -> String {
    let app = App::start().await;
    let sidecar = Sidecar::start(app.port, "podinfo-canary", "1s").await;
    let agent = RunningAgent::start_with(
        &[format!("test/podinfo/canary={}", sidecar.admin_url())],
        32 << 20,
        adjust,
    )
    .await;
    ready(&agent).await;

    // Per-code series do not exist yet (usedonly): the first 500 must still count from zero.
    let ok = sidecar.drive("/", 54).await;
    let failed = sidecar.drive("/status/500", 46).await;
    assert!(ok.iter().all(|&s| s == 200) && failed.iter().all(|&s| s == 500));

    eventually(
        Duration::from_secs(10),
        "100 requests in the window",
        || summary(&agent, Role::Canary).requests == 100,
    )
    .await;
    let s = summary(&agent, Role::Canary);
    assert_eq!(s.errors, 46);
    assert_eq!(s.success_rate, Some(0.54));
    assert!(s.age_ms.unwrap() < 2_000);

    let metrics = agent.metrics().await;
    assert!(metrics.contains(r#"meshcanary_window_success_ratio{namespace="test",workload="podinfo",role="canary"} 0.54"#), "{metrics}");
    agent.shutdown().await;
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p99_falls_in_the_right_bucket_after_a_flush() {
    let app = App::start().await;
    app.fault.set(0.0, 500, Duration::from_millis(120));
    let sidecar = Sidecar::start(app.port, "podinfo-canary", "1s").await;
    let agent = RunningAgent::start(
        &[format!("test/podinfo/canary={}", sidecar.admin_url())],
        32 << 20,
    )
    .await;
    ready(&agent).await;

    // 20 requests of ~120 ms, 4 at a time: every observation lands in Envoy's (100, 250] bucket.
    tokio::join!(
        sidecar.drive("/", 5),
        sidecar.drive("/", 5),
        sidecar.drive("/", 5),
        sidecar.drive("/", 5)
    );
    eventually(
        Duration::from_secs(10),
        "the histogram flush to reach the window",
        || summary(&agent, Role::Canary).latency_count == 20,
    )
    .await;
    let s = summary(&agent, Role::Canary);
    let p99 = s.p99_ms.expect("p99 with 20 observations");
    assert!(
        p99 > 100.0 && p99 <= 250.0,
        "p99 {p99} ms outside (100, 250]"
    );
    let p50 = s.p50_ms.unwrap();
    assert!(
        p50 > 100.0 && p50 <= 250.0,
        "p50 {p50} ms outside (100, 250]"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_restart_is_no_negative_rate_and_no_error_spike() {
    let app = App::start().await;
    let mut sidecar = Sidecar::start(app.port, "podinfo-primary", "1s").await;
    let agent = RunningAgent::start(
        &[format!("test/podinfo/primary={}", sidecar.admin_url())],
        32 << 20,
    )
    .await;
    ready(&agent).await;

    sidecar.drive("/", 50).await;
    eventually(Duration::from_secs(10), "50 requests", || {
        summary(&agent, Role::Primary).requests == 50
    })
    .await;
    sidecar.restart().await;
    // The agent must see the reset (fresh Envoy, no series) before the new traffic.
    let shared = agent.shared.clone();
    eventually(Duration::from_secs(10), "the restart to be noticed", || {
        shared
            .metrics
            .window
            .counter_resets
            .get_or_create(&meshcanary::window::metrics::WorkloadLabels {
                namespace: "test".into(),
                workload: "podinfo".into(),
                role: "primary",
            })
            .get()
            >= 1
    })
    .await;
    sidecar.drive("/", 30).await;
    eventually(Duration::from_secs(10), "80 requests", || {
        summary(&agent, Role::Primary).requests == 80
    })
    .await;
    let s = summary(&agent, Role::Primary);
    assert_eq!(s.errors, 0, "a restart is not an error spike");
    assert_eq!(s.success_rate, Some(1.0));
    assert!(s.rps.unwrap() >= 0.0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_envoy_is_down_with_a_reason_and_metrics_keep_serving() {
    let app = App::start().await;
    let mut sidecar = Sidecar::start(app.port, "podinfo-canary", "1s").await;
    let other = Sidecar::start(app.port, "podinfo-primary", "1s").await;
    let agent = RunningAgent::start(
        &[
            format!("test/podinfo/canary={}", sidecar.admin_url()),
            format!("test/podinfo/primary={}", other.admin_url()),
        ],
        32 << 20,
    )
    .await;
    ready(&agent).await;
    sidecar.stop();

    let shared = agent.shared.clone();
    eventually(
        Duration::from_secs(10),
        "the canary target to be marked down",
        || {
            shared
                .target_statuses()
                .iter()
                .any(|t| t.target.key.role == Role::Canary && !t.up)
        },
    )
    .await;
    let down = agent
        .shared
        .target_statuses()
        .into_iter()
        .find(|t| !t.up)
        .unwrap();
    assert!(
        down.last_error.unwrap().contains("connecting to"),
        "the reason names the failure"
    );
    // The other target keeps being scraped.
    other.drive("/", 12).await;
    eventually(
        Duration::from_secs(10),
        "the primary to keep updating",
        || summary(&agent, Role::Primary).requests == 12,
    )
    .await;
    let metrics = agent.metrics().await;
    assert!(metrics.contains(&format!(
        "meshcanary_target_up{{namespace=\"test\",workload=\"podinfo\",role=\"canary\",target=\"127.0.0.1:{}\"}} 0",
        sidecar.admin_port
    )), "{metrics}");
    assert!(metrics.contains(r#"meshcanary_scrape_errors_total{tier="fast",reason="connect"}"#));
    assert!(metrics.contains("meshcanary_targets_up 1"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_passes_a_healthy_canary_and_calls_for_rolling_back_a_failing_one() {
    let primary_app = App::start().await;
    let canary_app = App::start().await;
    let primary = Sidecar::start(primary_app.port, "podinfo-primary", "1s").await;
    let canary = Sidecar::start(canary_app.port, "podinfo-canary", "1s").await;
    let agent = RunningAgent::start(
        &[
            format!("test/podinfo/primary={}", primary.admin_url()),
            format!("test/podinfo/canary={}", canary.admin_url()),
        ],
        32 << 20,
    )
    .await;
    ready(&agent).await;
    let verdict = |agent: &RunningAgent| {
        meshcanary::telemetry::lock(&agent.shared.judgements)
            .get(&meshcanary::workload::WorkloadId::new("test", "podinfo"))
            .map(|j| j.verdict.clone())
    };

    // Healthy: 90 % of the traffic to the primary, 10 % to the canary.
    for _ in 0..3 {
        primary.drive("/", 45).await;
        canary.drive("/", 5).await;
    }
    eventually(Duration::from_secs(10), "a pass verdict", || {
        matches!(
            verdict(&agent),
            Some(meshcanary::judge::Verdict::Pass { .. })
        )
    })
    .await;

    // Now the canary fails every other request.
    canary_app.fault.set(50.0, 500, Duration::ZERO);
    let mut rounds = 0;
    while !matches!(
        verdict(&agent),
        Some(meshcanary::judge::Verdict::Rollback(_))
    ) {
        rounds += 1;
        assert!(
            rounds <= 40,
            "no rollback verdict after {rounds} rounds: {:?}",
            verdict(&agent)
        );
        primary.drive("/", 45).await;
        canary.drive("/", 5).await;
        tokio::time::sleep(Duration::from_millis(250)).await; // let a fast scrape and a judge tick pass
    }
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains(
            r#"meshcanary_judge_verdict{namespace="test",workload="podinfo",verdict="rollback"} 1"#
        ),
        "{metrics}"
    );
    agent.shutdown().await;
}

/// Envoy 1.40's DogStatsD sink into the agent: every request's latency reaches the window
/// within a second or two, long before the stats flush (60 s here) moves the scraped
/// histogram; a sidecar that does not send keeps the scrape, and the metrics say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_latency_arrives_through_the_dogstatsd_sink() {
    let port = support::free_udp_port();
    let sink = format!("127.0.0.1:{port}");
    let app = App::start().await;
    app.fault.set(0.0, 500, Duration::from_millis(120));
    // Tagged with 127.0.0.1, its address: the target below.
    let sending = Sidecar::start_statsd(app.port, "podinfo-canary", "60s", &sink).await;
    let quiet_app = App::start().await;
    // Registered at its own address, never sending: it keeps the scrape.
    let quiet = Sidecar::start_at(
        "127.0.0.2",
        support::free_port(),
        support::free_port(),
        quiet_app.port,
        "podinfo-primary",
        "60s",
        None,
        None,
    )
    .await;
    let agent = RunningAgent::start_with(
        &[
            format!("test/podinfo/canary={}", sending.admin_url()),
            format!("test/podinfo/primary={}", quiet.admin_url()),
        ],
        32 << 20,
        |c| {
            c.statsd = Some(meshcanary::agent::StatsdSettings {
                listen: sink.parse().unwrap(),
                recv_buffer: 1 << 20,
            });
        },
    )
    .await;
    ready(&agent).await;

    let started = std::time::Instant::now();
    tokio::join!(
        sending.drive("/", 5),
        sending.drive("/", 5),
        sending.drive("/", 5),
        sending.drive("/", 5)
    );
    eventually(
        Duration::from_secs(5),
        "20 latencies from the sink and 20 requests from the scrape in the window",
        || {
            let s = summary(&agent, Role::Canary);
            s.latency_count == 20 && s.requests == 20
        },
    )
    .await;
    // The scraped histogram cannot have moved: the stats flush is 60 s away.
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = summary(&agent, Role::Canary);
    let p99 = s.p99_ms.expect("p99 with 20 observations");
    assert!(
        p99 > 100.0 && p99 <= 250.0,
        "p99 {p99} ms outside (100, 250]"
    );

    // A line for a pod this agent does not scrape is counted and dropped.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .send_to(b"envoy.cluster.upstream_rq_time:5|ms|#meshcanary.pod_ip:10.9.9.9,envoy.cluster_name:cds_ingress_x", &sink)
        .unwrap();
    probe.send_to(b"not statsd", &sink).unwrap();
    let metrics = eventually_metrics(&agent, |m| {
        support::counter(m, r#"meshcanary_statsd_lines_total{outcome="unknown_pod"}"#) >= 1.0
            && support::counter(m, r#"meshcanary_statsd_lines_total{outcome="malformed"}"#) >= 1.0
    })
    .await;
    assert!(
        support::counter(
            &metrics,
            r#"meshcanary_statsd_lines_total{outcome="latency"}"#
        ) >= 20.0
    );
    assert!(
        support::counter(
            &metrics,
            r#"meshcanary_statsd_lines_total{outcome="other"}"#
        ) > 0.0,
        "the egress/external lines and the flush's counters"
    );
    assert!(
        metrics.contains(r#"meshcanary_statsd_overruns_total 0"#),
        "{metrics}"
    );
    let source = |role: &str, source: &str| {
        metrics.lines().any(|l| {
            l.starts_with("meshcanary_target_latency_source{")
                && l.contains(&format!("role=\"{role}\""))
                && l.contains(&format!("source=\"{source}\""))
        })
    };
    assert!(source("canary", "statsd"), "{metrics}");
    assert!(source("primary", "scrape"), "{metrics}");
    agent.shutdown().await;
}

async fn eventually_metrics(agent: &RunningAgent, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.metrics().await;
        if ok(&m) || std::time::Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
