//! Broken admin endpoints: each failure is a named error, a metric and a log line, and
//! never stalls or crashes the agent.

mod support;

use std::time::Duration;

use meshcanary::scrape::{ScrapeError, Scraper};
use support::{eventually, FakeAdmin, RunningAgent};

async fn fetch(admin: &FakeAdmin, cap: usize) -> Result<bytes::Bytes, ScrapeError> {
    let uri = format!("{}/stats/prometheus", admin.url()).parse().unwrap();
    Scraper::new(cap, Duration::from_secs(1))
        .fetch(&uri, Duration::from_secs(2))
        .await
}

#[tokio::test]
async fn oversized_bodies_are_a_named_error_with_or_without_content_length() {
    let body = vec![b'x'; 64 * 1024];
    for content_length in [true, false] {
        let admin = FakeAdmin::start(FakeAdmin::ok(&body, content_length), Duration::ZERO).await;
        let err = fetch(&admin, 16 * 1024).await.unwrap_err();
        assert!(
            matches!(err, ScrapeError::BodyTooLarge { limit: 16384, .. }),
            "{err}"
        );
        assert_eq!(err.reason(), "body_too_large");
        assert!(
            err.to_string().contains("--max-body-bytes"),
            "the message says what to change"
        );
    }
    let admin = FakeAdmin::start(FakeAdmin::ok(&body, true), Duration::ZERO).await;
    assert_eq!(fetch(&admin, 1 << 20).await.unwrap().len(), body.len());
}

#[tokio::test]
async fn garbage_instead_of_http_and_errors_are_named() {
    let admin = FakeAdmin::start(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(), Duration::ZERO).await;
    let err = fetch(&admin, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), "connect", "{err}");

    let admin = FakeAdmin::start(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
        Duration::ZERO,
    )
    .await;
    let err = fetch(&admin, 1 << 20).await.unwrap_err();
    assert!(matches!(err, ScrapeError::Status { .. }), "{err}");
    assert_eq!(err.reason(), "http_status");

    let admin = FakeAdmin::start(FakeAdmin::ok(b"x", true), Duration::from_secs(5)).await;
    let err = fetch(&admin, 1 << 20).await.unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_body_is_counted_and_a_hung_target_stalls_nobody() {
    let mut body = b"\x00\xff garbage {{{\nnot a sample\n".to_vec();
    body.extend_from_slice(b"envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"cds_ingress_m_a_http_1\"} 5\n");
    let garbage = FakeAdmin::start(FakeAdmin::ok(&body, true), Duration::ZERO).await;
    let hung = FakeAdmin::start(FakeAdmin::ok(b"", true), Duration::from_secs(3600)).await;
    let agent = RunningAgent::start(
        &[
            format!("test/garbage/primary={}", garbage.url()),
            format!("test/hung/canary={}", hung.url()),
        ],
        1 << 20,
    )
    .await;
    let shared = agent.shared.clone();
    eventually(
        Duration::from_secs(10),
        "garbage target up and hung target down",
        || {
            let s = shared.target_statuses();
            s.iter().any(|t| t.target.key.workload == "garbage" && t.up)
                && s.iter()
                    .any(|t| t.target.key.workload == "hung" && !t.up && t.last_error.is_some())
        },
    )
    .await;
    // The garbage target keeps being scraped every 200 ms while the hung one times out.
    let before = scrapes(&agent.metrics().await);
    eventually(Duration::from_secs(5), "more scrapes", || {
        scraped_since(&shared, before)
    })
    .await;
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains(r#"meshcanary_parse_errors_total{tier="fast",reason="invalid_utf8"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meshcanary_parse_errors_total{tier="fast",reason="invalid_value"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meshcanary_scrape_errors_total{tier="fast",reason="timeout"}"#),
        "{metrics}"
    );
    agent.shutdown().await;
}

fn scrapes(metrics: &str) -> f64 {
    support::counter(metrics, r#"meshcanary_scrapes_total{tier="fast"}"#)
}

fn scraped_since(shared: &meshcanary::agent::Shared, before: f64) -> bool {
    scrapes(&shared.render_metrics()) >= before + 5.0
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One sidecar that sends 400,000 series (32 MiB) and one that sends 40,000 series with
/// long labels, next to three healthy ones, all scraped every second on both tiers: the
/// fast tier refuses both big answers by size, the full tier refuses the runaway one with
/// `sample_limit` before any parsing and parses the heavy one off the async workers, the
/// healthy ones keep their 1 s cadence, and the whole process (agent and fake sidecars)
/// stays under the DaemonSet's 256 MiB memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_sidecar_neither_starves_its_neighbours_nor_grows_the_agent() {
    let capture =
        std::fs::read(support::repo().join("tests/fixtures/envoy-1.40-1-clusters.prom")).unwrap();
    let mut healthy = Vec::new();
    for _ in 0..3 {
        healthy.push(FakeAdmin::start(FakeAdmin::ok(&capture, true), Duration::ZERO).await);
    }
    let mut runaway = String::with_capacity(33 << 20);
    let salt = fastrand::u64(..);
    for i in 0..400_000u64 {
        runaway.push_str(&format!(
            "envoy_runaway_series{{id=\"{salt:x}-{i}\"}} {i}\n"
        ));
    }
    runaway.truncate(32 << 20);
    let mut heavy = String::new();
    let pad = "x".repeat(160);
    for i in 0..40_000u64 {
        heavy.push_str(&format!(
            "envoy_heavy_series{{id=\"{i}\",pad=\"{pad}\"}} {i}\n"
        ));
    }
    let runaway = FakeAdmin::start(FakeAdmin::ok(runaway.as_bytes(), true), Duration::ZERO).await;
    let heavy = FakeAdmin::start(FakeAdmin::ok(heavy.as_bytes(), true), Duration::ZERO).await;
    let mut targets: Vec<String> = healthy
        .iter()
        .enumerate()
        .map(|(i, a)| format!("test/healthy-{i}/primary={}", a.url()))
        .collect();
    targets.push(format!("test/runaway/canary={}", runaway.url()));
    targets.push(format!("test/heavy/canary={}", heavy.url()));
    let queue = support::TempDir::new("hostile-queue");
    // Nothing listens there: batches wait on disk, so memory is the agent's alone (a
    // receiver in this process would hold every request it got).
    let url = format!("http://127.0.0.1:{}/api/v1/write", support::free_port());
    let rw = support::remote_write_config(&url, &queue.path);
    let agent = RunningAgent::start_with(&targets, 32 << 20, |c| {
        c.full_interval = Some(Duration::from_secs(1));
        c.full_timeout = Duration::from_millis(900);
        c.remote_write = Some(rw);
    })
    .await;
    let shared = agent.shared.clone();
    let age = |m: &str, i: usize| {
        support::counter(
            m,
            &format!(
                "meshcanary_window_age_seconds{{namespace=\"test\",workload=\"healthy-{i}\",role=\"primary\"}}"
            ),
        )
    };
    eventually(Duration::from_secs(10), "every healthy window fed", || {
        let m = shared.render_metrics();
        (0..3).all(|i| m.contains(&format!("workload=\"healthy-{i}\"")))
    })
    .await;
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let mut oldest = 0.0f64;
    while std::time::Instant::now() < until {
        let m = shared.render_metrics();
        for i in 0..3 {
            oldest = oldest.max(age(&m, i));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = shared.render_metrics();
    let errors = |tier: &str, reason: &str| {
        support::counter(
            &m,
            &format!("meshcanary_scrape_errors_total{{tier=\"{tier}\",reason=\"{reason}\"}}"),
        )
    };
    let peak_mib = status_kib("VmHWM:") / 1024;
    eprintln!(
        "hostile sidecar: oldest healthy window {oldest:.2} s, fast body_too_large {}, full sample_limit {}, peak RSS {peak_mib} MiB",
        errors("fast", "body_too_large"),
        errors("full", "sample_limit")
    );
    assert!(
        oldest <= 1.6,
        "a healthy sidecar went {oldest:.2} s without a fast scrape next to the hostile ones"
    );
    // The fast tier refuses both big answers by size (its filtered answer is a few KB);
    // the full tier refuses the runaway one by its sample count, unparsed.
    assert!(errors("fast", "body_too_large") >= 10.0);
    assert!(
        errors("full", "sample_limit") >= 5.0,
        "the runaway sidecar is refused every scrape"
    );
    assert!(
        support::counter(&m, "meshcanary_full_scrape_samples_total") >= 40_000.0 * 3.0,
        "the heavy sidecar's series are read"
    );
    assert!(m.contains("meshcanary_target_up{namespace=\"test\",workload=\"runaway\""));
    assert!(peak_mib < 256, "peak RSS {peak_mib} MiB");
    agent.shutdown().await;
}
