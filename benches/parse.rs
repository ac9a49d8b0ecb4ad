//! Parse throughput on real Envoy 1.40 captures: meshcanary's parser against
//! `prometheus-parse` (the usual crate) on the same bytes in the same run.
//! `scripts/bench.sh parse` turns criterion's medians into MB/s and the ratio.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshcanary::parse::Parser;

const FIXTURES: [(&str, &str); 3] = [
    ("1-cluster", "tests/fixtures/envoy-1.40-1-clusters.prom"),
    ("10-clusters", "tests/fixtures/envoy-1.40-10-clusters.prom"),
    ("50-clusters", "tests/fixtures/envoy-1.40-50-clusters.prom"),
];

/// Every sample produced (name, validated labels, value), as the scrape path consumes them.
fn ours(body: &[u8]) -> (usize, f64) {
    let mut n = 0;
    let mut sum = 0.0;
    for s in Parser::new(body).flatten() {
        n += s.name.len();
        sum += s.value;
    }
    (n, sum)
}

/// The same, and every label visited and its value borrowed or unescaped: the work a
/// consumer that reads all labels (remote write) adds on top.
fn ours_with_labels(body: &[u8]) -> (usize, f64) {
    let mut n = 0;
    let mut sum = 0.0;
    for s in Parser::new(body).flatten() {
        for l in s.labels.iter() {
            n += l.name.len() + l.value().len();
        }
        sum += s.value;
    }
    (n, sum)
}

fn baseline(text: &str) -> usize {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).map_or(0, |s| s.samples.len())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, path) in FIXTURES {
        let body = std::fs::read(path).expect("fixture (run from the repository root)");
        let text = std::str::from_utf8(&body).expect("utf-8 fixture");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("meshcanary", name), &body, |b, body| {
            b.iter(|| ours(black_box(body)));
        });
        group.bench_with_input(
            BenchmarkId::new("meshcanary+labels", name),
            &body,
            |b, body| {
                b.iter(|| ours_with_labels(black_box(body)));
            },
        );
        group.bench_with_input(
            BenchmarkId::new("prometheus-parse", name),
            text,
            |b, text| {
                b.iter(|| baseline(black_box(text)));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
