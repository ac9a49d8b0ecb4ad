//! Remote-write encoding of one real full-tier scrape (a 10-cluster Envoy capture, reference
//! drops and target labels), in samples per second: the direct encoder the agent uses
//! (borrowed text straight to protobuf), cold and with its series cache warm, against the
//! reference path (owned `TimeSeries`, prost) in the same run, all including snappy.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meshcanary::remote_write::encode::{Encoder, SeriesCache, ShardChunk};
use meshcanary::remote_write::proto::{compress, encode, WriteRequest};
use meshcanary::remote_write::relabel::{convert, DropRules};

fn bench(c: &mut Criterion) {
    let body = std::fs::read("tests/fixtures/envoy-1.40-10-clusters.prom")
        .expect("fixture (run from the repository root)");
    let labels = vec![
        ("instance".to_owned(), "10.0.3.7:9901".to_owned()),
        ("job".to_owned(), "appmesh-envoy".to_owned()),
        ("kubernetes_namespace".to_owned(), "test".to_owned()),
        (
            "kubernetes_pod_name".to_owned(),
            "podinfo-7c9f8d6b5-x2x9q".to_owned(),
        ),
        ("cluster".to_owned(), "prod".to_owned()),
    ];
    let drop = DropRules::reference();
    let mut probe = Vec::new();
    let kept = convert(&body, &labels, &drop, 0, &mut probe, |_| {}).kept as u64;
    println!("scrape: {} bytes, {kept} samples kept", body.len());
    let mut group = c.benchmark_group("remote_write");
    group.throughput(Throughput::Elements(kept));
    group.bench_function("reference", |b| {
        b.iter(|| {
            let mut series = Vec::new();
            convert(
                black_box(&body),
                &labels,
                &drop,
                1_700_000_000_000,
                &mut series,
                |_| {},
            );
            encode(&WriteRequest { timeseries: series })
        });
    });
    group.bench_function("direct", |b| {
        let encoder = Encoder {
            target_labels: &labels,
            drop: &drop,
            shards: 1,
        };
        b.iter(|| {
            let mut chunks = vec![ShardChunk::default()];
            encoder.encode(
                black_box(&body),
                1_700_000_000_000,
                &mut chunks,
                |_| {},
                None,
                |_| {},
            );
            compress(&chunks[0].bytes)
        });
    });
    // What the agent does from the second scrape of a target on: the series cache is warm,
    // so a line of a known series is split, hashed and looked up, not parsed and relabelled.
    group.bench_function("cached", |b| {
        let encoder = Encoder::new(&labels, &drop, 1);
        let mut cache = SeriesCache::default();
        encoder.encode_cached(
            &mut cache,
            &body,
            1_699_999_999_000,
            &mut [ShardChunk::default()],
            |_| {},
        );
        b.iter(|| {
            let mut chunks = vec![ShardChunk::default()];
            encoder.encode_cached(
                &mut cache,
                black_box(&body),
                1_700_000_000_000,
                &mut chunks,
                |_| {},
            );
            compress(&chunks[0].bytes)
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
