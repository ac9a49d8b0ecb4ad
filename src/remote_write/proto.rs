//! Prometheus Remote Write 1.0 messages (`prometheus/prompb/remote.proto`, `types.proto`),
//! derived with `prost` so no `protoc` runs at build time, and the wire encoding: protobuf,
//! then snappy's block format (not the framed one).

/// `prometheus.WriteRequest`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: labels sorted by name, samples in timestamp order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`: value and timestamp in unix milliseconds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Prometheus' staleness marker: a NaN with these exact bits, written when a series ends.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// The body of one remote-write POST: protobuf, then snappy block compression.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    use prost::Message as _;
    compress(&request.encode_to_vec())
}

/// Snappy block compression of an encoded `WriteRequest`.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    // Compressing into a fresh buffer cannot fail except on inputs over 4 GiB.
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("remote-write batches are far below snappy's 4 GiB limit")
}

/// Snappy elements of `raw` (its compressed form without the length preamble), appended to
/// `out`. A copy element only points back into its own part, so parts compressed one by one
/// and concatenated behind one preamble with their total length ([`assemble`]) are one valid
/// snappy block: the scrape tasks compress their own series, and the batcher joins the
/// small compressed parts instead of copying the large raw ones.
pub fn compress_part(raw: &[u8], out: &mut Vec<u8>) {
    if raw.is_empty() {
        return;
    }
    let block = compress(raw);
    let preamble = super::encode::varint_len(raw.len() as u64);
    out.extend_from_slice(&block[preamble..]);
}

/// A snappy block from parts made by [`compress_part`] whose raw lengths sum to `raw_len`.
pub fn assemble(raw_len: u64, parts: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + parts.len());
    super::encode::varint(&mut out, raw_len);
    out.extend_from_slice(parts);
    out
}

/// Decode a body as a receiver would (tests, and the queue's sample counts on replay).
///
/// ### Errors
/// A message when the body is not snappy-compressed protobuf `WriteRequest`.
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    use prost::Message as _;
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy block format: {e}"))?;
    WriteRequest::decode(raw.as_slice()).map_err(|e| format!("not a WriteRequest: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_compressed_apart_are_one_snappy_block() {
        let capture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/envoy-1.40-1-clusters.prom"
        ))
        .unwrap();
        // Repetitive parts, one over snappy's 64 KiB fragment, one tiny, one empty.
        let parts: [&[u8]; 4] = [&capture[..100_000], b"x", b"", &capture[100_000..]];
        let mut elements = Vec::new();
        let mut raw_len = 0;
        for p in parts {
            compress_part(p, &mut elements);
            raw_len += p.len() as u64;
        }
        let block = assemble(raw_len, &elements);
        let back = snap::raw::Decoder::new().decompress_vec(&block).unwrap();
        assert_eq!(back, parts.concat());
        assert!(
            block.len() < capture.len() / 4,
            "still compressed: {}",
            block.len()
        );
    }

    #[test]
    fn round_trip_and_stale_marker_bits_survive() {
        let req = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![
                    Label {
                        name: "__name__".into(),
                        value: "up".into(),
                    },
                    Label {
                        name: "job".into(),
                        value: "envoy".into(),
                    },
                ],
                samples: vec![
                    Sample {
                        value: 1.0,
                        timestamp: 1_700_000_000_000,
                    },
                    Sample {
                        value: f64::from_bits(STALE_NAN_BITS),
                        timestamp: 1_700_000_015_000,
                    },
                ],
            }],
        };
        let back = decode(&encode(&req)).unwrap();
        assert_eq!(back.timeseries[0].labels, req.timeseries[0].labels);
        assert_eq!(
            back.timeseries[0].samples[1].value.to_bits(),
            STALE_NAN_BITS
        );
        assert!(decode(b"not snappy").is_err());
    }
}
