#!/usr/bin/env bash
# Builds gatewarden with profile-guided optimisation (PGO) and, where llvm-bolt is
# installed, a BOLT pass on top, for deployments where CPU per request matters:
#
#   1. an instrumented release build (target/pgo-gen),
#   2. a training run: benches/load.sh drives it with the empty chain, the full chain
#      and css_inject on /small, /64k and /page.html (loopback only),
#   3. the release build that uses the recorded profile (target/pgo),
#   4. BOLT: the same training run against a BOLT-instrumented copy of that binary,
#      then llvm-bolt lays its code out from what ran (skipped without llvm-bolt, or
#      with PGO_BOLT=0).
#
#   bash scripts/pgo-build.sh                  # the binary: target/pgo/gatewarden
#   PGO_TRAIN_DURATION=10s bash scripts/pgo-build.sh
#
# Needs what the load script needs (wrk, nginx, haproxy, curl: `bash scripts/setup.sh
# --bench`) and an llvm-profdata that reads the profiles of this rustc's LLVM. On
# Debian 12 that is llvm-19's, and llvm-bolt comes from bolt-19 (both: `bash
# scripts/setup.sh --pgo`); rustup's `llvm-tools` component has a matching
# llvm-profdata too. LLVM_PROFDATA=path and LLVM_BOLT=path pick others. Two full
# release builds: about 20 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

train_duration=${PGO_TRAIN_DURATION:-5s}
profiles="$root/target/pgo-profiles"
output="$root/target/pgo/gatewarden"
host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
llvm_bins=$(ls -d /usr/lib/llvm-*/bin 2>/dev/null | sort -t- -k2 -rn || true)

# The newest llvm-profdata that can merge this rustc's raw profiles. An older LLVM
# refuses them ("unsupported instrumentation profile format version"), which shows
# only at the merge, so step 2's result is checked with each candidate in turn.
candidates=()
[ -n "${LLVM_PROFDATA:-}" ] && candidates+=("$LLVM_PROFDATA")
sysroot_tool=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)
[ -n "$sysroot_tool" ] && candidates+=("$sysroot_tool")
for dir in $llvm_bins; do
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

# llvm-bolt, and merge-fdata from the same LLVM.
bolt=""
if [ "${PGO_BOLT:-1}" != 0 ]; then
    bolt=${LLVM_BOLT:-}
    if [ -z "$bolt" ]; then
        for dir in $llvm_bins; do
            if [ -x "$dir/llvm-bolt" ] && [ -x "$dir/merge-fdata" ]; then
                bolt="$dir/llvm-bolt"
                break
            fi
        done
    fi
    if [ -z "$bolt" ]; then
        echo "(no llvm-bolt found: PGO only; bash scripts/setup.sh --pgo installs it)"
    elif [ ! -x "$(dirname "$bolt")/merge-fdata" ]; then
        echo "pgo-build.sh: $(dirname "$bolt")/merge-fdata not found next to $bolt" >&2
        exit 1
    fi
fi

# RUSTFLAGS reach only the gatewarden build itself with an explicit --target, not the
# build scripts and proc macros cargo runs on the way. Both builds must use the same
# form: symbol names differ between the two, and a profile matches only its own.
build() {
    local target_dir=$1 flags=$2
    RUSTFLAGS="${RUSTFLAGS:-} $flags" nice cargo build --release --bin gatewarden \
        --target "$host" --target-dir "$target_dir"
}

# The load bench's gatewarden targets, against binary $1.
train() {
    GW_BIN=$1 ROUNDS=1 WRK_DURATION="$train_duration" \
        TARGETS="gw-empty gw-chain gw-css" WORKLOADS="" bash benches/load.sh
}

echo "== 1/4 instrumented build (rustc's LLVM $llvm_major)"
rm -rf "$profiles"
mkdir -p "$profiles"
build "$root/target/pgo-gen" "-Cprofile-generate=$profiles"

echo "== 2/4 training run ($train_duration per target and path)"
train "$root/target/pgo-gen/$host/release/gatewarden"
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

echo "== 3/4 optimised build"
# BOLT rewrites a binary only with its relocations kept.
relocs=""
[ -n "$bolt" ] && relocs="-Clink-arg=-Wl,--emit-relocs"
build "$root/target/pgo" "-Cprofile-use=$merged $relocs"
pgo_bin="$root/target/pgo/$host/release/gatewarden"

if [ -z "$bolt" ]; then
    cp "$pgo_bin" "$output"
    echo "pgo-build.sh: $output"
    exit 0
fi

echo "== 4/4 BOLT with $bolt"
bolt_dir="$root/target/pgo/bolt"
rm -rf "$bolt_dir"
mkdir -p "$bolt_dir"
# Each process writes its own file when it exits (the training starts three gateways).
"$bolt" "$pgo_bin" -instrument -o "$bolt_dir/gatewarden-instrumented" \
    -instrumentation-file="$bolt_dir/profile" -instrumentation-file-append-pid
train "$bolt_dir/gatewarden-instrumented"
fdata=("$bolt_dir"/profile.*.fdata)
if [ "${#fdata[@]}" -eq 0 ]; then
    echo "pgo-build.sh: the BOLT training run left no profile in $bolt_dir" >&2
    exit 1
fi
"$(dirname "$bolt")/merge-fdata" "${fdata[@]}" >"$bolt_dir/profile.fdata"
"$bolt" "$pgo_bin" -o "$output" -data="$bolt_dir/profile.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold \
    -split-eh -icf=1 -use-gnu-stack
echo "pgo-build.sh: $output"
