//! Lab scenarios: a YAML file says the load, the rollout policy, a list of rollouts (each an
//! image, an optional fault and the expected outcome) and how many times to repeat them.
//! [`run`] drives a [`Lab`] through it and measures each rollout: its outcome and, for a
//! faulted one, the time from the fault starting to (a) the canary weight being 0 in the
//! router (the VirtualRouter or the HTTPRoute) and (b) the gateway Envoy sending the canary its
//! last request.
//!
//! ```yaml
//! name: havoc
//! runs: 10
//! load: {concurrency: 2, qps: 20}        # hey at the apex (qps per worker, as hey's -q)
//! policy:                                # meshcanary.io/ annotations of podinfo
//!   step-weights: 2,5,10,20,30,50
//!   interval: 5s
//!   threshold: 5
//!   success-rate-min: 99
//! rollouts:
//!   - image: ghcr.io/stefanprodan/podinfo:6.0.2
//!     fault:
//!       at-weight: 5                     # (plus 0-1 s at random: weights change at ticks,
//!                                        # faults do not) or at-seconds: 10 (after the
//!                                        # analysis starts)
//!       direct-errors: {concurrency: 1, qps: 5, path: /status/500}
//!       # error-percent: 5               # the canary app fails this share of its requests
//!       # added-latency-ms: 300          # the canary app answers this much later
//!       # kill: {what: leader, after-seconds: 2}   # leader | peer | agent-pod | canary-envoy | canary-app
//!       # restart-apiserver: true
//!       # stop-prometheus-seconds: 60      # the remote-write receiver
//!     expect: rollback                   # or promotion
//! ```
//!
//! Or the policy comes from a Flagger Canary, applied as written (no `policy:` then):
//!
//! ```yaml
//! canary:
//!   file: lab/canary/podinfo.yaml          # a Canary of podinfo in namespace test
//!   analysis: {interval: 2s}               # optional: fields set over spec.analysis
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshcanary::rollout::{Phase, Status};
use serde::Deserialize;

use super::lab::{Hey, Lab};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub runs: usize,
    pub load: Load,
    /// `meshcanary.io/<key>: value` annotations.
    #[serde(default)]
    pub policy: BTreeMap<String, serde_norway::Value>,
    /// Or a Flagger Canary that says the policy.
    #[serde(default)]
    pub canary: Option<CanarySource>,
    pub rollouts: Vec<Rollout>,
}

fn one() -> usize {
    1
}

/// A Flagger Canary file (relative to the repository) and fields set over its
/// `spec.analysis` (the CI run shortens the interval).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CanarySource {
    pub file: String,
    #[serde(default)]
    pub analysis: BTreeMap<String, serde_norway::Value>,
}

impl CanarySource {
    /// The Canary object to apply.
    ///
    /// ### Errors
    /// The file cannot be read or is not YAML.
    pub fn object(&self) -> Result<serde_json::Value, String> {
        let path = super::repo().join(&self.file);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut v: serde_json::Value =
            serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for (k, value) in &self.analysis {
            v["spec"]["analysis"][k] = serde_json::to_value(value).map_err(|e| e.to_string())?;
        }
        Ok(v)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Load {
    pub concurrency: u32,
    pub qps: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Rollout {
    pub image: String,
    #[serde(default)]
    pub fault: Option<Fault>,
    pub expect: Expect,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    Promotion,
    Rollback,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Fault {
    #[serde(default)]
    pub at_weight: Option<u8>,
    #[serde(default)]
    pub at_seconds: Option<f64>,
    #[serde(default)]
    pub direct_errors: Option<DirectErrors>,
    #[serde(default)]
    pub error_percent: Option<f64>,
    #[serde(default)]
    pub added_latency_ms: Option<u64>,
    #[serde(default)]
    pub kill: Option<Kill>,
    /// Kill the kube-apiserver (SIGKILL) and start it again.
    #[serde(default)]
    pub restart_apiserver: bool,
    /// Stop the remote-write receiver (Prometheus) for this many seconds.
    #[serde(default)]
    pub stop_prometheus_seconds: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirectErrors {
    pub concurrency: u32,
    pub qps: u32,
    #[serde(default = "status_500")]
    pub path: String,
}

fn status_500() -> String {
    "/status/500".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Kill {
    pub what: KillWhat,
    #[serde(default)]
    pub after_seconds: f64,
    /// Start it again this long after the kill (default: when the rollout has ended).
    #[serde(default)]
    pub restart_after_seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KillWhat {
    /// The controller replica holding the Lease.
    Leader,
    /// The agent of the canary's node (its Pod stays: the agent is known and silent).
    Peer,
    /// The agent of the canary's node, Pod and process (a drained or evicted agent: the
    /// node has no agent at all).
    AgentPod,
    CanaryEnvoy,
    /// The test app behind the canary's sidecar (the sidecar stays up and answers 503).
    CanaryApp,
}

impl Scenario {
    /// Parse a scenario file's text.
    ///
    /// ### Errors
    /// The YAML error, with its line.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        if s.rollouts.is_empty() {
            return Err("a scenario needs at least one rollout".into());
        }
        if s.canary.is_some() && !s.policy.is_empty() {
            return Err("a scenario has a policy or a canary, not both".into());
        }
        for r in &s.rollouts {
            if let Some(f) = &r.fault {
                if f.at_weight.is_some() == f.at_seconds.is_some() {
                    return Err(format!(
                        "rollout {}: a fault needs exactly one of at-weight and at-seconds",
                        r.image
                    ));
                }
            }
        }
        Ok(s)
    }

    /// The longest a rollout may take before it counts as stuck: five minutes, or eight
    /// intervals and two minutes when the steps are longer (the reference Canary's 1m).
    pub fn rollout_limit(&self) -> Duration {
        let interval = match &self.canary {
            Some(c) => c
                .object()
                .ok()
                .and_then(|o| {
                    o["spec"]["analysis"]["interval"]
                        .as_str()
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "1m".into()),
            None => self
                .annotations()
                .get("meshcanary.io/interval")
                .cloned()
                .unwrap_or_else(|| "30s".into()),
        };
        let interval =
            meshcanary::config::parse_duration(&interval).unwrap_or(Duration::from_secs(60));
        (interval * 8 + Duration::from_secs(120)).max(Duration::from_secs(300))
    }

    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.policy
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_norway::Value::String(s) => s.clone(),
                    other => serde_norway::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                (format!("meshcanary.io/{k}"), v)
            })
            .collect()
    }
}

/// How a rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Promoted,
    RolledBack,
    /// Neither within the time limit.
    Stuck,
}

/// One rollout's measurements.
#[derive(Clone, Debug)]
pub struct RolloutResult {
    pub run: usize,
    pub image: String,
    pub expect: Expect,
    pub outcome: Outcome,
    /// From the new image to the end of the rollout.
    pub seconds: f64,
    /// Fault start to canary weight 0 in the router (VirtualRouter or HTTPRoute).
    pub ttr_router: Option<f64>,
    /// Fault start to the last request the gateway sent the canary.
    pub ttr_gateway: Option<f64>,
    pub leader: Option<String>,
    /// The rollout has a fault (whether or not it started).
    pub faulted: bool,
    /// Every change of the router's canary weight: (seconds since the analysis
    /// started, weight).
    pub weights: Vec<(f64, u8)>,
    /// Seconds since the analysis started: when the fault started, and when a killed
    /// process was started again.
    pub fault_at: Option<f64>,
    pub killed_at: Option<f64>,
    pub restarted_at: Option<f64>,
}

impl RolloutResult {
    pub fn as_expected(&self) -> bool {
        !self.false_rollback()
            && matches!(
                (self.expect, self.outcome),
                (Expect::Promotion, Outcome::Promoted) | (Expect::Rollback, Outcome::RolledBack)
            )
    }

    /// A rollback of a healthy rollout, or of a faulty one before its fault started.
    pub fn false_rollback(&self) -> bool {
        self.outcome == Outcome::RolledBack
            && (self.expect == Expect::Promotion || (self.faulted && self.fault_at.is_none()))
    }

    pub fn summary(&self) -> String {
        let outcome = match self.outcome {
            Outcome::Promoted => "Succeeded (promoted)",
            Outcome::RolledBack => "Failed (rolled back)",
            Outcome::Stuck => "stuck (neither promoted nor rolled back)",
        };
        let mut s = format!(
            "run {} {}: {outcome} after {:.1} s",
            self.run, self.image, self.seconds
        );
        if let Some(t) = self.ttr_router {
            s += &format!(", weight 0 {t:.1} s after the fault started");
        }
        if let Some(t) = self.ttr_gateway {
            s += &format!(", last canary request via the gateway at {t:.1} s");
        }
        if self.faulted && self.fault_at.is_none() && self.outcome == Outcome::RolledBack {
            s += " (before the fault started: a false rollback)";
        } else if !self.as_expected() {
            s += &format!(" (expected {:?})", self.expect);
        }
        s
    }
}

/// Prints the workload's events once each, as they appear.
#[derive(Default)]
pub struct EventLog {
    seen: std::collections::BTreeSet<String>,
}

impl EventLog {
    pub async fn print_new(&mut self, lab: &Lab, print: &mut impl FnMut(&str)) {
        for e in lab.events().await {
            if self.seen.insert(e.id) {
                print(&format!(
                    "  event: {:<8} {:<18} {}",
                    e.type_, e.reason, e.note
                ));
            }
        }
    }
}

async fn wait_status(
    lab: &Lab,
    events: &mut EventLog,
    print: &mut impl FnMut(&str),
    within: Duration,
    cond: impl Fn(&Status) -> bool,
) -> Option<Status> {
    let deadline = Instant::now() + within;
    let mut last_print = Instant::now();
    while Instant::now() < deadline {
        if let Some(s) = lab.status().await {
            if cond(&s) {
                events.print_new(lab, print).await;
                return Some(s);
            }
        }
        if last_print.elapsed() > Duration::from_millis(500) {
            events.print_new(lab, print).await;
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Run `scenario` on `lab`, printing events and one line per rollout through `print`.
pub async fn run(
    lab: &mut Lab,
    scenario: &Scenario,
    mut print: impl FnMut(&str),
) -> Vec<RolloutResult> {
    let annotations = scenario.annotations();
    let mut events = EventLog::default();
    let limit = scenario.rollout_limit();
    if lab.status().await.is_none() {
        if let Some(canary) = &scenario.canary {
            let object = canary.object().unwrap_or_else(|e| panic!("{e}"));
            lab.apply_canary(&object).await;
        }
        lab.deploy("ghcr.io/stefanprodan/podinfo:6.0.0", &annotations)
            .await;
        wait_status(lab, &mut events, &mut print, Duration::from_secs(90), |s| {
            s.phase == Phase::Initialized
        })
        .await
        .expect("podinfo initialized within 90 s");
    }
    let total = limit * (scenario.runs * scenario.rollouts.len()) as u32;
    let _load = lab.hey(
        &lab.apex_url(),
        scenario.load.concurrency,
        scenario.load.qps,
        total.min(Duration::from_secs(6 * 3600)),
    );
    let mut results = Vec::new();
    for run in 0..scenario.runs {
        for rollout in &scenario.rollouts {
            let image = if scenario.runs > 1 {
                format!("{}-run{run}", rollout.image)
            } else {
                rollout.image.clone()
            };
            let before = lab.status().await.map(|s| s.revision);
            print(&format!("lab: new image {image}"));
            let started = Instant::now();
            lab.deploy(&image, &annotations).await;
            let progressing = wait_status(lab, &mut events, &mut print, limit, |s| {
                s.phase == Phase::Progressing && Some(&s.revision) != before.as_ref()
            })
            .await;
            let mut result = RolloutResult {
                run,
                image: image.clone(),
                expect: rollout.expect,
                outcome: Outcome::Stuck,
                seconds: 0.0,
                ttr_router: None,
                ttr_gateway: None,
                leader: lab.leader_controller().await,
                faulted: rollout.fault.is_some(),
                weights: Vec::new(),
                fault_at: None,
                killed_at: None,
                restarted_at: None,
            };
            if progressing.is_some() {
                measure(lab, rollout, &mut result, &mut events, &mut print, limit).await;
            }
            result.seconds = started.elapsed().as_secs_f64();
            print(&format!("lab: {}", result.summary()));
            results.push(result);
        }
    }
    results
}

/// Follow one rollout from Progressing to its end, starting and clearing its fault.
async fn measure(
    lab: &mut Lab,
    rollout: &Rollout,
    result: &mut RolloutResult,
    events: &mut EventLog,
    print: &mut impl FnMut(&str),
    limit: Duration,
) {
    let analysis = Instant::now();
    let deadline = analysis + limit;
    let mut fault_at: Option<Instant> = None;
    let mut direct: Option<Hey> = None;
    let mut killed: Option<Killed> = None;
    let mut envoy_killed = false;
    let mut app_killed = false;
    let mut kill_time: Option<Instant> = None;
    let mut prometheus_stopped: Option<Instant> = None;
    let mut zero_at: Option<Instant> = None;
    let mut last_canary_request: Option<Instant> = None;
    let mut canary_requests = lab.gateway_canary_requests().await;
    let mut last_print = Instant::now();
    let mut ended: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline {
            break;
        }
        let status = lab.status().await;
        let weight = lab.router_weight().await;
        if let Some(w) = weight {
            if result.weights.last().map(|l| l.1) != Some(w) {
                result.weights.push((analysis.elapsed().as_secs_f64(), w));
            }
        }
        // Start the fault.
        if let (Some(f), None) = (&rollout.fault, fault_at) {
            let due = match (f.at_weight, f.at_seconds) {
                (Some(w), _) => weight.is_some_and(|cw| cw >= w),
                (_, Some(s)) => analysis.elapsed().as_secs_f64() >= s,
                _ => false,
            };
            if due {
                // Weights change at decision ticks; a real fault starts at any moment.
                if f.at_weight.is_some() {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(..1000))).await;
                }
                fault_at = Some(Instant::now());
                result.fault_at = Some(analysis.elapsed().as_secs_f64());
                canary_requests = lab.gateway_canary_requests().await;
                if f.stop_prometheus_seconds.is_some() {
                    if let Some(p) = lab.prometheus.as_mut() {
                        p.stop();
                        prometheus_stopped = Some(Instant::now());
                        print("lab: stopped Prometheus (the remote-write receiver)");
                    }
                }
                if f.restart_apiserver {
                    print("lab: restarting the kube-apiserver");
                    lab.cp.restart_apiserver().await;
                }
                if let Some(d) = &f.direct_errors {
                    let url = format!("{}{}", lab.canary.sidecar.ingress_url(), d.path);
                    direct = Some(lab.hey(&url, d.concurrency, d.qps, limit));
                }
                if f.error_percent.is_some() || f.added_latency_ms.is_some() {
                    lab.canary.app.fault.set(
                        f.error_percent.unwrap_or(0.0),
                        500,
                        Duration::from_millis(f.added_latency_ms.unwrap_or(0)),
                    );
                }
                print(&format!(
                    "lab: fault started at canary weight {}",
                    weight.unwrap_or(0)
                ));
            }
        }
        // Kill what the fault says, `after-seconds` after it started.
        if let (Some(f), Some(t0)) = (&rollout.fault, fault_at) {
            if let Some(k) = &f.kill {
                if kill_time.is_none() && t0.elapsed().as_secs_f64() >= k.after_seconds {
                    match k.what {
                        KillWhat::CanaryEnvoy => {
                            lab.canary.sidecar.stop();
                            envoy_killed = true;
                            kill_time = Some(Instant::now());
                            result.killed_at = Some(analysis.elapsed().as_secs_f64());
                            print("lab: killed the canary's Envoy");
                        }
                        KillWhat::CanaryApp => {
                            lab.canary.app.stop();
                            app_killed = true;
                            kill_time = Some(Instant::now());
                            result.killed_at = Some(analysis.elapsed().as_secs_f64());
                            print("lab: killed the canary's app");
                        }
                        KillWhat::Leader => {
                            if let Some(pod) = lab.leader_controller().await {
                                lab.kill_controller(&pod);
                                print(&format!("lab: killed the leading controller {pod}"));
                                killed = Some(Killed::Controller(pod));
                                kill_time = Some(Instant::now());
                                result.killed_at = Some(analysis.elapsed().as_secs_f64());
                            }
                        }
                        KillWhat::Peer | KillWhat::AgentPod => {
                            let node = CANARY_NODE.to_owned();
                            if k.what == KillWhat::Peer {
                                lab.kill_agent(&node);
                                print(&format!("lab: killed the agent on {node}"));
                                killed = Some(Killed::Agent(node));
                            } else {
                                lab.delete_agent_pod(&node).await;
                                print(&format!("lab: deleted the agent pod of {node}"));
                                killed = Some(Killed::AgentPod(node));
                            }
                            kill_time = Some(Instant::now());
                            result.killed_at = Some(analysis.elapsed().as_secs_f64());
                        }
                    }
                }
            }
        }
        // Bring Prometheus back when its outage is over (the rollout goes on meanwhile).
        let outage = rollout
            .fault
            .as_ref()
            .and_then(|f| f.stop_prometheus_seconds);
        if let (Some(secs), Some(t)) = (outage, prometheus_stopped) {
            if t.elapsed().as_secs_f64() >= secs {
                if let Some(p) = lab.prometheus.as_mut() {
                    p.restart().await;
                    print("lab: Prometheus is back");
                }
                prometheus_stopped = None;
                result.restarted_at = Some(analysis.elapsed().as_secs_f64());
            }
        }
        // Start the killed process again when the fault says so.
        let restart_after = rollout
            .fault
            .as_ref()
            .and_then(|f| f.kill.as_ref())
            .and_then(|k| k.restart_after_seconds);
        if let (Some(after), Some(t)) = (restart_after, kill_time) {
            if result.restarted_at.is_none() && t.elapsed().as_secs_f64() >= after {
                restart(lab, &mut envoy_killed, &mut app_killed, &mut killed, print).await;
                result.restarted_at = Some(analysis.elapsed().as_secs_f64());
            }
        }
        // Measure.
        if let Some(t0) = fault_at {
            if zero_at.is_none() && weight == Some(0) {
                zero_at = Some(Instant::now());
                result.ttr_router = Some(t0.elapsed().as_secs_f64());
            }
            let n = lab.gateway_canary_requests().await;
            if n > canary_requests {
                last_canary_request = Some(Instant::now());
                canary_requests = n;
            }
        }
        let phase = status.as_ref().map(|s| s.phase);
        if ended.is_none() && matches!(phase, Some(Phase::Succeeded | Phase::Failed)) {
            ended = Some(Instant::now());
            result.outcome = if phase == Some(Phase::Succeeded) {
                Outcome::Promoted
            } else {
                Outcome::RolledBack
            };
        }
        // After the end, watch the gateway 3 s more: the canary must get nothing.
        if let Some(e) = ended {
            let settled = zero_at.map_or(e, |z| z.max(e));
            if fault_at.is_none() || settled.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if last_print.elapsed() > Duration::from_millis(500) {
            events.print_new(lab, print).await;
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    events.print_new(lab, print).await;
    if let (Some(t0), Some(last)) = (fault_at, last_canary_request) {
        result.ttr_gateway = Some(last.duration_since(t0).as_secs_f64());
    } else if fault_at.is_some() && result.ttr_router.is_some() {
        // The gateway sent the canary nothing after the fault started.
        result.ttr_gateway = Some(0.0);
    }
    if result.outcome != Outcome::RolledBack {
        // Weight 0 after a promotion is not a rollback.
        result.ttr_router = None;
        result.ttr_gateway = None;
    }
    // Clear the fault for the next rollout.
    drop(direct);
    lab.canary.app.fault.set(0.0, 500, Duration::ZERO);
    restart(lab, &mut envoy_killed, &mut app_killed, &mut killed, print).await;
    if prometheus_stopped.is_some() {
        if let Some(p) = lab.prometheus.as_mut() {
            p.restart().await;
            result.restarted_at = Some(analysis.elapsed().as_secs_f64());
            print("lab: Prometheus is back");
        }
    }
}

/// The node the lab's canary pod runs on.
const CANARY_NODE: &str = "node-b";

/// What a fault killed, to start again.
enum Killed {
    Controller(String),
    Agent(String),
    AgentPod(String),
}

/// Start again what a fault killed.
async fn restart(
    lab: &mut Lab,
    envoy_killed: &mut bool,
    app_killed: &mut bool,
    killed: &mut Option<Killed>,
    print: &mut impl FnMut(&str),
) {
    if std::mem::take(envoy_killed) {
        lab.canary.sidecar.restart().await;
        print("lab: restarted the canary's Envoy");
    }
    if std::mem::take(app_killed) {
        lab.canary.app.restart().await;
        print("lab: restarted the canary's app");
    }
    match killed.take() {
        None => {}
        Some(Killed::Controller(pod)) => {
            lab.restart_controller(&pod);
            print(&format!("lab: restarted the controller {pod}"));
        }
        Some(Killed::Agent(node)) => {
            lab.restart_agent(&node);
            print(&format!("lab: restarted the agent on {node}"));
        }
        Some(Killed::AgentPod(node)) => {
            lab.recreate_agent_pod(&node).await;
            print(&format!("lab: recreated the agent pod of {node}"));
        }
    }
}
