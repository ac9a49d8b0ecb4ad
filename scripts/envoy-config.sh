#!/usr/bin/env bash
# Print an Envoy bootstrap shaped like an App Mesh sidecar: an ingress listener routing to the
# inbound cluster `cds_ingress_<mesh>_<vnode>_http_<app port>`, N egress clusters
# `cds_egress_<mesh>_<name>_http_<port>` (they only add stats, as a real sidecar's do), and the
# admin listener. The one place the tests, the demo and the fixture capture get Envoy config.
#
# With --istio-stats-port PORT it is shaped like an Istio sidecar instead: the inbound cluster
# is `inbound|<app port>||`, stats carry Istio's tag names (its bootstrap turns Envoy's
# default tags off: `cluster_name`, `response_code`), and a listener on PORT (Istio's 15090)
# serves the admin's /stats/prometheus, as Istio's `prometheus_stats` listener does.
#
# With --dogstatsd HOST:PORT the sidecar also sends its stats there through Envoy's DogStatsD
# sink (the agent's per-request latency listener); --pod-ip-tag IP adds the fixed tag
# `meshcanary.pod_ip:IP` that tells the agent which pod a datagram is from.
set -euo pipefail

admin_port=9901 ingress_port=15000 app_port=9898 mesh=mesh vnode=podinfo-primary egress=0
flush=5s addr=127.0.0.1 app_addr=127.0.0.1 egress_port=15001 istio_stats_port= statsd= pod_ip_tag=
while [ $# -gt 0 ]; do
  case "$1" in
    --admin-port) admin_port=$2; shift 2 ;;
    --ingress-port) ingress_port=$2; shift 2 ;;
    --app-port) app_port=$2; shift 2 ;;
    --app-addr) app_addr=$2; shift 2 ;;
    --addr) addr=$2; shift 2 ;;
    --egress-port) egress_port=$2; shift 2 ;;
    --mesh) mesh=$2; shift 2 ;;
    --vnode) vnode=$2; shift 2 ;;
    --egress) egress=$2; shift 2 ;;
    --flush) flush=$2; shift 2 ;;
    --istio-stats-port) istio_stats_port=$2; shift 2 ;;
    --dogstatsd) statsd=$2; shift 2 ;;
    --pod-ip-tag) pod_ip_tag=$2; shift 2 ;;
    *) echo "envoy-config.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
inbound="cds_ingress_${mesh}_${vnode}_http_${app_port}"
if [ -n "$istio_stats_port" ]; then
  inbound="inbound|${app_port}||"
fi

cat <<YAML
node: { id: "mesh/${mesh}/virtualNode/${vnode}", cluster: "mesh/${mesh}/virtualNode/${vnode}" }
stats_flush_interval: ${flush}
admin:
  address: { socket_address: { address: ${addr}, port_value: ${admin_port} } }
YAML
if [ -n "$istio_stats_port" ] || [ -n "$pod_ip_tag" ]; then
  echo "stats_config:"
fi
if [ -n "$istio_stats_port" ]; then
  cat <<'YAML'
  use_all_default_tags: false
  stats_tags:
  - tag_name: cluster_name
    regex: '^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)'
  - tag_name: tcp_prefix
    regex: '^tcp\.((.*?)\.)\w+?$'
  - tag_name: response_code
    regex: '_rq(_(\d{3}))$'
  - tag_name: response_code_class
    regex: '_rq(_(\dxx))$'
YAML
elif [ -n "$pod_ip_tag" ]; then
  echo "  stats_tags:"
fi
# A fixed tag naming the pod's address, for sinks whose datagrams all come from one address
# (sidecars on loopback, as in the lab; on a pod network the source address is the pod's).
if [ -n "$pod_ip_tag" ]; then
  echo "  - { tag_name: meshcanary.pod_ip, fixed_value: \"${pod_ip_tag}\" }"
fi
# Envoy's DogStatsD sink: every histogram value as it is recorded (one datagram per request
# for upstream_rq_time), counters and gauges at each flush. The App Mesh Envoy image writes
# the same block when ENABLE_ENVOY_DOG_STATSD=1 (address from STATSD_ADDRESS, STATSD_PORT).
if [ -n "$statsd" ]; then
  cat <<YAML
stats_sinks:
- name: envoy.stat_sinks.dog_statsd
  typed_config:
    "@type": type.googleapis.com/envoy.config.metrics.v3.DogStatsdSink
    address: { socket_address: { protocol: UDP, address: ${statsd%:*}, port_value: ${statsd##*:} } }
YAML
fi
cat <<YAML
static_resources:
  listeners:
  - name: lds_ingress_${addr}_${ingress_port}
    address: { socket_address: { address: ${addr}, port_value: ${ingress_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: rds_ingress_${addr}_${ingress_port}
            virtual_hosts:
            - name: ingress
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: "${inbound}", timeout: 30s }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
YAML
if [ -n "$istio_stats_port" ]; then
  cat <<YAML
  - name: prometheus_stats
    address: { socket_address: { address: ${addr}, port_value: ${istio_stats_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: stats
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: { prefix: /stats/prometheus }
                route: { cluster: prometheus_stats }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
YAML
fi
if [ "$egress" -gt 0 ]; then
  # An egress listener with one virtual host per backend, as App Mesh writes for each backend.
  cat <<YAML
  - name: lds_egress_${addr}_15001
    address: { socket_address: { address: ${addr}, port_value: ${egress_port} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          route_config:
            name: rds_egress_http_15001
            virtual_hosts:
YAML
  for i in $(seq 1 "$egress"); do
    cat <<YAML
            - name: backend-${i}
              domains: ["backend-${i}", "backend-${i}.local"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: cds_egress_${mesh}_backend-${i}_http_$((8000 + i)) }
YAML
  done
  cat <<YAML
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
YAML
fi
cat <<YAML
  clusters:
  - name: "${inbound}"
    connect_timeout: 1s
    track_cluster_stats: { timeout_budgets: true, request_response_sizes: true }
    type: STATIC
    load_assignment:
      cluster_name: "${inbound}"
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${app_addr}, port_value: ${app_port} } } }
YAML
if [ -n "$istio_stats_port" ]; then
  cat <<YAML
  - name: prometheus_stats
    connect_timeout: 0.25s
    type: STATIC
    load_assignment:
      cluster_name: prometheus_stats
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${addr}, port_value: ${admin_port} } } }
YAML
fi
for i in $(seq 1 "$egress"); do
  name="cds_egress_${mesh}_backend-${i}_http_$((8000 + i))"
  cat <<YAML
  - name: ${name}
    connect_timeout: 0.25s
    track_cluster_stats: { timeout_budgets: true, request_response_sizes: true }
    type: STATIC
    load_assignment:
      cluster_name: ${name}
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $((8000 + i)) } } }
YAML
done
