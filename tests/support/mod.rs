//! Shared pieces of the integration tests: a real Envoy sidecar process, the test app, an
//! in-process agent, and polling helpers (no fixed sleeps: every wait is for a condition,
//! bounded by a deadline).
#![allow(dead_code)]

pub mod kube;
pub mod lab;
pub mod receiver;
pub mod scenario;
pub mod testapp;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshcanary::agent::{Agent, AgentConfig, Shared};
use meshcanary::discover::parse_static_target;
use meshcanary::window::WindowConfig;
use regex::Regex;
use tokio::sync::watch;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Envoy 1.40 as installed by `scripts/testenv.sh`. Missing Envoy fails the test: these
/// tests are the point, they are never skipped.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let p = Path::new(&home).join(".cache/meshcanary/venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found: run scripts/testenv.sh (or set ENVOY_BIN)"
    );
    p
}

/// A free loopback port (bound then released; tests pick distinct ones through the OS).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free loopback UDP port")
}

/// The value of the first `/metrics` line that starts with `line_start` (0 if absent).
pub fn counter(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Poll `cond` every 50 ms until it holds or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll the async `cond` every 100 ms until it holds or `within` passes.
pub async fn eventually_async<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real Envoy configured like an App Mesh sidecar by `scripts/envoy-config.sh`.
pub struct Sidecar {
    /// The address Envoy listens on (admin and ingress): a pod IP in the lab.
    pub addr: String,
    pub admin_port: u16,
    pub ingress_port: u16,
    /// Shaped as Istio's sidecar: the port its stats are served on (Istio's 15090).
    pub istio_stats_port: Option<u16>,
    config: PathBuf,
    child: Option<Child>,
    _dir: TempDir,
}

impl Sidecar {
    /// A sidecar on free loopback ports. Free ports are only free until someone binds them
    /// (tests run in parallel): if Envoy exits because a port was taken meanwhile, it is
    /// started again on new ports.
    pub async fn start(app_port: u16, vnode: &str, flush: &str) -> Sidecar {
        let mut last = String::new();
        for _ in 0..3 {
            let mut s = Self::configure(
                "127.0.0.1",
                free_port(),
                free_port(),
                app_port,
                vnode,
                flush,
                None,
                None,
            );
            match s.try_spawn().await {
                Ok(()) => return s,
                Err(log) => last = log,
            }
        }
        panic!("Envoy did not start three times; its last log:\n{last}");
    }

    /// A sidecar shaped as Istio's (`scripts/envoy-config.sh --istio-stats-port`) on free
    /// loopback ports: inbound cluster `inbound|APP_PORT||`, Istio's tag names, stats on
    /// [`Sidecar::stats_url`].
    pub async fn start_istio(app_port: u16, flush: &str) -> Sidecar {
        let mut last = String::new();
        for _ in 0..3 {
            let mut s = Self::configure(
                "127.0.0.1",
                free_port(),
                free_port(),
                app_port,
                "podinfo",
                flush,
                Some(free_port()),
                None,
            );
            match s.try_spawn().await {
                Ok(()) => return s,
                Err(log) => last = log,
            }
        }
        panic!("Envoy did not start three times; its last log:\n{last}");
    }

    /// Where the stats are scraped: Istio's stats port, or the admin.
    pub fn stats_url(&self) -> String {
        let port = self.istio_stats_port.unwrap_or(self.admin_port);
        format!("http://{}:{port}", self.addr)
    }

    /// A sidecar on free loopback ports that also sends its stats to `statsd` through
    /// Envoy's DogStatsD sink, tagged with its address.
    pub async fn start_statsd(app_port: u16, vnode: &str, flush: &str, statsd: &str) -> Sidecar {
        let mut s = Self::configure(
            "127.0.0.1",
            free_port(),
            free_port(),
            app_port,
            vnode,
            flush,
            None,
            Some(statsd),
        );
        s.spawn().await;
        s
    }

    /// A sidecar listening on `addr` (admin on `admin_port`, ingress on `ingress_port`),
    /// shaped as Istio's with stats on `istio_stats_port` if given, sending its stats to
    /// `statsd` if given.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_at(
        addr: &str,
        admin_port: u16,
        ingress_port: u16,
        app_port: u16,
        vnode: &str,
        flush: &str,
        istio_stats_port: Option<u16>,
        statsd: Option<&str>,
    ) -> Sidecar {
        let mut sidecar = Self::configure(
            addr,
            admin_port,
            ingress_port,
            app_port,
            vnode,
            flush,
            istio_stats_port,
            statsd,
        );
        sidecar.spawn().await;
        sidecar
    }

    #[allow(clippy::too_many_arguments)]
    fn configure(
        addr: &str,
        admin_port: u16,
        ingress_port: u16,
        app_port: u16,
        vnode: &str,
        flush: &str,
        istio_stats_port: Option<u16>,
        statsd: Option<&str>,
    ) -> Sidecar {
        let dir = TempDir::new("sidecar");
        let mut istio = istio_stats_port
            .map(|p| vec!["--istio-stats-port".to_owned(), p.to_string()])
            .unwrap_or_default();
        if let Some(sink) = statsd {
            // The sink and the tag naming this pod's address (all sidecars here send from
            // loopback's 127.0.0.1, whatever address they listen on).
            istio.extend(["--dogstatsd".to_owned(), sink.to_owned()]);
            istio.extend(["--pod-ip-tag".to_owned(), addr.to_owned()]);
        }
        let out = Command::new("bash")
            .arg(repo().join("scripts/envoy-config.sh"))
            .args(["--addr", addr])
            .args(["--admin-port", &admin_port.to_string()])
            .args(["--ingress-port", &ingress_port.to_string()])
            .args(["--app-port", &app_port.to_string()])
            .args(["--vnode", vnode, "--flush", flush])
            .args(&istio)
            .output()
            .expect("running scripts/envoy-config.sh");
        assert!(
            out.status.success(),
            "envoy-config.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.path.join("envoy.yaml");
        std::fs::write(&config, out.stdout).expect("writing the Envoy config");
        Sidecar {
            addr: addr.to_owned(),
            admin_port,
            ingress_port,
            istio_stats_port,
            config,
            child: None,
            _dir: dir,
        }
    }

    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("Envoy did not become ready; its log:\n{log}");
        }
    }

    /// Start Envoy and wait for `/ready`; its log if it exits or is not ready in 20 s.
    async fn try_spawn(&mut self) -> Result<(), String> {
        let log = self.config.with_extension("log");
        let mut child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&self.config)
            // No hot restart: no shared memory or domain sockets that several Envoys on
            // this machine could contend for.
            .args(["--disable-hot-restart", "-l", "error"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_or_else(|_| Stdio::null(), Stdio::from))
            .spawn()
            .expect("starting Envoy");
        let ready = format!("http://{}:{}/ready", self.addr, self.admin_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if get(&ready).await.is_ok_and(|(status, _)| status == 200) {
                self.child = Some(child);
                return Ok(());
            }
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}:{}", self.addr, self.admin_port)
    }

    pub fn ingress_url(&self) -> String {
        format!("http://{}:{}", self.addr, self.ingress_port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill Envoy and start it again with the same config: its counters start from zero.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Send `n` requests to `path` through the ingress listener, one after another, and
    /// return how many got each status.
    pub async fn drive(&self, path: &str, n: usize) -> Vec<u16> {
        let url = format!("{}{path}", self.ingress_url());
        let mut statuses = Vec::with_capacity(n);
        for _ in 0..n {
            let (status, _) = get(&url).await.expect("request through Envoy");
            statuses.push(status);
        }
        statuses
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The test app on a free loopback port, in this process.
pub struct App {
    pub port: u16,
    pub fault: Arc<testapp::Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn start() -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind app");
        let port = listener.local_addr().expect("local addr").port();
        let fault = Arc::new(testapp::Fault::default());
        let task = tokio::spawn(testapp::serve(listener, Arc::clone(&fault)));
        App { port, fault, task }
    }

    /// Kill the app: its port refuses connections and open ones are closed.
    pub fn stop(&mut self) {
        self.task.abort();
    }

    /// Start it again on the same port, with the same standing fault.
    pub async fn restart(&mut self) {
        self.task.abort();
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("binding the app again on {addr}: {e}"),
            }
        };
        self.task = tokio::spawn(testapp::serve(listener, Arc::clone(&self.fault)));
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wait until `url` answers 200 (a process's readiness endpoint).
pub async fn wait_ok(url: &str, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !get(url).await.is_ok_and(|(status, _)| status == 200) {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A one-shot GET on a fresh connection: (status, body).
pub async fn get(url: &str) -> Result<(u16, String), String> {
    get_with(url, None)
        .await
        .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

/// A one-shot GET with an optional `Authorization` header: (status, body bytes).
pub async fn get_with(
    url: &str,
    authorization: Option<&str>,
) -> Result<(u16, bytes::Bytes), String> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = http::Request::get(url);
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("{e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| format!("{e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e}"))?
        .to_bytes();
    Ok((status, body))
}

/// An agent running in this process.
pub struct RunningAgent {
    pub shared: Arc<Shared>,
    pub listen: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningAgent {
    /// Start an agent scraping `targets` (`ns/workload/role=url`) every 200 ms.
    pub async fn start(targets: &[String], max_body_bytes: usize) -> RunningAgent {
        Self::start_with(targets, max_body_bytes, |_| {}).await
    }

    /// The same, with a last say on the configuration.
    pub async fn start_with(
        targets: &[String],
        max_body_bytes: usize,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> RunningAgent {
        Self::launch(Self::config(targets, max_body_bytes, adjust), None).await
    }

    /// The test configuration: 200 ms fast tier, 2 s full tier, a 60 s window.
    pub fn config(
        targets: &[String],
        max_body_bytes: usize,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> AgentConfig {
        let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut config = AgentConfig {
            targets: targets
                .iter()
                .map(|t| parse_static_target(t).unwrap())
                .collect(),
            fast_interval: Duration::from_millis(200),
            full_interval: Some(Duration::from_secs(2)),
            fast_timeout: Duration::from_millis(150),
            full_timeout: Duration::from_millis(500),
            max_body_bytes,
            sample_limit: 100_000,
            cluster_regex: Regex::new("^cds_ingress_").unwrap(),
            fast_filter: meshcanary::scrape::fast_filter("^cds_ingress_"),
            window: WindowConfig {
                slot_ms: 1_000,
                slots: 60,
                min_requests: 10,
            },
            listen: Some(listen),
            http_limits: meshcanary::telemetry::HttpLimits::default(),
            kube: None,
            statsd: None,
            grace_period: Duration::from_secs(2),
            policy: meshcanary::judge::Policy::default(),
            remote_write: None,
        };
        adjust(&mut config);
        config.validate().unwrap();
        config
    }

    /// Run an agent with `config`, scraping what `discovery` publishes too, if given.
    pub async fn launch(
        config: AgentConfig,
        discovery: Option<watch::Receiver<Vec<meshcanary::discover::Target>>>,
    ) -> RunningAgent {
        let listen = config.listen.expect("tests listen");
        let mut agent = Agent::new(config).expect("agent config");
        if let Some(d) = discovery {
            agent = agent.with_discovery(d);
        }
        let shared = agent.shared();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(agent.run(rx));
        RunningAgent {
            shared,
            listen,
            stop,
            task: Some(task),
        }
    }

    pub async fn metrics(&self) -> String {
        get(&format!("http://{}/metrics", self.listen))
            .await
            .expect("GET /metrics")
            .1
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(5), task).await;
            assert!(result.is_ok(), "agent did not stop within its grace period");
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "meshcanary-{prefix}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A raw TCP server that answers every connection with fixed bytes (after `delay`), to play
/// a broken or hostile admin endpoint.
pub struct FakeAdmin {
    pub port: u16,
    response: Arc<std::sync::Mutex<Arc<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAdmin {
    pub async fn start(response: Vec<u8>, delay: Duration) -> FakeAdmin {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        let response = Arc::new(std::sync::Mutex::new(Arc::new(response)));
        let shared = Arc::clone(&response);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let response = Arc::clone(&response.lock().unwrap());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FakeAdmin {
            port,
            response: shared,
            task,
        }
    }

    /// An HTTP/1.1 200 response with `body`, with or without a Content-Length header.
    pub fn ok(body: &[u8], content_length: bool) -> Vec<u8> {
        let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
        if content_length {
            r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        r.extend_from_slice(b"\r\n");
        r.extend_from_slice(body);
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answer later connections with `response` instead.
    pub fn set_response(&self, response: Vec<u8>) {
        *self.response.lock().unwrap() = Arc::new(response);
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request a [`Receiver`] got: when, what it answered, and the decoded body.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub status: u16,
    pub request: meshcanary::remote_write::proto::WriteRequest,
    pub headers: http::HeaderMap,
    pub raw_body: bytes::Bytes,
    pub path: String,
}

/// A remote-write receiver that answers from a script (then 204 forever) and keeps every
/// request, decoded, so tests assert on what a receiver actually got.
pub struct Receiver {
    pub port: u16,
    pub log: Arc<std::sync::Mutex<Vec<Received>>>,
    /// When set, a request whose `Authorization` is not exactly this gets 401 (before the
    /// script is consulted), as an endpoint does after a credential rotation.
    pub require_authorization: Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// `script`: (status, Retry-After seconds) for the first requests.
    pub async fn start(port: u16, script: Vec<(u16, Option<u64>)>) -> Receiver {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let script = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
            script,
        )));
        let require_authorization = Arc::new(std::sync::Mutex::new(None::<String>));
        let (log2, script2, require2) = (
            Arc::clone(&log),
            Arc::clone(&script),
            Arc::clone(&require_authorization),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, script, require) = (
                    Arc::clone(&log2),
                    Arc::clone(&script2),
                    Arc::clone(&require2),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (log, script) = (Arc::clone(&log), Arc::clone(&script));
                            let required = require.lock().unwrap().clone();
                            async move {
                                let headers = req.headers().clone();
                                let path = req.uri().path().to_owned();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let given = headers
                                    .get(http::header::AUTHORIZATION)
                                    .and_then(|v| v.to_str().ok());
                                let (status, retry_after) = match required {
                                    Some(r) if given != Some(r.as_str()) => (401, None),
                                    _ => script.lock().unwrap().pop_front().unwrap_or((204, None)),
                                };
                                let request = meshcanary::remote_write::proto::decode(&body)
                                    .expect("a valid remote-write body");
                                log.lock().unwrap().push(Received {
                                    at: Instant::now(),
                                    status,
                                    request,
                                    headers,
                                    raw_body: body,
                                    path,
                                });
                                let mut resp = http::Response::builder().status(status);
                                if let Some(s) = retry_after {
                                    resp = resp.header("Retry-After", s.to_string());
                                }
                                Ok::<_, std::convert::Infallible>(
                                    resp.body(http_body_util::Full::new(
                                        bytes::Bytes::from_static(b"scripted"),
                                    ))
                                    .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            port,
            log,
            require_authorization,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests it answered with `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == status)
            .count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A remote-write config for tests: fast batches and retries, queue in `dir`.
pub fn remote_write_config(url: &str, dir: &Path) -> meshcanary::remote_write::RemoteWriteConfig {
    meshcanary::remote_write::RemoteWriteConfig {
        endpoint: meshcanary::remote_write::send::Endpoint {
            url: url.parse().unwrap(),
            credential: None,
            timeout: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(2),
        },
        queue_dir: dir.to_owned(),
        max_disk_bytes: 1 << 30,
        batch_samples: 2000,
        batch_deadline: Duration::from_millis(200),
        shards: 2,
        min_backoff: Duration::from_millis(30),
        max_backoff: Duration::from_millis(500),
        auth_retry: Duration::from_secs(60),
        external_labels: vec![("cluster".to_owned(), "lab".to_owned())],
        job: "appmesh-envoy".to_owned(),
        drop: meshcanary::remote_write::relabel::DropRules::reference(),
        sigv4: None,
    }
}

/// A real Prometheus with the remote-write receiver on, storing into a temp dir.
pub struct Prometheus {
    pub port: u16,
    child: Option<Child>,
    /// Its data and `prometheus.log`.
    pub dir: TempDir,
}

impl Prometheus {
    pub async fn start() -> Prometheus {
        let mut p = Prometheus {
            port: free_port(),
            child: None,
            dir: TempDir::new("prometheus"),
        };
        std::fs::write(p.dir.path.join("prometheus.yml"), "global: {}\n").unwrap();
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let bin = std::env::var_os("PROMETHEUS_BIN")
            .map_or_else(|| PathBuf::from("/usr/bin/prometheus"), PathBuf::from);
        assert!(
            bin.exists(),
            "Prometheus not found: run scripts/testenv.sh (or set PROMETHEUS_BIN)"
        );
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                self.dir.path.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path.join("prometheus.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("starting Prometheus");
        self.child = Some(child);
        wait_ok(
            &format!("http://127.0.0.1:{}/-/ready", self.port),
            Duration::from_secs(30),
            "Prometheus",
        )
        .await;
    }

    /// Kill Prometheus (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// Instant query; the `data.result` array.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let mut q = String::new();
        for b in promql.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                q.push(b as char);
            } else {
                q.push_str(&format!("%{b:02X}"));
            }
        }
        let (status, body) = get(&format!(
            "http://127.0.0.1:{}/api/v1/query?query={q}",
            self.port
        ))
        .await
        .expect("query");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
