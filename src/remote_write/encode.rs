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
use crate::parse::{parse_value, LineError, Parser};

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
/// each string's length mixed in so `("ab","c")` and `("a","bc")` differ. Unkeyed, so a
/// series keeps its shard across restarts (a queue replayed after a restart stays in
/// order); the sidecar chooses its labels, so maps of these hashes mix them with a secret
/// per-process key before bucketing ([`Keyed`]).
pub fn hash_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    hash_bytes(
        0,
        labels
            .into_iter()
            .flat_map(|(n, v)| [n.as_bytes(), v.as_bytes()]),
    )
}

/// A secret chosen once per process: keys the hashes an outsider could aim at.
fn process_key() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6d65_7368_6361_6e61);
        h.finish() | 1
    })
}

/// [`hash_labels`] over byte strings, from the state `seed`.
fn hash_bytes<'a>(seed: u64, parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    const K: u64 = 0xf135_7aea_2e62_a9c5;
    let mut h: u64 = seed;
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
    for part in parts {
        eat(part);
    }
    // Final avalanche, so the low bits (used for the shard) depend on every input bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A `HashSet` of series hashes, bucketed by [`Keyed`].
pub type HashSet64 = std::collections::HashSet<u64, std::hash::BuildHasherDefault<Keyed>>;

/// Hasher for values that are hashes already: one multiply-xorshift round with the process
/// key, so that hashes a sidecar steers (by choosing its label values) land in buckets it
/// cannot predict, and cannot pile into one probe sequence.
#[derive(Default)]
pub struct Keyed(u64);

impl std::hash::Hasher for Keyed {
    fn finish(&self) -> u64 {
        let h = (self.0 ^ process_key()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
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

pub(super) fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn label_len(name: &str, value: &str) -> usize {
    1 + varint_len(name.len() as u64)
        + name.len()
        + 1
        + varint_len(value.len() as u64)
        + value.len()
}

/// Append the `TimeSeries.labels` fields of `labels` to `out`.
fn encode_label_fields<N: AsRef<str>, V: AsRef<str>>(out: &mut Vec<u8>, labels: &[(N, V)]) {
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
    encode_label_fields(out, labels);
    out.push(0x12); // TimeSeries.samples = 2
    varint(out, sample_len as u64);
    out.push(0x09); // Sample.value = 1, fixed64 (double)
    out.extend_from_slice(&value.to_le_bytes());
    out.push(0x10); // Sample.timestamp = 2, varint (int64, two's complement)
    varint(out, timestamp_ms as u64);
}

/// What the encoder remembers of one target's series between scrapes: per series (keyed by
/// a hash of its text as scraped, name and braces) whether the drop rules drop it and, if
/// not, its output hash and its encoded label fields. A sidecar's series set hardly changes
/// between scrapes, so a scrape costs one line split and one hash per sample, and the
/// labels are relabelled, sorted and encoded once per series, not once per sample.
/// It also knows which series the last scrape had, which is what stale markers need.
///
/// Envoy writes its series in the same order at every scrape, so the entries are kept in
/// that order and a line is first compared with the entry after the previous line's: the
/// entries and their labels are then read front to back, as the body is, instead of at
/// random places of a hash table (whose cache misses were half of the encoding's time in a
/// `perf` profile of `scripts/bench-peers.sh`). The index finds the lines out of order.
///
/// Memory: per kept series its own encoded labels (the target labels, the same on every
/// series, are encoded once per scrape and spliced in at offsets kept with the series), so
/// about as large as the kept part of one scrape body, plus about 60 bytes per series (the
/// entry and its index slot). A hash collision between two raw series (2^-64 per pair)
/// would write one's labels for the other.
#[derive(Debug, Default)]
pub struct SeriesCache {
    /// In the order of the scrape that last put them in order.
    entries: Vec<Entry>,
    /// Each entry's place in `entries`, by key.
    index: std::collections::HashMap<u64, u32, std::hash::BuildHasherDefault<Keyed>>,
    /// The kept series' encoded `TimeSeries.labels` fields, back to back.
    arena: Vec<u8>,
    /// Bytes of `arena` still referenced.
    live: usize,
    /// Scrapes encoded so far; an entry's `seen` is the last scrape that had it.
    generation: u32,
    /// Hash and encoded fields of the target labels the entries were built with.
    target: Option<(u64, TargetFields)>,
    /// Bytes the last scrape encoded, to size the next one's chunks at once.
    encoded: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The hash of the series' raw text (see `encode_cached`).
    key: u64,
    seen: u32,
    /// The entry's place in the scrape that last saw it, for reordering.
    order: u32,
    kept: Option<Kept>,
}

/// A kept series' place in the arena: one little-endian `u32` per target label (where, in
/// the series' own label fields, that label goes), then the own label fields.
#[derive(Clone, Copy, Debug)]
struct Kept {
    hash: u64,
    start: u32,
    len: u32,
}

/// The target labels' encoded fields, in label order.
#[derive(Debug)]
struct TargetFields {
    bytes: Vec<u8>,
    /// End of each label's fields in `bytes`.
    ends: Vec<usize>,
    /// The labels' names, in the same order.
    names: Vec<String>,
}

impl TargetFields {
    fn new(target: &[(String, String)]) -> Self {
        let mut sorted: Vec<(&str, &str)> = target
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(sorted.len());
        for l in &sorted {
            encode_label_fields(&mut bytes, std::slice::from_ref(l));
            ends.push(bytes.len());
        }
        let names = sorted.iter().map(|(n, _)| (*n).to_owned()).collect();
        TargetFields { bytes, ends, names }
    }
}

impl SeriesCache {
    /// Series the last scrape kept (what a failed scrape must mark stale).
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.kept.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn labels(&self, k: Kept) -> &[u8] {
        &self.arena[k.start as usize..(k.start + k.len) as usize]
    }

    /// The place of the entry keyed `key`: `next` when it is there (the usual case, see
    /// the type's docs), else from the index; counts the lookups in `missed`.
    fn find(&self, key: u64, next: usize, missed: &mut usize) -> Option<usize> {
        if self.entries.get(next).is_some_and(|e| e.key == key) {
            return Some(next);
        }
        *missed += 1;
        self.index.get(&key).map(|&i| i as usize)
    }

    fn push(&mut self, entry: Entry) {
        self.index.insert(entry.key, self.entries.len() as u32);
        self.entries.push(entry);
    }

    /// Forget the entries the scrape `generation` did not see and, when it read many
    /// entries out of place (`missed` lookups), put the rest in its order.
    fn keep_seen(&mut self, generation: u32, missed: usize) -> usize {
        let before = self.entries.len();
        let mut freed = 0;
        self.entries.retain(|e| {
            let keep = e.seen == generation;
            if !keep {
                freed += e.kept.map_or(0, |k| k.len as usize);
            }
            keep
        });
        let reorder = missed > 0 && missed * 32 >= self.entries.len();
        if reorder {
            self.entries.sort_unstable_by_key(|e| e.order);
        }
        if reorder || self.entries.len() != before {
            self.index.clear();
            for (i, e) in self.entries.iter().enumerate() {
                self.index.insert(e.key, i as u32);
            }
        }
        freed
    }

    /// Drop the arena's garbage once it is as large as what is still used.
    fn compact(&mut self) {
        if self.arena.len() <= 2 * self.live + 4096 {
            return;
        }
        let mut arena = Vec::with_capacity(self.live);
        for e in &mut self.entries {
            if let Some(k) = &mut e.kept {
                let (from, to) = (k.start as usize, (k.start + k.len) as usize);
                k.start = arena.len() as u32;
                arena.extend_from_slice(&self.arena[from..to]);
            }
        }
        self.arena = arena;
        self.live = self.arena.len();
    }
}

/// Append one `timeseries` field from a cached series (`stored`: its arena slice) with the
/// target's label fields spliced in, and one sample, to the chunk of the series' shard.
fn write_cached(
    chunks: &mut [ShardChunk],
    k: Kept,
    stored: &[u8],
    target: &TargetFields,
    value: f64,
    timestamp_ms: i64,
) {
    let chunk = &mut chunks[(k.hash % chunks.len() as u64) as usize];
    chunk.samples += 1;
    chunk.newest_ms = chunk.newest_ms.max(timestamp_ms);
    let out = &mut chunk.bytes;
    let (offsets, own) = stored.split_at(4 * target.ends.len());
    let sample_len = 1 + 8 + 1 + varint_len(timestamp_ms as u64);
    let series_len =
        own.len() + target.bytes.len() + 1 + varint_len(sample_len as u64) + sample_len;
    out.push(0x0a);
    varint(out, series_len as u64);
    let (mut own_at, mut target_at) = (0, 0);
    for (i, &end) in target.ends.iter().enumerate() {
        let at =
            u32::from_le_bytes(offsets[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize;
        out.extend_from_slice(&own[own_at..at]);
        out.extend_from_slice(&target.bytes[target_at..end]);
        (own_at, target_at) = (at, end);
    }
    out.extend_from_slice(&own[own_at..]);
    out.push(0x12);
    varint(out, sample_len as u64);
    out.push(0x09);
    out.extend_from_slice(&value.to_le_bytes());
    out.push(0x10);
    varint(out, timestamp_ms as u64);
}

/// A value token as [`parse_value`] reads it; Envoy's counters and buckets, whole numbers,
/// are read straight from the bytes.
fn value_of(token: &[u8]) -> Option<f64> {
    if !token.is_empty() && token.len() <= 15 && token.iter().all(u8::is_ascii_digit) {
        let n = token
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        return Some(n as f64);
    }
    std::str::from_utf8(token).ok().and_then(parse_value)
}

/// The cache key of a sample line's text before its value, keyed: a sidecar that could
/// make two lines collide would have one series written with the other's labels.
fn hash_prefix(prefix: &[u8]) -> u64 {
    hash_bytes(process_key(), [prefix, b"".as_slice()])
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

    /// The output labels of `sample` (sorted, deduplicated, empty values left out), or
    /// `None` if the drop rules drop it.
    fn relabel<'s>(
        &self,
        sample: &crate::parse::Sample<'s>,
        labels: &mut Vec<(Cow<'s, str>, Cow<'s, str>)>,
    ) -> Option<()>
    where
        'a: 's,
    {
        if self.drop.drops_name(sample.name) {
            return None;
        }
        labels.clear();
        labels.push((Cow::Borrowed("__name__"), Cow::Borrowed(sample.name)));
        for l in sample.labels.iter() {
            let value = l.value();
            if self.drop.drops_label(l.name, &value) {
                return None;
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
        Some(())
    }

    fn target_hash(&self) -> u64 {
        hash_labels(
            self.target_labels
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        )
    }

    /// Like [`Encoder::encode`], through `cache`: every kept sample of `body` at
    /// `timestamp_ms` into `chunks`, then a stale marker (at the same timestamp) for every
    /// series the previous scrape had and this one does not. If the target labels changed
    /// since the cache was filled, the old series are marked stale first.
    pub fn encode_cached(
        &self,
        cache: &mut SeriesCache,
        body: &[u8],
        timestamp_ms: i64,
        chunks: &mut [ShardChunk],
        mut on_error: impl FnMut(&LineError),
    ) -> Converted {
        let target = self.target_hash();
        if cache.target.as_ref().map(|(h, _)| *h) != Some(target) {
            self.end_all(cache, timestamp_ms, chunks);
            cache.target = Some((target, TargetFields::new(self.target_labels)));
        }
        cache.generation = cache.generation.wrapping_add(1);
        let generation = cache.generation;
        let (_, fields) = cache.target.take().expect("set above");
        let before: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        let expect = cache.encoded + cache.encoded / 8;
        for c in chunks.iter_mut() {
            c.bytes.reserve(expect / self.shards);
        }
        let mut counts = Converted::default();
        let mut labels: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(16);
        let (mut pos, mut line_no) = (0, 0);
        // The entry expected for the next line, and the lines that were not there.
        let (mut next, mut missed) = (0, 0);
        while pos < body.len() {
            let len = memchr::memchr(b'\n', &body[pos..]).unwrap_or(body.len() - pos);
            let mut line = &body[pos..pos + len];
            pos += len + 1;
            line_no += 1;
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            // Fast path: a line whose text up to its last space was seen before, as a
            // valid sample without a timestamp followed by one space and its value, is the
            // same series with a new value, if what follows is a value.
            // A comment (a fifth of Envoy's lines) has no value: straight to the parser.
            let last_space = match line.first() {
                Some(b'#') => None,
                _ => memchr::memrchr(b' ', line),
            };
            let fast_value = last_space.and_then(|sp| value_of(&line[sp + 1..]));
            // Keyed by its prefix only when it has a value (see the slow path).
            let prefix_key = last_space
                .filter(|_| fast_value.is_some())
                .map(|sp| hash_prefix(&line[..sp]));
            if let (Some(value), Some(key)) = (fast_value, prefix_key) {
                if let Some(i) = cache.find(key, next, &mut missed) {
                    next = i + 1;
                    let e = &mut cache.entries[i];
                    (e.seen, e.order) = (generation, line_no as u32);
                    let Some(k) = e.kept else {
                        counts.dropped += 1;
                        continue;
                    };
                    write_cached(chunks, k, cache.labels(k), &fields, value, timestamp_ms);
                    counts.kept += 1;
                    continue;
                }
            }
            // Slow path: the line alone through the full parser (comments, errors, and
            // series not seen before).
            let sample = match Parser::new(line).next() {
                None => continue,
                Some(Ok(s)) => s,
                Some(Err(mut e)) => {
                    e.line = line_no;
                    counts.rejected_lines += 1;
                    on_error(&e);
                    continue;
                }
            };
            // Only a line the fast path would read the same way is keyed by its prefix;
            // others (an explicit timestamp, tabs, trailing blanks) by name and labels,
            // and always come this way.
            let key = match (sample.timestamp_ms, fast_value, prefix_key) {
                (None, Some(_), Some(key)) => key,
                _ => hash_labels([(sample.name, sample.labels.raw()), ("\0", "slow")]),
            };
            let entry = match cache.find(key, next, &mut missed) {
                Some(i) => {
                    next = i + 1;
                    let e = &mut cache.entries[i];
                    (e.seen, e.order) = (generation, line_no as u32);
                    *e
                }
                None => {
                    let kept = self.relabel(&sample, &mut labels).map(|()| {
                        let hash =
                            hash_labels(labels.iter().map(|(n, v)| (n.as_ref(), v.as_ref())));
                        let start = cache.arena.len();
                        let own_start = start + 4 * fields.names.len();
                        cache.arena.resize(own_start, 0);
                        let mut name = 0;
                        for (n, v) in &labels {
                            if fields.names.get(name).map(String::as_str) == Some(n.as_ref()) {
                                let at = (cache.arena.len() - own_start) as u32;
                                let slot = start + 4 * name;
                                cache.arena[slot..slot + 4].copy_from_slice(&at.to_le_bytes());
                                name += 1;
                            } else {
                                encode_label_fields(&mut cache.arena, &[(n, v)]);
                            }
                        }
                        let len = cache.arena.len() - start;
                        cache.live += len;
                        Kept {
                            hash,
                            start: start as u32,
                            len: len as u32,
                        }
                    });
                    let e = Entry {
                        key,
                        seen: generation,
                        order: line_no as u32,
                        kept,
                    };
                    next = cache.entries.len() + 1;
                    cache.push(e);
                    e
                }
            };
            let Some(k) = entry.kept else {
                counts.dropped += 1;
                continue;
            };
            let ts = sample.timestamp_ms.unwrap_or(timestamp_ms);
            write_cached(chunks, k, cache.labels(k), &fields, sample.value, ts);
            counts.kept += 1;
        }
        // Series of earlier scrapes that this one did not have: they end here.
        let gone: Vec<Kept> = cache
            .entries
            .iter()
            .filter(|e| e.seen != generation)
            .filter_map(|e| e.kept)
            .collect();
        if !gone.is_empty() {
            // The same output series may have come back under other raw text.
            let current: HashSet64 = cache
                .entries
                .iter()
                .filter(|e| e.seen == generation)
                .filter_map(|e| e.kept.map(|k| k.hash))
                .collect();
            let stale = f64::from_bits(super::proto::STALE_NAN_BITS);
            for &k in gone.iter().filter(|k| !current.contains(&k.hash)) {
                write_cached(chunks, k, cache.labels(k), &fields, stale, timestamp_ms);
            }
        }
        cache.live -= cache.keep_seen(generation, missed);
        cache.compact();
        cache.target = Some((target, fields));
        cache.encoded = chunks.iter().map(|c| c.bytes.len()).sum::<usize>() - before;
        counts
    }

    /// Stale markers at `timestamp_ms` for every series the cache holds (a failed scrape,
    /// or target labels that changed), which it then forgets. Returns how many.
    pub fn end_all(
        &self,
        cache: &mut SeriesCache,
        timestamp_ms: i64,
        chunks: &mut [ShardChunk],
    ) -> usize {
        let stale = f64::from_bits(super::proto::STALE_NAN_BITS);
        let mut n = 0;
        // Written with the target labels the series were cached with.
        if let Some((_, fields)) = &cache.target {
            for k in cache.entries.iter().filter_map(|e| e.kept) {
                write_cached(chunks, k, cache.labels(k), fields, stale, timestamp_ms);
                n += 1;
            }
        }
        *cache = SeriesCache {
            generation: cache.generation,
            encoded: cache.encoded,
            ..SeriesCache::default()
        };
        n
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
        for result in Parser::new(body) {
            let sample = match result {
                Ok(s) => s,
                Err(e) => {
                    counts.rejected_lines += 1;
                    on_error(&e);
                    continue;
                }
            };
            if self.relabel(&sample, &mut labels).is_none() {
                counts.dropped += 1;
                continue;
            }
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

    fn decoded(chunks: &[ShardChunk]) -> Vec<proto::TimeSeries> {
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.bytes.clone()).collect();
        let mut ts = proto::decode(&snap::raw::Encoder::new().compress_vec(&all).unwrap())
            .unwrap()
            .timeseries;
        ts.sort_by(|a, b| a.labels.cmp(&b.labels));
        ts
    }

    #[test]
    fn the_series_cache_writes_what_the_plain_encoder_writes() {
        let mut body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/envoy-1.40-1-clusters.prom"
        ))
        .unwrap();
        body.extend_from_slice(b"clash{job=\"x\",esc=\"a\\\"b\\nc\"} -1.5 1700000000123\n");
        // Shapes the fast path must leave to the parser, or read the same way.
        body.extend_from_slice(
            b"spaced{a=\"x 1\",b=\"} 2\"} 0\ntabbed\t0\ntrailing 0 \r\n  indented 0\n\
              # TYPE typed counter\ntyped 0\n# TYPE bad\nbroken{a=\"1\" 0\nnovalue{}\n\
              crlf{a=\"1\"} 0\r\nstamped 0 -5\nstamped 0 12\nnot utf8 \xff\n",
        );
        let drop = DropRules::reference();
        let labels = target();
        let encoder = Encoder::new(&labels, &drop, 3);
        let mut cache = SeriesCache::default();
        for (round, ts) in [1_000i64, 2_000, 3_000].into_iter().enumerate() {
            // The second round changes every value (hits must write the new ones) and
            // breaks one that hit before.
            let text = if round == 1 {
                String::from_utf8_lossy(&body)
                    .replace(" 0\n", " 7\n")
                    .replace("typed 7", "typed x")
                    .into_bytes()
            } else {
                body.clone()
            };
            let mut want = encoder.new_chunks();
            let (mut want_errors, mut got_errors) = (vec![], vec![]);
            let w = encoder.encode(
                &text,
                ts,
                &mut want,
                |_| {},
                None,
                |e| want_errors.push(e.clone()),
            );
            let mut got = encoder.new_chunks();
            let g = encoder.encode_cached(&mut cache, &text, ts, &mut got, |e| {
                got_errors.push(e.clone())
            });
            assert_eq!(g, w, "round {round}");
            assert_eq!(got_errors, want_errors, "round {round}");
            assert!(w.rejected_lines >= 4, "{w:?}");
            // Plus, in the round that broke it, a stale marker for `typed`.
            let (stale, got): (Vec<_>, Vec<_>) = decoded(&got)
                .into_iter()
                .partition(|t| t.samples[0].value.to_bits() == proto::STALE_NAN_BITS);
            let stale: Vec<&str> = stale.iter().map(|t| t.labels[0].value.as_str()).collect();
            assert_eq!(stale, if round == 1 { vec!["typed"] } else { vec![] });
            assert_eq!(got, decoded(&want), "round {round}");
        }
        // One entry per distinct series (`stamped` has two samples).
        let mut series = HashSet64::default();
        encoder.encode(
            &body,
            0,
            &mut encoder.new_chunks(),
            |h| {
                series.insert(h);
            },
            None,
            |_| {},
        );
        assert_eq!(cache.len(), series.len());
    }

    #[test]
    fn the_series_cache_follows_a_body_whose_order_changes() {
        let body = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/envoy-1.40-1-clusters.prom"
        ))
        .unwrap();
        let lines: Vec<&str> = body.lines().collect();
        let mut reversed = lines.clone();
        reversed.reverse();
        let mut inserted = lines.clone();
        inserted.insert(lines.len() / 2, "new_in_the_middle{a=\"1\"} 3");
        let drop = DropRules::reference();
        let labels = target();
        let encoder = Encoder::new(&labels, &drop, 2);
        let mut cache = SeriesCache::default();
        let in_order =
            |cache: &SeriesCache| cache.entries.windows(2).all(|w| w[0].order < w[1].order);
        for (round, text) in [&lines, &reversed, &lines, &inserted, &lines]
            .into_iter()
            .enumerate()
        {
            let text = text.join("\n") + "\n";
            let mut want = encoder.new_chunks();
            encoder.encode(text.as_bytes(), 5, &mut want, |_| {}, None, |_| {});
            let mut got = encoder.new_chunks();
            encoder.encode_cached(&mut cache, text.as_bytes(), 5, &mut got, |_| {});
            let fresh: Vec<_> = decoded(&got)
                .into_iter()
                .filter(|t| t.samples[0].value.to_bits() != proto::STALE_NAN_BITS)
                .collect();
            assert_eq!(fresh, decoded(&want), "round {round}");
            // Reversed (and back): every entry out of place, so they are put in the new
            // order. One new series: read through the index, not worth a reorder; gone
            // again, the rest are in order.
            assert_eq!(in_order(&cache), round != 3, "round {round}");
            assert_eq!(cache.index.len(), cache.entries.len());
            for (i, e) in cache.entries.iter().enumerate() {
                assert_eq!(cache.index[&e.key] as usize, i);
            }
        }
    }

    #[test]
    fn the_series_cache_ends_what_disappears_and_forgets_it() {
        let drop = DropRules::none();
        let labels = target();
        let encoder = Encoder::new(&labels, &drop, 2);
        let mut cache = SeriesCache::default();
        let stale = |ts: &proto::TimeSeries| ts.samples[0].value.to_bits() == proto::STALE_NAN_BITS;
        let mut chunks = encoder.new_chunks();
        encoder.encode_cached(&mut cache, b"a 1\nb{x=\"1\"} 2\n", 5, &mut chunks, |_| {});
        let mut chunks = encoder.new_chunks();
        let c = encoder.encode_cached(&mut cache, b"a 3\n", 6, &mut chunks, |_| {});
        assert_eq!(c.kept, 1);
        let out = decoded(&chunks);
        assert_eq!(out.len(), 2);
        let ended: Vec<_> = out.iter().filter(|t| stale(t)).collect();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].labels[0].value, "b");
        assert_eq!(ended[0].samples[0].timestamp, 6);
        // Forgotten: not marked again.
        let mut chunks = encoder.new_chunks();
        encoder.encode_cached(&mut cache, b"a 4\n", 7, &mut chunks, |_| {});
        assert_eq!(decoded(&chunks).len(), 1);
        // The same series under other raw text is not ended.
        let mut chunks = encoder.new_chunks();
        encoder.encode_cached(&mut cache, b"a{} 5\n", 8, &mut chunks, |_| {});
        assert!(!decoded(&chunks).iter().any(stale));
        // A failed scrape ends everything.
        let mut chunks = encoder.new_chunks();
        assert_eq!(encoder.end_all(&mut cache, 9, &mut chunks), 1);
        assert!(decoded(&chunks).iter().all(stale));
        assert!(cache.is_empty());
        // Churn does not grow the arena without bound.
        for i in 0..2000 {
            let line = format!("churn{{i=\"{i}\"}} 1\n");
            encoder.encode_cached(
                &mut cache,
                line.as_bytes(),
                10 + i,
                &mut encoder.new_chunks(),
                |_| {},
            );
        }
        assert!(cache.arena.len() < 8192, "{}", cache.arena.len());
        // New target labels: the old series end, written with the old labels.
        let other = vec![("instance".to_owned(), "10.0.0.2:9901".to_owned())];
        let moved = Encoder::new(&other, &drop, 2);
        let mut chunks = moved.new_chunks();
        moved.encode_cached(&mut cache, b"a 1\n", 20_000, &mut chunks, |_| {});
        let out = decoded(&chunks);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .any(|t| stale(t) && t.labels.iter().any(|l| l.value == "10.0.0.1:9901")));
        assert!(out
            .iter()
            .any(|t| !stale(t) && t.labels.iter().any(|l| l.value == "10.0.0.2:9901")));
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
