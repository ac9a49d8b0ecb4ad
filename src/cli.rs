//! The command line: flags with environment fallbacks, parsed once into [`AgentConfig`].

use std::io::{BufWriter, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{require, ConfigError};
use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::agent::{Agent, AgentConfig};
use crate::config::{parse_bytes, parse_duration};
use crate::discover::parse_static_target;
use crate::parse::{LineError, Sample};
use crate::window::WindowConfig;

#[derive(Debug, Parser)]
#[command(
    name = "meshcanary",
    version,
    about = "Node-local canary analysis and rollback for Envoy meshes"
)]
pub struct Cli {
    /// Log format: `text` or `json`.
    #[arg(
        long,
        env = "MESHCANARY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: String,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `meshcanary=debug`.
    #[arg(long, env = "MESHCANARY_LOG", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the DaemonSet): scrape this node's sidecars, keep the windows, serve
    /// them to the controller, remote write, serve /metrics. It writes nothing to the cluster.
    Agent(AgentArgs),
    /// Run the controller (a Deployment): poll the agents' windows, judge, run the rollouts
    /// and drive the router, as the elected one of its replicas.
    Controller(ControllerArgs),
    /// Run the same pipeline with a live terminal view of every window, refreshed each second.
    Watch(AgentArgs),
    /// Print every sample of a Prometheus text file as one JSON object per line; rejected
    /// lines go to stderr with their line number. Exits 1 if any line was rejected.
    Parse {
        /// The file to read (`-` for standard input).
        file: String,
    },
    /// Monte Carlo comparison of the judge with Flagger's rule and an oracle SPRT on the same
    /// simulated traffic; prints the table of docs/judge.md and a closing summary line.
    Simulate {
        /// Seed of the random traffic: the same seed prints the same table.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Runs per A/A (healthy canary) scenario.
        #[arg(long, default_value_t = 1000)]
        aa_runs: usize,
        /// Runs per A/B (faulty canary) scenario.
        #[arg(long, default_value_t = 200)]
        ab_runs: usize,
        /// False-rollback budget of the sequential tests.
        #[arg(long, default_value_t = 0.01)]
        alpha: f64,
        /// Print only the oracle's time to rollback for a canary with this many requests per
        /// second (with --canary-event and --primary-event): the information limit a lab
        /// scenario is compared with.
        #[arg(long)]
        oracle_canary_rps: Option<f64>,
        /// Probability that a canary request is an event (a 5xx, or slower than the edge).
        #[arg(long, default_value_t = 0.5)]
        canary_event: f64,
        /// The same probability for the primary (the null the oracle knows).
        #[arg(long, default_value_t = 0.001)]
        primary_event: f64,
    },
    /// Print generated reference documentation.
    Docs {
        #[command(subcommand)]
        what: DocsWhat,
    },
}

#[derive(Debug, Subcommand)]
pub enum DocsWhat {
    /// The metrics reference table (Markdown), as embedded in the README.
    Metrics,
    /// The `agent`/`watch` flags reference table (Markdown), as embedded in the reference.
    Flags,
    /// The `controller` flags reference table (Markdown), as embedded in the reference.
    ControllerFlags,
    /// The `meshcanary.io/*` annotations reference table (Markdown), as embedded in the README.
    Annotations,
    /// The built-in limits table (Markdown): what is bounded, by how much, and what happens past it.
    Limits,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A sidecar to scrape: `[namespace/]workload/role=http://host:admin-port` (role is
    /// `primary` or `canary`). Repeatable; the environment form is comma-separated. Needed
    /// unless --node-name turns on Kubernetes discovery.
    #[arg(
        long = "target",
        env = "MESHCANARY_TARGETS",
        value_delimiter = ',',
        required_unless_present = "node_name"
    )]
    pub targets: Vec<String>,
    /// Fast-tier interval (decisions).
    #[arg(long, env = "MESHCANARY_FAST_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub fast_interval: Duration,
    /// Full-tier interval (remote write); `0` disables the full tier. When it is at least
    /// the fast interval and --full-timeout is at most --scrape-timeout, it is rounded to
    /// whole fast intervals and one request to the sidecar serves both tiers.
    #[arg(long, env = "MESHCANARY_FULL_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub full_interval: Duration,
    /// Timeout of one fast-tier scrape; must be shorter than the fast interval.
    #[arg(long, env = "MESHCANARY_SCRAPE_TIMEOUT", default_value = "800ms", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// Timeout of one full-tier scrape; must be shorter than the full interval.
    #[arg(long, env = "MESHCANARY_FULL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub full_timeout: Duration,
    /// Largest scrape body accepted; a larger one is a `body_too_large` error.
    #[arg(long, env = "MESHCANARY_MAX_BODY_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// Most samples one scrape of one sidecar may have (Prometheus' `sample_limit`); a scrape
    /// over it fails with reason `sample_limit` and is not parsed. An Envoy with 50 clusters
    /// has about 19,000.
    #[arg(long, env = "MESHCANARY_SAMPLE_LIMIT", default_value_t = 100_000)]
    pub sample_limit: usize,
    /// Regex selecting the inbound cluster by `envoy_cluster_name` (App Mesh default; Istio:
    /// `^inbound\|`).
    #[arg(
        long,
        env = "MESHCANARY_CLUSTER_REGEX",
        default_value = "^cds_ingress_"
    )]
    pub cluster_regex: String,
    /// Length of the rolling window (whole seconds).
    #[arg(long, env = "MESHCANARY_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// Requests a window needs before it reports a success rate or latency.
    #[arg(long, env = "MESHCANARY_MIN_REQUESTS", default_value_t = 10)]
    pub min_requests: u64,
    /// Address for /metrics, /healthz and /readyz (`agent` default 0.0.0.0:9102; `watch`
    /// serves nothing unless given).
    #[arg(long, env = "MESHCANARY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// UDP address to receive the sidecars' DogStatsD/statsd sinks on (per-request latency,
    /// e.g. `0.0.0.0:8125`); off unless given. Sidecars that do not send keep the scrape's
    /// histograms.
    #[arg(long, env = "MESHCANARY_STATSD_LISTEN")]
    pub statsd_listen: Option<SocketAddr>,
    /// Receive buffer of the statsd socket, in bytes (capped by the kernel's
    /// `net.core.rmem_max`; overruns are counted in `meshcanary_statsd_overruns_total`).
    #[arg(long, env = "MESHCANARY_STATSD_RECV_BUFFER", default_value_t = 4 << 20)]
    pub statsd_recv_buffer: usize,
    /// Connections each HTTP port (telemetry, peers) serves at once; a new one beyond it
    /// closes the oldest connection that has not sent a request yet, or is refused.
    #[arg(long, env = "MESHCANARY_HTTP_MAX_CONNECTIONS", default_value_t = 128)]
    pub http_max_connections: usize,
    /// A request's headers must arrive within this time on the HTTP ports, counted from
    /// the connection's start or the previous answer (so it is also the idle timeout).
    #[arg(long, env = "MESHCANARY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// Which checks may fail a step: `threshold` (Flagger's rule), `sequential` (the
    /// anytime-valid tests) or `both`.
    #[arg(long, env = "MESHCANARY_JUDGE", default_value = "both")]
    pub judge: crate::judge::Mode,
    /// Minimum canary success rate over the window, in percent (Flagger's `thresholdRange.min`).
    #[arg(long, env = "MESHCANARY_SUCCESS_RATE_MIN", default_value_t = 99.0)]
    pub success_rate_min: f64,
    /// Maximum canary p99 over the window; `0` disables the latency checks.
    #[arg(long, env = "MESHCANARY_LATENCY_P99_MAX", default_value = "500ms", value_parser = parse_duration)]
    pub latency_p99_max: Duration,
    /// False-rollback budget of the sequential tests over a whole rollout.
    #[arg(long, env = "MESHCANARY_ALPHA", default_value_t = 0.01)]
    pub alpha: f64,
    /// Prometheus remote-write endpoint (Remote Write 1.0) for full-tier samples and the
    /// agent's own metrics, e.g. `http://prometheus:9090/api/v1/write`. Unset: no remote write.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_URL")]
    pub remote_write_url: Option<String>,
    /// Directory of the durable remote-write queue (an emptyDir or hostPath in Kubernetes).
    #[arg(
        long,
        env = "MESHCANARY_REMOTE_WRITE_QUEUE_DIR",
        default_value = "/var/lib/meshcanary/queue"
    )]
    pub remote_write_queue_dir: std::path::PathBuf,
    /// Disk the queue may use; past it the oldest batches are dropped and counted. It may
    /// overshoot by the segment being written (8 MiB) and one batch, so keep it well under
    /// the volume's size (the manifests: 768 MiB on a 1 GiB emptyDir).
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_MAX_DISK", default_value = "768MiB", value_parser = parse_bytes)]
    pub remote_write_max_disk: usize,
    /// Samples per remote-write request at most.
    #[arg(
        long,
        env = "MESHCANARY_REMOTE_WRITE_BATCH_SAMPLES",
        default_value_t = 2000
    )]
    pub remote_write_batch_samples: usize,
    /// A batch is sent after this long even if not full.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_BATCH_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub remote_write_batch_deadline: Duration,
    /// Concurrent senders; each series always goes through the same one, in order.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_SHARDS", default_value_t = 2)]
    pub remote_write_shards: usize,
    /// First retry delay (exponential backoff with full jitter).
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_MIN_BACKOFF", default_value = "30ms", value_parser = parse_duration)]
    pub remote_write_min_backoff: Duration,
    /// Longest retry delay.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub remote_write_max_backoff: Duration,
    /// How long a batch is retried while the endpoint answers 401 or 403 (the credential
    /// files are read again at every attempt, so a rotation heals it); then it is dropped.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_AUTH_RETRY", default_value = "10m", value_parser = parse_duration)]
    pub remote_write_auth_retry: Duration,
    /// Timeout of one remote-write POST.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub remote_write_timeout: Duration,
    /// `job` label of Envoy series (the reference collector's job name).
    #[arg(
        long,
        env = "MESHCANARY_REMOTE_WRITE_JOB",
        default_value = "appmesh-envoy"
    )]
    pub remote_write_job: String,
    /// A label added to every written series, `name=value` (repeatable), e.g. `cluster=prod`.
    #[arg(
        long = "external-label",
        env = "MESHCANARY_EXTERNAL_LABELS",
        value_delimiter = ','
    )]
    pub external_labels: Vec<String>,
    /// An extra metric-name regex to drop before writing (anchored; repeatable), on top of
    /// the reference setup's drops.
    #[arg(
        long = "drop-metric",
        env = "MESHCANARY_DROP_METRICS",
        value_delimiter = ','
    )]
    pub drop_metrics: Vec<String>,
    /// Sign remote-write requests with SigV4 (service `aps`), credentials from the AWS default
    /// chain (environment, profile, IRSA web identity, EKS Pod Identity, instance metadata).
    /// On by itself for `aps-workspaces.<region>.amazonaws.com` URLs.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_SIGV4")]
    pub remote_write_sigv4: bool,
    /// SigV4 region; by default the one in the AMP host name.
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_SIGV4_REGION")]
    pub remote_write_sigv4_region: Option<String>,
    /// File with a bearer token for the endpoint (read at startup; never logged).
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_BEARER_TOKEN_FILE")]
    pub remote_write_bearer_token_file: Option<std::path::PathBuf>,
    /// Basic-auth user for the endpoint (with --remote-write-basic-auth-password-file).
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_BASIC_AUTH_USER")]
    pub remote_write_basic_auth_user: Option<String>,
    /// File with the basic-auth password (read at startup; never logged).
    #[arg(long, env = "MESHCANARY_REMOTE_WRITE_BASIC_AUTH_PASSWORD_FILE")]
    pub remote_write_basic_auth_password_file: Option<std::path::PathBuf>,
    /// Run in Kubernetes: discover this node's sidecars and serve their windows to the
    /// controller. Set from the downward API (`spec.nodeName`) in the DaemonSet.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Label selector of the namespaces whose pods are scraped.
    #[arg(
        long,
        env = "MESHCANARY_NAMESPACE_SELECTOR",
        default_value = "appmesh.k8s.aws/sidecarInjectorWebhook=enabled"
    )]
    pub namespace_selector: String,
    /// Name of the Envoy sidecar container in pods (the app-mesh data plane's).
    #[arg(long, env = "MESHCANARY_ENVOY_CONTAINER", default_value = "envoy")]
    pub envoy_container: String,
    /// The data plane of every pod: auto (per pod: an istio-proxy container is istio, the
    /// --envoy-container container app-mesh), app-mesh, istio or envoy. A pod's
    /// meshcanary.io/data-plane annotation wins over it.
    // Spelled `std::option::Option` so clap takes the parser's `None` (auto) as the value
    // rather than treating the flag as optional.
    #[arg(long, env = "MESHCANARY_DATA_PLANE", default_value = "auto", value_parser = parse_data_plane)]
    pub data_plane: std::option::Option<crate::discover::DataPlane>,
    /// meshcanary's own namespace (the controller's ServiceAccount is in it).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshcanary")]
    pub namespace: String,
    /// Where this agent serves its windows to the controller (`GET /v1/windows`).
    #[arg(long, env = "MESHCANARY_PEER_LISTEN", default_value = "0.0.0.0:9103")]
    pub peer_listen: SocketAddr,
    /// Audience the controller's token must carry (checked with a TokenReview).
    #[arg(
        long,
        env = "MESHCANARY_PEER_AUDIENCE",
        default_value = "meshcanary-peers"
    )]
    pub peer_audience: String,
    /// The controller's ServiceAccount (in --namespace): the only user the peer port answers.
    #[arg(
        long,
        env = "MESHCANARY_CONTROLLER_SERVICE_ACCOUNT",
        default_value = "meshcanary-controller"
    )]
    pub controller_service_account: String,
    /// This agent's identity on its metrics (default: the node name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Time allowed to finish in-flight work after SIGTERM.
    #[arg(long, env = "MESHCANARY_GRACE_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub grace_period: Duration,
}

/// `auto` or a data plane's name.
fn parse_data_plane(s: &str) -> Result<Option<crate::discover::DataPlane>, String> {
    if s == "auto" {
        return Ok(None);
    }
    crate::discover::DataPlane::named(s)
        .map(Some)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a data plane: expected auto, {}",
                crate::discover::DataPlane::NAMES.join(", ")
            )
        })
}

/// Flags of `meshcanary controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "MESHCANARY_LISTEN", default_value = "0.0.0.0:9102")]
    pub listen: SocketAddr,
    /// Connections the telemetry port serves at once (as the agent's).
    #[arg(long, env = "MESHCANARY_HTTP_MAX_CONNECTIONS", default_value_t = 128)]
    pub http_max_connections: usize,
    /// A request's headers must arrive within this time (as the agent's).
    #[arg(long, env = "MESHCANARY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// meshcanary's own namespace: the Lease and the agents' pods are in it.
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshcanary")]
    pub namespace: String,
    /// This replica's identity for the Lease and Events (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "meshcanary-controller")]
    pub identity: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "MESHCANARY_LEASE_NAME",
        default_value = "meshcanary-leader"
    )]
    pub lease_name: String,
    /// How long a leader's Lease is valid without renewal; a crashed leader is replaced after it.
    #[arg(long, env = "MESHCANARY_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the leader polls the agents, judges and reconciles every rollout.
    #[arg(long, env = "MESHCANARY_DECISION_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub decision_interval: Duration,
    /// Label selector of the agents' pods (in --namespace).
    #[arg(
        long,
        env = "MESHCANARY_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=meshcanary,app.kubernetes.io/component=agent"
    )]
    pub agent_selector: String,
    /// The agents' peer port (on their pod IPs).
    #[arg(long, env = "MESHCANARY_AGENT_PORT", default_value_t = 9103)]
    pub agent_port: u16,
    /// Projected ServiceAccount token sent to the agents (re-read at every poll; never logged).
    #[arg(
        long,
        env = "MESHCANARY_PEER_TOKEN_FILE",
        default_value = "/var/run/secrets/meshcanary/peer-token"
    )]
    pub peer_token_file: std::path::PathBuf,
    /// How long the controller waits for an agent's windows before its node counts as stale.
    #[arg(long, env = "MESHCANARY_PEER_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub peer_timeout: Duration,
    /// The agents' --window (whole seconds): the checks' analysis window.
    #[arg(long, env = "MESHCANARY_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// The agents' --min-requests.
    #[arg(long, env = "MESHCANARY_MIN_REQUESTS", default_value_t = 10)]
    pub min_requests: u64,
    /// The agents' --fast-interval: windows without data for three of them (at least 3 s)
    /// are stale.
    #[arg(long, env = "MESHCANARY_FAST_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub fast_interval: Duration,
    /// Name of the Envoy sidecar container in pods.
    #[arg(long, env = "MESHCANARY_ENVOY_CONTAINER", default_value = "envoy")]
    pub envoy_container: String,
    /// The router of a workload without meshcanary.io/router: app-mesh (VirtualRouter) or
    /// gateway-api (HTTPRoute).
    #[arg(long, env = "MESHCANARY_ROUTER", default_value = "app-mesh")]
    pub router: crate::router::RouterKind,
    /// Which Flagger Canaries (flagger.app/v1beta1) the controller runs: opted-in (those with
    /// the annotation meshcanary.io/enabled: "true"; Flagger keeps the rest), all (no Flagger
    /// in the cluster), or off (no Canary watch).
    #[arg(
        long,
        env = "MESHCANARY_CANARIES",
        value_enum,
        default_value = "opted-in"
    )]
    pub canaries: crate::canary::Taking,
    /// How often each workload's objects (`NAME-primary`, Services, routing objects) are
    /// checked for owners and re-applied if they drifted.
    #[arg(long, env = "MESHCANARY_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Time allowed to finish in-flight work after SIGTERM.
    #[arg(long, env = "MESHCANARY_GRACE_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub grace_period: Duration,
}

/// The controller's settings, checked together.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    pub listen: SocketAddr,
    pub http_limits: crate::telemetry::HttpLimits,
    pub controller: crate::controller::ControllerConfig,
    pub agents: crate::peers::cluster::PeerConfig,
    pub window: WindowConfig,
    pub stale_after_ms: u64,
    pub grace_period: Duration,
}

impl ControllerArgs {
    /// Validate the flags into [`ControllerSettings`].
    ///
    /// ### Errors
    /// The flag and what it expects.
    pub fn into_settings(self) -> Result<ControllerSettings, ConfigError> {
        require(
            self.lease_duration >= Duration::from_secs(2),
            "--lease-duration",
            || "must be at least 2s".into(),
        )?;
        require(
            !self.decision_interval.is_zero(),
            "--decision-interval",
            || "must be greater than 0".into(),
        )?;
        require(
            !self.peer_timeout.is_zero() && self.peer_timeout < self.decision_interval,
            "--peer-timeout",
            || {
                format!(
                    "{:?} must be greater than 0 and shorter than --decision-interval ({:?})",
                    self.peer_timeout, self.decision_interval
                )
            },
        )?;
        require(self.window.as_secs() > 0, "--window", || {
            "must be at least one second".into()
        })?;
        require(!self.fast_interval.is_zero(), "--fast-interval", || {
            "must be greater than 0".into()
        })?;
        require(
            self.resync_interval >= self.decision_interval,
            "--resync-interval",
            || "must be at least --decision-interval".into(),
        )?;
        Ok(ControllerSettings {
            listen: self.listen,
            http_limits: crate::telemetry::HttpLimits {
                max_connections: self.http_max_connections,
                header_timeout: self.http_header_timeout,
            },
            controller: crate::controller::ControllerConfig {
                decision_interval: self.decision_interval,
                lease: Some(crate::controller::LeaseConfig {
                    namespace: self.namespace.clone(),
                    name: self.lease_name,
                    duration: self.lease_duration,
                }),
                envoy_container: self.envoy_container,
                router: self.router,
                canaries: self.canaries,
                identity: self.identity,
                liveness_bound: crate::controller::ControllerConfig::liveness_bound_for(
                    self.decision_interval,
                ),
                resync: self.resync_interval,
            },
            agents: crate::peers::cluster::PeerConfig {
                port: self.agent_port,
                namespace: self.namespace,
                selector: self.agent_selector,
                token_file: Some(self.peer_token_file),
                timeout: self.peer_timeout,
            },
            window: WindowConfig {
                slot_ms: 1_000,
                slots: self.window.as_secs() as usize,
                min_requests: self.min_requests,
            },
            stale_after_ms: crate::agent::stale_after(self.fast_interval),
            grace_period: self.grace_period,
        })
    }
}

/// Default telemetry address of `meshcanary agent`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9102";

impl AgentArgs {
    /// Validate the flags into an [`AgentConfig`].
    ///
    /// ### Errors
    /// The flag and what it expects.
    pub fn into_config(
        self,
        default_listen: Option<SocketAddr>,
    ) -> Result<AgentConfig, ConfigError> {
        let targets = self
            .targets
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| parse_static_target(t).map_err(|e| ConfigError::invalid("--target", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster_regex = Regex::new(&self.cluster_regex).map_err(|e| {
            ConfigError::invalid(
                "--cluster-regex",
                format!("{:?} is not a valid regex: {e}", self.cluster_regex),
            )
        })?;
        let slots = self.window.as_secs() as usize;
        let remote_write = self.remote_write_config()?;
        let config = AgentConfig {
            statsd: self
                .statsd_listen
                .map(|listen| crate::agent::StatsdSettings {
                    listen,
                    recv_buffer: self.statsd_recv_buffer,
                }),
            kube: None,
            remote_write,
            targets,
            fast_interval: self.fast_interval,
            full_interval: (!self.full_interval.is_zero()).then_some(self.full_interval),
            fast_timeout: self.scrape_timeout,
            full_timeout: self.full_timeout,
            max_body_bytes: self.max_body_bytes,
            sample_limit: self.sample_limit,
            fast_filter: crate::scrape::fast_filter(&self.cluster_regex),
            cluster_regex,
            window: WindowConfig {
                slot_ms: 1_000,
                slots,
                min_requests: self.min_requests,
            },
            listen: self.listen.or(default_listen),
            http_limits: crate::telemetry::HttpLimits {
                max_connections: self.http_max_connections,
                header_timeout: self.http_header_timeout,
            },
            grace_period: self.grace_period,
            policy: crate::judge::Policy {
                mode: self.judge,
                success_rate_min: self.success_rate_min / 100.0,
                latency_p99_max_ms: (!self.latency_p99_max.is_zero())
                    .then_some(self.latency_p99_max.as_secs_f64() * 1000.0),
                min_requests: self.min_requests,
                alpha: self.alpha,
                advance_early: false,
            },
        };
        let kube = match self.node_name.filter(|n| !n.is_empty()) {
            None => None,
            Some(node_name) => {
                if !config.targets.is_empty() {
                    return Err(ConfigError::Conflict {
                        first: "--target (static targets)",
                        second: "--node-name (Kubernetes discovery)",
                    });
                }
                Some(crate::agent::KubeSettings {
                    identity: self.identity.unwrap_or_else(|| node_name.clone()),
                    peers: crate::agent::PeerServing {
                        listen: self.peer_listen,
                        audience: self.peer_audience,
                        client: format!(
                            "system:serviceaccount:{}:{}",
                            self.namespace, self.controller_service_account
                        ),
                    },
                    discovery: crate::discover::pods::DiscoveryConfig {
                        node_name,
                        namespace_selector: self.namespace_selector,
                        envoy_container: self.envoy_container,
                        data_plane: self.data_plane,
                    },
                })
            }
        };
        let config = AgentConfig { kube, ..config };
        config.validate()?;
        Ok(config)
    }
}

/// The built-in limits (those that are not flags), from the constants the code uses, so the
/// reference cannot drift from them.
pub fn limits_table() -> String {
    fn bytes(n: usize) -> String {
        match n {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
            n => format!("{n} bytes"),
        }
    }
    let rows: [(&str, String, &str); 14] = [
        ("fast-tier body", bytes(crate::agent::FAST_BODY_LIMIT), "`body_too_large`: its filtered answer is a few KB, so a bigger one is a sidecar ignoring `filter=`"),
        ("read buffer of a scrape connection", bytes(crate::scrape::READ_BUF_BYTES), "a bigger body is read in more reads (the buffer would otherwise stay that large while the connection idles)"),
        ("histogram buckets read per pod", crate::window::inbound::MAX_EDGES.to_string(), "the pod's latency is not read (requests and errors still are)"),
        ("staleness", format!("3 fast scrapes, at least {} s", crate::agent::stale_after(Duration::from_millis(1)) / 1000), "a silent canary fails a check; a silent primary or agent halts"),
        ("peer answer", bytes(crate::peers::cluster::MAX_REPLY_BYTES), "the poll fails (`decode`) and that node's workloads halt"),
        ("slots per window in a peer answer", "one ring (`--window`)".into(), "that window is skipped, the poll counted `invalid`"),
        ("TokenReview verdicts cached", crate::peers::auth::MAX_CACHED.to_string(), "the verdict closest to expiry is evicted"),
        ("TokenReviews in flight", crate::peers::auth::MAX_REVIEWS.to_string(), "further requests wait their turn"),
        ("accept backlog of the HTTP ports", crate::telemetry::LISTEN_BACKLOG.to_string(), "the kernel holds further handshakes"),
        ("remote-write batch", format!("{} compressed", bytes(crate::remote_write::MAX_BATCH_BYTES)), "the batch closes (`--remote-write-batch-samples` closes it earlier)"),
        ("remote-write error answer read", bytes(crate::remote_write::send::MAX_ERROR_BODY), "the rest is not read"),
        ("statsd datagram read", bytes(crate::statsd::DATAGRAM_BYTES), "the rest is cut (`meshcanary_statsd_truncated_total`); a cut last line counts as malformed"),
        ("statsd silence before a sidecar's latency falls back to the scrape", format!("{} s", crate::statsd::FRESH_MS / 1000), "or as soon as its scrapes count 10 requests with no request time in 2 s"),
        ("remote-write queue segment", bytes(crate::remote_write::queue::SEGMENT_BYTES as usize), "a new segment starts; the disk cap deletes whole segments"),
    ];
    let mut out = String::from("| limit | value | past it |\n|---|---|---|\n");
    for (what, value, past) in rows {
        out.push_str(&format!("| {what} | {value} | {past} |\n"));
    }
    out
}

/// The Markdown reference of every `agent`/`watch` flag, generated from the clap definitions
/// (so the README cannot drift from the code).
pub fn flags_table() -> String {
    flags_table_of("agent")
}

/// The same for `meshcanary controller`.
pub fn controller_flags_table() -> String {
    flags_table_of("controller")
}

fn flags_table_of(command: &str) -> String {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let agent = cli.find_subcommand(command).expect("the subcommand exists");
    let mut out = String::from("| flag | environment | default | meaning |\n|---|---|---|---|\n");
    let globals = cli.get_arguments().filter(|a| a.is_global_set());
    for arg in agent.get_arguments().chain(globals) {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let env = arg
            .get_env()
            .map_or_else(|| "-".to_owned(), |e| format!("`{}`", e.to_string_lossy()));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "-".to_owned()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
            .unwrap_or_default();
        out += &format!("| `--{long}` | {env} | {default} | {help} |\n");
    }
    out
}

impl AgentArgs {
    fn remote_write_config(
        &self,
    ) -> Result<Option<crate::remote_write::RemoteWriteConfig>, ConfigError> {
        use crate::remote_write::{relabel, send::Endpoint, RemoteWriteConfig};
        let Some(url) = &self.remote_write_url else {
            return Ok(None);
        };
        let url: http::Uri = url.parse().map_err(|e| {
            let shown = crate::remote_write::send::redact(url);
            ConfigError::invalid("--remote-write-url", format!("{shown:?}: {e}"))
        })?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            let shown = crate::remote_write::send::redact(&url.to_string());
            return Err(ConfigError::invalid(
                "--remote-write-url",
                format!("{shown}: expected http:// or https:// with a host"),
            ));
        }
        let host = url.host().unwrap_or_default();
        let sigv4 = if self.remote_write_sigv4 || host.starts_with("aps-workspaces.") {
            let region = self
                .remote_write_sigv4_region
                .clone()
                .or_else(|| crate::remote_write::sigv4::region_from_host(host))
                .ok_or_else(|| ConfigError::Needs {
                    flag: "--remote-write-sigv4",
                    needs: format!("--remote-write-sigv4-region (the host {host:?} names none)"),
                })?;
            Some((region, "aps".to_owned()))
        } else {
            None
        };
        use crate::remote_write::send::Credential;
        let credential = match (
            &self.remote_write_bearer_token_file,
            &self.remote_write_basic_auth_user,
            &self.remote_write_basic_auth_password_file,
        ) {
            (Some(_), Some(_), _) => {
                return Err(ConfigError::Conflict {
                    first: "--remote-write-bearer-token-file",
                    second: "--remote-write-basic-auth-user",
                })
            }
            (Some(path), None, _) => Some((
                "--remote-write-bearer-token-file",
                Credential::Bearer { file: path.clone() },
            )),
            (None, Some(user), Some(path)) => Some((
                "--remote-write-basic-auth-password-file",
                Credential::Basic {
                    user: user.clone(),
                    password_file: path.clone(),
                },
            )),
            (None, Some(_), None) => {
                return Err(ConfigError::Needs {
                    flag: "--remote-write-basic-auth-user",
                    needs: "--remote-write-basic-auth-password-file".into(),
                })
            }
            (None, None, _) => None,
        };
        // Read once now so a wrong path fails at startup; the sender reads it again for
        // every POST, so a rotated credential is picked up.
        if let Some((flag, credential)) = &credential {
            credential.header().map_err(|e| {
                ConfigError::invalid(flag, format!("the remote-write credential: {e}"))
            })?;
        }
        let credential = credential.map(|(_, c)| c);
        let external_labels = self
            .external_labels
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').ok_or_else(|| {
                    ConfigError::invalid("--external-label", format!("{l:?}: expected name=value"))
                })?;
                if !crate::parse::valid_label_name(k.as_bytes()) {
                    return Err(ConfigError::invalid(
                        "--external-label",
                        format!("{l:?}: {k:?} is not a valid label name"),
                    ));
                }
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut names = own(relabel::DEFAULT_DROP_NAMES);
        names.extend(self.drop_metrics.iter().filter(|d| !d.is_empty()).cloned());
        let drop = relabel::DropRules::new(
            &names,
            &own(relabel::DEFAULT_DROP_VALUE_LABELS),
            &[relabel::DEFAULT_DROP_VALUES.to_owned()],
            &own(relabel::DEFAULT_DROP_IF_PRESENT),
        )
        .map_err(|e| ConfigError::invalid("--drop-metric", e))?;
        let config = RemoteWriteConfig {
            endpoint: Endpoint {
                url,
                credential,
                timeout: self.remote_write_timeout,
                max_retry_after: self.remote_write_max_backoff,
            },
            auth_retry: self.remote_write_auth_retry,
            queue_dir: self.remote_write_queue_dir.clone(),
            max_disk_bytes: self.remote_write_max_disk as u64,
            batch_samples: self.remote_write_batch_samples,
            batch_deadline: self.remote_write_batch_deadline,
            shards: self.remote_write_shards,
            min_backoff: self.remote_write_min_backoff,
            max_backoff: self.remote_write_max_backoff,
            external_labels,
            job: self.remote_write_job.clone(),
            drop,
            sigv4,
        };
        config.validate()?;
        Ok(Some(config))
    }
}

/// Start `tracing` with the chosen format and filter.
pub fn init_logging(format: &str, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Run a parsed command line.
///
/// ### Errors
/// Bad configuration, or I/O at startup; the message says what to fix.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Parse { file } => parse_file(&file),
        Command::Simulate {
            seed,
            aa_runs,
            ab_runs,
            alpha,
            oracle_canary_rps,
            canary_event,
            primary_event,
        } => {
            if !(alpha > 0.0 && alpha < 1.0) {
                anyhow::bail!("--alpha must be between 0 and 1, got {alpha}");
            }
            if let Some(rps) = oracle_canary_rps {
                let ok = |p: f64| p > 0.0 && p < 1.0;
                if !(rps > 0.0
                    && ok(canary_event)
                    && ok(primary_event)
                    && canary_event > primary_event)
                {
                    anyhow::bail!("--oracle-canary-rps must be positive and 0 < --primary-event < --canary-event < 1");
                }
                let (median, p95) = crate::simulate::oracle_ttr(
                    rps,
                    primary_event,
                    canary_event,
                    alpha,
                    10_000,
                    seed,
                );
                return out(&format!(
                    "oracle ttr median {median:.1} s, p95 {p95:.1} s (10000 runs, alpha {alpha})\n"
                ));
            }
            let cfg = crate::simulate::SimConfig {
                seed,
                aa_runs,
                ab_runs,
                alpha,
                ..Default::default()
            };
            let results = crate::simulate::simulate(&cfg);
            let headline =
                crate::simulate::headline_line(&crate::simulate::headline(&results), alpha);
            out(&format!(
                "{}{headline}\n",
                crate::simulate::table(&results, &cfg)
            ))
        }
        Command::Docs {
            what: DocsWhat::Metrics,
        } => out(&metrics_table()),
        Command::Docs {
            what: DocsWhat::Flags,
        } => out(&flags_table()),
        Command::Docs {
            what: DocsWhat::ControllerFlags,
        } => out(&controller_flags_table()),
        Command::Docs {
            what: DocsWhat::Annotations,
        } => out(&crate::annotations::reference_table()),
        Command::Docs {
            what: DocsWhat::Limits,
        } => out(&limits_table()),
        Command::Agent(args) => {
            let default: SocketAddr = DEFAULT_LISTEN.parse().expect("valid constant");
            let config = args.into_config(Some(default))?;
            runtime(AGENT_WORKERS)?.block_on(run_agent(config, false))
        }
        Command::Watch(args) => {
            let config = args.into_config(None)?;
            runtime(AGENT_WORKERS)?.block_on(run_agent(config, true))
        }
        Command::Controller(args) => {
            let settings = args.into_settings()?;
            runtime(CONTROLLER_WORKERS)?.block_on(run_controller(settings))
        }
    }
}

/// Write `text` to stdout; a reader that went away (`| head`) is not an error.
fn out(text: &str) -> anyhow::Result<ExitCode> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// The agent's async workers. One: its work is I/O and about a millisecond of encoding per
/// sidecar and second (bigger bodies and the disk go to the blocking pool), and a second
/// worker only adds wake-ups between the two (in `scripts/bench-peers.sh`, 30 sidecars, about
/// 310 context switches a second instead of 430, and less CPU).
const AGENT_WORKERS: usize = 1;
/// The controller's: it parses every agent's windows and runs the Kubernetes clients.
const CONTROLLER_WORKERS: usize = 2;

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run_agent(config: AgentConfig, with_view: bool) -> anyhow::Result<ExitCode> {
    let window_s = config.window.slots as u64;
    let http_limits = config.http_limits;
    let kube = config.kube.clone();
    let mut agent = Agent::new(config)?;
    let rx = crate::shutdown::on_signal();
    if let Some(kube) = kube {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        tracing::info!(node = %kube.discovery.node_name, "Kubernetes mode: discovering this node's sidecars");
        let node = kube.discovery.node_name.clone();
        let targets = crate::discover::pods::start(client.clone(), kube.discovery, rx.clone());
        // The controller judges every workload with its own policy on every node's windows;
        // one node's half of a workload is nothing to judge.
        agent = agent.with_discovery(targets).without_judge();
        let shared = agent.shared();
        let peers = kube.peers;
        let listener = crate::telemetry::listen(peers.listen)
            .with_context(|| format!("binding the peer listener on {}", peers.listen))?;
        let reviewer = crate::peers::auth::Reviewer::new(
            client,
            peers.audience,
            peers.client,
            shared.metrics.peers.token_reviews.clone(),
        );
        let server = crate::peers::serve::PeerServer {
            windows: Arc::clone(&shared.windows),
            metrics: shared.metrics.peers.clone(),
            http_metrics: shared.metrics.http.clone(),
            node,
            reviewer: Some(Arc::new(reviewer)),
            limits: http_limits,
        };
        tracing::info!(addr = %peers.listen, "Serving windows to the controller on /v1/windows");
        tokio::spawn(server.serve(listener, rx.clone()));
    }
    if with_view {
        tokio::spawn(crate::watch::run(agent.shared(), window_s, rx.clone()));
    }
    agent.run(rx).await?;
    Ok(ExitCode::SUCCESS)
}

/// `meshcanary controller`: the agents' windows, merged ([`crate::peers::cluster::Cluster`])
/// and checked against where the pods run, feed the rollout controller; its own telemetry
/// port serves `/metrics` (the rollout gauges and decisions) and `/healthz` (its loop).
async fn run_controller(settings: ControllerSettings) -> anyhow::Result<ExitCode> {
    let shutdown = crate::shutdown::on_signal();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(ControllerProcessMetrics::new());
    let judgements: crate::analysis::Judgements = Arc::default();
    let heartbeat = crate::telemetry::Heartbeat::default();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = crate::telemetry::bind(settings.listen).await?;
    tracing::info!(addr = %settings.listen, identity = %settings.controller.identity, "Controller: serving /metrics, /healthz and /readyz");
    let endpoints = crate::telemetry::Endpoints {
        metrics: {
            let (metrics, judgements) = (Arc::clone(&metrics), Arc::clone(&judgements));
            Arc::new(move || metrics.render(&judgements))
        },
        ready: Arc::clone(&ready),
        heartbeat: heartbeat.clone(),
    };
    let server = crate::telemetry::HttpServer {
        name: "telemetry",
        limits: settings.http_limits,
        metrics: metrics.http.clone(),
    };
    let telemetry = tokio::spawn(crate::telemetry::serve(
        listener,
        endpoints,
        server,
        shutdown.clone(),
    ));
    let agents =
        crate::peers::cluster::discover(client.clone(), &settings.agents, shutdown.clone());
    let placement = crate::placement::Placement::watch(client.clone(), shutdown.clone());
    let cluster = crate::peers::cluster::Cluster::new(
        settings.window,
        settings.stale_after_ms,
        agents,
        settings.agents,
        metrics.cluster.clone(),
    )
    .with_placement(placement);
    // The VirtualRouter watch cache only where App Mesh is the default: a cluster that has
    // moved to the Gateway API may no longer serve App Mesh's CRDs at all.
    let app_mesh = crate::router::appmesh::AppMesh::new(client.clone());
    let app_mesh = if settings.controller.router == crate::router::RouterKind::AppMesh {
        app_mesh.with_cache(shutdown.clone())
    } else {
        app_mesh
    };
    let router = crate::router::Routers {
        app_mesh,
        gateway_api: crate::router::gatewayapi::GatewayApi::new(client.clone()),
    };
    let controller = crate::controller::Controller::new(
        client,
        router,
        cluster,
        settings.controller,
        metrics.controller.clone(),
    )
    .publish_judgements(judgements)
    .with_heartbeat(heartbeat)
    .with_ready(ready);
    controller.run(shutdown).await?;
    let _ = tokio::time::timeout(settings.grace_period, telemetry).await;
    Ok(ExitCode::SUCCESS)
}

/// The controller's metrics: each of its stages' sets, in one registry.
pub struct ControllerProcessMetrics {
    pub registry: crate::telemetry::MetricRegistry,
    pub http: crate::telemetry::HttpMetrics,
    pub controller: crate::controller::metrics::ControllerMetrics,
    pub cluster: crate::peers::cluster::ClusterMetrics,
    pub judge: crate::analysis::JudgeMetrics,
}

impl ControllerProcessMetrics {
    pub fn new() -> Self {
        let mut registry = crate::telemetry::MetricRegistry::new();
        let controller = crate::controller::metrics::ControllerMetrics::register(&mut registry);
        let judge = crate::analysis::JudgeMetrics::register(&mut registry);
        let cluster = crate::peers::cluster::ClusterMetrics::register(&mut registry);
        let http = crate::telemetry::HttpMetrics::register(&mut registry);
        ControllerProcessMetrics {
            registry,
            http,
            controller,
            cluster,
            judge,
        }
    }

    /// The `/metrics` text, with the verdicts of `judgements`.
    pub fn render(&self, judgements: &crate::analysis::Judgements) -> String {
        self.judge.refresh(judgements);
        self.registry.encode()
    }
}

impl Default for ControllerProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every metric either role exports, with the roles, as the reference table.
pub fn metrics_table() -> String {
    let agent = crate::agent::AgentMetrics::new();
    let controller = ControllerProcessMetrics::new();
    let mut docs: Vec<(crate::telemetry::MetricDoc, Vec<&'static str>)> = Vec::new();
    for (role, registry) in [
        ("agent", &agent.registry),
        ("controller", &controller.registry),
    ] {
        for d in registry.docs() {
            match docs.iter_mut().find(|(known, _)| known.name == d.name) {
                Some((_, roles)) => roles.push(role),
                None => docs.push((d.clone(), vec![role])),
            }
        }
    }
    crate::telemetry::reference_table(&docs)
}

fn parse_file(file: &str) -> anyhow::Result<ExitCode> {
    let mut body = Vec::new();
    if file == "-" {
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading standard input")?;
    } else {
        body = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut rejected = 0usize;
    for result in crate::parse::Parser::new(&body) {
        match result {
            Ok(sample) => {
                serde_json::to_writer(&mut out, &sample_json(&sample))?;
                out.write_all(b"\n")?;
            }
            Err(LineError { line, kind }) => {
                rejected += 1;
                eprintln!("{file}:{line}: {kind}");
            }
        }
    }
    out.flush()?;
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One sample as JSON; non-finite values as the strings `"NaN"`, `"+Inf"`, `"-Inf"`.
pub fn sample_json(sample: &Sample<'_>) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = sample
        .labels
        .iter()
        .map(|l| {
            (
                l.name.to_owned(),
                serde_json::Value::String(l.value().into_owned()),
            )
        })
        .collect();
    let value = serde_json::Number::from_f64(sample.value).map_or_else(
        || serde_json::Value::String(crate::parse::format_value(sample.value)),
        serde_json::Value::Number,
    );
    serde_json::json!({
        "name": sample.name,
        "labels": labels,
        "value": value,
        "timestamp_ms": sample.timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let cli = Cli::try_parse_from([&["meshcanary", "agent"], args].concat()).unwrap();
        let Command::Agent(a) = cli.command else {
            unreachable!()
        };
        a.into_config(None)
    }

    fn controller(args: &[&str]) -> Result<ControllerSettings, ConfigError> {
        let cli = Cli::try_parse_from([&["meshcanary", "controller"], args].concat()).unwrap();
        let Command::Controller(c) = cli.command else {
            unreachable!()
        };
        c.into_settings()
    }

    #[test]
    fn the_data_plane_and_router_flags_parse() {
        let discovery = |args: &[&str]| {
            let cli =
                Cli::try_parse_from([&["meshcanary", "agent", "--node-name=n1"], args].concat())
                    .unwrap();
            let Command::Agent(a) = cli.command else {
                unreachable!()
            };
            a.into_config(None)
                .unwrap()
                .kube
                .unwrap()
                .discovery
                .data_plane
        };
        assert_eq!(discovery(&[]), None, "auto by default");
        assert_eq!(
            discovery(&["--data-plane=istio"]),
            Some(crate::discover::DataPlane::Istio)
        );
        let router = |args: &[&str]| controller(args).unwrap().controller.router;
        assert_eq!(router(&[]), crate::router::RouterKind::AppMesh);
        assert_eq!(
            router(&["--router=gateway-api"]),
            crate::router::RouterKind::GatewayApi
        );
        assert!(Cli::try_parse_from(["meshcanary", "controller", "--router=istio"]).is_err());
    }

    #[test]
    fn a_bad_flag_is_a_typed_error_naming_it() {
        let t = "--target=ns/app/primary=http://127.0.0.1:9901";
        assert!(agent(&[t]).is_ok());
        let flag = |r: Result<AgentConfig, ConfigError>| r.unwrap_err().flag();
        assert_eq!(flag(agent(&[t, "--scrape-timeout=2s"])), "--scrape-timeout");
        assert_eq!(flag(agent(&[t, t])), "--target");
        assert_eq!(flag(agent(&[t, "--cluster-regex=("])), "--cluster-regex");
        assert_eq!(
            flag(agent(&[t, "--node-name=n1"])),
            "--target (static targets)"
        );
        let rw = "--remote-write-url=http://127.0.0.1:1/api/v1/write";
        assert!(agent(&[t, rw]).is_ok());
        assert_eq!(
            flag(agent(&[t, rw, "--remote-write-shards=0"])),
            "--remote-write-shards"
        );
        assert_eq!(
            flag(agent(&[t, rw, "--remote-write-basic-auth-user=u"])),
            "--remote-write-basic-auth-user"
        );
        let missing =
            agent(&[t, rw, "--remote-write-bearer-token-file=/nonexistent/token"]).unwrap_err();
        assert_eq!(missing.flag(), "--remote-write-bearer-token-file");
        assert!(
            missing.to_string().contains("/nonexistent/token"),
            "{missing}"
        );
        assert!(controller(&[]).is_ok());
        let cflag = |r: Result<ControllerSettings, ConfigError>| r.unwrap_err().flag();
        assert_eq!(cflag(controller(&["--peer-timeout=2s"])), "--peer-timeout");
        assert_eq!(
            cflag(controller(&["--lease-duration=1s"])),
            "--lease-duration"
        );
        assert_eq!(
            cflag(controller(&["--resync-interval=500ms"])),
            "--resync-interval"
        );
    }

    #[test]
    fn every_registered_metric_is_documented_and_encoded() {
        let agent = crate::agent::AgentMetrics::new();
        let controller = ControllerProcessMetrics::new();
        for registry in [&agent.registry, &controller.registry] {
            let text = registry.encode();
            for d in registry.docs() {
                let family = d.name.strip_suffix("_total").unwrap_or(&d.name);
                assert!(
                    text.contains(&format!("# TYPE {family} {}", d.kind)),
                    "{} missing from:\n{text}",
                    d.name
                );
                assert!(d.name.starts_with("meshcanary_"));
            }
            let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
            assert_eq!(
                types,
                registry.docs().len(),
                "a metric registered without docs"
            );
        }
        let table = metrics_table();
        assert!(
            table.contains("| `meshcanary_peer_polls_total` | counter | `result` | controller |")
        );
        assert!(table.contains("| `meshcanary_judge_verdict` | gauge | `namespace`, `workload`, `verdict` | agent, controller |"));
    }
}
