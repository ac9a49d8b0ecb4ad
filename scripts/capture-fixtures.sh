#!/usr/bin/env bash
# Capture parser fixtures from a real Envoy 1.40: a sidecar with 1, 10 and 50 egress clusters
# (about 180 KB, 500 KB and 1.9 MB of /stats/prometheus), after some real traffic through the
# inbound cluster so per-code and histogram series exist. Writes tests/fixtures/envoy-1.40-*.prom.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# A trivial upstream: Python's http.server answers 200 for / and 404 for anything else.
"$PYTHON_BIN" -m http.server 29898 --bind 127.0.0.1 --directory "$work" >/dev/null 2>&1 &
for n in 1 10 50; do
  scripts/envoy-config.sh --admin-port 29901 --ingress-port 29000 --app-port 29898 \
    --egress "$n" --egress-port 29001 --flush 1s --vnode podinfo-primary >"$work/envoy.yaml"
  "$ENVOY_BIN" -c "$work/envoy.yaml" --base-id 29 -l error >"$work/envoy.log" 2>&1 &
  envoy_pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:29901/ready && break; sleep 0.1; done
  "$HEY_BIN" -n 200 -c 4 http://127.0.0.1:29000/ >/dev/null
  "$HEY_BIN" -n 10 -c 1 http://127.0.0.1:29000/missing >/dev/null
  # One request per backend through the egress listener (they answer 503: nobody listens).
  for i in $(seq 1 "$n"); do curl -s -o /dev/null -H "Host: backend-$i" http://127.0.0.1:29001/ || true; done
  sleep 2 # let a stats flush fold the latencies into the histograms
  curl -sf http://127.0.0.1:29901/stats/prometheus >"tests/fixtures/envoy-1.40-${n}-clusters.prom"
  kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true
  echo "captured tests/fixtures/envoy-1.40-${n}-clusters.prom ($(wc -c <"tests/fixtures/envoy-1.40-${n}-clusters.prom") bytes)"
done
