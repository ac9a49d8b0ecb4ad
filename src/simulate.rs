//! `meshcanary simulate`: Monte Carlo comparison of the judge with Flagger's rule and an
//! oracle, on the same simulated traffic.
//!
//! Traffic is the reference walkthrough's: 20 rps in total with Poisson arrivals per second,
//! a fixed canary share per scenario, primary 5xx 0.1 %, latencies log-normal (median 25 ms,
//! sigma 0.6, so p99 about 100 ms) drawn through Envoy's default buckets. Counters reach the
//! judge every second; histograms only every 5 s, as Envoy flushes them, each arm's sidecar
//! at its own phase (two seconds apart). A fault starts with
//! the analysis. Each run is a 10-minute rollout at that share.
//!
//! Methods, all fed the same seconds:
//! - `meshcanary`: the judge's sequential tests (rollback when any reaches its boundary);
//! - `meshcanary-default`: what a workload gets at the default policy (`judge: both`): the
//!   sequential tests, plus the threshold checks on the 30 s window every second, at most one
//!   failed check counted per 30 s interval, rollback at 5 (as the rollout counts them);
//! - `flagger-ref`: Flagger's rule at the reference settings: every 1 m, success rate over
//!   the last 1 m >= 99 % and p99 <= 500 ms, rollback at 5 failed checks; the data it queries
//!   lags 20 s (15 s scrape interval plus remote write and ingest);
//! - `flagger-fast`: the same rule every 10 s with threshold 1 (its fastest useful setting);
//! - `meshcanary-statsd`: the same sequential tests with per-request latency (Envoy's
//!   DogStatsD sink into the agent): histograms reach the judge every second, like counters;
//! - `oracle-null-matched`: the best test valid under the judge's own null ("the primary's
//!   rate may change every second"): an SPRT on the canary's share of each second's events
//!   (5xx, or requests slower than the most informative edge) that knows the true ratio of
//!   the canary's rate to the primary's. The judge's speed target is held against it;
//! - `oracle-known-rates`: an SPRT that knows both arms' true rates (and the most informative
//!   latency edge), on every canary request: the information limit, which no test valid
//!   under a changing primary can reach.

use std::fmt::Write as _;

use crate::judge::{JudgeState, Mode, Observation, Policy, Verdict, WindowValues};
use crate::window::{histogram_quantile, Totals};

pub use crate::window::inbound::ENVOY_EDGES_MS;

/// What is wrong with the canary in a scenario.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Canary 5xx probability.
    Errors(f64),
    /// Canary latency plus this many ms.
    SlowerBy(f64),
    /// Canary latency times this factor.
    SlowerTimes(f64),
}

impl Fault {
    fn label(self) -> String {
        match self {
            Fault::None => "A/A".into(),
            Fault::Errors(p) => format!("5xx {}%", p * 100.0),
            Fault::SlowerBy(ms) => format!("+{ms}ms"),
            Fault::SlowerTimes(x) => format!("x{x} latency"),
        }
    }
}

/// Settings of a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub aa_runs: usize,
    pub ab_runs: usize,
    pub duration_s: usize,
    pub total_rps: f64,
    pub shares: Vec<f64>,
    pub primary_error: f64,
    pub alpha: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            aa_runs: 1000,
            ab_runs: 200,
            duration_s: 600,
            total_rps: 20.0,
            shares: vec![0.02, 0.05, 0.10, 0.20],
            primary_error: 0.001,
            alpha: 0.01,
        }
    }
}

const METHODS: [&str; 7] = [
    "meshcanary",
    "meshcanary-statsd",
    "flagger-ref",
    "flagger-fast",
    "oracle-null-matched",
    "oracle-known-rates",
    "meshcanary-default",
];
/// Column of each method in [`METHODS`] and in a run's times.
const MESHCANARY: usize = 0;
const STATSD: usize = 1;
const FLAGGER_REF: usize = 2;
const FLAGGER_FAST: usize = 3;
const NULL_ORACLE: usize = 4;
const ORACLE: usize = 5;
const DEFAULT: usize = 6;
/// The default policy's window, step interval and threshold (`meshcanary-default`).
const WINDOW_S: usize = 30;
const INTERVAL_S: usize = 30;
const THRESHOLD: u32 = 5;
const FLUSH_S: usize = 5;
/// The canary's sidecar flushes at this second of the period, the primary's at 0.
const CANARY_PHASE: usize = 2;
const LAG_S: usize = 20;

/// One second of one arm: requests, errors and per-bucket latency counts.
#[derive(Clone, Debug, Default)]
struct Second {
    requests: u64,
    errors: u64,
    buckets: [u64; ENVOY_EDGES_MS.len() + 1],
}

fn poisson(rng: &mut fastrand::Rng, lambda: f64) -> u64 {
    // Knuth's method: fine for the few-per-second rates simulated here.
    let limit = (-lambda).exp();
    let mut k = 0;
    let mut p = rng.f64();
    while p > limit {
        k += 1;
        p *= rng.f64();
    }
    k
}

fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn latency_ms(rng: &mut fastrand::Rng, fault: Fault, canary: bool) -> f64 {
    let base = 25.0 * (0.6 * normal(rng)).exp();
    match (canary, fault) {
        (true, Fault::SlowerBy(ms)) => base + ms,
        (true, Fault::SlowerTimes(x)) => base * x,
        _ => base,
    }
}

fn bucket(ms: f64) -> usize {
    ENVOY_EDGES_MS.partition_point(|&e| e < ms)
}

fn draw(rng: &mut fastrand::Rng, lambda: f64, error: f64, fault: Fault, canary: bool) -> Second {
    let mut s = Second {
        requests: poisson(rng, lambda),
        ..Second::default()
    };
    for _ in 0..s.requests {
        if rng.f64() < error {
            s.errors += 1;
        }
        s.buckets[bucket(latency_ms(rng, fault, canary))] += 1;
    }
    s
}

/// Flagger's analysis rule on the canary's per-second data.
struct Flagger {
    interval: usize,
    threshold: u32,
    failed: u32,
}

impl Flagger {
    /// Check at second `t` (1-based, a multiple of the interval) over the 60 s window that
    /// ends `LAG_S` before it. Returns true on rollback.
    fn check(&mut self, t: usize, canary: &[Second]) -> bool {
        if !t.is_multiple_of(self.interval) {
            return false;
        }
        let end = t.saturating_sub(LAG_S);
        if end == 0 {
            return false; // the queried window ends before the analysis started: no check yet
        }
        let start = end.saturating_sub(60);
        let (mut n, mut e) = (0u64, 0u64);
        let mut buckets = [0u64; ENVOY_EDGES_MS.len() + 1];
        for s in &canary[start..end] {
            n += s.requests;
            e += s.errors;
            for (b, c) in buckets.iter_mut().zip(&s.buckets) {
                *b += c;
            }
        }
        let failed = if n == 0 {
            true // "no values found": Flagger halts and counts the check as failed
        } else {
            let sr = 1.0 - e as f64 / n as f64;
            let p99 = histogram_quantile(0.99, &ENVOY_EDGES_MS, &buckets).unwrap_or(0.0);
            sr < 0.99 || p99 > 500.0
        };
        if failed {
            self.failed += 1;
        }
        self.failed >= self.threshold
    }
}

/// Each arm's probability of a request slower than each Envoy edge, by simulation.
fn slow_probabilities(fault: Fault, rng: &mut fastrand::Rng) -> Vec<(f64, f64)> {
    let n = 200_000;
    let mut slow0 = [0u64; ENVOY_EDGES_MS.len()];
    let mut slow1 = [0u64; ENVOY_EDGES_MS.len()];
    for _ in 0..n {
        let (b0, b1) = (
            bucket(latency_ms(rng, fault, false)),
            bucket(latency_ms(rng, fault, true)),
        );
        for k in 0..ENVOY_EDGES_MS.len() {
            slow0[k] += u64::from(b0 > k);
            slow1[k] += u64::from(b1 > k);
        }
    }
    (0..ENVOY_EDGES_MS.len())
        .map(|k| {
            let p = |c: u64| (c as f64 / n as f64).clamp(1e-6, 1.0 - 1e-6);
            (p(slow0[k]), p(slow1[k]))
        })
        .collect()
}

/// The event an oracle counts: 5xx (`None`) or requests from a bucket on (`Some(k)`), with
/// the primary's and the canary's probability of it.
type Event = (Option<usize>, f64, f64);

fn events(s: &Second, from_bucket: Option<usize>) -> f64 {
    let n: u64 = match from_bucket {
        None => s.errors,
        Some(k) => s.buckets[k..].iter().sum(),
    };
    n as f64
}

/// Oracle SPRT for the canary alone: knows the null and alternative rates of the one event
/// kind that separates them best.
struct Oracle {
    event: Option<Event>,
    llr: f64,
    bound: f64,
}

impl Oracle {
    fn new(fault: Fault, primary_error: f64, alpha: f64, slow: &[(f64, f64)]) -> Self {
        let kl =
            |p1: f64, p0: f64| p1 * (p1 / p0).ln() + (1.0 - p1) * ((1.0 - p1) / (1.0 - p0)).ln();
        let event = match fault {
            Fault::None => None,
            Fault::Errors(p) => Some((None, primary_error, p)),
            Fault::SlowerBy(_) | Fault::SlowerTimes(_) => slow
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, (p0, p1))| p1 > p0)
                .max_by(|(_, a), (_, b)| kl(a.1, a.0).total_cmp(&kl(b.1, b.0)))
                .map(|(k, (p0, p1))| (Some(k + 1), p0, p1)),
        };
        Oracle {
            event,
            llr: 0.0,
            bound: (1.0 / alpha).ln(),
        }
    }

    fn observe(&mut self, canary: &Second) -> bool {
        let Some((from_bucket, p0, p1)) = self.event else {
            return false;
        };
        let hits = events(canary, from_bucket);
        let misses = canary.requests as f64 - hits;
        self.llr += hits * (p1 / p0).ln() + misses * ((1.0 - p1) / (1.0 - p0)).ln();
        self.llr >= self.bound
    }
}

/// The best test valid under the judge's null, which lets the primary's rate change every
/// second: conditional on each second's events, each is the canary's with probability
/// `rho` (its share of that second's requests) under the null and `q = rho r / (rho r + 1 -
/// rho)` when its rate is `r` times the primary's. This oracle knows the true `r` (and the
/// edge where that test gains fastest at the scenario's share), so it pays neither for a
/// mixture over effect sizes nor for a union bound over tests.
struct NullMatchedOracle {
    /// The event and the true ratio of the canary's rate to the primary's.
    event: Option<(Option<usize>, f64)>,
    llr: f64,
    bound: f64,
}

impl NullMatchedOracle {
    fn new(fault: Fault, cfg: &SimConfig, share: f64, slow: &[(f64, f64)]) -> Self {
        // Expected gain per second of the conditional SPRT at this share.
        let gain = |p0: f64, p1: f64| {
            let r = p1 / p0;
            let q = share * r / (share * r + 1.0 - share);
            let (c, p) = (
                cfg.total_rps * share * p1,
                cfg.total_rps * (1.0 - share) * p0,
            );
            c * (q / share).ln() + p * ((1.0 - q) / (1.0 - share)).ln()
        };
        let event = match fault {
            Fault::None => None,
            Fault::Errors(p) => Some((None, p / cfg.primary_error)),
            Fault::SlowerBy(_) | Fault::SlowerTimes(_) => slow
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, (p0, p1))| p1 > p0)
                .max_by(|(_, a), (_, b)| gain(a.0, a.1).total_cmp(&gain(b.0, b.1)))
                .map(|(k, (p0, p1))| (Some(k + 1), p1 / p0)),
        };
        NullMatchedOracle {
            event,
            llr: 0.0,
            bound: (1.0 / cfg.alpha).ln(),
        }
    }

    fn observe(&mut self, canary: &Second, primary: &Second) -> bool {
        let Some((from_bucket, r)) = self.event else {
            return false;
        };
        let (c, p) = (canary.requests as f64, primary.requests as f64);
        if c == 0.0 || p == 0.0 {
            return false; // one arm idle: this second says nothing about the share
        }
        let rho = c / (c + p);
        let q = rho * r / (rho * r + 1.0 - rho);
        self.llr += events(canary, from_bucket) * (q / rho).ln()
            + events(primary, from_bucket) * ((1.0 - q) / (1.0 - rho)).ln();
        self.llr >= self.bound
    }
}

/// The oracle's median and p95 time to rollback (s) for a canary serving `canary_rps`
/// (Poisson) whose requests are events (5xx, or slower than an edge) with probability `p1`
/// against a known `p0`: data arrives once a second, as from the agent's fast tier.
pub fn oracle_ttr(
    canary_rps: f64,
    p0: f64,
    p1: f64,
    alpha: f64,
    runs: usize,
    seed: u64,
) -> (f64, f64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (hit, miss) = ((p1 / p0).ln(), ((1.0 - p1) / (1.0 - p0)).ln());
    let bound = (1.0 / alpha).ln();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let mut llr = 0.0;
            for second in 1..=3600u32 {
                let n = poisson(&mut rng, canary_rps);
                let events = (0..n).filter(|_| rng.f64() < p1).count() as f64;
                llr += events * hit + (n as f64 - events) * miss;
                if llr >= bound {
                    return f64::from(second);
                }
            }
            f64::INFINITY
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95))
}

/// The canary's window as the threshold checks see it at second `t`: counters of the last
/// `WINDOW_S` seconds, the histogram as of the last flush.
fn window(canary: &[Second], t: usize, min_requests: u64) -> WindowValues {
    let recent = &canary[t.saturating_sub(WINDOW_S)..t];
    let requests: u64 = recent.iter().map(|s| s.requests).sum();
    let errors: u64 = recent.iter().map(|s| s.errors).sum();
    let flushed = t.saturating_sub((t + CANARY_PHASE) % FLUSH_S);
    let mut buckets = [0u64; ENVOY_EDGES_MS.len() + 1];
    for s in &canary[flushed.saturating_sub(WINDOW_S)..flushed] {
        for (b, c) in buckets.iter_mut().zip(&s.buckets) {
            *b += c;
        }
    }
    let enough = requests >= min_requests.max(1);
    WindowValues {
        requests,
        success_rate: enough.then(|| 1.0 - errors as f64 / requests as f64),
        p99_ms: enough
            .then(|| histogram_quantile(0.99, &ENVOY_EDGES_MS, &buckets))
            .flatten(),
    }
}

/// The rollout's counting of failed checks: at most one per interval.
struct Counted {
    failed: u32,
    last: usize,
}

impl Counted {
    /// A failed check at second `t`; true when it is the one that reaches the threshold.
    fn failed_at(&mut self, t: usize) -> bool {
        if self.failed == 0 || t - self.last >= INTERVAL_S {
            self.failed += 1;
            self.last = t;
        }
        self.failed >= THRESHOLD
    }
}

/// What the judge sees each second: the totals (for the sequential tests) and the canary's
/// window (for the threshold checks).
fn observation<'a>(
    canary: &'a Totals,
    primary: &'a Totals,
    canary_window: WindowValues,
    now_ms: u64,
) -> Observation<'a> {
    Observation {
        canary_window,
        canary,
        primary,
        edges_ms: &ENVOY_EDGES_MS,
        stale: None,
        step_started_ms: None,
        now_ms,
    }
}

/// One arm's totals as the judge reads them, with histogram counts held back until its
/// sidecar's stats flush (every `flush_s` seconds, at second `phase` of the period; 1 for
/// per-request latency). Each Envoy flushes on its own timer, so the arms' phases differ.
struct Feed {
    flush_s: usize,
    phase: usize,
    totals: Totals,
    pending: Second,
}

impl Feed {
    fn new(flush_s: usize, phase: usize) -> Self {
        let totals = Totals {
            buckets: vec![0; ENVOY_EDGES_MS.len() + 1],
            ..Totals::default()
        };
        Feed {
            flush_s,
            phase,
            totals,
            pending: Second::default(),
        }
    }

    /// Add second `t`'s traffic.
    fn add(&mut self, t: usize, s: &Second) {
        self.totals.requests += s.requests;
        self.totals.errors += s.errors;
        for (acc, n) in self.pending.buckets.iter_mut().zip(&s.buckets) {
            *acc += n;
        }
        if (t + self.phase).is_multiple_of(self.flush_s) {
            for (tot, n) in self.totals.buckets.iter_mut().zip(&self.pending.buckets) {
                *tot += n;
            }
            self.pending = Second::default();
        }
    }
}

/// Time to rollback (seconds) of each method in one run; `None` = never rolled back.
fn run(
    cfg: &SimConfig,
    fault: Fault,
    share: f64,
    slow: &[(f64, f64)],
    rng: &mut fastrand::Rng,
) -> [Option<usize>; METHODS.len()] {
    // One judge serves `meshcanary` and `meshcanary-default`: in `both` mode a sequential
    // rejection is its verdict whatever the window says, so its first `Rollback` is the
    // sequential tests' alone. A second judge sees histograms every second (`statsd`).
    let policy = Policy {
        mode: Mode::Both,
        alpha: cfg.alpha,
        ..Policy::default()
    };
    let mut counted = Counted { failed: 0, last: 0 };
    let mut judge = JudgeState::new(&policy);
    let mut statsd = JudgeState::new(&policy);
    let mut flagger_ref = Flagger {
        interval: 60,
        threshold: 5,
        failed: 0,
    };
    let mut flagger_fast = Flagger {
        interval: 10,
        threshold: 1,
        failed: 0,
    };
    let mut oracle = Oracle::new(fault, cfg.primary_error, cfg.alpha, slow);
    let mut null_oracle = NullMatchedOracle::new(fault, cfg, share, slow);
    let canary_error = match fault {
        Fault::Errors(p) => p,
        _ => cfg.primary_error,
    };
    let (mut c_flush, mut p_flush) = (Feed::new(FLUSH_S, CANARY_PHASE), Feed::new(FLUSH_S, 0));
    let (mut c_each, mut p_each) = (Feed::new(1, 0), Feed::new(1, 0));
    let mut canary_seconds = Vec::with_capacity(cfg.duration_s);
    let mut ttr = [None; METHODS.len()];
    for (j, (c, p)) in [
        (&mut judge, (&c_flush, &p_flush)),
        (&mut statsd, (&c_each, &p_each)),
    ] {
        j.judge(
            &observation(&c.totals, &p.totals, WindowValues::default(), 0),
            &policy,
        );
    }
    for t in 1..=cfg.duration_s {
        let c = draw(rng, cfg.total_rps * share, canary_error, fault, true);
        let p = draw(
            rng,
            cfg.total_rps * (1.0 - share),
            cfg.primary_error,
            fault,
            false,
        );
        c_flush.add(t, &c);
        p_flush.add(t, &p);
        c_each.add(t, &c);
        p_each.add(t, &p);
        if ttr[ORACLE].is_none() && oracle.observe(&c) {
            ttr[ORACLE] = Some(t);
        }
        if ttr[NULL_ORACLE].is_none() && null_oracle.observe(&c, &p) {
            ttr[NULL_ORACLE] = Some(t);
        }
        canary_seconds.push(c);
        let now_ms = t as u64 * 1000;
        if ttr[MESHCANARY].is_none() || ttr[DEFAULT].is_none() {
            let w = window(&canary_seconds, t, policy.min_requests);
            let obs = observation(&c_flush.totals, &p_flush.totals, w, now_ms);
            match judge.judge(&obs, &policy).verdict {
                Verdict::Rollback(_) => {
                    ttr[MESHCANARY].get_or_insert(t);
                    ttr[DEFAULT].get_or_insert(t);
                }
                Verdict::Failed(_) if ttr[DEFAULT].is_none() && counted.failed_at(t) => {
                    ttr[DEFAULT] = Some(t);
                }
                _ => {}
            }
        }
        if ttr[STATSD].is_none() {
            let obs = observation(
                &c_each.totals,
                &p_each.totals,
                WindowValues::default(),
                now_ms,
            );
            if let Verdict::Rollback(_) = statsd.judge(&obs, &policy).verdict {
                ttr[STATSD] = Some(t);
            }
        }
        if ttr[FLAGGER_REF].is_none() && flagger_ref.check(t, &canary_seconds) {
            ttr[FLAGGER_REF] = Some(t);
        }
        if ttr[FLAGGER_FAST].is_none() && flagger_fast.check(t, &canary_seconds) {
            ttr[FLAGGER_FAST] = Some(t);
        }
        if fault != Fault::None && ttr.iter().all(Option::is_some) {
            break;
        }
    }
    ttr
}

/// Results of one scenario: per method, every run's time to rollback.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    pub fault: Fault,
    pub share: f64,
    pub runs: usize,
    pub ttr: [Vec<Option<usize>>; METHODS.len()],
}

fn quantile(sorted: &[usize], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[idx] as f64)
}

fn detected(v: &[Option<usize>]) -> Vec<usize> {
    let mut d: Vec<usize> = v.iter().flatten().copied().collect();
    d.sort_unstable();
    d
}

/// Wilson score interval (95 %) for `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.96f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Run every scenario of `cfg`.
pub fn simulate(cfg: &SimConfig) -> Vec<ScenarioResult> {
    let faults = [
        Fault::None,
        Fault::Errors(0.01),
        Fault::Errors(0.05),
        Fault::Errors(0.5),
        Fault::SlowerBy(100.0),
        Fault::SlowerTimes(2.0),
    ];
    let mut out = Vec::new();
    for (fi, fault) in faults.into_iter().enumerate() {
        for (si, &share) in cfg.shares.iter().enumerate() {
            let runs = if fault == Fault::None {
                cfg.aa_runs
            } else {
                cfg.ab_runs
            };
            let mut ttr: [Vec<Option<usize>>; METHODS.len()] = Default::default();
            let slow = match fault {
                Fault::SlowerBy(_) | Fault::SlowerTimes(_) => {
                    let seed = cfg.seed.wrapping_mul(1_000_003) ^ ((fi as u64) << 48);
                    slow_probabilities(fault, &mut fastrand::Rng::with_seed(seed))
                }
                _ => Vec::new(),
            };
            for r in 0..runs {
                let seed = cfg.seed.wrapping_mul(1_000_003)
                    ^ ((fi as u64) << 48)
                    ^ ((si as u64) << 40)
                    ^ r as u64;
                let mut rng = fastrand::Rng::with_seed(seed);
                for (m, t) in run(cfg, fault, share, &slow, &mut rng)
                    .into_iter()
                    .enumerate()
                {
                    ttr[m].push(t);
                }
            }
            out.push(ScenarioResult {
                fault,
                share,
                runs,
                ttr,
            });
        }
    }
    out
}

/// The summary figures the command's last line reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Headline {
    pub false_rollbacks: usize,
    pub aa_runs: usize,
    /// Against the null-matched oracle (the target).
    pub ttr_over_oracle: Option<f64>,
    /// Against the oracle that knows both arms' rates (the information limit).
    pub ttr_over_known_rates: Option<f64>,
    pub flagger_over_ttr: Option<f64>,
}

/// Pooled figures: the A/A false rollback rate of meshcanary; medians over the 5 % and 50 %
/// error scenarios (all shares) of meshcanary against both oracles and Flagger's reference.
pub fn headline(results: &[ScenarioResult]) -> Headline {
    let aa: Vec<&ScenarioResult> = results.iter().filter(|r| r.fault == Fault::None).collect();
    let false_rollbacks = aa
        .iter()
        .map(|r| r.ttr[MESHCANARY].iter().flatten().count())
        .sum();
    let aa_runs = aa.iter().map(|r| r.runs).sum();
    let pooled = |m: usize| {
        let mut v: Vec<usize> = results
            .iter()
            .filter(|r| matches!(r.fault, Fault::Errors(p) if p == 0.05 || p == 0.5))
            .flat_map(|r| r.ttr[m].iter().flatten().copied())
            .collect();
        v.sort_unstable();
        quantile(&v, 0.5)
    };
    let (ours, flagger) = (pooled(MESHCANARY), pooled(FLAGGER_REF));
    let (null_oracle, oracle) = (pooled(NULL_ORACLE), pooled(ORACLE));
    Headline {
        false_rollbacks,
        aa_runs,
        ttr_over_oracle: ours.zip(null_oracle).map(|(a, b)| a / b),
        ttr_over_known_rates: ours.zip(oracle).map(|(a, b)| a / b),
        flagger_over_ttr: flagger.zip(ours).map(|(a, b)| a / b),
    }
}

/// The Markdown table: scenario x method -> rollbacks (false or true), median / p95 TTR.
pub fn table(results: &[ScenarioResult], cfg: &SimConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | share | runs | {} |",
        METHODS
            .iter()
            .map(|m| format!("{m}: rollbacks, median / p95 s"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|{}", "---|".repeat(METHODS.len()));
    for r in results {
        let mut row = format!(
            "| {} | {}% | {} |",
            r.fault.label(),
            r.share * 100.0,
            r.runs
        );
        for (m, v) in r.ttr.iter().enumerate() {
            let d = detected(v);
            let cell = if r.fault == Fault::None {
                if m == NULL_ORACLE || m == ORACLE {
                    "n/a".to_owned()
                } else {
                    let (lo, hi) = wilson(d.len(), r.runs);
                    format!(
                        "{} false ({:.1}%, 95% CI {:.1}-{:.1}%)",
                        d.len(),
                        100.0 * d.len() as f64 / r.runs as f64,
                        lo * 100.0,
                        hi * 100.0
                    )
                }
            } else {
                let misses = r.runs - d.len();
                match (quantile(&d, 0.5), quantile(&d, 0.95)) {
                    (Some(med), Some(p95)) => format!(
                        "{}/{} ({} missed), {med:.0} / {p95:.0}",
                        d.len(),
                        r.runs,
                        misses
                    ),
                    _ => format!("0/{} (all missed)", r.runs),
                }
            };
            row += &format!(" {cell} |");
        }
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(
        out,
        "\nTraffic {} rps, primary 5xx {}%, {} s rollouts, alpha {}, seed {}. Times are seconds from the fault (the start of the analysis) to the rollback decision; a miss is no rollback within the rollout.",
        cfg.total_rps,
        cfg.primary_error * 100.0,
        cfg.duration_s,
        cfg.alpha,
        cfg.seed
    );
    out
}

/// The command's closing lines: the ratio to the known-rates oracle, then the summary.
pub fn headline_line(h: &Headline, alpha: f64) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    format!(
        "ttr/known-rates-oracle {} (the information limit; not a target)\nfalse rollback rate {:.4} (alpha {alpha}), ttr/oracle {}, flagger-reference/ttr {}",
        fmt(h.ttr_over_known_rates),
        h.false_rollbacks as f64 / h.aa_runs.max(1) as f64,
        fmt(h.ttr_over_oracle),
        fmt(h.flagger_over_ttr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            aa_runs: 20,
            ab_runs: 10,
            duration_s: 300,
            shares: vec![0.1],
            ..SimConfig::default()
        }
    }

    #[test]
    fn the_oracle_is_fast_for_a_clear_fault_and_slow_for_a_subtle_one() {
        let (clear, _) = super::oracle_ttr(7.0, 0.001, 0.7, 0.01, 500, 1);
        assert!((1.0..=1.0).contains(&clear), "{clear}");
        let (subtle, p95) = super::oracle_ttr(2.0, 0.001, 0.05, 0.01, 500, 1);
        assert!(subtle > 2.0 && p95 >= subtle, "{subtle} {p95}");
    }

    #[test]
    fn the_same_seed_gives_the_same_table() {
        let cfg = small();
        let a = table(&simulate(&cfg), &cfg);
        let b = table(&simulate(&cfg), &cfg);
        assert_eq!(a, b);
        let other = SimConfig { seed: 2, ..small() };
        assert_ne!(a, table(&simulate(&other), &other));
    }

    #[test]
    fn hard_failures_are_caught_fast_by_every_method_but_at_different_speeds() {
        let cfg = small();
        let results = simulate(&cfg);
        let r = results
            .iter()
            .find(|r| r.fault == Fault::Errors(0.5))
            .unwrap();
        let ours = detected(&r.ttr[MESHCANARY]);
        let flagger = detected(&r.ttr[FLAGGER_REF]);
        assert_eq!(ours.len(), r.runs, "no misses at 50 % errors");
        assert!(quantile(&ours, 0.5).unwrap() <= 10.0, "{ours:?}");
        assert!(
            quantile(&flagger, 0.5).unwrap() >= 240.0,
            "Flagger needs 5 checks: {flagger:?}"
        );
    }

    #[test]
    fn the_null_matched_oracle_sits_between_the_judge_and_the_known_rates_oracle() {
        let cfg = SimConfig {
            ab_runs: 40,
            ..small()
        };
        let results = simulate(&cfg);
        let r = results
            .iter()
            .find(|r| r.fault == Fault::Errors(0.05))
            .unwrap();
        let median = |m: usize| quantile(&detected(&r.ttr[m]), 0.5).unwrap();
        let (known, matched, ours) = (median(ORACLE), median(NULL_ORACLE), median(MESHCANARY));
        assert!(
            known <= matched && matched <= ours,
            "{known} {matched} {ours}"
        );
        let line = headline_line(&headline(&results), cfg.alpha);
        let last = line.lines().last().unwrap();
        assert!(
            last.starts_with("false rollback rate ") && last.contains(", ttr/oracle "),
            "{line}"
        );
        assert!(line
            .lines()
            .next()
            .unwrap()
            .starts_with("ttr/known-rates-oracle "));
    }

    #[test]
    fn wilson_interval() {
        let (lo, hi) = wilson(0, 1000);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.0038).abs() < 0.0002, "{hi}");
        let (lo, hi) = wilson(50, 100);
        assert!(lo < 0.5 && hi > 0.5);
    }
}
