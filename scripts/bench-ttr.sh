#!/usr/bin/env bash
# Time to rollback on the lab (examples/lab.rs): for each scenario in lab/bench-*.yaml, at least
# 10 runs on real components, from the moment the fault starts to (a) canary weight 0 in the
# VirtualRouter and (b) the last request the gateway Envoy sent the canary. Median and p95,
# next to Flagger's figure for the same scenario at the walkthrough's settings (from its rule)
# and the judge simulator's oracle (the information limit). A false rollback is a healthy
# run rolled back, or a faulty one rolled back before its fault started (out of all runs).
# Ends with: `havoc median ttr: <s> s, p95 <s> s, false rollbacks <n>/<runs>`.
#
# --router gateway-api runs the lab in its Istio and Gateway API shape (Istio-shaped sidecars,
# an HTTPRoute the gateway follows) instead of App Mesh's; the lines then say so. --statsd turns
# the sidecars' DogStatsD sink on (per-request latency into the agents); the lines say so too.
# The sidecars flush their stats every 5 s, Envoy's default (and App Mesh's and Istio's): that
# is when scraped histograms move (the lab's own default, for tests, is 1 s).
#
#   scripts/bench-ttr.sh [--runs N] [--router app-mesh|gateway-api] [--statsd] [scenario.yaml ...]
#   (about 30 minutes for the default)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh --kube)" >/dev/null
runs=()
files=()
router=app-mesh
statsd=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=(--runs "$2"); shift 2 ;;
    --router) router=$2; shift 2 ;;
    --statsd) statsd=(--statsd); shift ;;
    *) files+=("$1"); shift ;;
  esac
done
[ ${#files[@]} -gt 0 ] || files=(lab/bench-havoc.yaml lab/bench-errors-5pct.yaml lab/bench-latency-300ms.yaml lab/bench-latency-50ms.yaml lab/bench-leader-killed.yaml lab/bench-healthy.yaml)
cargo build --release --locked --bin meshcanary --example lab >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  name=$(basename "$f" .yaml)
  echo "bench-ttr: $name" >&2
  # A rollout that ends otherwise than expected is recorded, not fatal: it is a figure.
  target/release/examples/lab --scenario "$f" "${runs[@]}" --router "$router" "${statsd[@]}" --envoy-flush 5s --results "$out/$name.jsonl" \
    >"$out/$name.log" 2>&1 || true
  grep '^lab: run' "$out/$name.log" >&2 || { echo "bench-ttr: $name failed; its log:" >&2; tail -30 "$out/$name.log" >&2; }
done
oracle() { # canary_rps canary_event_probability
  target/release/meshcanary simulate --oracle-canary-rps "$1" --canary-event "$2" --primary-event 0.001 |
    sed -n 's/^oracle ttr median \([0-9.]*\) s, p95 \([0-9.]*\) s.*/\1 \2/p'
}
# Canary traffic at the fault: the apex's 40 rps times the weight, plus direct errors.
# havoc and leader-killed: 2 rps good + 5 rps of 5xx at weight 5; errors-5pct: 4 rps at 5 %;
# latency-300ms and latency-50ms: 4 rps, every one slower than the 250 ms (25 ms) edge, the
# primary's ~1 ms below it.
export ORACLE_HAVOC=$(oracle 7 0.714) ORACLE_5PCT=$(oracle 4 0.05) ORACLE_LATENCY=$(oracle 4 0.999)
python3 - "$out" "$router${statsd[*]:+, statsd sink on}" <<'PY'
import json, os, sys, glob, statistics
out, router_name = sys.argv[1], sys.argv[2]
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))] if xs else None
def fmt(x):
    return "n/a" if x is None else f"{x:.1f}"
# Flagger at the walkthrough's settings: a check every interval (60 s) on the last minute of
# data that lags the traffic by the 15 s scrape plus ~5 s of remote write and ingest; rollback
# at the check after the 5th failed one. From a fault at a uniformly random moment:
# ttr = U(0, 60) + 20 + 5 x 60, median 350 s, p95 377 s. Its default p99 <= 500 ms check
# never fails for +300 ms on a ~1 ms service: no rollback at all.
flagger = {"havoc": ("350", "377"), "errors-5pct": ("350", "377"),
           "latency-300ms": ("never", "never"), "latency-50ms": ("never", "never"), "leader-killed": ("350", "377")}
def oracle(var):
    v = os.environ.get(var, "").split()
    return (v[0], v[1]) if len(v) == 2 else ("n/a", "n/a")
oracles = {"havoc": oracle("ORACLE_HAVOC"), "leader-killed": oracle("ORACLE_HAVOC"),
           "errors-5pct": oracle("ORACLE_5PCT"), "latency-300ms": oracle("ORACLE_LATENCY"), "latency-50ms": oracle("ORACLE_LATENCY")}
rows, healthy_runs, false_rb, havoc = [], 0, 0, (None, None)
print(f"router: {router_name}")
print("| scenario | runs | as expected | router weight 0: median / p95 (s) | gateway stops: median / p95 (s) | Flagger (walkthrough settings): median / p95 (s) | oracle: median / p95 (s) |")
print("|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
    name = os.path.basename(path)[:-6]
    rs = [json.loads(l) for l in open(path) if l.strip()]
    scen = rs[0]["scenario"] if rs else name
    expected = {"promotion": "promoted", "rollback": "rolledback"}
    ok = sum(1 for r in rs if r["outcome"] == expected[r["expect"]] and not r["false_rollback"])
    # Every run is healthy until its fault starts (healthy runs throughout), so every run
    # can roll back falsely: out of all runs.
    healthy_runs += len(rs)
    false_rb += sum(1 for r in rs if r["false_rollback"])
    router = [r["ttr_router"] for r in rs if r["ttr_router"] is not None]
    gateway = [r["ttr_gateway"] for r in rs if r["ttr_gateway"] is not None]
    if scen == "havoc":
        havoc = (q(router, 0.5), q(router, 0.95))
    f = flagger.get(scen, ("-", "-"))
    o = oracles.get(scen, ("-", "-"))
    print(f"| {scen} | {len(rs)} | {ok} | {fmt(q(router, .5))} / {fmt(q(router, .95))} | {fmt(q(gateway, .5))} / {fmt(q(gateway, .95))} | {f[0]} / {f[1]} | {o[0]} / {o[1]} |")
print()
print(f"havoc median ttr: {fmt(havoc[0])} s, p95 {fmt(havoc[1])} s, false rollbacks {false_rb}/{healthy_runs} (router {router_name})")

PY
