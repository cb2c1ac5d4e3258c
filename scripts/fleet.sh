#!/usr/bin/env bash
# A fleet on this machine: N `keel serve` replicas on one store, behind haproxy, with a Prometheus
# server scraping every replica (docs/FLEET.md).
#
#   bash scripts/fleet.sh store [DIR]          start PostgreSQL (scripts/setup-postgres.sh, in
#                                              DIR/postgres) and make the database keel_fleet when
#                                              missing; prints its URL, the only line on stdout:
#                                              postgres://keel@127.0.0.1:PORT/keel_fleet
#   bash scripts/fleet.sh start N STORE [DIR]  start N replicas `keel --store STORE serve` on free
#                                              ports, haproxy in front of them and Prometheus;
#                                              prints `lb=URL` and `prometheus=URL`, the only lines
#                                              on stdout (also in DIR/lb.url, DIR/prometheus.url)
#   bash scripts/fleet.sh status [DIR]         each replica (pid, URL, readiness), haproxy's view of
#                                              them, the two URLs
#   bash scripts/fleet.sh stop [--all] [DIR]   stop the replicas (SIGTERM: they finish what is in
#                                              flight; SIGKILL after FLEET_GRACE s), then haproxy
#                                              and Prometheus; --all stops PostgreSQL too (its data
#                                              stays in DIR/postgres: rm -rf DIR drops everything)
#
# DIR defaults to ${TMPDIR:-/tmp}/keel-fleet. In it: replica-I.{pid,url,out,log} (I from 1),
# haproxy.{cfg,pid,log,sock}, prometheus.{yml,pid,log}, prometheus-data/.
# STORE is anything `keel --store` takes: the URL `store` printed, or a folder (SQLite) that
# every replica opens. Environment:
#   KEEL                    the keel binary (default: target/release/keel of this repository)
#   FLEET_PORT              haproxy's port on 127.0.0.1 (default: the first free one from 8080)
#   FLEET_PROMETHEUS_PORT   Prometheus's port (default: the first free one from 9090)
#   FLEET_METRICS_KEY_FILE  a file holding an API key's secret: Prometheus sends it as a bearer
#                           token (/metrics needs a key once the store holds one)
#   FLEET_SERVE_CONFIG      a TOML file of limits passed to each replica as `serve --config`
#   FLEET_DB                the database `store` makes (default: keel_fleet)
#   FLEET_TIMEOUT           seconds `start` waits for the replicas to listen and be ready (120)
#   FLEET_GRACE             seconds `stop` waits after SIGTERM before SIGKILL (20: a replica lets
#                           streams go on for stream_grace_s, 10 s by default, then flushes lineage)
# Needs haproxy and prometheus (scripts/setup-system.sh installs both), curl, and bash's /dev/tcp.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEL=${KEEL:-$root/target/release/keel}
cmd=${1:-}
[[ $# -gt 0 ]] && shift

die() {
    echo "fleet: $*" >&2
    exit 1
}
listening() { (: < "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
# The first port from $1 on that nothing listens on.
free_port() {
    local port=$1
    while listening "$port"; do port=$((port + 1)); done
    echo "$port"
}
# Whether process $1 runs and is named $2 (not a recycled pid; a zombie, whose parent has not
# reaped it yet, has exited).
running() {
    [[ $(cat "/proc/$1/comm" 2> /dev/null) == "$2" ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" 2> /dev/null) != Z* ]]
}
# Whether the pid in file $1 is such a process.
alive() { [[ -f $1 ]] && running "$(cat "$1")" "$2"; }
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }

# ---- store ------------------------------------------------------------------------------------
store() {
    local dir=${1:-${TMPDIR:-/tmp}/keel-fleet} db=${FLEET_DB:-keel_fleet} conninfo port bin
    [[ $db =~ ^[a-z_][a-z0-9_]*$ ]] || die "FLEET_DB: a plain lower-case name, not $db"
    mkdir -p "$dir"
    conninfo=$(bash "$root/scripts/setup-postgres.sh" start "$dir/postgres")
    port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' <<< "$conninfo")
    # psql of the installation setup-postgres.sh used (initdb on the PATH, else the newest).
    if command -v initdb > /dev/null; then bin=$(dirname "$(readlink -f "$(command -v initdb)")"); else
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    psql() { "$bin/psql" "$conninfo" -v ON_ERROR_STOP=1 -qtAc "$1"; }
    [[ $(psql "SELECT 1 FROM pg_database WHERE datname = '$db'") == 1 ]] || psql "CREATE DATABASE $db" > /dev/null
    echo "postgres://keel@127.0.0.1:$port/$db"
}

# ---- stop -------------------------------------------------------------------------------------
# SIGTERM to each pid file's process that is alive (name $1), then SIGKILL to those left after
# the grace; removes the pid files.
stop_all() {
    local name=$1 grace=$2 f pids=() waited=0
    shift 2
    for f in "$@"; do
        if alive "$f" "$name"; then
            pids+=("$(cat "$f")")
            kill -TERM "$(cat "$f")" 2> /dev/null || true
        fi
    done
    while ((${#pids[@]})); do
        local left=()
        for p in "${pids[@]}"; do
            if running "$p" "$name"; then left+=("$p"); fi
        done
        pids=("${left[@]+"${left[@]}"}")
        ((${#pids[@]})) || break
        if ((waited >= grace * 10)); then
            echo "fleet: $name ${pids[*]} still running after ${grace}s: SIGKILL" >&2
            kill -KILL "${pids[@]}" 2> /dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$@"
}

stop() {
    local all=0
    [[ ${1:-} == --all ]] && { all=1; shift; }
    local dir=${1:-${TMPDIR:-/tmp}/keel-fleet} grace=${FLEET_GRACE:-20}
    # The replicas first, all at once: haproxy still relays what they finish; then the rest.
    shopt -s nullglob
    stop_all keel "$grace" "$dir"/replica-*.pid
    stop_all haproxy 5 "$dir/haproxy.pid"
    stop_all prometheus 10 "$dir/prometheus.pid"
    if ((all)); then bash "$root/scripts/setup-postgres.sh" stop "$dir/postgres"; fi
}

# ---- start ------------------------------------------------------------------------------------
tail_log() { echo "--- the last lines of $1:" >&2; tail -n 20 "$1" >&2 || true; }

start() {
    [[ $# -ge 2 ]] || die "usage: fleet.sh start N STORE [DIR]"
    local n=$1 store=$2 dir=${3:-${TMPDIR:-/tmp}/keel-fleet}
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not $n"
    [[ -x $KEEL ]] || die "no keel binary at $KEEL (cargo build --release -p keel-cli, or set KEEL)"
    command -v haproxy > /dev/null || die "haproxy is missing (bash scripts/setup-system.sh)"
    command -v prometheus > /dev/null || die "prometheus is missing (bash scripts/setup-system.sh)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local f
    for f in "$dir"/replica-*.pid "$dir/haproxy.pid" "$dir/prometheus.pid"; do
        if alive "$f" "$(basename "$f" .pid | sed 's/replica-.*/keel/')"; then
            die "a fleet runs in $dir already (fleet.sh stop $dir first)"
        fi
    done
    rm -rf "$dir"/replica-* "$dir"/haproxy.* "$dir"/prometheus.* "$dir"/prometheus-data "$dir"/lb.url
    # Whatever fails from here on stops what was started.
    fleet_dir=$dir
    trap '[[ ${fleet_ok:-} == 1 ]] || stop "$fleet_dir" > /dev/null 2>&1' EXIT
    local config=()
    [[ -n ${FLEET_SERVE_CONFIG:-} ]] && config=(--config "$(abspath "$FLEET_SERVE_CONFIG")")

    # The replicas, each on a port of its own choosing (port 0: its first line says which).
    local i
    for ((i = 1; i <= n; i++)); do
        nohup "$KEEL" --store "$store" serve --listen 127.0.0.1:0 "${config[@]+"${config[@]}"}" \
            < /dev/null > "$dir/replica-$i.out" 2> "$dir/replica-$i.log" &
        echo $! > "$dir/replica-$i.pid"
    done
    local deadline=$((SECONDS + ${FLEET_TIMEOUT:-120})) url
    for ((i = 1; i <= n; i++)); do
        until grep -qs 'listening on' "$dir/replica-$i.out"; do
            if ! alive "$dir/replica-$i.pid" keel; then
                echo "fleet: replica $i exited before listening" >&2
                tail_log "$dir/replica-$i.log"
                exit 1
            fi
            if ((SECONDS >= deadline)); then
                echo "fleet: replica $i is not listening after ${FLEET_TIMEOUT:-120}s" >&2
                tail_log "$dir/replica-$i.log"
                exit 1
            fi
            sleep 0.2
        done
        url=$(sed -n 's/.*listening on //p' "$dir/replica-$i.out" | head -n 1)
        echo "$url" > "$dir/replica-$i.url"
    done
    # Ready: its production aliases loaded and the store reachable (haproxy checks the same).
    for ((i = 1; i <= n; i++)); do
        url=$(cat "$dir/replica-$i.url")
        until [[ $(curl -s -o /dev/null -w '%{http_code}' "$url/v2/health/ready") == 200 ]]; do
            if ! alive "$dir/replica-$i.pid" keel; then
                echo "fleet: replica $i exited before it was ready" >&2
                tail_log "$dir/replica-$i.log"
                exit 1
            fi
            if ((SECONDS >= deadline)); then
                echo "fleet: replica $i ($url) listens but is not ready after ${FLEET_TIMEOUT:-120}s;" \
                    "haproxy sends it nothing until it is" >&2
                break
            fi
            sleep 0.2
        done
    done

    # haproxy.
    local lb_port=${FLEET_PORT:-$(free_port 8080)}
    listening "$lb_port" && die "port $lb_port is taken (FLEET_PORT)"
    write_haproxy_cfg "$dir" "$lb_port" "$n" > "$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg" || die "haproxy refused $dir/haproxy.cfg"
    # In the foreground of a background process (its log on stdout: one line per request, with
    # the replica that answered and the retries), not as the Debian service.
    nohup haproxy -f "$dir/haproxy.cfg" < /dev/null > "$dir/haproxy.log" 2>&1 &
    echo $! > "$dir/haproxy.pid"
    until listening "$lb_port"; do
        alive "$dir/haproxy.pid" haproxy || { tail_log "$dir/haproxy.log"; die "haproxy exited"; }
        sleep 0.1
    done
    echo "http://127.0.0.1:$lb_port" > "$dir/lb.url"

    # Prometheus.
    local prom_port=${FLEET_PROMETHEUS_PORT:-$(free_port 9090)}
    if [[ $prom_port == "$lb_port" ]]; then prom_port=$(free_port $((lb_port + 1))); fi
    listening "$prom_port" && die "port $prom_port is taken (FLEET_PROMETHEUS_PORT)"
    write_prometheus_yml "$dir" "$n" > "$dir/prometheus.yml"
    nohup prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus-data" \
        --web.listen-address="127.0.0.1:$prom_port" < /dev/null > /dev/null 2> "$dir/prometheus.log" &
    echo $! > "$dir/prometheus.pid"
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$prom_port/-/ready") == 200 ]]; do
        alive "$dir/prometheus.pid" prometheus || { tail_log "$dir/prometheus.log"; die "prometheus exited"; }
        ((SECONDS < deadline + 30)) || { tail_log "$dir/prometheus.log"; die "prometheus is not ready"; }
        sleep 0.2
    done
    echo "http://127.0.0.1:$prom_port" > "$dir/prometheus.url"
    # Until every replica has been scraped once; a scrape that failed (a key missing or refused)
    # is said, with Prometheus's reason.
    local targets check
    check=$(
        cat << 'EOF'
import json, sys
active = json.load(sys.stdin)["data"]["activeTargets"]
if len(active) < int(sys.argv[1]) or any(t["health"] == "unknown" for t in active):
    sys.exit(1)
for t in active:
    if t["health"] != "up":
        print("fleet: Prometheus cannot scrape", t["labels"]["replica"] + ":", t["lastError"])
EOF
    )
    until targets=$(curl -s "http://127.0.0.1:$prom_port/api/v1/targets" | python3 -c "$check" "$n" 2> /dev/null); do
        if ((SECONDS >= deadline + 45)); then
            echo "fleet: Prometheus has not scraped every replica yet ($dir/prometheus.log)" >&2
            break
        fi
        sleep 0.2
    done
    if [[ -n ${targets:-} ]]; then echo "$targets" >&2; fi
    fleet_ok=1
    echo "lb=$(cat "$dir/lb.url")"
    echo "prometheus=$(cat "$dir/prometheus.url")"
}

# haproxy 2.6 (Debian bookworm). What its configuration manual (configuration.txt) and source say
# about retrying a request on another replica:
# - `retries 3` counts every attempt: connection attempts, and with `retry-on`, the L7 retries.
#   `option redispatch 1` sends every retry to another replica (by default only the last one).
#   Before a retry after a failed connection haproxy waits min(timeout connect, 1 s), unless the
#   balance is roundrobin with 2+ replicas up and the retry goes to another one (the source's
#   back_handle_st_cer): hence roundrobin, not leastconn, and a short `timeout connect` (a
#   connect on this host or a LAN takes well under a millisecond).
# - `retry-on` does not look at the method: a POST (all of /v1 and /v2/.../infer) is retried like a
#   GET. Only `http-request disable-l7-retry` (e.g. `if METH_POST`) turns that off; a connection
#   that could not be made (conn-failure) is retried always. Keel may retry them: nothing was
#   answered (an answer waits for its lineage record, and the retry is a new request with its own
#   record; a client's x-request-id travels with the retry).
# - Any keyword beyond conn-failure makes haproxy keep a copy of the request, and only of a
#   request it received whole before sending it on (the source clears TX_L7_RETRY when the
#   message is not done), and only if it fits one buffer (tune.bufsize, 16 KiB, "strongly
#   recommended not to change"): larger bodies are forwarded but never retried. `option
#   http-buffer-request` makes haproxy wait for the whole body (up to that buffer) before it
#   picks a server. Checked: a body sent 0.3 s after its headers, its replica killed while
#   answering, was a 502 without this option and a 200 from the other replica with it.
# - empty-response: the replica closed without answering (killed, or crashed mid-request);
#   response-timeout: no response headers within `timeout server`. A stream is never retried once
#   its first bytes went to the client (its replica killed, it ends without `data: [DONE]`). 503 (a replica without its database) is not retried: when
#   the database is gone every replica answers it, and retrying would triple the load.
write_haproxy_cfg() {
    local dir=$1 port=$2 n=$3 i
    cat <<EOF
# Written by scripts/fleet.sh: $n keel serve replicas behind one frontend.
global
    maxconn 4096
    log stdout format raw local0 info
    stats socket $dir/haproxy.sock mode 600 level admin
    # No user/chroot: a background process of whoever started it (root in a container is fine).

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # Also the wait before retrying after a refused connection (see above).
    timeout connect 250ms
    timeout client 120s
    # A stream's gaps and a whole reply's wait for its headers; generations on a CPU take a while.
    timeout server 120s
    timeout http-request 30s
    timeout http-keep-alive 10s
    timeout queue 30s
    timeout check 2s

frontend keel
    bind 127.0.0.1:$port
    default_backend replicas

backend replicas
    # Roundrobin: a retry goes to the next replica at once (leastconn would wait out the
    # turn-around first); each replica bounds its own load (429 with Retry-After).
    balance roundrobin
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
    option http-buffer-request
    # Ready: production aliases loaded, the store reachable. Down after 2 failed checks (1 s), up
    # after one good one; a connection refused marks it down at once (observe layer4).
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server check inter 500ms fastinter 500ms downinter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down
EOF
    for ((i = 1; i <= n; i++)); do
        echo "    server replica-$i $(sed 's|^http://||' "$dir/replica-$i.url")"
    done
}

write_prometheus_yml() {
    local dir=$1 n=$2 i auth=""
    if [[ -n ${FLEET_METRICS_KEY_FILE:-} ]]; then
        [[ -r $FLEET_METRICS_KEY_FILE ]] || die "FLEET_METRICS_KEY_FILE: cannot read $FLEET_METRICS_KEY_FILE"
        auth="    authorization: {type: Bearer, credentials_file: '$(abspath "$FLEET_METRICS_KEY_FILE")'}"
    fi
    cat <<EOF
# Written by scripts/fleet.sh: every replica's /metrics, every second.
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: keel
$auth
    static_configs:
EOF
    for ((i = 1; i <= n; i++)); do
        echo "      - {targets: ['$(sed 's|^http://||' "$dir/replica-$i.url")'], labels: {replica: replica-$i}}"
    done
}

# ---- status -----------------------------------------------------------------------------------
status() {
    local dir=${1:-${TMPDIR:-/tmp}/keel-fleet} f i url state
    shopt -s nullglob
    for f in "$dir"/replica-*.url; do
        i=$(basename "$f" .url)
        url=$(cat "$f")
        if alive "$dir/$i.pid" keel; then
            state="pid $(cat "$dir/$i.pid"), ready $(curl -s -o /dev/null -w '%{http_code}' "$url/v2/health/ready")"
        else state="not running"; fi
        echo "$i $url $state"
    done
    if alive "$dir/haproxy.pid" haproxy; then
        echo "lb=$(cat "$dir/lb.url") (pid $(cat "$dir/haproxy.pid"))"
        # haproxy's view: each server's state and the requests it was sent.
        python3 - "$dir/haproxy.sock" <<'EOF' || true
import csv, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b"".join(iter(lambda: s.recv(65536), b"")).decode()
for row in csv.DictReader(data.lstrip("# ").splitlines()):
    if row["svname"].startswith("replica-"):
        print(f"  haproxy: {row['svname']} {row['status']} sent {row['stot']} requests, {row['wretr']} retries, {row['wredis']} redispatched")
EOF
    else echo "lb: not running"; fi
    if alive "$dir/prometheus.pid" prometheus; then echo "prometheus=$(cat "$dir/prometheus.url")"; else
        echo "prometheus: not running"
    fi
}

case $cmd in
    store | start | stop | status) "$cmd" "$@" ;;
    *) die "usage: fleet.sh store [DIR] | start N STORE [DIR] | status [DIR] | stop [--all] [DIR]" ;;
esac
