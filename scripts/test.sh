#!/usr/bin/env bash
# The whole check that CI runs: dependencies, formatting, lints, build, every test,
# then the integration suite once more against the release binary. Timing bugs can
# hide in the debug build: a graceful-upgrade race once showed only in release
# builds. The release build costs about seven minutes from clean on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --workspace -- -D warnings
echo "== mdbook build docs"
if ! command -v mdbook >/dev/null 2>&1; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
mdbook build docs
echo "== book links"
python3 scripts/check-book-links.py
echo "== secret scan"
bash scripts/secret-scan.sh
echo "== cargo build"
cargo build --workspace --all-targets
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Runs a command with its output shown and kept for the summary; fails as it fails.
logged() {
    set +e
    "$@" 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    set -e
    return "$code"
}
status=0

echo "== cargo test" | tee -a "$log"
# --no-fail-fast: one failing test binary must not hide the results of the others.
logged cargo test --workspace --no-fail-fast || status=$?

echo "== cargo build --release"
cargo build --release --bin gatewarden
echo "== cargo test --test it, against the release binary" | tee -a "$log"
logged env GATEWARDEN_BIN="$PWD/target/release/gatewarden" \
    cargo test --test it --no-fail-fast || status=$?

# Shards change how listeners are built and handed over: the tests of upgrades,
# reloads, stops, TLS, HTTP/2, WebSockets, proxying and traffic control run once more
# with every test config served by two shards (tests/support/config.rs). A minute or
# two on two cores.
echo "== cargo test --test it, release binary, two shards per listener" | tee -a "$log"
logged env GATEWARDEN_BIN="$PWD/target/release/gatewarden" GATEWARDEN_TEST_SHARDS=2 \
    cargo test --test it --no-fail-fast -- \
    operations:: proxying:: websocket:: traffic:: shards:: \
    upstreams::tls_listener hostile::the_rules_hold_over_http2 identity::over_tls \
    || status=$?

echo "== summary"
grep -E '^== |^\s*Running |^\s*Doc-tests |^test result:' "$log" || true
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) ignored += $i
        }
     }
     END { printf "total: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
exit "$status"
