# Shell helpers shared by scripts/bench, bench-scenarios, bench-translate and
# soak. Source it after setting PROG (the script's name, for messages); the
# helpers that name a log file use RUN_DIR.

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

stop_pid() {  # stop_pid PID: TERM, wait up to 5 s, then KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop on TERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

wait_port() {  # wait_port NAME PID PORT: up to 10 s
    local name=$1 pid=$2 port=$3 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited at start (see $RUN_DIR/$name.log)"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$name is not listening on 127.0.0.1:$port after 10 s"
}

free_ports() {  # free_ports N: N distinct free loopback ports (held together while chosen)
    python3 -c '
import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))
for x in s: x.close()' "$1"
}

status_kb() {  # status_kb PID FIELD -> kB
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

release_examples() {  # release_examples BUILD(0|1): build them when asked; sets BIN
    cd "$ROOT"
    if (( $1 )); then
        log "building release examples (cargo build --release -p examples --examples)"
        cargo build --release -p examples --examples >&2
    fi
    local target_dir
    target_dir=$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    BIN="$target_dir/release/examples"
    [[ -x $BIN/mock_server && -x $BIN/llm-proxy ]] || die "release examples missing in $BIN (drop --no-build)"
}
