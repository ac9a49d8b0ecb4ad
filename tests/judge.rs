//! Properties of the judge's sequential tests on simulated traffic with identical arms.
//!
//! E-values are heavy-tailed: a valid one may reach 1000 on one path in a thousand, which
//! alone moves a sample mean of 1000 paths by 1. So the checks are the two statements that
//! follow from "a nonnegative supermartingale starting at 1" and that a sample can test
//! without being dominated by one path: the mean of `min(e, 100)` stays <= 1 (capping can
//! only lower the expectation), and the share of paths whose e-value *ever* reached `k` is
//! at most `1/k` (Ville's inequality). Both with a three-standard-error allowance.

use meshcanary::judge::{JudgeState, Mode, Observation, Policy, WindowValues};
use meshcanary::window::Totals;

const TESTS: [&str; 4] = ["errors", "latency", "error_slo", "latency_slo"];

/// Run `paths` rollouts of `steps` seconds with identical arms (error rate `p`), the canary
/// share changing with the step; per test, the capped e-value at the end of every path and
/// the maximum it reached along it.
fn simulate(paths: usize, steps: usize, p: f64, seed: u64) -> Vec<([f64; 4], [f64; 4])> {
    let policy = Policy {
        mode: Mode::Sequential,
        success_rate_min: 0.9,
        ..Policy::default()
    };
    let edges = [10.0, 50.0, 100.0, 500.0, 1000.0];
    let mut rng = fastrand::Rng::with_seed(seed);
    let w = WindowValues::default();
    (0..paths)
        .map(|_| {
            let mut judge = JudgeState::new(&policy);
            let (mut c, mut pr) = (Totals::default(), Totals::default());
            c.buckets = vec![0; edges.len() + 1];
            pr.buckets = vec![0; edges.len() + 1];
            let mut last = [0.0; 4];
            let mut max = [0.0f64; 4];
            for t in 0..=steps {
                if t > 0 {
                    let share = [0.02, 0.05, 0.10, 0.20, 0.50][(t * 5 / (steps + 1)).min(4)];
                    for (arm, n) in [(&mut c, 20.0 * share), (&mut pr, 20.0 * (1.0 - share))] {
                        let requests = (n + rng.f64() * 2.0) as u64;
                        arm.requests += requests;
                        for _ in 0..requests {
                            arm.errors += u64::from(rng.f64() < p);
                            let ms = 30.0 * (rng.f64() * 2.0).exp(); // up to ~220 ms: within the 500 ms SLO
                            arm.buckets[edges.partition_point(|&e| e < ms)] += 1;
                        }
                    }
                }
                let obs = Observation {
                    canary_window: w,
                    canary: &c,
                    primary: &pr,
                    edges_ms: &edges,
                    stale: None,
                    step_started_ms: None,
                    now_ms: 0,
                };
                let ev = judge.judge(&obs, &policy).evidence;
                last = [ev.e_errors, ev.e_latency, ev.e_error_slo, ev.e_latency_slo];
                for (m, e) in max.iter_mut().zip(last) {
                    *m = m.max(e);
                }
            }
            (last.map(|e| e.min(100.0)), max)
        })
        .collect()
}

fn check(results: &[([f64; 4], [f64; 4])], skip: &[&str]) {
    let n = results.len() as f64;
    for (i, name) in TESTS.iter().enumerate() {
        if skip.contains(name) {
            continue;
        }
        let capped: Vec<f64> = results.iter().map(|r| r.0[i]).collect();
        let mean = capped.iter().sum::<f64>() / n;
        let sd = (capped.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean <= 1.0 + 3.0 * sd / n.sqrt(),
            "{name}: mean of min(e, 100) = {mean} (sd {sd})"
        );
        for k in [2.0, 10.0, 50.0] {
            let share = results.iter().filter(|r| r.1[i] >= k).count() as f64 / n;
            let bound = 1.0 / k;
            let allowance = 3.0 * (bound * (1.0 - bound) / n).sqrt();
            assert!(
                share <= bound + allowance,
                "{name}: {share} of paths reached {k} (Ville: <= {bound})"
            );
        }
    }
}

#[test]
fn identical_arms_with_frequent_errors_stay_supermartingales() {
    // 5 % errors in both arms: the two-arm tests see many events. The error-SLO test's null
    // (5xx <= 10 %) holds too, so every test must stay down.
    check(&simulate(2000, 120, 0.05, 7), &[]);
}

#[test]
fn identical_arms_at_the_reference_error_rate_stay_supermartingales() {
    check(&simulate(1000, 300, 0.001, 11), &[]);
}
