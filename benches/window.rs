//! Cost of one fast-tier scrape after the bytes arrive: parse the filtered body, extract the
//! inbound counters, difference against the previous scrape and fold into the window. The
//! baseline in the same run is parsing the same body alone, so the ratio shows what the
//! window stage adds on top of parsing.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meshcanary::parse::Parser;
use meshcanary::window::{InboundSnapshot, PodCounters, Window, WindowConfig};
use regex::Regex;

/// A fast-tier body as Envoy returns it for the default filter: per-code counters and the
/// request-time histogram of the inbound cluster (and their `external_` twins).
fn fast_body(requests: u64) -> String {
    let fixture = std::fs::read_to_string("tests/fixtures/envoy-1.40-1-clusters.prom")
        .expect("fixture (run from the repository root)");
    let filter = Regex::new(r"^envoy_cluster_(external_)?upstream_rq(_time_bucket|_time_sum|_time_count)?\{.*cds_ingress_").unwrap();
    let mut out = String::new();
    for line in fixture.lines().filter(|l| filter.is_match(l)) {
        // Move the counters so every scrape has a real delta.
        let (head, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = value.parse().unwrap();
        out += &format!("{head} {}\n", v + requests as f64);
    }
    out
}

fn bench(c: &mut Criterion) {
    let re = meshcanary::window::inbound::Inbound::envoy(Regex::new("^cds_ingress_").unwrap());
    let bodies: Vec<String> = (0..64).map(|i| fast_body(i * 10)).collect();
    println!("fast-tier body: {} bytes", bodies[0].len());
    let mut group = c.benchmark_group("window");
    group.bench_function("parse-only", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % bodies.len();
            Parser::from_text(black_box(&bodies[i])).flatten().count()
        });
    });
    group.bench_function("scrape-to-window", |b| {
        let mut window = Window::new(WindowConfig::default());
        let mut pod = PodCounters::default();
        let mut i = 0;
        let mut now = 1_700_000_000_000u64;
        b.iter(|| {
            i = (i + 1) % bodies.len();
            now += 1_000;
            let snap =
                InboundSnapshot::extract(Parser::from_text(black_box(&bodies[i])).flatten(), &re);
            if let Some(d) = pod.advance(snap, now) {
                window.record(&d, now);
            }
        });
    });
    group.bench_function("summary", |b| {
        let mut window = Window::new(WindowConfig::default());
        let mut pod = PodCounters::default();
        let mut now = 1_700_000_000_000u64;
        for body in &bodies {
            now += 1_000;
            let snap = InboundSnapshot::extract(Parser::from_text(body).flatten(), &re);
            if let Some(d) = pod.advance(snap, now) {
                window.record(&d, now);
            }
        }
        b.iter(|| black_box(window.summary(now)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
