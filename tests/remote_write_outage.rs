//! A remote-write outage of 60 s with an agent restart in the middle: every sample queued
//! before the restart arrives exactly once when the receiver returns, and memory stays
//! bounded while the queue grows on disk. Its own test binary, so the process's memory is
//! this test's alone.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{
    counter, eventually, free_port, remote_write_config, App, Receiver, RunningAgent, Sidecar,
    TempDir,
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_and_a_restart_lose_nothing_and_duplicate_nothing() {
    let app = App::start().await;
    let sidecar = Sidecar::start(app.port, "podinfo-primary", "1s").await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let queue = TempDir::new("queue");
    let target = [format!("test/podinfo/primary={}", sidecar.admin_url())];
    let configure = |c: &mut meshcanary::agent::AgentConfig| {
        c.full_interval = Some(Duration::from_secs(1));
        c.remote_write = Some(remote_write_config(&url, &queue.path));
    };
    let outage_started = Instant::now();

    // First agent: 30 s of scraping into a queue whose receiver is down.
    let first = RunningAgent::start_with(&target, 32 << 20, configure).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_early = rss_kib();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let first_shared = first.shared.clone();
    first.shutdown().await;
    let first_metrics = first_shared.render_metrics();
    let queued_before_restart = counter(
        &first_metrics,
        r#"meshcanary_remote_write_samples_total{outcome="queued"}"#,
    );
    assert!(
        queued_before_restart > 10_000.0,
        "30 full scrapes queued: {queued_before_restart}"
    );
    assert_eq!(
        counter(
            &first_metrics,
            r#"meshcanary_remote_write_samples_total{outcome="sent"}"#
        ),
        0.0
    );
    assert!(
        counter(
            &first_metrics,
            r#"meshcanary_remote_write_retries_total{reason="connect"}"#
        ) > 0.0
    );
    let restart_at_ms = meshcanary::clock::unix_ms() as i64;

    // Second agent, same queue, receiver still down for the rest of the 60 s.
    let second = RunningAgent::start_with(&target, 32 << 20, configure).await;
    let remaining = Duration::from_secs(61).saturating_sub(outage_started.elapsed());
    tokio::time::sleep(remaining).await;
    let rss_late = rss_kib();
    assert!(
        rss_late < rss_early + 32 * 1024,
        "memory grew from {rss_early} KiB to {rss_late} KiB during the outage"
    );

    // The receiver comes back.
    let receiver = Receiver::start(port, vec![]).await;
    let log = receiver.log.clone();
    eventually(
        Duration::from_secs(60),
        "every sample from before the restart to arrive",
        || {
            let got: usize = log
                .lock()
                .unwrap()
                .iter()
                .flat_map(|r| &r.request.timeseries)
                .flat_map(|t| &t.samples)
                .filter(|s| s.timestamp < restart_at_ms)
                .count();
            got as f64 >= queued_before_restart
        },
    )
    .await;
    let second_shared = second.shared.clone();
    second.shutdown().await;

    let mut seen = HashSet::new();
    let mut before_restart = 0usize;
    for r in receiver.received() {
        for ts in &r.request.timeseries {
            let key: Vec<(String, String)> = ts
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            for s in &ts.samples {
                assert!(
                    seen.insert((key.clone(), s.timestamp)),
                    "sample delivered twice: {key:?} @ {}",
                    s.timestamp
                );
                before_restart += usize::from(s.timestamp < restart_at_ms);
            }
        }
    }
    // Own metrics of the first agent were queued too, so the count is over all its samples.
    assert_eq!(
        before_restart as f64, queued_before_restart,
        "exactly the samples queued before the restart"
    );
    let second_metrics = second_shared.render_metrics();
    for outcome in [
        "dropped_disk_cap",
        "dropped_corrupt",
        "dropped_queue_error",
        "dropped_http_4xx",
    ] {
        let line = format!("meshcanary_remote_write_samples_total{{outcome=\"{outcome}\"}}");
        assert_eq!(counter(&second_metrics, &line), 0.0, "{outcome}");
    }
}
