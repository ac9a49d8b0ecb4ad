# The agent's image: `meshcanary/meshcanary:<version>` (manifests/daemonset.yaml names 0.1.0).
#
#   docker build -t meshcanary/meshcanary:0.1.0 .
#
# Stage 1 builds the one binary with the `dist` profile (release plus whole-program
# optimisation, what `scripts/bench-peers.sh` measures); stage 2
# is distroless (glibc and CA certificates, no shell, no package manager) running as the
# non-root user 65532, which the DaemonSet also sets, with a read-only root filesystem (the
# only writable path is the remote-write queue volume at /var/lib/meshcanary).
FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
# Cargo checks that every declared target exists, so the benches and examples come along;
# only the binary is built.
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY examples examples
RUN cargo build --profile dist --locked --bin meshcanary \
 && strip target/dist/meshcanary

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/meshcanary /usr/local/bin/meshcanary
USER 65532:65532
# 9102: /metrics, /healthz, /readyz. 9103: windows for the leader (token-checked).
EXPOSE 9102 9103 8125/udp
ENTRYPOINT ["/usr/local/bin/meshcanary"]
CMD ["agent"]
