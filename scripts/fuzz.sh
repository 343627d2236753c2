#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while each, one after another, and prints
# per target the executions, their rate, the corpus size and whether it ran clean.
#
#   bash scripts/fuzz.sh                      # every target, 600 s each
#   bash scripts/fuzz.sh 60                   # every target, 60 s each
#   bash scripts/fuzz.sh 600 css_inject       # some targets only
#   bash scripts/fuzz.sh --install-cargo-fuzz # first `cargo install cargo-fuzz --locked`
#   bash scripts/fuzz.sh --sanitizer none     # without AddressSanitizer (faster)
#
# Needs cargo-fuzz and a C++ compiler (libFuzzer is built from source). Nothing is
# installed unless --install-cargo-fuzz is given. No nightly toolchain is needed: the
# stable compiler is run with RUSTC_BOOTSTRAP=1 for the -Z flags cargo-fuzz passes.
# Runs niced (nice -n 19). Corpora grow in fuzz/corpus/<target> (git-ignored), seeded
# from fuzz/seeds/<target>; a crash leaves its input in fuzz/artifacts/<target>/ and
# makes the script exit 1 after the remaining targets have run.
set -euo pipefail

install=0
sanitizer=address
seconds=600
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --install-cargo-fuzz) install=1 ;;
        --sanitizer)
            sanitizer="${2:?--sanitizer needs a value: address or none}"
            shift
            ;;
        -h|--help)
            sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        [0-9]*) seconds="$1" ;;
        -*)
            echo "fuzz.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *) targets+=("$1") ;;
    esac
    shift
done

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    if [ "$install" = 1 ]; then
        cargo install cargo-fuzz --locked
    else
        echo "fuzz.sh: cargo-fuzz is not installed; run with --install-cargo-fuzz or 'cargo install cargo-fuzz --locked'" >&2
        exit 2
    fi
fi

if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

export RUSTC_BOOTSTRAP=1
# One build of every target first, so that the time limits are spent fuzzing.
nice -n 19 cargo fuzz build -O --sanitizer "$sanitizer"

status=0
printf '%-16s %8s %14s %10s %8s  %s\n' target seconds executions exec/s corpus result
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/fuzz.log"
    started=$(date +%s)
    if nice -n 19 cargo fuzz run -O --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" \
        -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        result=clean
    else
        result="FAILED (see fuzz/$log and fuzz/artifacts/$t/)"
        status=1
    fi
    elapsed=$(($(date +%s) - started))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    printf '%-16s %8s %14s %10s %8s  %s\n' "$t" "$elapsed" "${execs:-?}" "${rate:-?}" "$corpus" "$result"
done
exit $status
