//! The hot path of remote write: parsed samples straight to protobuf bytes, without building
//! a `TimeSeries` of owned `String`s per sample.
//!
//! A `WriteRequest` is nothing but its repeated `timeseries` field, so the encoding of a
//! batch is the concatenation of its series' encodings: each series is encoded once, from
//! text borrowed from the scrape, into the buffer of its shard; a flush only compresses that
//! buffer. Labels are sorted on the stack; only a scraped label that clashes with a target
//! label allocates (for its `exported_` name). [`super::relabel::convert`] is the reference:
//! a test checks both produce the same `WriteRequest`.

use std::borrow::Cow;

use super::relabel::{Converted, DropRules};
use crate::parse::{LineError, Parser};

/// Series encoded for one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardChunk {
    /// Concatenated `WriteRequest.timeseries` fields.
    pub bytes: Vec<u8>,
    pub samples: u32,
    pub newest_ms: i64,
}

/// A fast 64-bit hash of a series' labels: the series' identity for sharding and for stale
/// markers. Word at a time (rotate, xor, multiply per 8 bytes, as rustc's FxHash does), with
/// each string's length mixed in so `("ab","c")` and `("a","bc")` differ. Not exposed to
/// keys an attacker chooses: the set that holds these hashes does not re-hash them.
pub fn hash_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    const K: u64 = 0xf135_7aea_2e62_a9c5;
    let mut h: u64 = 0;
    let mut mix = |word: u64| h = (h.rotate_left(26) ^ word).wrapping_mul(K);
    let mut eat = |bytes: &[u8]| {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        mix(u64::from_le_bytes(tail) ^ ((bytes.len() as u64) << 56));
    };
    for (name, value) in labels {
        eat(name.as_bytes());
        eat(value.as_bytes());
    }
    // Final avalanche, so the low bits (used for the shard) depend on every input bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A `HashSet` of series hashes that uses them as they are (they are hashes already).
pub type HashSet64 = std::collections::HashSet<u64, std::hash::BuildHasherDefault<Identity>>;

/// Hasher that passes a `u64` through.
#[derive(Default)]
pub struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn label_len(name: &str, value: &str) -> usize {
    1 + varint_len(name.len() as u64)
        + name.len()
        + 1
        + varint_len(value.len() as u64)
        + value.len()
}

/// Append one `timeseries` field (labels already sorted, one sample) to `out`.
pub fn encode_series<N: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    labels: &[(N, V)],
    value: f64,
    timestamp_ms: i64,
) {
    let sample_len = 1 + 8 + 1 + varint_len(timestamp_ms as u64);
    let mut series_len = 1 + varint_len(sample_len as u64) + sample_len;
    for (n, v) in labels {
        let l = label_len(n.as_ref(), v.as_ref());
        series_len += 1 + varint_len(l as u64) + l;
    }
    out.push(0x0a); // WriteRequest.timeseries = 1, length-delimited
    varint(out, series_len as u64);
    for (n, v) in labels {
        let (n, v) = (n.as_ref(), v.as_ref());
        out.push(0x0a); // TimeSeries.labels = 1
        varint(out, label_len(n, v) as u64);
        out.push(0x0a); // Label.name = 1
        varint(out, n.len() as u64);
        out.extend_from_slice(n.as_bytes());
        out.push(0x12); // Label.value = 2
        varint(out, v.len() as u64);
        out.extend_from_slice(v.as_bytes());
    }
    out.push(0x12); // TimeSeries.samples = 2
    varint(out, sample_len as u64);
    out.push(0x09); // Sample.value = 1, fixed64 (double)
    out.extend_from_slice(&value.to_le_bytes());
    out.push(0x10); // Sample.timestamp = 2, varint (int64, two's complement)
    varint(out, timestamp_ms as u64);
}

/// What to encode from a scrape, and how.
pub struct Encoder<'a> {
    pub target_labels: &'a [(String, String)],
    pub drop: &'a DropRules,
    pub shards: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(target_labels: &'a [(String, String)], drop: &'a DropRules, shards: usize) -> Self {
        Encoder {
            target_labels,
            drop,
            shards,
        }
    }

    /// One empty chunk per shard, to encode into.
    pub fn new_chunks(&self) -> Vec<ShardChunk> {
        vec![ShardChunk::default(); self.shards]
    }

    /// Encode every kept sample of `body` at `timestamp_ms` into `chunks` (one per shard),
    /// calling `each` with every kept series' hash. With `only`, keep just the series whose
    /// hash it contains and write `value` instead of theirs (stale markers).
    pub fn encode(
        &self,
        body: &[u8],
        timestamp_ms: i64,
        chunks: &mut [ShardChunk],
        mut each: impl FnMut(u64),
        only: Option<(&HashSet64, f64)>,
        mut on_error: impl FnMut(&LineError),
    ) -> Converted {
        let mut counts = Converted::default();
        let mut labels: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(16);
        'samples: for result in Parser::new(body) {
            let sample = match result {
                Ok(s) => s,
                Err(e) => {
                    counts.rejected_lines += 1;
                    on_error(&e);
                    continue;
                }
            };
            if self.drop.drops_name(sample.name) {
                counts.dropped += 1;
                continue;
            }
            labels.clear();
            labels.push((Cow::Borrowed("__name__"), Cow::Borrowed(sample.name)));
            for l in sample.labels.iter() {
                let value = l.value();
                if self.drop.drops_label(l.name, &value) {
                    counts.dropped += 1;
                    continue 'samples;
                }
                if value.is_empty() {
                    continue;
                }
                let name = if self.target_labels.iter().any(|(t, _)| t == l.name) {
                    Cow::Owned(format!("exported_{}", l.name))
                } else {
                    Cow::Borrowed(l.name)
                };
                labels.push((name, value));
            }
            for (n, v) in self.target_labels {
                if !v.is_empty() {
                    labels.push((Cow::Borrowed(n.as_str()), Cow::Borrowed(v.as_str())));
                }
            }
            labels.sort_by(|a, b| a.0.cmp(&b.0));
            labels.dedup_by(|a, b| a.0 == b.0);
            let hash = hash_labels(labels.iter().map(|(n, v)| (n.as_ref(), v.as_ref())));
            let value = match only {
                Some((keep, _)) if !keep.contains(&hash) => continue,
                Some((_, replacement)) => replacement,
                None => sample.value,
            };
            let ts = sample.timestamp_ms.unwrap_or(timestamp_ms);
            let chunk = &mut chunks[(hash % self.shards as u64) as usize];
            encode_series(&mut chunk.bytes, &labels, value, ts);
            chunk.samples += 1;
            chunk.newest_ms = chunk.newest_ms.max(ts);
            each(hash);
            counts.kept += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_write::proto::{self, WriteRequest};
    use crate::remote_write::relabel::convert;

    fn target() -> Vec<(String, String)> {
        vec![
            ("instance".into(), "10.0.0.1:9901".into()),
            ("job".into(), "appmesh-envoy".into()),
            ("kubernetes_namespace".into(), "test".into()),
        ]
    }

    #[test]
    fn the_direct_encoder_matches_the_prost_reference_on_a_real_capture() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/envoy-1.40-1-clusters.prom"
        ))
        .unwrap();
        let mut body = body;
        body.extend_from_slice(
            b"clash{job=\"x\",esc=\"a\\\"b\\nc\"} -1.5 1700000000123\nneg 3 -5\n",
        );
        let drop = DropRules::reference();
        let mut reference = Vec::new();
        let want = convert(
            &body,
            &target(),
            &drop,
            1_700_000_000_000,
            &mut reference,
            |_| {},
        );
        let mut chunks = vec![ShardChunk::default()];
        let encoder = Encoder {
            target_labels: &target(),
            drop: &drop,
            shards: 1,
        };
        let got = encoder.encode(&body, 1_700_000_000_000, &mut chunks, |_| {}, None, |_| {});
        assert_eq!(got, want);
        let mut compressed = snap::raw::Encoder::new()
            .compress_vec(&chunks[0].bytes)
            .unwrap();
        let decoded = proto::decode(&compressed).unwrap();
        assert_eq!(
            decoded,
            WriteRequest {
                timeseries: reference
            }
        );
        compressed.clear();
        assert_eq!(chunks[0].samples as usize, got.kept);
    }

    #[test]
    fn hashes_separate_label_boundaries_and_spread_over_shards() {
        assert_ne!(hash_labels([("ab", "c")]), hash_labels([("a", "bc")]));
        assert_ne!(hash_labels([("a", "")]), hash_labels([("a", "\0")]));
        let mut shards = [0usize; 4];
        for i in 0..4000 {
            let v = format!("cds_egress_mesh_backend-{i}_http_8080");
            shards[(hash_labels([("envoy_cluster_name", v.as_str())]) % 4) as usize] += 1;
        }
        assert!(
            shards.iter().all(|&n| (800..1200).contains(&n)),
            "{shards:?}"
        );
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn stale_markers_only_for_the_series_asked() {
        let body = b"a 1\nb 2\n";
        let drop = DropRules::none();
        let encoder = Encoder {
            target_labels: &target(),
            drop: &drop,
            shards: 2,
        };
        let mut hashes = Vec::new();
        let mut chunks = vec![ShardChunk::default(); 2];
        encoder.encode(body, 5, &mut chunks, |h| hashes.push(h), None, |_| {});
        let gone: HashSet64 = [hashes[1]].into_iter().collect();
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        let mut chunks = vec![ShardChunk::default(); 2];
        let c = encoder.encode(body, 9, &mut chunks, |_| {}, Some((&gone, stale)), |_| {});
        assert_eq!(c.kept, 1);
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.bytes.clone()).collect();
        let req = proto::decode(&snap::raw::Encoder::new().compress_vec(&all).unwrap()).unwrap();
        assert_eq!(req.timeseries.len(), 1);
        assert_eq!(req.timeseries[0].labels[0].value, "b");
        assert_eq!(
            req.timeseries[0].samples[0].value.to_bits(),
            proto::STALE_NAN_BITS
        );
        assert_eq!(req.timeseries[0].samples[0].timestamp, 9);
    }
}
