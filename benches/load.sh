#!/usr/bin/env bash
# Load comparison: how much does credproxy cost per request, next to the
# upstream alone and next to nginx and HAProxy doing the same job?
#
# Usage:
#   benches/load.sh             # run (needs wrk, nginx, haproxy; builds credproxy --release)
#   benches/load.sh --install   # apt-get install the missing tools first, then run
#   benches/load.sh --bodies    # large bodies instead (needs python3, haproxy): see below
#
# Settings (environment):
#   DURATION=10      seconds per wrk run (1..600)
#   ROUNDS=3         rounds; each round measures every target once, in turn (1..20)
#   CONNECTIONS=50   wrk connections (one wrk thread)
#   WARMUP=2         seconds of unrecorded load per target before round 1 (0 = none)
#   TARGETS="upstream nginx haproxy credproxy credproxy-info"   which targets, in round order
#   WORKERS=1        workers of each proxy: credproxy TOKIO_WORKER_THREADS=N,
#                    HAProxy nbthread N, nginx worker_processes N (1..64)
#   SERVER_CPU=0     core for the server side (upstream, proxy under test), WORKERS=1
#   CLIENT_CPU=1     core for wrk, WORKERS=1
#   PORT_BASE=18480  first of the 12 consecutive loopback ports used
#   CREDPROXY_BIN=   use this binary instead of building target/release/credproxy
#                    (or $CARGO_TARGET_DIR/release/credproxy)
#   With --bodies (DURATION and CONNECTIONS are not used; WARMUP > 0 means one
#   unrecorded download and upload per target first):
#   DOWNLOADS=20     downloads per run, one after another on one connection (1..1000)
#   UPLOADS=40       uploads per run, likewise (1..1000)
#   DOWNLOAD_MB=64   size of each download, MiB (1..1024)
#   UPLOAD_MB=16     size of each upload, MiB (1..1024)
#
# Targets, each served with WORKERS workers (one by default):
#   upstream        nginx answering every request with a fixed small JSON
#                   (`return 200 '{"ok":true}'`), one worker process, no access log.
#   nginx           nginx as a reverse proxy (one worker): strips /spark/, sets
#                   `Authorization: OAuth sometoken`, drops the session header,
#                   keepalive connections to the upstream; no access log.
#   haproxy         HAProxy (nbthread WORKERS) doing what the nginx proxy does:
#                   `replace-path`, `set-header Authorization`, `del-header` of
#                   the session header, `http-reuse always`; no log.
#   credproxy       `credproxy serve`, RUST_LOG=warn (no per-request log line),
#                   TOKIO_WORKER_THREADS=WORKERS, with one Spark session; wrk sends
#                   `X-Credproxy-Session: KEY` to /spark/v1/listings.
#   credproxy-info  the same at the default `info` level: the per-request
#                   access log line (part of the product) goes to a file.
#   credproxy-budget  `credproxy` with a rate limit configured but far from
#                   spent (1,000,000 per second): what pacing itself costs.
#                   Not in the default TARGETS; add it to compare.
#   credproxy-traced  `credproxy` exporting a trace of every request
#                   (`[telemetry]`, sample_ratio 1.0) to a loopback OTLP/HTTP
#                   sink (python3, answers 200 and drops the batch): what
#                   tracing costs. Not in the default TARGETS; add it to compare.
#
# Why nginx and not the Spark stand-in (crates/standins) as the upstream: the
# stand-in hashes every body, records every request in memory (unbounded over
# a load run) and logs a line per request, so it would be the bottleneck and
# the ratios would measure the stand-in. A `return 200` nginx is about as
# cheap as an HTTP server gets, so the differences below are proxy overhead.
#
# Placement: with WORKERS=1 every server process is pinned to SERVER_CPU with
# taskset and wrk to CLIENT_CPU, so the upstream shares its core with the
# proxy under test. With more workers the proxy's workers get cores 0..N-1
# and the upstream and wrk the cores after them, when the machine has
# N + 1 cores or more; otherwise (a 2-core machine at WORKERS=2) nothing is
# pinned and the report says so. "cpu us/req" is the proxy's own CPU time
# (user + system of its processes and threads, from /proc) per request; the
# upstream's is not in it. Without taskset, the processes float and the
# figures are noisier. The credproxy-info run reports its access log's size
# per line. The report ends with each credproxy target's ratios to HAProxy
# and to nginx: req/s (higher is better), p99 and CPU per request (lower).
#
# Large bodies (--bodies; issue 27): a DOWNLOAD_MB download and an
# UPLOAD_MB upload (POST) through each target, WORKERS workers each (one by
# default). Targets: upstream, haproxy, credproxy (the default TARGETS) and
# credproxy-info; nginx is left out (its proxy config buffers a large answer
# to disk). The upstream is benches/bodies.py, not nginx: one Python process
# that sends its file with sendfile(2) for every GET (as fast as nginx's
# sendfile on loopback here) and, for a POST, reads the whole body into a
# 1 MiB buffer and drops it before it answers 200, as an API does (nginx's
# `return 200` answers first and discards the body after: an early answer,
# another case). The client is bodies.py too, not wrk: DOWNLOADS (UPLOADS)
# transfers one after another over one keep-alive connection, each checked
# (200, the body whole), with exact byte counts and wall time (wrk counts
# bodies only by duration and would cut the last one off). It reads with
# recv_into a 1 MiB buffer and sends an upload with one sendall, so its own
# cost is mostly the kernel's copies, about wrk's (0.4 s of CPU per GB
# downloaded, both, here); its share of its core is printed with each run and
# stays well below it. HAProxy runs as configured above, without
# `option splice-*` (it copies through its buffers, as credproxy does).
# credproxy's Spark session (as for the other targets) has no refresh token and
# `max_replay_body` is 1 MiB (set in its config), so the upload streams, as
# any body over max_replay_body does. "cpu us/MB" is the proxy's own CPU
# (user + system, on-CPU time of its threads from /proc/PID/task/*/schedstat,
# in ns: clock ticks are too coarse for runs under a second) per MB moved
# (MB = 10^6 bytes); the upstream's is not measured (its threads end with
# their connections). "RSS" is each proxy's resident memory after the
# warm-up and its peak (VmHWM, reset with clear_refs then) over the rounds.
# The report ends with credproxy's ratios to HAProxy: MB/s (higher is
# better; the issue's goal is within 10 %, >= 0.9) and CPU per MB (lower;
# <= 1.1).
#
# Everything listens on 127.0.0.1 only. All servers are stopped on exit and
# the temporary directory (configs, store, key, logs, the download's file)
# is deleted.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=load.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

INSTALL=0
BODIES=0
for arg in "$@"; do
    case $arg in
        --install) INSTALL=1 ;;
        --bodies) BODIES=1 ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-50}
WARMUP=${WARMUP:-2}
if ((BODIES)); then
    TARGETS=${TARGETS:-"upstream haproxy credproxy"}
else
    TARGETS=${TARGETS:-"upstream nginx haproxy credproxy credproxy-info"}
fi
WORKERS=${WORKERS:-1}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT_BASE=${PORT_BASE:-18480}
CREDPROXY_BIN=${CREDPROXY_BIN:-}
DOWNLOADS=${DOWNLOADS:-20}
UPLOADS=${UPLOADS:-40}
DOWNLOAD_MB=${DOWNLOAD_MB:-64}
UPLOAD_MB=${UPLOAD_MB:-16}

in_range DURATION "$DURATION" 1 600
in_range ROUNDS "$ROUNDS" 1 20
in_range CONNECTIONS "$CONNECTIONS" 1 10000
in_range WARMUP "$WARMUP" 0 60
in_range WORKERS "$WORKERS" 1 64
in_range PORT_BASE "$PORT_BASE" 1024 65527
in_range SERVER_CPU "$SERVER_CPU" 0 4095
in_range CLIENT_CPU "$CLIENT_CPU" 0 4095
in_range DOWNLOADS "$DOWNLOADS" 1 1000
in_range UPLOADS "$UPLOADS" 1 1000
in_range DOWNLOAD_MB "$DOWNLOAD_MB" 1 1024
in_range UPLOAD_MB "$UPLOAD_MB" 1 1024
for t in $TARGETS; do
    if ((BODIES)); then
        case $t in
            upstream | haproxy | credproxy | credproxy-info) ;;
            *) die "unknown target '$t' with --bodies (known: upstream haproxy credproxy credproxy-info)" ;;
        esac
        continue
    fi
    case $t in
        upstream | nginx | haproxy | credproxy | credproxy-info | credproxy-budget | credproxy-traced) ;;
        *) die "unknown target '$t' (known: upstream nginx haproxy credproxy credproxy-info credproxy-budget credproxy-traced)" ;;
    esac
done

# ---------------------------------------------------------------- tools

NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
missing=()
if ((BODIES)); then
    command -v python3 >/dev/null || missing+=(python3)
else
    command -v wrk >/dev/null || missing+=(wrk)
    [[ -n $NGINX ]] || missing+=(nginx)
fi
HAPROXY=$(command -v haproxy || true)
[[ -z $HAPROXY && -x /usr/sbin/haproxy ]] && HAPROXY=/usr/sbin/haproxy
[[ " $TARGETS " != *" haproxy "* || -n $HAPROXY ]] || missing+=(haproxy)
if ((${#missing[@]})); then
    if ((INSTALL)); then
        SUDO=()
        if ((EUID != 0)); then
            command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
            SUDO=(sudo)
        fi
        pkgs=()
        for m in "${missing[@]}"; do
            case $m in
                wrk) pkgs+=(wrk) ;;
                nginx) pkgs+=(nginx-light) ;;
                haproxy) pkgs+=(haproxy) ;;
                python3) pkgs+=(python3) ;;
            esac
        done
        "${SUDO[@]}" apt-get update -qq
        if ! DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${pkgs[@]}"; then
            # nginx-light is Debian's; other distributions only have nginx.
            pkgs=("${pkgs[@]/nginx-light/nginx}")
            DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${pkgs[@]}"
        fi
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
        if ((BODIES)) && ! command -v python3 >/dev/null; then
            die "installation did not provide python3"
        elif ((!BODIES)) && { ! command -v wrk >/dev/null || [[ ! -x $NGINX ]]; }; then
            die "installation did not provide wrk and nginx"
        fi
    else
        die "missing: ${missing[*]}; install them (e.g. apt-get install wrk nginx-light haproxy python3) or rerun with --install"
    fi
fi

PIN_SERVER=()
PIN_CLIENT=()
PIN_PROXY=()
CORES=$(nproc 2>/dev/null || echo 1)
if ! command -v taskset >/dev/null; then
    echo "load.sh: taskset not found; processes are not pinned to cores" >&2
elif ((WORKERS == 1)); then
    PIN_SERVER=(taskset -c "$SERVER_CPU")
    PIN_CLIENT=(taskset -c "$CLIENT_CPU")
    PIN_PROXY=("${PIN_SERVER[@]}")
elif ((CORES > WORKERS)); then
    PIN_PROXY=(taskset -c "0-$((WORKERS - 1))")
    PIN_SERVER=(taskset -c "$WORKERS-$((CORES - 1))")
    PIN_CLIENT=("${PIN_SERVER[@]}")
fi

if [[ -z $CREDPROXY_BIN ]]; then
    echo "building credproxy (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet --bin credproxy) || die "cargo build --release failed"
    # Where cargo put it: CARGO_TARGET_DIR (relative to $ROOT, where cargo ran) or target/.
    target=${CARGO_TARGET_DIR:-target}
    [[ $target == /* ]] || target=$ROOT/$target
    CREDPROXY_BIN=$target/release/credproxy
fi
[[ -x $CREDPROXY_BIN ]] || die "not executable: $CREDPROXY_BIN"

# ---------------------------------------------------------------- servers

start_work credproxy-load

UP_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
CP_PORT=$((PORT_BASE + 2))
CP_INFO_PORT=$((PORT_BASE + 3))
CP_ADMIN_PORT=$((PORT_BASE + 4))
CP_INFO_ADMIN_PORT=$((PORT_BASE + 5))
CP_BUDGET_PORT=$((PORT_BASE + 6))
CP_BUDGET_ADMIN_PORT=$((PORT_BASE + 7))
HAPROXY_PORT=$((PORT_BASE + 8))
CP_TRACED_PORT=$((PORT_BASE + 9))
CP_TRACED_ADMIN_PORT=$((PORT_BASE + 10))
OTLP_PORT=$((PORT_BASE + 11))

ports_free "$UP_PORT" "$NGINX_PORT" "$CP_PORT" "$CP_INFO_PORT" "$CP_ADMIN_PORT" "$CP_INFO_ADMIN_PORT" \
    "$CP_BUDGET_PORT" "$CP_BUDGET_ADMIN_PORT" "$HAPROXY_PORT"

# Status code of one GET over bash's /dev/tcp (no curl needed), bounded by `timeout`.
http_status() { # PORT PATH HEADER
    local req
    printf -v req 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\nConnection: close\r\n\r\n' "$2" "$3"
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "%s" "$2" >&3 &&
        read -r _ status _ <&3 && echo "$status"' _ "$1" "$req" || echo "none"
}

# One nginx, master plus one worker, in its own prefix under $WORK.
declare -A PID_OF
start_nginx() { # NAME PORT WORKERS HTTP_BLOCK_BODY
    local dir=$WORK/$1
    mkdir -p "$dir/logs"
    # As root the worker would run as nobody and could not enter $WORK (0700).
    local user=""
    ((EUID == 0)) && user="user root root;"
    cat >"$dir/nginx.conf" <<EOF
$user
worker_processes $3;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
$4
}
EOF
    local pin=("${PIN_SERVER[@]}")
    [[ $1 == upstream ]] || pin=("${PIN_PROXY[@]}")
    "${pin[@]}" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" \
        >"$dir/logs/stdout.log" 2>&1 &
    PIDS+=($!)
    PID_OF[$1]=$!
    wait_port "$2" "nginx ($1)" "$!" "$dir/logs/error.log" "$dir/logs/stdout.log"
}

if ((BODIES)); then
    # The upstream of --bodies: the download's file, made once, and bodies.py.
    mkdir -p "$WORK/bodies"
    head -c $((DOWNLOAD_MB << 20)) /dev/urandom >"$WORK/bodies/download.bin" ||
        die "cannot write the download's file in $WORK"
    "${PIN_SERVER[@]}" python3 "$ROOT/benches/bodies.py" upstream "$UP_PORT" "$WORK/bodies/download.bin" \
        >"$WORK/bodies/upstream.log" 2>&1 &
    PIDS+=($!)
    PID_OF[upstream]=$!
    wait_port "$UP_PORT" "bodies.py upstream" "$!" "$WORK/bodies/upstream.log"
else
    start_nginx upstream "$UP_PORT" 1 "    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            default_type application/json;
            return 200 '{\"ok\":true}';
        }
    }"

    start_nginx proxy "$NGINX_PORT" "$WORKERS" "    upstream up {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location /spark/ {
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \"OAuth sometoken\";
            proxy_set_header X-Credproxy-Session \"\";
            proxy_buffering on;
        }
    }"
fi

if [[ " $TARGETS " == *" haproxy "* ]]; then
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    http-request replace-path ^/spark(/.*) \\1
    http-request set-header Authorization "OAuth sometoken"
    http-request del-header X-Credproxy-Session
    default_backend be
backend be
    http-reuse always
    server api 127.0.0.1:$UP_PORT
EOF
    "${PIN_PROXY[@]}" "$HAPROXY" -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
    PID_OF[haproxy]=$!
    wait_port "$HAPROXY_PORT" haproxy "$!" "$WORK/haproxy.log"
fi

# credproxy: a generated config with inline secrets; store and key in $WORK.
CFG=$WORK/credproxy.toml
cat >"$CFG" <<EOF
[server]
listen = "127.0.0.1:$CP_PORT"
admin_listen = "127.0.0.1:$CP_ADMIN_PORT"

[store]
url = "sqlite://$WORK/credproxy.db"
key_file = "$WORK/credproxy.key"

[providers.spark]
kind = "spark"
api_base = "http://127.0.0.1:$UP_PORT"
token_url = "http://127.0.0.1:$UP_PORT/v1/oauth2/grant"
authorize_url = "http://127.0.0.1:$UP_PORT/openid"
client_id = "load-client"
client_secret = "load-client-secret"
user_agent = "credproxy-load/1.0"
EOF
if ((BODIES)); then
    # The default, written out: a body over it streams (and the session has
    # no refresh token, so nothing is kept for a replay either).
    echo 'max_replay_body = 1048576' >>"$CFG"
fi
# The info-level instance shares the store; only its listeners differ.
CFG_INFO=$WORK/credproxy-info.toml
sed -e "s/:$CP_PORT\"/:$CP_INFO_PORT\"/" -e "s/:$CP_ADMIN_PORT\"/:$CP_INFO_ADMIN_PORT\"/" "$CFG" >"$CFG_INFO"
# The budget instance: the same, with a rate limit it never comes near.
CFG_BUDGET=$WORK/credproxy-budget.toml
sed -e "s/:$CP_PORT\"/:$CP_BUDGET_PORT\"/" -e "s/:$CP_ADMIN_PORT\"/:$CP_BUDGET_ADMIN_PORT\"/" "$CFG" >"$CFG_BUDGET"
echo 'rate_limit = { requests = 1000000, per = "1s" }' >>"$CFG_BUDGET"
# The traced instance: every request's trace exported to a loopback sink.
CFG_TRACED=$WORK/credproxy-traced.toml
sed -e "s/:$CP_PORT\"/:$CP_TRACED_PORT\"/" -e "s/:$CP_ADMIN_PORT\"/:$CP_TRACED_ADMIN_PORT\"/" "$CFG" >"$CFG_TRACED"
printf '\n[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0\n' "$OTLP_PORT" >>"$CFG_TRACED"

json=$(RUST_LOG=warn "$CREDPROXY_BIN" session add --provider spark --access-token sometoken \
    --label load --json --config "$CFG") || die "credproxy session add failed"
KEY=$(sed -n 's/.*"session_key"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$json")
[[ -n $KEY ]] || die "no session_key in: $json"

start_credproxy() { # NAME CONFIG PORT RUST_LOG
    RUST_LOG=$4 TOKIO_WORKER_THREADS=$WORKERS "${PIN_PROXY[@]}" "$CREDPROXY_BIN" serve --config "$2" \
        >>"$WORK/$1.log" 2>&1 & # append mode, so truncating it between runs frees the space
    PIDS+=($!)
    PID_OF[$1]=$!
    wait_port "$3" "$1" "$!" "$WORK/$1.log"
    # Show what TOKIO_WORKER_THREADS gave us (sqlx's SQLite threads idle on cache hits).
    if [[ -d /proc/$!/task ]]; then
        echo "$1 threads: $(cat /proc/$!/task/*/comm 2>/dev/null | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')" >&2
    fi
}
for t in $TARGETS; do
    case $t in
        credproxy) start_credproxy credproxy "$CFG" "$CP_PORT" warn ;;
        credproxy-info) start_credproxy credproxy-info "$CFG_INFO" "$CP_INFO_PORT" info ;;
        credproxy-budget) start_credproxy credproxy-budget "$CFG_BUDGET" "$CP_BUDGET_PORT" warn ;;
        credproxy-traced)
            # The OTLP sink: reads each export and answers 200 (its own CPU
            # is not counted: only the proxy's is).
            python3 - "$OTLP_PORT" >"$WORK/otlp-sink.log" 2>&1 <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
            PIDS+=($!)
            start_credproxy credproxy-traced "$CFG_TRACED" "$CP_TRACED_PORT" warn
            ;;
    esac
done

SESSION_HEADER="X-Credproxy-Session: $KEY"
port_of() {
    case $1 in
        upstream) echo "$UP_PORT" ;;
        nginx) echo "$NGINX_PORT" ;;
        haproxy) echo "$HAPROXY_PORT" ;;
        credproxy) echo "$CP_PORT" ;;
        credproxy-info) echo "$CP_INFO_PORT" ;;
        credproxy-budget) echo "$CP_BUDGET_PORT" ;;
        credproxy-traced) echo "$CP_TRACED_PORT" ;;
    esac
}
# The proxies serve the upstream under /spark.
prefix_of() { [[ $1 == upstream ]] || echo /spark; }
url_of() { echo "http://127.0.0.1:$(port_of "$1")$(prefix_of "$1")/v1/listings"; }

# ---------------------------------------------------------------- bodies (--bodies)

if ((BODIES)); then
    RESULTS=$WORK/results.tsv
    : >"$RESULTS"

    # On-CPU nanoseconds (user + system) of a process's threads and its
    # children's: clock ticks (10 ms) are too coarse for runs under a second.
    cpu_ns() { # PID
        local p
        for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
            cat /proc/"$p"/task/*/schedstat 2>/dev/null || true
        done | awk '{ s += $1 } END { printf "%.0f", s }'
    }
    kb_of() { # PID FIELD: a VmRSS/VmHWM figure from /proc/PID/status, in kB
        awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null
    }

    # N transfers of one kind through one target, one after another on one
    # connection: "transfers bytes seconds client_cpu_seconds" on stdout.
    transfer() { # TARGET download|upload N
        local args
        if [[ $2 == download ]]; then
            args=(get "$(port_of "$1")" "$(prefix_of "$1")/v1/files/download.bin" "$SESSION_HEADER" "$3")
        else
            args=(post "$(port_of "$1")" "$(prefix_of "$1")/v1/uploads" "$SESSION_HEADER" "$3" $((UPLOAD_MB << 20)))
        fi
        "${PIN_CLIENT[@]}" timeout $(($3 * 10 + 30)) python3 "$ROOT/benches/bodies.py" "${args[@]}"
    }

    measure_bodies() { # TARGET download|upload ROUND
        local pid=${PID_OF[$1]} n=$DOWNLOADS mib=$DOWNLOAD_MB out c0 c1 count bytes secs client
        if [[ $2 == upload ]]; then
            n=$UPLOADS mib=$UPLOAD_MB
        fi
        c0=$(cpu_ns "$pid")
        out=$(transfer "$1" "$2" "$n") || die "$2 through $1 failed (round $3)"
        c1=$(cpu_ns "$pid")
        read -r count bytes secs client <<<"$out"
        [[ $count == "$n" && $bytes -gt 0 ]] || die "cannot read the client's output for $1: $out"
        # The upstream's threads end with their connections (and their
        # schedstat with them): its CPU is not measured.
        [[ $1 != upstream ]] || c1=$((c0 - 1))
        awk -v t="$1" -v k="$2" -v r="$3" -v n="$n" -v mib="$mib" -v b="$bytes" -v s="$secs" \
            -v c="$client" -v d=$((c1 - c0)) -v out="$RESULTS" 'BEGIN {
            mbs = b / s / 1e6; cpu = d < 0 ? -1 : d / 1e3 / (b / 1e6)
            printf "%s\t%s\t%.1f\t%.1f\n", t, k, mbs, cpu >> out
            printf "  round %d  %-15s %-8s %8.1f MB/s  cpu %7s us/MB   (%d x %d MiB in %.2f s; client cpu %.0f %%)\n",
                r, t, k, mbs, cpu < 0 ? "-" : sprintf("%.1f", cpu), n, mib, s, 100 * c / s
        }'
    }

    n_targets=$(wc -w <<<"$TARGETS")
    placement="servers and client unpinned ($CORES cores: too few to pin $WORKERS workers apart)"
    ((WORKERS == 1 && ${#PIN_SERVER[@]})) && placement="servers on cpu $SERVER_CPU, client on cpu $CLIENT_CPU"
    ((WORKERS > 1 && ${#PIN_PROXY[@]})) && placement="proxies on cpus 0-$((WORKERS - 1)), upstream and client on the rest"
    echo "bodies: $ROUNDS rounds x $n_targets targets x ($DOWNLOADS downloads of $DOWNLOAD_MB MiB, $UPLOADS uploads of $UPLOAD_MB MiB), one connection; $WORKERS worker(s) per proxy; $placement"
    if ((WARMUP > 0)); then
        for t in $TARGETS; do
            transfer "$t" download 1 >/dev/null || die "a download through $t failed"
            transfer "$t" upload 1 >/dev/null || die "an upload through $t failed"
        done
    fi
    # Peak RSS over the measured rounds: VmHWM, reset to the current RSS now.
    declare -A RSS0
    for t in $TARGETS; do
        [[ $t == upstream ]] && continue
        RSS0[$t]=$(kb_of "${PID_OF[$t]}" VmRSS)
        echo 5 >"/proc/${PID_OF[$t]}/clear_refs" 2>/dev/null ||
            echo "load.sh: cannot reset $t's VmHWM; its peak RSS is since it started" >&2
    done
    for r in $(seq "$ROUNDS"); do
        for t in $TARGETS; do
            measure_bodies "$t" download "$r"
            measure_bodies "$t" upload "$r"
        done
    done
    rss=""
    for t in $TARGETS; do
        [[ $t == upstream ]] && continue
        rss+="$t=${RSS0[$t]:-0}:$(kb_of "${PID_OF[$t]}" VmHWM) "
        if [[ $t == credproxy-info ]]; then
            echo "credproxy-info access log, last line: $(tail -n 1 "$WORK/credproxy-info.log")"
        fi
    done

    # Medians across rounds, then credproxy's ratios to HAProxy.
    awk -F '\t' -v order="$TARGETS" -v rss="$rss" '
    function median(list,    a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) {            # insertion sort: n is tiny
            t = a[i] + 0
            for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]
            a[j + 1] = t
        }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function us(v) { return v < 0 ? "-" : sprintf("%.1f", v) }
    { mbs[$1, $2] = mbs[$1, $2] " " $3; cpu[$1, $2] = cpu[$1, $2] " " $4; rounds[$1, $2]++ }
    END {
        n = split(rss, pairs, " ")
        for (i = 1; i <= n; i++) {
            split(pairs[i], kv, "="); split(kv[2], ab, ":")
            start[kv[1]] = ab[1] / 1024; peak[kv[1]] = ab[2] / 1024
        }
        n = split(order, names, " ")
        printf "\n%-17s %12s %12s %12s %12s %14s\n", "target", "down MB/s", "cpu us/MB", "up MB/s", "cpu us/MB", "RSS MB, peak"
        for (i = 1; i <= n; i++) {
            t = names[i]
            D[t] = median(mbs[t, "download"]); DC[t] = median(cpu[t, "download"])
            U[t] = median(mbs[t, "upload"]); UC[t] = median(cpu[t, "upload"])
            m = (t in peak) ? sprintf("%.0f, %.0f", start[t], peak[t]) : "-"
            printf "%-17s %12.1f %12s %12.1f %12s %14s\n", t, D[t], us(DC[t]), U[t], us(UC[t]), m
        }
        printf "(medians of %d rounds; MB = 10^6 bytes; cpu: the proxy own, the upstream not included;\n", rounds[names[1], "download"]
        printf " RSS: after the warm-up, and its peak (VmHWM) over the rounds)\n\n"
        for (i = 1; i <= n; i++) {
            t = names[i]
            if (t !~ /^credproxy/ || !("haproxy" in D) || D["haproxy"] <= 0 || U["haproxy"] <= 0 || DC["haproxy"] <= 0 || UC["haproxy"] <= 0) continue
            printf "%-17s / haproxy  download: MB/s x%.2f (goal >= 0.9)  cpu/MB x%.2f (<= 1.1)   upload: MB/s x%.2f (>= 0.9)  cpu/MB x%.2f (<= 1.1)\n", t, D[t] / D["haproxy"], DC[t] / DC["haproxy"], U[t] / U["haproxy"], UC[t] / UC["haproxy"]
        }
    }' "$RESULTS"
    exit 0
fi

# Every target must answer 200 before its figures mean anything.
for t in $TARGETS; do
    u=$(url_of "$t")
    port=${u#http://127.0.0.1:}
    port=${port%%/*}
    s=$(http_status "$port" "/${u#http://127.0.0.1:*/}" "$SESSION_HEADER")
    [[ $s == 200 ]] || die "$t answered '$s' instead of 200 at $u"
done

# ---------------------------------------------------------------- load

# wrk's latency to microseconds: 812.00us, 1.20ms, 2.01s.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n = n
        else if (v ~ /ms$/) n = n * 1000
        else if (v ~ /s$/) n = n * 1000000
        printf "%.1f", n
    }'
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"

run_wrk() { # TARGET SECONDS -> wrk output on stdout
    "${PIN_CLIENT[@]}" timeout $(($2 + 30)) wrk -t1 -c"$CONNECTIONS" -d"${2}s" --latency \
        -H "$SESSION_HEADER" "$(url_of "$1")"
}

# CPU ticks (user + system) of a process, its threads and its children (an
# nginx master's workers).
ticks() { # PID
    local total=0 p f
    for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
        f=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || f=0
        total=$((total + ${f:-0}))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)
pid_of() { case $1 in nginx) echo "${PID_OF[proxy]}" ;; *) echo "${PID_OF[$1]}" ;; esac; }

measure() { # TARGET ROUND
    local out rps p50 p99 bad errors t0 t1 n cpu
    t0=$(ticks "$(pid_of "$1")")
    out=$(run_wrk "$1" "$DURATION") || die "wrk failed against $1"
    t1=$(ticks "$(pid_of "$1")")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="${n:-0}" 'BEGIN { printf "%.1f", (n > 0 ? d / hz * 1e6 / n : 0) }')
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    errors=$(awk '/Socket errors:/ {sub(/.*Socket errors: /, ""); print}' <<<"$out")
    [[ -n $rps && -n $p50 && -n $p99 ]] || die "cannot read wrk's output for $1: $out"
    p50=$(to_us "$p50")
    p99=$(to_us "$p99")
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$rps" "$p50" "$p99" "$cpu" >>"$RESULTS"
    printf '  round %d  %-15s %10s req/s  p50 %8s us  p99 %8s us  cpu %6s us/req%s%s\n' "$2" "$1" "$rps" "$p50" "$p99" "$cpu" \
        "${bad:+  NON-2xx: $bad}" "${errors:+  socket errors: $errors}"
}

n_targets=$(wc -w <<<"$TARGETS")
placement="servers and wrk unpinned ($CORES cores: too few to pin $WORKERS workers apart)"
((WORKERS == 1 && ${#PIN_SERVER[@]})) && placement="servers on cpu $SERVER_CPU, wrk on cpu $CLIENT_CPU"
((WORKERS > 1 && ${#PIN_PROXY[@]})) && placement="proxies on cpus 0-$((WORKERS - 1)), upstream and wrk on the rest"
echo "load: $ROUNDS rounds x $n_targets targets x ${DURATION}s, wrk -t1 -c$CONNECTIONS, $WORKERS worker(s) per proxy; $placement"
if ((WARMUP > 0)); then
    for t in $TARGETS; do
        run_wrk "$t" "$WARMUP" >/dev/null || die "wrk failed against $t"
    done
    [[ ! -f $WORK/credproxy-info.log ]] || : >"$WORK/credproxy-info.log"
fi
for r in $(seq "$ROUNDS"); do
    for t in $TARGETS; do
        measure "$t" "$r"
        if [[ $t == credproxy-info ]]; then
            log=$WORK/credproxy-info.log
            lines=$(wc -l <"$log")
            bytes=$(wc -c <"$log")
            ((lines > 0)) && printf '           access log: %d lines, %d bytes/line\n' "$lines" $((bytes / lines))
            ((r == ROUNDS)) && echo "           last line: $(tail -n 1 "$log")"
            : >"$log"
        fi
    done
done

# ---------------------------------------------------------------- report

# Medians across rounds, then each credproxy target's ratios to HAProxy and nginx.
awk -F '\t' -v order="$TARGETS" '
function median(list,    a, n, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) {            # insertion sort: n is tiny
        t = a[i] + 0
        for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]
        a[j + 1] = t
    }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ rps[$1] = rps[$1] " " $2; p50[$1] = p50[$1] " " $3; p99[$1] = p99[$1] " " $4; cpu[$1] = cpu[$1] " " $5 }
END {
    n = split(order, names, " ")
    printf "\n%-17s %12s %10s %10s %12s\n", "target", "req/s", "p50 us", "p99 us", "cpu us/req"
    for (i = 1; i <= n; i++) {
        t = names[i]
        R[t] = median(rps[t]); P50[t] = median(p50[t]); P99[t] = median(p99[t]); C[t] = median(cpu[t])
        printf "%-17s %12.0f %10.1f %10.1f %12.1f\n", t, R[t], P50[t], P99[t], C[t]
    }
    printf "(medians of %d rounds; cpu us/req: the proxy own CPU, the upstream not included)\n\n", split(rps[names[1]], x, " ")
    for (i = 1; i <= n; i++) {
        t = names[i]
        if (t !~ /^credproxy/) continue
        for (k = 1; k <= 2; k++) {
            peer = k == 1 ? "haproxy" : "nginx"
            if (!(peer in R) || R[peer] <= 0 || P99[peer] <= 0 || C[peer] <= 0) continue
            printf "%-17s / %-8s req/s x%.2f (goal >= 1)   p99 x%.2f (<= 1)   cpu/req x%.2f (<= 1)\n", t, peer, R[t] / R[peer], P99[t] / P99[peer], C[t] / C[peer]
        }
    }
    if ("credproxy-traced" in R && C["credproxy"] > 0)
        printf "%-17s / credproxy: cpu/req +%.1f us (x%.2f)   req/s x%.3f   (every request traced and exported)\n", "credproxy-traced", C["credproxy-traced"] - C["credproxy"], C["credproxy-traced"] / C["credproxy"], R["credproxy-traced"] / R["credproxy"]
    if ("credproxy-budget" in R && R["credproxy"] > 0 && P99["credproxy"] > 0)
        printf "%-17s / credproxy: req/s x%.3f   p99 x%.2f   (a budget far from spent)\n", "credproxy-budget", R["credproxy-budget"] / R["credproxy"], P99["credproxy-budget"] / P99["credproxy"]
}' "$RESULTS"
