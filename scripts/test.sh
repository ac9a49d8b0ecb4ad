#!/usr/bin/env bash
# Install the test dependencies (idempotent, cached under ~/.cache/meshcanary) and run every
# test: unit tests, the real-Envoy integration tests, the parser comparison with Python's
# prometheus_client, property tests, and the doc/reference-table checks.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/testenv.sh)"
cargo test --locked "$@"
