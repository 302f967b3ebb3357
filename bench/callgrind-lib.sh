# Shared by bench/callgrind-json and bench/callgrind-sse (sourced, not run):
# an ssesrv upstream and a gateway under valgrind's callgrind, counters zeroed
# and dumped around the measured load.  The caller sets $here and $root.
py="$root/.venv/bin/python"
tmp=$(mktemp -d /tmp/aura-callgrind-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
up=$(free_port); port=$(free_port); admin=$(free_port)

# start_gateway SECTIONS: ssesrv, then the gateway (routing /** to it, with the
# INI text SECTIONS appended) under callgrind; returns once /json answers.
start_gateway() {
    "$here/bin/ssesrv" "$up" >/dev/null 2>&1 & pids+=($!)
    printf "[gateway]\nlisten = tcp:%s:interface=127.0.0.1\nadmin_listen = tcp:%s:interface=127.0.0.1\naccess_log = false\n[route:bench]\npath = /**\nupstream = http://127.0.0.1:%s\n[headers]\nrequired = X-Tenant-ID\n$1" \
        "$port" "$admin" "$up" > "$tmp/gateway.ini"
    (cd "$tmp" && exec valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" \
        "$root/.venv/bin/twistd" -n --pidfile= aura-proxy --config gateway.ini > "$tmp/gateway.log" 2>&1) &
    pids+=($!)
    for _ in $(seq 1 180); do
        curl -s -o /dev/null -H 'X-Tenant-ID: bench' "http://127.0.0.1:$port/json" && return 0
        sleep 1
    done
    echo "the gateway did not answer; its log:" >&2
    tail -20 "$tmp/gateway.log" >&2
    exit 1
}

valgrind_pid() { pgrep -f "callgrind-out-file=$tmp/cg.out"; }
zero_counters() { callgrind_control -z "$(valgrind_pid)" >/dev/null 2>&1; }

# dump_counters: dump and print the instructions counted since zero_counters.
dump_counters() {
    callgrind_control -d "$(valgrind_pid)" >/dev/null 2>&1
    sleep 1
    grep -h "^summary:" "$tmp"/cg.out.* | awk '{s += $2} END {print s}'
}
