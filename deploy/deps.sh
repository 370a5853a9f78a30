#!/usr/bin/env bash
#
# deploy/deps.sh - install, start and provision the services hiway needs
# (RabbitMQ and PostgreSQL) on a Debian machine, without systemd or Docker.
#
# Why: hiway's integration tests talk to a real broker and a real database.
# CI runs on a fresh Debian machine (root, no stdin, no systemd, no Docker)
# that has only the Rust toolchain, and developers' containers look the same,
# so this script brings both services up from Debian packages:
#
#   1. installs rabbitmq-server and postgresql with apt-get when missing;
#   2. enables the rabbitmq_management plugin (queue depths over HTTP on 15672);
#   3. starts RabbitMQ (as the rabbitmq user, like its init script) and the
#      PostgreSQL cluster (pg_ctlcluster) when they are not already running;
#   4. waits, with a bounded timeout, until both really accept connections,
#      and prints the tail of the relevant log when one does not;
#   5. checks RabbitMQ >= 3.10 (quorum queues);
#   6. creates the PostgreSQL role hiway/hiway (LOGIN CREATEDB: tests create
#      one database per test) and the database hiway owned by it, and checks
#      that password login over TCP on 127.0.0.1:5432 works.
#
# It is idempotent: running it again when everything is up only checks, and
# takes a few seconds. RabbitMQ's default guest/guest user (loopback only) is
# used as is; nothing else is changed.
#
# At the end it prints the URLs the tests use:
#   amqp://guest:guest@127.0.0.1:5672/%2f
#   postgres://hiway:hiway@127.0.0.1:5432/hiway
#
# Not root? Installing and starting needs root, so then the script only checks
# that both services already answer (e.g. started with
# deploy/docker-compose.yml) and fails with a hint otherwise. The same happens
# for a service whose Debian package is not installed but whose port already
# answers (e.g. Docker): it is used as is and not installed.
#
# Environment:
#   HIWAY_DEPS_TIMEOUT      seconds to wait for each service to start (default 180)
#   HIWAY_DEPS_MIN_FREE_MB  warn when less disk than this is free for RabbitMQ,
#                           PostgreSQL or the build tree (default 2048); the
#                           script also warns when RabbitMQ reports an alarm

set -euo pipefail

readonly TIMEOUT="${HIWAY_DEPS_TIMEOUT:-180}"
readonly AMQP_PORT=5672
readonly PG_PORT=5432
readonly PG_USER=hiway
readonly PG_PASSWORD=hiway
readonly PG_DB=hiway
readonly AMQP_URL="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f"
readonly PG_URL="postgres://${PG_USER}:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/${PG_DB}"
readonly RABBIT_MIN_VERSION=3.10
readonly RABBIT_LOG_DIR=/var/log/rabbitmq
readonly RABBIT_ENABLED_PLUGINS=/etc/rabbitmq/enabled_plugins
readonly RABBIT_ENV_CONF=/etc/rabbitmq/rabbitmq-env.conf

# This script manages the machine's default RabbitMQ node only: settings meant
# for another node (see deploy/rabbitmq-node.sh) must not leak into it.
unset "${!RABBITMQ_@}"

export DEBIAN_FRONTEND=noninteractive
# A fresh cluster created during installation takes its encoding from the
# locale; without one it would be SQL_ASCII. C.UTF-8 always exists on Debian.
if [[ -z "${LANG:-}" || "${LANG}" == C || "${LANG}" == POSIX ]]; then
    export LANG=C.UTF-8
fi

log() { printf '[deps] %s\n' "$*"; }
warn() { printf '[deps] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[deps] ERROR: %s\n' "$*" >&2
    exit 1
}

# Prints the last lines of each existing log file given, to stderr.
show_logs() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || continue
        printf '[deps] ---- last lines of %s ----\n' "$f" >&2
        tail -n 40 "$f" >&2 || true
    done
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# True when something on 127.0.0.1:PORT answers an AMQP 0-9-1 protocol header
# with a frame (a Connection.Start method frame begins with byte 0x01).
amqp_answers() {
    local first
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    first="$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1' _ "$AMQP_PORT" 2>/dev/null)" || return 1
    [[ "${first// /}" == 01 ]]
}

tcp_open() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# True when the hiway role can log in over TCP with its password.
pg_login_ok() {
    command -v psql >/dev/null 2>&1 || return 1
    [[ "$(PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -w -h 127.0.0.1 -p "$PG_PORT" \
        -U "$PG_USER" -d "$PG_DB" -Atqc 'select 1' 2>/dev/null || true)" == 1 ]]
}

# Runs a command as the postgres OS user, from a directory it can read.
as_postgres() { (cd / && runuser -u postgres -- "$@"); }

# psql as the postgres superuser over the local socket of the cluster.
pg_super() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"; }

print_urls() {
    log "ready:"
    printf '  AMQP:       %s\n' "$AMQP_URL"
    printf '  PostgreSQL: %s\n' "$PG_URL"
}

rabbit_local() { [[ -x /usr/sbin/rabbitmq-server ]] && pkg_installed rabbitmq-server; }
pg_local() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }

# ---------------------------------------------------------------------------
# Without root: check only.
# ---------------------------------------------------------------------------
if ! is_root; then
    ok=1
    amqp_answers || {
        warn "nothing answers AMQP on 127.0.0.1:${AMQP_PORT}"
        ok=0
    }
    if command -v psql >/dev/null 2>&1; then
        pg_login_ok || {
            warn "cannot log in to ${PG_URL}"
            ok=0
        }
    else
        tcp_open "$PG_PORT" || {
            warn "nothing listens on 127.0.0.1:${PG_PORT}"
            ok=0
        }
    fi
    [[ "$ok" -eq 1 ]] || die "not root, so cannot install or start the services: run 'sudo $0', or start them with 'docker compose -f deploy/docker-compose.yml up -d'"
    log "not root: services already answer, nothing installed or started"
    print_urls
    exit 0
fi

# ---------------------------------------------------------------------------
# 1. Install what is missing.
# ---------------------------------------------------------------------------
RABBIT_EXTERNAL=0
PG_EXTERNAL=0
to_install=()
if ! rabbit_local; then
    if amqp_answers; then
        RABBIT_EXTERNAL=1
        log "rabbitmq-server is not installed but 127.0.0.1:${AMQP_PORT} answers AMQP (Docker?): using it as is"
    else
        to_install+=(rabbitmq-server)
    fi
fi
if ! pg_local; then
    if pg_login_ok; then
        PG_EXTERNAL=1
        log "PostgreSQL is not installed but ${PG_URL} accepts logins (Docker?): using it as is"
    elif ! command -v psql >/dev/null 2>&1 && tcp_open "$PG_PORT"; then
        # Installing would only create a second cluster on another port.
        PG_EXTERNAL=1
        warn "PostgreSQL is not installed but something listens on 127.0.0.1:${PG_PORT} (Docker?): using it as is, login not verified (no psql)"
    else
        to_install+=(postgresql)
    fi
fi

if ((${#to_install[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${to_install[*]} by hand (this script supports Debian)"
    log "installing ${to_install[*]} (apt-get)"
    # Keep package scripts from starting the services: we start them below,
    # the same way whether or not the machine runs an init system.
    policy_rc=/usr/sbin/policy-rc.d
    if [[ ! -e "$policy_rc" ]]; then
        printf '#!/bin/sh\n# temporary, written by hiway deploy/deps.sh\nexit 101\n' >"$policy_rc"
        chmod 755 "$policy_rc"
        trap 'rm -f "$policy_rc"' EXIT
    fi
    # apt/dpkg chatter goes to a log file, shown only when something fails.
    apt_log="$(mktemp /tmp/hiway-deps-apt.XXXXXX.log)"
    if ! apt-get update -qq >"$apt_log" 2>&1 ||
        ! apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${to_install[@]}" </dev/null >>"$apt_log" 2>&1; then
        show_logs "$apt_log"
        die "apt-get could not install ${to_install[*]} (full log: $apt_log)"
    fi
    rm -f "$apt_log"
    if [[ "$(trap -p EXIT)" == *policy_rc* ]]; then
        rm -f "$policy_rc"
        trap - EXIT
    fi
fi

# ---------------------------------------------------------------------------
# 2. RabbitMQ: plugin, start, wait, version.
# ---------------------------------------------------------------------------
# The CLI tools print progress to stdout; -q keeps them terse.
rabbit_running() { rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

rabbit_fail() {
    local f logs=("$RABBIT_LOG_DIR/startup_log" "$RABBIT_LOG_DIR/startup_err")
    for f in "$RABBIT_LOG_DIR"/rabbit@*.log; do
        [[ "$f" == *_upgrade.log ]] || logs+=("$f")
    done
    show_logs "${logs[@]}"
    die "RabbitMQ did not start: $*"
}

start_rabbit() {
    if rabbit_running; then
        log "RabbitMQ is already running"
        if ! grep -qs rabbitmq_management "$RABBIT_ENABLED_PLUGINS" &&
            ! rabbitmq-plugins -q is_enabled rabbitmq_management >/dev/null 2>&1; then
            log "enabling rabbitmq_management on the running node"
            rabbitmq-plugins -q enable rabbitmq_management >/dev/null
        fi
        return 0
    fi

    # Enabling offline only writes the enabled_plugins file, read at start.
    if ! grep -qs 'rabbitmq_management' "$RABBIT_ENABLED_PLUGINS"; then
        log "enabling rabbitmq_management (offline, before start)"
        rabbitmq-plugins -q enable --offline rabbitmq_management >/dev/null
    fi

    # The node is named rabbit@$(hostname -s); Erlang distribution refuses to
    # start when that name does not resolve (seen in some containers). Fall
    # back to rabbit@localhost then; the CLI tools read the same file.
    local host
    host="$(hostname -s 2>/dev/null || hostname)"
    if ! getent hosts "$host" >/dev/null 2>&1 &&
        ! grep -qsE '^[[:space:]]*NODENAME=' "$RABBIT_ENV_CONF"; then
        log "host name '$host' does not resolve: naming the node rabbit@localhost in $RABBIT_ENV_CONF"
        printf '\n# added by hiway deploy/deps.sh: host name did not resolve\nNODENAME=rabbit@localhost\n' >>"$RABBIT_ENV_CONF"
    fi

    log "starting RabbitMQ"
    if [[ -d /run/systemd/system ]]; then
        timeout "$TIMEOUT" systemctl start rabbitmq-server ||
            rabbit_fail "systemctl start rabbitmq-server failed"
        return 0
    fi
    # No systemd. Do what /etc/init.d/rabbitmq-server does (run the server
    # as the rabbitmq user with the pid file in /run/rabbitmq, so `service
    # rabbitmq-server stop|status` keep working), but in the background and
    # watched by us: the init script's own wait ignores a node that dies
    # during boot and blocks for 10 minutes. /usr/sbin/rabbitmq-server, run
    # as rabbitmq, logs to /var/log/rabbitmq/startup_{log,err}.
    install -d -o rabbitmq -g rabbitmq -m 755 /run/rabbitmq
    (
        cd /var/lib/rabbitmq
        exec setsid env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG="$LANG" \
            RABBITMQ_PID_FILE=/run/rabbitmq/pid \
            runuser -u rabbitmq -- /usr/sbin/rabbitmq-server
    ) </dev/null >/dev/null 2>&1 &
    RABBIT_LAUNCHER=$!
}

wait_rabbit() {
    local deadline=$((SECONDS + TIMEOUT))
    # await_startup returns once the node has fully booted; then make sure
    # its listeners (AMQP 5672, management 15672) accept connections.
    until rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 &&
        rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; do
        if [[ -n "$RABBIT_LAUNCHER" ]] && ! kill -0 "$RABBIT_LAUNCHER" 2>/dev/null; then
            rabbit_fail "rabbitmq-server exited during startup"
        fi
        ((SECONDS < deadline)) || rabbit_fail "not ready after ${TIMEOUT}s"
        sleep 1
    done
    amqp_answers || rabbit_fail "node is up but 127.0.0.1:${AMQP_PORT} does not answer AMQP"
}

check_rabbit_version() {
    local version
    version="$(rabbitmq-diagnostics -q server_version 2>/dev/null | tail -n 1 || true)"
    [[ -n "$version" ]] || die "could not read the RabbitMQ server version"
    if [[ "$(printf '%s\n' "$RABBIT_MIN_VERSION" "$version" | sort -V | head -n 1)" != "$RABBIT_MIN_VERSION" ]]; then
        die "RabbitMQ $version is too old: hiway needs >= $RABBIT_MIN_VERSION (quorum queues)"
    fi
    log "RabbitMQ $version is ready on 127.0.0.1:${AMQP_PORT} (management on 15672)"
}

RABBIT_LAUNCHER=""
if [[ "$RABBIT_EXTERNAL" -eq 0 ]]; then
    start_rabbit
    wait_rabbit
    check_rabbit_version
fi

# ---------------------------------------------------------------------------
# 3. PostgreSQL: find the cluster, start, wait, provision, verify.
# ---------------------------------------------------------------------------
pg_fail() {
    show_logs "${PG_LOG:-}"
    die "PostgreSQL did not start: $*"
}

if [[ "$PG_EXTERNAL" -eq 0 ]]; then
    # The cluster serving port 5432, else create "main" for the newest
    # installed major version (the package normally creates it).
    read -r PG_VER PG_CLUSTER PG_STATUS PG_LOG < <(pg_lsclusters -h |
        awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4, $7; exit }') || true
    if [[ -z "${PG_VER:-}" ]]; then
        if [[ -n "$(pg_lsclusters -h)" ]]; then
            pg_lsclusters >&2
            die "no PostgreSQL cluster uses port ${PG_PORT}; change one with 'pg_conftool VERSION NAME set port ${PG_PORT}'"
        fi
        PG_VER="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
        log "creating PostgreSQL ${PG_VER} cluster main"
        pg_createcluster --locale C.UTF-8 --port "$PG_PORT" "$PG_VER" main >/dev/null
        read -r PG_VER PG_CLUSTER PG_STATUS PG_LOG < <(pg_lsclusters -h |
            awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4, $7; exit }') ||
            die "pg_createcluster did not create a cluster on port ${PG_PORT}"
    fi

    if [[ "$PG_STATUS" == online* ]]; then
        log "PostgreSQL ${PG_VER}/${PG_CLUSTER} is already running"
    else
        log "starting PostgreSQL ${PG_VER}/${PG_CLUSTER}"
        # Without systemd pg_ctlcluster runs pg_ctl itself, as the owner.
        timeout "$TIMEOUT" pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start ||
            pg_fail "pg_ctlcluster $PG_VER $PG_CLUSTER start failed"
    fi

    deadline=$((SECONDS + TIMEOUT))
    until pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; do
        ((SECONDS < deadline)) || pg_fail "not accepting connections on 127.0.0.1:${PG_PORT} after ${TIMEOUT}s"
        sleep 1
    done

    # Role and database; ALTER makes reruns repair drifted settings.
    pg_super <<SQL
SELECT 'CREATE ROLE ${PG_USER}'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${PG_USER}')\gexec
ALTER ROLE ${PG_USER} WITH LOGIN CREATEDB PASSWORD '${PG_PASSWORD}';
SELECT 'CREATE DATABASE ${PG_DB} OWNER ${PG_USER}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '${PG_DB}')\gexec
ALTER DATABASE ${PG_DB} OWNER TO ${PG_USER};
SQL

    if ! pg_login_ok; then
        # Debian's pg_hba.conf allows scram-sha-256 from 127.0.0.1; if this
        # one does not, allow the hiway role explicitly (first match wins).
        hba="$(pg_super -Atc 'SHOW hba_file')"
        log "password login over TCP refused: allowing ${PG_USER} from 127.0.0.1 in $hba"
        {
            printf '# added by hiway deploy/deps.sh\nhost all %s 127.0.0.1/32 scram-sha-256\n' "$PG_USER"
            cat "$hba"
        } >"$hba.hiway-new"
        chown --reference="$hba" "$hba.hiway-new"
        chmod --reference="$hba" "$hba.hiway-new"
        mv "$hba.hiway-new" "$hba"
        pg_super -Atc 'SELECT pg_reload_conf()' >/dev/null
        sleep 1
        pg_login_ok || die "cannot log in as ${PG_USER} over TCP: PGPASSWORD=${PG_PASSWORD} psql -h 127.0.0.1 -U ${PG_USER} -d ${PG_DB} fails"
    fi

    encoding="$(pg_super -Atc "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'template1'")"
    [[ "$encoding" == UTF8 ]] ||
        warn "template1 has encoding $encoding, not UTF8: databases the tests create will inherit it"
    log "PostgreSQL ${PG_VER} is ready on 127.0.0.1:${PG_PORT}; role ${PG_USER} (LOGIN CREATEDB) and database ${PG_DB} exist"
fi

# ---------------------------------------------------------------------------
# 4. Room to work: a full disk looks like a broker outage.
# ---------------------------------------------------------------------------
# RabbitMQ blocks every publisher once its free disk falls under its limit, so
# ingress answers 503 and dozens of tests fail as if the broker were down;
# PostgreSQL stops writing. A debug build tree grows by tens of gigabytes, so
# say so before the tests do. Warnings only: the services are up.
readonly MIN_FREE_MB="${HIWAY_DEPS_MIN_FREE_MB:-2048}"
# One warning per filesystem, naming what lives on it.
declare -A low_disk=() low_disk_free=()
warn_low_disk() {
    local dir=$1 what=$2 avail mount
    [[ -d "$dir" ]] || return 0
    avail="$(df --output=avail -BM "$dir" 2>/dev/null | tail -n 1 | tr -dc '0-9')"
    mount="$(df --output=target "$dir" 2>/dev/null | tail -n 1)"
    [[ -n "$avail" && -n "$mount" ]] || return 0
    if ((avail < MIN_FREE_MB)); then
        low_disk["$mount"]="${low_disk[$mount]:+${low_disk[$mount]}, }${what} (${dir})"
        low_disk_free["$mount"]=$avail
    fi
}
warn_low_disk /var/lib/rabbitmq "RabbitMQ's data"
warn_low_disk /var/lib/postgresql "PostgreSQL's data"
warn_low_disk "$PWD" "this tree"
for mount in "${!low_disk[@]}"; do
    warn "only ${low_disk_free[$mount]} MB free on ${mount}, which holds ${low_disk[$mount]}. Near full, RabbitMQ's disk alarm blocks publishers (ingress answers 503, tests fail as if the broker were down) and PostgreSQL stops writing; free space first (cargo clean, or rm -rf target/debug/incremental)."
done
if [[ "$RABBIT_EXTERNAL" -eq 0 ]] && ! rabbitmq-diagnostics -q check_alarms >/dev/null 2>&1; then
    warn "RabbitMQ reports an alarm and blocks publishers until it clears: $(rabbitmq-diagnostics -q alarms 2>&1 | tr '\n' ' ')"
fi

print_urls
