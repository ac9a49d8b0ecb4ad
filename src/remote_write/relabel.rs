//! What is written: full-tier samples after drop rules, with the target labels the reference
//! collector adds, so existing dashboards and Flagger-style queries keep working.
//!
//! Drop rules are anchored regexes, as Prometheus' relabeling anchors them. The defaults are
//! the reference setup's drops for high-cardinality Envoy stats. Envoy writes its labels with
//! an `envoy_` prefix (`envoy_cluster_name`), while the reference configuration names them
//! without it (`cluster_name`), so each label rule matches both spellings.

use regex::Regex;

use super::proto::{Label, Sample, TimeSeries};
use crate::parse::{LineError, Parser};

/// Metric-name patterns dropped by default (the reference setup's).
pub const DEFAULT_DROP_NAMES: &[&str] = &[
    "envoy_tls.*",
    "envoy_tcp_downstream.*",
    "envoy_http_(stats|admin).*",
    "envoy_cluster_(lb|retry|bind|internal|max|original).*",
];
/// Labels whose value drops the series when it matches [`DEFAULT_DROP_VALUES`].
pub const DEFAULT_DROP_VALUE_LABELS: &[&str] = &["cluster_name", "tcp_prefix"];
pub const DEFAULT_DROP_VALUES: &str = "(outbound|inbound|prometheus_stats).*";
/// Labels whose mere presence drops the series.
pub const DEFAULT_DROP_IF_PRESENT: &[&str] = &[
    "listener_address",
    "http_conn_manager_listener_prefix",
    "http_conn_manager_prefix",
];

/// Compiled drop rules.
#[derive(Clone, Debug)]
pub struct DropRules {
    names: Option<Regex>,
    value_labels: Vec<String>,
    values: Option<Regex>,
    if_present: Vec<String>,
}

fn anchored(patterns: &[String]) -> Result<Option<Regex>, String> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let joined = patterns
        .iter()
        .map(|p| format!("(?:{p})"))
        .collect::<Vec<_>>()
        .join("|");
    Regex::new(&format!("^(?:{joined})$"))
        .map(Some)
        .map_err(|e| format!("invalid drop regex: {e}"))
}

/// `name` and its `envoy_`-prefixed spelling.
fn both_spellings(names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| {
            [
                n.clone(),
                format!("envoy_{}", n.trim_start_matches("envoy_")),
            ]
        })
        .collect()
}

impl DropRules {
    /// ### Errors
    /// A message naming the regex that does not compile.
    pub fn new(
        names: &[String],
        value_labels: &[String],
        values: &[String],
        if_present: &[String],
    ) -> Result<Self, String> {
        Ok(DropRules {
            names: anchored(names)?,
            value_labels: both_spellings(value_labels),
            values: anchored(values)?,
            if_present: both_spellings(if_present),
        })
    }

    /// The reference setup's drops.
    pub fn reference() -> Self {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        DropRules::new(
            &own(DEFAULT_DROP_NAMES),
            &own(DEFAULT_DROP_VALUE_LABELS),
            &[DEFAULT_DROP_VALUES.to_owned()],
            &own(DEFAULT_DROP_IF_PRESENT),
        )
        .expect("the default patterns compile")
    }

    /// Keep nothing out (for tests and for users who drop upstream).
    pub fn none() -> Self {
        DropRules {
            names: None,
            value_labels: vec![],
            values: None,
            if_present: vec![],
        }
    }

    pub(crate) fn drops_name(&self, name: &str) -> bool {
        self.names.as_ref().is_some_and(|re| re.is_match(name))
    }

    pub(crate) fn drops_label(&self, name: &str, value: &str) -> bool {
        self.if_present.iter().any(|l| l == name)
            || (self.value_labels.iter().any(|l| l == name)
                && self.values.as_ref().is_some_and(|re| re.is_match(value)))
    }
}

/// Counts from converting one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Converted {
    pub kept: usize,
    pub dropped: usize,
    pub rejected_lines: usize,
}

/// The reference conversion (owned `TimeSeries`, one allocation per label), kept for tests
/// and as the benchmark baseline; the agent uses [`super::encode::Encoder`], which writes
/// the same series without building them.
///
/// Convert a full-tier body into time series with one sample each at `timestamp_ms`:
/// drop rules applied, target labels added (a scraped label that clashes with a target label
/// is kept as `exported_<name>`, as Prometheus does), labels sorted, empty values left out.
pub fn convert(
    body: &[u8],
    target_labels: &[(String, String)],
    drop: &DropRules,
    timestamp_ms: i64,
    out: &mut Vec<TimeSeries>,
    mut on_error: impl FnMut(&LineError),
) -> Converted {
    let mut counts = Converted::default();
    'samples: for result in Parser::new(body) {
        let sample = match result {
            Ok(s) => s,
            Err(e) => {
                counts.rejected_lines += 1;
                on_error(&e);
                continue;
            }
        };
        if drop.drops_name(sample.name) {
            counts.dropped += 1;
            continue;
        }
        let mut labels = Vec::with_capacity(target_labels.len() + 4);
        labels.push(Label {
            name: "__name__".into(),
            value: sample.name.to_owned(),
        });
        for l in sample.labels.iter() {
            let value = l.value();
            if drop.drops_label(l.name, &value) {
                counts.dropped += 1;
                continue 'samples;
            }
            if value.is_empty() {
                continue;
            }
            let name = if target_labels.iter().any(|(t, _)| t == l.name) {
                format!("exported_{}", l.name)
            } else {
                l.name.to_owned()
            };
            labels.push(Label {
                name,
                value: value.into_owned(),
            });
        }
        for (name, value) in target_labels {
            if !value.is_empty() {
                labels.push(Label {
                    name: name.clone(),
                    value: value.clone(),
                });
            }
        }
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        labels.dedup_by(|a, b| a.name == b.name);
        out.push(TimeSeries {
            labels,
            samples: vec![Sample {
                value: sample.value,
                timestamp: sample.timestamp_ms.unwrap_or(timestamp_ms),
            }],
        });
        counts.kept += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(series: &[TimeSeries]) -> Vec<String> {
        series
            .iter()
            .map(|s| {
                s.labels
                    .iter()
                    .find(|l| l.name == "__name__")
                    .unwrap()
                    .value
                    .clone()
            })
            .collect()
    }

    #[test]
    fn reference_drops_and_target_labels() {
        let body = b"envoy_tls_handshake 1\n\
envoy_cluster_lb_healthy_panic{envoy_cluster_name=\"a\"} 2\n\
envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"cds_ingress_m_a_http_1\"} 3\n\
envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"outbound|80||x\"} 4\n\
envoy_listener_downstream_cx_total{envoy_listener_address=\"0.0.0.0_15000\"} 5\n\
envoy_server_live{job=\"mine\",empty=\"\"} 1\n";
        let target = vec![
            ("job".to_owned(), "appmesh-envoy".to_owned()),
            ("kubernetes_namespace".to_owned(), "test".to_owned()),
            ("kubernetes_pod_name".to_owned(), "podinfo-abc".to_owned()),
        ];
        let mut out = Vec::new();
        let c = convert(
            body,
            &target,
            &DropRules::reference(),
            1000,
            &mut out,
            |_| {},
        );
        assert_eq!(
            c,
            Converted {
                kept: 2,
                dropped: 4,
                rejected_lines: 0
            }
        );
        assert_eq!(
            names(&out),
            vec!["envoy_cluster_upstream_rq", "envoy_server_live"]
        );
        let live = &out[1];
        let label_names: Vec<&str> = live.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            label_names,
            vec![
                "__name__",
                "exported_job",
                "job",
                "kubernetes_namespace",
                "kubernetes_pod_name"
            ]
        );
        assert_eq!(
            live.samples[0],
            Sample {
                value: 1.0,
                timestamp: 1000
            }
        );
    }

    #[test]
    fn drop_patterns_are_anchored() {
        let rules = DropRules::new(&["envoy_tls".into()], &[], &[], &[]).unwrap();
        assert!(rules.drops_name("envoy_tls"));
        assert!(
            !rules.drops_name("envoy_tls_handshake"),
            "anchored: no partial matches"
        );
        assert!(DropRules::new(&["(".into()], &[], &[], &[]).is_err());
    }
}
