//! Cost of one judge call per workload, sequential tests included, against the
//! threshold-only (Flagger-style) call in the same run.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meshcanary::judge::{JudgeState, Mode, Observation, Policy, WindowValues};
use meshcanary::simulate::ENVOY_EDGES_MS;
use meshcanary::window::Totals;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("judge");
    for (name, mode) in [("threshold-only", Mode::Threshold), ("both", Mode::Both)] {
        let policy = Policy {
            mode,
            ..Policy::default()
        };
        group.bench_function(name, |b| {
            let mut judge = JudgeState::new(&policy);
            let mut canary = Totals {
                buckets: vec![0; ENVOY_EDGES_MS.len() + 1],
                ..Totals::default()
            };
            let mut primary = canary.clone();
            let w = WindowValues {
                requests: 100,
                success_rate: Some(0.999),
                p99_ms: Some(80.0),
            };
            b.iter(|| {
                // One second of traffic with errors and a histogram flush, every call.
                canary.requests += 2;
                canary.errors += 1;
                canary.buckets[5] += 2;
                primary.requests += 18;
                primary.buckets[4] += 18;
                let obs = Observation {
                    canary_window: w,
                    canary: &canary,
                    primary: &primary,
                    edges_ms: &ENVOY_EDGES_MS,
                    stale: None,
                    step_started_ms: None,
                    now_ms: 0,
                };
                black_box(judge.judge(black_box(&obs), &policy))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
