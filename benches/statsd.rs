//! The statsd listener's cost, two ways.
//!
//! 1. Criterion: folding one receive batch (64 datagrams, as Envoy 1.40 sends them: per
//!    request five histogram lines, one of them the inbound request time) into the sinks of
//!    100 pods, with parsing the same lines alone as the baseline in the same run.
//! 2. A load run on loopback (`STATSD_LOAD_SECONDS`, default 5; `STATSD_LOAD_ROUNDS`,
//!    default 3): a sender thread paces 100 sidecars x 200 rps x 5 lines = 100 000
//!    datagrams a second at a listener on its own thread: the agent's (`statsd::serve`), and
//!    as the baseline a bare loop that receives the same datagrams into one buffer and drops
//!    them (the kernel's share, which no listener avoids). Prints datagrams received per
//!    second, the listener thread's CPU (cores), datagrams per CPU-second (per core), the
//!    kernel's drops, and the median ratio of the two listeners' CPU.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, Criterion, Throughput};
use meshcanary::statsd::{parse_line, Sinks, StatsdMetrics, Tally};
use meshcanary::window::inbound::Inbound;
use regex::Regex;

const PODS: u8 = 100;

/// The five histogram lines Envoy sends per request of pod `pod` (127.0.1.pod).
fn request_lines(pod: u8, ms: u32) -> Vec<Vec<u8>> {
    let tags = format!("#meshcanary.pod_ip:127.0.1.{pod},envoy.cluster_name:cds_ingress_mesh_podinfo-{pod}_http_9898");
    [
        format!("envoy.cluster.upstream_rq_timeout_budget_percent_used:0|ms|{tags}"),
        format!("envoy.cluster.upstream_rq_time:{ms}|ms|{tags}"),
        format!("envoy.cluster.external.upstream_rq_time:{ms}|ms|{tags}"),
        format!("envoy.cluster.upstream_rq_timeout_budget_per_try_percent_used:0|ms|{tags}"),
        format!("envoy.http.downstream_rq_time:{ms}|ms|#meshcanary.pod_ip:127.0.1.{pod},envoy.http_conn_manager_prefix:ingress"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

fn datagrams(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .flat_map(|i| request_lines((i % PODS as usize) as u8, (i % 300) as u32))
        .take(n)
        .collect()
}

fn sinks() -> (Arc<Sinks>, Vec<meshcanary::statsd::Registration>) {
    let sinks = Arc::new(Sinks::default());
    let inbound = Arc::new(Inbound::envoy(Regex::new("^cds_ingress_").unwrap()));
    let regs = (0..PODS)
        .map(|p| {
            sinks.register(
                IpAddr::V4(Ipv4Addr::new(127, 0, 1, p)),
                Arc::clone(&inbound),
            )
        })
        .collect();
    (sinks, regs)
}

fn criterion_part(c: &mut Criterion) {
    let batch = datagrams(64);
    let (sinks, _regs) = sinks();
    let mut group = c.benchmark_group("statsd");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("parse-only", |b| {
        b.iter(|| {
            batch
                .iter()
                .filter_map(|d| parse_line(black_box(d)))
                .count()
        });
    });
    group.bench_function("ingest-batch", |b| {
        let mut tally = Tally::default();
        b.iter(|| {
            sinks.ingest_batch(
                batch.iter().map(|d| (black_box(d.as_slice()), None)),
                1_000,
                &mut tally,
            );
        });
    });
    group.finish();
}

/// CPU seconds of the calling thread so far.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Load {
    received: u64,
    cpu: f64,
    drops: u64,
    seconds: f64,
}

/// The baseline listener: receive and drop.
async fn bare(
    socket: tokio::net::UdpSocket,
    mut stop: tokio::sync::watch::Receiver<bool>,
    received: &AtomicU64,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            r = socket.readable() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        while socket.try_recv_from(&mut buf).is_ok() {
            received.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn load(agent: bool, seconds: f64, rate: u64) -> Load {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = socket.local_addr().unwrap();
    drop(socket);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = StatsdMetrics::default();
    let m = metrics.clone();
    let bare_received = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&bare_received);
    let receiver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (sinks, _regs) = sinks();
        rt.block_on(async move {
            let socket = meshcanary::statsd::bind(addr, 4 << 20).unwrap();
            let cpu0 = thread_cpu();
            if agent {
                meshcanary::statsd::serve(socket, sinks, m, stop_rx).await;
            } else {
                bare(socket, stop_rx, &counted).await;
            }
            thread_cpu() - cpu0
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let lines = datagrams(5_000);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let _ = sender.send_to(&lines[(sent % lines.len() as u64) as usize], addr);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let _ = stop_tx.send(true);
    let cpu = receiver.join().unwrap();
    Load {
        received: metrics.datagrams.get() + bare_received.load(Ordering::Relaxed),
        cpu,
        drops: metrics.overruns.get(),
        seconds: elapsed,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load_part() {
    let seconds: f64 = std::env::var("STATSD_LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let rounds: usize = std::env::var("STATSD_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rate = 100 * 200 * 5;
    println!("statsd load: {rate} datagrams/s offered (100 sidecars x 200 rps x 5 lines), {seconds} s, {rounds} rounds");
    let mut ratios = Vec::new();
    let mut per_core = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut cpus = [0.0; 2];
        for (i, agent) in [true, false].into_iter().enumerate() {
            let l = load(agent, seconds, rate);
            let cores = l.cpu / l.seconds;
            let per_cpu_s = l.received as f64 / l.cpu.max(0.01);
            println!(
                "round {round} {}: received {:.0}/s, listener CPU {cores:.3} cores, {per_cpu_s:.0} datagrams per CPU-second, kernel drops {}",
                if agent { "agent" } else { "bare receive" },
                l.received as f64 / l.seconds,
                l.drops
            );
            cpus[i] = cores;
            if agent {
                per_core.0.push(per_cpu_s);
            } else {
                per_core.1.push(per_cpu_s);
            }
        }
        ratios.push(cpus[0] / cpus[1].max(1e-9));
    }
    println!(
        "statsd load median: agent {:.0} datagrams per CPU-second, bare receive {:.0}; listener CPU agent/bare receive {:.2}",
        median(per_core.0),
        median(per_core.1),
        median(ratios)
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    criterion_part(&mut c);
    c.final_summary();
    if std::env::args().any(|a| a == "--bench") {
        load_part();
    }
}
