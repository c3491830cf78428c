#!/usr/bin/env bash
# flash.sh: the technician's tool for meters, from a bare board to an enrolled
# meter. The bash stays thin: every command but `build` is `gridledger flash
# COMMAND` (gridledger/flashtool.py), where the logic and its tests live.
# docs/flash.md is the manual.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
PY=${GL_PYTHON:-$ROOT/.venv/bin/python}   # GL_PYTHON: another interpreter with gridledger installed
DRY_RUN=0

if [ -t 1 ]; then B=$'\033[1m'; G=$'\033[1;32m'; R=$'\033[1;31m'; N=$'\033[0m'; else B=; G=; R=; N=; fi
step() { printf '%s==>%s %s\n' "$B" "$N" "$*"; }
ok()   { printf '%s ok%s %s\n' "$G" "$N" "$*"; }
die()  { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }
run()  { if [ "$DRY_RUN" = 1 ]; then printf 'would run: %s\n' "$*"; else "$@"; fi; }
need_venv() { [ -x "$PY" ] || die "no .venv yet: run ./run test (or scripts/setup.sh) once first"; }

usage() {
    cat <<'USAGE'
usage: ./flash.sh [--dry-run] COMMAND [options]      (./flash.sh COMMAND --help for each)

commands, in the order a new meter needs them:
  detect      list boards on USB: port, board guess, MicroPython version; Picos in BOOTSEL
  firmware    write MicroPython: --board esp32|esp32-s3|esp32-c3|pico|pico-w|pico2-w --image FILE [--port P]
  build       compile the firmware bundle into build/firmware (mpy-cross, umqtt.simple)
  install     build the bundle and copy it to the board: --port P
  provision   config, on-device key, enrollment on the registry chain, record: --port P --meter ID ...
  verify      on-device self-test, one PASS/FAIL line per check: --port P [--record FILE]
  label       printable PNG + text label: --port P | --record FILE, --out DIR
  virtual-board  a MicroPython Unix port behind a pty, driven like a board: --dir D

options:
  --dry-run   print exactly what would run, change nothing
  -h, --help  this help

exit codes:
  0 ok                1 a check failed or the registry refused   2 usage error
  3 no board found    4 port busy           5 permission denied on the port
  6 wrong board       7 image missing or not an image for the board
  8 Pico not in BOOTSEL                     9 the device failed a command
  10 the registry chain could not be reached

example (a Pico W on /dev/ttyACM0):
  ./flash.sh firmware --board pico-w --image RPI_PICO_W-20250415-v1.25.0.uf2
  ./flash.sh install --port /dev/ttyACM0
  ./flash.sh provision --port /dev/ttyACM0 --meter m01 --account acct-0001 --area area1 \
      --broker mqtt://gateway.local:1883 --wifi 'HomeNet:secret' --paillier keys/paillier.pub.json \
      --signer tech1 --key keys/tech1.ed25519.key
  ./flash.sh verify --port /dev/ttyACM0 --record provisioned/m01.json
  ./flash.sh label --record provisioned/m01.json --out labels/
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
    need_venv
    step "building the firmware bundle"
    if [ -n "$out" ]; then
        run "$PY" -m gridledger firmware build --out "$out"
    else
        run "$PY" -m gridledger firmware build
    fi
    [ "$DRY_RUN" = 1 ] || ok "bundle ready"
}

cmd_flash() {
    local sub=$1; shift
    need_venv
    if [ "$DRY_RUN" = 1 ]; then
        exec "$PY" -m gridledger flash "$sub" --dry-run "$@"
    fi
    exec "$PY" -m gridledger flash "$sub" "$@"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        build) shift; cmd_build "$@"; exit 0 ;;
        detect|firmware|install|provision|verify|label) sub=$1; shift; cmd_flash "$sub" "$@" ;;
        virtual-board)
            shift
            if [ "$DRY_RUN" = 1 ]; then echo "virtual-board has no --dry-run: it only starts a process" >&2; exit 2; fi
            need_venv; exec "$PY" -m gridledger flash virtual-board "$@" ;;
        *) echo "unknown command: $1" >&2; usage >&2; exit 2 ;;
    esac
done
usage >&2
exit 2
