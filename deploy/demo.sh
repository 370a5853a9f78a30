#!/usr/bin/env bash
#
# deploy/demo.sh - see hiway work, with one command.
#
# Meant for a newcomer on a fresh Debian machine (root, with only the Rust
# toolchain). From the repository root:
#
#   deploy/demo.sh          run the demo, then stop everything it started
#   deploy/demo.sh --keep   run the demo and leave hiway and the sink running
#
# What it does:
#   1. deploy/deps.sh: installs and starts RabbitMQ and PostgreSQL;
#   2. cargo build --release --bins --locked (several minutes the first time);
#   3. starts `hiway demo-sink --verbose` (a destination that answers 200 to
#      every POST, on 127.0.0.1:9000) and `hiway run --config config/example`
#      (ingress, transformer, sender and audit in one process, ingress on
#      127.0.0.1:8080), both in the background, logging to a temp directory;
#   4. waits until ingress answers GET /readyz;
#   5. posts a CommCare-like form to the channel "demo" with the demo key,
#      prints the 202 answer and the message id;
#   6. shows what the demo sink received, then the message's audit trail
#      (`hiway trace`): received, routed, delivered;
#   7. posts a malformed JSON body and shows the 400 answer with line/column.
#
# On exit (also on failure or ctrl-c) it stops the two processes it started,
# unless --keep was given and the demo succeeded; then it prints how to stop
# them. It is safe to run again: if port 8080 or 9000 is already taken (for
# example by an earlier `--keep` run) it says so and exits 1.

set -euo pipefail

readonly INGRESS_URL=http://127.0.0.1:8080
readonly INGRESS_PORT=8080
readonly SINK_PORT=9000
readonly CONFIG=config/example
readonly BIN=target/release/hiway
# The demo client's key: config/example/hiway.toml holds its SHA-256 hash.
readonly DEMO_KEY=demo-key
readonly READY_TIMEOUT=30

log() { printf '\n[demo] %s\n' "$*"; }
die() {
    printf '\n[demo] ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '7,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

keep=0
for arg in "$@"; do
    case "$arg" in
    --keep) keep=1 ;;
    -h | --help) usage ;;
    *)
        printf 'unknown argument: %s\n' "$arg" >&2
        usage
        ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_busy() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Says which process holds a port, when `ss` can tell.
port_holder() {
    command -v ss >/dev/null 2>&1 || return 0
    ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/  held by: \1/p'
}

# ---------------------------------------------------------------------------
# 0. Ports first: failing now is better than after a long build.
# ---------------------------------------------------------------------------
busy=0
for port in "$INGRESS_PORT" "$SINK_PORT"; do
    if port_busy "$port"; then
        printf '[demo] ERROR: port %s on 127.0.0.1 is already in use.\n' "$port" >&2
        port_holder "$port" >&2
        busy=1
    fi
done
if ((busy)); then
    printf '[demo] Is an earlier demo still running (deploy/demo.sh --keep)? Stop it with the\n' >&2
    printf '[demo] kill command it printed, or stop whatever holds the port, then run this again.\n' >&2
    exit 1
fi

command -v curl >/dev/null 2>&1 || die "curl is needed: apt-get install -y curl"

# ---------------------------------------------------------------------------
# 1. Broker and database.
# ---------------------------------------------------------------------------
log "starting RabbitMQ and PostgreSQL (deploy/deps.sh; installs them the first time)"
deploy/deps.sh

# ---------------------------------------------------------------------------
# 2. Build.
# ---------------------------------------------------------------------------
log "building hiway: cargo build --release --bins --locked (several minutes the first time: about 10 on 2 cores)"
cargo build --release --bins --locked

# ---------------------------------------------------------------------------
# 3. Start the demo sink and hiway.
# ---------------------------------------------------------------------------
logs="$(mktemp -d /tmp/hiway-demo.XXXXXX)"
sink_log="$logs/demo-sink.log"
hiway_log="$logs/hiway.log"
sink_pid=""
hiway_pid=""
succeeded=0

# Stops one process we started: SIGTERM lets it drain; after 15 s, SIGKILL.
stop_process() {
    local pid="$1" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    if ((keep && succeeded)); then
        return
    fi
    if [[ -n "$hiway_pid$sink_pid" ]]; then
        printf '\n[demo] stopping hiway and the demo sink (logs kept in %s)\n' "$logs"
    fi
    stop_process "$hiway_pid"
    stop_process "$sink_pid"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints the end of both logs, for when something went wrong.
show_logs() {
    local f
    for f in "$hiway_log" "$sink_log"; do
        printf '\n[demo] ---- last lines of %s ----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

log "starting the demo sink on 127.0.0.1:${SINK_PORT} (log: $sink_log)"
# NO_COLOR keeps the log files free of terminal colour codes; RUST_LIB_BACKTRACE=0 keeps a
# start-up error to its message, without a stack trace.
NO_COLOR=1 RUST_LIB_BACKTRACE=0 "$BIN" demo-sink --verbose >"$sink_log" 2>&1 &
sink_pid=$!

log "starting hiway run --config ${CONFIG} (log: $hiway_log)"
NO_COLOR=1 RUST_LIB_BACKTRACE=0 "$BIN" run --config "$CONFIG" >"$hiway_log" 2>&1 &
hiway_pid=$!

# ---------------------------------------------------------------------------
# 4. Wait until ingress is ready.
# ---------------------------------------------------------------------------
printf '[demo] waiting for %s/readyz ' "$INGRESS_URL"
deadline=$((SECONDS + READY_TIMEOUT))
until curl -sf "$INGRESS_URL/readyz" >/dev/null 2>&1 && port_busy "$SINK_PORT"; do
    if ! kill -0 "$hiway_pid" 2>/dev/null || ! kill -0 "$sink_pid" 2>/dev/null; then
        printf '\n'
        show_logs
        die "hiway or the demo sink exited during start-up (logs above)"
    fi
    if ((SECONDS >= deadline)); then
        printf '\n'
        show_logs
        die "ingress was not ready after ${READY_TIMEOUT}s (logs above)"
    fi
    printf '.'
    sleep 1
done
printf ' ready\n'

# ---------------------------------------------------------------------------
# 5. Post a message.
# ---------------------------------------------------------------------------
log "posting a CommCare-like form to channel \"demo\":"
cat <<'EOF'
  curl -s -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' \
       --data-binary @- http://127.0.0.1:8080/v1/channels/demo/messages
EOF
answer="$(curl -s -w '\nHTTP %{http_code}' \
    -H "Authorization: Bearer $DEMO_KEY" -H 'Content-Type: application/json' \
    --data-binary @- "$INGRESS_URL/v1/channels/demo/messages" <<'EOF'
{
  "id": "5e2f7c1a-9b3d-4e6f-8a1b-2c3d4e5f6a7b",
  "domain": "demo-anc",
  "type": "data",
  "received_on": "2024-03-05T07:31:02.123456Z",
  "metadata": { "username": "chw.mary", "timeEnd": "2024-03-05T09:29:58.117+02:00" },
  "form": {
    "@name": "ANC Visit",
    "visit_date": "2024-03-05",
    "weight_kg": "61.5",
    "danger_signs": "none",
    "case": {
      "@case_id": "8f8fd909-684f-402d-a892-f50e607fffef",
      "update": { "last_visit_date": "2024-03-05", "last_weight_kg": "61.5" }
    }
  }
}
EOF
)" || true
printf '%s\n' "$answer" | sed 's/^/  /'
[[ "$answer" == *"HTTP 202" ]] || {
    show_logs
    die "ingress did not accept the message (expected HTTP 202)"
}
id="$(printf '%s\n' "$answer" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')"
[[ -n "$id" ]] || die "no message id in the answer"
printf '[demo] 202 Accepted: the broker has the message. Its id is %s\n' "$id"

# ---------------------------------------------------------------------------
# 6. What the destination received, and the audit trail.
# ---------------------------------------------------------------------------
# Delivery and the audit write take a moment; look for up to 15 s.
trail=""
deadline=$((SECONDS + 15))
while ((SECONDS < deadline)); do
    sleep 1
    grep -q "sink received a message.*$id" "$sink_log" || continue
    trail="$("$BIN" trace --config "$CONFIG" "$id" 2>&1)" || trail=""
    [[ "$trail" == *delivered* ]] && break
done

log "what the demo sink received (from $sink_log):"
if grep -q "sink received a message.*$id" "$sink_log"; then
    # The body spans several lines: print from our message's line up to the next message
    # (the sink may also get messages an earlier run left in the queue).
    awk -v id="$id" '/sink received a message/ { p = index($0, id) > 0 } p && NF' "$sink_log" |
        sed 's/^/  /'
else
    show_logs
    die "the demo sink received nothing within 15 s"
fi

log "the message's audit trail: $BIN trace --config $CONFIG $id"
[[ -n "$trail" ]] || trail="$("$BIN" trace --config "$CONFIG" "$id" 2>&1)" || true
printf '%s\n' "$trail" | sed 's/^/  /'
[[ "$trail" == *delivered* ]] || {
    show_logs
    die "the trail has no delivered event yet (logs above)"
}

# ---------------------------------------------------------------------------
# 7. One mistake, and what ingress answers.
# ---------------------------------------------------------------------------
log "posting malformed JSON (a comma after the last field); ingress answers 400 and publishes nothing:"
bad="$(printf '{\n  "form": {\n    "weight_kg": "61.5",\n  }\n}\n' |
    curl -s -w '\nHTTP %{http_code}' \
        -H "Authorization: Bearer $DEMO_KEY" -H 'Content-Type: application/json' \
        --data-binary @- "$INGRESS_URL/v1/channels/demo/messages")" || true
printf '%s\n' "$bad" | sed 's/^/  /'

succeeded=1
log "done: the message was accepted (202), delivered to the demo sink, and its trail recorded."
if ((keep)); then
    cat <<EOF

[demo] hiway and the demo sink keep running (--keep):
  ingress:    $INGRESS_URL/v1/channels/demo/messages  (Authorization: Bearer $DEMO_KEY)
  logs:       $hiway_log
              $sink_log
  queues:     http://127.0.0.1:15672 (RabbitMQ management, guest/guest)
  trace:      $BIN trace --config $CONFIG <id>
  stop them:  kill $hiway_pid $sink_pid
EOF
fi
