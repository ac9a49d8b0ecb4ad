#!/usr/bin/env bash
# Benchmarks, each against a baseline measured in the same run (medians from criterion).
#   scripts/bench.sh parse    parser vs prometheus-parse on real Envoy captures
#   scripts/bench.sh window   per-scrape window update vs parsing alone
#   scripts/bench.sh agent    CPU and peak RSS of `meshcanary agent` watching 2 real Envoys
#                             under load (release build; 60 s after a 10 s warm-up)
#   scripts/bench.sh judge    one judge call with the sequential tests vs threshold-only
#   scripts/bench.sh encode   remote-write encoding of a scrape: direct vs owned TimeSeries + prost
#   scripts/bench.sh controller  `meshcanary controller` (release) against 50, 200 and 1000 agent
#                             endpoints (real peer servers, token checks by TokenReview) with
#                             10 and 100 workloads under analysis, on a real control plane;
#                             its CPU and tick time (p50, p99) per size, then the line
#                             `controller at 1000 agents, 100 workloads: tick p99 <ms> ms, <cores> cores`
#                             (about 25 minutes; SIZES="agents:workloads ..." to choose)
#   scripts/bench.sh          parse, window, judge and encode
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
if [ "$what" = agent ]; then
  eval "$(scripts/testenv.sh)"
  cargo build --release --locked --bin meshcanary --example testapp >&2
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT
  base=${BENCH_PORT_BASE:-19500}
  for i in 1 2; do
    target/release/examples/testapp "127.0.0.1:$((base + i))" 2>/dev/null &
    scripts/envoy-config.sh --vnode "podinfo-$i" --app-port $((base + i)) --admin-port $((base + 100 + i)) \
      --ingress-port $((base + 200 + i)) --egress 10 --egress-port $((base + 300 + i)) >"$work/e$i.yaml"
    "$ENVOY_BIN" -c "$work/e$i.yaml" --base-id $((base + 100 + i)) -l error >/dev/null 2>&1 &
  done
  sleep 2
  "$HEY_BIN" -z 75s -c 2 -q 10 "http://127.0.0.1:$((base + 201))/" >/dev/null &
  "$HEY_BIN" -z 75s -c 1 -q 10 "http://127.0.0.1:$((base + 202))/" >/dev/null &
  target/release/meshcanary agent --listen "127.0.0.1:$((base + 400))" \
    --target "test/podinfo/primary=http://127.0.0.1:$((base + 101))" \
    --target "test/podinfo/canary=http://127.0.0.1:$((base + 102))" 2>"$work/agent.log" &
  pid=$!
  sleep 10
  ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
  t0=$(ticks); s0=$(date +%s.%N); sleep 60; t1=$(ticks); s1=$(date +%s.%N)
  hz=$(getconf CLK_TCK)
  rss=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  python3 -c "import sys; t0,t1,s0,s1,hz,rss=map(float,sys.argv[1:]); print(f'agent: {(t1-t0)/hz/(s1-s0):.4f} cores, peak RSS {rss/1024:.1f} MiB (2 Envoys, fast tier 1 s, full tier 15 s)')" "$t0" "$t1" "$s0" "$s1" "$hz" "$rss"
  exit 0
fi
if [ "$what" = controller ]; then
  eval "$(scripts/testenv.sh --kube)" >/dev/null
  cargo build --release --locked --bin meshcanary --example bench_controller >&2
  ulimit -n 65536 2>/dev/null || true
  last=""
  for size in ${SIZES:-50:10 200:10 1000:10 50:100 200:100 1000:100}; do
    a=${size%%:*} w=${size##*:}
    echo "bench: controller with $a agents, $w workloads" >&2
    line=$(target/release/examples/bench_controller --agents "$a" --workloads "$w" --seconds "${MEASURE_S:-30}" \
      --meshcanary target/release/meshcanary | tail -1)
    echo "$line"
    last=$line
  done
  # The headline, in the issue's form: the 1000 x 100 run.
  echo "$last" | sed -n 's/^\(controller at [0-9]* agents, [0-9]* workloads\): tick p50 [0-9]* ms, p99 \([0-9]*\) ms, \([0-9.]*\) cores.*/\1: tick p99 \2 ms, \3 cores/p'
  exit 0
fi
median_ns() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["median"]["point_estimate"])' "target/criterion/$1/new/estimates.json"; }

if [ "$what" = parse ] || [ "$what" = all ]; then
  cargo bench --bench parse -- --noplot >&2
  for fx in 1-cluster 10-clusters 50-clusters; do
    case $fx in 1-cluster) f=1;; 10-clusters) f=10;; 50-clusters) f=50;; esac
    bytes=$(wc -c <"tests/fixtures/envoy-1.40-${f}-clusters.prom")
    ours=$(median_ns "parse/meshcanary/$fx"); labels=$(median_ns "parse/meshcanary+labels/$fx")
    base=$(median_ns "parse/prometheus-parse/$fx")
    python3 - "$fx" "$bytes" "$ours" "$labels" "$base" <<'PY'
import sys
fx, size = sys.argv[1], int(sys.argv[2])
ours, labels, base = map(float, sys.argv[3:])
print(f"  {fx:12s} {size/1e3:5.0f} KB  meshcanary {size/ours*1e3:6.0f} MB/s (ratio {base/ours:4.1f})"
      f"  +labels {size/labels*1e3:6.0f} MB/s (ratio {base/labels:4.1f})  prometheus-parse {size/base*1e3:5.1f} MB/s")
PY
  done
  # The headline is the 500 KB (10 clusters) capture.
  bytes=$(wc -c <tests/fixtures/envoy-1.40-10-clusters.prom)
  ours=$(median_ns parse/meshcanary/10-clusters); base=$(median_ns parse/prometheus-parse/10-clusters)
  python3 -c "import sys; b,o,p=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); print(f'parse: {b/o*1e3:.0f} MB/s, prometheus-parse: {b/p*1e3:.0f} MB/s, ratio {p/o:.1f}')" "$bytes" "$ours" "$base"
fi
if [ "$what" = window ] || [ "$what" = all ]; then
  cargo bench --bench window -- --noplot >&2
  p=$(median_ns window/parse-only); w=$(median_ns window/scrape-to-window); s=$(median_ns window/summary)
  python3 -c "import sys; p,w,s=map(float,sys.argv[1:]); print(f'window: scrape-to-window {w/1e3:.2f} us per scrape (parse alone {p/1e3:.2f} us, ratio {w/p:.2f}); summary {s/1e3:.2f} us')" "$p" "$w" "$s"
fi
if [ "$what" = judge ] || [ "$what" = all ]; then
  cargo bench --bench judge -- --noplot >&2
  t=$(median_ns judge/threshold-only); b=$(median_ns judge/both)
  python3 -c "import sys; t,b=map(float,sys.argv[1:]); print(f'judge: {b:.0f} ns per call with the sequential tests (threshold-only {t:.0f} ns, ratio {b/t:.1f})')" "$t" "$b"
fi
if [ "$what" = encode ] || [ "$what" = all ]; then
  cargo bench --bench remote_write -- --noplot >"$(mktemp)" 2>&1
  kept=$(cargo bench --bench remote_write -- --list 2>/dev/null | sed -n 's/.*scrape: [0-9]* bytes, \([0-9]*\) samples kept.*/\1/p' | head -1)
  r=$(median_ns remote_write/reference); d=$(median_ns remote_write/direct)
  python3 -c "import sys; k,r,d=map(float,sys.argv[1:]); print(f'encode: {k/d*1e9/1e6:.2f} M samples/s direct ({k/r*1e9/1e6:.2f} M samples/s through owned TimeSeries + prost, ratio {r/d:.2f}), snappy included')" "$kept" "$r" "$d"
fi
