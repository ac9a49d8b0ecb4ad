//! The controller's metrics: each rollout's state, its decisions, the ticks and the API
//! errors.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

pub use crate::analysis::JudgeLabels;
use crate::telemetry::{GaugeF, MetricRegistry};

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
pub struct WebhookLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub severity: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug)]
pub struct ControllerMetrics {
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
    pub weight_applied: Histogram,
    pub tick: Histogram,
    pub sooner_ticks: Counter,
    pub leader: Gauge,
    pub errors: Family<OperationLabels, Counter>,
    pub webhook_calls: Family<WebhookLabels, Counter>,
    pub alerts: Family<AlertLabels, Counter>,
}

impl ControllerMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = ControllerMetrics {
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
            weight_applied: Histogram::new(exponential_buckets(0.002, 2.0, 14)),
            tick: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ]),
            sooner_ticks: Counter::default(),
            leader: Gauge::default(),
            errors: Family::default(),
            webhook_calls: Family::default(),
            alerts: Family::default(),
        };
        r.register(
            "meshcanary_rollout_canary_weight",
            "The canary weight the rollout has decided (the router is kept at it), percent.",
            &["namespace", "workload"],
            &m.rollout_weight,
        );
        r.register("meshcanary_rollout_phase", "1 for a rollout's current phase (Initializing, Initialized, Progressing, Promoting, Finalising, Succeeded, Failed).", &["namespace", "workload", "phase"], &m.rollout_phase);
        r.register(
            "meshcanary_rollout_failed_checks",
            "Failed checks of the current analysis.",
            &["namespace", "workload"],
            &m.rollout_failed_checks,
        );
        r.register(
            "meshcanary_rollout_threshold",
            "Failed checks that roll back (meshcanary.io/threshold).",
            &["namespace", "workload"],
            &m.rollout_threshold,
        );
        r.register(
            "meshcanary_rollout_success_rate",
            "The canary success rate the last check analysed, as a fraction.",
            &["namespace", "workload"],
            &m.rollout_success_rate,
        );
        r.register(
            "meshcanary_rollout_success_rate_min",
            "The success-rate minimum it is checked against, as a fraction.",
            &["namespace", "workload"],
            &m.rollout_success_rate_min,
        );
        r.register(
            "meshcanary_rollout_latency_p99_seconds",
            "The canary p99 the last check analysed.",
            &["namespace", "workload"],
            &m.rollout_p99,
        );
        r.register(
            "meshcanary_rollout_latency_p99_max_seconds",
            "The p99 maximum it is checked against.",
            &["namespace", "workload"],
            &m.rollout_p99_max,
        );
        r.register("meshcanary_rollout_invalid_config", "1 while an opted-in Deployment's annotations or shape are invalid, or objects it needs belong to someone else (see its Warning events); it is left untouched.", &["namespace", "workload"], &m.rollout_invalid);
        r.register(
            "meshcanary_decisions",
            "Rollout decisions by kind (advance, halt, rollback, promote).",
            &["namespace", "workload", "kind"],
            &m.decisions,
        );
        r.register(
            "meshcanary_weight_applied_seconds",
            "Time from a decision to the weight written to the router and read back.",
            &[],
            &m.weight_applied,
        );
        r.register(
            "meshcanary_controller_tick_seconds",
            "Time of one decision tick of the leading controller: polling the agents, judging and reconciling every opted-in Deployment.",
            &[],
            &m.tick,
        );
        r.register(
            "meshcanary_controller_sooner_ticks",
            "Extra decision ticks a quarter interval after one where a rollback test had reached 1 % of its boundary (the anytime-valid tests pay nothing for the extra looks).",
            &[],
            &m.sooner_ticks,
        );
        r.register(
            "meshcanary_leader",
            "1 while this controller replica holds the Lease (and may write), else 0.",
            &[],
            &m.leader,
        );
        r.register("meshcanary_webhook_calls", "Calls of Canaries' webhooks by type (confirm-rollout, pre-rollout, rollout, confirm-traffic-increase, confirm-promotion, post-rollout, rollback, event) and result (ok, status: not HTTP 200-202, timeout, unreachable); each retry is a call.", &["kind", "result"], &m.webhook_calls);
        r.register("meshcanary_alerts", "Alerts sent to Canaries' AlertProviders by severity (info, warn, error) and result (ok; status, timeout, unreachable from the POST; not_found, invalid, api when the provider or its Secret could not be read).", &["severity", "result"], &m.alerts);
        r.register("meshcanary_controller_errors", "Kubernetes API operations of the controller that failed, by operation and reason; retried at the next tick.", &["operation", "reason"], &m.errors);
        m
    }
}
