//! The controller's view of every node: it discovers the agents from the DaemonSet's pods,
//! polls each one's peer port at every decision tick and merges the replies
//! ([`super::Merged`]). The controller reads it as its [`WindowSource`].
//!
//! With a [`Placement`] (where every workload's pods run), an agent's windows count only
//! for workloads that have a pod on that agent's node, and a workload with a pod on a node
//! whose agent does not answer is stale ([`Stale::NoAgent`]): it halts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::{Client, ResourceExt as _};
use prost::Message as _;
use tokio::sync::watch;

use super::{Merged, Replica, WindowsReply};
use crate::clock::unix_ms;
use crate::placement::{NodeIndex, Placement};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::ResultLabels;
use crate::telemetry::{lock, GaugeF, MetricRegistry};
use crate::window::{Stale, WindowConfig, WindowPair, WindowSource};
use crate::workload::WorkloadId;

/// A peer reply larger than this is refused (a node with thousands of windows is far below).
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// An agent that no workload under analysis needs is polled about once every this many
/// ticks (a slice of them each tick), so its health stays known without a burst.
pub const COLD_ROUNDS: usize = 10;

/// A peer reply with more windows than this is refused: a node runs at most a few hundred
/// pods, each in one window.
pub const MAX_REPLY_WINDOWS: usize = 4096;

/// How the controller finds and reaches the agents.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The agents' peer port (on their pod IPs).
    pub port: u16,
    /// Namespace and label selector of the agents' (the DaemonSet's) pods.
    pub namespace: String,
    pub selector: String,
    /// The projected ServiceAccount token sent to the agents (re-read at every poll: the
    /// kubelet rotates it).
    pub token_file: Option<PathBuf>,
    /// How long one poll may take before the agent counts as not answering.
    pub timeout: Duration,
}

/// One agent to poll.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Pod name (the agent's identity).
    pub name: String,
    pub node: String,
    pub addr: SocketAddr,
}

/// The agents among `pods`: Running with an IP and not being deleted. Pure.
pub fn peers_of(pods: &[Arc<Pod>], port: u16) -> Vec<Peer> {
    let mut out: Vec<Peer> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
            Some(Peer {
                name: p.name_any(),
                node: p.spec.as_ref()?.node_name.clone().unwrap_or_default(),
                addr: SocketAddr::new(ip, port),
            })
        })
        .collect();
    out.sort();
    out
}

/// Watch the DaemonSet's pods and publish the peers when they change.
pub fn discover(
    client: Client,
    config: &PeerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Vec<Peer>> {
    let (store, writer) = reflector::store::<Pod>();
    let api: Api<Pod> = Api::namespaced(client, &config.namespace);
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(&config.selector)),
    )
    .default_backoff()
    .touched_objects();
    let (tx, rx) = watch::channel(Vec::new());
    let port = config.port;
    let (namespace, selector) = (config.namespace.clone(), config.selector.clone());
    let mut warned_empty = false;
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // The store fills as a whole when the initial list is done, and changes with every
        // event after; reading it once a second (as discovery does) sees both.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = crate::shutdown::stopping(&mut shutdown) => return,
                item = stream.next() => match item {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Watching the agents' pods failed; retrying");
                    }
                    Some(Ok(_)) => {}
                },
                _ = tick.tick() => {
                    let next = peers_of(&store.state(), port);
                    let synced = futures_util::FutureExt::now_or_never(store.wait_until_ready())
                        .is_some_and(|r| r.is_ok());
                    if synced && next.is_empty() != warned_empty {
                        warned_empty = next.is_empty();
                        if warned_empty {
                            tracing::warn!(namespace = %namespace, selector = %selector, "No Running agent pod matches the agent selector; every workload under analysis halts (is the DaemonSet running, and does --agent-selector match its pods' labels?)");
                        }
                    }
                    tx.send_if_modified(|current| {
                        if *current == next {
                            return false;
                        }
                        tracing::info!(agents = ?next.iter().map(|p| &p.name).collect::<Vec<_>>(), "Agents changed");
                        *current = next;
                        true
                    });
                }
            }
        }
    });
    rx
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("no token to send: {0}")]
    NoToken(String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("refused our token ({0}); check the peer audience and the ServiceAccount")]
    Unauthorized(http::StatusCode),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("unreadable reply: {0}")]
    Decode(String),
}

impl PollError {
    fn result(&self) -> &'static str {
        match self {
            PollError::NoToken(_) => "no_token",
            PollError::Connect(_) => "connect",
            PollError::Timeout(_) => "timeout",
            PollError::Unauthorized(_) => "unauthorized",
            PollError::Status(_) => "status",
            PollError::Decode(_) => "decode",
        }
    }
}

/// The controller's metrics of its agents.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    known: Gauge,
    up: Gauge,
    polls: Family<ResultLabels, Counter>,
    poll_seconds: Histogram,
    merged_age: GaugeF,
}

impl ClusterMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = ClusterMetrics {
            known: Gauge::default(),
            up: Gauge::default(),
            polls: Family::default(),
            poll_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            merged_age: GaugeF::default(),
        };
        r.register(
            "meshcanary_peers_known",
            "Agents the controller knows (Running pods of the DaemonSet).",
            &[],
            &m.known,
        );
        r.register(
            "meshcanary_peers_up",
            "Agents whose last poll succeeded (those on nodes of workloads under analysis are polled every tick, the others about every tenth).",
            &[],
            &m.up,
        );
        r.register("meshcanary_peer_polls", "The controller's window polls of agents, by result: ok, invalid (answered, but some windows failed their checks or were of workloads with no pod on the agent's node, and were skipped), connect, timeout, unauthorized, status, decode, no_token.", &["result"], &m.polls);
        r.register(
            "meshcanary_peer_poll_seconds",
            "Time of one successful window poll of a peer.",
            &[],
            &m.poll_seconds,
        );
        r.register("meshcanary_merged_window_age_seconds", "Age of the oldest answer among the agents polled every tick (those on nodes of workloads under analysis); above the staleness limit, decisions on the affected workloads halt.", &[], &m.merged_age);
        m
    }
}

/// Every node's windows, as the controller sees them.
pub struct Cluster {
    merged: Merged,
    metrics: ClusterMetrics,
    stale_after_ms: u64,
    peers: watch::Receiver<Vec<Peer>>,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    config: PeerConfig,
    placement: Option<Placement>,
    /// From the last refresh: where each workload runs (`None`: not known yet), and the
    /// nodes whose agent answered within the staleness limit.
    coverage: Mutex<(Option<NodeIndex>, BTreeSet<String>)>,
    /// The last error logged per peer, so each distinct one is logged once.
    failing: Mutex<HashMap<String, String>>,
    /// Ticks polled so far (which slice of the cold agents is due).
    round: std::sync::atomic::AtomicUsize,
    /// The agents polled every tick at the last refresh.
    hot: Mutex<BTreeSet<String>>,
}

impl Cluster {
    pub fn new(
        window: WindowConfig,
        stale_after_ms: u64,
        peers: watch::Receiver<Vec<Peer>>,
        config: PeerConfig,
        metrics: ClusterMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        Cluster {
            merged: Merged::new(window, stale_after_ms),
            metrics,
            stale_after_ms,
            peers,
            http: HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            config,
            placement: None,
            coverage: Mutex::new((None, BTreeSet::new())),
            failing: Mutex::new(HashMap::new()),
            round: std::sync::atomic::AtomicUsize::new(0),
            hot: Mutex::new(BTreeSet::new()),
        }
    }

    /// Check every answer and every workload against where the pods run.
    #[must_use]
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = Some(placement);
        self
    }

    /// The nodes that run pods of `id` and whose agent did not answer at the last refresh
    /// (empty without a [`Placement`]; a placeholder while the pods are not listed yet).
    pub fn uncovered_nodes(&self, id: &WorkloadId) -> Vec<String> {
        if self.placement.is_none() {
            return Vec::new();
        }
        let coverage = lock(&self.coverage);
        match &coverage.0 {
            None => vec!["(pods not listed yet)".to_owned()],
            Some(index) => index
                .nodes(id)
                .filter(|n| !coverage.1.contains(*n))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Poll every agent once and fold the answers in.
    pub async fn poll_all(&self) {
        self.poll_agents(None).await;
    }

    /// One tick's polls: with a [`Placement`], every tick the agents on nodes that run pods
    /// of a workload under `analysis`, and a slice of the others ([`COLD_ROUNDS`]); without
    /// one, every agent.
    pub async fn poll(&self, analysis: &[WorkloadId]) {
        self.poll_agents(Some(analysis)).await;
    }

    async fn poll_agents(&self, analysis: Option<&[WorkloadId]>) {
        let index = self.placement.as_ref().and_then(Placement::index);
        let all: Vec<Peer> = self.peers.borrow().clone();
        let hot: BTreeSet<&str> = match (&index, analysis) {
            (Some(index), Some(analysis)) => {
                analysis.iter().flat_map(|id| index.nodes(id)).collect()
            }
            _ => all.iter().map(|p| p.node.as_str()).collect(),
        };
        let round = self
            .round
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peers: Vec<Peer> = all
            .iter()
            .filter(|p| !hot.contains(p.node.as_str()))
            .enumerate()
            .filter(|(i, _)| i % COLD_ROUNDS == round % COLD_ROUNDS)
            .map(|(_, p)| p)
            .chain(all.iter().filter(|p| hot.contains(p.node.as_str())))
            .cloned()
            .collect();
        let hot_now: BTreeSet<String> = all
            .iter()
            .filter(|p| hot.contains(p.node.as_str()))
            .map(|p| p.name.clone())
            .collect();
        let warmed: Vec<String> = {
            let mut before = lock(&self.hot);
            let warmed = hot_now.difference(&before).cloned().collect();
            *before = hot_now;
            warmed
        };
        let cursors: BTreeMap<String, u64> = {
            let mut replicas = lock(&self.merged.peers);
            replicas.retain(|name, _| all.iter().any(|p| p.name == *name));
            // An agent polled only now and then may have dropped and re-created a window
            // between two polls (a canary scaled to 0 and up again): its copy starts over
            // from a full answer when an analysis needs it. No workload under analysis read
            // it before (its node was cold), so no judge sees its totals restart.
            for name in &warmed {
                if let Some(r) = replicas.get_mut(name) {
                    *r = Replica::new(self.merged.config);
                }
            }
            peers
                .iter()
                .map(|p| {
                    let r = replicas
                        .entry(p.name.clone())
                        .or_insert_with(|| Replica::new(self.merged.config));
                    (p.name.clone(), r.cursor)
                })
                .collect()
        };
        let token = self.token();
        let polls = peers.iter().map(|p| {
            let since = cursors.get(&p.name).copied().unwrap_or(0);
            let token = token.clone();
            async move { (p, self.poll_one(p, since, token).await) }
        });
        let answers = futures_util::future::join_all(polls).await;
        let now = unix_ms();
        let metrics = &self.metrics;
        let mut replicas = lock(&self.merged.peers);
        let mut failing = lock(&self.failing);
        for (peer, answer) in answers {
            let result = match answer {
                Ok((mut reply, took)) => {
                    metrics.poll_seconds.observe(took.as_secs_f64());
                    let before = reply.windows.len();
                    if let Some(index) = &index {
                        // An agent speaks only for the pods of its own node.
                        reply.windows.retain(|w| {
                            let id = WorkloadId::new(&*w.namespace, &*w.workload);
                            index.runs_on(&id, &peer.node)
                        });
                    }
                    let foreign = before - reply.windows.len();
                    let invalid = replicas
                        .get_mut(&peer.name)
                        .map(|r| r.apply(reply, now))
                        .unwrap_or_default();
                    if failing.remove(&peer.name).is_some() {
                        tracing::info!(peer = %peer.name, node = %peer.node, "Agent answers again");
                    }
                    if invalid.is_empty() && foreign == 0 {
                        "ok"
                    } else {
                        tracing::warn!(peer = %peer.name, node = %peer.node, skipped = ?invalid, foreign, "An agent sent windows that fail their checks, or of workloads with no pod on its node (another version, or not a meshcanary agent); they are not used");
                        "invalid"
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    if failing.get(&peer.name) != Some(&message) {
                        tracing::warn!(peer = %peer.name, node = %peer.node, addr = %peer.addr, %error, "Agent did not answer; its node's workloads halt while its windows are stale");
                        failing.insert(peer.name.clone(), message);
                    }
                    error.result()
                }
            };
            metrics.polls.get_or_create(&ResultLabels { result }).inc();
        }
        failing.retain(|name, _| replicas.contains_key(name));
        let stale = self.stale_after_ms;
        let fresh = |r: &Replica| {
            r.answered_ms
                .is_some_and(|t| now.saturating_sub(t) <= stale)
        };
        let answering: BTreeSet<String> = all
            .iter()
            .filter(|p| replicas.get(&p.name).is_some_and(fresh))
            .map(|p| p.node.clone())
            .collect();
        let polled = replicas
            .keys()
            .filter(|name| !failing.contains_key(*name))
            .filter(|name| replicas[*name].answered_ms.is_some())
            .count();
        metrics.known.set(replicas.len() as i64);
        metrics.up.set(polled as i64);
        let oldest = all
            .iter()
            .filter(|p| hot.contains(p.node.as_str()))
            .filter_map(|p| replicas.get(&p.name))
            .map(|r| {
                r.answered_ms
                    .map_or(f64::INFINITY, |t| now.saturating_sub(t) as f64 / 1000.0)
            })
            .fold(0.0, f64::max);
        metrics.merged_age.set(oldest);
        drop(failing);
        drop(replicas);
        *lock(&self.coverage) = (index, answering);
    }

    fn token(&self) -> Result<String, String> {
        let Some(path) = &self.config.token_file else {
            return Ok(String::new());
        };
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("reading {}: {e}", path.display()))
    }

    async fn poll_one(
        &self,
        peer: &Peer,
        since: u64,
        token: Result<String, String>,
    ) -> Result<(WindowsReply, Duration), PollError> {
        let token = token.map_err(PollError::NoToken)?;
        let started = Instant::now();
        let mut req = http::Request::get(format!("http://{}/v1/windows?since={since}", peer.addr));
        if !token.is_empty() {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| PollError::Connect(e.to_string()))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| PollError::Connect(e.to_string()))?;
            let status = resp.status();
            if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
                return Err(PollError::Unauthorized(status));
            }
            if !status.is_success() {
                return Err(PollError::Status(status));
            }
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| PollError::Decode(e.to_string()))?
                .to_bytes();
            let reply = WindowsReply::decode(body).map_err(|e| PollError::Decode(e.to_string()))?;
            if reply.windows.len() > MAX_REPLY_WINDOWS {
                return Err(PollError::Decode(format!(
                    "{} windows, more than {MAX_REPLY_WINDOWS}",
                    reply.windows.len()
                )));
            }
            Ok(reply)
        };
        let reply = tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| PollError::Timeout(self.config.timeout))??;
        Ok((reply, started.elapsed()))
    }
}

impl WindowSource for Cluster {
    fn pair(&self, namespace: &str, workload: &str, now_ms: u64) -> Option<WindowPair> {
        // Where the pods run is known: the agents of exactly those nodes must have answered
        // (an agent elsewhere that never answers holds nothing of this workload).
        let placed = lock(&self.coverage).0.is_some();
        let pair = self
            .merged
            .pair_checking(namespace, workload, now_ms, !placed);
        if self
            .uncovered_nodes(&WorkloadId::new(namespace, workload))
            .is_empty()
        {
            return pair;
        }
        // A node that runs one of its pods has no agent answering: unobserved, not healthy
        // (and a canary whose only node is unobserved is not a silent canary).
        let mut pair = pair.unwrap_or_default();
        pair.stale = Some(Stale::NoAgent);
        Some(pair)
    }

    async fn refresh(&self, analysis: Vec<WorkloadId>) {
        self.poll(&analysis).await;
    }

    fn uncovered(&self, namespace: &str, workload: &str) -> Vec<String> {
        self.uncovered_nodes(&WorkloadId::new(namespace, workload))
    }
}
