# Shared by bench/callgrind-json and bench/callgrind-sse (sourced, not run):
# an ssesrv upstream and a gateway under valgrind's callgrind, counters zeroed
# and dumped around the measured load.  The caller sets $here and $root, and
# calls take_aura_sets "$@" for the --aura-set overrides.
py="$root/.venv/bin/python"
tmp=$(mktemp -d /tmp/aura-callgrind-XXXXXX)
pids=()
aura_sets=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
up=$(free_port); port=$(free_port); admin=$(free_port)

# take_aura_sets ARGS...: $aura_sets gets the --aura-set SECTION.KEY=VALUE
# options of ARGS, $args the other arguments, in order.
take_aura_sets() {
    aura_sets=(); args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --aura-set) [ $# -ge 2 ] || { echo "--aura-set needs SECTION.KEY=VALUE" >&2; exit 2; }
                aura_sets+=("$2"); shift 2 ;;
            --aura-set=*) aura_sets+=("${1#--aura-set=}"); shift ;;
            *) args+=("$1"); shift ;;
        esac
    done
}

# start_gateway SECTIONS: ssesrv, then the gateway (routing /** to it, with the
# INI text SECTIONS appended, then the --aura-set overrides applied; the access
# log is off unless overridden, as nginx runs in bench/run) under callgrind;
# returns once /json answers.
start_gateway() {
    "$here/bin/ssesrv" "$up" >/dev/null 2>&1 & pids+=($!)
    printf "[gateway]\nlisten = tcp:%s:interface=127.0.0.1\nadmin_listen = tcp:%s:interface=127.0.0.1\n[log]\naccess = off\n[route:bench]\npath = /**\nupstream = http://127.0.0.1:%s\n[headers]\nrequired = X-Tenant-ID\n$1" \
        "$port" "$admin" "$up" > "$tmp/gateway.ini"
    "$py" "$here/ini_set.py" "$tmp/gateway.ini" "${aura_sets[@]+"${aura_sets[@]}"}"
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
