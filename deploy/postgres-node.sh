#!/usr/bin/env bash
#
# deploy/postgres-node.sh - run a separate, throwaway PostgreSQL server, for tests that must
# stop and restart the database without disturbing the shared one that deploy/deps.sh runs
# on port 5432.
#
# Usage:
#   deploy/postgres-node.sh start   NAME PORT   initialise a FRESH cluster in /tmp/hiway-pg/NAME
#                                               and start it on 127.0.0.1:PORT (user hiway,
#                                               trust authentication, database hiway)
#   deploy/postgres-node.sh stop    NAME        fast shutdown; data is kept
#   deploy/postgres-node.sh restart NAME        start the stopped cluster again with its data
#   deploy/postgres-node.sh clean   NAME        stop it and delete its directory
#
# Connect with postgres://hiway@127.0.0.1:PORT/hiway. The server runs as the postgres user
# (PostgreSQL refuses to run as root) with the binaries of the newest installed major version.
set -euo pipefail

base=/tmp/hiway-pg
bin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
[[ -n "$bin" ]] || { echo "postgres-node: no PostgreSQL server installed (run deploy/deps.sh)" >&2; exit 1; }

as_postgres() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

usage() { sed -n '4,14p' "$0" >&2; exit 2; }

cmd=${1:-}; name=${2:-}
[[ -n "$cmd" && -n "$name" ]] || usage
dir="$base/$name"

case "$cmd" in
start)
    port=${3:-}; [[ -n "$port" ]] || usage
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    mkdir -p "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$base" "$dir"
    as_postgres "$bin/initdb" -D "$dir/data" -U hiway -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    ;&
restart)
    port=$(cat "$dir/port")
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null ||
        { tail -n 30 "$dir/server.log" >&2; exit 1; }
    if [[ "$cmd" == start ]]; then
        as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U hiway -d postgres -q -c "create database hiway" >/dev/null
    fi
    echo "postgres-node $name on 127.0.0.1:$port"
    ;;
stop)
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
clean)
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*) usage ;;
esac
