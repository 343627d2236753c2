# Gatewarden in a container: built from source in a Rust image, run from a distroless
# image with nothing in it but the C runtime (no shell, no package manager).
#
#   docker build -t gatewarden .                 # or: podman build -t gatewarden .
#   docker run --rm --read-only -p 8080:8080 \
#       -v ./gatewarden.yaml:/etc/gatewarden/gatewarden.yaml:ro gatewarden
#
# The image runs as uid 65532 ("nonroot") and writes nothing to its own filesystem, so
# it runs with a read-only root. It holds no config: mount one at
# /etc/gatewarden/gatewarden.yaml (the compose file and the Kubernetes kit in deploy/
# do). Mount a volume at /var/lib/gatewarden for a keys file (`api_key` with
# `keys_file`, which records last use next to the file) and at /var/log/gatewarden
# for audit or access log files; with `store: redis` and logs on stdout, nothing needs
# to be writable. There is no HEALTHCHECK: without a shell or curl the image cannot
# probe itself. Orchestrators probe GET /healthz on the admin port (9091), or on the
# proxy port when `health_path` is on. See docs/src/deployment.md.
#
# scripts/container-image.sh builds the same runtime stage from a binary built on the
# host, without pulling any image (the tests run it).

FROM docker.io/library/rust:1-bookworm AS build
# cmake builds Pingora's vendored C dependencies; the rest of the toolchain (gcc, make,
# perl for the vendored OpenSSL) is in the Rust image already.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin gatewarden \
    && install -D -m 0755 target/release/gatewarden /out/gatewarden \
    && install -d -m 0750 /out/state /out/logs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/gatewarden /usr/local/bin/gatewarden
# Empty, owned by nonroot: a named volume mounted here starts out writable by it.
COPY --from=build --chown=65532:65532 /out/state/ /var/lib/gatewarden/
COPY --from=build --chown=65532:65532 /out/logs/ /var/log/gatewarden/
WORKDIR /etc/gatewarden
USER 65532:65532
# 8080: the proxy listener; 9091: the admin listener (/healthz, /metrics, /admin),
# never to be published beyond the host or the cluster.
EXPOSE 8080 9091
ENTRYPOINT ["/usr/local/bin/gatewarden"]
CMD ["run", "-c", "/etc/gatewarden/gatewarden.yaml"]
