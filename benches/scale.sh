#!/usr/bin/env bash
# Valid-key throughput of a real `credproxy serve` on a store of many
# sessions, with and without a flood of random keys from another client.
#
# Usage:
#   benches/scale.sh            # needs wrk and nginx; builds the release binaries
#
# Settings (environment):
#   SESSIONS=1000000   sessions in the store (seeded with examples/seed.rs --bulk)
#   STORE=sqlite       or postgres (then DATABASE_URL names an empty database,
#                      or one this script seeded before)
#   STORE_DIR=         keep the SQLite store and key here (reused when it holds
#                      SESSIONS sessions already); default: a temporary directory
#   DURATION=10        seconds per wrk run (1..600)
#   ROUNDS=2           rounds of (no flood, flood) (1..20)
#   CONNECTIONS=32     wrk connections of the valid client (one wrk thread)
#   VALID_KEYS=1000    the valid client cycles through seeded keys 0..VALID_KEYS
#   FLOOD_RATE=10000   random keys a second from the flood client
#   FLOOD_FROM=127.0.0.2  the flood's source address (its own budget)
#   WORKERS=           TOKIO_WORKER_THREADS of credproxy (default: one per core)
#   PORT_BASE=18580    first of the 3 consecutive loopback ports used
#
# The valid client (wrk, from 127.0.0.1) presents seeded keys, all cached
# after the warm-up; the flood (examples/flood.rs, from FLOOD_FROM) presents
# a new random key each time, so every one misses both caches and is
# charged to the flood's budget of cold lookups
# (`store.cold_lookups_per_client`, default 200/s): most of it gets 429
# without a store read. The upstream is a `return 200` nginx, as in
# benches/load.sh. Nothing is pinned: on a 2-core machine the flood client,
# wrk, nginx and credproxy share the cores, so part of the drop under flood
# is the flood client's own CPU. Everything listens on 127.0.0.1; servers
# are stopped on exit and the temporary directory is deleted.

set -euo pipefail

SESSIONS=${SESSIONS:-1000000}
STORE=${STORE:-sqlite}
STORE_DIR=${STORE_DIR:-}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-32}
VALID_KEYS=${VALID_KEYS:-1000}
FLOOD_RATE=${FLOOD_RATE:-10000}
FLOOD_FROM=${FLOOD_FROM:-127.0.0.2}
WORKERS=${WORKERS:-}
PORT_BASE=${PORT_BASE:-18580}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=scale.sh
WAIT_SECS=30
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
in_range SESSIONS "$SESSIONS" 1 100000000
in_range DURATION "$DURATION" 1 600
in_range ROUNDS "$ROUNDS" 1 20
in_range CONNECTIONS "$CONNECTIONS" 1 10000
in_range VALID_KEYS "$VALID_KEYS" 1 "$SESSIONS"
in_range FLOOD_RATE "$FLOOD_RATE" 1 1000000
in_range PORT_BASE "$PORT_BASE" 1024 65532
[[ -z $WORKERS ]] || in_range WORKERS "$WORKERS" 1 1024
case $STORE in
    sqlite) ;;
    postgres) [[ -n ${DATABASE_URL:-} ]] || die "STORE=postgres needs DATABASE_URL" ;;
    *) die "STORE must be sqlite or postgres" ;;
esac
[[ $FLOOD_FROM =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "FLOOD_FROM must be a 127/8 address"
for arg in "$@"; do
    case $arg in
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
command -v wrk >/dev/null || die "missing: wrk (apt-get install wrk)"
[[ -x $NGINX ]] || die "missing: nginx (apt-get install nginx-light)"

echo "building credproxy and the examples (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin credproxy --example seed --example flood) ||
    die "cargo build --release failed"
BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
CREDPROXY_BIN=$BIN_DIR/credproxy

start_work credproxy-scale

UP_PORT=$PORT_BASE
CP_PORT=$((PORT_BASE + 1))
CP_ADMIN_PORT=$((PORT_BASE + 2))
ports_free "$UP_PORT" "$CP_PORT" "$CP_ADMIN_PORT"

# ---------------------------------------------------------------- upstream

mkdir -p "$WORK/nginx/logs"
user=""
((EUID == 0)) && user="user root root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$user
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type application/json; return 200 '{"ok":true}'; }
    }
}
EOF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/logs/error.log" \
    >"$WORK/nginx/logs/stdout.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT" nginx "$!" "$WORK/nginx/logs/error.log"

# ---------------------------------------------------------------- store

DATA=${STORE_DIR:-$WORK}
mkdir -p "$DATA"
if [[ $STORE == sqlite ]]; then
    STORE_URL="sqlite://$DATA/scale.db"
else
    STORE_URL=$DATABASE_URL
fi
CFG=$WORK/credproxy.toml
cat >"$CFG" <<EOF
[server]
listen = "127.0.0.1:$CP_PORT"
admin_listen = "127.0.0.1:$CP_ADMIN_PORT"

[store]
url = "$STORE_URL"
key_file = "$DATA/scale.key"

[providers.spark]
kind = "spark"
api_base = "http://127.0.0.1:$UP_PORT"
token_url = "http://127.0.0.1:$UP_PORT/v1/oauth2/grant"
authorize_url = "http://127.0.0.1:$UP_PORT/openid"
client_id = "scale-client"
client_secret = "scale-client-secret"
EOF
have=$(RUST_LOG=warn "$CREDPROXY_BIN" check --config "$CFG" 2>/dev/null |
    sed -n 's/.*store reachable with \([0-9]*\) session.*/\1/p' || true)
have=${have:-0}
if ((have < SESSIONS)); then
    ((have == 0)) || die "the store holds $have sessions, fewer than $SESSIONS: start from an empty one"
    echo "seeding $SESSIONS sessions ($STORE, bulk)..." >&2
    RUST_LOG=warn "$BIN_DIR/examples/seed" --bulk "$CFG" "$SESSIONS" spark 5000 >"$WORK/seed.log" 2>&1 ||
        {
            cat "$WORK/seed.log" >&2
            die "seeding failed"
        }
    tail -n 1 "$WORK/seed.log"
else
    echo "the store holds $have sessions already" >&2
fi

# ---------------------------------------------------------------- credproxy

env ${WORKERS:+TOKIO_WORKER_THREADS=$WORKERS} RUST_LOG=warn "$CREDPROXY_BIN" serve --config "$CFG" \
    >"$WORK/credproxy.log" 2>&1 &
CP_PID=$!
PIDS+=("$CP_PID")
started=$(date +%s.%N)
wait_port "$CP_PORT" credproxy "$CP_PID" "$WORK/credproxy.log"
echo "credproxy serving $SESSIONS sessions after $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}') s" \
    "(rss $(awk '/VmRSS/ {print $2, $3}' "/proc/$CP_PID/status"))"

cat >"$WORK/valid.lua" <<EOF
local n = $VALID_KEYS
local i = 0
request = function()
    i = (i + 1) % n
    return wrk.format("GET", nil, {["X-Credproxy-Session"] = string.format("seed-session-key-%08d", i)})
end
EOF
URL="http://127.0.0.1:$CP_PORT/spark/v1/listings"
status=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
    printf "GET /spark/v1/listings HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: seed-session-key-00000000\r\nConnection: close\r\n\r\n" >&3 &&
    read -r _ s _ <&3 && echo "$s"' _ "$CP_PORT" || echo none)
[[ $status == 200 ]] || die "a seeded key answered '$status' instead of 200"

run_wrk() { # SECONDS -> wrk output
    timeout $(($1 + 30)) wrk -t1 -c"$CONNECTIONS" -d"${1}s" --latency -s "$WORK/valid.lua" "$URL"
}
rps_of() { awk '/^Requests\/sec:/ {print $2}'; }
non2xx_of() { awk '/Non-2xx or 3xx responses:/ {print $NF}'; }

# The valid client's own first lookups are cold and budgeted too (200/s
# by default): warm up until every valid key is cached (all 200).
echo "warm-up: caching the $VALID_KEYS valid keys..." >&2
for _ in $(seq 30); do
    bad=$(run_wrk 2 | non2xx_of)
    [[ -z $bad ]] && break
done
[[ -z $bad ]] || die "the valid keys still get non-2xx answers after the warm-up"

with_flood() { # NAME [--same-key] -> req/s of the valid client while the flood runs
    "$BIN_DIR/examples/flood" "$URL" "$FLOOD_RATE" $((DURATION + 2)) "$FLOOD_FROM" 32 "${@:2}" \
        >"$WORK/flood.out" 2>&1 &
    local pid=$! out rps bad
    PIDS+=("$pid")
    sleep 1 # let the flood reach its rate before measuring
    out=$(run_wrk "$DURATION") || die "wrk failed"
    wait "$pid" || {
        cat "$WORK/flood.out" >&2
        die "the flood client failed"
    }
    rps=$(rps_of <<<"$out")
    bad=$(non2xx_of <<<"$out")
    printf '  round %d  %-12s %10s req/s%s   %s\n' "$r" "$1" "$rps" "${bad:+  NON-2xx: $bad}" "$(cat "$WORK/flood.out")" >&2
    echo "$rps"
}

echo "scale: $ROUNDS rounds x (no flood, flood of $FLOOD_RATE/s random keys from $FLOOD_FROM, the same rate of one repeated unknown key) x ${DURATION}s; wrk -t1 -c$CONNECTIONS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$WORK/results.tsv"
for r in $(seq "$ROUNDS"); do
    out=$(run_wrk "$DURATION") || die "wrk failed"
    quiet=$(rps_of <<<"$out")
    bad=$(non2xx_of <<<"$out")
    printf '  round %d  %-12s %10s req/s%s\n' "$r" "no flood" "$quiet" "${bad:+  NON-2xx: $bad}"
    # Alternate which flood goes first, so a drift of the machine's load
    # does not always favour the same one.
    if ((r % 2)); then
        flooded=$(with_flood "random keys")
        control=$(with_flood "one key" --same-key)
    else
        control=$(with_flood "one key" --same-key)
        flooded=$(with_flood "random keys")
    fi
    printf '%s\t%s\t%s\n' "$quiet" "$flooded" "$control" >>"$WORK/results.tsv"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); credproxy rss $(awk '/VmRSS/ {print $2, $3}' "/proc/$CP_PID/status")"
metrics=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" &&
    printf "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3 && cat <&3' _ "$CP_ADMIN_PORT" || true)
grep -E '^credproxy_(cached_sessions|session_key_reads_total|session_absent_hits_total|session_cold_lookups_refused_total) ' <<<"$metrics" || true

awk -F '\t' '
function median(list,    a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) {
        t = a[i] + 0
        for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ q = q " " $1; f = f " " $2; c = c " " $3 }
END {
    Q = median(q); F = median(f); C = median(c)
    printf "\nvalid-key req/s, no flood:                 %.0f\n", Q
    printf "valid-key req/s, flood of random keys:    %.0f  (x%.3f)\n", F, (Q > 0 ? F / Q : 0)
    printf "valid-key req/s, flood of one unknown key: %.0f  (x%.3f: what serving the flood costs without store reads)\n", C, (Q > 0 ? C / Q : 0)
    printf "(medians of %d rounds)\n", NR
}' "$WORK/results.tsv"
