//! The agent: wires discover -> scrape -> parse -> window, and telemetry, for one node.
//!
//! Each target runs in its own task with its own schedule (a random phase so a hundred pods
//! are not scraped in the same millisecond, plus ±2 % jitter per tick), so a slow or dead
//! sidecar never delays the others. A task owns its pod's previous counters; the shared state
//! behind one mutex is only the windows and the targets' health, held for microseconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{unix_ms, unix_ms_i64};
use crate::shutdown::stopping;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use regex::Regex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::analysis::JudgeMetrics;
use crate::config::{require, ConfigError};
use crate::discover::Target;
use crate::judge::Policy;
use crate::parse::Parser;
use crate::peers::PeerServerMetrics;
use crate::remote_write::{self, SeriesSender};
use crate::remote_write::{OutcomeLabels, RemoteWriteMetrics};
use crate::scrape::{over_sample_limit, AdminUrls, ScrapeError, Scraper, Tier};
use crate::scrape::{ErrorLabels, ScrapeMetrics, TierLabels};
use crate::telemetry::{self, lock, Endpoints, HttpMetrics, MetricRegistry};
use crate::window::inbound::{Delta, Inbound, InboundLabels};
use crate::window::metrics::{WindowMetrics, WorkloadLabels};
use crate::window::{
    InboundSnapshot, PodCounters, Role, Summary, WindowConfig, WindowKey, Windows,
};

/// Everything the agent needs, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub targets: Vec<Target>,
    pub fast_interval: Duration,
    /// `None` disables the full tier.
    pub full_interval: Option<Duration>,
    pub fast_timeout: Duration,
    pub full_timeout: Duration,
    pub max_body_bytes: usize,
    /// Most samples a scrape may have; more fails the scrape unparsed.
    pub sample_limit: usize,
    pub cluster_regex: Regex,
    pub fast_filter: String,
    pub window: WindowConfig,
    pub listen: Option<SocketAddr>,
    /// Limits of the telemetry and peer ports.
    pub http_limits: crate::telemetry::HttpLimits,
    pub grace_period: Duration,
    /// How the judge compares each workload's canary with its primary.
    pub policy: Policy,
    /// Where full-tier samples and the agent's own metrics go, if anywhere.
    pub remote_write: Option<crate::remote_write::RemoteWriteConfig>,
    /// Kubernetes discovery and the controller, when running in a cluster.
    pub kube: Option<KubeSettings>,
    /// Per-request latency from the sidecars' statsd sinks, when listened for.
    pub statsd: Option<StatsdSettings>,
}

/// The statsd listener (`--statsd-listen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsdSettings {
    pub listen: SocketAddr,
    /// Socket receive buffer asked of the kernel, bytes.
    pub recv_buffer: usize,
}

/// The Kubernetes side of the agent.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    pub discovery: crate::discover::pods::DiscoveryConfig,
    /// The agent's pod name: its `instance` label.
    pub identity: String,
    /// Where and to whom the agent serves its windows.
    pub peers: PeerServing,
}

/// The peer port of an agent: the controller polls it.
#[derive(Clone, Debug)]
pub struct PeerServing {
    pub listen: std::net::SocketAddr,
    /// The audience the controller's token must carry.
    pub audience: String,
    /// The only user answered: `system:serviceaccount:<namespace>:<controller account>`.
    pub client: String,
}

impl AgentConfig {
    /// This agent's `instance` label on its own metrics: its identity in Kubernetes (pod
    /// name), else its listen address.
    pub fn instance(&self) -> String {
        match &self.kube {
            Some(k) => k.identity.clone(),
            None => self
                .listen
                .map_or_else(|| "meshcanary".to_owned(), |a| a.to_string()),
        }
    }

    /// Check settings that only make sense together.
    ///
    /// ### Errors
    /// A message naming the conflicting flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(!self.fast_interval.is_zero(), "--fast-interval", || {
            "must be greater than 0".into()
        })?;
        require(
            self.fast_timeout < self.fast_interval,
            "--scrape-timeout",
            || {
                format!(
                    "{:?} must be shorter than --fast-interval ({:?})",
                    self.fast_timeout, self.fast_interval
                )
            },
        )?;
        if let Some(full) = self.full_interval {
            require(self.full_timeout < full, "--full-timeout", || {
                format!(
                    "{:?} must be shorter than --full-interval ({full:?})",
                    self.full_timeout
                )
            })?;
        }
        let alpha = self.policy.alpha;
        require(alpha > 0.0 && alpha < 1.0, "--alpha", || {
            format!("must be between 0 and 1, got {alpha}")
        })?;
        require(
            (0.0..=1.0).contains(&self.policy.success_rate_min),
            "--success-rate-min",
            || "must be a percentage from 0 to 100".into(),
        )?;
        require(self.window.slots > 0, "--window", || {
            "must be at least one second".into()
        })?;
        let mut ids: Vec<&str> = self.targets.iter().map(|t| t.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::invalid(
                "--target",
                format!("{} is given twice", w[0]),
            ));
        }
        if let Some(rw) = &self.remote_write {
            rw.validate()?;
        }
        Ok(())
    }
}

/// Health of one target as the agent last saw it.
#[derive(Clone, Debug)]
pub struct TargetStatus {
    pub target: Target,
    pub up: bool,
    pub scraped_once: bool,
    /// Why the last scrape failed, if it did.
    pub last_error: Option<String>,
    /// Where the latency of its last scrape came from.
    pub latency_source: crate::statsd::Source,
}

/// The judge's latest verdict per (namespace, workload), shared with `/metrics` and `watch`.
use crate::analysis::Judgements;

impl TargetStatus {
    /// A target not scraped yet.
    pub fn new(target: Target) -> Self {
        TargetStatus {
            target,
            up: false,
            scraped_once: false,
            last_error: None,
            latency_source: crate::statsd::Source::Scrape,
        }
    }
}

/// State shared by the target tasks, the telemetry endpoints and the watch view.
pub struct Shared {
    pub windows: Arc<Mutex<Windows>>,
    pub targets: Mutex<BTreeMap<String, TargetStatus>>,
    pub metrics: Arc<AgentMetrics>,
    pub ready: Arc<AtomicBool>,
    /// Beaten by the controller loop, when this process runs one (`/healthz`).
    pub heartbeat: crate::telemetry::Heartbeat,
    /// The judge's latest verdict per (namespace, workload) that has both a primary and a
    /// canary window.
    pub judgements: Judgements,
    /// Windows without data for this long are stale (see [`stale_after`]).
    pub stale_after_ms: u64,
    /// The pods' per-request latencies, when the statsd listener runs.
    pub statsd: Option<Arc<crate::statsd::Sinks>>,
}

impl Shared {
    /// Window summaries at `now_ms`, sorted by key.
    pub fn summaries(&self, now_ms: u64) -> Vec<(WindowKey, Summary)> {
        lock(&self.windows).summaries(now_ms)
    }

    pub fn target_statuses(&self) -> Vec<TargetStatus> {
        lock(&self.targets).values().cloned().collect()
    }

    /// The `/metrics` text.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.scrape.refresh();
        m.window.refresh(&self.summaries(unix_ms()));
        m.targets.refresh(&self.target_statuses());
        m.judge.refresh(&self.judgements);
        m.remote_write.refresh();
        m.registry.encode()
    }

    fn update_readiness(&self, targets: &BTreeMap<String, TargetStatus>) {
        let ready = targets.values().all(|t| t.scraped_once);
        self.ready.store(ready, Ordering::Release);
    }
}

/// Per-target gauges: the sidecars this agent scrapes and whether each answers.
#[derive(Clone, Debug, Default)]
pub struct TargetMetrics {
    targets: Gauge,
    targets_up: Gauge,
    target_up: Family<TargetLabels, Gauge>,
    latency_source: Family<SourceLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub namespace: String,
    pub workload: String,
    pub role: &'static str,
    pub target: String,
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub namespace: String,
    pub workload: String,
    pub role: &'static str,
    pub target: String,
}

impl TargetMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = TargetMetrics::default();
        r.register(
            "meshcanary_targets",
            "Envoy sidecars this agent scrapes.",
            &[],
            &m.targets,
        );
        r.register(
            "meshcanary_targets_up",
            "Envoy sidecars whose last fast scrape succeeded.",
            &[],
            &m.targets_up,
        );
        r.register(
            "meshcanary_target_up",
            "1 if the last fast scrape of this sidecar succeeded, else 0.",
            &["namespace", "workload", "role", "target"],
            &m.target_up,
        );
        r.register(
            "meshcanary_target_latency_source",
            "1 for where this sidecar's latency comes from: statsd (per request, from its DogStatsD sink) or scrape (Envoy's histograms, moving at each stats flush). A sidecar falls back to the scrape when its sink has been silent for 12 s, or sends no request times of its inbound cluster while its scrapes count 10 requests.",
            &["namespace", "workload", "role", "target", "source"],
            &m.latency_source,
        );
        m
    }

    /// Set the gauges from the targets' statuses (before an encode).
    pub fn refresh(&self, targets: &[TargetStatus]) {
        self.targets.set(targets.len() as i64);
        self.targets_up
            .set(targets.iter().filter(|t| t.up).count() as i64);
        self.target_up.clear();
        self.latency_source.clear();
        for t in targets {
            let key = &t.target.key;
            self.latency_source
                .get_or_create(&SourceLabels {
                    namespace: key.namespace.clone(),
                    workload: key.workload.clone(),
                    role: key.role.as_str(),
                    target: t.target.id.clone(),
                    source: t.latency_source.as_str(),
                })
                .set(1);
            self.target_up
                .get_or_create(&TargetLabels {
                    namespace: key.namespace.clone(),
                    workload: key.workload.clone(),
                    role: key.role.as_str(),
                    target: t.target.id.clone(),
                })
                .set(i64::from(t.up));
        }
    }
}

/// The agent's metrics: each stage's set, in one registry.
pub struct AgentMetrics {
    pub registry: MetricRegistry,
    pub http: HttpMetrics,
    pub scrape: ScrapeMetrics,
    pub targets: TargetMetrics,
    pub window: WindowMetrics,
    /// A standalone agent's analysis (empty when the controller judges).
    pub judge: JudgeMetrics,
    pub peers: PeerServerMetrics,
    pub remote_write: RemoteWriteMetrics,
    pub statsd: crate::statsd::StatsdMetrics,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = MetricRegistry::new();
        let scrape = ScrapeMetrics::register(&mut registry);
        let targets = TargetMetrics::register(&mut registry);
        let window = WindowMetrics::register(&mut registry);
        let judge = JudgeMetrics::register(&mut registry);
        let peers = PeerServerMetrics::register(&mut registry);
        let http = HttpMetrics::register(&mut registry);
        let remote_write = RemoteWriteMetrics::register(&mut registry);
        let statsd = crate::statsd::StatsdMetrics::register(&mut registry);
        AgentMetrics {
            statsd,
            registry,
            http,
            scrape,
            targets,
            window,
            judge,
            peers,
            remote_write,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A running agent's handle.
pub struct Agent {
    config: AgentConfig,
    shared: Arc<Shared>,
    scraper: Scraper,
    /// Targets from Kubernetes discovery, in addition to the static ones.
    discovered: Option<watch::Receiver<Vec<Target>>>,
    /// Run the agent's own judge loop (off when the controller judges).
    judge: bool,
}

impl Agent {
    /// ### Errors
    /// A target whose admin URL is invalid.
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        let mut targets = BTreeMap::new();
        for t in &config.targets {
            AdminUrls::new(&t.admin_url, &inbound_of(&config, t)?.1)?;
            targets.insert(t.id.clone(), TargetStatus::new(t.clone()));
        }
        let windows = Arc::new(Mutex::new(Windows::new(config.window)));
        let statsd = config
            .statsd
            .map(|_| Arc::new(crate::statsd::Sinks::new(Arc::clone(&windows))));
        let shared = Arc::new(Shared {
            windows,
            targets: Mutex::new(targets),
            metrics: Arc::new(AgentMetrics::new()),
            ready: Arc::new(AtomicBool::new(config.targets.is_empty())),
            heartbeat: crate::telemetry::Heartbeat::default(),
            judgements: Arc::new(Mutex::new(BTreeMap::new())),
            stale_after_ms: stale_after(config.fast_interval),
            statsd,
        });
        let scraper = Scraper::new(config.max_body_bytes, config.fast_timeout);
        Ok(Agent {
            config,
            shared,
            scraper,
            discovered: None,
            judge: true,
        })
    }

    /// Scrape the targets discovery publishes, starting and stopping tasks as they change.
    #[must_use]
    pub fn with_discovery(mut self, targets: watch::Receiver<Vec<Target>>) -> Self {
        self.discovered = Some(targets);
        self
    }

    /// Leave judging to the rollout controller, which judges with each workload's policy.
    #[must_use]
    pub fn without_judge(mut self) -> Self {
        self.judge = false;
        self
    }

    /// Make the running targets match `next`: stop the ones that went (their tasks write
    /// stale markers), drop windows no target feeds any more, start the new ones.
    fn retarget(
        &self,
        next: &[Target],
        running: &mut BTreeMap<String, (Target, watch::Sender<bool>)>,
        tasks: &mut tokio::task::JoinSet<()>,
        spawn: &impl Fn(&Target, &mut tokio::task::JoinSet<()>) -> anyhow::Result<watch::Sender<bool>>,
    ) {
        let wanted: BTreeMap<&str, &Target> = next.iter().map(|t| (t.id.as_str(), t)).collect();
        let gone: Vec<String> = running
            .iter()
            .filter(|(id, (t, _))| wanted.get(id.as_str()) != Some(&t))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((target, removed)) = running.remove(&id) {
                let _ = removed.send(true);
                lock(&self.shared.targets).remove(&id);
                tracing::info!(target_id = %id, key = %target.key, "Target removed");
            }
        }
        let new: Vec<&Target> = next
            .iter()
            .filter(|t| !running.contains_key(&t.id))
            .collect();
        for t in new {
            match spawn(t, tasks) {
                Ok(removed) => {
                    lock(&self.shared.targets).insert(t.id.clone(), TargetStatus::new(t.clone()));
                    running.insert(t.id.clone(), (t.clone(), removed));
                }
                Err(error) => {
                    tracing::warn!(target_id = %t.id, %error, "Target has an unusable admin URL; skipped")
                }
            }
        }
        let fed: std::collections::BTreeSet<&WindowKey> =
            running.values().map(|(t, _)| &t.key).collect();
        let mut windows = lock(&self.shared.windows);
        let stale: Vec<WindowKey> = windows
            .keys()
            .into_iter()
            .filter(|k| !fed.contains(k))
            .cloned()
            .collect();
        for key in stale {
            windows.remove(&key);
        }
        drop(windows);
        self.shared.update_readiness(&lock(&self.shared.targets));
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Run until `shutdown` turns true, then stop scraping and give the telemetry server
    /// the grace period to finish.
    ///
    /// ### Errors
    /// Binding the telemetry listener.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(addr) = self.config.listen {
            let listener = telemetry::bind(addr).await?;
            tracing::info!(%addr, "Serving /metrics, /healthz and /readyz");
            let shared = self.shared();
            let endpoints = Endpoints {
                metrics: Arc::new(move || shared.render_metrics()),
                ready: Arc::clone(&self.shared.ready),
                heartbeat: self.shared.heartbeat.clone(),
            };
            let server = telemetry::HttpServer {
                name: "telemetry",
                limits: self.config.http_limits,
                metrics: self.shared.metrics.http.clone(),
            };
            tasks.spawn(telemetry::serve(
                listener,
                endpoints,
                server,
                shutdown.clone(),
            ));
        }
        if let (Some(settings), Some(sinks)) = (self.config.statsd, &self.shared.statsd) {
            let socket = crate::statsd::bind(settings.listen, settings.recv_buffer)
                .map_err(|e| anyhow::anyhow!("binding the statsd port {}: {e}", settings.listen))?;
            tracing::info!(addr = %settings.listen, "Listening for the sidecars' statsd sinks (per-request latency)");
            tasks.spawn(crate::statsd::serve(
                socket,
                Arc::clone(sinks),
                self.shared.metrics.statsd.clone(),
                shutdown.clone(),
            ));
        }
        let remote_write = match &self.config.remote_write {
            Some(rw) => {
                let tx = remote_write::start(
                    rw.clone(),
                    self.shared.metrics.remote_write.clone(),
                    shutdown.clone(),
                    &mut tasks,
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "opening the remote-write queue in {}: {e}",
                        rw.queue_dir.display()
                    )
                })?;
                tracing::info!(url = %crate::remote_write::send::redact(&rw.endpoint.url.to_string()), queue = %rw.queue_dir.display(), "Remote write enabled");
                if let Some(every) = self.config.full_interval {
                    tasks.spawn(self_scrape(
                        self.shared(),
                        rw.clone(),
                        tx.clone(),
                        every,
                        self.config.instance(),
                        shutdown.clone(),
                    ));
                }
                Some(tx)
            }
            None => None,
        };
        let mut running: BTreeMap<String, (Target, watch::Sender<bool>)> = BTreeMap::new();
        let spawn_target = |target: &Target, tasks: &mut tokio::task::JoinSet<()>| {
            let (inbound, filter) = inbound_of(&self.config, target)?;
            let urls = AdminUrls::new(&target.admin_url, &filter)?;
            let inbound = Arc::new(inbound);
            let statsd = self.shared.statsd.as_ref().and_then(|sinks| {
                let ip = pod_ip(&target.admin_url)?;
                Some(StatsdFeed {
                    _registration: sinks.register(ip, Arc::clone(&inbound)),
                    key: Arc::new(target.key.clone()),
                    ip,
                    source: crate::statsd::Source::Scrape,
                    skip_scraped: false,
                    edges_ms: crate::window::inbound::ENVOY_EDGES_MS.to_vec(),
                })
            });
            let task = TargetTask {
                statsd,
                remote_write: remote_write.clone(),
                urls,
                inbound,
                target: target.clone(),
                config: self.config.clone(),
                shared: self.shared(),
                scraper: self.scraper.clone(),
                counters: PodCounters::default(),
                series: remote_write::encode::SeriesCache::default(),
                no_inbound_scrapes: 0,
            };
            let (removed_tx, removed) = watch::channel(false);
            tasks.spawn(task.run(shutdown.clone(), removed));
            anyhow::Ok(removed_tx)
        };
        for target in &self.config.targets {
            let removed = spawn_target(target, &mut tasks)?;
            running.insert(target.id.clone(), (target.clone(), removed));
        }
        if self.judge {
            let shared = self.shared();
            let listed = self.shared();
            tasks.spawn(crate::analysis::run(
                shared,
                move || analysed(&listed),
                self.config.policy.clone(),
                self.config.fast_interval,
                Arc::clone(&self.shared.judgements),
                shutdown.clone(),
            ));
        }
        tracing::info!(targets = self.config.targets.len(), "Agent started");
        match self.discovered.clone() {
            None => stopping(&mut shutdown.clone()).await,
            Some(mut discovered) => {
                let mut stop = shutdown.clone();
                loop {
                    let next = discovered.borrow_and_update().clone();
                    self.retarget(&next, &mut running, &mut tasks, &spawn_target);
                    while tasks.try_join_next().is_some() {}
                    tokio::select! {
                        () = stopping(&mut stop) => break,
                        changed = discovered.changed() => if changed.is_err() { stopping(&mut stop).await; break },
                    }
                }
            }
        }
        tracing::info!(grace = ?self.config.grace_period, "Shutting down");
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.grace_period, drain)
            .await
            .is_err()
        {
            tracing::warn!("Grace period over; aborting the remaining tasks");
        }
        Ok(())
    }
}

/// One target's scrape loop.
struct TargetTask {
    remote_write: Option<SeriesSender>,
    /// The full tier's series: their encodings, and which the last scrape had (stale markers).
    series: remote_write::encode::SeriesCache,
    target: Target,
    urls: AdminUrls,
    /// How this sidecar names its inbound cluster (from its data plane).
    inbound: Arc<Inbound>,
    config: AgentConfig,
    shared: Arc<Shared>,
    scraper: Scraper,
    counters: PodCounters,
    /// Fast scrapes in a row whose stats had no inbound cluster.
    no_inbound_scrapes: u32,
    /// This pod's place in the statsd sinks, when the listener runs.
    statsd: Option<StatsdFeed>,
}

/// A pod's per-request latency: which source its window's latency comes from.
struct StatsdFeed {
    _registration: crate::statsd::Registration,
    key: Arc<WindowKey>,
    ip: std::net::IpAddr,
    source: crate::statsd::Source,
    /// Back on the scrape after the sink: the next scraped histogram delta covers requests
    /// the sink already gave, so it is skipped.
    skip_scraped: bool,
    /// The pod's histogram edges (Envoy's defaults until its first scraped histogram).
    edges_ms: Vec<f64>,
}

impl StatsdFeed {
    /// When the sidecar is sending, the sink's latencies replace the scraped ones in `delta`
    /// (those not yet folded into the window as they arrived); otherwise the scraped ones
    /// stay (once the overlap with the sink is skipped).
    fn swap_in(&mut self, sinks: &crate::statsd::Sinks, delta: Option<&mut Delta>, now_ms: u64) {
        use crate::statsd::Source;
        let requests = delta.as_ref().map_or(0, |d| d.requests);
        let taken = sinks.settle(self.ip, &self.key, &self.edges_ms, requests, now_ms);
        let was = self.source;
        self.source = if taken.is_some() {
            Source::Statsd
        } else {
            Source::Scrape
        };
        if was != self.source {
            tracing::info!(pod_ip = %self.ip, source = self.source.as_str(), "Latency source changed");
        }
        if was == Source::Statsd && self.source == Source::Scrape {
            self.skip_scraped = true;
        }
        let Some(d) = delta else { return };
        match taken {
            Some(counts) => {
                d.latency = Some(counts);
                d.edges_ms.clone_from(&self.edges_ms);
            }
            None if self.skip_scraped && d.latency.is_some() => {
                d.latency = None;
                self.skip_scraped = false;
            }
            None => {}
        }
    }
}

/// The IP address in an admin URL (`http://10.0.3.7:9901`), if it is one.
fn pod_ip(admin_url: &str) -> Option<std::net::IpAddr> {
    let rest = admin_url.split_once("://").map_or(admin_url, |(_, r)| r);
    let host = rest.split(['/', '?']).next()?;
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Scrapes in a row without the inbound cluster before a sidecar is reported as such.
const NO_INBOUND_SCRAPES: u32 = 3;

/// What to do when a sidecar's stats hold no inbound cluster, per data plane.
fn no_inbound_fix(data_plane: &crate::discover::DataPlane) -> &'static str {
    use crate::discover::DataPlane;
    match data_plane {
        DataPlane::Istio => "Istio exports an inbound cluster's stats only when proxyStatsMatcher includes them: annotate the pod template with proxy.istio.io/config as docs/quickstart.md shows",
        DataPlane::AppMesh => "no cluster matches --cluster-regex (App Mesh names its inbound cluster cds_ingress_*)",
        DataPlane::Envoy { .. } => "no cluster matches meshcanary.io/cluster-regex (or --cluster-regex)",
    }
}

/// How a target's sidecar names its inbound cluster, and the fast tier's stats filter for
/// it: App Mesh's (and a plain Envoy's without its own regex) from `--cluster-regex`.
///
/// ### Errors
/// A cluster regex that does not compile (discovery checks annotations first).
fn inbound_of(config: &AgentConfig, target: &Target) -> anyhow::Result<(Inbound, String)> {
    use crate::discover::{DataPlane, ISTIO_INBOUND};
    Ok(match &target.data_plane {
        DataPlane::AppMesh
        | DataPlane::Envoy {
            cluster_regex: None,
        } => (
            Inbound::envoy(config.cluster_regex.clone()),
            config.fast_filter.clone(),
        ),
        DataPlane::Istio => (
            Inbound {
                cluster: Regex::new(ISTIO_INBOUND)?,
                labels: InboundLabels::ISTIO,
            },
            crate::scrape::fast_filter(ISTIO_INBOUND),
        ),
        DataPlane::Envoy {
            cluster_regex: Some(re),
        } => (
            Inbound::envoy(
                Regex::new(re)
                    .map_err(|e| anyhow::anyhow!("{}: {re:?} is not a regex: {e}", target.id))?,
            ),
            crate::scrape::fast_filter(re),
        ),
    })
}

/// `interval` scaled by a random factor in [1 - spread, 1 + spread].
fn jittered(interval: Duration, spread: f64) -> Duration {
    interval.mul_f64(1.0 + spread * (2.0 * fastrand::f64() - 1.0))
}

impl TargetTask {
    async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut removed: watch::Receiver<bool>,
    ) {
        let start = Instant::now();
        let mut next_fast = start + self.config.fast_interval.mul_f64(fastrand::f64());
        let shared_every = shared_scrape_every(&self.config);
        // Fast ticks until the next full scrape, when one request serves both tiers.
        let mut ticks_to_full = shared_every.map(|every| fastrand::u32(0..every));
        let mut next_full = self
            .config
            .full_interval
            .filter(|_| shared_every.is_none())
            .map(|full| start + full.mul_f64(fastrand::f64()));
        loop {
            let full_due = next_full.unwrap_or(next_fast + Duration::from_secs(86_400));
            tokio::select! {
                biased;
                () = stopping(&mut shutdown) => return,
                () = stopping(&mut removed) => {
                    // The pod is gone: end every series it had, as Prometheus does.
                    self.end_series().await;
                    return;
                }
                () = tokio::time::sleep_until(next_fast) => {
                    match (&mut ticks_to_full, shared_every) {
                        (Some(0), Some(every)) => {
                            ticks_to_full = Some(every - 1);
                            self.both().await;
                        }
                        (Some(n), _) => {
                            *n -= 1;
                            self.fast().await;
                        }
                        _ => self.fast().await,
                    }
                    next_fast = advance(next_fast, jittered(self.config.fast_interval, 0.02));
                }
                () = tokio::time::sleep_until(full_due), if next_full.is_some() => {
                    self.full().await;
                    let full = self.config.full_interval.unwrap_or_default();
                    next_full = Some(advance(full_due, jittered(full, 0.02)));
                }
            }
        }
    }

    async fn fast(&mut self) {
        let started = std::time::Instant::now();
        let result = self
            .scraper
            .fetch_up_to(&self.urls.fast, self.config.fast_timeout, FAST_BODY_LIMIT)
            .await;
        self.count_fast_scrape(started);
        let body = match result {
            Ok(body) => body,
            Err(e) => return self.mark_down(Tier::Fast, &e),
        };
        self.shared
            .metrics
            .scrape
            .bytes
            .get_or_create(&TierLabels { tier: "fast" })
            .inc_by(body.len() as u64);
        self.read_fast(body, started).await;
    }

    /// One request for both tiers (see [`shared_scrape_every`]): the full body, of which
    /// the fast tier reads the inbound cluster's lines. If it fails, the fast tier still
    /// makes its own (filtered, small) request this tick, unless no connection could be made.
    async fn both(&mut self) {
        let started = std::time::Instant::now();
        let body = match self.fetch_full(started).await {
            Ok(body) => body,
            Err(e) => {
                self.full_failed(&e).await;
                if !matches!(e, ScrapeError::Connect { .. }) {
                    // Too large, too slow, or refused: a filtered answer may still come.
                    return self.fast().await;
                }
                self.count_fast_scrape(started);
                return self.mark_down(Tier::Fast, &e);
            }
        };
        self.count_fast_scrape(started);
        let lines = if body.len() <= INLINE_WORK_BYTES {
            inbound_lines(&body)
        } else {
            let body = body.clone();
            sized_work(body.len(), move || inbound_lines(&body)).await
        };
        self.read_fast(lines.into(), started).await;
        if let Err(e) = self.read_full(body).await {
            self.full_failed(&e).await;
        }
    }

    /// Read a fast-tier body (`started`: when its scrape began) into the windows.
    async fn read_fast(&mut self, body: bytes::Bytes, started: std::time::Instant) {
        let m = &self.shared.metrics;
        let body_len = body.len();
        let limit = self.config.sample_limit;
        // A filtered fast body is a few KB, read here without copying what it needs; a
        // sidecar that ignores the filter is parsed on the blocking pool (see `sized_work`).
        let read = if body_len <= INLINE_WORK_BYTES {
            fast_snapshot(&body, limit, &self.inbound, &m.scrape, &self.target.id)
        } else {
            let (metrics, regex, id) = (
                self.shared.metrics.scrape.clone(),
                Arc::clone(&self.inbound),
                self.target.id.clone(),
            );
            sized_work(body_len, move || {
                fast_snapshot(&body, limit, &regex, &metrics, &id)
            })
            .await
        };
        let snapshot = match read {
            Ok(snapshot) => snapshot,
            Err(samples) => {
                let error = ScrapeError::SampleLimit {
                    uri: self.urls.fast.clone(),
                    samples,
                    limit,
                };
                return self.mark_down(Tier::Fast, &error);
            }
        };
        let now_ms = unix_ms();
        // Reported after three scrapes in a row, not one: a sidecar that is still receiving
        // its configuration has no inbound cluster for a moment.
        let missing_inbound = if snapshot.matched {
            self.no_inbound_scrapes = 0;
            false
        } else {
            self.shared.metrics.scrape.no_inbound.inc();
            self.no_inbound_scrapes = self.no_inbound_scrapes.saturating_add(1);
            if self.no_inbound_scrapes == NO_INBOUND_SCRAPES {
                tracing::warn!(target_id = %self.target.id, data_plane = self.target.data_plane.name(), fix = no_inbound_fix(&self.target.data_plane), "The sidecar's stats have no inbound cluster: its requests are not counted");
            }
            self.no_inbound_scrapes >= NO_INBOUND_SCRAPES
        };
        if let Some(feed) = &mut self.statsd {
            if !snapshot.edges_ms.is_empty() && snapshot.edges_ms != feed.edges_ms {
                feed.edges_ms.clone_from(&snapshot.edges_ms);
            }
        }
        let mut delta = self.counters.advance(snapshot, now_ms);
        if let (Some(feed), Some(sinks)) = (&mut self.statsd, &self.shared.statsd) {
            feed.swap_in(sinks, delta.as_mut(), now_ms);
        }
        {
            let mut windows = lock(&self.shared.windows);
            // A scrape that was in flight when discovery removed this target must not bring
            // its window back: `retarget` drops the windows no target feeds after removing
            // the target, so checking under the windows lock closes the race.
            if !lock(&self.shared.targets).contains_key(&self.target.id) {
                return;
            }
            let window = windows.entry(&self.target.key);
            match &delta {
                Some(d) => window.record(d, now_ms),
                None => window.touch(now_ms),
            }
            window.mark_inbound(&self.target.pod, !missing_inbound, now_ms);
        }
        if delta.as_ref().is_some_and(|d| d.reset) {
            m.window
                .counter_resets
                .get_or_create(&WorkloadLabels::from(&self.target.key))
                .inc();
            tracing::info!(target_id = %self.target.id, "Envoy counters went down: sidecar restarted; counting from zero");
        }
        m.window.record_scrape_to_window(started.elapsed());
        self.mark_up();
    }

    /// A fast-tier scrape begun at `started`, its own or served by a full one.
    fn count_fast_scrape(&self, started: std::time::Instant) {
        let m = &self.shared.metrics.scrape;
        m.scrapes.get_or_create(&TierLabels { tier: "fast" }).inc();
        m.record_duration(Tier::Fast, started.elapsed());
    }

    async fn full(&mut self) {
        let started = std::time::Instant::now();
        let outcome = match self.fetch_full(started).await {
            Ok(body) => self.read_full(body).await,
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            self.full_failed(&e).await;
        }
    }

    /// A full-tier body (counted), or why there is none.
    async fn fetch_full(
        &mut self,
        started: std::time::Instant,
    ) -> Result<bytes::Bytes, ScrapeError> {
        let m = Arc::clone(&self.shared.metrics);
        m.scrape
            .scrapes
            .get_or_create(&TierLabels { tier: "full" })
            .inc();
        let result = self
            .scraper
            .fetch(&self.urls.full, self.config.full_timeout)
            .await;
        m.scrape.record_duration(Tier::Full, started.elapsed());
        if let Ok(body) = &result {
            m.scrape
                .bytes
                .get_or_create(&TierLabels { tier: "full" })
                .inc_by(body.len() as u64);
        }
        result
    }

    async fn full_failed(&mut self, e: &ScrapeError) {
        self.shared
            .metrics
            .scrape
            .errors
            .get_or_create(&ErrorLabels {
                tier: "full",
                reason: e.reason(),
            })
            .inc();
        tracing::warn!(target_id = %self.target.id, error = %e, "Full-tier scrape failed");
        // As Prometheus does for a failed scrape: every series of the target ends.
        self.end_series().await;
    }

    /// Check, parse and encode a full-tier body (a big one on the blocking pool, so a big
    /// sidecar never delays another target's fast tier; see `sized_work`), then hand its
    /// series to remote write.
    async fn read_full(&mut self, body: bytes::Bytes) -> Result<(), ScrapeError> {
        let limit = self.config.sample_limit;
        let metrics = self.shared.metrics.scrape.clone();
        let count_error = move |e: &crate::parse::LineError| {
            metrics
                .parse_errors
                .get_or_create(&ErrorLabels {
                    tier: "full",
                    reason: e.kind.reason(),
                })
                .inc();
        };
        let over = |samples| ScrapeError::SampleLimit {
            uri: self.urls.full.clone(),
            samples,
            limit,
        };
        let m = Arc::clone(&self.shared.metrics);
        let Some((rw, rw_config)) = self
            .remote_write
            .as_ref()
            .zip(self.config.remote_write.as_ref())
        else {
            // No remote write configured: parse to count, so the tier is still observable.
            let samples = sized_work(body.len(), move || {
                if let Some(n) = over_sample_limit(&body, limit) {
                    return Err(n);
                }
                let mut samples = 0u64;
                for r in Parser::new(&body) {
                    match r {
                        Ok(_) => samples += 1,
                        Err(e) => count_error(&e),
                    }
                }
                Ok(samples)
            })
            .await
            .map_err(over)?;
            m.scrape.full_samples.inc_by(samples);
            return Ok(());
        };
        let labels = self.target_labels(rw_config);
        let (drop_rules, shards) = (rw_config.drop.clone(), rw_config.shards);
        let mut series = std::mem::take(&mut self.series);
        let (series, encoded) = sized_work(body.len(), move || {
            if let Some(n) = over_sample_limit(&body, limit) {
                return (series, Err(n));
            }
            let encoder = remote_write::encode::Encoder::new(&labels, &drop_rules, shards);
            let mut chunks = encoder.new_chunks();
            let counts =
                encoder.encode_cached(&mut series, &body, unix_ms_i64(), &mut chunks, count_error);
            (series, Ok((chunks, counts)))
        })
        .await;
        self.series = series;
        let (chunks, counts) = encoded.map_err(over)?;
        m.scrape
            .full_samples
            .inc_by((counts.kept + counts.dropped) as u64);
        m.remote_write
            .samples
            .get_or_create(&OutcomeLabels {
                outcome: "dropped_by_rules",
            })
            .inc_by(counts.dropped as u64);
        // Waits only for the local batcher (a bounded channel), never for the network.
        if rw.send(chunks).await.is_err() {
            tracing::debug!("Remote write has stopped; full-tier samples not queued");
        }
        Ok(())
    }

    /// The labels the reference collector puts on a target's series.
    fn target_labels(&self, rw: &remote_write::RemoteWriteConfig) -> Vec<(String, String)> {
        let mut labels = vec![
            ("instance".to_owned(), self.target.instance().to_owned()),
            ("job".to_owned(), rw.job.clone()),
            (
                "kubernetes_namespace".to_owned(),
                self.target.key.namespace.clone(),
            ),
            ("kubernetes_pod_name".to_owned(), self.target.pod.clone()),
        ];
        labels.extend(rw.external_labels.iter().cloned());
        labels
    }

    /// Write a stale marker for every series of the last full scrape (it failed, or the
    /// target is gone), as Prometheus does, and forget them.
    async fn end_series(&mut self) {
        let (Some(rw), Some(rw_config)) = (&self.remote_write, &self.config.remote_write) else {
            return;
        };
        if self.series.is_empty() {
            return;
        }
        let labels = self.target_labels(rw_config);
        let encoder =
            remote_write::encode::Encoder::new(&labels, &rw_config.drop, rw_config.shards);
        let mut chunks = encoder.new_chunks();
        let n = encoder.end_all(&mut self.series, unix_ms_i64(), &mut chunks);
        tracing::debug!(target_id = %self.target.id, series = n, "Writing stale markers");
        let _ = rw.send(chunks).await;
    }

    fn mark_up(&self) {
        let mut targets = lock(&self.shared.targets);
        if let Some(status) = targets.get_mut(&self.target.id) {
            if !status.up && status.scraped_once {
                tracing::info!(target_id = %self.target.id, "Target is back up");
            }
            status.up = true;
            status.scraped_once = true;
            status.last_error = None;
            if let Some(feed) = &self.statsd {
                status.latency_source = feed.source;
            }
        }
        self.shared.update_readiness(&targets);
    }

    fn mark_down(&self, tier: Tier, error: &ScrapeError) {
        self.shared
            .metrics
            .scrape
            .errors
            .get_or_create(&ErrorLabels {
                tier: tier.as_str(),
                reason: error.reason(),
            })
            .inc();
        let mut targets = lock(&self.shared.targets);
        if let Some(status) = targets.get_mut(&self.target.id) {
            if status.up || !status.scraped_once && status.last_error.is_none() {
                tracing::warn!(target_id = %self.target.id, reason = error.reason(), error = %error, "Target is down");
            }
            status.up = false;
            status.last_error = Some(error.to_string());
        }
    }
}

/// When one request can serve both tiers: every this many fast ticks, the full scrape
/// is made at the fast tick and the fast tier reads its answer, instead of each tier
/// asking the sidecar on its own. That holds when the full interval is at least the fast
/// one (it is then rounded to a whole number of fast intervals, the same at the 1 s / 15 s
/// defaults) and the full tier's timeout fits the fast tier's, so the decision input is
/// never waited for longer than on its own. Halves the requests (and the agent's
/// wake-ups) when both tiers run every second.
fn shared_scrape_every(config: &AgentConfig) -> Option<u32> {
    let full = config.full_interval?;
    if full < config.fast_interval || config.full_timeout > config.fast_timeout {
        return None;
    }
    let every = (full.as_secs_f64() / config.fast_interval.as_secs_f64()).round();
    Some(every.clamp(1.0, f64::from(u32::MAX)) as u32)
}

/// The lines of a full-tier body that the fast tier reads ([`InboundSnapshot::extract`]
/// reads requests by code and latency buckets, which carry the cluster label; which
/// clusters count it decides as for a filtered body), so it parses a few KB instead of
/// the whole body. In body order, each ending in a newline.
fn inbound_lines(body: &[u8]) -> Vec<u8> {
    use crate::window::inbound::{LATENCY_BUCKET, MEMBERSHIP_METRIC, REQUESTS_METRIC};
    let mut starts: Vec<usize> = Vec::new();
    for name in [REQUESTS_METRIC, LATENCY_BUCKET, MEMBERSHIP_METRIC] {
        let prefix = [name.as_bytes(), b"{"].concat();
        if body.starts_with(&prefix) {
            starts.push(0);
        }
        let needle = [b"\n".as_slice(), &prefix].concat();
        starts.extend(memchr::memmem::find_iter(body, &needle).map(|at| at + 1));
    }
    starts.sort_unstable();
    let mut out = Vec::new();
    for start in starts {
        let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |n| start + n);
        out.extend_from_slice(&body[start..end]);
        out.push(b'\n');
    }
    out
}

/// The fast tier's body cap: its filtered answer is a few KB (under 10 KB with 50
/// clusters), so a bigger one is a sidecar ignoring the filter, refused as
/// `body_too_large` before it costs memory every second.
pub const FAST_BODY_LIMIT: usize = 4 << 20;

/// Bodies up to this size are parsed and encoded on the worker they arrive on; larger ones
/// on the blocking pool. Encoding runs at about 5 µs per KB (`benches/remote_write.rs`,
/// cached), so a worker is held at most about a millisecond, far inside the fast tier's
/// ±2 % (20 ms) jitter, while each trip to the blocking pool costs two thread wake-ups, and
/// wake-ups were about a quarter of the agent's CPU in `scripts/bench-peers.sh` (see "The
/// remote-write hot path" in `docs/architecture.md`).
const INLINE_WORK_BYTES: usize = 256 * 1024;

/// Run CPU work on a body of `len` bytes: here when it is small, else on tokio's blocking
/// pool, off the workers that keep every target's 1 s cadence.
async fn sized_work<T: Send + 'static>(len: usize, work: impl FnOnce() -> T + Send + 'static) -> T {
    if len <= INLINE_WORK_BYTES {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// The inbound counters of a fast-tier body (rejected lines are counted and skipped), or
/// its sample count once past `limit`.
fn fast_snapshot(
    body: &[u8],
    limit: usize,
    inbound: &Inbound,
    metrics: &ScrapeMetrics,
    target_id: &str,
) -> Result<InboundSnapshot, usize> {
    if let Some(n) = over_sample_limit(body, limit) {
        return Err(n);
    }
    let parser = Parser::new(body).filter_map(|r| match r {
        Ok(s) => Some(s),
        Err(e) => {
            metrics
                .parse_errors
                .get_or_create(&ErrorLabels {
                    tier: "fast",
                    reason: e.kind.reason(),
                })
                .inc();
            tracing::debug!(target_id, error = %e, "Rejected a line of Envoy output");
            None
        }
    });
    Ok(InboundSnapshot::extract(parser, inbound))
}

/// Remote-write the agent's own metrics every full interval, as a collector scraping it
/// would (`job="meshcanary"`).
async fn self_scrape(
    shared: Arc<Shared>,
    config: crate::remote_write::RemoteWriteConfig,
    tx: SeriesSender,
    every: Duration,
    instance: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    // `instance` tells the agents apart: without it, every agent of a cluster would write
    // the same series and the receiver would reject their interleaved samples.
    let mut labels = vec![
        ("instance".to_owned(), instance),
        ("job".to_owned(), "meshcanary".to_owned()),
    ];
    labels.extend(config.external_labels.iter().cloned());
    loop {
        tokio::select! {
            () = stopping(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let text = shared.render_metrics();
        let ts = unix_ms_i64();
        let none = crate::remote_write::relabel::DropRules::none();
        let encoder = remote_write::encode::Encoder::new(&labels, &none, config.shards);
        let mut chunks = encoder.new_chunks();
        encoder.encode(text.as_bytes(), ts, &mut chunks, |_| {}, None, |_| {});
        if tx.send(chunks).await.is_err() {
            return;
        }
    }
}

/// The workloads this agent has a canary window of (the standalone analysis judges those
/// that also have a primary).
fn analysed(shared: &Shared) -> Vec<crate::workload::WorkloadId> {
    let mut out: Vec<crate::workload::WorkloadId> = lock(&shared.windows)
        .keys()
        .into_iter()
        .filter(|k| k.role == Role::Canary)
        .map(|k| crate::workload::WorkloadId::new(k.namespace.clone(), k.workload.clone()))
        .collect();
    out.dedup();
    out
}

/// Data older than three fast scrapes (at least 3 s) is stale: a sidecar stopped answering.
pub fn stale_after(fast_interval: Duration) -> u64 {
    (fast_interval * 3).max(Duration::from_secs(3)).as_millis() as u64
}

impl crate::window::WindowSource for Shared {
    fn pair(
        &self,
        namespace: &str,
        workload: &str,
        now_ms: u64,
    ) -> Option<crate::window::WindowPair> {
        lock(&self.windows).pair(namespace, workload, now_ms, self.stale_after_ms)
    }
}

/// The next deadline after `deadline`, skipping ticks missed while a slow scrape ran.
fn advance(deadline: Instant, step: Duration) -> Instant {
    let now = Instant::now();
    let mut next = deadline + step;
    if next < now {
        next = now + step;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            targets: vec![],
            fast_interval: Duration::from_secs(1),
            full_interval: Some(Duration::from_secs(15)),
            fast_timeout: Duration::from_millis(800),
            full_timeout: Duration::from_secs(10),
            max_body_bytes: 32 << 20,
            sample_limit: 100_000,
            cluster_regex: Regex::new("^cds_ingress_").unwrap(),
            fast_filter: crate::scrape::fast_filter("^cds_ingress_"),
            window: WindowConfig::default(),
            listen: None,
            http_limits: crate::telemetry::HttpLimits::default(),
            grace_period: Duration::from_secs(5),
            policy: Policy::default(),
            remote_write: None,
            kube: None,
            statsd: None,
        }
    }

    #[test]
    fn pod_ips_from_admin_urls() {
        assert_eq!(pod_ip("http://10.0.3.7:9901"), "10.0.3.7".parse().ok());
        assert_eq!(pod_ip("http://[fd00::7]:9901/"), "fd00::7".parse().ok());
        assert_eq!(pod_ip("127.0.0.1:9901"), "127.0.0.1".parse().ok());
        assert_eq!(pod_ip("http://envoy.local:9901"), None);
    }

    #[test]
    fn conflicting_settings_are_reported() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.fast_timeout = Duration::from_secs(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--scrape-timeout"));
        let mut c = config();
        c.full_timeout = Duration::from_secs(20);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--full-timeout"));
        let mut c = config();
        let t = crate::discover::parse_static_target("a/canary=http://x:1").unwrap();
        c.targets = vec![t.clone(), t];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn one_request_serves_both_tiers_only_when_it_delays_neither() {
        let mut c = config();
        assert_eq!(
            shared_scrape_every(&c),
            None,
            "full timeout 10 s > fast 800 ms"
        );
        c.full_timeout = Duration::from_millis(800);
        assert_eq!(shared_scrape_every(&c), Some(15));
        c.full_interval = Some(Duration::from_millis(1400));
        assert_eq!(shared_scrape_every(&c), Some(1));
        c.full_interval = Some(Duration::from_millis(250));
        assert_eq!(shared_scrape_every(&c), None, "full more often than fast");
        c.full_interval = None;
        assert_eq!(shared_scrape_every(&c), None);
    }

    #[test]
    fn the_fast_tier_reads_the_same_counters_from_a_full_body() {
        for capture in ["envoy-1.40-1-clusters.prom", "envoy-1.40-10-clusters.prom"] {
            let path = format!("{}/tests/fixtures/{capture}", env!("CARGO_MANIFEST_DIR"));
            let full = std::fs::read(path).unwrap();
            let metrics = ScrapeMetrics::register(&mut MetricRegistry::default());
            let regex = config().cluster_regex;
            let read = |body: &[u8]| {
                fast_snapshot(body, 1 << 20, &Inbound::envoy(regex.clone()), &metrics, "t").unwrap()
            };
            let lines = inbound_lines(&full);
            assert!(
                lines.len() * 10 < full.len(),
                "{capture}: {} bytes",
                lines.len()
            );
            let snapshot = read(&lines);
            assert!(
                snapshot.matched && !snapshot.cumulative.is_empty(),
                "{capture}"
            );
            assert_eq!(snapshot, read(&full), "{capture}");
        }
        // First and last lines, without a final newline.
        let body = b"envoy_cluster_upstream_rq{envoy_cluster_name=\"a\"} 1\nx 2\nenvoy_cluster_upstream_rq_time_bucket{le=\"1\"} 3";
        assert_eq!(
            inbound_lines(body),
            b"envoy_cluster_upstream_rq{envoy_cluster_name=\"a\"} 1\nenvoy_cluster_upstream_rq_time_bucket{le=\"1\"} 3\n"
        );
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(1), 0.02);
            assert!(d >= Duration::from_millis(980) && d <= Duration::from_millis(1020));
        }
    }
}
