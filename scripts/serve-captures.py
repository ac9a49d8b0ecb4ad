"""Serve a real Envoy capture as /stats/prometheus on N loopback ports, like N sidecars.
A request with Envoy's `filter=` query gets only the inbound cluster's request and latency
series (what Envoy returns for meshcanary's fast tier). Used by scripts/bench-peers.sh.
Usage: serve-captures.py CAPTURE FIRST_PORT COUNT"""
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

capture, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
full = open(capture, "rb").read()
inbound = re.compile(rb"^envoy_cluster_(external_)?upstream_rq(_time_bucket|_time_sum|_time_count)?\{.*cds_ingress_")
fast = b"".join(line + b"\n" for line in full.splitlines() if inbound.match(line))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = fast if "filter=" in self.path else full
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


servers = [ThreadingHTTPServer(("127.0.0.1", first + i), Handler) for i in range(count)]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print(f"serving {len(full)} bytes ({len(fast)} filtered) on {count} ports from {first}", flush=True)
threading.Event().wait()
