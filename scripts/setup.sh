#!/usr/bin/env bash
# Installs what building and testing gatewarden needs on Debian 12: Debian's own
# packages, plus mdBook (crates.io), Python tools (PyPI: openai, check-jsonschema,
# detect-secrets, kubernetes-validate) and the test OpenID provider (npm). Idempotent:
# what is installed already is not touched, and when nothing is missing no network is
# used at all.
#
#   bash scripts/setup.sh            # build + test dependencies
#   bash scripts/setup.sh --bench    # also wrk, nginx (with its Lua module), haproxy, caddy, valgrind (and linux-perf if available)
#   bash scripts/setup.sh --pgo      # also llvm-19 and bolt-19, for scripts/pgo-build.sh
set -euo pipefail

bench=0
pgo=0
for arg in "$@"; do
    case "$arg" in
        --bench) bench=1 ;;
        --pgo) pgo=1 ;;
        -h|--help)
            sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument $arg (use --bench, --pgo or --help)" >&2
            exit 2
            ;;
    esac
done

# cmake and a C toolchain build Pingora's vendored dependencies; libssl-dev and
# pkg-config its OpenSSL binding; redis-server runs the Redis-backed tests; chromium
# runs the login page test in a real (headless) browser; curl is for trying the
# gateway by hand; podman and runc build and run the container image
# (tests/it/container.rs).
packages=(build-essential cmake pkg-config libssl-dev redis-server chromium curl podman runc)
if [ "$bench" = 1 ]; then
    packages+=(wrk nginx haproxy valgrind caddy libnginx-mod-http-lua)
fi
if [ "$pgo" = 1 ]; then
    packages+=(llvm-19 bolt-19)
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    sudo=()
fi

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
want_perf=0
if [ "$bench" = 1 ] && ! installed linux-perf; then
    want_perf=1
fi

if [ "${#missing[@]}" -gt 0 ] || [ "$want_perf" = 1 ]; then
    if [ "$(id -u)" -ne 0 ] && [ "${#sudo[@]}" -eq 0 ]; then
        echo "setup.sh: missing ${missing[*]}; run as root or install sudo" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    # linux-perf is not in every Debian mirror or architecture; skip it quietly if absent.
    if [ "$want_perf" = 1 ] && apt-cache show linux-perf >/dev/null 2>&1; then
        missing+=(linux-perf)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup.sh: installing ${missing[*]}"
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
else
    echo "setup.sh: all packages present (${packages[*]})"
fi

# Rust itself does not come from apt: Debian 12's rustc is older than the 1.82 this
# project needs. rustup (or any install of Rust >= 1.82 with rustfmt and clippy) works.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found; install Rust >= 1.82 with rustfmt and clippy (e.g. via rustup)" >&2
    exit 1
fi
for tool in rustfmt cargo-clippy; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "setup.sh: $tool not found; add it (rustup component add ${tool#cargo-})" >&2
        exit 1
    fi
done
echo "setup.sh: $(cargo --version)"

# mdBook builds the book in docs/ (scripts/test.sh checks it). Not in Debian 12's
# packages at a usable version: from crates.io, pinned, only when missing.
mdbook_version=0.4.52
mdbook_bin="$(command -v mdbook || true)"
if [ -z "$mdbook_bin" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/mdbook" ]; then
    mdbook_bin="${CARGO_HOME:-$HOME/.cargo}/bin/mdbook"
fi
if [ -z "$mdbook_bin" ] || ! "$mdbook_bin" --version | grep -q '^mdbook v0\.4\.'; then
    echo "setup.sh: installing mdbook $mdbook_version (cargo install)"
    cargo install mdbook --locked --version "$mdbook_version"
    mdbook_bin="${CARGO_HOME:-$HOME/.cargo}/bin/mdbook"
fi
echo "setup.sh: $("$mdbook_bin" --version)"

# The official `openai` Python package, for the test that streams a chat completion
# through the gateway with it (tests/it/llm_route.rs). From PyPI, only when missing.
if ! command -v python3 >/dev/null 2>&1; then
    echo "setup.sh: python3 not found; the openai client test needs it" >&2
    exit 1
fi
pip_install() {
    local pip=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses installs outside a venv (PEP 668) unless told.
    "${pip[@]}" "$@" || "${pip[@]}" --break-system-packages "$@"
}
if ! python3 -c 'import openai' >/dev/null 2>&1; then
    echo "setup.sh: installing the openai Python package"
    pip_install openai
fi
echo "setup.sh: openai $(python3 -c 'import openai; print(openai.__version__)')"

# The OTLP protobuf definitions, which the tracing tests' collector decodes the
# gateway's spans with (tests/it/tracing.rs). From PyPI, only when missing.
if ! python3 -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2' >/dev/null 2>&1; then
    echo "setup.sh: installing the opentelemetry-proto Python package"
    pip_install opentelemetry-proto
fi
echo "setup.sh: opentelemetry-proto $(python3 -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"

# check-jsonschema, the validator the schema test checks conf/ against
# (tests/it/schema.rs). From PyPI, only when missing.
if ! command -v check-jsonschema >/dev/null 2>&1; then
    echo "setup.sh: installing check-jsonschema"
    pip_install check-jsonschema
fi
echo "setup.sh: $(check-jsonschema --version)"

# detect-secrets, the secret scan of scripts/test.sh, and kubernetes-validate, which
# checks the Kubernetes manifests of deploy/kubernetes against the API's schemas (it
# carries them, so it needs no cluster and no network). From PyPI, pinned: the scan's
# baseline and the schema versions depend on them.
for pinned in detect-secrets==1.5.0 kubernetes-validate==1.37.0; do
    name="${pinned%%==*}"
    if [ "$(python3 -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')" != "${pinned##*==}" ]; then
        echo "setup.sh: installing $pinned"
        pip_install "$pinned"
    fi
done
echo "setup.sh: detect-secrets $(detect-secrets --version), kubernetes-validate $(kubernetes-validate --version)"

# The OpenID provider the oidc tests log in at (tests/it/oidc.rs): the `oidc-provider`
# npm package, pinned by tests/oidc-provider/package-lock.json. Node and npm come from
# Debian when missing; the package from the npm registry, only when not installed yet.
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] && [ "${#sudo[@]}" -eq 0 ]; then
        echo "setup.sh: node and npm are missing; run as root or install them" >&2
        exit 1
    fi
    echo "setup.sh: installing nodejs and npm"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends nodejs npm
fi
provider_dir="$repo_root/tests/oidc-provider"
if [ ! -d "$provider_dir/node_modules/oidc-provider" ] \
    || [ "$provider_dir/package-lock.json" -nt "$provider_dir/node_modules/.package-lock.json" ]; then
    echo "setup.sh: installing the test OpenID provider (npm ci)"
    npm ci --prefix "$provider_dir" --no-audit --no-fund --loglevel=error
fi
echo "setup.sh: node $(node --version), oidc-provider $(node -p "require('$provider_dir/node_modules/oidc-provider/package.json').version")"
