#!/usr/bin/env bash
#
# deploy/fhir-validator.sh - make the FHIR R4 validator the tests use, and
# print the path of its Python.
#
# Why: hiway's FHIR double answers like a real server, but "like" is only
# worth something if a third party agrees that what reached it is valid R4.
# PyPI fhir.resources 6.1.0 is strict R4 4.0.1 (from 6.5.0 it defaults to R4B,
# 8.x to R5, where Encounter.class is a list), and it needs pydantic 1
# (../shared/protocols.md §9.2 item 1). It lives in its own venv so it never
# touches the machine's Python.
#
# What it does, idempotently:
#   1. if python3 is missing or `python3 -m venv` cannot work (Debian ships
#      venv/ensurepip in python3-venv) and we are root, installs python3 and
#      python3-venv with apt-get;
#   2. creates the venv at $HIWAY_FHIR_VENV (default <repo>/target/fhir-venv)
#      and pip-installs the two pinned packages;
#   3. writes a marker holding the requirements, so later runs only compare it
#      and print the path (well under a second).
# Concurrent runs (several test binaries at once) wait on a lock file rather
# than build the same venv twice.
#
# Usage:
#   deploy/fhir-validator.sh                    # prints <venv>/bin/python
#   deploy/fhir-validator.sh validate < b.json  # validates one Bundle on stdin
#                                               # (tests/fhir_validate.py)
#
# Environment:
#   HIWAY_FHIR_VENV  where the venv lives (default <repo>/target/fhir-venv)

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly repo_root
readonly VENV="${HIWAY_FHIR_VENV:-$repo_root/target/fhir-venv}"
# pydantic<2: fhir.resources 6.1.0 is written against pydantic 1 and fails to
# import under 2.
readonly REQUIREMENTS=("fhir.resources==6.1.0" "pydantic<2")
readonly MARKER="$VENV/.hiway-requirements"

log() { printf '[fhir-validator] %s\n' "$*" >&2; }
die() {
    printf '[fhir-validator] ERROR: %s\n' "$*" >&2
    exit 1
}

ready() { [[ -x "$VENV/bin/python" && -f "$MARKER" && "$(cat "$MARKER")" == "${REQUIREMENTS[*]}" ]]; }

# `python3 -m venv` needs the venv and ensurepip modules; Debian splits them
# out of python3 into python3-venv.
venv_works() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }

make_venv() {
    if ! command -v python3 >/dev/null 2>&1 || ! venv_works; then
        # A fresh CI machine may have only the Rust toolchain: no python3 at all.
        [[ "$(id -u)" -eq 0 ]] || die "python3 -m venv is unavailable: install python3 and python3-venv (as root: apt-get install python3-venv)"
        command -v apt-get >/dev/null 2>&1 || die "python3 -m venv is unavailable and apt-get is missing: install python3 and python3-venv by hand"
        log "installing python3 and python3-venv (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
        venv_works || die "python3 -m venv still fails after installing python3-venv"
    fi
    # A half-made venv (an interrupted pip) is rebuilt from scratch.
    rm -rf "$VENV"
    log "creating $VENV"
    python3 -m venv "$VENV" >&2
    log "pip install ${REQUIREMENTS[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" >&2 ||
        die "pip could not install ${REQUIREMENTS[*]} (is PyPI reachable?)"
    printf '%s' "${REQUIREMENTS[*]}" >"$MARKER"
}

if ! ready; then
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    flock 9
    # Another run may have finished it while we waited for the lock.
    ready || make_venv
    exec 9>&-
fi

case "${1:-}" in
"") printf '%s\n' "$VENV/bin/python" ;;
validate) exec "$VENV/bin/python" "$repo_root/tests/fhir_validate.py" ;;
*) die "unknown argument ${1}: expected nothing or 'validate'" ;;
esac
