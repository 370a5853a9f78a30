#!/usr/bin/env bash
#
# deploy/clean-test-leftovers.sh - remove what killed test or benchmark runs left
# on the shared RabbitMQ and PostgreSQL.
#
# Why: every test declares its own queues and exchanges (names starting with
# t<12 hex>.) and creates its own database (hiway_t<12 hex>); the benchmark uses
# bench<12 hex>. and hiway_bench<12 hex>. A test removes them when it ends, also
# when it fails; only a run killed outright (ctrl-c on cargo test, SIGKILL, a
# machine that rebooted) leaves them behind. They cost little one by one, but
# hundreds of quorum queues slow the broker down and skew a benchmark, and a
# throwaway node a killed test started keeps running.
#
# What it removes:
#   - queues and exchanges named t<12 hex>.* or bench<12 hex>.* on the broker
#     deploy/deps.sh runs (default vhost, management API on 127.0.0.1:15672);
#   - databases named hiway_t<12 hex> or hiway_bench<12 hex>;
#   - throwaway RabbitMQ nodes and PostgreSQL servers under /tmp/hiway-rabbit
#     and /tmp/hiway-pg (deploy/rabbitmq-node.sh, deploy/postgres-node.sh).
# Nothing else: an installation's own names (hiway.*) never match.
#
# It refuses to run while a test or benchmark process runs, because their
# resources look exactly like leftovers.
#
# Usage: deploy/clean-test-leftovers.sh [--dry-run]
#   --dry-run  list what would be removed, remove nothing
# Run as root (rabbitmqctl and the throwaway nodes need it).
#
# Environment: HIWAY_TEST_DATABASE_URL (default postgres://hiway:hiway@127.0.0.1:5432/hiway),
# a role that owns the test databases.

set -euo pipefail

readonly PG_URL="${HIWAY_TEST_DATABASE_URL:-postgres://hiway:hiway@127.0.0.1:5432/hiway}"
readonly MGMT=http://127.0.0.1:15672/api
readonly LEFTOVER='^(t|bench)[0-9a-f]{12}\.'

dry_run=0
case "${1:-}" in
"") ;;
--dry-run) dry_run=1 ;;
*)
    echo "usage: $0 [--dry-run]" >&2
    exit 2
    ;;
esac

log() { printf '[clean] %s\n' "$*"; }
die() {
    printf '[clean] ERROR: %s\n' "$*" >&2
    exit 1
}

[[ "$(id -u)" -eq 0 ]] || die "run as root: rabbitmqctl and the throwaway nodes need it"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The test binary (target/*/deps/e2e-<hash>) and the benchmark.
if running="$(pgrep -af '/deps/e2e-[0-9a-f]+( |$)|/hiway-bench( |$)')"; then
    die "a test or benchmark run is going on; its queues and databases look like leftovers:
$running"
fi

# Names matching $LEFTOVER among those on stdin (none is not an error).
leftovers() { grep -E "$LEFTOVER" || true; }

# Removes (or lists) each name read on stdin with "$@ NAME".
remove_each() {
    local what=$1 name count=0
    shift
    while IFS= read -r name; do
        [[ -n "$name" ]] || continue
        count=$((count + 1))
        if ((dry_run)); then
            log "would remove $what $name"
        else
            # Not from the loop's stdin: rabbitmqctl reads it, and would eat the next names.
            "$@" "$name" </dev/null
        fi
    done
    log "$what: $count $( ((dry_run)) && echo "to remove" || echo removed)"
}

delete_queue() {
    rabbitmqctl -q delete_queue "$1" >/dev/null
}

delete_exchange() {
    curl -fsS -u guest:guest -X DELETE "$MGMT/exchanges/%2F/$1" >/dev/null
}

# --- the shared broker --------------------------------------------------------
rabbitmqctl -q list_queues name --no-table-headers | leftovers |
    remove_each "queue" delete_queue
if curl -fsS -o /dev/null -u guest:guest "$MGMT/overview" 2>/dev/null; then
    rabbitmqctl -q list_exchanges name --no-table-headers | leftovers |
        remove_each "exchange" delete_exchange
else
    log "the management API does not answer on 127.0.0.1:15672: exchanges are left (deploy/deps.sh enables it)"
fi

# --- the shared database server ----------------------------------------------
drop_database() {
    psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" -c "drop database \"$1\" with (force)"
}
psql -X -At "$PG_URL" -c "select datname from pg_database
    where datname ~ '^hiway_(t|bench)[0-9a-f]{12}$' order by datname" |
    remove_each "database" drop_database

# --- throwaway servers ----------------------------------------------------------
for dir in /tmp/hiway-rabbit/*/; do
    if [[ -d "$dir" ]]; then basename "$dir"; fi
done | remove_each "throwaway RabbitMQ node" "$repo_root/deploy/rabbitmq-node.sh" clean
for dir in /tmp/hiway-pg/*/; do
    if [[ -d "$dir" ]]; then basename "$dir"; fi
done | remove_each "throwaway PostgreSQL server" "$repo_root/deploy/postgres-node.sh" clean
