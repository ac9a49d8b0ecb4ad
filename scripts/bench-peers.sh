#!/usr/bin/env bash
# Remote-write collectors side by side: meshcanary, vmagent and Prometheus in agent mode each
# scrape the same 30 targets every 1 s (each serving a real ~160 KB Envoy 1.40 capture) with
# the same drop rules and remote-write to the same local Prometheus, one after another, for
# ROUNDS rounds (default 3) whose order rotates, so a noisy neighbour on a shared machine
# does not always land on the same collector. Reports each one's CPU (cores, from
# /proc/<pid>/stat over MEASURE_S after WARMUP_S) and peak RSS per round, then the median of
# the per-round ratios on its last line. meshcanary also runs its 1 s fast tier (its
# decision input); with the full tier at 1 s and an 800 ms timeout, one request per sidecar
# serves both (docs/architecture.md, "Scrape tiers and time"). Loopback only.
# meshcanary is built with the `dist` profile, as the image is (the first build takes a few
# minutes longer than a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh)"
command -v vmagent >/dev/null || { echo "bench-peers: installing victoria-metrics (vmagent)" >&2; apt-get install -y -qq victoria-metrics >&2; }
cargo build --profile dist --locked --bin meshcanary >&2
targets=${TARGETS:-30} warmup=${WARMUP_S:-15} measure=${MEASURE_S:-60} base=${BENCH_PORT_BASE:-21000}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
hz=$(getconf CLK_TCK)

/usr/bin/python3 scripts/serve-captures.py tests/fixtures/envoy-1.40-1-clusters.prom $((base + 1)) "$targets" >&2 &
receiver=$((base + 900))
"$PROMETHEUS_BIN" --config.file=<(echo 'global: {}') --storage.tsdb.path="$work/receiver" \
  --web.listen-address=127.0.0.1:$receiver --web.enable-remote-write-receiver >/dev/null 2>&1 &
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$receiver/-/ready" && break; sleep 0.2; done
write_url="http://127.0.0.1:$receiver/api/v1/write"

# The same drops for the peers as meshcanary's defaults (the reference setup's).
drop_names='envoy_tls.*|envoy_tcp_downstream.*|envoy_http_(stats|admin).*|envoy_cluster_(lb|retry|bind|internal|max|original).*'
scrape_config() { # $1: extra top-level YAML
  echo "global: { scrape_interval: 1s, scrape_timeout: 800ms }"
  echo "$1"
  echo "scrape_configs:"
  echo "- job_name: appmesh-envoy"
  echo "  metrics_path: /stats/prometheus"
  echo "  static_configs:"
  echo "  - targets: [$(for i in $(seq 1 "$targets"); do printf '"127.0.0.1:%d",' $((base + i)); done | sed 's/,$//')]"
  echo "  metric_relabel_configs:"
  echo "  - { source_labels: [__name__], regex: '$drop_names', action: drop }"
  echo "  - { source_labels: [envoy_cluster_name], regex: '(outbound|inbound|prometheus_stats).*', action: drop }"
  echo "  - { source_labels: [envoy_tcp_prefix], regex: '(outbound|inbound|prometheus_stats).*', action: drop }"
  echo "  - { regex: 'envoy_listener_address|envoy_http_conn_manager_listener_prefix|envoy_http_conn_manager_prefix', action: labeldrop }"
}

measure() { # name pid
  local pid=$2 t0 t1 s0 s1
  sleep "$warmup"
  kill -0 "$pid" 2>/dev/null || { echo "bench-peers: $1 exited early" >&2; exit 1; }
  t0=$(awk '{ print $14 + $15 }' "/proc/$pid/stat"); s0=$(date +%s.%N)
  sleep "$measure"
  t1=$(awk '{ print $14 + $15 }' "/proc/$pid/stat"); s1=$(date +%s.%N)
  local rss; rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c "import sys; t0,t1,s0,s1,hz,rss=map(float,sys.argv[2:]); print(f'{sys.argv[1]} {(t1-t0)/hz/(s1-s0):.4f} {rss/1024:.1f}')" "$1" "$t0" "$t1" "$s0" "$s1" "$hz" "$rss"
}

args=()
for i in $(seq 1 "$targets"); do args+=(--target "bench/w$i/primary=http://127.0.0.1:$((base + i))"); done
scrape_config "" >"$work/vmagent.yml"
scrape_config "remote_write: [{ url: '$write_url' }]" >"$work/prometheus-agent.yml"

run() { # collector round: start it on fresh state and measure it
  rm -rf "$work/meshcanary-queue" "$work/vmagent-data" "$work/prometheus-agent-data"
  case "$1" in
    meshcanary)
      target/dist/meshcanary agent "${args[@]}" --full-interval 1s --full-timeout 800ms \
        --listen 127.0.0.1:$((base + 901)) --remote-write-url "$write_url" \
        --remote-write-queue-dir "$work/meshcanary-queue" 2>"$work/meshcanary.log" & ;;
    vmagent)
      vmagent -promscrape.config="$work/vmagent.yml" -remoteWrite.url="$write_url" \
        -remoteWrite.tmpDataPath="$work/vmagent-data" -httpListenAddr=127.0.0.1:$((base + 902)) >"$work/vmagent.log" 2>&1 & ;;
    prometheus-agent)
      "$PROMETHEUS_BIN" --enable-feature=agent --config.file="$work/prometheus-agent.yml" \
        --storage.agent.path="$work/prometheus-agent-data" --web.listen-address=127.0.0.1:$((base + 903)) \
        >"$work/prometheus-agent.log" 2>&1 & ;;
  esac
  echo "$2 $(measure "$1" $!)"
}

rounds=${ROUNDS:-3}
collectors=(meshcanary vmagent prometheus-agent)
results=()
for r in $(seq 1 "$rounds"); do
  for k in 0 1 2; do
    c=${collectors[$(( (k + r - 1) % 3 ))]}
    echo "bench-peers: round $r, $c" >&2
    results+=("$(run "$c" "$r")")
  done
done

echo "| round | collector | CPU (cores) | peak RSS (MiB) |"
echo "|---|---|---|---|"
for r in "${results[@]}"; do set -- $r; echo "| $1 | $2 | $3 | $4 |"; done
python3 - "${results[@]}" <<'PY'
import statistics, sys
rows = {}
for r in sys.argv[1:]:
    rnd, name, cpu, rss = r.split()
    rows.setdefault(rnd, {})[name] = (float(cpu), float(rss))
cpu = [v["meshcanary"][0] / v["vmagent"][0] for v in rows.values()]
rss = [v["meshcanary"][1] / v["vmagent"][1] for v in rows.values()]
print("per round: cpu " + ", ".join(f"{c:.2f}" for c in cpu) + "; rss " + ", ".join(f"{m:.2f}" for m in rss))
print(f"cpu ratio vs vmagent: {statistics.median(cpu):.2f}, rss ratio vs vmagent: {statistics.median(rss):.2f}")
PY
