//! Telemetry: the process's metric registry, `/metrics`, `/healthz`, `/readyz`, and the
//! HTTP server every port of the process shares.
//!
//! A leaf: it imports no stage. Each stage defines its own metric set (`ScrapeMetrics`,
//! `WindowMetrics`, `JudgeMetrics`, `ControllerMetrics`, ...) and registers it into a
//! [`MetricRegistry`] through [`MetricRegistry::register`], which also records the metric's
//! documentation (name, type, labels, help), so the reference table is generated from the same
//! call that registers the metric and a test fails if the two drift. The app wiring builds one
//! registry per process (agent or controller) and refreshes the state-derived gauges of its
//! sets before each encode. Labels are bounded: tiers, fixed error reasons, and workloads.
//!
//! Latencies a process measures itself (scrape duration, scrape-to-window, POST duration) go
//! through [`RollingLatency`] (hdrhistogram over a rolling minute) and are exported as
//! quantile gauges, refreshed at each `/metrics` render.

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

/// Quantiles exported for latency gauges.
pub const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99")];

/// A gauge holding a float.
pub type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuantileLabels {
    pub quantile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: &'static str,
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

/// One process's metrics: every stage registers its set here, with its documentation.
pub struct MetricRegistry {
    registry: Registry,
    docs: Vec<MetricDoc>,
}

impl MetricRegistry {
    /// A registry holding `meshcanary_build_info`.
    pub fn new() -> Self {
        let mut r = MetricRegistry {
            registry: Registry::default(),
            docs: Vec::new(),
        };
        let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register(
            "meshcanary_build_info",
            "Always 1; the version label says which build runs.",
            &["version"],
            &build_info,
        );
        r
    }

    /// Register `metric` (a clone shares its state) under `name`, documented by `help` and
    /// `labels` (the label names its label set encodes, in order).
    pub fn register<M>(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &'static [&'static str],
        metric: &M,
    ) where
        M: TypedMetric + EncodeMetric + Clone + Send + Sync + std::fmt::Debug + 'static,
    {
        use prometheus_client::metrics::MetricType;
        let kind = match M::TYPE {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            _ => "unknown",
        };
        let exposed = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_owned()
        };
        self.docs.push(MetricDoc {
            name: exposed,
            kind,
            labels,
            help,
        });
        // The encoder ends help with a period itself.
        self.registry
            .register(name, help.trim_end_matches('.'), metric.clone());
    }

    /// The documentation of every registered metric, in registration order.
    pub fn docs(&self) -> &[MetricDoc] {
        &self.docs
    }

    /// The text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for MetricRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// The Markdown reference table of `docs`, each metric with the roles that export it.
pub fn reference_table(docs: &[(MetricDoc, Vec<&'static str>)]) -> String {
    let mut out =
        String::from("| metric | type | labels | exported by | meaning |\n|---|---|---|---|---|\n");
    for (d, roles) in docs {
        let labels = if d.labels.is_empty() {
            "-".to_owned()
        } else {
            d.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!(
            "| `{}` | {} | {} | {} | {} |\n",
            d.name,
            d.kind,
            labels,
            roles.join(", "),
            d.help
        );
    }
    out
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

/// A latency a process measures itself, exported as quantile gauges over the last one to
/// two minutes: the recorder and its gauge family, cloned where it is recorded.
#[derive(Clone, Debug)]
pub struct LatencyQuantiles<L> {
    recorder: Arc<Mutex<RollingLatency>>,
    gauges: Family<L, GaugeF>,
    labels: fn(&'static str) -> L,
}

impl<L> LatencyQuantiles<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    /// A recorder exporting into `gauges` under `labels(quantile)`.
    pub fn new(gauges: &Family<L, GaugeF>, labels: fn(&'static str) -> L) -> Self {
        LatencyQuantiles {
            recorder: Arc::new(Mutex::new(RollingLatency::new(Duration::from_secs(60)))),
            gauges: gauges.clone(),
            labels,
        }
    }

    pub fn record(&self, d: Duration) {
        lock(&self.recorder).record(d);
    }

    /// Set the gauges from the recorder (before an encode).
    pub fn refresh(&self) {
        let mut rec = lock(&self.recorder);
        for (q, label) in QUANTILES {
            if let Some(v) = rec.quantile(q) {
                self.gauges.get_or_create(&(self.labels)(label)).set(v);
            }
        }
    }
}

/// Set `labels` of `family` to `v` when there is a value.
pub fn set_some<L>(family: &Family<L, GaugeF>, labels: &L, v: Option<f64>)
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

/// The HTTP ports' own metrics (every port of the process shares this set).
#[derive(Clone, Debug, Default)]
pub struct HttpMetrics {
    pub connections: Family<ServerLabels, Gauge>,
    pub timeouts: Family<ServerLabels, Counter>,
    pub refused: Family<ServerLabels, Counter>,
}

impl HttpMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = HttpMetrics::default();
        r.register("meshcanary_http_connections", "Open connections on each HTTP port (server: telemetry, peers); at most --http-max-connections each.", &["server"], &m.connections);
        r.register("meshcanary_http_refused", "Connections closed at the --http-max-connections cap, by server: the oldest connection that had not sent a request yet, or the new one when every open connection had.", &["server"], &m.refused);
        r.register("meshcanary_http_timeouts", "Connections closed because a request's headers did not arrive within --http-header-timeout (slow or idle clients), by server.", &["server"], &m.timeouts);
        m
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
    pub metrics: HttpMetrics,
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
    let open = server.metrics.connections.get_or_create(&labels).clone();
    let timeouts = server.metrics.timeouts.get_or_create(&labels).clone();
    let refused = server.metrics.refused.get_or_create(&labels).clone();
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
