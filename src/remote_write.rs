//! Stage 9, remote write: full-tier samples (and the agent's own metrics) to a
//! Prometheus-compatible endpoint with Remote Write 1.0, through a durable queue.
//!
//! Split as Vector splits its sink: [`proto`] (messages and encoding), [`relabel`] (what is
//! written and with which labels), [`queue`] (durable segments per shard), [`send`] (one
//! POST and what its answer means). This file is the batching sink that ties them together:
//!
//! ```text
//! full scrape -> encode (drop, label, hash to a shard) -> batcher -> shard queue (disk) -> sender -> POST
//! ```
//!
//! Scraping never waits on the network: the full-tier task hands series to the batcher over
//! a bounded channel and the batcher only writes to local disk. A batch closes at
//! `batch_samples` samples, at [`MAX_BATCH_BYTES`] compressed, or after `batch_deadline`.
//! Series are hashed to shards, so the samples of one series stay in order while shards
//! send concurrently. Every disk operation (append, the once-a-second `fsync`, read, ack)
//! runs on tokio's blocking pool, never on the async workers that run the 1 s fast tier: a
//! slow or full disk delays remote write, not decisions.

pub mod encode;
pub mod proto;
pub mod queue;
pub mod relabel;
pub mod send;
pub mod sigv4;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::config::{require, ConfigError};
use crate::shutdown::stopping;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::{GaugeF, LatencyQuantiles, MetricRegistry, QuantileLabels};
use encode::ShardChunk;
use queue::{Cursor, Queue};
use relabel::DropRules;
use send::{Backoff, Endpoint, Outcome, Sender};

/// A batch closes at this many compressed bytes whatever its sample count: receivers cap
/// a request's size (Prometheus' default limit is 32 MiB decompressed, and AMP's is lower),
/// and one request is retried whole.
pub const MAX_BATCH_BYTES: usize = 2 << 20;

/// Remote-write settings, validated.
#[derive(Clone, Debug)]
pub struct RemoteWriteConfig {
    pub endpoint: Endpoint,
    pub queue_dir: PathBuf,
    pub max_disk_bytes: u64,
    pub batch_samples: usize,
    pub batch_deadline: Duration,
    pub shards: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one batch is retried while the endpoint refuses the credential.
    pub auth_retry: Duration,
    /// Labels added to every series (`cluster`, ...).
    pub external_labels: Vec<(String, String)>,
    /// The `job` label of Envoy series (the reference collector's job name).
    pub job: String,
    pub drop: DropRules,
    /// SigV4 signing (region, service) for AMP; `None` for plain endpoints.
    pub sigv4: Option<(String, String)>,
}

impl RemoteWriteConfig {
    /// ### Errors
    /// A message naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Backoff::new(self.min_backoff, self.max_backoff)
            .map_err(|e| ConfigError::invalid("--remote-write-min-backoff", e.to_string()))?;
        require(
            self.batch_samples > 0,
            "--remote-write-batch-samples",
            || "must be at least 1".into(),
        )?;
        require(self.shards > 0, "--remote-write-shards", || {
            "must be at least 1".into()
        })?;
        require(
            self.max_disk_bytes >= 2 * queue::SEGMENT_BYTES,
            "--remote-write-max-disk",
            || format!("must be at least {} bytes", 2 * queue::SEGMENT_BYTES),
        )?;
        Ok(())
    }
}

/// Where encoded series go: the batcher, one chunk per shard. [`SeriesSender::send`]
/// compresses each chunk in the calling (scrape) task, so the batcher only joins small
/// compressed parts ([`proto::compress_part`]) instead of copying the raw encodings.
#[derive(Clone, Debug)]
pub struct SeriesSender(mpsc::Sender<Vec<Sealed>>);

/// The batcher has stopped (the agent is shutting down).
#[derive(Debug)]
pub struct Closed;

impl SeriesSender {
    /// Hand one scrape's chunks to the batcher; waits only while its channel is full.
    ///
    /// ### Errors
    /// [`Closed`] once the batcher has stopped.
    pub async fn send(&self, chunks: Vec<ShardChunk>) -> Result<(), Closed> {
        let sealed = chunks.iter().map(Sealed::from).collect();
        self.0.send(sealed).await.map_err(|_| Closed)
    }
}

/// One shard's series, compressed: snappy elements without the preamble.
#[derive(Clone, Debug, Default)]
struct Sealed {
    elements: Vec<u8>,
    raw_len: u64,
    samples: u32,
    newest_ms: i64,
}

impl From<&ShardChunk> for Sealed {
    fn from(chunk: &ShardChunk) -> Self {
        let mut elements = Vec::new();
        proto::compress_part(&chunk.bytes, &mut elements);
        Sealed {
            elements,
            raw_len: chunk.bytes.len() as u64,
            samples: chunk.samples,
            newest_ms: chunk.newest_ms,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabels {
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

/// The remote-write stage's metrics.
#[derive(Clone, Debug)]
pub struct RemoteWriteMetrics {
    pub samples: Family<OutcomeLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    batches: Family<StatusClassLabels, Counter>,
    queue_bytes: Family<ShardLabels, Gauge>,
    queue_samples: Family<ShardLabels, Gauge>,
    send_seconds: LatencyQuantiles<QuantileLabels>,
    newest_sent: GaugeF,
}

impl RemoteWriteMetrics {
    pub fn register(r: &mut MetricRegistry) -> Self {
        let send_seconds = Family::<QuantileLabels, GaugeF>::default();
        let m = RemoteWriteMetrics {
            samples: Family::default(),
            retries: Family::default(),
            batches: Family::default(),
            queue_bytes: Family::default(),
            queue_samples: Family::default(),
            send_seconds: LatencyQuantiles::new(&send_seconds, |quantile| QuantileLabels {
                quantile,
            }),
            newest_sent: GaugeF::default(),
        };
        r.register(
            "meshcanary_remote_write_samples",
            "Remote-write samples by outcome: queued (on disk), sent, dropped_http_4xx (rejected by the receiver), dropped_auth (credential refused for all of --remote-write-auth-retry), dropped_disk_cap, dropped_corrupt, dropped_queue_error.",
            &["outcome"],
            &m.samples,
        );
        r.register(
            "meshcanary_remote_write_retries",
            "Remote-write batch attempts that will be retried, by reason (429, 5xx, auth for 401/403, connect, timeout, body_read, credentials).",
            &["reason"],
            &m.retries,
        );
        r.register(
            "meshcanary_remote_write_batches",
            "Remote-write POSTs by answer (2xx, 4xx, 429, 5xx, error for no answer).",
            &["status_class"],
            &m.batches,
        );
        r.register(
            "meshcanary_remote_write_queue_bytes",
            "Bytes of the remote-write queue on disk, by shard.",
            &["shard"],
            &m.queue_bytes,
        );
        r.register(
            "meshcanary_remote_write_queue_samples",
            "Samples waiting in the remote-write queue, by shard.",
            &["shard"],
            &m.queue_samples,
        );
        r.register(
            "meshcanary_remote_write_send_seconds",
            "Remote-write POST duration quantiles over the last one to two minutes (hdrhistogram).",
            &["quantile"],
            &send_seconds,
        );
        r.register(
            "meshcanary_remote_write_newest_sample_sent_timestamp_seconds",
            "Timestamp of the newest sample the endpoint accepted; now minus this is the remote-write lag.",
            &[],
            &m.newest_sent,
        );
        m
    }

    /// Publish one shard's queue backlog.
    fn set_queue_backlog(&self, shard: usize, bytes: u64, samples: u64) {
        let l = ShardLabels {
            shard: shard.to_string(),
        };
        self.queue_bytes
            .get_or_create(&l)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.queue_samples
            .get_or_create(&l)
            .set(i64::try_from(samples).unwrap_or(i64::MAX));
    }

    /// Set the POST duration quantiles (before an encode).
    pub fn refresh(&self) {
        self.send_seconds.refresh();
    }
}

/// Start the batcher and one sender per shard. Returns the channel full-tier scrapes feed.
///
/// ### Errors
/// The queue directory cannot be created.
pub async fn start(
    config: RemoteWriteConfig,
    metrics: RemoteWriteMetrics,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> std::io::Result<SeriesSender> {
    let mut queues = Vec::with_capacity(config.shards);
    for shard in 0..config.shards {
        let dir = config.queue_dir.join(format!("shard-{shard}"));
        let per_shard_cap = config.max_disk_bytes / config.shards as u64;
        queues.push(Arc::new(Queue::open(&dir, per_shard_cap)?));
    }
    let (tx, rx) = mpsc::channel(64);
    tasks.spawn(batcher(
        rx,
        queues.clone(),
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let sigv4 = match &config.sigv4 {
        Some((region, service)) => Some(Arc::new(sigv4::SigV4 {
            region: region.clone(),
            service: service.clone(),
            credentials: sigv4::CredentialCache::default_chain(region).await,
        })),
        None => None,
    };
    for (shard, queue) in queues.into_iter().enumerate() {
        let sender = Sender::new(config.endpoint.clone(), sigv4.clone());
        let (bytes, samples) = queue.backlog();
        metrics.set_queue_backlog(shard, bytes, samples);
        tasks.spawn(shard_sender(
            shard,
            queue,
            sender,
            config.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    Ok(SeriesSender(tx))
}

async fn batcher(
    mut rx: mpsc::Receiver<Vec<Sealed>>,
    queues: Vec<Arc<Queue>>,
    config: RemoteWriteConfig,
    metrics: RemoteWriteMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buffers: Vec<Sealed> = vec![Sealed::default(); queues.len()];
    let add = |buffers: &mut Vec<Sealed>, chunks: Vec<Sealed>| {
        for (buffer, chunk) in buffers.iter_mut().zip(chunks) {
            if buffer.samples == 0 {
                *buffer = chunk;
                continue;
            }
            buffer.elements.extend_from_slice(&chunk.elements);
            buffer.raw_len += chunk.raw_len;
            buffer.samples += chunk.samples;
            buffer.newest_ms = buffer.newest_ms.max(chunk.newest_ms);
        }
    };
    let mut tick = tokio::time::interval(config.batch_deadline);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync_tick = tokio::time::interval(SYNC_EVERY);
    sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync_failing = false;
    loop {
        tokio::select! {
            received = rx.recv() => {
                let Some(chunks) = received else { break };
                add(&mut buffers, chunks);
                for (queue, buffer) in queues.iter().zip(&mut buffers) {
                    if buffer.samples as usize >= config.batch_samples
                        || buffer.elements.len() >= MAX_BATCH_BYTES
                    {
                        flush(queue, buffer, &metrics).await;
                    }
                }
            }
            _ = tick.tick() => {
                for (queue, buffer) in queues.iter().zip(&mut buffers) {
                    flush(queue, buffer, &metrics).await;
                }
            }
            _ = sync_tick.tick() => {
                sync_failing = sync(&queues, sync_failing).await;
            }
            () = stopping(&mut shutdown) => break,
        }
    }
    // Whatever was scraped is on disk before the agent exits.
    while let Ok(chunks) = rx.try_recv() {
        add(&mut buffers, chunks);
    }
    for (queue, buffer) in queues.iter().zip(&mut buffers) {
        flush(queue, buffer, &metrics).await;
    }
    sync(&queues, sync_failing).await;
}

/// How often the batcher `fdatasync`s the segments it appended to: the most a node crash
/// or power loss can lose (an agent restart loses nothing; the kernel keeps what was written).
/// Per batch it was 7 % of the agent's CPU in `scripts/bench-peers.sh`.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// `fdatasync` the shards appended to since their last sync; returns whether one failed
/// (logged when failing starts, not every second).
async fn sync(queues: &[Arc<Queue>], was_failing: bool) -> bool {
    let mut failing = false;
    for queue in queues.iter().filter(|q| q.needs_sync()) {
        if let Err(error) = on_disk(queue, Queue::sync).await {
            if !was_failing && !failing {
                tracing::error!(%error, "Syncing the remote-write queue to disk failed; batches stay in the page cache and are still sent, but a node crash could lose them (check the queue volume)");
            }
            failing = true;
        }
    }
    failing
}

/// Run a disk operation of a queue on the blocking pool.
async fn on_disk<T: Send + 'static>(
    queue: &Arc<Queue>,
    op: impl FnOnce(&Queue) -> T + Send + 'static,
) -> T {
    let queue = Arc::clone(queue);
    match tokio::task::spawn_blocking(move || op(&queue)).await {
        Ok(out) => out,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// Append a shard's buffer (compressed parts of a `WriteRequest` encoding) to the shard's
/// queue as one snappy block.
async fn flush(queue: &Arc<Queue>, buffer: &mut Sealed, metrics: &RemoteWriteMetrics) {
    if buffer.samples == 0 {
        return;
    }
    let chunk = std::mem::take(buffer);
    let samples = chunk.samples;
    let body = proto::assemble(chunk.raw_len, &chunk.elements);
    let count = |outcome: &'static str, n: u64| {
        metrics
            .samples
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n)
    };
    let newest_ms = chunk.newest_ms;
    match on_disk(queue, move |q| q.append(&body, samples, newest_ms)).await {
        Ok(dropped) => {
            count("queued", u64::from(samples));
            if dropped.samples > 0 {
                count("dropped_disk_cap", dropped.samples);
                tracing::warn!(samples = dropped.samples, "Remote-write queue over its disk cap: dropped the oldest segment (raise --remote-write-max-disk)");
            }
        }
        Err(error) => {
            count("dropped_queue_error", u64::from(samples));
            tracing::error!(%error, samples, "Writing a remote-write batch to the queue failed (disk full?); this batch is dropped, the queue keeps what it had and sending goes on");
        }
    }
}

async fn shard_sender(
    shard: usize,
    queue: Arc<Queue>,
    sender: Sender,
    config: RemoteWriteConfig,
    metrics: RemoteWriteMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut cursor: Cursor = queue.ack_cursor();
    let mut backoff =
        Backoff::new(config.min_backoff, config.max_backoff).expect("validated at startup");
    let mut last_drop_log: Option<Instant> = None;
    // When the backlog metric was last brought up to date, and whether it is behind.
    let (mut backlog_at, mut backlog_behind): (Option<Instant>, bool) = (None, false);
    let count = |outcome: &'static str, n: u64| {
        metrics
            .samples
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(n)
    };
    // The next record, read in the same trip to the blocking pool as the last ack.
    let mut prefetched = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let read = match prefetched.take() {
            Some(read) => read,
            None => on_disk(&queue, move |q| q.next(cursor)).await,
        };
        let (next, dropped) = match read {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, "Reading the remote-write queue failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stopping(&mut shutdown) => return,
                }
                continue;
            }
        };
        if dropped.samples > 0 {
            count("dropped_corrupt", dropped.samples);
            tracing::warn!(
                samples = dropped.samples,
                "Skipped a torn record in the remote-write queue"
            );
        }
        let Some((record, after)) = next else {
            if backlog_behind {
                // Drained: show it now rather than at the next delivery.
                let (bytes, samples) = on_disk(&queue, Queue::backlog).await;
                metrics.set_queue_backlog(shard, bytes, samples);
                (backlog_at, backlog_behind) = (Some(Instant::now()), false);
            }
            let appended = queue.appended.notified();
            tokio::select! {
                () = appended => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = stopping(&mut shutdown) => return,
            }
            continue;
        };
        let body = Bytes::from(record.payload);
        // Since when this batch's credential has been refused (401/403).
        let mut refused_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let outcome = sender.post(body.clone()).await;
            metrics.send_seconds.record(started.elapsed());
            let class = match &outcome {
                Outcome::Delivered => "2xx",
                Outcome::Retry { reason: "429", .. } => "429",
                Outcome::Retry { reason: "5xx", .. } => "5xx",
                Outcome::Retry { reason: "auth", .. } => "4xx",
                Outcome::Retry { .. } => "error",
                Outcome::Drop { .. } => "4xx",
            };
            metrics
                .batches
                .get_or_create(&StatusClassLabels {
                    status_class: class,
                })
                .inc();
            match outcome {
                Outcome::Delivered => {
                    count("sent", u64::from(record.samples));
                    metrics.newest_sent.set(record.newest_ms as f64 / 1000.0);
                    backoff.reset();
                    break;
                }
                Outcome::Drop { status, message } => {
                    count("dropped_http_4xx", u64::from(record.samples));
                    if last_drop_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(status, %message, samples = record.samples, "Remote-write endpoint rejected a batch; dropped it (logged at most once a minute)");
                        last_drop_log = Some(Instant::now());
                    }
                    break;
                }
                Outcome::Retry { reason, after } => {
                    if reason == "auth" {
                        let since = *refused_since.get_or_insert_with(|| {
                            tracing::warn!(samples = record.samples, "Remote-write endpoint refused the credential (401/403); retrying with the credential files read again");
                            Instant::now()
                        });
                        if since.elapsed() >= config.auth_retry {
                            count("dropped_auth", u64::from(record.samples));
                            tracing::error!(samples = record.samples, refused_for = ?config.auth_retry, "Remote-write endpoint refused the credential for the whole --remote-write-auth-retry; dropped the batch (check the credential files and the endpoint's permissions)");
                            break;
                        }
                    }
                    metrics
                        .retries
                        .get_or_create(&ReasonLabels { reason })
                        .inc();
                    let delay = backoff.next_delay().max(after.unwrap_or_default());
                    tracing::debug!(reason, ?delay, "Retrying a remote-write batch");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        // Not acked: the batch is sent again after a restart.
                        () = stopping(&mut shutdown) => return,
                    }
                }
            }
        }
        cursor = after;
        // Counting the backlog reads record headers: at most once a second.
        let count_backlog = backlog_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let (acked, backlog, read) = on_disk(&queue, move |q| {
            let acked = q.ack(cursor);
            (acked, count_backlog.then(|| q.backlog()), q.next(cursor))
        })
        .await;
        if let Err(error) = acked {
            tracing::error!(%error, "Recording remote-write progress failed; the batch may be sent again after a restart");
        }
        if let Some((bytes, samples)) = backlog {
            metrics.set_queue_backlog(shard, bytes, samples);
            (backlog_at, backlog_behind) = (Some(Instant::now()), false);
        } else {
            backlog_behind = true;
        }
        prefetched = Some(read);
    }
}
