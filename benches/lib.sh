# Shared by benches/load.sh and benches/scale.sh (sourced, not run): errors,
# argument checks, the servers' lifetime and loopback port checks.
# The sourcing script sets SCRIPT (its name, for messages) first, and may set
# WAIT_SECS (how long wait_port waits, default 10).

die() {
    echo "$SCRIPT: $*" >&2
    exit 1
}

in_range() { # NAME VALUE MIN MAX
    [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3 && $2 <= $4)) && return 0
    die "$1 must be a whole number in $3..$4 (got '$2')"
}

# Every server started goes in PIDS; on exit they are stopped (SIGKILL after
# ~5 s each) and $WORK is deleted.
start_work() { # PREFIX: sets WORK and PIDS, installs the traps
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ports_free() { # PORT...
    local p
    for p in "$@"; do
        port_open "$p" && die "port 127.0.0.1:$p is in use; set PORT_BASE"
    done
    return 0
}

wait_port() { # PORT NAME PID LOG...; on failure shows the logs and exits
    local port=$1 name=$2 pid=$3 secs=${WAIT_SECS:-10}
    shift 3
    for _ in $(seq $((secs * 10))); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$@" >&2 2>/dev/null || true
    die "$name did not come up on 127.0.0.1:$port (within $secs s)"
}
