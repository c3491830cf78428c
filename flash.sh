#!/usr/bin/env bash
# flash.sh: the technician's tool for meters.
#
# Today it builds the firmware bundle that is copied to a board. Board
# detection, flashing, provisioning, on-device self-test and labels arrive with
# the enrollment work (see docs/architecture.md, "What is not built yet").
#
# Exit codes: 0 ok, 1 failure, 2 usage error.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
DRY_RUN=0

if [ -t 1 ]; then B=$'\033[1m'; G=$'\033[1;32m'; R=$'\033[1;31m'; N=$'\033[0m'; else B=; G=; R=; N=; fi
step() { printf '%s==>%s %s\n' "$B" "$N" "$*"; }
ok()   { printf '%s ok%s %s\n' "$G" "$N" "$*"; }
die()  { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }
run()  { if [ "$DRY_RUN" = 1 ]; then printf 'would run: %s\n' "$*"; else "$@"; fi; }

usage() {
    cat <<'USAGE'
usage: ./flash.sh [--dry-run] COMMAND [options]

commands:
  build [--out DIR]   fetch umqtt.simple (pinned by hash) and compile every firmware
                      module with mpy-cross into build/firmware (or DIR)

options:
  --dry-run           print what would run, change nothing
  -h, --help          this help (also: ./flash.sh COMMAND --help)

example:
  ./flash.sh build
USAGE
}

cmd_build() {
    local out=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --out) out=${2:?--out needs a folder}; shift 2 ;;
            -h|--help) echo "usage: ./flash.sh build [--out DIR]   (example: ./flash.sh build --out /tmp/fw)"; return 0 ;;
            *) echo "unknown option for build: $1" >&2; exit 2 ;;
        esac
    done
    [ -x "$ROOT/.venv/bin/gridledger" ] || die "no .venv yet: run ./run test (or scripts/setup.sh) once first"
    step "building the firmware bundle"
    if [ -n "$out" ]; then
        run "$ROOT/.venv/bin/gridledger" firmware build --out "$out"
    else
        run "$ROOT/.venv/bin/gridledger" firmware build
    fi
    [ "$DRY_RUN" = 1 ] || ok "bundle ready"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        build) shift; cmd_build "$@"; exit 0 ;;
        *) echo "unknown command: $1" >&2; usage >&2; exit 2 ;;
    esac
done
usage >&2
exit 2
