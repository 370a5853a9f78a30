#!/usr/bin/env bash
#
# deploy/test.sh - hiway's test command: bring up RabbitMQ and PostgreSQL
# (deploy/deps.sh), point the tests at them, then run the whole workspace's
# tests.
#
# Why: the integration tests need a real broker and database; this is the one
# command that works the same on a developer machine and in CI (.ci/run).
#
# The tests read their endpoints from these variables; values already set in
# the environment win (e.g. to use other servers):
#   HIWAY_TEST_AMQP_URL      default amqp://guest:guest@127.0.0.1:5672/%2f
#   HIWAY_TEST_DATABASE_URL  default postgres://hiway:hiway@127.0.0.1:5432/hiway
# Set HIWAY_SKIP_DEPS=1 to skip deploy/deps.sh (servers managed elsewhere).
#
# Arguments are passed to cargo test, e.g.
#   deploy/test.sh -p hiway-config -- --nocapture

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ "${HIWAY_SKIP_DEPS:-0}" != 1 ]]; then
    deploy/deps.sh
fi

export HIWAY_TEST_AMQP_URL="${HIWAY_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export HIWAY_TEST_DATABASE_URL="${HIWAY_TEST_DATABASE_URL:-postgres://hiway:hiway@127.0.0.1:5432/hiway}"

printf '[test] HIWAY_TEST_AMQP_URL=%s\n' "$HIWAY_TEST_AMQP_URL"
printf '[test] HIWAY_TEST_DATABASE_URL=%s\n' "$HIWAY_TEST_DATABASE_URL"
printf '[test] cargo test --workspace --locked %s\n' "$*"
exec cargo test --workspace --locked "$@"
