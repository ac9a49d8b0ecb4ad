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
