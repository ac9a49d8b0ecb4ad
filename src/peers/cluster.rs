//! The leader's view of every node: it discovers the agents from the DaemonSet's pods,
//! polls each one's peer port at every decision tick, and merges the replies with its own
//! node's windows ([`super::Merged`]). The controller reads it as its [`WindowSource`].

use std::collections::{BTreeMap, HashMap};
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
use crate::agent::{unix_ms, Shared};
use crate::telemetry::{lock, ResultLabels};
use crate::window::{WindowPair, WindowSource};

/// A peer reply larger than this is refused (a node with thousands of windows is far below).
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// How agents find and reach each other.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Where this agent serves its windows.
    pub listen: SocketAddr,
    /// Namespace and label selector of the DaemonSet's pods.
    pub namespace: String,
    pub selector: String,
    /// The projected ServiceAccount token sent to peers (re-read at every poll: the kubelet
    /// rotates it).
    pub token_file: Option<PathBuf>,
    /// The token audience peers check.
    pub audience: String,
    /// The agents' ServiceAccount name (in `namespace`): the only user peers answer.
    pub service_account: String,
    /// How long one poll may take before the peer counts as not answering.
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
    let port = config.listen.port();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // The store fills as a whole when the initial list is done, and changes with every
        // event after; reading it once a second (as discovery does) sees both.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = crate::agent::stopping(&mut shutdown) => return,
                item = stream.next() => match item {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "Watching the agents' pods failed; retrying");
                    }
                    Some(Ok(_)) => {}
                },
                _ = tick.tick() => {
                    let next = peers_of(&store.state(), port);
                    tx.send_if_modified(|current| {
                        if *current == next {
                            return false;
                        }
                        tracing::info!(peers = ?next.iter().map(|p| &p.name).collect::<Vec<_>>(), "Peers changed");
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

/// Every node's windows, as the leader sees them.
pub struct Cluster {
    merged: Merged,
    local: Arc<Shared>,
    /// This agent's pod name: its own node is read from memory, not over the network.
    me: String,
    node: String,
    peers: watch::Receiver<Vec<Peer>>,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    config: PeerConfig,
    /// The last error logged per peer, so each distinct one is logged once.
    failing: Mutex<HashMap<String, String>>,
}

impl Cluster {
    pub fn new(
        local: Arc<Shared>,
        me: String,
        node: String,
        peers: watch::Receiver<Vec<Peer>>,
        config: PeerConfig,
    ) -> Self {
        let window = lock(&local.windows).config();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        Cluster {
            merged: Merged::new(window, local.stale_after_ms),
            me,
            node,
            local,
            peers,
            http: HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            config,
            failing: Mutex::new(HashMap::new()),
        }
    }

    /// Poll every peer once and fold the answers in.
    pub async fn poll_all(&self) {
        let peers: Vec<Peer> = self
            .peers
            .borrow()
            .iter()
            .filter(|p| p.name != self.me)
            .cloned()
            .collect();
        let cursors: BTreeMap<String, u64> = {
            let mut replicas = lock(&self.merged.peers);
            replicas.retain(|name, _| *name == self.me || peers.iter().any(|p| p.name == *name));
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
            async move { (p, self.poll(p, since, token).await) }
        });
        let answers = futures_util::future::join_all(polls).await;
        let now = unix_ms();
        let metrics = &self.local.metrics;
        let mut replicas = lock(&self.merged.peers);
        {
            let local = lock(&self.local.windows);
            let mine = replicas
                .entry(self.me.clone())
                .or_insert_with(|| Replica::new(self.merged.config));
            let reply = super::snapshot(&local, mine.cursor, now, &self.node);
            mine.apply(reply, now);
        }
        let mut failing = lock(&self.failing);
        for (peer, answer) in answers {
            let result = match answer {
                Ok((reply, took)) => {
                    metrics.peer_poll_seconds.observe(took.as_secs_f64());
                    let invalid = replicas
                        .get_mut(&peer.name)
                        .map(|r| r.apply(reply, now))
                        .unwrap_or_default();
                    if failing.remove(&peer.name).is_some() {
                        tracing::info!(peer = %peer.name, node = %peer.node, "Peer answers again");
                    }
                    if invalid.is_empty() {
                        "ok"
                    } else {
                        tracing::warn!(peer = %peer.name, node = %peer.node, skipped = ?invalid, "A peer sent windows that fail their checks (another version, or not a meshcanary agent); they are not used");
                        "invalid"
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    if failing.get(&peer.name) != Some(&message) {
                        tracing::warn!(peer = %peer.name, node = %peer.node, addr = %peer.addr, %error, "Peer did not answer; its node's workloads halt while its windows are stale");
                        failing.insert(peer.name.clone(), message);
                    }
                    error.result()
                }
            };
            metrics
                .peer_polls
                .get_or_create(&ResultLabels { result })
                .inc();
        }
        failing.retain(|name, _| replicas.contains_key(name));
        let stale = self.local.stale_after_ms;
        let ages: Vec<Option<u64>> = replicas
            .values()
            .map(|r| r.answered_ms.map(|t| now.saturating_sub(t)))
            .collect();
        metrics.peers_known.set(ages.len() as i64);
        metrics.peers_up.set(
            ages.iter()
                .filter(|a| a.is_some_and(|a| a <= stale))
                .count() as i64,
        );
        let oldest = ages
            .iter()
            .map(|a| a.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0))
            .fold(0.0, f64::max);
        metrics.merged_window_age.set(oldest);
    }

    fn token(&self) -> Result<String, String> {
        let Some(path) = &self.config.token_file else {
            return Ok(String::new());
        };
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("reading {}: {e}", path.display()))
    }

    async fn poll(
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
            WindowsReply::decode(body).map_err(|e| PollError::Decode(e.to_string()))
        };
        let reply = tokio::time::timeout(self.config.timeout, exchange)
            .await
            .map_err(|_| PollError::Timeout(self.config.timeout))??;
        Ok((reply, started.elapsed()))
    }
}

impl WindowSource for Cluster {
    fn pair(&self, namespace: &str, workload: &str, now_ms: u64) -> Option<WindowPair> {
        self.merged.pair(namespace, workload, now_ms)
    }

    async fn refresh(&self) {
        self.poll_all().await;
    }
}
