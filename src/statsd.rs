//! Stage 2b, statsd: every request's latency from Envoy's DogStatsD (or plain statsd) sink.
//!
//! Envoy moves its Prometheus histograms only at the stats flush (5 s by default), so scraped
//! latency arrives in 5 s steps. Its statsd sinks send each histogram value the moment it is
//! recorded: one `envoy.cluster.upstream_rq_time:12|ms|#envoy.cluster_name:...` line per
//! request of each cluster. The agent listens for them on a node-local UDP port. At each
//! scrape, a pod whose sidecar is sending gets the request times that waited for it (in a
//! per-pod hdrhistogram) in place of the scraped histogram delta; from then on its request
//! times are counted straight into its window's buckets (the pod's own histogram edges)
//! and folded into the window after every receive batch, so the judge sees each request's
//! latency within a batch of its end. Counters always come from the scrape.
//!
//! A datagram belongs to the pod whose address is in its `meshcanary.pod_ip` tag, or else
//! to the pod at its source address (on a pod network the sidecar sends from the pod's IP).
//! Anything else is counted and dropped: an unknown pod, another metric or cluster (used
//! only as a sign of life), a malformed line, a sampled histogram (`|@rate`). A pod whose
//! sidecar sent nothing for [`FRESH_MS`] falls back to the scrape, per pod.
//!
//! Bounded and fast: one socket, drained in batches of up to 64 datagrams per wake-up into
//! buffers allocated once, no allocation per datagram, one lock per batch. The kernel's
//! drops (a full socket buffer) are read every second from `/proc/net/udp` and counted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::telemetry::MetricRegistry;
use crate::window::inbound::Inbound;
use crate::window::{WindowKey, Windows};

/// statsd's usual port, where App Mesh's Envoy image sends by default.
pub const DEFAULT_PORT: u16 = 8125;
/// A pod counts as sending while its sidecar sent anything within this long. Envoy sends
/// every counter and gauge at each stats flush (5 s by default) even while idle, so two
/// flushes and some slack; longer, and a sidecar that stops sending loses more latency.
pub const FRESH_MS: u64 = 12_000;
/// A sidecar that sends, but whose scrapes count this many requests with no request time of
/// its inbound cluster arriving for [`SILENT_LATENCY_MS`], is not sending what the agent
/// needs (a stats tag config without the cluster name, say): back to the scrape.
pub const UNSEEN_REQUESTS: u64 = 10;
const SILENT_LATENCY_MS: u64 = 2_000;
/// The DogStatsD tag that names the pod's address when the source address cannot (sidecars
/// that all send from one address, as on loopback).
pub const POD_IP_TAG: &[u8] = b"meshcanary.pod_ip";
/// Most datagrams received per wake-up (one lock, one fold of the windows).
pub const BATCH: usize = 64;
/// Largest datagram read; the rest of a longer one is cut (Envoy's are one line, well under
/// 1 KiB, unless `max_bytes_per_datagram` batches lines, which stays under the MTU).
pub const DATAGRAM_BYTES: usize = 4096;
/// Slowest latency kept exactly (ms); slower values count as this (they are beyond every
/// edge the judge looks at).
const MAX_MS: u64 = 600_000;

/// One statsd line, borrowed from the datagram.
#[derive(Debug, PartialEq)]
pub struct Line<'a> {
    pub name: &'a [u8],
    pub value: f64,
    pub kind: &'a [u8],
    /// A sample rate below 1 (`|@0.1`).
    pub sampled: bool,
    /// Everything after `|#`, as is (Istio's cluster names contain `|`).
    pub tags: &'a [u8],
}

/// Parse `name:value|type[|@rate][|#tags]`; `None` for anything else.
pub fn parse_line(line: &[u8]) -> Option<Line<'_>> {
    let colon = memchr::memchr(b':', line)?;
    let (name, rest) = (&line[..colon], &line[colon + 1..]);
    let bar = memchr::memchr(b'|', rest)?;
    let value: f64 = std::str::from_utf8(&rest[..bar]).ok()?.parse().ok()?;
    if name.is_empty() || !value.is_finite() {
        return None;
    }
    let rest = &rest[bar + 1..];
    let (kind, mut rest) = match memchr::memchr(b'|', rest) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, &rest[rest.len()..]),
    };
    if kind.is_empty() {
        return None;
    }
    let mut out = Line {
        name,
        value,
        kind,
        sampled: false,
        tags: &[],
    };
    while let Some(section) = rest.strip_prefix(b"|") {
        if let Some(tags) = section.strip_prefix(b"#") {
            out.tags = tags;
            break;
        }
        let end = memchr::memchr(b'|', section).unwrap_or(section.len());
        if let Some(rate) = section[..end].strip_prefix(b"@") {
            let rate: f64 = std::str::from_utf8(rate).ok()?.parse().ok()?;
            out.sampled = rate < 1.0;
        }
        rest = &section[end..];
    }
    Some(out)
}

/// The value of tag `key` in a DogStatsD tag list (`k:v,k2:v2`).
pub fn tag<'a>(tags: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    tags.split(|&b| b == b',')
        .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix(b":")))
}

/// Whether `name` is a cluster's request time (`[prefix.]cluster.upstream_rq_time`, not its
/// `external`/`internal` split, which repeats the same requests).
fn is_request_time(name: &[u8]) -> bool {
    const SUFFIX: &[u8] = b"cluster.upstream_rq_time";
    name == SUFFIX || (name.ends_with(SUFFIX) && name[name.len() - SUFFIX.len() - 1] == b'.')
}

/// What became of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A request time of a known pod's inbound cluster: recorded.
    Latency,
    /// Another metric or cluster of a known pod: a sign of life only.
    Other,
    /// No pod of this node has the address it names or comes from.
    UnknownPod,
    /// Two targets share the address, so the sink cannot tell them apart.
    Ambiguous,
    /// Sampled (`|@rate` below 1): one line would stand for several requests.
    Sampled,
    Malformed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Latency => "latency",
            Outcome::Other => "other",
            Outcome::UnknownPod => "unknown_pod",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Sampled => "sampled",
            Outcome::Malformed => "malformed",
        }
    }

    const ALL: [Outcome; 6] = [
        Outcome::Latency,
        Outcome::Other,
        Outcome::UnknownPod,
        Outcome::Ambiguous,
        Outcome::Sampled,
        Outcome::Malformed,
    ];
}

/// One pod's place in the sinks: where its request times go, and signs of its sidecar's life.
struct PodSink {
    /// Targets at this address (more than one: ambiguous, nothing is recorded).
    owners: u32,
    inbound: Arc<Inbound>,
    /// The tag that carries the cluster name in this sidecar's DogStatsD lines.
    cluster_tag: &'static [u8],
    latencies: hdrhistogram::Histogram<u32>,
    /// Last datagram of any kind (unix ms).
    last_ms: Option<u64>,
    /// Last inbound request time recorded (unix ms).
    last_latency_ms: Option<u64>,
    /// Requests the scrapes counted while no request time came (see [`UNSEEN_REQUESTS`]).
    unseen: u64,
    /// Set while the pod's scrapes find it sending: its latencies then go straight into its
    /// window after each receive batch, instead of waiting for its next scrape.
    direct: Option<Direct>,
    /// Per-bucket counts, reused.
    scratch: Vec<u64>,
}

/// Where a sending pod's latencies go: counted straight into its window's buckets, folded
/// in after each receive batch.
struct Direct {
    key: Arc<WindowKey>,
    edges_ms: Vec<f64>,
    /// Per bucket of `edges_ms` plus `+Inf`, since the last fold.
    counts: Vec<u64>,
    pending: bool,
}

impl Direct {
    fn new(key: Arc<WindowKey>, edges_ms: &[f64]) -> Self {
        Direct {
            key,
            edges_ms: edges_ms.to_vec(),
            counts: vec![0; edges_ms.len() + 1],
            pending: false,
        }
    }

    fn record(&mut self, ms: u64) {
        // `v <= le`, as Envoy buckets: the first edge at or above the value.
        let bucket = self.edges_ms.partition_point(|&e| e < ms as f64);
        self.counts[bucket] += 1;
        self.pending = true;
    }
}

impl PodSink {
    /// The latencies the histogram collected, per bucket of `edges_ms` (plus `+Inf`), into
    /// `self.scratch`; the histogram starts again empty. One pass over its recorded values
    /// (exact below 2 s, within 0.1 % above).
    fn drain(&mut self, edges_ms: &[f64]) {
        self.scratch.clear();
        self.scratch.resize(edges_ms.len() + 1, 0);
        if self.latencies.is_empty() {
            return;
        }
        for v in self.latencies.iter_recorded() {
            let value = v.value_iterated_to() as f64;
            let bucket = edges_ms.partition_point(|&e| e < value);
            self.scratch[bucket] += u64::from(v.count_at_value());
        }
        self.latencies.reset();
    }
}

/// Where the latency of a pod's window came from at its last scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Scrape,
    Statsd,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Scrape => "scrape",
            Source::Statsd => "statsd",
        }
    }
}

/// Line counts by outcome, kept by the caller and added to the metrics once per batch.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tally([u64; 6]);

impl Tally {
    pub fn get(&self, o: Outcome) -> u64 {
        self.0[o as usize]
    }
    fn add(&mut self, o: Outcome) {
        self.0[o as usize] += 1;
    }
}

/// The pods' latencies, shared by the listener and the scrape tasks.
///
/// Lock order: `pods`, then the windows; nothing takes the windows' lock and then this one.
#[derive(Default)]
pub struct Sinks {
    pods: Mutex<HashMap<IpAddr, PodSink>>,
    windows: Option<Arc<Mutex<Windows>>>,
}

/// A target's place in [`Sinks`]; leaving it removes the target.
pub struct Registration {
    sinks: Arc<Sinks>,
    ip: IpAddr,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut pods = lock(&self.sinks.pods);
        if let Some(p) = pods.get_mut(&self.ip) {
            p.owners -= 1;
            if p.owners == 0 {
                pods.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sinks {
    /// Sinks whose sending pods' latencies go into `windows` as they arrive.
    pub fn new(windows: Arc<Mutex<Windows>>) -> Self {
        Sinks {
            pods: Mutex::default(),
            windows: Some(windows),
        }
    }

    /// Take the datagrams of the pod at `ip` whose inbound cluster is `inbound`.
    pub fn register(self: &Arc<Self>, ip: IpAddr, inbound: Arc<Inbound>) -> Registration {
        let mut pods = lock(&self.pods);
        pods.entry(ip)
            .and_modify(|p| p.owners += 1)
            .or_insert_with(|| PodSink {
                owners: 1,
                cluster_tag: inbound.labels.statsd_cluster.as_bytes(),
                inbound,
                latencies: hdrhistogram::Histogram::new_with_bounds(1, MAX_MS, 3)
                    .expect("static bounds are valid"),
                last_ms: None,
                last_latency_ms: None,
                unseen: 0,
                direct: None,
                scratch: Vec::new(),
            });
        Registration {
            sinks: Arc::clone(self),
            ip,
        }
    }

    /// Fold one datagram from `source` received at `now_ms`.
    pub fn ingest(&self, datagram: &[u8], source: Option<IpAddr>, now_ms: u64, tally: &mut Tally) {
        let mut pods = lock(&self.pods);
        Self::ingest_locked(&mut pods, datagram, source, now_ms, tally);
    }

    /// Fold a batch of datagrams under one lock.
    pub fn ingest_batch<'a>(
        &self,
        datagrams: impl Iterator<Item = (&'a [u8], Option<IpAddr>)>,
        now_ms: u64,
        tally: &mut Tally,
    ) {
        let mut pods = lock(&self.pods);
        for (d, source) in datagrams {
            Self::ingest_locked(&mut pods, d, source, now_ms, tally);
        }
        self.fold_direct(&mut pods, now_ms);
    }

    /// Fold the sending pods' new latencies into their windows (those that exist: a target
    /// being removed does not bring its window back).
    fn fold_direct(&self, pods: &mut HashMap<IpAddr, PodSink>, now_ms: u64) {
        let Some(windows) = &self.windows else {
            return;
        };
        let pending = |p: &PodSink| p.direct.as_ref().is_some_and(|d| d.pending);
        if !pods.values().any(pending) {
            return;
        }
        let mut windows = lock(windows);
        for d in pods.values_mut().filter_map(|p| p.direct.as_mut()) {
            if !d.pending {
                continue;
            }
            if let Some(w) = windows.get_mut(&d.key) {
                w.record_latency(&d.counts, &d.edges_ms, now_ms);
            }
            d.counts.iter_mut().for_each(|c| *c = 0);
            d.pending = false;
        }
    }

    fn ingest_locked(
        pods: &mut HashMap<IpAddr, PodSink>,
        datagram: &[u8],
        source: Option<IpAddr>,
        now_ms: u64,
        tally: &mut Tally,
    ) {
        for line in datagram.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            tally.add(Self::line(pods, line, source, now_ms));
        }
    }

    fn line(
        pods: &mut HashMap<IpAddr, PodSink>,
        line: &[u8],
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Outcome {
        let Some(l) = parse_line(line) else {
            return Outcome::Malformed;
        };
        let named = tag(l.tags, POD_IP_TAG)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<IpAddr>().ok());
        let Some(pod) = named.or(source).and_then(|ip| pods.get_mut(&ip)) else {
            return Outcome::UnknownPod;
        };
        if pod.owners > 1 {
            return Outcome::Ambiguous;
        }
        pod.last_ms = Some(pod.last_ms.map_or(now_ms, |t| t.max(now_ms)));
        if !is_request_time(l.name) || !matches!(l.kind, b"ms" | b"h" | b"d") {
            return Outcome::Other;
        }
        let inbound = tag(l.tags, pod.cluster_tag)
            .and_then(|c| std::str::from_utf8(c).ok())
            .is_some_and(|c| pod.inbound.cluster.is_match(c));
        if !inbound {
            return Outcome::Other;
        }
        if l.sampled {
            return Outcome::Sampled;
        }
        // Envoy records whole milliseconds and buckets `value <= le`: ceil keeps that.
        let ms = if l.value <= 0.0 {
            0
        } else {
            (l.value.ceil() as u64).min(MAX_MS)
        };
        match &mut pod.direct {
            Some(d) => d.record(ms),
            None => pod.latencies.saturating_record(ms),
        }
        pod.last_latency_ms = Some(now_ms);
        Outcome::Latency
    }

    /// At a scrape of the pod at `ip` (window `key`, histogram edges `edges_ms`) that counted
    /// `requests` new requests: if its sidecar is sending (anything within [`FRESH_MS`] of
    /// `now_ms`, and request times while it serves requests), its latencies since
    /// they last went anywhere, per bucket of `edges_ms` plus `+Inf`, and from now on they go
    /// straight into the window as they arrive (when the sinks have the windows). `None`
    /// when it is not sending: its latencies then come from the scrape.
    pub fn settle(
        &self,
        ip: IpAddr,
        key: &Arc<WindowKey>,
        edges_ms: &[f64],
        requests: u64,
        now_ms: u64,
    ) -> Option<Vec<u64>> {
        let mut pods = lock(&self.pods);
        let pod = pods.get_mut(&ip)?;
        let latency_recent = pod
            .last_latency_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= SILENT_LATENCY_MS);
        pod.unseen = if latency_recent {
            0
        } else {
            pod.unseen.saturating_add(requests)
        };
        let fresh = pod
            .last_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= FRESH_MS)
            && pod.unseen < UNSEEN_REQUESTS;
        if !fresh || pod.owners > 1 || edges_ms.is_empty() {
            if !pod.latencies.is_empty() {
                pod.latencies.reset();
            }
            pod.direct = None;
            return None;
        }
        // Direct counts are folded at the end of every batch, under the same lock: none are
        // pending here, so a new layout loses nothing.
        pod.drain(edges_ms);
        if self.windows.is_some() {
            match &pod.direct {
                Some(d) if d.edges_ms == edges_ms && Arc::ptr_eq(&d.key, key) => {}
                _ => pod.direct = Some(Direct::new(Arc::clone(key), edges_ms)),
            }
        }
        Some(pod.scratch.clone())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The listener's metrics.
#[derive(Clone, Default)]
pub struct StatsdMetrics {
    pub lines: Family<OutcomeLabels, Counter>,
    pub datagrams: Counter,
    pub overruns: Counter,
    pub truncated: Counter,
}

impl StatsdMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = StatsdMetrics::default();
        for o in Outcome::ALL {
            let _ = m.lines.get_or_create(&OutcomeLabels {
                outcome: o.as_str(),
            });
        }
        r.register("meshcanary_statsd_lines", "Lines received on the statsd port (--statsd-listen), by outcome: latency (an inbound request time, recorded), other (another metric or cluster of a known pod: a sign of life), unknown_pod (no pod of this node at the address it names or comes from), ambiguous (two targets share that address), sampled (|@rate below 1), malformed.", &["outcome"], &m.lines);
        r.register(
            "meshcanary_statsd_datagrams",
            "Datagrams received on the statsd port.",
            &[],
            &m.datagrams,
        );
        r.register("meshcanary_statsd_overruns", "Datagrams the kernel dropped because the statsd socket's receive buffer was full (the socket's drops in /proc/net/udp, read every second): raise --statsd-recv-buffer (and net.core.rmem_max) or give the agent more CPU.", &[], &m.overruns);
        r.register("meshcanary_statsd_truncated", "Datagrams that filled the 4 KiB read buffer, so were probably longer: their last line may be cut (and then counted malformed).", &[], &m.truncated);
        m
    }

    fn add(&self, tally: &Tally) {
        for o in Outcome::ALL {
            let n = tally.get(o);
            if n > 0 {
                self.lines
                    .get_or_create(&OutcomeLabels {
                        outcome: o.as_str(),
                    })
                    .inc_by(n);
            }
        }
    }
}

/// Bind the statsd port with a receive buffer of `recv_buffer` bytes (the kernel may give
/// less: it is capped by `net.core.rmem_max`; the size it gave is logged).
///
/// ### Errors
/// Binding the address.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(error) = socket.set_recv_buffer_size(recv_buffer) {
        tracing::warn!(%error, bytes = recv_buffer, "could not set the statsd receive buffer");
    }
    if let Ok(granted) = socket.recv_buffer_size() {
        // Linux reports twice the usable size (it counts its bookkeeping).
        tracing::info!(
            asked = recv_buffer,
            granted = granted / 2,
            "statsd receive buffer"
        );
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Receive until `shutdown` turns true.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    sinks: Arc<Sinks>,
    metrics: StatsdMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Batch::new();
    let mut drops_seen = 0;
    let mut drops_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            ready = socket.readable() => if let Err(error) = ready {
                tracing::warn!(%error, "statsd socket failed; per-request latency stops (the scrape's histograms take over)");
                return;
            },
            _ = drops_tick.tick() => {
                if let Some(drops) = kernel_drops(&socket) {
                    if drops > drops_seen {
                        metrics.overruns.inc_by(drops - drops_seen);
                    }
                    drops_seen = drops;
                }
                continue;
            }
            _ = shutdown.changed() => return,
        }
        loop {
            let n = match batch.recv(&socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::debug!(%error, "statsd receive failed");
                    break;
                }
            };
            let now_ms = crate::clock::unix_ms();
            let mut tally = Tally::default();
            metrics.datagrams.inc_by(n as u64);
            let truncated = (0..n).filter(|&i| batch.truncated(i)).count();
            if truncated > 0 {
                metrics.truncated.inc_by(truncated as u64);
            }
            sinks.ingest_batch((0..n).map(|i| batch.datagram(i)), now_ms, &mut tally);
            metrics.add(&tally);
            if n < BATCH {
                break;
            }
        }
    }
}

/// Datagrams received in one wake-up, into buffers allocated once.
struct Batch {
    bufs: Vec<u8>,
    meta: Vec<(usize, Option<IpAddr>)>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: vec![0; BATCH * DATAGRAM_BYTES],
            meta: Vec::with_capacity(BATCH),
        }
    }

    /// Receive what is waiting, up to [`BATCH`] datagrams (non-blocking); how many.
    fn recv(&mut self, socket: &tokio::net::UdpSocket) -> std::io::Result<usize> {
        self.meta.clear();
        while self.meta.len() < BATCH {
            let at = self.meta.len() * DATAGRAM_BYTES;
            match socket.try_recv_from(&mut self.bufs[at..at + DATAGRAM_BYTES]) {
                Ok((n, from)) => self.meta.push((n, Some(from.ip()))),
                Err(e) if self.meta.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(self.meta.len())
    }

    /// A datagram that filled its buffer was probably longer (the rest is cut).
    fn truncated(&self, i: usize) -> bool {
        self.meta[i].0 == DATAGRAM_BYTES
    }

    /// Datagram `i` of the last call and its source address.
    fn datagram(&self, i: usize) -> (&[u8], Option<IpAddr>) {
        let (len, ip) = self.meta[i];
        (&self.bufs[i * DATAGRAM_BYTES..i * DATAGRAM_BYTES + len], ip)
    }
}

/// The kernel's count of datagrams dropped on `socket` (its receive buffer was full), from
/// the `drops` column of `/proc/net/udp` (or `udp6`) for the socket's inode; `None` where
/// that is not available.
fn kernel_drops(socket: &tokio::net::UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_owned();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(drops) = drops_of(&text, &inode) {
            return Some(drops);
        }
    }
    None
}

/// The `drops` (last) column of the row of `/proc/net/udp` whose inode (the tenth) is `inode`.
fn drops_of(table: &str, inode: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|row| {
        let f: Vec<&str> = row.split_whitespace().collect();
        (f.get(9) == Some(&inode)).then(|| f.last()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::inbound::InboundLabels;

    fn app_mesh() -> Arc<Inbound> {
        Arc::new(Inbound {
            cluster: regex::Regex::new("^cds_ingress_").unwrap(),
            labels: InboundLabels::ENVOY,
        })
    }

    #[test]
    fn lines_as_envoy_sends_them() {
        let l = parse_line(b"envoy.cluster.upstream_rq_time:12|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898").unwrap();
        assert_eq!(l.name, b"envoy.cluster.upstream_rq_time");
        assert_eq!(l.value, 12.0);
        assert_eq!(l.kind, b"ms");
        assert!(!l.sampled);
        assert_eq!(
            tag(l.tags, b"envoy.cluster_name"),
            Some(&b"cds_ingress_m_v_http_9898"[..])
        );
        assert_eq!(tag(l.tags, POD_IP_TAG), Some(&b"10.0.0.7"[..]));
        // Istio's cluster names hold `|`: the tags run to the end of the line.
        let l = parse_line(b"envoy.cluster.upstream_rq_time:2|ms|#cluster_name:inbound|9898||")
            .unwrap();
        assert_eq!(tag(l.tags, b"cluster_name"), Some(&b"inbound|9898||"[..]));
        let l = parse_line(b"a.b:1.5|h|@0.25").unwrap();
        assert!(l.sampled && l.tags.is_empty());
        assert!(parse_line(b"plain:3|c").is_some());
        for bad in [
            &b"no colon"[..],
            b"x:|ms",
            b"x:abc|ms",
            b"x:1",
            b":1|ms",
            b"x:1|",
            b"x:NaN|ms",
        ] {
            assert!(
                parse_line(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(is_request_time(b"envoy.cluster.upstream_rq_time"));
        assert!(is_request_time(b"cluster.upstream_rq_time"));
        assert!(!is_request_time(b"envoy.cluster.external.upstream_rq_time"));
        assert!(!is_request_time(b"envoy.xcluster.upstream_rq_time"));
    }

    #[test]
    fn latencies_reach_the_pod_they_name_and_nothing_else_counts() {
        let sinks = Arc::new(Sinks::default());
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let _r = sinks.register(pod, app_mesh());
        let mut tally = Tally::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let datagrams: [&[u8]; 7] = [
            b"envoy.cluster.upstream_rq_time:3|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898",
            b"envoy.cluster.upstream_rq_time:30|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898\nenvoy.cluster.upstream_rq_time:700|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898",
            b"envoy.cluster.upstream_rq_time:9|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_egress_m_x_http_80",
            b"envoy.cluster.external.upstream_rq_time:3|ms|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898",
            b"envoy.cluster.upstream_rq_time:3|ms|#meshcanary.pod_ip:10.0.0.8,envoy.cluster_name:cds_ingress_m_v_http_9898",
            b"garbage",
            b"envoy.cluster.upstream_rq_time:3|ms|@0.5|#meshcanary.pod_ip:10.0.0.7,envoy.cluster_name:cds_ingress_m_v_http_9898",
        ];
        for d in datagrams {
            sinks.ingest(d, Some(lo), 1_000, &mut tally);
        }
        // By source address, without the tag.
        sinks.ingest(
            b"envoy.cluster.upstream_rq_time:1|ms|#envoy.cluster_name:cds_ingress_m_v_http_9898",
            Some(pod),
            1_000,
            &mut tally,
        );
        assert_eq!(tally.get(Outcome::Latency), 4);
        assert_eq!(tally.get(Outcome::Other), 2);
        assert_eq!(tally.get(Outcome::UnknownPod), 1);
        assert_eq!(tally.get(Outcome::Malformed), 1);
        assert_eq!(tally.get(Outcome::Sampled), 1);
        let edges = [1.0, 5.0, 25.0, 500.0];
        let key = Arc::new(WindowKey {
            namespace: "test".into(),
            workload: "podinfo".into(),
            role: crate::window::Role::Canary,
        });
        assert_eq!(
            sinks.settle(pod, &key, &edges, 4, 2_000),
            Some(vec![1, 1, 0, 1, 1])
        );
        // Taken: the next second starts empty; still fresh.
        assert_eq!(sinks.settle(pod, &key, &edges, 0, 3_000), Some(vec![0; 5]));
        // Sending, but no request times while the scrape counts requests: back to the
        // scrape once UNSEEN_REQUESTS go by.
        sinks.ingest(b"envoy.server.uptime:9|g", Some(pod), 8_000, &mut tally);
        assert!(sinks.settle(pod, &key, &edges, 9, 8_000).is_some());
        assert_eq!(sinks.settle(pod, &key, &edges, 1, 8_100), None);
        // A request time again: back on the sink.
        sinks.ingest(datagrams[0], Some(lo), 8_200, &mut tally);
        assert!(sinks.settle(pod, &key, &edges, 5, 8_300).is_some());
        // Silent for longer than FRESH_MS: back to the scrape.
        assert_eq!(
            sinks.settle(pod, &key, &edges, 0, 8_200 + FRESH_MS + 1),
            None
        );
    }

    #[test]
    fn a_sending_pods_latencies_reach_its_window_as_they_arrive() {
        let windows = Arc::new(Mutex::new(Windows::new(
            crate::window::WindowConfig::default(),
        )));
        let sinks = Arc::new(Sinks::new(Arc::clone(&windows)));
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let _r = sinks.register(pod, app_mesh());
        let key = Arc::new(WindowKey {
            namespace: "test".into(),
            workload: "podinfo".into(),
            role: crate::window::Role::Canary,
        });
        lock(&windows).entry(&key);
        let line: &[u8] =
            b"envoy.cluster.upstream_rq_time:30|ms|#envoy.cluster_name:cds_ingress_m_v_http_9898";
        let mut tally = Tally::default();
        // Before a scrape says it is sending, latencies wait for the scrape.
        sinks.ingest_batch([(line, Some(pod))].into_iter(), 1_000, &mut tally);
        let count = |w: &Arc<Mutex<Windows>>| lock(w).get(&key).unwrap().totals().latency_count();
        assert_eq!(count(&windows), 0);
        let edges = [5.0, 50.0];
        assert_eq!(
            sinks.settle(pod, &key, &edges, 1, 1_500),
            Some(vec![0, 1, 0])
        );
        // Then each batch goes straight in, without marking the window fresh.
        sinks.ingest_batch(
            [(line, Some(pod)), (line, Some(pod))].into_iter(),
            1_600,
            &mut tally,
        );
        assert_eq!(count(&windows), 2);
        assert_eq!(lock(&windows).get(&key).unwrap().last_update_ms(), None);
        assert_eq!(
            sinks.settle(pod, &key, &edges, 2, 2_000),
            Some(vec![0, 0, 0])
        );
        // A removed window is not brought back.
        lock(&windows).remove(&key);
        sinks.ingest_batch([(line, Some(pod))].into_iter(), 2_100, &mut tally);
        assert!(lock(&windows).get(&key).is_none());
    }

    #[test]
    fn drops_are_read_from_the_socket_table() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  412: 0100007F:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 91234 2 0000000000000000 17\n";
        assert_eq!(drops_of(table, "91234"), Some(17));
        assert_eq!(drops_of(table, "1"), None);
    }

    /// A receive buffer that overflows is counted, by `serve`, in the overruns metric.
    #[tokio::test]
    async fn overruns_are_counted_not_silent() {
        let socket = bind("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let addr = socket.local_addr().unwrap();
        assert_eq!(kernel_drops(&socket), Some(0));
        // Nobody reads yet: a few thousand datagrams overflow the small buffer.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..3000 {
            let _ = sender.send_to(b"envoy.server.uptime:1|g", addr);
        }
        let dropped = kernel_drops(&socket).unwrap();
        assert!(dropped > 0, "{dropped}");
        let metrics = StatsdMetrics::default();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            socket,
            Arc::new(Sinks::default()),
            metrics.clone(),
            stopped,
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while metrics.overruns.get() < dropped && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.overruns.get(), dropped);
        assert!(metrics.datagrams.get() > 0);
        let _ = stop.send(true);
        task.await.unwrap();
    }

    #[test]
    fn two_targets_at_one_address_are_not_guessed_between() {
        let sinks = Arc::new(Sinks::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = sinks.register(ip, app_mesh());
        let b = sinks.register(ip, app_mesh());
        let mut tally = Tally::default();
        let line =
            b"envoy.cluster.upstream_rq_time:3|ms|#envoy.cluster_name:cds_ingress_m_v_http_9898";
        sinks.ingest(line, Some(ip), 1_000, &mut tally);
        assert_eq!(tally.get(Outcome::Ambiguous), 1);
        let key = Arc::new(WindowKey {
            namespace: "test".into(),
            workload: "podinfo".into(),
            role: crate::window::Role::Canary,
        });
        assert_eq!(sinks.settle(ip, &key, &[1.0], 1, 1_000), None);
        drop(b);
        sinks.ingest(line, Some(ip), 1_000, &mut tally);
        assert_eq!(
            sinks.settle(ip, &key, &[1.0, 5.0], 1, 1_000),
            Some(vec![0, 1, 0])
        );
        drop(a);
        assert!(lock(&sinks.pods).is_empty());
    }
}
