//! The window stage's metrics: the windows' own gauges (refreshed from their summaries
//! before each encode), counter resets and the scrape-to-window latency.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{Summary, WindowKey};
use crate::telemetry::{
    set_some, GaugeF, LatencyQuantiles, MetricRegistry, QuantileLabels, QUANTILES,
};

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

#[derive(Clone, Debug)]
pub struct WindowMetrics {
    pub counter_resets: Family<WorkloadLabels, Counter>,
    scrape_to_window: LatencyQuantiles<QuantileLabels>,
    requests: Family<WorkloadLabels, Gauge>,
    rps: Family<WorkloadLabels, GaugeF>,
    success: Family<WorkloadLabels, GaugeF>,
    latency: Family<WorkloadQuantileLabels, GaugeF>,
    age: Family<WorkloadLabels, GaugeF>,
}

impl WindowMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let scrape_to_window = Family::<QuantileLabels, GaugeF>::default();
        let m = WindowMetrics {
            counter_resets: Family::default(),
            scrape_to_window: LatencyQuantiles::new(&scrape_to_window, |quantile| QuantileLabels {
                quantile,
            }),
            requests: Family::default(),
            rps: Family::default(),
            success: Family::default(),
            latency: Family::default(),
            age: Family::default(),
        };
        r.register("meshcanary_counter_resets", "Envoy counter resets seen (a sidecar restarted); counted as a restart, never as a negative rate.", &["namespace", "workload", "role"], &m.counter_resets);
        r.register("meshcanary_scrape_to_window_seconds", "Time from the start of a fast scrape to its window update, quantiles over the last one to two minutes.", &["quantile"], &scrape_to_window);
        r.register(
            "meshcanary_window_requests",
            "Inbound requests in the rolling window.",
            &["namespace", "workload", "role"],
            &m.requests,
        );
        r.register(
            "meshcanary_window_requests_per_second",
            "Inbound request rate over the rolling window.",
            &["namespace", "workload", "role"],
            &m.rps,
        );
        r.register(
            "meshcanary_window_success_ratio",
            "Share of non-5xx responses in the window (absent below the minimum request count).",
            &["namespace", "workload", "role"],
            &m.success,
        );
        r.register("meshcanary_window_latency_seconds", "Inbound latency quantiles over the window, from Envoy's histogram (absent below the minimum).", &["namespace", "workload", "role", "quantile"], &m.latency);
        r.register(
            "meshcanary_window_age_seconds",
            "Time since the window last received a scrape; large means stale data.",
            &["namespace", "workload", "role"],
            &m.age,
        );
        m
    }

    /// A fast scrape reached its window this long after it started.
    pub fn record_scrape_to_window(&self, d: Duration) {
        self.scrape_to_window.record(d);
    }

    /// Set the window gauges from `windows` (before an encode).
    pub fn refresh(&self, windows: &[(WindowKey, Summary)]) {
        self.scrape_to_window.refresh();
        self.requests.clear();
        self.rps.clear();
        self.success.clear();
        self.latency.clear();
        self.age.clear();
        for (key, s) in windows {
            let l = WorkloadLabels::from(key);
            self.requests.get_or_create(&l).set(s.requests as i64);
            set_some(&self.rps, &l, s.rps);
            set_some(&self.success, &l, s.success_rate);
            set_some(&self.age, &l, s.age_ms.map(|ms| ms as f64 / 1000.0));
            let values = [s.p50_ms, s.p90_ms, s.p99_ms];
            for ((_, q), v) in QUANTILES.into_iter().zip(values) {
                let ql = WorkloadQuantileLabels {
                    namespace: l.namespace.clone(),
                    workload: l.workload.clone(),
                    role: l.role,
                    quantile: q,
                };
                set_some(&self.latency, &ql, v.map(|ms| ms / 1000.0));
            }
        }
    }
}
