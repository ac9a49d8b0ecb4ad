//! Stage 2, scrape: fetch `/stats/prometheus` from Envoy admin endpoints.
//!
//! One keep-alive HTTP/1 client serves every target. Each fetch has a deadline and a body cap;
//! every way it can fail is a [`ScrapeError`] variant with a fixed `reason()` for metrics.
//! Two tiers share the client: `fast` asks Envoy to filter down to the inbound cluster's
//! request and latency stats (a few KB, every second, feeds decisions), `full` takes
//! everything (every 15 s, feeds remote write).

use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::telemetry::{GaugeF, LatencyQuantiles, MetricRegistry};

/// Which of the two scrape schedules a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Fast,
    Full,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Full => "full",
        }
    }
}

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

/// The scrape stage's metrics.
#[derive(Clone, Debug)]
pub struct ScrapeMetrics {
    pub scrapes: Family<TierLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub parse_errors: Family<ErrorLabels, Counter>,
    pub bytes: Family<TierLabels, Counter>,
    pub full_samples: Counter,
    /// Fast-tier scrapes that held no series of the sidecar's inbound cluster.
    pub no_inbound: Counter,
    fast_duration: LatencyQuantiles<TierQuantileLabels>,
    full_duration: LatencyQuantiles<TierQuantileLabels>,
}

impl ScrapeMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let duration = Family::<TierQuantileLabels, GaugeF>::default();
        let m = ScrapeMetrics {
            scrapes: Family::default(),
            errors: Family::default(),
            parse_errors: Family::default(),
            bytes: Family::default(),
            full_samples: Counter::default(),
            no_inbound: Counter::default(),
            fast_duration: LatencyQuantiles::new(&duration, |quantile| TierQuantileLabels {
                tier: "fast",
                quantile,
            }),
            full_duration: LatencyQuantiles::new(&duration, |quantile| TierQuantileLabels {
                tier: "full",
                quantile,
            }),
        };
        r.register(
            "meshcanary_scrapes",
            "Scrapes attempted, by tier (fast feeds decisions, full feeds remote write); a full scrape that also feeds the fast tier counts in both.",
            &["tier"],
            &m.scrapes,
        );
        r.register("meshcanary_scrape_errors", "Scrapes that produced no body, by tier and reason (connect, timeout, http_status, body_too_large, body_read, invalid_url).", &["tier", "reason"], &m.errors);
        r.register("meshcanary_scrape_no_inbound_cluster", "Fast-tier scrapes that succeeded but held no series of the sidecar's inbound cluster (Istio without the proxyStatsMatcher annotation, or a cluster regex that matches nothing): those sidecars give their windows no data. The agent logs a warning per sidecar naming the fix.", &[], &m.no_inbound);
        r.register("meshcanary_parse_errors", "Lines of Envoy output rejected by the parser, by tier and reason; the rest of the scrape is kept.", &["tier", "reason"], &m.parse_errors);
        r.register(
            "meshcanary_scraped_bytes",
            "Bytes of Envoy output read, by the tier of the request (a full body that also feeds the fast tier counts as full).",
            &["tier"],
            &m.bytes,
        );
        r.register(
            "meshcanary_full_scrape_samples",
            "Samples parsed from full-tier scrapes (the input of remote write).",
            &[],
            &m.full_samples,
        );
        r.register(
            "meshcanary_scrape_duration_seconds",
            "Scrape duration quantiles over the last one to two minutes (hdrhistogram), by tier.",
            &["tier", "quantile"],
            &duration,
        );
        m
    }

    pub fn record_duration(&self, tier: Tier, d: Duration) {
        match tier {
            Tier::Fast => self.fast_duration.record(d),
            Tier::Full => self.full_duration.record(d),
        }
    }

    /// Set the duration quantiles (before an encode).
    pub fn refresh(&self) {
        self.fast_duration.refresh();
        self.full_duration.refresh();
    }
}

/// Why a scrape produced no body.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("invalid admin URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("connecting to {uri}: {source}")]
    Connect {
        uri: Uri,
        #[source]
        source: Box<hyper_util::client::legacy::Error>,
    },
    #[error("no complete answer from {uri} within {timeout:?}")]
    Timeout { uri: Uri, timeout: Duration },
    #[error("{uri} answered HTTP {status}")]
    Status { uri: Uri, status: StatusCode },
    #[error("body from {uri} is larger than the {limit}-byte cap (raise --max-body-bytes)")]
    BodyTooLarge { uri: Uri, limit: usize },
    #[error("reading the body from {uri}: {message}")]
    Body { uri: Uri, message: String },
    #[error("{uri} sent {samples} or more samples, over the {limit}-sample limit (a sidecar with runaway series; raise --sample-limit if it is real)")]
    SampleLimit {
        uri: Uri,
        samples: usize,
        limit: usize,
    },
}

/// Count the sample lines of a body (not comments, not blank), stopping once past
/// `limit`: a scrape over the limit is refused before any parsing (Prometheus'
/// `sample_limit`), so a runaway sidecar costs one pass over its bytes. `None` when the
/// body is within the limit, else the count it stopped at.
pub fn over_sample_limit(body: &[u8], limit: usize) -> Option<usize> {
    let mut samples = 0usize;
    let mut start = 0;
    // memchr finds the line ends a vector at a time; a byte-at-a-time split was a third
    // of the full tier's encoding time.
    for end in memchr::memchr_iter(b'\n', body).chain([body.len()]) {
        let line = &body[start..end];
        start = end + 1;
        match line.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) if line[i] != b'#' => {
                samples += 1;
                if samples > limit {
                    return Some(samples);
                }
            }
            _ => {}
        }
    }
    None
}

impl ScrapeError {
    /// A fixed, bounded name for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::InvalidUrl { .. } => "invalid_url",
            ScrapeError::Connect { .. } => "connect",
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::Status { .. } => "http_status",
            ScrapeError::BodyTooLarge { .. } => "body_too_large",
            ScrapeError::Body { .. } => "body_read",
            ScrapeError::SampleLimit { .. } => "sample_limit",
        }
    }
}

/// The two URLs scraped for one Envoy admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminUrls {
    pub fast: Uri,
    pub full: Uri,
}

impl AdminUrls {
    /// Build the tier URLs from an admin base URL such as `http://10.1.2.3:9901` and the
    /// fast tier's Envoy stats filter (an RE2 regex on dotted stat names).
    ///
    /// ### Errors
    /// `InvalidUrl` when `base` is not an absolute `http://host:port` URL.
    pub fn new(base: &str, fast_filter: &str) -> Result<Self, ScrapeError> {
        let invalid = |reason: &str| ScrapeError::InvalidUrl {
            url: base.to_owned(),
            reason: reason.to_owned(),
        };
        let base = base.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(invalid("expected http://host:port"));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(invalid("give the admin base URL only, without a path"));
        }
        let parse = |s: String| s.parse::<Uri>().map_err(|e| invalid(&e.to_string()));
        Ok(AdminUrls {
            fast: parse(format!(
                "{base}/stats/prometheus?usedonly&filter={}",
                percent_encode(fast_filter)
            ))?,
            full: parse(format!("{base}/stats/prometheus"))?,
        })
    }

    pub fn for_tier(&self, tier: Tier) -> &Uri {
        match tier {
            Tier::Fast => &self.fast,
            Tier::Full => &self.full,
        }
    }
}

/// Envoy's filter for the fast tier, derived from the inbound cluster regex so the two cannot
/// disagree: the per-code request counters and the request-time histogram of matching
/// clusters, and their membership gauge (present while idle, so a cluster missing from the
/// stats can be told from one without traffic). A cluster regex anchored with `^` stays
/// anchored after `cluster.`.
pub fn fast_filter(cluster_regex: &str) -> String {
    let cluster = match cluster_regex.strip_prefix('^') {
        Some(rest) => format!("^cluster\\.{rest}"),
        None => format!("^cluster\\..*{cluster_regex}"),
    };
    format!("{cluster}.*\\.(upstream_rq_([0-9][0-9][0-9]|time)|membership_total)$")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Shared HTTP client for all targets.
/// The most a connection's read buffer grows to. hyper's default (about 400 KB) grows it
/// to fit a big body's reads and keeps it while the connection idles in the pool: with
/// thirty sidecars of 160 KB bodies the agent's peak RSS was 30-34 MiB, 25 MiB with this
/// cap (`scripts/bench-peers.sh` setup). The body is copied out of the buffer anyway, and
/// the extra reads did not show in the agent's CPU.
pub const READ_BUF_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    max_body_bytes: usize,
}

impl Scraper {
    pub fn new(max_body_bytes: usize, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(2)
            .http1_max_buf_size(READ_BUF_BYTES)
            .build(connector);
        Scraper {
            client,
            max_body_bytes,
        }
    }

    /// GET `uri` and return its body, within `timeout` for the whole exchange.
    ///
    /// ### Errors
    /// A `ScrapeError` naming the URI and what went wrong; the caller marks the target down.
    pub async fn fetch(&self, uri: &Uri, timeout: Duration) -> Result<Bytes, ScrapeError> {
        self.fetch_up_to(uri, timeout, self.max_body_bytes).await
    }

    /// [`Scraper::fetch`] with a smaller body cap than the scraper's (the fast tier's).
    ///
    /// The body is read into one buffer sized from `Content-Length` (never beyond `limit`),
    /// so a large answer costs its size once, not again in a copy.
    ///
    /// ### Errors
    /// As [`Scraper::fetch`].
    pub async fn fetch_up_to(
        &self,
        uri: &Uri,
        timeout: Duration,
        limit: usize,
    ) -> Result<Bytes, ScrapeError> {
        let limit = limit.min(self.max_body_bytes);
        let exchange = async {
            let resp =
                self.client
                    .get(uri.clone())
                    .await
                    .map_err(|source| ScrapeError::Connect {
                        uri: uri.clone(),
                        source: Box::new(source),
                    })?;
            if !resp.status().is_success() {
                return Err(ScrapeError::Status {
                    uri: uri.clone(),
                    status: resp.status(),
                });
            }
            let too_large = || ScrapeError::BodyTooLarge {
                uri: uri.clone(),
                limit,
            };
            let declared = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let mut body = resp.into_body();
            let mut out = Vec::with_capacity(declared.unwrap_or(64 * 1024).min(limit));
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ScrapeError::Body {
                    uri: uri.clone(),
                    message: e.to_string(),
                })?;
                if let Some(data) = frame.data_ref() {
                    if out.len() + data.len() > limit {
                        return Err(too_large());
                    }
                    out.extend_from_slice(data);
                }
            }
            Ok(Bytes::from(out))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ScrapeError::Timeout {
                    uri: uri.clone(),
                    timeout,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::over_sample_limit;

    #[test]
    fn the_sample_limit_counts_samples_not_comments_or_blank_lines() {
        let body = b"# TYPE a counter\na 1\n\n  # HELP b x\nb{x=\"1\"} 2\nc 3";
        assert_eq!(over_sample_limit(body, 3), None);
        assert_eq!(over_sample_limit(body, 2), Some(3));
        assert_eq!(over_sample_limit(b"", 0), None);
        let many = "x 1\n".repeat(1000);
        assert_eq!(
            over_sample_limit(many.as_bytes(), 10),
            Some(11),
            "stops early"
        );
    }

    use super::*;

    #[test]
    fn tier_urls() {
        let urls = AdminUrls::new("http://127.0.0.1:9901/", "^a|b$").unwrap();
        assert_eq!(
            urls.full.to_string(),
            "http://127.0.0.1:9901/stats/prometheus"
        );
        assert_eq!(
            urls.fast.to_string(),
            "http://127.0.0.1:9901/stats/prometheus?usedonly&filter=%5Ea%7Cb%24"
        );
        for bad in [
            "127.0.0.1:9901",
            "https://x:1",
            "http://x:1/stats",
            "not a url",
        ] {
            assert!(
                matches!(
                    AdminUrls::new(bad, "x"),
                    Err(ScrapeError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn fast_filter_follows_the_cluster_regex() {
        let f = fast_filter("^cds_ingress_");
        let re = regex::Regex::new(&f).unwrap();
        assert!(re.is_match("cluster.cds_ingress_m_app_http_9898.upstream_rq_503"));
        assert!(re.is_match("cluster.cds_ingress_m_app_http_9898.upstream_rq_time"));
        assert!(re.is_match("cluster.cds_ingress_m_app_http_9898.membership_total"));
        assert!(!re.is_match("cluster.cds_ingress_m_app_http_9898.upstream_rq_total"));
        assert!(!re.is_match("cluster.cds_ingress_m_app_http_9898.membership_healthy"));
        assert!(!re.is_match("cluster.cds_egress_m_db_http_1.upstream_rq_200"));
        let istio = regex::Regex::new(&fast_filter(crate::discover::ISTIO_INBOUND)).unwrap();
        assert!(istio.is_match("cluster.inbound|9080||.upstream_rq_200"));
        assert!(!istio.is_match("cluster.outbound|80||web.test.svc.cluster.local.upstream_rq_200"));
    }
}
