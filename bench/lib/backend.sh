# shellcheck shell=bash
# Start and stop one backend process under measurement (sourced by bench/vhost-layer.sh and
# bench/iscsi-tcp.sh, so both benchmarks start, wait for and stop their backends the same way).

backend_pid=

# start_backend SOCK LOG CMD...: runs CMD in the background with its output in LOG, sets
# backend_pid, and waits up to 10 s for the unix socket SOCK to appear. Returns 1 if the process
# exits first or the socket never appears.
start_backend() {
    local sock=$1 blog=$2
    shift 2
    rm -f "$sock"
    "$@" >"$blog" 2>&1 &
    backend_pid=$!
    local i
    for i in $(seq 100); do
        if [ -S "$sock" ]; then return 0; fi
        if ! kill -0 "$backend_pid" 2>/dev/null; then
            wait "$backend_pid" 2>/dev/null || true
            backend_pid=
            return 1
        fi
        sleep 0.1
    done
    return 1
}

# stop_backend: SIGTERM to the running backend (if any) and reap it.
stop_backend() {
    if [ -n "$backend_pid" ]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
        backend_pid=
    fi
}
