//! The one analysis loop: judge state per workload, fed from any [`WindowSource`], and the
//! verdicts published for `/metrics`, `meshcanary watch` and the logs.
//!
//! The controller drives an [`Analysis`] tick by tick with each workload's own policy and
//! step; an agent without a controller (static targets, `meshcanary watch`) drives the same
//! [`Analysis`] through [`run`] with the command line's policy, so both show the same judge.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::judge::{Evidence, JudgeState, Judgement, Message, Observation, Policy, Verdict};
use crate::telemetry::{lock, GaugeF, MetricRegistry};
use crate::window::{WindowPair, WindowSource};
use crate::workload::WorkloadId;

/// The latest verdict per workload, as published.
pub type Judgements = Arc<Mutex<BTreeMap<WorkloadId, Judgement>>>;

/// Judge state per workload under analysis.
#[derive(Default)]
pub struct Analysis {
    states: HashMap<WorkloadId, JudgeState>,
    published: Option<Judgements>,
    /// The largest [`Evidence::progress`](crate::judge::Evidence::progress) judged since
    /// the last [`Analysis::take_progress`].
    progress: f64,
}

impl Analysis {
    /// Publish every verdict into `judgements` (and log each change of verdict).
    #[must_use]
    pub fn publishing(mut self, judgements: Judgements) -> Self {
        self.published = Some(judgements);
        self
    }

    /// Start a workload's analysis over: its evidence starts from zero.
    pub fn reset(&mut self, id: &WorkloadId, policy: &Policy) {
        self.states.insert(id.clone(), JudgeState::new(policy));
    }

    /// Judge one workload at `now_ms` on what `windows` holds; during a step that started at
    /// `step_started_ms` a quiet canary is judged over the whole step. Returns the verdict
    /// and the pair it was made on (`None`: no window yet, a "no data" verdict).
    pub fn judge<W: WindowSource>(
        &mut self,
        windows: &W,
        id: &WorkloadId,
        policy: &Policy,
        now_ms: u64,
        step_started_ms: u64,
    ) -> (Judgement, Option<WindowPair>) {
        let pair = windows.pair(&id.namespace, &id.name, now_ms);
        let judgement = match &pair {
            Some(pair) => self
                .states
                .entry(id.clone())
                .or_insert_with(|| JudgeState::new(policy))
                .judge(
                    &Observation::of(pair, now_ms).in_step(step_started_ms),
                    policy,
                ),
            None => Judgement {
                verdict: Verdict::NoData {
                    reason: "no_window",
                },
                evidence: Evidence::default(),
            },
        };
        self.progress = self.progress.max(judgement.evidence.progress());
        self.publish(id, &judgement);
        (judgement, pair)
    }

    /// How close the closest workload came to a rollback since the last call (see
    /// [`Evidence::progress`](crate::judge::Evidence::progress)), and start again from 0.
    pub fn take_progress(&mut self) -> f64 {
        std::mem::take(&mut self.progress)
    }

    /// Forget the workloads `keep` rejects (gone, or no longer analysed), and their
    /// published verdicts.
    pub fn retain(&mut self, keep: impl Fn(&WorkloadId) -> bool) {
        self.states.retain(|id, _| keep(id));
        if let Some(published) = &self.published {
            lock(published).retain(|id, _| keep(id));
        }
    }

    fn publish(&self, id: &WorkloadId, judgement: &Judgement) {
        let Some(published) = &self.published else {
            return;
        };
        let mut published = lock(published);
        let before = published.get(id).map(|j| j.verdict.as_str());
        if before != Some(judgement.verdict.as_str()) {
            let target = id.to_string();
            let message = Message {
                target: &target,
                judgement,
            }
            .to_string();
            let verdict = judgement.verdict.as_str();
            let (namespace, workload) = (&id.namespace, &id.name);
            match judgement.verdict {
                Verdict::Rollback(_) | Verdict::Failed(_) => {
                    tracing::warn!(%namespace, %workload, verdict, "{message}");
                }
                _ => tracing::info!(%namespace, %workload, verdict, "{message}"),
            }
        }
        published.insert(id.clone(), judgement.clone());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JudgeLabels {
    pub namespace: String,
    pub workload: String,
}

impl From<&WorkloadId> for JudgeLabels {
    fn from(id: &WorkloadId) -> Self {
        JudgeLabels {
            namespace: id.namespace.clone(),
            workload: id.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub namespace: String,
    pub workload: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TestLabels {
    pub namespace: String,
    pub workload: String,
    pub test: &'static str,
}

/// The analysis' metrics: each published verdict and its evidence, refreshed from the
/// published [`Judgements`] before each encode.
#[derive(Clone, Debug, Default)]
pub struct JudgeMetrics {
    verdict: Family<VerdictLabels, Gauge>,
    e_value: Family<TestLabels, GaugeF>,
    boundary: Family<TestLabels, GaugeF>,
    share: Family<JudgeLabels, GaugeF>,
}

impl JudgeMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let m = JudgeMetrics::default();
        r.register(
            "meshcanary_judge_verdict",
            "1 for the judge's current verdict on a workload (no_data, pass, advance_early, failed_check, rollback).",
            &["namespace", "workload", "verdict"],
            &m.verdict,
        );
        r.register(
            "meshcanary_judge_e_value",
            "Evidence of each sequential test (errors, latency, error_slo, latency_slo, not_worse); a rollback when it reaches the boundary.",
            &["namespace", "workload", "test"],
            &m.e_value,
        );
        r.register(
            "meshcanary_judge_boundary",
            "The value each sequential test's e-value must reach (1 / its share of alpha).",
            &["namespace", "workload", "test"],
            &m.boundary,
        );
        r.register(
            "meshcanary_judge_canary_share",
            "The canary's observed share of requests since the judge started on the workload.",
            &["namespace", "workload"],
            &m.share,
        );
        m
    }

    /// Set the gauges from the published verdicts (before an encode).
    pub fn refresh(&self, judgements: &Judgements) {
        self.verdict.clear();
        self.e_value.clear();
        self.boundary.clear();
        self.share.clear();
        for (id, j) in lock(judgements).iter() {
            self.verdict
                .get_or_create(&VerdictLabels {
                    namespace: id.namespace.clone(),
                    workload: id.name.clone(),
                    verdict: j.verdict.as_str(),
                })
                .set(1);
            for (test, e, boundary) in j.evidence.tests() {
                let l = TestLabels {
                    namespace: id.namespace.clone(),
                    workload: id.name.clone(),
                    test,
                };
                self.e_value.get_or_create(&l).set(e);
                if boundary.is_finite() {
                    self.boundary.get_or_create(&l).set(boundary);
                }
            }
            self.share
                .get_or_create(&JudgeLabels::from(id))
                .set(j.evidence.canary_share);
        }
    }
}

/// Judge every workload `workloads` lists, every `interval`, with one `policy`, until
/// `shutdown`: the analysis of an agent that runs without a controller. A workload's
/// analysis starts when it first has both windows.
pub async fn run<W: WindowSource>(
    windows: W,
    workloads: impl Fn() -> Vec<WorkloadId> + Send,
    policy: Policy,
    interval: Duration,
    judgements: Judgements,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut analysis = Analysis::default().publishing(judgements);
    let mut started: HashMap<WorkloadId, u64> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::shutdown::stopping(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let now_ms = crate::clock::unix_ms();
        windows.refresh(Vec::new()).await;
        let mut judged = Vec::new();
        for id in workloads() {
            if windows.pair(&id.namespace, &id.name, now_ms).is_none() {
                continue;
            }
            let since = *started.entry(id.clone()).or_insert(now_ms);
            analysis.judge(&windows, &id, &policy, now_ms, since);
            judged.push(id);
        }
        started.retain(|id, _| judged.contains(id));
        analysis.retain(|id| judged.contains(id));
    }
}
