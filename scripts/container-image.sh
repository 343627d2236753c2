#!/usr/bin/env bash
# Builds the container image of the Dockerfile's runtime stage around a gatewarden
# binary built on this machine, without pulling anything: instead of the distroless
# base image, a root filesystem made FROM scratch holds exactly what the binary needs
# (the shared libraries `ldd` lists, at the same paths), the `nonroot` user (uid
# 65532) and the CA certificates. The rest of the stage (user, ports, entrypoint, the
# state and log directories) is taken from the Dockerfile as written.
#
#   bash scripts/container-image.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/gatewarden (build it with
# `cargo build --release --bin gatewarden`), TAG to localhost/gatewarden:local.
# CONTAINER_ENGINE=docker uses docker instead of podman.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
binary="${1:-$repo/target/release/gatewarden}"
tag="${2:-localhost/gatewarden:local}"
engine="${CONTAINER_ENGINE:-podman}"

if [ ! -x "$binary" ]; then
    echo "container-image.sh: no binary at $binary (cargo build --release --bin gatewarden)" >&2
    exit 1
fi
if ! command -v "$engine" >/dev/null 2>&1; then
    echo "container-image.sh: $engine not found (apt-get install podman)" >&2
    exit 1
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
rootfs="$ctx/rootfs"
mkdir -p "$rootfs/etc" "$rootfs/tmp" "$ctx/out"
chmod 1777 "$rootfs/tmp"

# The dynamic loader and every library, as ldd resolves them on this machine: the
# tokens of its output that are absolute paths (linux-vdso has none).
libs="$(ldd "$binary" | tr ' \t' '\n\n' | grep '^/' | sort -u)"
if [ -z "$libs" ]; then
    echo "container-image.sh: ldd lists no libraries for $binary" >&2
    exit 1
fi
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done

# What the distroless image provides besides the C runtime.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi

# What the build stage leaves in /out.
install -m 0755 "$binary" "$ctx/out/gatewarden"
install -d -m 0750 "$ctx/out/state" "$ctx/out/logs"

# The Dockerfile's last stage, from a local root filesystem instead of the base image
# and with the build stage's /out in the build context.
{
    echo "FROM scratch"
    echo "COPY rootfs/ /"
    awk '/^FROM /{stage = ""; next} {stage = stage $0 "\n"} END {printf "%s", stage}' \
        "$repo/Dockerfile" \
        | sed -E 's#^COPY --from=build (--chown=[^ ]+ )?/out/#COPY \1out/#'
} >"$ctx/Containerfile"
if grep -q -- '--from=' "$ctx/Containerfile"; then
    echo "container-image.sh: the Dockerfile's last stage copies from elsewhere than /out of the build stage:" >&2
    grep -- '--from=' "$ctx/Containerfile" >&2
    exit 1
fi

"$engine" build --quiet -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
echo "$tag"
