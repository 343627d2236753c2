#!/usr/bin/env bash
# Load bench: the same upstreams behind gatewarden (empty chain; the full chain of
# api_key + rate_limit + origin + headers on a route that needs a user; css_inject on
# HTML), nginx, HAProxy, Caddy, Caddy with forward_auth to an auth endpoint (the
# Authelia / oauth2-proxy pattern), nginx checking the API key in Lua (the work of
# api_key), and reached directly, all on this machine in one run, each
# driven by wrk with the same settings and the same request (every request carries the
# bench's API key). Prints requests/s, latency percentiles, proxy CPU per 100k requests,
# and every ratio against nginx; then, through the same proxies, the delay added to
# server-sent events (benches/sse_delay.rs), WebSocket echo round trips
# (benches/ws_echo.rs) and the memory of 10,000 idle connections (benches/idle_conns.rs).
#
#   bash benches/load.sh                          # defaults below
#   WRK_CONNS=128 WRK_DURATION=20s ROUNDS=3 bash benches/load.sh
#   PERF=1 bash benches/load.sh                   # also a perf profile of gatewarden
#
# Settings (environment):
#   WRK_THREADS=2 WRK_CONNS=64 WRK_DURATION=10s   wrk -t/-c/-d, the same for every target
#   ROUNDS=2               rounds; the target order alternates between rounds
#   PROXY_THREADS=2        gatewarden threads, nginx workers, haproxy nbthread
#   UPSTREAM_WORKERS=1     nginx workers of the shared upstream
#   WORK_STEALING="true"   gatewarden variants to run ("true false" adds the -nows
#                          targets: server.work_stealing false)
#   GW_SHARDS=N            adds the -shard targets: the default binary with
#                          server.shards N (one single-threaded shard per CPU: N=auto)
#   GW_OFF="client_loop write_gathering case_map"   adds, for each piece of performance
#                          plumbing named, the -off-NAME targets: the default binary with
#                          that piece turned off (GATEWARDEN_BENCH_OFF, src/plumbing/switches.rs)
#   GW_PGO_BIN=path        adds the -pgo targets: this binary (scripts/pgo-build.sh
#                          makes one at target/pgo/gatewarden) with the same configs
#   WORKLOADS="sse ws idle" the workloads after the wrk runs ("" skips them): event
#                          stream delay, WebSocket echo, memory with IDLE_CONNS (10000)
#                          idle connections; their knobs are the benches' own
#                          (SSE_EVENTS, WS_CONNS, WS_MESSAGES, IDLE_CONNS, ...)
#   BENCH_PATHS="/small /64k /page.html"   "ok\n", a 64 KiB body, a 16 KiB HTML page
#                          (the css_inject target runs on the page only)
#   BASE_PORT=18400        fixed loopback ports BASE_PORT.. are used (checked free first)
#   TARGETS="..."          only these targets (names as printed)
#   PERF=1                 perf record -g on the gatewarden chain target after the rounds
#   KEEP_TMP=1             keep the temp dir with configs, logs and raw wrk output
#   GW_BIN=path            the gatewarden binary (default target/release/gatewarden)
#   PLAIN_PINGORA_BIN=path adds target `pingora`: a Pingora proxy with no filters at all,
#                          run as `PATH LISTEN UPSTREAM THREADS` (source in BENCHMARKS.md)
#   SOAK_REQUESTS=N        soak instead of comparing: drive the full-chain gatewarden on
#                          /small in SOAK_SLICE (default 10s) wrk slices until N requests
#                          are done, print the gateway's RSS after every slice, and fail
#                          on any error or on RSS growing more than SOAK_RSS_SLACK_MIB
#                          (default 8) after the first slice (the warm-up)
#   CALLGRIND=1            count instructions instead of timing: run nginx (as one process),
#                          the gatewarden targets and `pingora` under valgrind's callgrind
#                          and print the user-space instructions each spends per request
#                          on each path, and the ratio to nginx's
#                          (wrk -t1 -c$CALLGRIND_CONNS, default 8, for CALLGRIND_DURATION,
#                          default 10s, after a 3 s warm-up). Unlike req/s, the count
#                          barely moves with other load on the box, so it can show a change
#                          of a few percent. Kernel time is not in it, and valgrind counts
#                          each byte of a large `rep movsb` copy as one instruction (the
#                          ~10 KiB move of Pingora's per-request future shows up as ~10 000).
#                          KEEP_TMP=1 keeps the profiles for callgrind_annotate.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONF="$ROOT/benches/conf"
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-64}
WRK_DURATION=${WRK_DURATION:-10s}
ROUNDS=${ROUNDS:-2}
PROXY_THREADS=${PROXY_THREADS:-2}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-1}
WORK_STEALING=${WORK_STEALING-true}
GW_PGO_BIN=${GW_PGO_BIN:-}
GW_SHARDS=${GW_SHARDS:-}
GW_OFF=${GW_OFF:-}
WORKLOADS=${WORKLOADS-sse ws idle}
BENCH_PATHS=${BENCH_PATHS:-"/small /64k /page.html"}
HTML_PATH=/page.html
BASE_PORT=${BASE_PORT:-18400}
TARGETS=${TARGETS:-}
PERF=${PERF:-0}
KEEP_TMP=${KEEP_TMP:-0}
GW_BIN=${GW_BIN:-$ROOT/target/release/gatewarden}
PLAIN_PINGORA_BIN=${PLAIN_PINGORA_BIN:-}
SOAK_REQUESTS=${SOAK_REQUESTS:-}
SOAK_SLICE=${SOAK_SLICE:-10s}
SOAK_RSS_SLACK_MIB=${SOAK_RSS_SLACK_MIB:-8}
CALLGRIND=${CALLGRIND:-0}
CALLGRIND_CONNS=${CALLGRIND_CONNS:-8}
CALLGRIND_DURATION=${CALLGRIND_DURATION:-10s}
if [[ -n "$SOAK_REQUESTS" ]]; then
    TARGETS="gw-chain" BENCH_PATHS="/small" WORK_STEALING=true GW_PGO_BIN="" GW_SHARDS="" GW_OFF="" WORKLOADS=""
fi

say() { printf '%s\n' "$*" >&2; }
die() { say "load.sh: $*"; exit 1; }

# --- tools --------------------------------------------------------------------------
missing=()
tools=(wrk nginx haproxy curl)
[[ "$CALLGRIND" == 1 ]] && tools+=(valgrind callgrind_control)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    say "load.sh: missing: ${missing[*]}"
    say "install them with:  bash scripts/setup.sh --bench"
    say "or:                 sudo apt-get install -y wrk nginx haproxy curl"
    [[ "$CALLGRIND" == 1 ]] && say "(CALLGRIND=1 also needs: sudo apt-get install -y valgrind)"
    exit 1
fi
if [[ ! -x "$GW_BIN" ]]; then
    say "load.sh: $GW_BIN not found; building it with 'cargo build --release' (takes minutes)"
    (cd "$ROOT" && cargo build --release) || die "release build failed"
fi
[[ -z "$GW_PGO_BIN" || -x "$GW_PGO_BIN" ]] || die "GW_PGO_BIN=$GW_PGO_BIN is not an executable"
[[ "$CALLGRIND" == 1 || -n "$SOAK_REQUESTS" ]] && WORKLOADS=""
# The workload benches are built once, optimised like a release (cargo's bench profile).
declare -A WORKLOAD_BIN=()
if [[ -n "$WORKLOADS" ]]; then
    say "load.sh: building the workload benches (cargo bench --no-run)"
    while IFS=$'\t' read -r name exe; do
        WORKLOAD_BIN[$name]=$exe
    done < <(cd "$ROOT" && cargo bench --no-run --bench sse_delay --bench ws_echo --bench idle_conns \
        --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("profile", {}).get("test"):
        print(m["target"]["name"], m["executable"], sep="\t")')
    for w in sse_delay ws_echo idle_conns; do
        [[ -n "${WORKLOAD_BIN[$w]:-}" ]] || die "could not build benches/$w.rs (cargo bench --no-run --bench $w)"
    done
fi
# Idle connections need descriptors: the proxies and the benches inherit this limit
# (HAProxy wants two per connection of its maxconn). Raising the hard limit needs root.
if ! ulimit -n 65536 2>/dev/null; then
    ulimit -n "$(ulimit -Hn)"
    [[ -z "$WORKLOADS" ]] || say "load.sh: open files limited to $(ulimit -n); the idle workload may fail (raise ulimit -Hn)"
fi

# --- temp dir and cleanup -------------------------------------------------------------
TMP=$(mktemp -d /tmp/gatewarden-bench.XXXXXX)
declare -a STARTED=()   # "signal:pid" of every process this script started
cleanup() {
    local entry sig pid
    for entry in "${STARTED[@]}"; do
        sig=${entry%%:*} pid=${entry#*:}
        kill "-$sig" "$pid" 2>/dev/null || true
    done
    for entry in "${STARTED[@]}"; do
        pid=${entry#*:}
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ "$KEEP_TMP" == 1 ]]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Fills @NAME@ placeholders of a template from NAME=value arguments.
render() {
    local template=$1 out=$2 kv
    shift 2
    local args=()
    for kv in "$@"; do
        args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${args[@]}" "$template" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        die "unfilled placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"
    fi
}

# Under callgrind a gateway takes seconds to start.
WAIT_TRIES=$([[ "$CALLGRIND" == 1 ]] && echo 900 || echo 100)
wait_http() {
    local url=$1 name=$2
    for _ in $(seq "$WAIT_TRIES"); do
        if curl -fsS -o /dev/null --max-time 1 -H "Authorization: Bearer ${BENCH_KEY:-}" "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$name did not answer on $url; see its log under $TMP (run with KEEP_TMP=1)"
}

# --- targets ---------------------------------------------------------------------------
# How a gateway process is started: directly, or under callgrind with nothing counted
# until the measurement asks for it.
launcher() { # launcher DIR
    if [[ "$CALLGRIND" == 1 ]]; then
        echo valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$1/callgrind.out"
    fi
}
declare -A PORT=() PIDS=()
ORDER=()
UPSTREAM_PORT=$BASE_PORT
next_port=$((BASE_PORT + 1))
add_target() { ORDER+=("$1"); PORT[$1]=$next_port; next_port=$((next_port + 1)); }
ORDER+=(direct)
PORT[direct]=$UPSTREAM_PORT
add_target nginx
add_target haproxy
# The ways people add auth today, when their tools are installed (bash scripts/setup.sh
# --bench installs them): Caddy, Caddy asking an auth endpoint first (forward_auth), and
# nginx checking the API key in Lua.
LUA_MODULE=/usr/lib/nginx/modules/ngx_http_lua_module.so
if command -v caddy >/dev/null 2>&1; then
    add_target caddy
    add_target caddy-auth
    AUTH_PORT=$next_port
    next_port=$((next_port + 1))
else
    say "load.sh: caddy not installed, skipping the caddy targets (apt-get install caddy)"
fi
if [[ -f "$LUA_MODULE" ]]; then
    add_target nginx-lua
else
    say "load.sh: nginx's Lua module not installed, skipping nginx-lua (apt-get install libnginx-mod-http-lua)"
fi
if [[ -n "$PLAIN_PINGORA_BIN" ]]; then add_target pingora; fi
# Gatewarden's targets: gw-KIND plus a suffix saying which binary and settings run.
declare -A GW_TARGET_BIN=() GW_TARGET_WS=() GW_TARGET_SHARDS=() GW_TARGET_OFF=()
add_gw_targets() { # add_gw_targets SUFFIX BINARY WORK_STEALING [SHARDS [OFF]]
    local kind
    for kind in empty chain css; do
        add_target "gw-$kind$1"
        GW_TARGET_BIN[gw-$kind$1]=$2
        GW_TARGET_WS[gw-$kind$1]=$3
        GW_TARGET_SHARDS[gw-$kind$1]=${4:-}
        GW_TARGET_OFF[gw-$kind$1]=${5:-}
    done
}
for ws in $WORK_STEALING; do
    if [[ "$ws" == true ]]; then add_gw_targets "" "$GW_BIN" true; else add_gw_targets -nows "$GW_BIN" false; fi
done
if [[ -n "$GW_SHARDS" ]]; then add_gw_targets -shard "$GW_BIN" true "$GW_SHARDS"; fi
for piece in $GW_OFF; do add_gw_targets "-off-$piece" "$GW_BIN" true "" "$piece"; done
if [[ -n "$GW_PGO_BIN" ]]; then add_gw_targets -pgo "$GW_PGO_BIN" true; fi
# The event stream and WebSocket servers live in the workload benches; every proxy's
# config points at these ports.
SSE_PORT=$next_port
WS_PORT=$((next_port + 1))
next_port=$((next_port + 2))
if [[ -n "$TARGETS" ]]; then
    wanted=()
    for t in "${ORDER[@]}"; do
        [[ " $TARGETS " == *" $t "* || "$t" == nginx ]] && wanted+=("$t")
    done
    ORDER=("${wanted[@]}")
fi
for p in $(seq "$BASE_PORT" $((next_port - 1))); do
    port_free "$p" || die "port $p is in use; pick other ports with BASE_PORT=..."
done

mkdir -p "$TMP/www" "$TMP/upstream" "$TMP/nginx" "$TMP/haproxy" "$TMP/nginx-lua" "$TMP/auth" "$TMP/caddy" "$TMP/caddy-auth"
# nginx workers run as an unprivileged user unless `user` says otherwise; let them in.
chmod 755 "$TMP" "$TMP/www"
head -c 65536 /dev/urandom >"$TMP/www/64k"
# A 16 KiB page shaped like an app's index: a head, then the body.
{
    printf '<!doctype html>\n<html><head><meta charset="utf-8"><title>bench</title>\n'
    printf '<link rel="stylesheet" href="/app.css">%.0s\n' $(seq 20)
    printf '</head>\n<body>\n'
} >"$TMP/www/page.html"
while (($(stat -c %s "$TMP/www/page.html") < 16384 - 64)); do
    printf '<p>lorem ipsum dolor sit amet, consectetur adipiscing elit</p>\n' >>"$TMP/www/page.html"
done
printf '</body></html>\n' >>"$TMP/www/page.html"
truncate -s 16384 "$TMP/www/page.html"
PAGE_SIZE=16384
printf 'body { background: rgb(1, 2, 3); }\n' >"$TMP/theme.css"
# One user key, sent by every request to every target (nginx and HAProxy ignore it).
BENCH_KEY=$("$GW_BIN" key new --file "$TMP/keys.yaml" --name bench 2>/dev/null) ||
    die "could not create the bench key with $GW_BIN key new"
cat >"$TMP/report.lua" <<'EOF'
-- One machine-readable line per run; latencies in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d bytes=%d p50=%.0f p99=%.0f p999=%.0f max=%.0f " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
EOF

vars=(TMP="$TMP" NGINX_USER="$(id -un)" UPSTREAM_PORT="$UPSTREAM_PORT" UPSTREAM_WORKERS="$UPSTREAM_WORKERS"
      PROXY_THREADS="$PROXY_THREADS" NGINX_PORT="${PORT[nginx]}" HAPROXY_PORT="${PORT[haproxy]}"
      SSE_PORT="$SSE_PORT" WS_PORT="$WS_PORT")

start() { # start NAME STOP_SIGNAL LOG CMD...
    local name=$1 sig=$2 log=$3
    shift 3
    "$@" >"$log" 2>&1 &
    STARTED+=("$sig:$!")
    PIDS[$name]=$!
}

render "$CONF/upstream.nginx.conf" "$TMP/upstream/nginx.conf" "${vars[@]}"
start direct TERM "$TMP/upstream/stdout.log" nginx -p "$TMP/upstream" -e "$TMP/upstream/error.log" -c "$TMP/upstream/nginx.conf"
wait_http "http://127.0.0.1:$UPSTREAM_PORT/small" "upstream nginx"

render "$CONF/proxy.nginx.conf" "$TMP/nginx/nginx.conf" "${vars[@]}"
if [[ "$CALLGRIND" == 1 ]]; then
    # One process, so callgrind sees every request (workers are forked children).
    sed -i '1i master_process off;' "$TMP/nginx/nginx.conf"
fi
# shellcheck disable=SC2046
start nginx TERM "$TMP/nginx/stdout.log" $(launcher "$TMP/nginx") \
    nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"

render "$CONF/haproxy.cfg" "$TMP/haproxy/haproxy.cfg" "${vars[@]}"
start haproxy TERM "$TMP/haproxy/haproxy.log" haproxy -db -f "$TMP/haproxy/haproxy.cfg"

declare -A EXTRA_PIDS=()   # processes whose CPU counts for a target besides its own
if [[ " ${ORDER[*]} " == *" nginx-lua "* ]]; then
    render "$CONF/lua.nginx.conf" "$TMP/nginx-lua/nginx.conf" "${vars[@]}" \
        LUA_PORT="${PORT[nginx-lua]}" BENCH_KEY="$BENCH_KEY"
    start nginx-lua TERM "$TMP/nginx-lua/stdout.log" \
        nginx -p "$TMP/nginx-lua" -e "$TMP/nginx-lua/error.log" -c "$TMP/nginx-lua/nginx.conf"
fi
if [[ " ${ORDER[*]} " == *" caddy-auth "* ]]; then
    render "$CONF/auth.nginx.conf" "$TMP/auth/nginx.conf" "${vars[@]}" \
        AUTH_PORT="$AUTH_PORT" BENCH_KEY="$BENCH_KEY"
    start auth TERM "$TMP/auth/stdout.log" \
        nginx -p "$TMP/auth" -e "$TMP/auth/error.log" -c "$TMP/auth/nginx.conf"
    wait_http "http://127.0.0.1:$AUTH_PORT/auth" "the auth endpoint"
    # The auth endpoint's work is part of the forward_auth pattern's cost.
    EXTRA_PIDS[caddy-auth]=auth
fi
for t in caddy caddy-auth; do
    [[ " ${ORDER[*]} " == *" $t "* ]] || continue
    render "$CONF/$t.Caddyfile" "$TMP/$t/Caddyfile" "${vars[@]}" \
        CADDY_PORT="${PORT[caddy]:-0}" CADDY_AUTH_PORT="${PORT[caddy-auth]:-0}" AUTH_PORT="$AUTH_PORT"
    # Caddy is a Go program: as many OS threads running Go code as the others get.
    start "$t" TERM "$TMP/$t/caddy.log" \
        env GOMAXPROCS="$PROXY_THREADS" XDG_DATA_HOME="$TMP/$t" XDG_CONFIG_HOME="$TMP/$t" \
        caddy run --adapter caddyfile --config "$TMP/$t/Caddyfile"
done

for t in "${ORDER[@]}"; do
    [[ "$t" == gw-* ]] || continue
    kind=$(cut -d- -f2 <<<"$t")
    dir="$TMP/$t"
    mkdir -p "$dir"
    cp "$TMP/keys.yaml" "$TMP/theme.css" "$dir/"
    render "$CONF/gatewarden-$kind.yaml" "$dir/gatewarden.yaml" "${vars[@]}" \
        GW_PORT="${PORT[$t]}" GW_DIR="$dir" WORK_STEALING="${GW_TARGET_WS[$t]}"
    if [[ -n "${GW_TARGET_SHARDS[$t]}" ]]; then
        sed -i "s/^  work_stealing: .*/&\n  shards: ${GW_TARGET_SHARDS[$t]}/" "$dir/gatewarden.yaml"
    fi
    "${GW_TARGET_BIN[$t]}" check -c "$dir/gatewarden.yaml" >"$dir/check.log" 2>&1 ||
        die "gatewarden check failed for $t: $(cat "$dir/check.log")"
    # SIGINT is Pingora's fast shutdown; SIGTERM would wait for the grace period.
    # shellcheck disable=SC2046 # the launcher's words are meant to split
    start "$t" INT "$dir/gatewarden.log" env GATEWARDEN_BENCH_OFF="${GW_TARGET_OFF[$t]}" \
        $(launcher "$dir") "${GW_TARGET_BIN[$t]}" run -c "$dir/gatewarden.yaml"
done
if [[ " ${ORDER[*]} " == *" pingora "* ]]; then
    mkdir -p "$TMP/pingora"
    # shellcheck disable=SC2046
    start pingora INT "$TMP/pingora/pingora.log" $(launcher "$TMP/pingora") "$PLAIN_PINGORA_BIN" \
        "127.0.0.1:${PORT[pingora]}" "127.0.0.1:$UPSTREAM_PORT" "$PROXY_THREADS"
fi
for t in "${ORDER[@]}"; do
    wait_http "http://127.0.0.1:${PORT[$t]}/small" "$t"
done

# Every process whose CPU time counts for a target: nginx's master and its workers.
target_pids() {
    local pid=${PIDS[$1]}
    echo "$pid"
    pgrep -P "$pid" 2>/dev/null || true
    if [[ -n "${EXTRA_PIDS[$1]:-}" ]]; then
        target_pids "${EXTRA_PIDS[$1]}"
    fi
}
cpu_ticks() { # prints "user system" clock ticks summed over the given pids
    local user=0 system=0 pid rest
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] || continue
        rest=$(</proc/"$pid"/stat)
        rest=${rest##*) }   # the command name may hold spaces; fields resume after ')'
        # shellcheck disable=SC2086
        set -- $rest
        user=$((user + ${12})) system=$((system + ${13}))   # utime, stime: fields 14, 15
    done
    echo "$user $system"
}
CLK_TCK=$(getconf CLK_TCK)

# --- functional check before any load ---------------------------------------------------
problems=0
expected_size() {
    case $1 in
    /64k) echo 65536 ;;
    "$HTML_PATH") echo "$PAGE_SIZE" ;;
    *) echo 3 ;;
    esac
}
# The css_inject target only makes sense on the HTML page.
applies() { [[ "$1" != gw-css* || "$2" == "$HTML_PATH" ]]; }
for t in "${ORDER[@]}"; do
    for path in $BENCH_PATHS; do
        applies "$t" "$path" || continue
        got=$(curl -sS -D "$TMP/headers" -o "$TMP/body" -w '%{http_code} %{size_download}' \
            -H "Authorization: Bearer $BENCH_KEY" "http://127.0.0.1:${PORT[$t]}$path" || echo "000 0")
        want="200 $(expected_size "$path")"
        if [[ "$t" == gw-css* ]]; then
            # The page grows by the theme; it must be in there exactly once.
            want="200 $((PAGE_SIZE + $(stat -c %s "$TMP/theme.css") + 15))"
            if [[ $(grep -c 'rgb(1, 2, 3)' "$TMP/body") != 1 ]]; then
                say "FUNCTIONAL PROBLEM: $t $path: the theme is not in the page exactly once"
                problems=$((problems + 1))
            fi
        fi
        if [[ "$got" != "$want" ]]; then
            say "FUNCTIONAL PROBLEM: $t $path answered '$got', expected '$want'"
            problems=$((problems + 1))
        fi
        if [[ "$t" == gw-chain* ]] && ! grep -qi '^x-frame-options: DENY' "$TMP/headers"; then
            say "FUNCTIONAL PROBLEM: $t $path lacks the X-Frame-Options the chain sets"
            problems=$((problems + 1))
        fi
    done
    if [[ "$t" == gw-chain* || "$t" == caddy-auth || "$t" == nginx-lua ]]; then
        # The chain really checks the key: without it the route answers 401.
        got=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$t]}/small" || echo 000)
        if [[ "$got" != 401 ]]; then
            say "FUNCTIONAL PROBLEM: $t answered $got without a key, expected 401"
            problems=$((problems + 1))
        fi
    fi
done

# A second of load on each target before anything is measured: every proxy opens its
# upstream (and auth) connections now, not during the first measured run.
if [[ "$CALLGRIND" != 1 && -z "$SOAK_REQUESTS" ]]; then
    for t in "${ORDER[@]}"; do
        wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d1s -H "Authorization: Bearer $BENCH_KEY" \
            "http://127.0.0.1:${PORT[$t]}/small" >/dev/null 2>&1 || true
    done
fi

# --- machine ----------------------------------------------------------------------------
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
echo "# gatewarden load bench, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $mem RAM, $(uname -r)"
echo "tools:   $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | cut -d' ' -f3), $(haproxy -v | head -1 | cut -d' ' -f1-3)$(command -v caddy >/dev/null && echo ", caddy $(caddy version | cut -d' ' -f1)")"
echo "binary:  $GW_BIN ($("$GW_BIN" version), built $(date -u -r "$GW_BIN" '+%Y-%m-%d %H:%M UTC'))"
[[ -n "$GW_PGO_BIN" ]] && echo "pgo:     $GW_PGO_BIN (built $(date -u -r "$GW_PGO_BIN" '+%Y-%m-%d %H:%M UTC'))"
echo "wrk:     -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION, $ROUNDS rounds, order alternating"
echo "proxies: $PROXY_THREADS threads/workers each; upstream nginx: $UPSTREAM_WORKERS worker(s)"
# Everything shares these CPUs with wrk; other load on the box skews every number.
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min load average before the runs)"
echo

# --- soak ------------------------------------------------------------------------------
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
if [[ -n "$SOAK_REQUESTS" ]]; then
    t=gw-chain
    pid=${PIDS[$t]}
    echo "soak: $t (api_key + rate_limit + origin + headers, access user) on /small,"
    echo "      wrk -t$WRK_THREADS -c$WRK_CONNS in $SOAK_SLICE slices until $SOAK_REQUESTS requests"
    echo
    echo "| slice | requests | total requests | req/s | p99 ms | errors | RSS MiB |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    total=0 slice=0 errors_total=0 rss_warm="" rss_max=0 rss=0
    while ((total < SOAK_REQUESTS)); do
        slice=$((slice + 1))
        out="$TMP/soak-$slice.txt"
        wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$SOAK_SLICE" --latency -s "$TMP/report.lua" \
            -H "Authorization: Bearer $BENCH_KEY" "http://127.0.0.1:${PORT[$t]}/small" >"$out" 2>&1 || true
        line=$(grep '^RESULT ' "$out" || true)
        [[ -n "$line" ]] || die "soak slice $slice: wrk gave no result: $(tail -3 "$out")"
        kill -0 "$pid" 2>/dev/null || die "soak slice $slice: gatewarden exited; see $TMP/$t/gatewarden.log"
        # The RESULT line is wrk's own numbers as name=value pairs (report.lua).
        eval "$(sed 's/^RESULT //' <<<"$line")"
        errors=$((err_connect + err_read + err_write + err_status + err_timeout))
        total=$((total + requests)) errors_total=$((errors_total + errors))
        rss=$(rss_kib "$pid")
        [[ -n "$rss_warm" ]] || rss_warm=$rss
        ((rss > rss_max)) && rss_max=$rss
        printf '| %d | %d | %d | %.0f | %.2f | %d | %.1f |\n' "$slice" "$requests" "$total" \
            "$(awk -v r="$requests" -v d="$duration_us" 'BEGIN {print r / d * 1e6}')" \
            "$(awk -v v="$p99" 'BEGIN {print v / 1000}')" "$errors" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')"
    done
    growth=$(((rss_max - rss_warm) / 1024))
    echo
    echo "requests: $total, errors: $errors_total, RSS after the first slice $((rss_warm / 1024)) MiB," \
        "highest $((rss_max / 1024)) MiB, last $((rss / 1024)) MiB (growth $growth MiB, allowed $SOAK_RSS_SLACK_MIB)"
    if ((errors_total > 0 || growth > SOAK_RSS_SLACK_MIB || problems > 0)); then
        echo "soak: FAIL"
        exit 1
    fi
    echo "soak: PASS"
    exit 0
fi

# --- callgrind ----------------------------------------------------------------------------
if [[ "$CALLGRIND" == 1 ]]; then
    echo "callgrind: user-space instructions per request, wrk -t1 -c$CALLGRIND_CONNS -d$CALLGRIND_DURATION"
    echo "           after a 3 s warm-up (instructions counted only during the measured run)"
    echo
    declare -A IR=()
    rows=()
    for t in "${ORDER[@]}"; do
        [[ "$t" == gw-* || "$t" == pingora || "$t" == nginx ]] || continue
        pid=${PIDS[$t]}
        dir="$TMP/$t"
        callgrind_control -i on "$pid" >/dev/null 2>&1
        for path in $BENCH_PATHS; do
            applies "$t" "$path" || continue
            url="http://127.0.0.1:${PORT[$t]}$path"
            # The warm-up pays for valgrind translating the code the requests run.
            wrk -t1 -c"$CALLGRIND_CONNS" -d3s -H "Authorization: Bearer $BENCH_KEY" "$url" >/dev/null 2>&1 || true
            callgrind_control -z "$pid" >/dev/null 2>&1
            out="$TMP/callgrind-$t-${path#/}.txt"
            wrk -t1 -c"$CALLGRIND_CONNS" -d"$CALLGRIND_DURATION" -s "$TMP/report.lua" \
                -H "Authorization: Bearer $BENCH_KEY" "$url" >"$out" 2>&1 || true
            line=$(grep '^RESULT ' "$out" || true)
            [[ -n "$line" ]] || die "callgrind: wrk gave no result for $t $path: $(tail -3 "$out")"
            n_requests=$(sed 's/^RESULT requests=\([0-9]*\).*/\1/' <<<"$line")
            # Each dump is a new numbered part file, complete once it has its totals line.
            parts=$(find "$dir" -name 'callgrind.out.*' | wc -l)
            callgrind_control -d "$pid" >/dev/null 2>&1
            profile="$dir/callgrind.out.$((parts + 1))"
            for _ in $(seq 600); do
                grep -q '^totals:' "$profile" 2>/dev/null && break
                sleep 0.1
            done
            grep -q '^totals:' "$profile" 2>/dev/null || die "callgrind: no profile written for $t $path"
            cp "$profile" "$TMP/callgrind-$t-${path#/}.out"
            instructions=$(awk '/^totals:/ {print $2}' "$profile")
            IR[$t$path]=$(awk -v i="$instructions" -v r="$n_requests" 'BEGIN {printf "%.0f", (r > 0 ? i / r : 0)}')
            rows+=("$t $path $n_requests")
            say "  $path  $(printf '%-14s' "$t") ${IR[$t$path]} instructions/request"
        done
        callgrind_control -i off "$pid" >/dev/null 2>&1
    done
    echo "| target | path | requests | instructions / request | vs nginx |"
    echo "|---|---|---:|---:|---:|"
    for row in "${rows[@]}"; do
        read -r t path n_requests <<<"$row"
        printf '| %s | %s | %d | %d | %s |\n' "$t" "$path" "$n_requests" "${IR[$t$path]}" \
            "$(awk -v a="${IR[$t$path]}" -v b="${IR[nginx$path]:-0}" 'BEGIN {print (b > 0 ? sprintf("%.2f", a / b) : "-")}')"
    done
    [[ "$KEEP_TMP" == 1 ]] && echo && echo "profiles: $TMP/callgrind-TARGET-PATH.out (callgrind_annotate --inclusive=yes FILE)"
    ((problems == 0)) || exit 1
    exit 0
fi

# --- the runs ---------------------------------------------------------------------------
RESULTS="$TMP/results.tsv"
: >"$RESULTS"
run_one() { # run_one TARGET PATH ROUND
    local t=$1 path=$2 round=$3 pids u0 s0 u1 s1 out line
    mapfile -t pids < <(target_pids "$t")
    out="$TMP/wrk-$t-${path#/}-r$round.txt"
    read -r u0 s0 < <(cpu_ticks "${pids[@]}")
    wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency -s "$TMP/report.lua" \
        -H "Authorization: Bearer $BENCH_KEY" "http://127.0.0.1:${PORT[$t]}$path" >"$out" 2>&1 || true
    read -r u1 s1 < <(cpu_ticks "${pids[@]}")
    line=$(grep '^RESULT ' "$out" || true)
    if [[ -z "$line" ]]; then
        say "FUNCTIONAL PROBLEM: wrk gave no result for $t $path: $(tail -3 "$out")"
        problems=$((problems + 1))
        return
    fi
    # shellcheck disable=SC2086
    local $(sed 's/^RESULT //' <<<"$line")
    local errors=$((err_connect + err_read + err_write + err_status + err_timeout))
    if ((errors > 0)); then
        local counts="connect=$err_connect read=$err_read write=$err_write non-2xx=$err_status timeout=$err_timeout"
        case $t in
        caddy | caddy-auth | nginx-lua)
            # A peer's own failures under load are part of what is measured: they
            # show in the errors column, and they do not fail the bench.
            say "note: $t $path round $round: $counts" ;;
        *)
            say "FUNCTIONAL PROBLEM: $t $path round $round: $counts"
            problems=$((problems + 1)) ;;
        esac
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$path" "$round" "$requests" \
        "$duration_us" "$p50" "$p99" "$p999" "$((u1 - u0 + s1 - s0))" "$errors" "$((u1 - u0))" >>"$RESULTS"
    say "  round $round  $path  $(printf '%-14s' "$t") $(awk -v r="$requests" -v d="$duration_us" 'BEGIN {printf "%9.0f req/s", r / d * 1e6}')  p99 $(awk -v v="$p99" 'BEGIN {printf "%.2f ms", v / 1000}')"
}

for round in $(seq "$ROUNDS"); do
    order=("${ORDER[@]}")
    if ((round % 2 == 0)); then
        mapfile -t order < <(printf '%s\n' "${ORDER[@]}" | tac)
    fi
    for path in $BENCH_PATHS; do
        for t in "${order[@]}"; do
            applies "$t" "$path" || continue
            run_one "$t" "$path" "$round"
        done
    done
done

# --- summary ----------------------------------------------------------------------------
echo "load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Means over $ROUNDS rounds. Latency in ms. CPU = user+system seconds of the proxy"
echo "process(es) per 100k requests (for \`direct\`, the upstream's own); user = its share"
echo "spent in user space. Ratios are target / nginx: above 1 is more req/s, or more"
echo "latency/CPU, than nginx."
for path in $BENCH_PATHS; do
    echo
    echo "### $path ($(expected_size "$path") byte body)"
    echo
    awk -F'\t' -v path="$path" -v tck="$CLK_TCK" -v order="${ORDER[*]}" '
        $2 == path && $4 > 0 {
            n[$1]++; rps[$1] += $4 / $5 * 1e6; p50[$1] += $6; p99[$1] += $7; p999[$1] += $8
            cpu[$1] += ($9 / tck) / $4 * 1e5; err[$1] += $10; ut[$1] += $11; tt[$1] += $9
        }
        END {
            print "| target | req/s | p50 | p99 | p99.9 | CPU s/100k | user | errors | req/s vs nginx | p99 vs nginx | CPU vs nginx |"
            print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            split(order, names, " ")
            ng = "nginx"
            for (i = 1; i in names; i++) {
                t = names[i]
                if (!n[t]) continue
                r = rps[t] / n[t]; c = cpu[t] / n[t]; q = p99[t] / n[t]
                if (n[ng]) {
                    rr = sprintf("%.2f", r / (rps[ng] / n[ng]))
                    qq = sprintf("%.2f", q / (p99[ng] / n[ng]))
                    cc = (cpu[ng] > 0) ? sprintf("%.2f", c / (cpu[ng] / n[ng])) : "-"
                } else { rr = qq = cc = "-" }
                us = (tt[t] > 0) ? sprintf("%.0f%%", 100 * ut[t] / tt[t]) : "-"
                printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %d | %s | %s | %s |\n", \
                    t, r, p50[t] / n[t] / 1000, q / 1000, p999[t] / n[t] / 1000, c, us, err[t], rr, qq, cc
            }
        }' "$RESULTS"
done
echo
echo "per-run rows (target path round requests duration_us p50 p99 p99.9 cpu_ticks errors user_ticks):"
sed 's/^/    /' "$RESULTS"

# --- workloads through the same proxies ----------------------------------------------------
# The targets of a workload as the benches take them (NAME=ADDRESS@PIDS): every proxy of
# this run but the css_inject ones, which differ only on HTML pages. `direct` is the
# nginx upstream, and only for the idle connections: the event stream and WebSocket
# benches reach their own servers directly.
workload_targets() { # workload_targets WITH_DIRECT(yes|no)
    local t entries=() pids
    for t in "${ORDER[@]}"; do
        [[ "$t" == gw-css* ]] && continue
        [[ "$t" == direct && "$1" != yes ]] && continue
        pids=$(target_pids "$t" | paste -sd, -)
        entries+=("$t=127.0.0.1:${PORT[$t]}@$pids")
    done
    echo "${entries[*]}"
}
for w in $WORKLOADS; do
    case $w in
    sse) bench=sse_delay port_var=SSE_UPSTREAM_PORT port=$SSE_PORT direct=no
        title="Server-sent events: the delay added to each event (an event every 20 ms)" ;;
    ws) bench=ws_echo port_var=WS_UPSTREAM_PORT port=$WS_PORT direct=no
        title="WebSocket echo: round trips on open sockets" ;;
    idle) bench=idle_conns port_var=IDLE_UNUSED port=0 direct=yes
        title="Memory with ${IDLE_CONNS:-10000} idle keep-alive connections (RSS of every process of the proxy)" ;;
    *) die "unknown workload '$w' in WORKLOADS (sse, ws, idle)" ;;
    esac
    echo
    echo "### $title"
    echo
    say "  workload $w ($bench)"
    out="$TMP/workload-$w.txt"
    if env "$port_var=$port" BENCH_TARGETS="$(workload_targets "$direct")" BENCH_KEY="$BENCH_KEY" \
        "${WORKLOAD_BIN[$bench]}" >"$out" 2>&1; then
        grep -E "^($bench:|\|)" "$out" | sed "s/^$bench: /settings: /"
    else
        say "FUNCTIONAL PROBLEM: workload $w failed: $(tail -5 "$out")"
        problems=$((problems + 1))
    fi
done

# --- optional profile -------------------------------------------------------------------
if [[ "$PERF" == 1 ]]; then
    target=""
    for t in "${ORDER[@]}"; do [[ "$t" == gw-chain* ]] && { target=$t; break; }; done
    if [[ -z "$target" ]]; then
        say "PERF=1: no gatewarden chain target in this run"
    elif ! command -v perf >/dev/null 2>&1; then
        say "PERF=1: perf is not installed (apt-get install linux-perf)"
    else
        echo
        echo "### perf profile: $target, /small, wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION"
        secs=${WRK_DURATION%s}
        perf record -g -o "$TMP/perf.data" -p "${PIDS[$target]}" -- sleep "$secs" \
            >"$TMP/perf-record.log" 2>&1 &
        perf_pid=$!
        wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" -H "Authorization: Bearer $BENCH_KEY" \
            "http://127.0.0.1:${PORT[$target]}/small" >/dev/null 2>&1 || true
        if wait "$perf_pid"; then
            perf report -i "$TMP/perf.data" --stdio --no-children -g none --sort symbol \
                2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' >"$TMP/perf-symbols.txt"
            echo
            echo "Self time by where the code lives (a symbol counts once, first match wins):"
            echo
            awk '{
                    p = $1; sub("%", "", p); $1 = ""; s = $0
                    if (s ~ /\[k\]/) k = "kernel (TCP loopback, syscalls, scheduler)"
                    else if (s ~ /malloc|free|_int_|unlink_chunk|consolidate/) k = "libc malloc/free"
                    else if (s ~ /gatewarden/) k = "gatewarden and its plugins"
                    else if (s ~ /pingora/) k = "pingora"
                    else if (s ~ /tokio/) k = "tokio"
                    else if (s ~ /\] <?http::|httparse/) k = "http / httparse (header maps, parsing)"
                    else if (s ~ /mem(move|cpy|set|cmp)/) k = "libc mem*"
                    else k = "other (core, bytes, alloc, std, ...)"
                    total[k] += p
                }
                END { for (k in total) printf "    %5.1f%%  %s\n", total[k], k }' \
                "$TMP/perf-symbols.txt" | sort -rn
            echo
            echo "Top symbols (self time):"
            echo
            echo '```'
            head -25 "$TMP/perf-symbols.txt" | cut -c1-150
            echo '```'
        else
            say "PERF=1: perf record failed: $(tail -3 "$TMP/perf-record.log")"
        fi
    fi
fi

if ((problems > 0)); then
    say "load.sh: $problems functional problem(s), see FUNCTIONAL PROBLEM lines above"
    exit 2
fi
