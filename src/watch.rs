//! `meshcanary watch`: the agent's pipeline with a live terminal view, refreshed every second.
//! What a user runs to see what meshcanary sees. [`render`] is pure; [`run`] only prints.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::agent::{Shared, TargetStatus};
use crate::clock::unix_ms;
use crate::judge::{sci, Judgement};
use crate::window::{Summary, WindowKey};
use crate::workload::WorkloadId;

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"))
}

/// The view at one instant: one row per workload role, then the targets that are down.
pub fn render(
    windows: &[(WindowKey, Summary)],
    targets: &[TargetStatus],
    judgements: &[(WorkloadId, Judgement)],
    window_s: u64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "meshcanary watch  (window {window_s}s; '-' = not enough requests yet)"
    );
    let _ = writeln!(
        out,
        "{:<32} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>6} {:>7}",
        "WORKLOAD/ROLE", "RPS", "REQUESTS", "SUCCESS", "P50", "P90", "P99", "AGE", "LATENCY"
    );
    for (key, s) in windows {
        // Where the window's latency comes from: its sidecars' statsd sinks, the scrape, or
        // some of each.
        let sources: std::collections::BTreeSet<&str> = targets
            .iter()
            .filter(|t| &t.target.key == key)
            .map(|t| t.latency_source.as_str())
            .collect();
        let source = match sources.len() {
            0 => "-",
            1 => sources.first().copied().unwrap_or("-"),
            _ => "mixed",
        };
        let _ = writeln!(
            out,
            "{:<32} {:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>6} {:>7}",
            key.to_string(),
            s.rps.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
            s.requests,
            pct(s.success_rate),
            ms(s.p50_ms),
            ms(s.p90_ms),
            ms(s.p99_ms),
            s.age_ms
                .map_or_else(|| "-".to_owned(), |a| format!("{:.1}s", a as f64 / 1000.0)),
            source,
        );
    }
    for (id, j) in judgements {
        let target = id.to_string();
        let message = crate::judge::Message {
            target: &target,
            judgement: j,
        };
        let ev = &j.evidence;
        let _ = writeln!(
            out,
            "judge {target}: {message} | e-values: errors {} latency {} (rollback at {}, {})",
            sci(ev.e_errors),
            sci(ev.e_latency),
            sci(ev.boundaries[0]),
            sci(ev.boundaries[1])
        );
    }
    for t in targets.iter().filter(|t| !t.up) {
        let why = t.last_error.as_deref().unwrap_or("not scraped yet");
        let _ = writeln!(out, "target {} ({}) DOWN: {why}", t.target.id, t.target.key);
    }
    out
}

/// Print the view every second until `shutdown` turns true. On a terminal the screen is
/// redrawn in place; otherwise each frame is appended (for logs and tests).
pub async fn run(shared: Arc<Shared>, window_s: u64, mut shutdown: watch::Receiver<bool>) {
    let tty = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::stopping(&mut shutdown) => return,
        }
        let judgements: Vec<_> = crate::telemetry::lock(&shared.judgements)
            .iter()
            .map(|(k, j)| (k.clone(), j.clone()))
            .collect();
        let frame = render(
            &shared.summaries(unix_ms()),
            &shared.target_statuses(),
            &judgements,
            window_s,
        );
        let mut stdout = std::io::stdout().lock();
        let _ = if tty {
            write!(stdout, "\x1b[2J\x1b[H{frame}")
        } else {
            writeln!(stdout, "{frame}")
        };
        let _ = stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Role;

    #[test]
    fn renders_rows_and_down_targets() {
        let key = WindowKey {
            namespace: "test".into(),
            workload: "podinfo".into(),
            role: Role::Canary,
        };
        let s = Summary {
            requests: 100,
            errors: 46,
            rps: Some(10.0),
            success_rate: Some(0.54),
            p99_ms: Some(480.0),
            age_ms: Some(400),
            ..Summary::default()
        };
        let target = TargetStatus {
            target: crate::discover::parse_static_target("test/podinfo/canary=http://127.0.0.1:1")
                .unwrap(),
            up: false,
            scraped_once: false,
            last_error: Some("connecting: refused".into()),
            latency_source: crate::statsd::Source::Statsd,
        };
        let text = render(&[(key, s)], &[target], &[], 30);
        assert!(
            text.contains("LATENCY") && text.contains(" statsd"),
            "{text}"
        );
        assert!(text.contains("test/podinfo/canary"));
        assert!(text.contains("54.00%"));
        assert!(text.contains("480.0ms"));
        assert!(text.contains("DOWN: connecting: refused"));
    }
}
