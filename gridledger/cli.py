"""The one command for every role: `gridledger ROLE ACTION [options]`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from .errors import GridledgerError

EXAMPLES = {
    "keys paillier": "gridledger keys paillier --out keys/",
    "keys meter": "gridledger keys meter --meter m01 --out keys/ --account acct-0001 --registry registry.toml",
    "gateway run": "gridledger gateway run --config gateway.toml",
    "testbed run": "gridledger testbed run --meters 5 --intervals 48",
    "firmware build": "gridledger firmware build",
}


def _cmd_keys_paillier(args) -> int:
    from . import paillier
    print(f"generating a {args.bits}-bit Paillier key pair ...", file=sys.stderr)
    pub, priv = paillier.generate(args.bits)
    pub_path, key_path = paillier.save_keypair(Path(args.out), pub, priv)
    print(f"public key  {pub_path}  (kid {paillier.PublicKey(pub.n).kid})")
    print(f"private key {key_path}  (mode 0600; TESTBED SHORTCUT: trustees hold shares in production)")
    return 0


def _cmd_keys_meter(args) -> int:
    from aggregator.registry import MeterEntry, Registry, dump_registry, load_registry
    from .errors import ConfigError
    from .meterkeys import new_meter_key
    from .wire import METER_ID_RE
    if not METER_ID_RE.match(args.meter):
        raise GridledgerError(f"meter id {args.meter!r} must match [A-Za-z0-9_-]{{1,32}}")
    path = Path(args.out) / f"{args.meter}.ed25519.key"
    if path.exists():
        raise GridledgerError(f"{path} exists; refusing to overwrite a meter key")
    key = new_meter_key(args.meter)
    entries: list[MeterEntry] = []
    if args.registry:
        reg_path = Path(args.registry)
        entries = list(load_registry(reg_path)) if reg_path.exists() else []
        entries.append(MeterEntry(args.meter, args.account or args.meter, key.public_hex))
        try:
            Registry(entries)  # refuses a duplicate id or key before anything is written
        except ConfigError as exc:
            raise GridledgerError(f"not enrolled: {exc}") from exc
    key.write_seed(path)
    print(f"meter {args.meter}: secret seed {path} (mode 0600), public key {key.public_hex}")
    if args.registry:
        reg_path.write_text(dump_registry(entries))
        print(f"enrolled in {reg_path} for account {entries[-1].account}")
    return 0


def _cmd_gateway_run(args) -> int:
    from aggregator.gateway import Gateway, load_gateway_config
    from .logs import setup_logging
    setup_logging("gateway", args.log_level)
    gw = Gateway(load_gateway_config(Path(args.config)))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await gw.run(stop)

    asyncio.run(main())
    return 0


def _cmd_testbed_run(args) -> int:
    from .testbed import TestbedPlan, run_testbed
    return run_testbed(TestbedPlan(workdir=Path(args.dir), meters=args.meters, intervals=args.intervals,
                                   seconds_per_interval=args.seconds_per_interval, heap=args.heap,
                                   broker=args.broker))


def _cmd_firmware_build(args) -> int:
    from .firmware_build import build_firmware
    out = build_firmware(Path(args.out)) if args.out else build_firmware()
    print(f"firmware bundle: {out}")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridledger", description=__doc__)
    roles = p.add_subparsers(dest="role", required=True, metavar="ROLE")

    def action(role_parsers, role: str, name: str, helptext: str, fn):
        sp = role_parsers.add_parser(name, help=helptext, description=helptext,
                                     epilog=f"example: {EXAMPLES[f'{role} {name}']}")
        sp.set_defaults(fn=fn)
        return sp

    keys = roles.add_parser("keys", help="generate keys").add_subparsers(dest="action", required=True)
    sp = action(keys, "keys", "paillier", "generate a Paillier key pair (phe + gmpy2)", _cmd_keys_paillier)
    sp.add_argument("--out", required=True, help="folder for paillier.pub.json and paillier.key.json")
    sp.add_argument("--bits", type=int, default=2048, help="modulus size (>= 2048)")
    sp = action(keys, "keys", "meter", "generate a testbed meter's Ed25519 key", _cmd_keys_meter)
    sp.add_argument("--meter", required=True, help="meter id, [A-Za-z0-9_-]{1,32}")
    sp.add_argument("--out", required=True, help="folder for METER.ed25519.key")
    sp.add_argument("--account", help="account the meter bills to (with --registry)")
    sp.add_argument("--registry", help="registry TOML file to enroll the meter in")

    gw = roles.add_parser("gateway", help="the gateway (aggregator) role").add_subparsers(dest="action", required=True)
    sp = action(gw, "gateway", "run", "run the gateway: MQTT ingest, checks, SQLite, acks", _cmd_gateway_run)
    sp.add_argument("--config", required=True, help="gateway TOML file")
    sp.add_argument("--log-level", default="info")

    tb = roles.add_parser("testbed", help="one-machine testbed").add_subparsers(dest="action", required=True)
    sp = action(tb, "testbed", "run", "run broker, gateway and firmware meters in accelerated time", _cmd_testbed_run)
    sp.add_argument("--meters", type=int, default=5)
    sp.add_argument("--intervals", type=int, default=48, help="15-minute intervals per meter")
    sp.add_argument("--seconds-per-interval", type=float, default=1.0, help="real seconds per 15 minutes")
    sp.add_argument("--heap", default="128k", help="MicroPython heap per meter (embedded default 128k)")
    sp.add_argument("--dir", default=".testbed", help="working folder (recreated)")
    sp.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                    help="auto: Mosquitto when installed, else the pure-Python amqtt (demo only)")

    fw = roles.add_parser("firmware", help="meter firmware").add_subparsers(dest="action", required=True)
    sp = action(fw, "firmware", "build", "fetch umqtt.simple and compile the firmware with mpy-cross",
                _cmd_firmware_build)
    sp.add_argument("--out", help="output folder (default build/firmware)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except GridledgerError as exc:
        print(f"gridledger: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
