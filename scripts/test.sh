#!/usr/bin/env bash
# Install the test dependencies (idempotent, cached under ~/.cache/meshcanary) and run every
# test: unit tests, the real-Envoy integration tests, the parser comparison with Python's
# prometheus_client, property tests, the doc/reference-table checks, and the controller tests
# against a real kube-apiserver + kube-controller-manager (built once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh --kube)"
cargo test --locked "$@"
