#!/usr/bin/env bash
# Benchmarks, each against a baseline measured in the same run (medians from criterion).
#   scripts/bench.sh parse    parser vs prometheus-parse on real Envoy captures
#   scripts/bench.sh window   per-scrape window update vs parsing alone
#   scripts/bench.sh          both
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
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
