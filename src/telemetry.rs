//! Stage 10, telemetry: the agent's own metrics, `/metrics`, `/healthz` and `/readyz`.
//!
//! Every metric is registered once in [`Metrics::new`] through one helper that also records
//! its documentation (name, type, labels, help), so the reference table in the README is
//! generated from the same call that registers the metric ([`Metrics::reference_table`]) and a
//! test fails if the two drift. Labels are bounded: tiers, fixed error reasons, and the
//! workloads and pods of this node.
//!
//! The agent measures its own latencies (scrape duration, scrape-to-window) with
//! `hdrhistogram` over a rolling minute and exports quantiles as gauges, refreshed at each
//! `/metrics` render together with the window gauges.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::judge::Judgement;
use crate::scrape::Tier;
use crate::window::{Summary, WindowKey};

/// Quantiles exported for latency gauges.
pub const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99")];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub tier: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierQuantileLabels {
    pub tier: &'static str,
    pub quantile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuantileLabels {
    pub quantile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub namespace: String,
    pub workload: String,
    pub role: &'static str,
}

impl From<&WindowKey> for WorkloadLabels {
    fn from(k: &WindowKey) -> Self {
        WorkloadLabels {
            namespace: k.namespace.clone(),
            workload: k.workload.clone(),
            role: k.role.as_str(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadQuantileLabels {
    pub namespace: String,
    pub workload: String,
    pub role: &'static str,
    pub quantile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub namespace: String,
    pub workload: String,
    pub role: &'static str,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JudgeLabels {
    pub namespace: String,
    pub workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub namespace: String,
    pub workload: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TestLabels {
    pub namespace: String,
    pub workload: String,
    pub test: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub workload: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub namespace: String,
    pub workload: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabels {
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

/// Documentation of one metric, recorded where it is registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricDoc {
    /// Exposed name (counters carry `_total`).
    pub name: String,
    pub kind: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

/// Latency recorder over a rolling window of one to two periods.
#[derive(Debug)]
pub struct RollingLatency {
    current: hdrhistogram::Histogram<u64>,
    previous: hdrhistogram::Histogram<u64>,
    rotated: Instant,
    period: Duration,
}

impl RollingLatency {
    pub fn new(period: Duration) -> Self {
        let h = || {
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2)
                .expect("static bounds are valid")
        };
        RollingLatency {
            current: h(),
            previous: h(),
            rotated: Instant::now(),
            period,
        }
    }

    fn rotate(&mut self) {
        if self.rotated.elapsed() >= self.period {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
            self.rotated = Instant::now();
        }
    }

    pub fn record(&mut self, d: Duration) {
        self.rotate();
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.current.saturating_record(us);
    }

    /// Quantile in seconds over the last one to two periods, `None` with no data.
    pub fn quantile(&mut self, q: f64) -> Option<f64> {
        self.rotate();
        let mut both = self.previous.clone();
        both.add(&self.current).ok()?;
        (!both.is_empty()).then(|| both.value_at_quantile(q) as f64 / 1e6)
    }
}

/// Per-target state the metrics report.
#[derive(Clone, Debug)]
pub struct TargetHealth {
    pub key: WindowKey,
    pub id: String,
    pub up: bool,
}

/// All metrics of the agent, registered at construction.
pub struct Metrics {
    registry: Registry,
    docs: Vec<MetricDoc>,
    pub scrapes: Family<TierLabels, Counter>,
    pub scrape_errors: Family<ErrorLabels, Counter>,
    pub parse_errors: Family<ErrorLabels, Counter>,
    pub scraped_bytes: Family<TierLabels, Counter>,
    pub full_samples: Counter,
    pub counter_resets: Family<WorkloadLabels, Counter>,
    scrape_duration: Family<TierQuantileLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    scrape_to_window: Family<QuantileLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    targets: Gauge,
    targets_up: Gauge,
    target_up: Family<TargetLabels, Gauge>,
    window_requests: Family<WorkloadLabels, Gauge>,
    window_rps: Family<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    window_success: Family<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    window_latency: Family<WorkloadQuantileLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    window_age: Family<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    judge_verdict: Family<VerdictLabels, Gauge>,
    judge_e_value: Family<TestLabels, GaugeF>,
    judge_boundary: Family<TestLabels, GaugeF>,
    judge_share: Family<JudgeLabels, GaugeF>,
    pub rollout_weight: Family<JudgeLabels, Gauge>,
    pub rollout_phase: Family<PhaseLabels, Gauge>,
    pub rollout_failed_checks: Family<JudgeLabels, Gauge>,
    pub rollout_threshold: Family<JudgeLabels, Gauge>,
    pub rollout_success_rate: Family<JudgeLabels, GaugeF>,
    pub rollout_success_rate_min: Family<JudgeLabels, GaugeF>,
    pub rollout_p99: Family<JudgeLabels, GaugeF>,
    pub rollout_p99_max: Family<JudgeLabels, GaugeF>,
    pub rollout_invalid: Family<JudgeLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub weight_applied: prometheus_client::metrics::histogram::Histogram,
    pub controller_tick: prometheus_client::metrics::histogram::Histogram,
    pub leader: Gauge,
    pub controller_errors: Family<OperationLabels, Counter>,
    pub peer_requests: Family<ResultLabels, Counter>,
    pub peer_token_reviews: Family<ResultLabels, Counter>,
    pub http_connections: Family<ServerLabels, Gauge>,
    pub http_timeouts: Family<ServerLabels, Counter>,
    pub http_refused: Family<ServerLabels, Counter>,
    pub peers_known: Gauge,
    pub peers_up: Gauge,
    pub peer_polls: Family<ResultLabels, Counter>,
    pub peer_poll_seconds: prometheus_client::metrics::histogram::Histogram,
    pub merged_window_age: GaugeF,
    pub rw_samples: Family<OutcomeLabels, Counter>,
    pub rw_retries: Family<ReasonLabels, Counter>,
    pub rw_batches: Family<StatusClassLabels, Counter>,
    rw_queue_bytes: Family<ShardLabels, Gauge>,
    rw_queue_samples: Family<ShardLabels, Gauge>,
    rw_send_seconds: Family<QuantileLabels, GaugeF>,
    pub rw_newest_sent: GaugeF,
    /// hdrhistogram recorders behind the quantile gauges.
    pub fast_latency: Mutex<RollingLatency>,
    pub full_latency: Mutex<RollingLatency>,
    pub window_latency_recorder: Mutex<RollingLatency>,
    pub rw_send_latency: Mutex<RollingLatency>,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut docs = Vec::new();
        let mut reg = |name: &str,
                       help: &'static str,
                       labels: &'static [&'static str],
                       metric: Box<dyn RegisterAs>| {
            let kind = metric.kind();
            let exposed = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            docs.push(MetricDoc {
                name: exposed,
                kind,
                labels,
                help,
            });
            // The encoder ends help with a period itself.
            metric.register(&mut registry, name, help.trim_end_matches('.'));
        };
        let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        let m = Metrics {
            registry: Registry::default(),
            docs: Vec::new(),
            scrapes: Family::default(),
            scrape_errors: Family::default(),
            parse_errors: Family::default(),
            scraped_bytes: Family::default(),
            full_samples: Counter::default(),
            counter_resets: Family::default(),
            scrape_duration: Family::default(),
            scrape_to_window: Family::default(),
            targets: Gauge::default(),
            targets_up: Gauge::default(),
            target_up: Family::default(),
            window_requests: Family::default(),
            window_rps: Family::default(),
            window_success: Family::default(),
            window_latency: Family::default(),
            window_age: Family::default(),
            judge_verdict: Family::default(),
            judge_e_value: Family::default(),
            judge_boundary: Family::default(),
            judge_share: Family::default(),
            rollout_weight: Family::default(),
            rollout_phase: Family::default(),
            rollout_failed_checks: Family::default(),
            rollout_threshold: Family::default(),
            rollout_success_rate: Family::default(),
            rollout_success_rate_min: Family::default(),
            rollout_p99: Family::default(),
            rollout_p99_max: Family::default(),
            rollout_invalid: Family::default(),
            decisions: Family::default(),
            weight_applied: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.002, 2.0, 14),
            ),
            controller_tick: prometheus_client::metrics::histogram::Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ]),
            leader: Gauge::default(),
            controller_errors: Family::default(),
            peer_requests: Family::default(),
            peer_token_reviews: Family::default(),
            http_connections: Family::default(),
            http_timeouts: Family::default(),
            http_refused: Family::default(),
            peers_known: Gauge::default(),
            peers_up: Gauge::default(),
            peer_polls: Family::default(),
            peer_poll_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 12),
            ),
            merged_window_age: GaugeF::default(),
            rw_samples: Family::default(),
            rw_retries: Family::default(),
            rw_batches: Family::default(),
            rw_queue_bytes: Family::default(),
            rw_queue_samples: Family::default(),
            rw_send_seconds: Family::default(),
            rw_newest_sent: GaugeF::default(),
            rw_send_latency: Mutex::new(RollingLatency::new(Duration::from_secs(60))),
            fast_latency: Mutex::new(RollingLatency::new(Duration::from_secs(60))),
            full_latency: Mutex::new(RollingLatency::new(Duration::from_secs(60))),
            window_latency_recorder: Mutex::new(RollingLatency::new(Duration::from_secs(60))),
        };
        reg(
            "meshcanary_build_info",
            "Always 1; the version label says which build runs.",
            &["version"],
            Box::new(build_info),
        );
        reg(
            "meshcanary_scrapes",
            "Scrapes attempted, by tier (fast feeds decisions, full feeds remote write).",
            &["tier"],
            Box::new(m.scrapes.clone()),
        );
        reg("meshcanary_scrape_errors", "Scrapes that produced no body, by tier and reason (connect, timeout, http_status, body_too_large, body_read, invalid_url).", &["tier", "reason"], Box::new(m.scrape_errors.clone()));
        reg("meshcanary_parse_errors", "Lines of Envoy output rejected by the parser, by tier and reason; the rest of the scrape is kept.", &["tier", "reason"], Box::new(m.parse_errors.clone()));
        reg(
            "meshcanary_scraped_bytes",
            "Bytes of Envoy output read, by tier.",
            &["tier"],
            Box::new(m.scraped_bytes.clone()),
        );
        reg(
            "meshcanary_full_scrape_samples",
            "Samples parsed from full-tier scrapes (the input of remote write).",
            &[],
            Box::new(m.full_samples.clone()),
        );
        reg("meshcanary_counter_resets", "Envoy counter resets seen (a sidecar restarted); counted as a restart, never as a negative rate.", &["namespace", "workload", "role"], Box::new(m.counter_resets.clone()));
        reg(
            "meshcanary_scrape_duration_seconds",
            "Scrape duration quantiles over the last one to two minutes (hdrhistogram), by tier.",
            &["tier", "quantile"],
            Box::new(m.scrape_duration.clone()),
        );
        reg("meshcanary_scrape_to_window_seconds", "Time from the start of a fast scrape to its window update, quantiles over the last one to two minutes.", &["quantile"], Box::new(m.scrape_to_window.clone()));
        reg(
            "meshcanary_targets",
            "Envoy sidecars this agent scrapes.",
            &[],
            Box::new(m.targets.clone()),
        );
        reg(
            "meshcanary_targets_up",
            "Envoy sidecars whose last fast scrape succeeded.",
            &[],
            Box::new(m.targets_up.clone()),
        );
        reg(
            "meshcanary_target_up",
            "1 if the last fast scrape of this sidecar succeeded, else 0.",
            &["namespace", "workload", "role", "target"],
            Box::new(m.target_up.clone()),
        );
        reg(
            "meshcanary_window_requests",
            "Inbound requests in the rolling window.",
            &["namespace", "workload", "role"],
            Box::new(m.window_requests.clone()),
        );
        reg(
            "meshcanary_window_requests_per_second",
            "Inbound request rate over the rolling window.",
            &["namespace", "workload", "role"],
            Box::new(m.window_rps.clone()),
        );
        reg(
            "meshcanary_window_success_ratio",
            "Share of non-5xx responses in the window (absent below the minimum request count).",
            &["namespace", "workload", "role"],
            Box::new(m.window_success.clone()),
        );
        reg("meshcanary_window_latency_seconds", "Inbound latency quantiles over the window, from Envoy's histogram (absent below the minimum).", &["namespace", "workload", "role", "quantile"], Box::new(m.window_latency.clone()));
        reg(
            "meshcanary_window_age_seconds",
            "Time since the window last received a scrape; large means stale data.",
            &["namespace", "workload", "role"],
            Box::new(m.window_age.clone()),
        );
        reg(
            "meshcanary_judge_verdict",
            "1 for the judge's current verdict on a workload (no_data, pass, advance_early, failed_check, rollback).",
            &["namespace", "workload", "verdict"],
            Box::new(m.judge_verdict.clone()),
        );
        reg(
            "meshcanary_judge_e_value",
            "Evidence of each sequential test (errors, latency, error_slo, latency_slo, not_worse); a rollback when it reaches the boundary.",
            &["namespace", "workload", "test"],
            Box::new(m.judge_e_value.clone()),
        );
        reg(
            "meshcanary_judge_boundary",
            "The value each sequential test's e-value must reach (1 / its share of alpha).",
            &["namespace", "workload", "test"],
            Box::new(m.judge_boundary.clone()),
        );
        reg(
            "meshcanary_judge_canary_share",
            "The canary's observed share of requests since the judge started on the workload.",
            &["namespace", "workload"],
            Box::new(m.judge_share.clone()),
        );
        reg(
            "meshcanary_rollout_canary_weight",
            "The canary weight the rollout has decided (the router is kept at it), percent.",
            &["namespace", "workload"],
            Box::new(m.rollout_weight.clone()),
        );
        reg("meshcanary_rollout_phase", "1 for a rollout's current phase (Initializing, Initialized, Progressing, Promoting, Finalising, Succeeded, Failed).", &["namespace", "workload", "phase"], Box::new(m.rollout_phase.clone()));
        reg(
            "meshcanary_rollout_failed_checks",
            "Failed checks of the current analysis.",
            &["namespace", "workload"],
            Box::new(m.rollout_failed_checks.clone()),
        );
        reg(
            "meshcanary_rollout_threshold",
            "Failed checks that roll back (meshcanary.io/threshold).",
            &["namespace", "workload"],
            Box::new(m.rollout_threshold.clone()),
        );
        reg(
            "meshcanary_rollout_success_rate",
            "The canary success rate the last check analysed, as a fraction.",
            &["namespace", "workload"],
            Box::new(m.rollout_success_rate.clone()),
        );
        reg(
            "meshcanary_rollout_success_rate_min",
            "The success-rate minimum it is checked against, as a fraction.",
            &["namespace", "workload"],
            Box::new(m.rollout_success_rate_min.clone()),
        );
        reg(
            "meshcanary_rollout_latency_p99_seconds",
            "The canary p99 the last check analysed.",
            &["namespace", "workload"],
            Box::new(m.rollout_p99.clone()),
        );
        reg(
            "meshcanary_rollout_latency_p99_max_seconds",
            "The p99 maximum it is checked against.",
            &["namespace", "workload"],
            Box::new(m.rollout_p99_max.clone()),
        );
        reg("meshcanary_rollout_invalid_config", "1 while an opted-in Deployment's annotations or shape are invalid, or objects it needs belong to someone else (see its Warning events); it is left untouched.", &["namespace", "workload"], Box::new(m.rollout_invalid.clone()));
        reg(
            "meshcanary_decisions",
            "Rollout decisions by kind (advance, halt, rollback, promote).",
            &["namespace", "workload", "kind"],
            Box::new(m.decisions.clone()),
        );
        reg(
            "meshcanary_weight_applied_seconds",
            "Time from a decision to the weight written to the router and read back.",
            &[],
            Box::new(m.weight_applied.clone()),
        );
        reg(
            "meshcanary_controller_tick_seconds",
            "Time of one decision tick of the leading controller: polling the agents, judging and reconciling every opted-in Deployment.",
            &[],
            Box::new(m.controller_tick.clone()),
        );
        reg(
            "meshcanary_leader",
            "1 while this controller replica holds the Lease (and may write), else 0.",
            &[],
            Box::new(m.leader.clone()),
        );
        reg("meshcanary_controller_errors", "Kubernetes API operations of the controller that failed, by operation and reason; retried at the next tick.", &["operation", "reason"], Box::new(m.controller_errors.clone()));
        reg("meshcanary_peer_requests", "Window requests this agent answered on the peer port, by result: ok, or why it refused (no_token, token_rejected, wrong_user, review_failed, bad_request, not_found).", &["result"], Box::new(m.peer_requests.clone()));
        reg("meshcanary_peer_token_reviews", "TokenReviews the peer port asked the API server for (tokens not in its cache), by result: ok, token_rejected, wrong_user, review_failed.", &["result"], Box::new(m.peer_token_reviews.clone()));
        reg("meshcanary_http_connections", "Open connections on each HTTP port (server: telemetry, peers); at most --http-max-connections each.", &["server"], Box::new(m.http_connections.clone()));
        reg("meshcanary_http_refused", "Connections closed at the --http-max-connections cap, by server: the oldest connection that had not sent a request yet, or the new one when every open connection had.", &["server"], Box::new(m.http_refused.clone()));
        reg("meshcanary_http_timeouts", "Connections closed because a request's headers did not arrive within --http-header-timeout (slow or idle clients), by server.", &["server"], Box::new(m.http_timeouts.clone()));
        reg(
            "meshcanary_peers_known",
            "Agents the controller knows (Running pods of the DaemonSet).",
            &[],
            Box::new(m.peers_known.clone()),
        );
        reg(
            "meshcanary_peers_up",
            "Agents whose last poll succeeded (those on nodes of workloads under analysis are polled every tick, the others about every tenth).",
            &[],
            Box::new(m.peers_up.clone()),
        );
        reg("meshcanary_peer_polls", "The controller's window polls of agents, by result: ok, invalid (answered, but some windows failed their checks or were of workloads with no pod on the agent's node, and were skipped), connect, timeout, unauthorized, status, decode, no_token.", &["result"], Box::new(m.peer_polls.clone()));
        reg(
            "meshcanary_peer_poll_seconds",
            "Time of one successful window poll of a peer.",
            &[],
            Box::new(m.peer_poll_seconds.clone()),
        );
        reg("meshcanary_merged_window_age_seconds", "Age of the oldest answer among the agents polled every tick (those on nodes of workloads under analysis); above the staleness limit, decisions on the affected workloads halt.", &[], Box::new(m.merged_window_age.clone()));
        reg(
            "meshcanary_remote_write_samples",
            "Remote-write samples by outcome: queued (on disk), sent, dropped_http_4xx (rejected by the receiver), dropped_auth (credential refused for all of --remote-write-auth-retry), dropped_disk_cap, dropped_corrupt, dropped_queue_error.",
            &["outcome"],
            Box::new(m.rw_samples.clone()),
        );
        reg(
            "meshcanary_remote_write_retries",
            "Remote-write batch attempts that will be retried, by reason (429, 5xx, auth for 401/403, connect, timeout, body_read, credentials).",
            &["reason"],
            Box::new(m.rw_retries.clone()),
        );
        reg(
            "meshcanary_remote_write_batches",
            "Remote-write POSTs by answer (2xx, 4xx, 429, 5xx, error for no answer).",
            &["status_class"],
            Box::new(m.rw_batches.clone()),
        );
        reg(
            "meshcanary_remote_write_queue_bytes",
            "Bytes of the remote-write queue on disk, by shard.",
            &["shard"],
            Box::new(m.rw_queue_bytes.clone()),
        );
        reg(
            "meshcanary_remote_write_queue_samples",
            "Samples waiting in the remote-write queue, by shard.",
            &["shard"],
            Box::new(m.rw_queue_samples.clone()),
        );
        reg(
            "meshcanary_remote_write_send_seconds",
            "Remote-write POST duration quantiles over the last one to two minutes (hdrhistogram).",
            &["quantile"],
            Box::new(m.rw_send_seconds.clone()),
        );
        reg(
            "meshcanary_remote_write_newest_sample_sent_timestamp_seconds",
            "Timestamp of the newest sample the endpoint accepted; now minus this is the remote-write lag.",
            &[],
            Box::new(m.rw_newest_sent.clone()),
        );
        Metrics {
            registry,
            docs,
            ..m
        }
    }

    /// The documentation of every registered metric, in registration order.
    pub fn docs(&self) -> &[MetricDoc] {
        &self.docs
    }

    /// The Markdown reference table of every metric (the README embeds it verbatim).
    pub fn reference_table(&self) -> String {
        let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for d in &self.docs {
            let labels = if d.labels.is_empty() {
                "-".to_owned()
            } else {
                d.labels
                    .iter()
                    .map(|l| format!("`{l}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out += &format!("| `{}` | {} | {} | {} |\n", d.name, d.kind, labels, d.help);
        }
        out
    }

    /// Publish one shard's queue backlog.
    pub fn set_queue_backlog(&self, shard: usize, bytes: u64, samples: u64) {
        let l = ShardLabels {
            shard: shard.to_string(),
        };
        self.rw_queue_bytes
            .get_or_create(&l)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.rw_queue_samples
            .get_or_create(&l)
            .set(i64::try_from(samples).unwrap_or(i64::MAX));
    }

    pub fn record_scrape_duration(&self, tier: Tier, d: Duration) {
        let rec = match tier {
            Tier::Fast => &self.fast_latency,
            Tier::Full => &self.full_latency,
        };
        lock(rec).record(d);
    }

    /// Refresh the gauges derived from state, then encode everything.
    pub fn render(
        &self,
        windows: &[(WindowKey, Summary)],
        targets: &[TargetHealth],
        judgements: &[((String, String), Judgement)],
    ) -> String {
        for (tier, rec) in [
            (Tier::Fast, &self.fast_latency),
            (Tier::Full, &self.full_latency),
        ] {
            let mut rec = lock(rec);
            for (q, label) in QUANTILES {
                if let Some(v) = rec.quantile(q) {
                    self.scrape_duration
                        .get_or_create(&TierQuantileLabels {
                            tier: tier.as_str(),
                            quantile: label,
                        })
                        .set(v);
                }
            }
        }
        {
            let mut rec = lock(&self.window_latency_recorder);
            for (q, label) in QUANTILES {
                if let Some(v) = rec.quantile(q) {
                    self.scrape_to_window
                        .get_or_create(&QuantileLabels { quantile: label })
                        .set(v);
                }
            }
        }
        {
            let mut rec = lock(&self.rw_send_latency);
            for (q, label) in QUANTILES {
                if let Some(v) = rec.quantile(q) {
                    self.rw_send_seconds
                        .get_or_create(&QuantileLabels { quantile: label })
                        .set(v);
                }
            }
        }
        self.targets.set(targets.len() as i64);
        self.targets_up
            .set(targets.iter().filter(|t| t.up).count() as i64);
        self.target_up.clear();
        for t in targets {
            self.target_up
                .get_or_create(&TargetLabels {
                    namespace: t.key.namespace.clone(),
                    workload: t.key.workload.clone(),
                    role: t.key.role.as_str(),
                    target: t.id.clone(),
                })
                .set(i64::from(t.up));
        }
        self.window_requests.clear();
        self.window_rps.clear();
        self.window_success.clear();
        self.window_latency.clear();
        self.window_age.clear();
        for (key, s) in windows {
            let l = WorkloadLabels::from(key);
            self.window_requests
                .get_or_create(&l)
                .set(s.requests as i64);
            set_some(&self.window_rps, &l, s.rps);
            set_some(&self.window_success, &l, s.success_rate);
            set_some(&self.window_age, &l, s.age_ms.map(|ms| ms as f64 / 1000.0));
            for (q, v) in [("0.5", s.p50_ms), ("0.9", s.p90_ms), ("0.99", s.p99_ms)] {
                let ql = WorkloadQuantileLabels {
                    namespace: l.namespace.clone(),
                    workload: l.workload.clone(),
                    role: l.role,
                    quantile: q,
                };
                set_some(&self.window_latency, &ql, v.map(|ms| ms / 1000.0));
            }
        }
        self.judge_verdict.clear();
        self.judge_e_value.clear();
        self.judge_boundary.clear();
        self.judge_share.clear();
        for ((namespace, workload), j) in judgements {
            let (namespace, workload) = (namespace.clone(), workload.clone());
            self.judge_verdict
                .get_or_create(&VerdictLabels {
                    namespace: namespace.clone(),
                    workload: workload.clone(),
                    verdict: j.verdict.as_str(),
                })
                .set(1);
            let ev = &j.evidence;
            let tests = [
                ("errors", ev.e_errors, ev.boundaries[0]),
                ("latency", ev.e_latency, ev.boundaries[1]),
                ("error_slo", ev.e_error_slo, ev.boundaries[2]),
                ("latency_slo", ev.e_latency_slo, ev.boundaries[3]),
                ("not_worse", ev.e_not_worse, ev.boundaries[2]),
            ];
            for (test, e, boundary) in tests {
                let l = TestLabels {
                    namespace: namespace.clone(),
                    workload: workload.clone(),
                    test,
                };
                self.judge_e_value.get_or_create(&l).set(e);
                if boundary.is_finite() {
                    self.judge_boundary.get_or_create(&l).set(boundary);
                }
            }
            self.judge_share
                .get_or_create(&JudgeLabels {
                    namespace,
                    workload,
                })
                .set(ev.canary_share);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn set_some<L>(family: &Family<L, GaugeF>, labels: &L, v: Option<f64>)
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    if let Some(v) = v {
        family.get_or_create(labels).set(v);
    }
}

/// Lock a mutex, recovering the data if a holder panicked (metrics are best effort).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Object-safe registration, so one helper can register metrics of every type.
trait RegisterAs {
    fn kind(&self) -> &'static str;
    fn register(self: Box<Self>, registry: &mut Registry, name: &str, help: &str);
}

impl<M> RegisterAs for M
where
    M: TypedMetric + EncodeMetric + Send + Sync + std::fmt::Debug + 'static,
{
    fn kind(&self) -> &'static str {
        use prometheus_client::metrics::MetricType;
        match M::TYPE {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            _ => "unknown",
        }
    }
    fn register(self: Box<Self>, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, *self);
    }
}

/// What the HTTP endpoints read: a metrics renderer, the readiness flag and the loops
/// whose life `/healthz` vouches for.
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub ready: Arc<AtomicBool>,
    pub heartbeat: Heartbeat,
}

/// A loop's sign of life: it beats every iteration, and `/healthz` fails once the last beat
/// is older than the loop's bound, so the kubelet restarts a process whose loop ended (an
/// error it could not retry, a panic) instead of keeping a silent one. Unused (never
/// armed), it is always healthy.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    /// (last beat, unix ms; the bound, ms); 0/0 until armed.
    state: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
}

impl Heartbeat {
    /// Start vouching for a loop that beats at least every `bound`.
    pub fn arm(&self, bound: Duration, now_ms: u64) {
        self.state
            .1
            .store(bound.as_millis() as u64, Ordering::Release);
        self.beat(now_ms);
    }

    pub fn beat(&self, now_ms: u64) {
        self.state.0.store(now_ms, Ordering::Release);
    }

    /// `Err` with the reason when the armed loop has not beaten within its bound.
    ///
    /// ### Errors
    /// The loop's last beat is too old.
    pub fn check(&self, now_ms: u64) -> Result<(), String> {
        let bound = self.state.1.load(Ordering::Acquire);
        let last = self.state.0.load(Ordering::Acquire);
        let age = now_ms.saturating_sub(last);
        if bound == 0 || age <= bound {
            Ok(())
        } else {
            Err(format!(
                "the controller loop has not run for {:.1} s (bound {:.1} s)",
                age as f64 / 1000.0,
                bound as f64 / 1000.0
            ))
        }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    server: HttpServer,
    shutdown: watch::Receiver<bool>,
) {
    serve_http(listener, server, shutdown, move |req| {
        let response = route(&req, &endpoints);
        async move { response }
    })
    .await;
}

/// Limits of every HTTP port the agent opens (telemetry and peers): both face the pod
/// network, so a client that opens connections and sends nothing, or sends a byte a
/// minute, must cost a bounded amount and go away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once. A new connection beyond it closes the oldest one that
    /// has not sent a whole request yet (an idle or trickling client: a real one sends its
    /// request at once); with none of those, the new one is refused (closed at once). The
    /// process never grows past it.
    pub max_connections: usize,
    /// A request's headers must arrive within this time, counted from the connection's
    /// start or the end of the previous answer: it is also the keep-alive idle timeout.
    pub header_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// One HTTP port: its name for metrics, its limits, and the metrics it reports to.
#[derive(Clone)]
pub struct HttpServer {
    pub name: &'static str,
    pub limits: HttpLimits,
    pub metrics: Arc<Metrics>,
}

/// Connections that have not sent a whole request yet, oldest first: the ones a new
/// connection may push out at the cap.
type Waiting = Arc<Mutex<std::collections::BTreeMap<u64, tokio::task::AbortHandle>>>;

/// Accept HTTP/1 connections on `listener` and answer each request with `handler`, within
/// `server`'s limits, until `shutdown` turns true (the telemetry and the peer port share
/// this).
pub async fn serve_http<H, F>(
    listener: TcpListener,
    server: HttpServer,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let labels = ServerLabels {
        server: server.name,
    };
    let open = server
        .metrics
        .http_connections
        .get_or_create(&labels)
        .clone();
    let timeouts = server.metrics.http_timeouts.get_or_create(&labels).clone();
    let refused = server.metrics.http_refused.get_or_create(&labels).clone();
    let permits = Arc::new(tokio::sync::Semaphore::new(
        server.limits.max_connections.max(1),
    ));
    let waiting: Waiting = Arc::default();
    let mut conns = tokio::task::JoinSet::new();
    let mut seq = 0u64;
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = crate::shutdown::stopping(&mut shutdown) => break,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "Accepting a connection failed");
                // Out of file descriptors, typically: give the others a moment to close.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the cap: push out the oldest connection still waiting for a request.
                let oldest = lock(&waiting).pop_first();
                let Some((_, handle)) = oldest else {
                    refused.inc();
                    drop(stream);
                    continue;
                };
                handle.abort();
                refused.inc();
                match Arc::clone(&permits).acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                }
            }
        };
        seq += 1;
        let id = seq;
        let handler = handler.clone();
        let (open, timeouts) = (open.clone(), timeouts.clone());
        let header_timeout = server.limits.header_timeout;
        let waiting_here = Arc::clone(&waiting);
        // The task serves only once it is listed, so its first request always unlists it.
        let (listed, is_listed) = tokio::sync::oneshot::channel::<()>();
        let handle = conns.spawn(async move {
            let _permit = permit;
            let _ = is_listed.await;
            let _open = OpenGuard::new(open);
            let first = Arc::clone(&waiting_here);
            let service = hyper::service::service_fn(move |req| {
                lock(&first).remove(&id);
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(io, service)
                .await;
            lock(&waiting_here).remove(&id);
            if served.is_err_and(|e| e.is_timeout()) {
                timeouts.inc();
            }
        });
        lock(&waiting).insert(id, handle);
        let _ = listed.send(());
    }
    conns.abort_all();
}

/// Counts a connection in `meshcanary_http_connections` while it lives, however it ends
/// (an evicted connection's task is dropped, not finished).
struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        OpenGuard(gauge)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn route(req: &Request<Incoming>, endpoints: &Endpoints) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match req.uri().path() {
        "/metrics" => Response::builder()
            .header(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from((endpoints.metrics)())))
            .unwrap_or_default(),
        "/healthz" => match endpoints.heartbeat.check(crate::clock::unix_ms()) {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            ),
        },
        "/readyz" if endpoints.ready.load(Ordering::Acquire) => {
            text(StatusCode::OK, "ready\n".into())
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not every target has been scraped once\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Bind the telemetry listener.
///
/// ### Errors
/// The bind error, naming the address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(addr).map_err(|e| anyhow::anyhow!("binding the telemetry listener on {addr}: {e}"))
}

/// The kernel's accept queue of an HTTP port. The standard library's (and tokio's) 128 is
/// small for a port that clients may flood: past it the kernel leaves handshakes half
/// done and retries them for seconds, so a burst of connections reaches [`serve_http`]'s
/// cap and eviction late instead of at once.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Bind an HTTP port with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio's `bind` does).
///
/// ### Errors
/// The address cannot be bound.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_vouches_only_while_its_loop_beats() {
        let h = Heartbeat::default();
        assert!(h.check(1_000_000).is_ok(), "not armed: healthy");
        h.arm(Duration::from_secs(30), 1_000_000);
        assert!(h.check(1_030_000).is_ok());
        let err = h.check(1_030_001).unwrap_err();
        assert!(err.contains("has not run for 30.0 s"), "{err}");
        h.beat(1_030_000);
        assert!(h.check(1_040_000).is_ok());
    }

    #[test]
    fn every_registered_metric_is_documented_and_encoded() {
        let m = Metrics::new();
        let text = m.render(&[], &[], &[]);
        for d in m.docs() {
            let family = d.name.strip_suffix("_total").unwrap_or(&d.name);
            assert!(
                text.contains(&format!("# TYPE {family} {}", d.kind)),
                "{} missing from:\n{text}",
                d.name
            );
            assert!(d.name.starts_with("meshcanary_"));
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(types, m.docs().len(), "a metric registered without docs");
    }

    #[test]
    fn rolling_latency_quantiles() {
        let mut r = RollingLatency::new(Duration::from_secs(60));
        assert_eq!(r.quantile(0.5), None);
        for ms in 1..=100 {
            r.record(Duration::from_millis(ms));
        }
        let p50 = r.quantile(0.5).unwrap();
        assert!((0.049..0.052).contains(&p50), "{p50}");
    }
}
