#!/usr/bin/env bash
# Start a local PostgreSQL 15 for the tests and print its URL, once, on stdout.
#
#   export CREDPROXY_TEST_DATABASE_URL="$(scripts/test-postgres.sh)"
#
# Uses Debian's postgresql-15 cluster "15 main" on 127.0.0.1:5432, installing
# the package if it is missing, creating the cluster if it does not exist and
# starting it if it is down. Then (re)creates the login role the tests use
# (CREATEDB: every test creates its own database) with a known password, and a
# database owned by it. Idempotent: run it as often as you like, concurrently
# too. Everything but the URL goes to stderr.
#
# Needs root (apt-get, su postgres), or passwordless sudo. Overrides, all
# optional: CREDPROXY_PG_CLUSTER (main), CREDPROXY_PG_PORT (5432),
# CREDPROXY_PG_USER (credproxy), CREDPROXY_PG_PASSWORD (credproxy-test),
# CREDPROXY_PG_DATABASE (credproxy_test), CREDPROXY_PG_WAIT (30 seconds).
set -euo pipefail

PG_VERSION=15
PG_CLUSTER="${CREDPROXY_PG_CLUSTER:-main}"
PG_HOST=127.0.0.1
PG_PORT="${CREDPROXY_PG_PORT:-5432}"
PG_USER="${CREDPROXY_PG_USER:-credproxy}"
PG_PASSWORD="${CREDPROXY_PG_PASSWORD:-credproxy-test}"
PG_DATABASE="${CREDPROXY_PG_DATABASE:-credproxy_test}"
WAIT_SECONDS="${CREDPROXY_PG_WAIT:-30}"
PG_BIN="/usr/lib/postgresql/$PG_VERSION/bin"

# Keep stdout for the URL alone: everything else, ours and the tools', goes to stderr.
exec 3>&1 1>&2

log() { echo "test-postgres: $*"; }
die() { echo "test-postgres: error: $*"; exit 1; }

# Role, password and database names go into SQL as identifiers and literals
# through psql variables (:"name", :'name'), so quoting is psql's job; still,
# refuse what would need percent-encoding in the URL we print.
for v in PG_USER PG_PASSWORD PG_DATABASE; do
    [[ ${!v} =~ ^[A-Za-z0-9_.~-]+$ ]] || die "$v must match [A-Za-z0-9_.~-]+"
done
[[ $PG_PORT =~ ^[0-9]+$ ]] || die "CREDPROXY_PG_PORT must be a number"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    command -v sudo >/dev/null 2>&1 || die "run as root (or install sudo)"
    SUDO=(sudo -n)
fi

# Run a command that may leave a daemon behind (the postmaster) without any
# descriptor above 2: a postmaster holding fd 3 (the caller's stdout, e.g. the
# pipe of "$(...)"), or any pipe the caller's shell leaked to us, would make
# the caller wait forever, and one holding fd 9 would keep the lock below for
# the server's whole life. (pg_ctl itself points 0-2 at /dev/null and the log.)
detached() {
    (
        for fd in "/proc/$BASHPID/fd"/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        exec "$@"
    )
}

# Run a command as the postgres superuser, from a directory it can read.
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        (cd / && "$@")
    elif [ "$(id -u)" -eq 0 ]; then
        (cd / && su postgres -s /bin/bash -c "$(printf '%q ' "$@")")
    else
        (cd / && sudo -n -u postgres "$@")
    fi
}

# One run at a time: two concurrent runs would race on CREATE ROLE/DATABASE.
if command -v flock >/dev/null 2>&1; then
    lock="${TMPDIR:-/tmp}/credproxy-test-postgres.lock"
    [ -e "$lock" ] || : >>"$lock"
    exec 9<"$lock"   # read-only is enough for flock, whoever created the file
    flock -w 300 9 || die "timed out waiting for another run's lock"
fi

# 1. The server binaries.
if [ ! -x "$PG_BIN/postgres" ]; then
    log "installing postgresql-$PG_VERSION"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    detached "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq "postgresql-$PG_VERSION" "postgresql-client-$PG_VERSION"
    [ -x "$PG_BIN/postgres" ] || die "$PG_BIN/postgres is still missing after installing"
fi
export PATH="$PG_BIN:$PATH"

# 2. The cluster: create it if absent, start it if down.
cluster_exists() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { f = 1 } END { exit !f }'
}
cluster_online() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c && $4 ~ /^online/ { f = 1 } END { exit !f }'
}

if ! cluster_exists; then
    log "creating cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
    detached "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$PG_VERSION" "$PG_CLUSTER"
fi

cluster_port=$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $3 }')
[ "$cluster_port" = "$PG_PORT" ] \
    || die "cluster $PG_VERSION/$PG_CLUSTER is configured for port $cluster_port, not $PG_PORT"

if ! cluster_online; then
    # The socket directory lives on a tmpfs in many containers and VMs.
    "${SUDO[@]}" install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    log "starting cluster $PG_VERSION/$PG_CLUSTER"
    if ! detached "${SUDO[@]}" pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start; then
        logfile="/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log"
        [ -r "$logfile" ] && tail -n 20 "$logfile"
        die "pg_ctlcluster $PG_VERSION $PG_CLUSTER start failed"
    fi
fi

# 3. Wait until it accepts TCP connections on 127.0.0.1.
deadline=$((SECONDS + WAIT_SECONDS))
until pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        pg_isready -h "$PG_HOST" -p "$PG_PORT" || true
        die "PostgreSQL is not accepting connections on $PG_HOST:$PG_PORT after ${WAIT_SECONDS}s"
    fi
    sleep 0.5
done

# 4. The role (created if missing, password always reset) and the database.
# psql reads the script from stdin so that the :'var' interpolations apply;
# CREATE DATABASE cannot run inside DO, hence \gexec.
as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres \
    -v role="$PG_USER" -v pw="$PG_PASSWORD" -v db="$PG_DATABASE" <<'SQL'
SET client_min_messages = warning;
SET password_encryption = 'scram-sha-256';
SELECT format('CREATE ROLE %I', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN CREATEDB PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL

URL="postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE"

# 5. Prove the URL works over TCP with the password, as the tests will use it.
psql -X -q -v ON_ERROR_STOP=1 "$URL" -tAc 'select 1' >/dev/null \
    || die "cannot connect as $PG_USER to $PG_HOST:$PG_PORT/$PG_DATABASE"
log "ready: $PG_USER@$PG_HOST:$PG_PORT/$PG_DATABASE (PostgreSQL $(psql -X "$URL" -tAc 'show server_version'))"

# 6. Each test makes its own database (cp_t_*); forget those of earlier runs
# that nobody is connected to, so they do not pile up.
psql -X -q -v ON_ERROR_STOP=1 "$URL" -tAc \
    "SELECT datname FROM pg_database d WHERE datname LIKE 'cp\_t\_%'
       AND NOT EXISTS (SELECT FROM pg_stat_activity a WHERE a.datname = d.datname)" |
    while read -r old; do
        if [ -n "$old" ]; then
            psql -X -q "$URL" -c "DROP DATABASE IF EXISTS \"$old\"" >/dev/null 2>&1 || true
        fi
    done
log "dropped the test databases of earlier runs"

echo "$URL" >&3
