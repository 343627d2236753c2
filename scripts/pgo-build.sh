#!/usr/bin/env bash
# Builds gatewarden with profile-guided optimisation (PGO), for deployments where CPU
# per request matters:
#
#   1. an instrumented release build (target/pgo-gen),
#   2. a training run: benches/load.sh drives it with the empty chain, the full chain
#      and css_inject on /small, /64k and /page.html (loopback only),
#   3. the release build that uses the recorded profile (target/pgo).
#
#   bash scripts/pgo-build.sh                  # prints the path of the binary at the end
#   PGO_TRAIN_DURATION=10s bash scripts/pgo-build.sh
#
# Needs what the load script needs (wrk, nginx, haproxy, curl: `bash scripts/setup.sh
# --bench`) and an llvm-profdata that reads the profiles of this rustc's LLVM. On
# Debian 12 that is llvm-19's (`bash scripts/setup.sh --pgo`); rustup's `llvm-tools`
# component works too. LLVM_PROFDATA=path picks one. Two full release builds: about
# 20 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

train_duration=${PGO_TRAIN_DURATION:-5s}
profiles="$root/target/pgo-profiles"
host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')

# The newest llvm-profdata that can merge this rustc's raw profiles. An older LLVM
# refuses them ("unsupported instrumentation profile format version"), which shows
# only at the merge, so step 2's result is checked with each candidate in turn.
candidates=()
[ -n "${LLVM_PROFDATA:-}" ] && candidates+=("$LLVM_PROFDATA")
sysroot_tool=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
[ -n "$sysroot_tool" ] && candidates+=("$sysroot_tool")
for dir in $(ls -d /usr/lib/llvm-*/bin 2>/dev/null | sort -t- -k2 -rn); do
    [ -x "$dir/llvm-profdata" ] && candidates+=("$dir/llvm-profdata")
done
if [ "${#candidates[@]}" -eq 0 ]; then
    echo "pgo-build.sh: no llvm-profdata found; install llvm-19 (bash scripts/setup.sh --pgo)" \
        "or set LLVM_PROFDATA" >&2
    exit 1
fi
for tool in wrk nginx haproxy curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "pgo-build.sh: $tool not found; the training run (benches/load.sh) needs it" \
            "(bash scripts/setup.sh --bench)" >&2
        exit 1
    fi
done

# RUSTFLAGS reach only the gatewarden build itself with an explicit --target, not the
# build scripts and proc macros cargo runs on the way.
build() {
    local target_dir=$1 flag=$2
    RUSTFLAGS="${RUSTFLAGS:-} $flag" nice cargo build --release --bin gatewarden \
        --target "$host" --target-dir "$target_dir"
}

echo "== 1/3 instrumented build (rustc's LLVM $llvm_major)"
rm -rf "$profiles"
mkdir -p "$profiles"
build "$root/target/pgo-gen" "-Cprofile-generate=$profiles"

echo "== 2/3 training run ($train_duration per target and path)"
GW_BIN="$root/target/pgo-gen/$host/release/gatewarden" ROUNDS=1 \
    WRK_DURATION="$train_duration" TARGETS="gw-empty-ws gw-chain-ws gw-css-ws" \
    bash benches/load.sh
merged="$profiles/gatewarden.profdata"
shopt -s nullglob
raw=("$profiles"/*.profraw)
if [ "${#raw[@]}" -eq 0 ]; then
    echo "pgo-build.sh: the training run left no profile in $profiles" >&2
    exit 1
fi
for tool in "${candidates[@]}"; do
    if "$tool" merge -o "$merged" "${raw[@]}" 2>/dev/null; then
        echo "merged ${#raw[@]} profile(s) with $tool"
        break
    fi
    echo "($tool cannot read these profiles; trying the next)"
done
if [ ! -s "$merged" ]; then
    echo "pgo-build.sh: no llvm-profdata here reads LLVM $llvm_major's profiles" \
        "(tried: ${candidates[*]}); install a newer LLVM or rustup's llvm-tools" >&2
    exit 1
fi

echo "== 3/3 optimised build"
build "$root/target/pgo" "-Cprofile-use=$merged"
echo "pgo-build.sh: $root/target/pgo/$host/release/gatewarden"
