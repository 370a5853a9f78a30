#!/usr/bin/env bash
#
# deploy/rabbitmq-node.sh - run a separate, throwaway RabbitMQ node, for tests
# that must stop, restart or crash a broker without disturbing the shared one
# that deploy/deps.sh runs on port 5672.
#
# Usage:
#   deploy/rabbitmq-node.sh start   NAME AMQP_PORT  start a FRESH node NAME@localhost
#                                                   (data of an earlier node NAME is deleted)
#   deploy/rabbitmq-node.sh stop    NAME            graceful stop; data is kept
#   deploy/rabbitmq-node.sh restart NAME            stop (if running) and start again on the
#                                                   same port and data dir: durable queues
#                                                   and their messages survive; also brings
#                                                   back a node after `kill`
#   deploy/rabbitmq-node.sh kill    NAME            SIGKILL the node (simulated crash); data kept
#   deploy/rabbitmq-node.sh status  NAME            exit 0 if the node runs, 1 otherwise
#   deploy/rabbitmq-node.sh clean   NAME            stop it and delete its directory
#
# `start` and `restart` return once the node has booted and accepts AMQP
# connections on 127.0.0.1:AMQP_PORT (bounded by HIWAY_RABBIT_NODE_TIMEOUT
# seconds, default 120); connect with amqp://guest:guest@127.0.0.1:AMQP_PORT/%2f.
#
# How: the node is the Debian rabbitmq-server started with its own
#   RABBITMQ_NODENAME=NAME@localhost, RABBITMQ_NODE_PORT=AMQP_PORT,
#   RABBITMQ_DIST_PORT=AMQP_PORT+20000 (Erlang distribution),
#   RABBITMQ_MNESIA_BASE, RABBITMQ_LOG_BASE, RABBITMQ_PID_FILE under
#   /tmp/hiway-rabbit/NAME, an empty enabled-plugins file (so no management
#   listener on 15672) and its own, empty rabbitmq.conf and rabbitmq-env.conf
#   (so settings of the shared node in /etc/rabbitmq do not apply).
# Run as root, the node and the CLI tools run as the rabbitmq user, whose home
# /var/lib/rabbitmq holds the Erlang cookie they must share (the same one as
# the shared node, which is harmless). Run as another user, they run as that
# user with the cookie in its $HOME (Erlang creates it).
# RabbitMQ must be installed: run deploy/deps.sh first.

set -euo pipefail

readonly BASE=/tmp/hiway-rabbit
readonly TIMEOUT="${HIWAY_RABBIT_NODE_TIMEOUT:-120}"
readonly RABBIT_BIN=/usr/lib/rabbitmq/bin

usage() {
    sed -n '7,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

log() { printf '[rabbitmq-node %s] %s\n' "$NAME" "$*"; }
die() {
    printf '[rabbitmq-node %s] ERROR: %s\n' "${NAME:-?}" "$*" >&2
    exit 1
}

(($# >= 2)) || usage
readonly CMD="$1" NAME="$2"
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || die "NAME must match [A-Za-z0-9_-]+"
[[ -x "$RABBIT_BIN/rabbitmq-server" ]] || die "RabbitMQ is not installed: run deploy/deps.sh first"

readonly NODE="$NAME@localhost"
readonly DIR="$BASE/$NAME"
readonly PID_FILE="$DIR/pid"
readonly PORT_FILE="$DIR/port"

if [[ "$(id -u)" -eq 0 ]]; then
    id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user: run deploy/deps.sh first"
    RUN_AS=(runuser -u rabbitmq --)
    OWNER=rabbitmq
    RUN_HOME="$(getent passwd rabbitmq | cut -d: -f6)"
else
    RUN_AS=()
    OWNER="$(id -un)"
    RUN_HOME="$HOME"
fi

# The environment of the node and of the CLI tools talking to it. env -i:
# nothing from the caller's environment (e.g. RABBITMQ_* of the shared node).
node_env() {
    local port="$1"
    NODE_ENV=(
        env -i
        PATH=/usr/sbin:/usr/bin:/sbin:/bin
        LANG=C.UTF-8
        RABBITMQ_NODENAME="$NODE"
        RABBITMQ_NODE_PORT="$port"
        RABBITMQ_DIST_PORT="$((port + 20000))"
        RABBITMQ_MNESIA_BASE="$DIR/mnesia"
        RABBITMQ_LOG_BASE="$DIR/log"
        RABBITMQ_PID_FILE="$PID_FILE"
        RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
        RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
        RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
        HOME="$RUN_HOME" # where Erlang finds the cookie (.erlang.cookie)
    )
}

saved_port() {
    [[ -r "$PORT_FILE" ]] || die "unknown node (no $PORT_FILE): use 'start NAME AMQP_PORT' first"
    cat "$PORT_FILE"
}

# Runs a RabbitMQ CLI tool against the node: rmq TOOL ARGS...
rmq() {
    local tool="$1"
    shift
    (cd "$DIR" && "${RUN_AS[@]}" "${NODE_ENV[@]}" "$RABBIT_BIN/$tool" -n "$NODE" "$@")
}

# The node's OS pid, if that process is alive and really is this node.
node_pid() {
    local pid
    [[ -r "$PID_FILE" ]] || return 1
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -n "$pid" ]] || return 1
    # The node name is not on the command line (RabbitMQ sets it at boot),
    # but the environment we gave the node carries it.
    [[ -r "/proc/$pid/environ" ]] || return 1
    { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "RABBITMQ_NODENAME=$NODE" || return 1
    grep -qs '^State:[[:space:]]*Z' "/proc/$pid/status" && return 1
    printf '%s\n' "$pid"
}

port_open() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# True when 127.0.0.1:PORT answers the AMQP 0-9-1 header with a frame.
amqp_answers() {
    local first
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    first="$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1' _ "$1" 2>/dev/null)" || return 1
    [[ "${first// /}" == 01 ]]
}

show_logs() {
    local f
    for f in "$DIR/log/launcher.log" "$DIR/log/$NODE.log"; do
        [[ -f "$f" ]] || continue
        printf -- '---- last lines of %s ----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

# Waits until nothing listens on the node's ports any more.
wait_ports_free() {
    local port="$1" deadline=$((SECONDS + 30))
    while port_open "$port" || port_open "$((port + 20000))"; do
        ((SECONDS < deadline)) || die "ports $port/$((port + 20000)) still in use 30s after the node stopped"
        sleep 0.2
    done
}

# Starts the node on the data in $DIR and waits for it.
launch() {
    local port="$1" launcher deadline
    node_env "$port"
    ! node_pid >/dev/null || die "already running (pid $(node_pid))"
    port_open "$port" && die "port $port is already in use"
    port_open "$((port + 20000))" && die "port $((port + 20000)) (Erlang distribution) is already in use"

    mkdir -p "$DIR/mnesia" "$DIR/log"
    printf '[].\n' >"$DIR/enabled_plugins"
    [[ -f "$DIR/rabbitmq.conf" ]] ||
        printf '# throwaway node %s (deploy/rabbitmq-node.sh): defaults only\n' "$NODE" >"$DIR/rabbitmq.conf"
    : >"$DIR/rabbitmq-env.conf"
    printf '%s\n' "$port" >"$PORT_FILE"
    rm -f "$PID_FILE"
    chown -R "$OWNER" "$DIR"

    log "starting on 127.0.0.1:$port (distribution $((port + 20000)), data $DIR)"
    (
        cd "$DIR"
        exec setsid "${RUN_AS[@]}" "${NODE_ENV[@]}" "$RABBIT_BIN/rabbitmq-server"
    ) </dev/null >>"$DIR/log/launcher.log" 2>&1 &
    launcher=$!

    deadline=$((SECONDS + TIMEOUT))
    until amqp_answers "$port"; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            show_logs
            die "rabbitmq-server exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_logs
            die "no AMQP on 127.0.0.1:$port after ${TIMEOUT}s (the node may still be booting: '$0 kill $NAME' ends it)"
        fi
        sleep 0.5
    done
    rmq rabbitmqctl -q await_startup --timeout 30 >/dev/null ||
        {
            show_logs
            die "AMQP port open but the node did not finish booting"
        }
    log "ready: amqp://guest:guest@127.0.0.1:$port/%2f (pid $(node_pid || echo '?'))"
}

stop_node() {
    local port pid
    port="$(saved_port)"
    node_env "$port"
    if ! pid="$(node_pid)"; then
        log "not running"
        return 0
    fi
    log "stopping (pid $pid)"
    # With the pid file, `stop` returns only once the OS process has exited.
    if ! rmq rabbitmqctl -q stop "$PID_FILE" >/dev/null; then
        node_pid >/dev/null && die "rabbitmqctl stop failed and the node still runs"
    fi
    wait_ports_free "$port"
    log "stopped"
}

kill_node() {
    local port pid deadline
    port="$(saved_port)"
    if ! pid="$(node_pid)"; then
        log "not running"
        return 0
    fi
    log "killing (SIGKILL pid $pid)"
    kill -KILL "$pid"
    deadline=$((SECONDS + 30))
    while node_pid >/dev/null; do
        ((SECONDS < deadline)) || die "pid $pid still alive 30s after SIGKILL"
        sleep 0.2
    done
    wait_ports_free "$port"
    log "killed"
}

case "$CMD" in
start)
    (($# == 3)) || usage
    port="$3"
    if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1024 || port + 20000 > 65535)); then
        die "AMQP_PORT must be a number in 1024..45535 (the distribution port is AMQP_PORT+20000)"
    fi
    node_env "$port"
    node_pid >/dev/null && die "already running (pid $(node_pid)): use restart, stop or kill"
    # A fresh node: forget anything an earlier node of this name left.
    rm -rf "$DIR"
    mkdir -p "$BASE"
    chmod 1777 "$BASE" 2>/dev/null || true
    launch "$port"
    ;;
restart)
    (($# == 2)) || usage
    port="$(saved_port)"
    stop_node
    launch "$port"
    ;;
stop)
    (($# == 2)) || usage
    stop_node
    ;;
kill)
    (($# == 2)) || usage
    kill_node
    ;;
status)
    (($# == 2)) || usage
    if pid="$(node_pid)"; then
        log "running (pid $pid, port $(cat "$PORT_FILE" 2>/dev/null || echo '?'))"
    else
        log "not running"
        exit 1
    fi
    ;;
clean)
    (($# == 2)) || usage
    if [[ -d "$DIR" ]]; then
        if node_pid >/dev/null; then stop_node; fi
        rm -rf "$DIR"
    fi
    log "removed $DIR"
    ;;
*)
    usage
    ;;
esac
