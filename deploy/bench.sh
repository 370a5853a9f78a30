#!/usr/bin/env bash
#
# deploy/bench.sh - hiway's benchmark, in one command: bring up RabbitMQ and
# PostgreSQL (deploy/deps.sh), build the release binaries, then run
# hiway-bench, which measures RabbitMQ alone (the baseline), hiway end to end
# at stepped rates, and sender scaling on a slow destination, all in one run
# on this machine, and writes a markdown report.
#
# Why a script: the figures only mean something next to the machine, the
# versions and a baseline measured in the same run, so the one command that
# produces them has to do all of it the same way every time. Method and the
# latest results: docs/benchmarks.md.
#
# The report goes to stdout and to docs/benchmark-latest.md. A full run takes
# a few minutes (plus the build). Run it on an otherwise idle machine: the
# report shows how busy the machine was just before the run, and anything
# else running skews every figure.
#
# Arguments are passed to hiway-bench, e.g.
#   deploy/bench.sh --rates 500,1000,2000 --step-seconds 20
#   deploy/bench.sh --parts baseline,e2e
#   deploy/bench.sh --smoke            (seconds; says nothing about speed)
# See target/release/hiway-bench --help.
#
# Environment:
#   HIWAY_TEST_AMQP_URL      default amqp://guest:guest@127.0.0.1:5672/%2f
#   HIWAY_TEST_DATABASE_URL  default postgres://hiway:hiway@127.0.0.1:5432/hiway
#                            (a role with CREATEDB: the bench makes its own database)
#   HIWAY_SKIP_DEPS=1        skip deploy/deps.sh (servers managed elsewhere)

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ "${HIWAY_SKIP_DEPS:-0}" != 1 ]]; then
    deploy/deps.sh
fi

printf '[bench] cargo build --release --bins --locked\n'
cargo build --release --bins --locked

exec target/release/hiway-bench --bin-dir target/release --out docs/benchmark-latest.md "$@"
