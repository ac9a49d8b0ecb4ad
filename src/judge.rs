//! Stage 6, judge: from (primary, canary, policy, now) to a verdict, with the numbers behind it.
//!
//! Two families of checks run side by side (`meshcanary.io/judge: threshold | sequential |
//! both`, default both):
//!
//! 1. **Threshold checks, as Flagger does them**: over the window, the canary's success rate
//!    below `success-rate-min`, or its p99 above `latency-p99-max`, is a failed check with
//!    Flagger's message; the controller rolls back after `threshold` failed checks. Too few
//!    requests is "no data": it halts and is neither a pass nor a failure.
//! 2. **Anytime-valid sequential tests** (e-processes): each is a nonnegative supermartingale
//!    under its null hypothesis, so by Ville's inequality the chance that it *ever* reaches
//!    `1/alpha'` is at most `alpha'`, however often it is looked at. Reaching it rolls back at
//!    once. `alpha` is split over the active tests (a weighted union bound: most of it to
//!    the two-arm tests, which do the main work; see [`ALPHA_SHARES`]), so the chance of any
//!    false rollback over a whole rollout is at most `alpha`.
//!    - *errors, canary vs primary*: conditional on the 5xx seen in an interval, each one came
//!      from the canary with probability `rho` (the canary's share of requests in that
//!      interval) if the canary is no worse. Under "the canary's error rate is `r` times the
//!      primary's" that probability is `rho r / (rho r + 1 - rho)`. The e-process mixes the
//!      likelihood ratios of a fixed grid of `r > 1` (Lindon et al., KDD 2022; a discrete
//!      prior in place of their Beta prior). One-sided: a better canary only lowers it.
//!      `rho` is recomputed every interval, so a share that changes at every step is exact.
//!    - *latency, canary vs primary*: the same test on requests slower than each histogram
//!      edge, averaged over the edges (an average of e-processes is one): detects a canary
//!      that is slower anywhere in the distribution, within the SLO or not.
//!    - *error SLO* and *latency SLO*, canary alone: `P(5xx) <= 1 - success-rate-min` and
//!      `P(latency > edge) <= 1 %` at the smallest Envoy bucket edge >= `latency-p99-max`
//!      (so "p99 <= max"), each a mixture over a grid of worse rates.
//!    - *not worse* (for `advance-early`): the mirror of the error-SLO test; its null is "the
//!      canary's error rate is at least the SLO", rejected by enough clean traffic.
//!
//! State is O(1) per workload: the previous totals and a fixed number of log-likelihood
//! ratios. Time enters only as the `now_ms` of observations, used for evidence age.

use std::fmt;

use crate::window::{histogram_quantile, Stale, Totals};

/// Which families of checks may fail a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Threshold,
    Sequential,
    Both,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "threshold" => Ok(Mode::Threshold),
            "sequential" => Ok(Mode::Sequential),
            "both" => Ok(Mode::Both),
            other => Err(format!(
                "expected threshold, sequential or both, got {other:?}"
            )),
        }
    }
}

/// The analysis settings of one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// Minimum success rate as a fraction (0.99 for Flagger's `99`).
    pub success_rate_min: f64,
    /// Maximum p99 in milliseconds, if latency is checked.
    pub latency_p99_max_ms: Option<f64>,
    /// Requests the canary window needs before the threshold checks run.
    pub min_requests: u64,
    /// Total false-rollback budget of the sequential tests over a rollout.
    pub alpha: f64,
    /// Allow advancing before the step interval when the sequential evidence says the
    /// canary is within the SLO.
    pub advance_early: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: Mode::Both,
            success_rate_min: 0.99,
            latency_p99_max_ms: Some(500.0),
            min_requests: 10,
            alpha: 0.01,
            advance_early: false,
        }
    }
}

/// What the judge is shown at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// The canary's window values for the threshold checks (success rate, p99, request
    /// count); like Flagger's, they compare the canary with fixed limits, not with the primary.
    pub canary_window: WindowValues,
    /// Totals for the sequential tests.
    pub canary: &'a Totals,
    pub primary: &'a Totals,
    /// Histogram bucket upper bounds (ms) of both arms' `buckets`.
    pub edges_ms: &'a [f64],
    /// Why the data cannot be vouched for (a peer or pod not answering), `None` when it is
    /// current: the judge then never says "healthy"; a canary that alone went silent is a
    /// failed check, anything else "no data".
    pub stale: Option<Stale>,
    /// When the current rollout step began (unix ms): when the rolling window is short of
    /// `min_requests`, the threshold checks judge everything since then. `None` outside a
    /// rollout (a standalone agent).
    pub step_started_ms: Option<u64>,
    pub now_ms: u64,
}

impl<'a> Observation<'a> {
    /// What the judge reads of a workload's window pair.
    pub fn of(pair: &'a crate::window::WindowPair, now_ms: u64) -> Self {
        Observation {
            canary_window: WindowValues::from(&pair.canary),
            canary: &pair.canary_totals,
            primary: &pair.primary_totals,
            edges_ms: &pair.edges_ms,
            stale: pair.stale,
            step_started_ms: None,
            now_ms,
        }
    }

    /// The same observation within a rollout step that began at `started_ms`.
    pub fn in_step(self, started_ms: u64) -> Self {
        Observation {
            step_started_ms: Some(started_ms),
            ..self
        }
    }
}

/// The few window values the threshold checks read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WindowValues {
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl From<&crate::window::Summary> for WindowValues {
    fn from(s: &crate::window::Summary) -> Self {
        WindowValues {
            requests: s.requests,
            success_rate: s.success_rate,
            p99_ms: s.p99_ms,
        }
    }
}

/// A threshold check that failed.
#[derive(Clone, Debug, PartialEq)]
pub enum FailedCheck {
    SuccessRate {
        value: f64,
        min: f64,
    },
    RequestDuration {
        p99_ms: f64,
        max_ms: f64,
    },
    /// The canary's sidecars sent nothing for longer than the staleness limit while every
    /// other source answered: the canary (or its sidecar) died. Flagger's "no values found".
    CanarySilent,
}

/// Which sequential test crossed its boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Errors,
    Latency,
    ErrorSlo,
    LatencySlo,
}

impl Test {
    pub fn as_str(self) -> &'static str {
        match self {
            Test::Errors => "errors",
            Test::Latency => "latency",
            Test::ErrorSlo => "error_slo",
            Test::LatencySlo => "latency_slo",
        }
    }
}

/// The judge's decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough (or stale) data: halt, neither pass nor fail.
    NoData { reason: &'static str },
    /// The checks pass; `early` when the evidence allows advancing before the interval ends.
    Pass { early: bool },
    /// A Flagger-style failed check (counted towards `threshold`).
    Failed(FailedCheck),
    /// A sequential test rejected its null: roll back now.
    Rollback(Test),
}

impl Verdict {
    /// A fixed, bounded name for metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::NoData { .. } => "no_data",
            Verdict::Pass { early: false } => "pass",
            Verdict::Pass { early: true } => "advance_early",
            Verdict::Failed(_) => "failed_check",
            Verdict::Rollback(_) => "rollback",
        }
    }
}

/// The numbers behind a verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evidence {
    pub e_errors: f64,
    pub e_latency: f64,
    pub e_error_slo: f64,
    pub e_latency_slo: f64,
    pub e_not_worse: f64,
    /// The boundary each test must reach: `1 / (alpha * its share of alpha)`, in the order
    /// errors, latency, error SLO, latency SLO (infinite for a test that does not run).
    pub boundaries: [f64; 4],
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub primary_requests: u64,
    pub primary_errors: u64,
    /// Canary share of requests since the analysis started.
    pub canary_share: f64,
    /// The latency SLO edge (ms) the latency-SLO test uses.
    pub slo_edge_ms: Option<f64>,
}

impl Evidence {
    /// How far the nearest rollback test has come: the largest e-value over its boundary
    /// (1 = rollback). A workload that is not analysed has all boundaries infinite: 0.
    pub fn progress(&self) -> f64 {
        let e = [
            self.e_errors,
            self.e_latency,
            self.e_error_slo,
            self.e_latency_slo,
        ];
        e.iter()
            .zip(self.boundaries)
            .map(|(e, b)| if b.is_finite() && b > 0.0 { e / b } else { 0.0 })
            .fold(0.0, f64::max)
    }

    /// Each sequential test's name, e-value and boundary (infinite for a test that does not
    /// run); `not_worse` (the early-promotion test) shares the error SLO's boundary.
    pub fn tests(&self) -> [(&'static str, f64, f64); 5] {
        let [errors, latency, error_slo, latency_slo] = self.boundaries;
        [
            (Test::Errors.as_str(), self.e_errors, errors),
            (Test::Latency.as_str(), self.e_latency, latency),
            (Test::ErrorSlo.as_str(), self.e_error_slo, error_slo),
            (Test::LatencySlo.as_str(), self.e_latency_slo, latency_slo),
            ("not_worse", self.e_not_worse, error_slo),
        ]
    }

    fn rate(errors: u64, requests: u64) -> f64 {
        if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        }
    }

    pub fn canary_error_rate(&self) -> f64 {
        Self::rate(self.canary_errors, self.canary_requests)
    }

    pub fn primary_error_rate(&self) -> f64 {
        Self::rate(self.primary_errors, self.primary_requests)
    }
}

/// A verdict with its evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub evidence: Evidence,
}

/// Grid of relative risks (canary rate / primary rate) the two-arm mixtures cover, and the
/// prior weight of each. Below 2x a canary's excess is too rare to separate from noise within
/// a rollout at the rates canaries see (`meshcanary simulate`'s 10x rows need minutes), so
/// the grid starts there; the heavier weight on 100x and 1000x buys speed where a bad release
/// hurts fastest. The mixture costs `log(1/weight)` of evidence against knowing the effect.
const RELATIVE_RISKS: [f64; 5] = [2.0, 5.0, 20.0, 100.0, 1000.0];
const RISK_WEIGHTS: [f64; 5] = [1.0 / 7.0, 1.0 / 7.0, 1.0 / 7.0, 2.0 / 7.0, 2.0 / 7.0];
/// Grid of multiples of the SLO rate the one-arm mixtures cover.
const SLO_MULTIPLES: [f64; 6] = [1.5, 2.0, 4.0, 10.0, 30.0, 100.0];
/// How `alpha` is split over the sequential tests when all four run: errors two-arm,
/// latency two-arm, error SLO, latency SLO. Tests that do not run give their share to the
/// others in proportion.
pub const ALPHA_SHARES: [f64; 4] = [0.5, 0.25, 0.125, 0.125];
/// Latency SLO: p99 <= max means at most 1 % slower than max.
const P99_TAIL: f64 = 0.01;

/// A two-arm conditional test: mixture over [`RELATIVE_RISKS`].
#[derive(Clone, Debug, Default, PartialEq)]
struct TwoArm {
    log_lr: [f64; RELATIVE_RISKS.len()],
}

impl TwoArm {
    /// Fold one interval: `canary` and `primary` events (errors, or slow requests) and the
    /// canary's share `rho` of the requests they were drawn from.
    fn update(&mut self, canary: u64, primary: u64, rho: f64) {
        if canary.saturating_add(primary) == 0 || !(rho > 0.0 && rho < 1.0) {
            return; // no events, or one arm had no traffic: nothing to learn
        }
        for (l, r) in self.log_lr.iter_mut().zip(RELATIVE_RISKS) {
            let q = rho * r / (rho * r + 1.0 - rho);
            *l += canary as f64 * (q / rho).ln() + primary as f64 * ((1.0 - q) / (1.0 - rho)).ln();
        }
    }

    fn e_value(&self) -> f64 {
        weighted_mean_exp(&self.log_lr, &RISK_WEIGHTS)
    }
}

/// A one-arm test of a Bernoulli rate against `p0`: mixture over alternatives above it (or
/// below it, for the "not worse" direction).
#[derive(Clone, Debug, PartialEq)]
struct OneArm {
    p0: f64,
    alternatives: Vec<f64>,
    log_lr: Vec<f64>,
}

impl OneArm {
    fn above(p0: f64) -> Self {
        let alternatives: Vec<f64> = SLO_MULTIPLES
            .iter()
            .map(|m| (p0 * m).min(0.999))
            .filter(|&p| p > p0)
            .collect();
        let n = alternatives.len();
        OneArm {
            p0,
            alternatives,
            log_lr: vec![0.0; n],
        }
    }

    fn below(p0: f64) -> Self {
        let alternatives: Vec<f64> = SLO_MULTIPLES.iter().map(|m| p0 / m).collect();
        let n = alternatives.len();
        OneArm {
            p0,
            alternatives,
            log_lr: vec![0.0; n],
        }
    }

    fn update(&mut self, hits: u64, trials: u64) {
        if trials == 0 || !(self.p0 > 0.0 && self.p0 < 1.0) {
            return;
        }
        let misses = trials.saturating_sub(hits) as f64;
        for (l, &p) in self.log_lr.iter_mut().zip(&self.alternatives) {
            *l += hits as f64 * (p / self.p0).ln() + misses * ((1.0 - p) / (1.0 - self.p0)).ln();
        }
    }

    fn e_value(&self) -> f64 {
        if self.log_lr.is_empty() {
            return 0.0;
        }
        mean_exp(&self.log_lr)
    }
}

/// `sum(w exp(x)) / sum(w)`, computed without overflow.
fn weighted_mean_exp(logs: &[f64], weights: &[f64]) -> f64 {
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return if max > 0.0 { f64::INFINITY } else { 0.0 };
    }
    let sum: f64 = logs
        .iter()
        .zip(weights)
        .map(|(l, w)| w * (l - max).exp())
        .sum();
    (max + (sum / weights.iter().sum::<f64>()).ln()).exp()
}

/// Totals holding only `buckets` (to reuse its bucket arithmetic).
fn bucket_totals(buckets: &[u64]) -> Totals {
    Totals {
        buckets: buckets.to_vec(),
        ..Totals::default()
    }
}

/// `mean(exp(x))`, computed without overflow.
fn mean_exp(logs: &[f64]) -> f64 {
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return if max > 0.0 { f64::INFINITY } else { 0.0 };
    }
    let sum: f64 = logs.iter().map(|l| (l - max).exp()).sum();
    (max + (sum / logs.len() as f64).ln()).exp()
}

/// The judge's memory for one workload's analysis. Start a new one for a new revision.
#[derive(Clone, Debug)]
pub struct JudgeState {
    canary_prev: Totals,
    primary_prev: Totals,
    /// The latency histograms as of the last time both arms' had moved (the two-arm latency
    /// tests fold an interval only then: see `fold`).
    latency_prev: Option<(Vec<u64>, Vec<u64>)>,
    canary_total: Totals,
    primary_total: Totals,
    started: bool,
    errors: TwoArm,
    latency: Vec<TwoArm>,
    error_slo: OneArm,
    latency_slo: Option<(usize, OneArm)>,
    slo_edge_ms: Option<f64>,
    not_worse: OneArm,
    /// The step the threshold checks may fall back to: when it began and the canary's
    /// totals at the first observation in it.
    step: Option<(u64, Totals)>,
}

/// Edges the two-arm latency test looks at: 1 ms to 10 s (outside, Envoy's buckets are too
/// coarse or too rare to matter for a canary).
fn latency_test_edges(edges: &[f64]) -> impl Iterator<Item = usize> + '_ {
    edges
        .iter()
        .enumerate()
        .filter(|(_, &e)| (1.0..=10_000.0).contains(&e))
        .map(|(k, _)| k)
}

impl JudgeState {
    pub fn new(policy: &Policy) -> Self {
        let slo = 1.0 - policy.success_rate_min;
        JudgeState {
            canary_prev: Totals::default(),
            primary_prev: Totals::default(),
            latency_prev: None,
            canary_total: Totals::default(),
            primary_total: Totals::default(),
            started: false,
            errors: TwoArm::default(),
            latency: Vec::new(),
            error_slo: OneArm::above(slo),
            latency_slo: None,
            slo_edge_ms: None,
            not_worse: OneArm::below(slo),
            step: None,
        }
    }

    /// Judge one observation. Totals must be monotone; a decrease (a restarted source) is
    /// taken as a new baseline rather than a negative count.
    pub fn judge(&mut self, obs: &Observation<'_>, policy: &Policy) -> Judgement {
        // Threshold mode is Flagger's rule alone: the sequential state is not kept (its
        // evidence then stays at the neutral values).
        if policy.mode != Mode::Threshold {
            self.fold(obs, policy);
        }
        if let Some(started) = obs.step_started_ms {
            if self.step.as_ref().is_none_or(|(s, _)| *s != started) {
                self.step = Some((started, obs.canary.clone()));
            }
        }
        let evidence = self.evidence(policy);
        let verdict = self.verdict(obs, policy, &evidence);
        Judgement { verdict, evidence }
    }

    fn fold(&mut self, obs: &Observation<'_>, policy: &Policy) {
        // Latency tests start with the first histogram (Envoy flushes it after the counters
        // are already moving); until then their e-values stay neutral.
        if self.latency.is_empty() && !obs.edges_ms.is_empty() {
            if let Some(max) = policy.latency_p99_max_ms {
                if let Some(k) = obs.edges_ms.iter().position(|&e| e >= max) {
                    self.latency_slo = Some((k, OneArm::above(P99_TAIL)));
                    self.slo_edge_ms = Some(obs.edges_ms[k]);
                }
            }
            self.latency = latency_test_edges(obs.edges_ms)
                .map(|_| TwoArm::default())
                .collect();
        }
        if !self.started {
            self.started = true;
            self.canary_prev = obs.canary.clone();
            self.primary_prev = obs.primary.clone();
            self.latency_prev = Some((obs.canary.buckets.clone(), obs.primary.buckets.clone()));
            return;
        }
        let d = |now: u64, prev: u64| now.saturating_sub(prev);
        let (c, p) = (obs.canary, obs.primary);
        let (cp, pp) = (&self.canary_prev, &self.primary_prev);
        let (c_req, c_err) = (d(c.requests, cp.requests), d(c.errors, cp.errors));
        let (p_req, p_err) = (d(p.requests, pp.requests), d(p.errors, pp.errors));
        // Counts come from other processes: sums saturate, and the share is taken in f64.
        if c_req.saturating_add(p_req) > 0 {
            let rho = c_req as f64 / (c_req as f64 + p_req as f64);
            self.errors.update(c_err, p_err, rho);
        }
        self.error_slo.update(c_err, c_req);
        self.not_worse.update(c_err, c_req);
        let add = |total: &mut u64, n: u64| *total = total.saturating_add(n);
        add(&mut self.canary_total.requests, c_req);
        add(&mut self.canary_total.errors, c_err);
        add(&mut self.primary_total.requests, p_req);
        add(&mut self.primary_total.errors, p_err);

        // Latency: only when both histograms have the same layout as at the start.
        let layout = obs.edges_ms.len() + 1;
        let same = c.buckets.len() == layout && p.buckets.len() == layout;
        if same && cp.buckets.len() == layout {
            if let Some((k, test)) = &mut self.latency_slo {
                let c_n = d(c.latency_count(), cp.latency_count());
                test.update(d(c.slower_than(*k), cp.slower_than(*k)), c_n);
            }
        }
        if same {
            self.fold_latency(c, p, obs.edges_ms);
        } else {
            self.latency_prev = None;
        }
        self.canary_prev = c.clone();
        self.primary_prev = p.clone();
    }

    /// The two-arm latency tests. Envoy moves each sidecar's histogram at its own stats
    /// flush (every 5 s by default, at a phase of its own), so in one interval often only
    /// one arm's latencies moved, and such an interval has no share to test against. The
    /// tests therefore fold the latencies since the last time both arms had moved, once both
    /// have: the canary's share of them is then that of the requests they came from.
    fn fold_latency(&mut self, c: &Totals, p: &Totals, edges_ms: &[f64]) {
        let baseline = match &self.latency_prev {
            Some((cp, pp)) => cp.len() != c.buckets.len() || pp.len() != p.buckets.len(),
            None => true,
        };
        if baseline {
            self.latency_prev = Some((c.buckets.clone(), p.buckets.clone()));
            return;
        }
        let Some((cp, pp)) = &self.latency_prev else {
            return;
        };
        let (cp, pp) = (bucket_totals(cp), bucket_totals(pp));
        let c_n = c.latency_count().saturating_sub(cp.latency_count());
        let p_n = p.latency_count().saturating_sub(pp.latency_count());
        if c.latency_count() < cp.latency_count() || p.latency_count() < pp.latency_count() {
            // A restarted source: a new baseline.
            self.latency_prev = Some((c.buckets.clone(), p.buckets.clone()));
            return;
        }
        if c_n == 0 || p_n == 0 {
            return; // wait for both arms
        }
        let rho = c_n as f64 / (c_n as f64 + p_n as f64);
        for (test, k) in self.latency.iter_mut().zip(latency_test_edges(edges_ms)) {
            let c_slow = c.slower_than(k).saturating_sub(cp.slower_than(k));
            let p_slow = p.slower_than(k).saturating_sub(pp.slower_than(k));
            test.update(c_slow, p_slow, rho);
        }
        self.latency_prev = Some((c.buckets.clone(), p.buckets.clone()));
    }

    /// Per test: its boundary `1 / (alpha * share)`. Without a latency maximum the latency
    /// SLO test does not run and its share goes to the others in proportion. The split
    /// depends on the policy only, never on the data, so the union bound holds.
    fn boundaries(policy: &Policy) -> [f64; 4] {
        let alpha = policy.alpha;
        let active = [true, true, true, policy.latency_p99_max_ms.is_some()];
        let total: f64 = ALPHA_SHARES
            .iter()
            .zip(active)
            .filter(|(_, a)| *a)
            .map(|(w, _)| w)
            .sum();
        let mut out = [f64::INFINITY; 4];
        for (i, (w, a)) in ALPHA_SHARES.iter().zip(active).enumerate() {
            if a {
                out[i] = total / (alpha * w);
            }
        }
        out
    }

    fn evidence(&self, policy: &Policy) -> Evidence {
        let e_latency = if self.latency.is_empty() {
            0.0
        } else {
            self.latency.iter().map(TwoArm::e_value).sum::<f64>() / self.latency.len() as f64
        };
        let total = self
            .canary_total
            .requests
            .saturating_add(self.primary_total.requests);
        Evidence {
            e_errors: self.errors.e_value(),
            e_latency,
            e_error_slo: self.error_slo.e_value(),
            e_latency_slo: self.latency_slo.as_ref().map_or(0.0, |(_, t)| t.e_value()),
            e_not_worse: self.not_worse.e_value(),
            boundaries: Self::boundaries(policy),
            canary_requests: self.canary_total.requests,
            canary_errors: self.canary_total.errors,
            primary_requests: self.primary_total.requests,
            primary_errors: self.primary_total.errors,
            canary_share: if total == 0 {
                0.0
            } else {
                let c = self.canary_total.requests as f64;
                c / (c + self.primary_total.requests as f64)
            },
            slo_edge_ms: self.slo_edge_ms,
        }
    }

    fn verdict(&self, obs: &Observation<'_>, policy: &Policy, ev: &Evidence) -> Verdict {
        let sequential = policy.mode != Mode::Threshold;
        let threshold = policy.mode != Mode::Sequential;
        if sequential {
            let tests = [
                (Test::Errors, ev.e_errors),
                (Test::Latency, ev.e_latency),
                (Test::ErrorSlo, ev.e_error_slo),
                (Test::LatencySlo, ev.e_latency_slo),
            ];
            let crossed = tests.iter().zip(ev.boundaries).find(|((_, e), b)| *e >= *b);
            if let Some(((test, _), _)) = crossed {
                return Verdict::Rollback(*test);
            }
        }
        match obs.stale {
            None => {}
            // Checked in every mode: a dead canary is not a threshold, it is no canary.
            Some(Stale::Canary) => return Verdict::Failed(FailedCheck::CanarySilent),
            Some(Stale::NoAgent) => return Verdict::NoData { reason: "no_agent" },
            Some(_) => return Verdict::NoData { reason: "stale" },
        }
        let mut canary = obs.canary_window;
        if canary.requests < policy.min_requests.max(1) {
            // A quiet service: judge the whole step rather than halting forever on a
            // rolling window that never fills (a slow service is promoted slowly).
            match self.since_step(obs) {
                Some(step) if step.requests >= policy.min_requests.max(1) => canary = step,
                _ => {
                    return Verdict::NoData {
                        reason: "no_traffic",
                    }
                }
            }
        }
        if threshold {
            if let Some(sr) = canary.success_rate {
                if sr < policy.success_rate_min {
                    return Verdict::Failed(FailedCheck::SuccessRate {
                        value: sr,
                        min: policy.success_rate_min,
                    });
                }
            } else {
                return Verdict::NoData {
                    reason: "no_traffic",
                };
            }
            if let (Some(max), Some(p99)) = (policy.latency_p99_max_ms, canary.p99_ms) {
                if p99 > max {
                    return Verdict::Failed(FailedCheck::RequestDuration {
                        p99_ms: p99,
                        max_ms: max,
                    });
                }
            }
        }
        // The not-worse test gets the error SLO test's boundary: it is that test's mirror.
        let early = policy.advance_early
            && ev.e_not_worse >= ev.boundaries[2]
            && (self.latency_slo.is_none() || obs.canary_window.p99_ms.is_some());
        Verdict::Pass { early }
    }
}

impl JudgeState {
    /// The canary's values over everything observed since the current step began.
    fn since_step(&self, obs: &Observation<'_>) -> Option<WindowValues> {
        let (_, base) = self.step.as_ref()?;
        let c = obs.canary;
        let requests = c.requests.saturating_sub(base.requests);
        let errors = c.errors.saturating_sub(base.errors).min(requests);
        let success_rate = (requests > 0).then(|| (requests - errors) as f64 / requests as f64);
        let p99_ms =
            if c.buckets.len() == base.buckets.len() && c.buckets.len() == obs.edges_ms.len() + 1 {
                let counts: Vec<u64> = c
                    .buckets
                    .iter()
                    .zip(&base.buckets)
                    .map(|(n, b)| n.saturating_sub(*b))
                    .collect();
                histogram_quantile(0.99, obs.edges_ms, &counts)
            } else {
                None
            };
        Some(WindowValues {
            requests,
            success_rate,
            p99_ms,
        })
    }
}

/// Go's `time.Duration` spelling of a millisecond value (Flagger prints durations with it):
/// `917ms`, `1.543s`, `500ms`.
pub fn go_duration(ms: f64) -> String {
    fn trim(s: String) -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    }
    if ms >= 1000.0 {
        format!("{}s", trim(format!("{:.3}", ms / 1000.0)))
    } else {
        format!("{}ms", trim(format!("{ms:.3}")))
    }
}

/// A percentage as Go's `%v` prints a float64 (`99`, `99.5`).
fn go_float(v: f64) -> String {
    let s = format!("{v}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// Scientific notation for e-values in messages (`4.1e6`).
pub fn sci(v: f64) -> String {
    if v.is_infinite() {
        return "inf".into();
    }
    if v < 1000.0 {
        return format!("{v:.1}");
    }
    let exp = v.log10().floor();
    format!("{:.1}e{}", v / 10f64.powf(exp), exp as i64)
}

/// A verdict in Flagger's words, for Events and logs. `target` is `name.namespace`.
pub struct Message<'a> {
    pub target: &'a str,
    pub judgement: &'a Judgement,
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.target;
        let ev = &self.judgement.evidence;
        match &self.judgement.verdict {
            Verdict::NoData { reason: "stale" } => {
                write!(f, "Halt {t} advancement: data is stale (a sidecar or peer is not answering)")
            }
            Verdict::NoData { reason: "no_agent" } => write!(
                f,
                "Halt {t} advancement: no meshcanary agent answers on a node that runs its pods"
            ),
            Verdict::NoData {
                reason: "route_not_accepted",
            } => write!(
                f,
                "Halt {t} advancement: its route is not accepted by the gateway or mesh, so its weights move no traffic (see the RouteNotAccepted Warning)"
            ),
            Verdict::NoData { .. } => write!(
                f,
                "Halt advancement no values found for envoy metric request-success-rate probably {t} is not receiving traffic"
            ),
            Verdict::Pass { early: true } => write!(
                f,
                "Advance {t} early: canary 5xx {}/{} within the SLO (e-value {} >= {})",
                ev.canary_errors,
                ev.canary_requests,
                sci(ev.e_not_worse),
                sci(ev.boundaries[2])
            ),
            Verdict::Pass { early: false } => write!(f, "Check {t} passed"),
            Verdict::Failed(FailedCheck::SuccessRate { value, min }) => write!(
                f,
                "Halt {t} advancement success rate {:.2}% < {}%",
                value * 100.0,
                go_float(min * 100.0)
            ),
            Verdict::Failed(FailedCheck::RequestDuration { p99_ms, max_ms }) => write!(
                f,
                "Halt {t} advancement request duration {} > {}",
                go_duration(*p99_ms),
                go_duration(*max_ms)
            ),
            Verdict::Failed(FailedCheck::CanarySilent) => write!(
                f,
                "Halt {t} advancement no values found: the canary's sidecars stopped answering (is the canary running?)"
            ),
            Verdict::Rollback(test) => {
                let (c, p) = (ev.canary_error_rate() * 100.0, ev.primary_error_rate() * 100.0);
                let (e, b) = match test {
                    Test::Errors => (ev.e_errors, ev.boundaries[0]),
                    Test::Latency => (ev.e_latency, ev.boundaries[1]),
                    Test::ErrorSlo => (ev.e_error_slo, ev.boundaries[2]),
                    Test::LatencySlo => (ev.e_latency_slo, ev.boundaries[3]),
                };
                match test {
                    Test::Errors => write!(f, "Rolling back {t}: canary 5xx {c:.1}% vs primary {p:.1}%")?,
                    Test::ErrorSlo => write!(f, "Rolling back {t}: canary 5xx {c:.1}% above the SLO")?,
                    Test::Latency => write!(f, "Rolling back {t}: canary responses slower than the primary's")?,
                    Test::LatencySlo => write!(
                        f,
                        "Rolling back {t}: canary p99 above {}",
                        go_duration(ev.slo_edge_ms.unwrap_or(f64::NAN))
                    )?,
                }
                write!(f, " (e-value {} >= {})", sci(e), sci(b))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [f64; 5] = [10.0, 100.0, 250.0, 500.0, 1000.0];

    fn arm(requests: u64, errors: u64, buckets: &[u64]) -> Totals {
        Totals {
            requests,
            errors,
            buckets: buckets.to_vec(),
        }
    }

    fn obs<'a>(c: &'a Totals, p: &'a Totals, cw: WindowValues) -> Observation<'a> {
        Observation {
            canary_window: cw,
            canary: c,
            primary: p,
            edges_ms: &EDGES,
            stale: None,
            step_started_ms: None,
            now_ms: 0,
        }
    }

    fn healthy_window() -> WindowValues {
        WindowValues {
            requests: 100,
            success_rate: Some(1.0),
            p99_ms: Some(50.0),
        }
    }

    /// Each sidecar flushes its histogram at its own phase: intervals where only one arm's
    /// latencies moved are held until the other's move too, then tested together.
    #[test]
    fn latencies_of_arms_that_flush_at_different_times_are_tested_together() {
        let policy = Policy::default();
        let mut j = JudgeState::new(&policy);
        let n = EDGES.len() + 1;
        let hist = |fast: u64, slow: u64| {
            let mut b = vec![0; n];
            b[0] = fast;
            b[n - 2] = slow; // slower than every edge the tests use but the last
            Totals {
                requests: fast + slow,
                buckets: b,
                ..Totals::default()
            }
        };
        let (c0, p0) = (hist(0, 0), hist(0, 0));
        j.judge(&obs(&c0, &p0, healthy_window()), &policy);
        let e0 = j.evidence(&policy).e_latency;
        // The canary's flush: only its latencies moved.
        let c1 = hist(0, 5);
        j.judge(&obs(&c1, &p0, healthy_window()), &policy);
        assert_eq!(j.evidence(&policy).e_latency, e0, "nothing to test yet");
        // The primary's flush two ticks later: both moved since the last test.
        j.judge(&obs(&c1, &p0, healthy_window()), &policy);
        let p1 = hist(95, 0);
        j.judge(&obs(&c1, &p1, healthy_window()), &policy);
        assert!(
            j.evidence(&policy).e_latency > 10.0 * e0,
            "5 slow canary requests against 95 fast primary ones: {}",
            j.evidence(&policy).e_latency
        );
    }

    #[test]
    fn progress_is_the_nearest_test_over_its_boundary() {
        let ev = Evidence {
            e_errors: 5.0,
            e_latency: 200.0,
            boundaries: [200.0, 400.0, 800.0, f64::INFINITY],
            e_latency_slo: 1e9,
            ..Evidence::default()
        };
        assert_eq!(ev.progress(), 0.5);
        assert_eq!(Evidence::default().progress(), 0.0);
    }

    #[test]
    fn two_arm_hand_computed() {
        // One canary error and no primary error at share 0.1: LR_r = q_r / 0.1.
        let mut t = TwoArm::default();
        t.update(1, 0, 0.1);
        let want: f64 = RELATIVE_RISKS
            .iter()
            .zip(RISK_WEIGHTS)
            .map(|(r, w)| {
                let q = 0.1 * r / (0.1 * r + 0.9);
                w * q / 0.1
            })
            .sum::<f64>();
        assert!((RISK_WEIGHTS.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(
            (t.e_value() - want).abs() < 1e-9,
            "{} vs {want}",
            t.e_value()
        );
        // A primary error is evidence the other way.
        let mut u = TwoArm::default();
        u.update(0, 1, 0.1);
        assert!(u.e_value() < 1.0);
        // No events, or a one-armed interval, changes nothing.
        let mut v = TwoArm::default();
        v.update(0, 0, 0.3);
        v.update(5, 0, 1.0);
        v.update(5, 0, 0.0);
        assert_eq!(v.e_value(), 1.0);
    }

    #[test]
    fn one_arm_hand_computed() {
        // 2 hits in 10 trials against p0 = 0.1, alternative 0.2 alone.
        let mut t = OneArm {
            p0: 0.1,
            alternatives: vec![0.2],
            log_lr: vec![0.0],
        };
        t.update(2, 10);
        let want = 2.0f64.powi(2) * (0.8f64 / 0.9).powi(8);
        assert!((t.e_value() - want).abs() < 1e-12);
    }

    #[test]
    fn mean_exp_does_not_overflow() {
        assert!(
            (mean_exp(&[1000.0, 1000.0]) - f64::INFINITY).abs() < 1.0
                || mean_exp(&[1000.0, 1000.0]).is_infinite()
        );
        assert!((mean_exp(&[0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(
            (mean_exp(&[700.0, -700.0]) - (700.0f64.exp() / 2.0)).abs() / (700.0f64.exp()) < 1e-9
        );
    }

    #[test]
    fn a_failing_canary_is_rolled_back_with_its_evidence() {
        let policy = Policy::default();
        let mut j = JudgeState::new(&policy);
        let (mut c, mut p) = (arm(0, 0, &[0; 6]), arm(0, 0, &[0; 6]));
        j.judge(&obs(&c, &p, healthy_window()), &policy);
        let mut verdict = None;
        for _ in 0..60 {
            // Each second: canary 2 requests, 1 error; primary 18 requests, no error.
            c.requests += 2;
            c.errors += 1;
            p.requests += 18;
            let w = WindowValues {
                requests: 100,
                success_rate: Some(0.5),
                p99_ms: Some(50.0),
            };
            let jm = j.judge(&obs(&c, &p, w), &policy);
            if let Verdict::Rollback(t) = jm.verdict {
                verdict = Some((t, jm));
                break;
            }
        }
        let (test, jm) = verdict.expect("rolled back within a minute");
        assert!(matches!(test, Test::Errors | Test::ErrorSlo));
        assert!(
            jm.evidence.canary_requests <= 20,
            "within 10 seconds: {:?}",
            jm.evidence
        );
        let msg = Message {
            target: "podinfo.test",
            judgement: &jm,
        }
        .to_string();
        assert!(
            msg.starts_with("Rolling back podinfo.test: canary"),
            "{msg}"
        );
        assert!(
            msg.contains("canary 5xx 50.0% vs primary 0.0% (e-value "),
            "{msg}"
        );
    }

    #[test]
    fn a_better_canary_is_never_rolled_back() {
        let policy = Policy {
            success_rate_min: 0.5,
            ..Policy::default()
        };
        let mut j = JudgeState::new(&policy);
        let (mut c, mut p) = (arm(0, 0, &[0; 6]), arm(0, 0, &[0; 6]));
        j.judge(&obs(&c, &p, healthy_window()), &policy);
        for _ in 0..1000 {
            c.requests += 10;
            p.requests += 10;
            p.errors += 3; // the primary is the bad one
            let jm = j.judge(&obs(&c, &p, healthy_window()), &policy);
            assert!(!matches!(jm.verdict, Verdict::Rollback(_)), "{jm:?}");
        }
    }

    #[test]
    fn shares_that_change_every_step_are_used_as_they_are() {
        // Same per-request error rate in both arms; the share moves 2 % -> 50 %.
        let policy = Policy::default();
        let mut j = JudgeState::new(&policy);
        let (mut c, mut p) = (arm(0, 0, &[0; 6]), arm(0, 0, &[0; 6]));
        j.judge(&obs(&c, &p, healthy_window()), &policy);
        for share in [2u64, 5, 10, 20, 30, 50] {
            for _ in 0..20 {
                c.requests += share * 10;
                c.errors += share / 2;
                p.requests += (100 - share) * 10;
                p.errors += (100 - share) / 2;
                let jm = j.judge(&obs(&c, &p, healthy_window()), &policy);
                assert!(jm.evidence.e_errors < 1.0, "{:?}", jm.evidence);
            }
        }
    }

    #[test]
    fn slower_canary_is_caught_by_the_latency_test() {
        let policy = Policy::default();
        let mut j = JudgeState::new(&policy);
        let (mut c, mut p) = (arm(0, 0, &[0; 6]), arm(0, 0, &[0; 6]));
        j.judge(&obs(&c, &p, healthy_window()), &policy);
        let mut rolled = None;
        for i in 0..60 {
            c.requests += 2;
            p.requests += 18;
            // Primary all under 10 ms; canary all in (100, 250]: within the 500 ms SLO.
            p.buckets[0] += 18;
            c.buckets[2] += 2;
            if let Verdict::Rollback(t) = j.judge(&obs(&c, &p, healthy_window()), &policy).verdict {
                rolled = Some((i, t));
                break;
            }
        }
        assert_eq!(rolled.map(|r| r.1), Some(Test::Latency));
    }

    #[test]
    fn threshold_checks_speak_flaggers_words() {
        let policy = Policy {
            mode: Mode::Threshold,
            ..Policy::default()
        };
        let mut j = JudgeState::new(&policy);
        let c = arm(0, 0, &[]);
        let w = WindowValues {
            requests: 100,
            success_rate: Some(0.4604),
            p99_ms: Some(50.0),
        };
        let jm = j.judge(&obs(&c, &c, w), &policy);
        assert_eq!(
            Message {
                target: "podinfo.test",
                judgement: &jm
            }
            .to_string(),
            "Halt podinfo.test advancement success rate 46.04% < 99%"
        );
        let w = WindowValues {
            requests: 100,
            success_rate: Some(1.0),
            p99_ms: Some(1543.0),
        };
        let jm = j.judge(&obs(&c, &c, w), &policy);
        assert_eq!(
            Message {
                target: "podinfo.test",
                judgement: &jm
            }
            .to_string(),
            "Halt podinfo.test advancement request duration 1.543s > 500ms"
        );
        let w = WindowValues {
            requests: 3,
            success_rate: None,
            p99_ms: None,
        };
        let jm = j.judge(&obs(&c, &c, w), &policy);
        assert_eq!(
            jm.verdict,
            Verdict::NoData {
                reason: "no_traffic"
            }
        );
        let jm = j.judge(
            &Observation {
                stale: Some(Stale::Observer),
                ..obs(&c, &c, healthy_window())
            },
            &policy,
        );
        assert_eq!(jm.verdict, Verdict::NoData { reason: "stale" });
        let jm = j.judge(
            &Observation {
                stale: Some(Stale::Canary),
                ..obs(&c, &c, healthy_window())
            },
            &policy,
        );
        assert_eq!(jm.verdict, Verdict::Failed(FailedCheck::CanarySilent));
        assert_eq!(go_duration(917.0), "917ms");
        assert_eq!(go_duration(2525.0), "2.525s");
    }

    #[test]
    fn a_quiet_canary_is_judged_over_its_whole_step() {
        let policy = Policy {
            latency_p99_max_ms: None,
            ..Policy::default()
        };
        let mut j = JudgeState::new(&policy);
        let p = arm(0, 0, &[]);
        // 0.1 rps: the rolling window never holds `min_requests` (10).
        let quiet = WindowValues {
            requests: 3,
            success_rate: None,
            p99_ms: None,
        };
        let mut c = arm(500, 0, &[]);
        let at = |j: &mut JudgeState, c: &Totals, step: u64| {
            let o = Observation {
                step_started_ms: Some(step),
                ..obs(c, &p, quiet)
            };
            j.judge(&o, &policy).verdict
        };
        // The step's first observation is its baseline; 9 requests later, still no data.
        assert_eq!(
            at(&mut j, &c, 1),
            Verdict::NoData {
                reason: "no_traffic"
            }
        );
        c.requests += 9;
        assert_eq!(
            at(&mut j, &c, 1),
            Verdict::NoData {
                reason: "no_traffic"
            }
        );
        c.requests += 1;
        assert_eq!(at(&mut j, &c, 1), Verdict::Pass { early: false });
        // A bad request in the step fails the success-rate check over the step (10/11).
        c.requests += 1;
        c.errors += 1;
        assert!(matches!(
            at(&mut j, &c, 1),
            Verdict::Failed(FailedCheck::SuccessRate { .. })
        ));
        // A new step starts from its own baseline.
        assert_eq!(
            at(&mut j, &c, 2),
            Verdict::NoData {
                reason: "no_traffic"
            }
        );
        // Outside a rollout (no step) a quiet window stays "no data".
        let o = obs(&c, &p, quiet);
        assert_eq!(
            j.judge(&o, &policy).verdict,
            Verdict::NoData {
                reason: "no_traffic"
            }
        );
    }

    #[test]
    fn clean_traffic_allows_an_early_advance() {
        let policy = Policy {
            advance_early: true,
            latency_p99_max_ms: None,
            ..Policy::default()
        };
        let mut j = JudgeState::new(&policy);
        let (mut c, mut p) = (arm(0, 0, &[]), arm(0, 0, &[]));
        j.judge(&obs(&c, &p, healthy_window()), &policy);
        let mut early_at = None;
        for i in 0..200 {
            c.requests += 10;
            p.requests += 90;
            if j.judge(&obs(&c, &p, healthy_window()), &policy).verdict
                == (Verdict::Pass { early: true })
            {
                early_at = Some(i);
                break;
            }
        }
        // log(boundary)/-log(1 - p0/m) requests at best: a few hundred clean requests.
        let at = early_at.expect("early advance on clean traffic");
        assert!(at > 20 && at < 200, "{at}");
    }
}
