#!/usr/bin/env bash
# A throwaway PostgreSQL server for the fleet store's tests (tests/store.rs, KEEL_TEST_POSTGRES).
#
#   bash scripts/setup-postgres.sh [start] [DIR]   start it (or find it running); prints its
#                                                   connection string, the only line on stdout
#   bash scripts/setup-postgres.sh stop [DIR]      stop it (the data stays; rm -rf DIR drops it)
#
# DIR defaults to ${TMPDIR:-/tmp}/keel-postgres. Installs Debian's postgresql with apt-get only
# when initdb is missing; makes a cluster in DIR/data (as the postgres user when run as root:
# the server refuses root), listening on 127.0.0.1 only, on a port that was free, with trust
# authentication and without fsync (test data only); and a role and database `keel` (the role
# may create databases: the test makes a fresh one per run). Run again, it reuses the server.
set -euo pipefail
cmd=start
[[ ${1:-} == start || ${1:-} == stop ]] && { cmd=$1; shift; }
dir=${1:-${TMPDIR:-/tmp}/keel-postgres}
data=$dir/data

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
# initdb on the PATH may be a link into the installation (whose bin/ also has psql and pg_ctl).
if command -v initdb > /dev/null; then bin=$(dirname "$(readlink -f "$(command -v initdb)")"); else bin=$(bindir); fi
as_server() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
running() { [[ -f $data/postmaster.pid ]] && as_server "$bin/pg_ctl" -D "$data" status > /dev/null 2>&1; }

if [[ $cmd == stop ]]; then
    if [[ -n $bin ]] && running; then as_server "$bin/pg_ctl" -D "$data" -m fast -w stop > /dev/null; fi
    exit 0
fi

if [[ -z $bin || ! -x $bin/initdb ]]; then
    echo "installing postgresql (the fleet store's tests)" >&2
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    (DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql) > /dev/null
    bin=$(bindir)
fi

if [[ ! -f $data/PG_VERSION ]]; then
    rm -rf "$data"
    mkdir -p "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
    as_server "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C > "$dir/initdb.log"
    cat >> "$data/postgresql.conf" <<'EOF'
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
fi

if ! running; then
    # The first port from 5433 on that nothing listens on.
    port=5433
    while (: < "/dev/tcp/127.0.0.1/$port") 2> /dev/null; do port=$((port + 1)); done
    as_server "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -o "-p $port" -w start > /dev/null
fi
port=$(sed -n 4p "$data/postmaster.pid")

psql() { "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }
[[ $(psql "SELECT 1 FROM pg_roles WHERE rolname = 'keel'") == 1 ]] || psql "CREATE ROLE keel LOGIN CREATEDB"
[[ $(psql "SELECT 1 FROM pg_database WHERE datname = 'keel'") == 1 ]] || psql "CREATE DATABASE keel OWNER keel"
echo "host=127.0.0.1 port=$port user=keel dbname=keel"
