//! Remote write against real receivers: a real Prometheus, and a scripted receiver for
//! 429 / 500 / 400 answers. Assertions are on what the receiver actually got.

mod support;

use support::FakeAdmin;

use std::time::Duration;

use support::{
    counter, eventually, remote_write_config, App, Prometheus, Receiver, RunningAgent, Sidecar,
    TempDir,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_values_and_labels_arrive_in_prometheus_and_dropped_names_do_not() {
    let app = App::start().await;
    let sidecar = Sidecar::start(app.port, "podinfo-canary", "1s").await;
    let prometheus = Prometheus::start().await;
    let queue = TempDir::new("queue");
    let rw = remote_write_config(&prometheus.write_url(), &queue.path);
    let agent = RunningAgent::start_with(
        &[format!("test/podinfo/canary={}", sidecar.admin_url())],
        32 << 20,
        |c| {
            c.full_interval = Some(Duration::from_secs(1));
            c.remote_write = Some(rw);
        },
    )
    .await;
    sidecar.drive("/", 37).await;
    sidecar.drive("/status/503", 5).await;

    let pod = format!("127.0.0.1:{}", sidecar.admin_port);
    let query = format!(
        r#"envoy_cluster_upstream_rq{{kubernetes_namespace="test",kubernetes_pod_name="{pod}",envoy_cluster_name=~"cds_ingress_.*"}}"#
    );
    let mut result = Vec::new();
    for _ in 0..100 {
        result = prometheus.query(&query).await;
        if result.len() == 2
            && result.iter().any(|r| r["value"][1] == "37")
            && result.iter().any(|r| r["value"][1] == "5")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(result.len(), 2, "{result:?}");
    let ok = result
        .iter()
        .find(|r| r["metric"]["envoy_response_code"] == "200")
        .expect("200 series");
    assert_eq!(ok["value"][1], "37", "exact value: {ok}");
    let m = &ok["metric"];
    assert_eq!(m["job"], "appmesh-envoy");
    assert_eq!(m["cluster"], "lab", "external label");
    assert_eq!(m["instance"], pod.as_str());
    assert_eq!(
        result
            .iter()
            .find(|r| r["metric"]["envoy_response_code"] == "503")
            .unwrap()["value"][1],
        "5"
    );

    // The reference drops never arrive; everything else does, and so do the agent's own metrics.
    assert!(prometheus.query(r#"count({__name__=~"envoy_cluster_(lb|retry|bind|internal|max|original).*|envoy_http_(stats|admin).*"})"#).await.is_empty());
    assert!(!prometheus
        .query(r#"envoy_server_live{job="appmesh-envoy"}"#)
        .await
        .is_empty());
    let mut own = Vec::new();
    for _ in 0..50 {
        own = prometheus
            .query(r#"meshcanary_scrapes_total{job="meshcanary",tier="fast"}"#)
            .await;
        if !own.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!own.is_empty(), "the agent's own metrics are written too");
    let metrics = agent.metrics().await;
    assert!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_samples_total{outcome="dropped_by_rules"}"#
        ) > 0.0
    );
    assert!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_samples_total{outcome="sent"}"#
        ) > 0.0
    );
    agent.shutdown().await;
}

/// A real sidecar scraped every second on both tiers by an agent that remote-writes to
/// `url` through one shard (so a receiver's answers map to consecutive attempts of the same
/// batch); `adjust` changes the remote-write settings, given the test's own directory.
struct OneShard {
    agent: RunningAgent,
    _app: App,
    _sidecar: Sidecar,
    _dir: TempDir,
}

impl OneShard {
    async fn start(
        url: &str,
        adjust: impl FnOnce(&mut meshcanary::remote_write::RemoteWriteConfig, &std::path::Path),
    ) -> OneShard {
        let app = App::start().await;
        let sidecar = Sidecar::start(app.port, "podinfo-primary", "1s").await;
        let dir = TempDir::new("queue");
        let mut rw = remote_write_config(url, &dir.path.join("q"));
        rw.shards = 1;
        adjust(&mut rw, &dir.path);
        let agent = RunningAgent::start_with(
            &[format!("test/podinfo/primary={}", sidecar.admin_url())],
            32 << 20,
            |c| {
                c.full_interval = Some(Duration::from_secs(1));
                c.remote_write = Some(rw);
            },
        )
        .await;
        OneShard {
            agent,
            _app: app,
            _sidecar: sidecar,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_400_batches_are_dropped_and_the_rest_flows() {
    let receiver = Receiver::start(0, vec![(429, Some(1)), (500, None), (400, None)]).await;
    let OneShard {
        agent,
        _app,
        _sidecar,
        _dir,
    } = OneShard::start(&receiver.url(), |_, _| {}).await;
    eventually(
        Duration::from_secs(20),
        "a few delivered batches after the scripted failures",
        || receiver.answered(204) >= 3,
    )
    .await;
    let got = receiver.received();
    assert_eq!(got[0].status, 429);
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_secs(1),
        "Retry-After: 1 honoured"
    );
    assert_eq!(got[1].status, 500);
    // The 429 and the 500 were the same batch, retried; the 400 drops it.
    assert_eq!(got[0].request, got[1].request);
    assert_eq!(got[2].request, got[1].request);
    assert_eq!(got[2].status, 400);
    let dropped_samples: usize = got[2]
        .request
        .timeseries
        .iter()
        .map(|t| t.samples.len())
        .sum();
    assert_eq!(got[3].status, 204);
    assert_ne!(got[3].request, got[2].request, "the pipeline moved on");
    for r in &got {
        assert_eq!(r.headers["content-encoding"], "snappy");
        assert_eq!(r.headers["content-type"], "application/x-protobuf");
        assert_eq!(r.headers["x-prometheus-remote-write-version"], "0.1.0");
        assert!(r.headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("meshcanary/"));
        for ts in &r.request.timeseries {
            let names: Vec<&str> = ts.labels.iter().map(|l| l.name.as_str()).collect();
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "labels sorted: {names:?}"
            );
            assert!(names.contains(&"__name__"));
            assert!(ts.labels.iter().all(|l| !l.value.is_empty()));
        }
    }
    let shared = agent.shared.clone();
    agent.shutdown().await;
    // After shutdown no POST is in flight: the counters and the receiver must agree exactly.
    let metrics = shared.render_metrics();
    assert_eq!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_samples_total{outcome="dropped_http_4xx"}"#
        ),
        dropped_samples as f64
    );
    assert_eq!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_retries_total{reason="429"}"#
        ),
        1.0
    );
    assert_eq!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_retries_total{reason="5xx"}"#
        ),
        1.0
    );
    let delivered: usize = receiver
        .received()
        .iter()
        .filter(|r| r.status == 204)
        .map(|r| {
            r.request
                .timeseries
                .iter()
                .map(|t| t.samples.len())
                .sum::<usize>()
        })
        .sum();
    let sent = counter(
        &metrics,
        r#"meshcanary_remote_write_samples_total{outcome="sent"}"#,
    );
    let queued = counter(
        &metrics,
        r#"meshcanary_remote_write_samples_total{outcome="queued"}"#,
    );
    assert_eq!(
        sent, delivered as f64,
        "every sample counted as sent reached the receiver"
    );
    assert!(
        queued >= sent + dropped_samples as f64,
        "queued {queued} < sent {sent} + dropped {dropped_samples}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_read_again_and_nothing_refused_meanwhile_is_lost() {
    let receiver = Receiver::start(0, vec![]).await;
    *receiver.require_authorization.lock().unwrap() = Some("Bearer new-token".into());
    let mut token = std::path::PathBuf::new();
    let OneShard {
        agent,
        _app,
        _sidecar,
        _dir,
    } = OneShard::start(&receiver.url(), |rw, dir| {
        token = dir.join("token");
        std::fs::write(&token, "old-token\n").unwrap();
        rw.endpoint.credential = Some(meshcanary::remote_write::send::Credential::Bearer {
            file: token.clone(),
        });
    })
    .await;
    eventually(Duration::from_secs(20), "refused attempts", || {
        receiver.answered(401) >= 3
    })
    .await;
    // The kubelet (or an operator) rotates the token file.
    std::fs::write(&token, "new-token\n").unwrap();
    eventually(
        Duration::from_secs(20),
        "deliveries with the new token",
        || receiver.answered(204) >= 3,
    )
    .await;
    let shared = agent.shared.clone();
    agent.shutdown().await;
    let got = receiver.received();
    for r in got.iter().filter(|r| r.status == 204) {
        assert_eq!(r.headers["authorization"], "Bearer new-token");
    }
    // Every refused batch was delivered later: none was dropped.
    for refused in got.iter().filter(|r| r.status == 401) {
        assert!(
            got.iter()
                .any(|r| r.status == 204 && r.request == refused.request),
            "a refused batch never arrived"
        );
    }
    let metrics = shared.render_metrics();
    for outcome in ["dropped_http_4xx", "dropped_auth"] {
        assert_eq!(
            counter(
                &metrics,
                &format!(r#"meshcanary_remote_write_samples_total{{outcome="{outcome}"}}"#)
            ),
            0.0,
            "{outcome}"
        );
    }
    assert!(
        counter(
            &metrics,
            r#"meshcanary_remote_write_retries_total{reason="auth"}"#
        ) >= 3.0
    );
    assert!(
        !metrics.contains("old-token") && !metrics.contains("new-token"),
        "credentials are never exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_refused_past_the_retry_limit_drops_that_batch_and_says_so() {
    let receiver = Receiver::start(0, vec![]).await;
    *receiver.require_authorization.lock().unwrap() = Some("Bearer never-given".into());
    let OneShard {
        agent,
        _app,
        _sidecar,
        _dir,
    } = OneShard::start(&receiver.url(), |rw, _| {
        rw.auth_retry = Duration::from_secs(1);
    })
    .await;
    let shared = agent.shared.clone();
    eventually(
        Duration::from_secs(20),
        "a batch dropped after 1 s of 401s",
        || {
            counter(
                &shared.render_metrics(),
                r#"meshcanary_remote_write_samples_total{outcome="dropped_auth"}"#,
            ) > 0.0
        },
    )
    .await;
    // The drop is counted before the next batch goes out: wait for it rather than stop at
    // once (which lost this race once in CI).
    let distinct = || {
        receiver
            .received()
            .iter()
            .map(|r| format!("{:?}", r.request))
            .collect::<std::collections::HashSet<String>>()
            .len()
    };
    eventually(
        Duration::from_secs(20),
        "the pipeline moved past the dropped batch",
        || distinct() >= 2,
    )
    .await;
    agent.shutdown().await;
    let got = receiver.received();
    let first = got.first().expect("attempts").at;
    assert!(got.last().unwrap().at.duration_since(first) >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_series_and_dead_targets_get_stale_markers() {
    use meshcanary::remote_write::proto::STALE_NAN_BITS;
    let admin = FakeAdmin::start(
        FakeAdmin::ok(b"envoy_a 1\nenvoy_b 2\n", true),
        Duration::ZERO,
    )
    .await;
    let receiver = Receiver::start(0, vec![]).await;
    let queue = TempDir::new("queue");
    let rw = remote_write_config(&receiver.url(), &queue.path);
    let agent = RunningAgent::start_with(
        &[format!("test/app/primary={}", admin.url())],
        1 << 20,
        |c| {
            c.full_interval = Some(Duration::from_secs(1));
            c.remote_write = Some(rw);
        },
    )
    .await;
    let log = receiver.log.clone();
    let samples_of = move |name: &str| -> Vec<u64> {
        log.lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.request.timeseries.clone())
            .filter(|t| {
                t.labels
                    .iter()
                    .any(|l| l.name == "__name__" && l.value == name)
            })
            .flat_map(|t| t.samples.into_iter().map(|s| s.value.to_bits()))
            .collect()
    };
    let b = samples_of.clone();
    eventually(Duration::from_secs(10), "envoy_b written", || {
        b("envoy_b").contains(&2f64.to_bits())
    })
    .await;
    // envoy_b disappears from the target: it gets a stale marker, envoy_a does not.
    admin.set_response(FakeAdmin::ok(b"envoy_a 1\n", true));
    let b = samples_of.clone();
    eventually(
        Duration::from_secs(10),
        "a stale marker for envoy_b",
        || b("envoy_b").contains(&STALE_NAN_BITS),
    )
    .await;
    assert!(!samples_of("envoy_a").contains(&STALE_NAN_BITS));
    // The target dies: every series it had ends.
    admin.set_response(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec());
    let a = samples_of.clone();
    eventually(
        Duration::from_secs(10),
        "a stale marker for envoy_a",
        || a("envoy_a").contains(&STALE_NAN_BITS),
    )
    .await;
    assert_eq!(
        samples_of("envoy_b")
            .iter()
            .filter(|&&v| v == STALE_NAN_BITS)
            .count(),
        1,
        "one marker per ending"
    );
    agent.shutdown().await;
}

/// A size-limited tmpfs for the queue, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(at: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs for the full-disk test needs root (as scripts/test.sh runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { path: at }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_already_queued_counts_what_it_could_not_write_and_recovers() {
    let capture =
        std::fs::read(support::repo().join("tests/fixtures/envoy-1.40-10-clusters.prom")).unwrap();
    let admin = FakeAdmin::start(FakeAdmin::ok(&capture, true), Duration::ZERO).await;
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let dir = TempDir::new("full-disk");
    let disk = SmallDisk::mount(dir.path.join("queue"), "1m");
    let mut rw = remote_write_config(&url, &disk.path);
    rw.shards = 1;
    let agent = RunningAgent::start_with(
        &[format!(
            "test/podinfo/primary=http://127.0.0.1:{}",
            admin.port
        )],
        32 << 20,
        |c| {
            c.full_interval = Some(Duration::from_millis(250));
            c.full_timeout = Duration::from_millis(200);
            c.remote_write = Some(rw);
        },
    )
    .await;
    let shared = agent.shared.clone();
    let outcome = |name: &str| {
        counter(
            &shared.render_metrics(),
            &format!(r#"meshcanary_remote_write_samples_total{{outcome="{name}"}}"#),
        )
    };
    // The receiver is down: the queue fills the 1 MiB disk, and appends start failing.
    eventually(
        Duration::from_secs(60),
        "appends failing on a full disk",
        || outcome("dropped_queue_error") > 0.0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued_when_full = outcome("queued");
    assert!(queued_when_full > 0.0);
    // The fast tier kept its cadence meanwhile (disk I/O is off the async workers).
    let fast = |m: &str| counter(m, r#"meshcanary_scrapes_total{tier="fast"}"#);
    let before = fast(&shared.render_metrics());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scraped = fast(&shared.render_metrics()) - before;
    assert!(
        scraped >= 2.0,
        "{scraped} fast scrapes in 3 s with a full disk"
    );
    // The receiver comes back: what was queued is sent, its segment deleted, and the
    // freed space takes new batches again.
    let receiver = Receiver::start(port, vec![]).await;
    eventually(
        Duration::from_secs(60),
        "new batches queued after the disk freed",
        || outcome("queued") > queued_when_full,
    )
    .await;
    let log = receiver.log.clone();
    let delivered = || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 204)
            .map(|r| {
                r.request
                    .timeseries
                    .iter()
                    .map(|t| t.samples.len())
                    .sum::<usize>()
            })
            .sum::<usize>() as f64
    };
    eventually(Duration::from_secs(60), "the queue drained", || {
        delivered() >= outcome("queued")
    })
    .await;
    agent.shutdown().await;
    let metrics = shared.render_metrics();
    let count = |name: &str| {
        counter(
            &metrics,
            &format!(r#"meshcanary_remote_write_samples_total{{outcome="{name}"}}"#),
        )
    };
    // Exact: every sample written to disk arrived once or is still on disk (the last
    // batches, flushed at shutdown, wait for the next start); only the batches the full
    // disk refused are missing, and they were counted as such.
    let waiting = meshcanary::remote_write::queue::Queue::open(&disk.path.join("shard-0"), 1 << 30)
        .unwrap()
        .backlog()
        .1 as f64;
    assert_eq!(count("sent"), delivered(), "sent and received agree");
    assert_eq!(
        count("queued"),
        count("sent") + waiting,
        "nothing fsynced was lost ({waiting} samples still queued)"
    );
    assert!(count("dropped_queue_error") > 0.0);
    for none in ["dropped_corrupt", "dropped_disk_cap", "dropped_http_4xx"] {
        assert_eq!(count(none), 0.0, "{none}");
    }
    eprintln!(
        "full disk: queued {} (at full {queued_when_full}), sent {}, still queued {waiting}, not written {}",
        count("queued"),
        count("sent"),
        count("dropped_queue_error")
    );
}

/// An agent SIGKILLed while its endpoint is down (no drain, no final sync) loses no sample
/// it had counted as queued: what it wrote is in the page cache, which outlives the process
/// (the queue syncs to disk only once a second), and a second agent on the same queue
/// delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_loses_no_queued_sample() {
    let app = App::start().await;
    let sidecar = Sidecar::start(app.port, "podinfo-primary", "1s").await;
    let receiver_port = support::free_port();
    let url = format!("http://127.0.0.1:{receiver_port}/api/v1/write");
    let queue = TempDir::new("queue");
    let target = format!("test/podinfo/primary={}", sidecar.admin_url());
    // Killed on drop too, so a failed assertion leaves no agent behind.
    struct Agent(std::process::Child);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let agent = |listen: u16| {
        Agent(
            std::process::Command::new(env!("CARGO_BIN_EXE_meshcanary"))
                .args(["agent", "--target", &target])
                .args(["--full-interval", "1s", "--full-timeout", "800ms"])
                .args(["--listen", &format!("127.0.0.1:{listen}")])
                .args(["--remote-write-url", &url, "--remote-write-queue-dir"])
                .arg(&queue.path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starting meshcanary agent"),
        )
    };
    let queued_line = r#"meshcanary_remote_write_samples_total{outcome="queued"}"#;
    let listen = support::free_port();
    let metrics_url = format!("http://127.0.0.1:{listen}/metrics");
    let first = agent(listen);
    support::eventually_async(
        Duration::from_secs(30),
        "a few full scrapes queued",
        || async {
            support::get(&metrics_url)
                .await
                .is_ok_and(|(_, body)| counter(&body, queued_line) >= 1000.0)
        },
    )
    .await;
    let (_, metrics) = support::get(&metrics_url).await.expect("agent metrics");
    let queued = counter(&metrics, queued_line);
    drop(first); // SIGKILL, reaped

    let killed_at_ms = meshcanary::clock::unix_ms() as i64;

    let receiver = Receiver::start(receiver_port, vec![]).await;
    let log = receiver.log.clone();
    let second = agent(support::free_port());
    let before_kill = || -> usize {
        log.lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.request.timeseries)
            .flat_map(|t| &t.samples)
            .filter(|s| s.timestamp < killed_at_ms)
            .count()
    };
    let delivered = tokio::time::timeout(Duration::from_secs(60), async {
        while (before_kill() as f64) < queued {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    drop(second);
    assert!(
        delivered.is_ok(),
        "{} of the {queued} samples queued before the SIGKILL arrived",
        before_kill()
    );
}
