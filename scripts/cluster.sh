#!/usr/bin/env bash
# docker-compose.yml's topology from local processes: two credproxy instances
# sharing one store and one sealing key, and nginx in front of them, running
# deploy/nginx.conf itself. Everything listens on 127.0.0.1.
#
#   scripts/cluster.sh up --providers FILE [--run-dir DIR]   start; prints the URLs
#   scripts/cluster.sh status [--run-dir DIR]                what is running
#   scripts/cluster.sh down [--run-dir DIR]                  stop everything
#
# `up` prints shell assignments on stdout (eval or source them; the same lines
# are in RUN_DIR/cluster.env) and progress on stderr:
#
#   CLUSTER_PROXY_URL=http://127.0.0.1:18080     the proxy, through nginx
#   CLUSTER_ADMIN_URL=http://127.0.0.1:18090     admin/OAuth, through nginx (= public_url)
#   CLUSTER_INSTANCE_1_PROXY_URL=...  CLUSTER_INSTANCE_1_ADMIN_URL=...  CLUSTER_INSTANCE_1_PID=...
#   CLUSTER_INSTANCE_2_...            CLUSTER_NGINX_PID=...  CLUSTER_RUN_DIR=...
#   CLUSTER_CONFIG_1=RUN_DIR/instance-1.toml ...  CLUSTER_KEY_FILE=...  CLUSTER_ADMIN_TOKEN_FILE=...
#
# --providers FILE is a TOML fragment with the [providers.NAME] tables (for
# tests: pointing at local stand-ins); the script writes [server], [store]
# and [admin] around it, one config per instance.
#
# Environment (all optional):
#   CREDPROXY_BIN          the binary (default: target/debug/credproxy)
#   STORE_URL              the store, overriding the next two (e.g. sqlite://cluster.db,
#                          relative to the run directory)
#   CREDPROXY_TEST_DATABASE_URL   else this PostgreSQL URL, else scripts/test-postgres.sh's
#   CREDPROXY_KEY          the sealing key (base64 of 32 bytes); default: RUN_DIR/credproxy.key,
#                          generated on first use and kept across down/up
#   CREDPROXY_ADMIN_TOKEN  default: RUN_DIR/admin-token, generated likewise
#   CLUSTER_INSTANCES      how many credproxy processes (default 2)
#   CLUSTER_PROXY_PORT_N   instance N's proxy port (default 18080+N: 18081, 18082)
#   CLUSTER_ADMIN_PORT_N   instance N's admin port (default 18090+N: 18091, 18092)
#   CLUSTER_LB_PROXY_PORT  nginx's proxy port (default 18080)
#   CLUSTER_LB_ADMIN_PORT  nginx's admin port (default 18090)
#   CLUSTER_SERVER_TOML    extra lines for [server] (e.g. 'shutdown_grace = 5')
#   CLUSTER_STORE_TOML     extra lines for [store] (e.g. 'invalidation_interval = 0.5')
#   CLUSTER_RUN_DIR        run directory (default: target/cluster); --run-dir wins
#   CLUSTER_WAIT           seconds to wait for each process to become ready (default 30)
#   NGINX                  the nginx binary (default: nginx; installed with apt-get if missing)
#
# Logs: RUN_DIR/instance-N.log and RUN_DIR/nginx.log. A failing `up` stops
# whatever it had started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
PROVIDERS=""
RUN_DIR="${CLUSTER_RUN_DIR:-$ROOT/target/cluster}"
while [ $# -gt 0 ]; do
    case "$1" in
        --providers) [ $# -ge 2 ] || die "--providers needs a file"; PROVIDERS="$2"; shift 2 ;;
        --providers=*) PROVIDERS="${1#*=}"; shift ;;
        --run-dir) [ $# -ge 2 ] || die "--run-dir needs a directory"; RUN_DIR="$2"; shift 2 ;;
        --run-dir=*) RUN_DIR="${1#*=}"; shift ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
PID_DIR="$RUN_DIR/pids"

N="${CLUSTER_INSTANCES:-2}"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "CLUSTER_INSTANCES must be a positive number"
LB_PROXY_PORT="${CLUSTER_LB_PROXY_PORT:-18080}"
LB_ADMIN_PORT="${CLUSTER_LB_ADMIN_PORT:-18090}"
proxy_port() { local v="CLUSTER_PROXY_PORT_$1"; echo "${!v:-$((18080 + $1))}"; }
admin_port() { local v="CLUSTER_ADMIN_PORT_$1"; echo "${!v:-$((18090 + $1))}"; }
WAIT="${CLUSTER_WAIT:-30}"

# --- processes ---------------------------------------------------------------

# A pid file holds "PID<TAB>MARKER": MARKER must appear in the process's
# command line, so a stale file never makes us signal someone else's process.
pid_alive() { # FILE -> prints the pid when that process is still ours
    local file="$1" pid marker cmdline
    [ -f "$file" ] || return 1
    IFS=$'\t' read -r pid marker <"$file" || true
    [[ $pid =~ ^[0-9]+$ ]] && [ -n "$marker" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ $cmdline == *"$marker"* ]] || return 1
    echo "$pid"
}

# Start a command in the background with no descriptor of ours above 2 (a
# caller's "$(scripts/cluster.sh up)" must not wait for the cluster to exit),
# stdin from /dev/null, output appended to LOG. Sets SPAWNED to its pid.
spawn() { # LOG CMD...
    local out="$1"; shift
    (
        for fd in "/proc/$BASHPID/fd"/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        cd "$RUN_DIR"
        exec "$@" </dev/null >>"$out" 2>&1
    ) &
    SPAWNED=$!
}

stop_one() { # NAME PIDFILE
    local name="$1" file="$2" pid i
    if pid=$(pid_alive "$file"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) still running after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        # Reap it when it is our own child (a failing `up`); harmless otherwise.
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

do_down() {
    # nginx first, so no new request reaches an instance that is stopping.
    stop_one nginx "$PID_DIR/nginx.pid"
    local f
    for f in "$PID_DIR"/instance-*.pid; do
        [ -e "$f" ] || continue
        local name="${f##*/}"
        stop_one "${name%.pid}" "$f"
    done
    rm -f "$RUN_DIR/cluster.env"
}

do_status() {
    local f any=1 pid name
    for f in "$PID_DIR"/instance-*.pid "$PID_DIR/nginx.pid"; do
        [ -e "$f" ] || continue
        name="${f##*/}"; name="${name%.pid}"
        if pid=$(pid_alive "$f"); then
            echo "$name: running (pid $pid)"
            any=0
        else
            echo "$name: not running"
        fi
    done
    [ "$any" -eq 0 ] && [ -f "$RUN_DIR/cluster.env" ] && cat "$RUN_DIR/cluster.env"
    return "$any"
}

# --- HTTP probes -------------------------------------------------------------

http_status() { # URL -> the status code, or 000
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true
    else
        local hostport="${1#http://}" path
        path="/${hostport#*/}"; hostport="${hostport%%/*}"
        (
            exec 5<>"/dev/tcp/${hostport%:*}/${hostport#*:}" || exit 0
            printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&5
            timeout 2 head -n1 <&5 | awk '{ print $2 }'
        ) 2>/dev/null || true
    fi
}

port_in_use() { (exec 5<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_ready() { # NAME URL PIDFILE LOG
    local name="$1" url="$2" file="$3" out="$4" deadline=$((SECONDS + WAIT)) code
    while :; do
        code=$(http_status "$url")
        [ "$code" = 200 ] && return 0
        if ! pid_alive "$file" >/dev/null; then
            log "$name exited; the end of $out:"
            tail -n 20 "$out" >&2 || true
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$name: $url still answers ${code:-nothing} after ${WAIT}s; the end of $out:"
            tail -n 20 "$out" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# --- up ----------------------------------------------------------------------

toml_string() { # a TOML basic string
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

random_key() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -base64 32
    else
        head -c 32 /dev/urandom | base64
    fi
}

# deploy/nginx.conf, rewritten for local processes: every
# "server credproxy-1:PORT ..." line becomes one line per instance on
# 127.0.0.1, the other credproxy-N lines go, "listen 8080;"/"listen 8081;"
# move to 127.0.0.1 and the LB ports, Docker's resolver and the `resolve`
# parameters go (local nginx may predate 1.27.3), temp files stay under the
# run directory.
nginx_conf() {
    local proxy_ports="" admin_ports="" i
    for ((i = 1; i <= N; i++)); do
        proxy_ports+="$(proxy_port "$i") "
        admin_ports+="$(admin_port "$i") "
    done
    awk -v proxy_ports="$proxy_ports" -v admin_ports="$admin_ports" \
        -v lb_proxy="$LB_PROXY_PORT" -v lb_admin="$LB_ADMIN_PORT" '
        function servers(line, ports,    n, p, k, out) {
            n = split(ports, p, " ")
            sub(/ resolve/, "", line)
            for (k = 1; k <= n; k++) {
                out = line
                sub(/credproxy-1:[0-9]+/, "127.0.0.1:" p[k], out)
                print out
            }
        }
        /^[ \t]*server credproxy-1:8080[ ;]/ { servers($0, proxy_ports); next }
        /^[ \t]*server credproxy-1:8081[ ;]/ { servers($0, admin_ports); next }
        /^[ \t]*server credproxy-[0-9]+:/ { next }
        /^[ \t]*resolver(_timeout)?[ \t]/ { next }
        /^[ \t]*listen 8080;/ { sub(/8080/, "127.0.0.1:" lb_proxy); print; next }
        /^[ \t]*listen 8081;/ { sub(/8081/, "127.0.0.1:" lb_admin); print; next }
        /^worker_processes / { print "worker_processes 2;"; next }
        /^http \{/ {
            print
            print "    client_body_temp_path temp/body;"
            print "    proxy_temp_path temp/proxy;"
            print "    fastcgi_temp_path temp/fastcgi;"
            print "    uwsgi_temp_path temp/uwsgi;"
            print "    scgi_temp_path temp/scgi;"
            next
        }
        { print }
    ' "$ROOT/deploy/nginx.conf"
}

ensure_nginx() {
    NGINX="${NGINX:-nginx}"
    command -v "$NGINX" >/dev/null 2>&1 && return 0
    if [ "$NGINX" != nginx ] || [ "$(id -u)" -ne 0 ]; then
        die "$NGINX not found (apt-get install nginx)"
    fi
    log "installing nginx"
    # RUNLEVEL=1: the package must not start its own server on port 80.
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >&2
    command -v nginx >/dev/null 2>&1 || die "nginx is still missing after installing"
}

UP_DONE=0
on_up_exit() {
    local rc=$?
    if [ "$UP_DONE" -ne 1 ]; then
        log "up failed; stopping what it started"
        do_down
        exit $((rc == 0 ? 1 : rc))
    fi
}

do_up() {
    [ -n "$PROVIDERS" ] || die "up needs --providers FILE (a TOML fragment with [providers.NAME] tables)"
    [ -r "$PROVIDERS" ] || die "cannot read $PROVIDERS"
    grep -qE '^[[:space:]]*\[providers\.' "$PROVIDERS" || die "$PROVIDERS has no [providers.NAME] table"
    if grep -qE '^[[:space:]]*\[(server|store|admin)\]' "$PROVIDERS"; then
        die "$PROVIDERS must hold only [providers.*] tables (use CLUSTER_SERVER_TOML / CLUSTER_STORE_TOML)"
    fi

    local bin="${CREDPROXY_BIN:-$ROOT/target/debug/credproxy}"
    [ -x "$bin" ] || die "$bin not found: build it (cargo build) or set CREDPROXY_BIN"
    bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
    ensure_nginx

    if do_status >/dev/null 2>&1; then
        die "a cluster is already running from $RUN_DIR (scripts/cluster.sh down first)"
    fi
    local i p
    for p in "$LB_PROXY_PORT" "$LB_ADMIN_PORT"; do
        ! port_in_use "$p" || die "127.0.0.1:$p is already in use"
    done
    for ((i = 1; i <= N; i++)); do
        for p in "$(proxy_port "$i")" "$(admin_port "$i")"; do
            ! port_in_use "$p" || die "127.0.0.1:$p is already in use"
        done
    done

    local url="${STORE_URL:-${CREDPROXY_TEST_DATABASE_URL:-}}"
    if [ -z "$url" ]; then
        log "no STORE_URL or CREDPROXY_TEST_DATABASE_URL: starting PostgreSQL with scripts/test-postgres.sh"
        url="$("$ROOT/scripts/test-postgres.sh")"
    fi

    # nginx's workers may run as another user (nobody, when started as root).
    (umask 022 && mkdir -p "$RUN_DIR/nginx/temp")
    # Keys, tokens and configs (the store URL may hold a password): ours only.
    umask 077
    mkdir -p "$PID_DIR"
    # One sealing key for all instances, kept in the run directory so that a
    # later `up` on the same store can still open its tokens.
    if [ -n "${CREDPROXY_KEY:-}" ]; then
        printf '%s\n' "$CREDPROXY_KEY" >"$RUN_DIR/credproxy.key"
    elif [ -s "$RUN_DIR/credproxy.key" ]; then
        CREDPROXY_KEY="$(cat "$RUN_DIR/credproxy.key")"
    else
        CREDPROXY_KEY="$(random_key)"
        printf '%s\n' "$CREDPROXY_KEY" >"$RUN_DIR/credproxy.key"
    fi
    if [ -n "${CREDPROXY_ADMIN_TOKEN:-}" ]; then
        printf '%s\n' "$CREDPROXY_ADMIN_TOKEN" >"$RUN_DIR/admin-token"
    elif [ -s "$RUN_DIR/admin-token" ]; then
        CREDPROXY_ADMIN_TOKEN="$(cat "$RUN_DIR/admin-token")"
    else
        CREDPROXY_ADMIN_TOKEN="$(random_key | tr '+/' '-_' | tr -d '=\n')"
        printf '%s\n' "$CREDPROXY_ADMIN_TOKEN" >"$RUN_DIR/admin-token"
    fi
    export CREDPROXY_KEY CREDPROXY_ADMIN_TOKEN

    trap on_up_exit EXIT

    local public_url="http://127.0.0.1:$LB_ADMIN_PORT" conf out
    for ((i = 1; i <= N; i++)); do
        conf="$RUN_DIR/instance-$i.toml"
        {
            echo "# Written by scripts/cluster.sh for instance $i of $N; rewritten by every 'up'."
            echo "[server]"
            echo "listen = \"127.0.0.1:$(proxy_port "$i")\""
            echo "admin_listen = \"127.0.0.1:$(admin_port "$i")\""
            echo "public_url = \"$public_url\""
            [ -z "${CLUSTER_SERVER_TOML:-}" ] || printf '%s\n' "$CLUSTER_SERVER_TOML"
            echo
            echo "[store]"
            echo "url = $(toml_string "$url")"
            echo "key_env = \"CREDPROXY_KEY\""
            [ -z "${CLUSTER_STORE_TOML:-}" ] || printf '%s\n' "$CLUSTER_STORE_TOML"
            echo
            echo "[admin]"
            echo "token_env = \"CREDPROXY_ADMIN_TOKEN\""
            echo
            echo "# From $PROVIDERS:"
            cat "$PROVIDERS"
        } >"$conf"
    done

    # The instances start one after the other: the first applies the
    # store's migrations, the others find them done.
    for ((i = 1; i <= N; i++)); do
        conf="$RUN_DIR/instance-$i.toml"
        out="$RUN_DIR/instance-$i.log"
        : >"$out"
        log "starting instance $i: proxy 127.0.0.1:$(proxy_port "$i"), admin 127.0.0.1:$(admin_port "$i")"
        spawn "$out" "$bin" serve --config "$conf"
        printf '%s\t%s\n' "$SPAWNED" "$conf" >"$PID_DIR/instance-$i.pid"
        wait_ready "instance $i" "http://127.0.0.1:$(admin_port "$i")/readyz" "$PID_DIR/instance-$i.pid" "$out"
    done

    nginx_conf >"$RUN_DIR/nginx/nginx.conf"
    out="$RUN_DIR/nginx.log"
    : >"$out"
    if ! "$NGINX" -t -q -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf" -e stderr \
        -g "pid $RUN_DIR/nginx/nginx.pid;" >>"$out" 2>&1; then
        cat "$out" >&2
        die "nginx rejects $RUN_DIR/nginx/nginx.conf"
    fi
    log "starting nginx: proxy 127.0.0.1:$LB_PROXY_PORT, admin 127.0.0.1:$LB_ADMIN_PORT"
    spawn "$out" "$NGINX" -p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx/nginx.conf" -e stderr \
        -g "daemon off; pid $RUN_DIR/nginx/nginx.pid;"
    printf '%s\t%s\n' "$SPAWNED" "$RUN_DIR/nginx/nginx.conf" >"$PID_DIR/nginx.pid"
    wait_ready nginx "http://127.0.0.1:$LB_ADMIN_PORT/readyz" "$PID_DIR/nginx.pid" "$out"
    # The proxy port too: an unknown route comes back as credproxy's own 404.
    local code
    code=$(http_status "http://127.0.0.1:$LB_PROXY_PORT/cluster-sh-probe/")
    [ "$code" = 404 ] || die "http://127.0.0.1:$LB_PROXY_PORT/ answers $code, expected credproxy's 404"

    {
        echo "CLUSTER_PROXY_URL=http://127.0.0.1:$LB_PROXY_PORT"
        echo "CLUSTER_ADMIN_URL=$public_url"
        for ((i = 1; i <= N; i++)); do
            echo "CLUSTER_INSTANCE_${i}_PROXY_URL=http://127.0.0.1:$(proxy_port "$i")"
            echo "CLUSTER_INSTANCE_${i}_ADMIN_URL=http://127.0.0.1:$(admin_port "$i")"
            echo "CLUSTER_INSTANCE_${i}_PID=$(pid_alive "$PID_DIR/instance-$i.pid")"
            echo "CLUSTER_CONFIG_${i}=$RUN_DIR/instance-$i.toml"
        done
        echo "CLUSTER_NGINX_PID=$(pid_alive "$PID_DIR/nginx.pid")"
        echo "CLUSTER_RUN_DIR=$RUN_DIR"
        echo "CLUSTER_KEY_FILE=$RUN_DIR/credproxy.key"
        echo "CLUSTER_ADMIN_TOKEN_FILE=$RUN_DIR/admin-token"
    } >"$RUN_DIR/cluster.env"
    UP_DONE=1
    trap - EXIT
    cat "$RUN_DIR/cluster.env"
    log "up: proxy http://127.0.0.1:$LB_PROXY_PORT, admin $public_url; stop with: scripts/cluster.sh down${RUN_DIR:+ --run-dir $RUN_DIR}"
    log "CLI on the same store: CREDPROXY_KEY=\$(cat $RUN_DIR/credproxy.key) $bin session list --config $RUN_DIR/instance-1.toml"
}

case "$cmd" in
    up) do_up ;;
    down) do_down; log "down" ;;
    status) do_status ;;
    -h|--help|help) usage ;;
    *) die "unknown command: $cmd (up, down or status)" ;;
esac
