//! From one scrape of one sidecar to the increments since its previous scrape.
//!
//! [`InboundSnapshot::extract`] reads the cumulative counters of the inbound cluster(s) out of
//! parsed samples; [`PodCounters::advance`] turns consecutive snapshots into a [`Delta`].
//!
//! Envoy facts this encodes (measured on 1.40):
//! - requests per code are `envoy_cluster_upstream_rq{envoy_response_code, envoy_cluster_name}`
//!   with Envoy's default tags, `{response_code, cluster_name}` with Istio's (its bootstrap
//!   turns the defaults off and names its own tags): [`InboundLabels`];
//!   the `external_`/`internal_`/`retry_` variants are other metric names and are ignored, so
//!   nothing is counted twice;
//! - a per-code series appears with the first response of that code, so after the first scrape
//!   of a pod a series that was absent counts from zero;
//! - counters reset when Envoy restarts: any decrease means a restart and the new values are
//!   the whole increase (as PromQL's `rate` treats it), never a negative rate;
//! - histograms only move at each stats flush, so an unchanged histogram is "no new latency
//!   data", carried as `None`, not as zero requests.

use crate::parse::Sample;
use regex::Regex;

/// Requests by response code, read from `envoy_cluster_upstream_rq`.
pub const REQUESTS_METRIC: &str = "envoy_cluster_upstream_rq";
/// The inbound latency histogram, in milliseconds.
pub const LATENCY_METRIC: &str = "envoy_cluster_upstream_rq_time";
pub const LATENCY_BUCKET: &str = "envoy_cluster_upstream_rq_time_bucket";
/// A gauge every cluster in the stats has, traffic or not: read only to tell "the
/// inbound cluster is in the stats, idle" from "it is not in the stats at all".
pub const MEMBERSHIP_METRIC: &str = "envoy_cluster_membership_total";

/// The label names a data plane gives a cluster and a response code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundLabels {
    pub cluster: &'static str,
    pub code: &'static str,
    /// The cluster's tag in the sidecar's DogStatsD lines (Envoy writes its tags with dots).
    pub statsd_cluster: &'static str,
}

impl InboundLabels {
    /// Envoy's default tags (App Mesh, a plain Envoy).
    pub const ENVOY: InboundLabels = InboundLabels {
        cluster: "envoy_cluster_name",
        code: "envoy_response_code",
        statsd_cluster: "envoy.cluster_name",
    };
    /// Istio's bootstrap tags.
    pub const ISTIO: InboundLabels = InboundLabels {
        cluster: "cluster_name",
        code: "response_code",
        statsd_cluster: "cluster_name",
    };
}

/// Which clusters are a sidecar's inbound ones, and how its stats label them.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub cluster: Regex,
    pub labels: InboundLabels,
}

impl Inbound {
    /// Envoy's default labels and `cluster`.
    pub fn envoy(cluster: Regex) -> Inbound {
        Inbound {
            cluster,
            labels: InboundLabels::ENVOY,
        }
    }
}

/// Envoy's default histogram bucket upper bounds, in ms (its `+Inf` bucket is implied).
pub const ENVOY_EDGES_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Most histogram buckets read (Envoy's default has 20): a sidecar sending more is not
/// read for latency rather than costing memory and time per bucket.
pub const MAX_EDGES: usize = 64;

/// Cumulative counters of a pod's inbound cluster(s) at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InboundSnapshot {
    /// (HTTP status, cumulative count), sorted by status, summed over matching clusters.
    pub requests_by_code: Vec<(u16, u64)>,
    /// Finite bucket upper bounds in milliseconds, ascending (the `+Inf` bucket is implied).
    pub edges_ms: Vec<f64>,
    /// Cumulative bucket counts; `edges_ms.len() + 1` entries, the last one being `+Inf`.
    pub cumulative: Vec<u64>,
    /// Whether any inbound cluster is in the stats at all (idle or not).
    pub matched: bool,
}

impl InboundSnapshot {
    /// Collect the inbound counters from `samples`, keeping clusters whose name matches
    /// `inbound`. Samples with other names cost one string comparison.
    pub fn extract<'a>(samples: impl IntoIterator<Item = Sample<'a>>, inbound: &Inbound) -> Self {
        let (cluster, labels) = (&inbound.cluster, inbound.labels);
        let mut snap = InboundSnapshot::default();
        let mut last_cluster: Option<(&str, bool)> = None;
        for s in samples {
            let is_requests = s.name == REQUESTS_METRIC;
            let is_membership = s.name == MEMBERSHIP_METRIC;
            if !is_requests && !is_membership && s.name != LATENCY_BUCKET {
                continue;
            }
            let Some(name) = s.labels.get(labels.cluster) else {
                continue;
            };
            // Envoy writes a cluster's series together: cache the last regex verdict.
            let keep = match last_cluster {
                Some((n, keep)) if n == name.raw_value => keep,
                _ => {
                    let keep = cluster.is_match(&name.value());
                    last_cluster = Some((name.raw_value, keep));
                    keep
                }
            };
            if !keep || !s.value.is_finite() || s.value < 0.0 {
                continue;
            }
            snap.matched = true;
            if is_membership {
                continue;
            }
            // Saturating: an outside number, which `as` already clamps to u64::MAX.
            let count = s.value as u64;
            if is_requests {
                // HTTP status codes only: at most 500 distinct entries whatever is sent.
                let Some(code) = s
                    .labels
                    .get(labels.code)
                    .and_then(|c| c.raw_value.parse::<u16>().ok())
                    .filter(|c| (100..600).contains(c))
                else {
                    continue;
                };
                match snap
                    .requests_by_code
                    .binary_search_by_key(&code, |&(c, _)| c)
                {
                    Ok(i) => {
                        let n = &mut snap.requests_by_code[i].1;
                        *n = n.saturating_add(count);
                    }
                    Err(i) => snap.requests_by_code.insert(i, (code, count)),
                }
            } else if let Some(le) = s.labels.get("le") {
                snap.add_bucket(le.raw_value, count);
            }
        }
        snap
    }

    fn add_bucket(&mut self, le: &str, count: u64) {
        if le == "+Inf" {
            match self.cumulative.get_mut(self.edges_ms.len()) {
                Some(c) => *c = c.saturating_add(count),
                None => self.cumulative.push(count),
            }
            return;
        }
        let Ok(edge) = le.parse::<f64>() else { return };
        if !edge.is_finite() {
            return;
        }
        // Buckets of several matching clusters arrive cluster by cluster with the same
        // edges, ascending: a new edge goes last, a known one is found by bisection.
        let open = self.cumulative.len() == self.edges_ms.len();
        let next = self.edges_ms.last().is_none_or(|&last| edge > last);
        if open && next {
            if self.edges_ms.len() < MAX_EDGES {
                self.edges_ms.push(edge);
                self.cumulative.push(count);
            } else {
                // Too many buckets: spoil the shape so that latency_count() is None.
                self.cumulative.extend([0, 0]);
            }
        } else if let Ok(i) = self.edges_ms.binary_search_by(|e| e.total_cmp(&edge)) {
            if let Some(c) = self.cumulative.get_mut(i) {
                *c = c.saturating_add(count);
            }
        }
        // Otherwise an edge after +Inf, or out of order: not a histogram we can read.
    }

    pub fn total_requests(&self) -> u64 {
        crate::window::saturating_sum(self.requests_by_code.iter().map(|(_, n)| n))
    }

    /// Total latency observations (the `+Inf` bucket), if the histogram is complete.
    pub fn latency_count(&self) -> Option<u64> {
        (self.cumulative.len() == self.edges_ms.len() + 1 && !self.edges_ms.is_empty())
            .then(|| self.cumulative[self.edges_ms.len()])
    }
}

/// What happened on one pod between two scrapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// Per-bucket (not cumulative) latency counts, `None` when the histogram did not move.
    pub latency: Option<Vec<u64>>,
    /// Bucket upper bounds in ms for `latency`.
    pub edges_ms: Vec<f64>,
    /// True when the counters went down: Envoy restarted between the two scrapes.
    pub reset: bool,
    /// Start of the interval this delta covers (the previous scrape), unix ms.
    pub since_ms: u64,
}

/// The previous snapshot of one pod, to difference against.
#[derive(Debug, Default)]
pub struct PodCounters {
    prev: Option<(InboundSnapshot, u64)>,
}

impl PodCounters {
    /// Fold in the snapshot taken at `now_ms`. The first snapshot of a pod only sets the
    /// baseline (its totals are history, not a burst of traffic) and returns `None`.
    pub fn advance(&mut self, snap: InboundSnapshot, now_ms: u64) -> Option<Delta> {
        let Some((prev, prev_ms)) = self.prev.take() else {
            self.prev = Some((snap, now_ms));
            return None;
        };
        let reset = went_down(&prev, &snap);
        let base = |code: u16| -> u64 {
            if reset {
                return 0;
            }
            prev.requests_by_code
                .binary_search_by_key(&code, |&(c, _)| c)
                .map_or(0, |i| prev.requests_by_code[i].1)
        };
        let mut delta = Delta {
            reset,
            since_ms: prev_ms,
            ..Delta::default()
        };
        for &(code, n) in &snap.requests_by_code {
            let d = n.saturating_sub(base(code));
            delta.requests = delta.requests.saturating_add(d);
            if (500..600).contains(&code) {
                delta.errors = delta.errors.saturating_add(d);
            }
        }
        delta.latency = latency_delta(&prev, &snap, reset);
        if delta.latency.is_some() {
            delta.edges_ms.clone_from(&snap.edges_ms);
        }
        self.prev = Some((snap, now_ms));
        Some(delta)
    }
}

/// Whether any counter decreased, or a series disappeared (a restart with `usedonly`).
fn went_down(prev: &InboundSnapshot, now: &InboundSnapshot) -> bool {
    let code_down = prev.requests_by_code.iter().any(|&(code, old)| {
        match now
            .requests_by_code
            .binary_search_by_key(&code, |&(c, _)| c)
        {
            Ok(i) => now.requests_by_code[i].1 < old,
            Err(_) => old > 0,
        }
    });
    let hist_down = match (prev.latency_count(), now.latency_count()) {
        (Some(old), Some(new)) => new < old,
        (Some(old), None) => old > 0,
        _ => false,
    };
    code_down || hist_down
}

fn latency_delta(prev: &InboundSnapshot, now: &InboundSnapshot, reset: bool) -> Option<Vec<u64>> {
    let new_count = now.latency_count()?;
    let same_edges = prev.edges_ms == now.edges_ms && prev.latency_count().is_some();
    let base: Vec<u64> = if reset || !same_edges {
        if !reset && prev.latency_count().is_some() {
            // Bucket layout changed under us (Envoy reconfigured): start over from here.
            return None;
        }
        vec![0; now.cumulative.len()]
    } else {
        if new_count == prev.latency_count().unwrap_or(0) {
            return None; // no stats flush since the previous scrape
        }
        prev.cumulative.clone()
    };
    let mut out = Vec::with_capacity(now.cumulative.len());
    let mut below = 0u64;
    for (i, &cum) in now.cumulative.iter().enumerate() {
        let d = cum.saturating_sub(base[i]);
        out.push(d.saturating_sub(below));
        below = below.max(d);
    }
    (out.iter().any(|&n| n > 0)).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::Parser;

    const EDGES: &[&str] = &[
        "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000",
    ];

    /// Render Envoy-shaped text for one inbound cluster.
    pub(crate) fn envoy_text(
        cluster: &str,
        codes: &[(u16, u64)],
        buckets: Option<&[u64]>,
    ) -> String {
        let mut s = String::from("# TYPE envoy_cluster_upstream_rq counter\n");
        for (code, n) in codes {
            s += &format!("envoy_cluster_upstream_rq{{envoy_response_code=\"{code}\",envoy_cluster_name=\"{cluster}\"}} {n}\n");
            s += &format!("envoy_cluster_external_upstream_rq{{envoy_response_code=\"{code}\",envoy_cluster_name=\"{cluster}\"}} {n}\n");
        }
        if let Some(b) = buckets {
            s += "# TYPE envoy_cluster_upstream_rq_time histogram\n";
            for (le, n) in EDGES.iter().chain(&["+Inf"]).zip(b) {
                s += &format!("envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{cluster}\",le=\"{le}\"}} {n}\n");
            }
            s += &format!(
                "envoy_cluster_upstream_rq_time_count{{envoy_cluster_name=\"{cluster}\"}} {}\n",
                b.last().unwrap()
            );
        }
        s
    }

    fn snap(text: &str) -> InboundSnapshot {
        let re = Regex::new("^cds_ingress_").unwrap();
        InboundSnapshot::extract(
            Parser::from_text(text).filter_map(Result::ok),
            &Inbound::envoy(re),
        )
    }

    const IN: &str = "cds_ingress_mesh_app_http_9898";

    #[test]
    fn istio_labels_are_read_with_istios_names() {
        // What an Istio sidecar's :15090 shows once proxyStatsMatcher includes the inbound
        // cluster (Istio's bootstrap tags; no envoy_ prefix).
        let text = "envoy_cluster_upstream_rq{response_code=\"200\",cluster_name=\"inbound|9898||\"} 7\n\
envoy_cluster_upstream_rq{response_code=\"503\",cluster_name=\"inbound|9898||\"} 2\n\
envoy_cluster_upstream_rq{response_code=\"200\",cluster_name=\"outbound|80||web.test.svc.cluster.local\"} 50\n\
envoy_cluster_upstream_rq_time_bucket{cluster_name=\"inbound|9898||\",le=\"5\"} 6\n\
envoy_cluster_upstream_rq_time_bucket{cluster_name=\"inbound|9898||\",le=\"+Inf\"} 9\n";
        let istio = Inbound {
            cluster: Regex::new(r"^inbound\|[0-9]+\|\|").unwrap(),
            labels: InboundLabels::ISTIO,
        };
        let s = InboundSnapshot::extract(Parser::from_text(text).filter_map(Result::ok), &istio);
        assert!(s.matched);
        assert_eq!(s.requests_by_code, vec![(200, 7), (503, 2)]);
        assert_eq!(
            (s.edges_ms.clone(), s.cumulative.clone()),
            (vec![5.0], vec![6, 9])
        );
        // Read with Envoy's default names, the same text has no inbound cluster at all.
        assert!(!snap(text).matched);
        // An idle inbound cluster is in the stats (its membership gauge), with no counts.
        let idle = "envoy_cluster_membership_total{cluster_name=\"inbound|9898||\"} 1\n";
        let s = InboundSnapshot::extract(Parser::from_text(idle).filter_map(Result::ok), &istio);
        assert!(s.matched && s.requests_by_code.is_empty() && s.cumulative.is_empty());
    }

    #[test]
    fn extract_sums_codes_and_ignores_variants_and_other_clusters() {
        let mut text = envoy_text(IN, &[(200, 90), (503, 10)], None);
        text += &envoy_text("cds_egress_mesh_db_http_5432", &[(200, 1000)], None);
        let s = snap(&text);
        assert_eq!(s.requests_by_code, vec![(200, 90), (503, 10)]);
        assert_eq!(
            s.total_requests(),
            100,
            "external_ variants are not counted"
        );
        assert!(s.matched);
        assert!(!snap(&envoy_text("other", &[(200, 1)], None)).matched);
    }

    #[test]
    fn first_scrape_is_a_baseline_then_deltas() {
        let mut pod = PodCounters::default();
        assert_eq!(
            pod.advance(snap(&envoy_text(IN, &[(200, 1000)], None)), 1_000),
            None
        );
        let d = pod
            .advance(
                snap(&envoy_text(IN, &[(200, 1090), (503, 10)], None)),
                2_000,
            )
            .unwrap();
        assert_eq!(
            (d.requests, d.errors, d.reset, d.since_ms),
            (100, 10, false, 1_000)
        );
        assert_eq!(d.latency, None);
    }

    #[test]
    fn a_restart_is_never_a_negative_rate_or_a_spike() {
        let mut pod = PodCounters::default();
        pod.advance(snap(&envoy_text(IN, &[(200, 5000), (500, 7)], None)), 0);
        // Envoy restarted: 12 requests since, the 500 series not seen yet.
        let d = pod
            .advance(snap(&envoy_text(IN, &[(200, 12)], None)), 1_000)
            .unwrap();
        assert!(d.reset);
        assert_eq!((d.requests, d.errors), (12, 0));
        let d = pod
            .advance(snap(&envoy_text(IN, &[(200, 20)], None)), 2_000)
            .unwrap();
        assert_eq!((d.requests, d.reset), (8, false));
    }

    #[test]
    fn a_hostile_histogram_or_code_set_costs_bounded_work_and_is_not_read() {
        // Thousands of buckets: no latency, in linear time.
        let mut text = String::new();
        for i in 0..5000 {
            text.push_str(&format!(
                "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"cds_ingress_m_v_http_9898\",le=\"{i}\"}} {i}\n"
            ));
        }
        text.push_str("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"cds_ingress_m_v_http_9898\",le=\"+Inf\"} 9\n");
        // Codes that are not HTTP statuses, and counts that overflow when summed.
        for code in [0u32, 42, 600, 9999, 65535] {
            text.push_str(&format!(
                "envoy_cluster_upstream_rq{{envoy_cluster_name=\"cds_ingress_m_v_http_9898\",envoy_response_code=\"{code}\"}} 5\n"
            ));
        }
        for _ in 0..2 {
            text.push_str("envoy_cluster_upstream_rq{envoy_cluster_name=\"cds_ingress_m_v_http_9898\",envoy_response_code=\"200\"} 1.8e19\n");
        }
        let s = snap(&text);
        assert_eq!(s.edges_ms.len(), MAX_EDGES);
        assert_eq!(s.latency_count(), None);
        assert_eq!(s.requests_by_code, vec![(200, u64::MAX)]);
    }

    #[test]
    fn histogram_deltas_only_when_the_histogram_moved() {
        let mut pod = PodCounters::default();
        let b1 = [0, 10, 20, 20, 20, 20, 20, 20, 20, 20, 20];
        pod.advance(snap(&envoy_text(IN, &[(200, 20)], Some(&b1))), 0);
        // Counters moved, histogram not flushed yet: no latency data, not zero latency.
        let d = pod
            .advance(snap(&envoy_text(IN, &[(200, 25)], Some(&b1))), 1_000)
            .unwrap();
        assert_eq!(d.latency, None);
        let b2 = [0, 10, 22, 22, 22, 22, 22, 25, 25, 25, 25];
        let d = pod
            .advance(snap(&envoy_text(IN, &[(200, 25)], Some(&b2))), 2_000)
            .unwrap();
        assert_eq!(d.latency, Some(vec![0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0]));
        assert_eq!(d.edges_ms.len(), 10);
    }
}
