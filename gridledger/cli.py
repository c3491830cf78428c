"""The one command for every role: `gridledger ROLE ACTION [options]`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from .errors import GridledgerError
from .flashtool import EXAMPLES as FLASH_EXAMPLES, add_commands as add_flash_commands

# `broker credentials add --role`; gridledger.brokerauth.ROLES, without importing it at start-up
ROLE_CHOICES = ("meter", "gateway", "validator", "storage", "verifier", "trustee", "coordinator", "registry",
                "technician")

EXAMPLES = {
    "keys paillier": "gridledger keys paillier --out keys/",
    "keys ceremony": "gridledger keys ceremony --trustees 5 --threshold 3 --out keys/ "
                     "--names alice,bob,carol,dave,erin",
    "keys meter": "gridledger keys meter --meter m01 --out keys/ --account acct-0001 --registry registry.toml",
    "gateway run": "gridledger gateway run --config gateway.toml",
    "testbed run": "gridledger testbed run --meters 5 --intervals 48",
    "firmware build": "gridledger firmware build",
    "keys validator": "gridledger keys validator --name v0 --out keys/ --set validators.toml",
    "validator run": "gridledger validator run --config v0.toml",
    "chain verify": "gridledger chain verify --config gateway.toml",
    "keys signer": "gridledger keys signer --id tech1 --out keys/",
    "keys bls": "gridledger keys bls --name coord --out keys/",
    "registry publish-key": "gridledger registry publish-key --threshold keys/threshold.pub.json --signer ops "
                            "--key keys/ops.ed25519.key",
    "trustee run": "gridledger trustee run --config trustee-t1.toml",
    "settle": "gridledger settle --config coordinator.toml --area area1 --period 2026-10 --tariff tariff.toml",
    "loadcurve": "gridledger loadcurve --config coordinator.toml --area area1 --from 2026-10-01 --to 2026-10-08",
    "verify-bill": "gridledger verify-bill bills/acct-0001-2026-10.json --validators validators.toml",
    "registry genesis": "gridledger registry genesis --registrar ops=keys/ops.ed25519.key --out registry-genesis.toml",
    "registry run": "gridledger registry run --config registry.toml",
    "registry node": "gridledger registry node --id tech1 --role technician --public-key HEX --signer ops "
                     "--key keys/ops.ed25519.key",
    "registry enroll": "gridledger registry enroll --meter m01 --account acct-0001 --area area1 "
                       "--public-key HEX --meter-signature HEX --time 1790000000 "
                       "--signer tech1 --key keys/tech1.ed25519.key",
    "registry enroll-request": "gridledger registry enroll-request --meter m01 --account acct-0001 --area area1 "
                               "--public-key HEX --signer tech1 --out m01.enroll.bin",
    "registry retire": "gridledger registry retire --meter m01 --reason replaced --signer tech1 "
                       "--key keys/tech1.ed25519.key",
    "registry show": "gridledger registry show --config gateway.toml",
    "broker credentials add": "gridledger broker credentials add --id m01 --role meter --out broker/",
    "broker acl": "gridledger broker acl --registry-config gateway.toml --out broker/acl",
    "broker config": "gridledger broker config --out broker/ --tls-cert certs/server.crt --tls-key certs/server.key "
                     "--ca certs/ca.crt --local-port 1883",
    "broker testbed-ca": "gridledger broker testbed-ca --out certs/ --host gateway.local --host 192.168.1.10",
    "alerts list": "gridledger alerts list --config gateway.toml --meter m01 --limit 20",
    "events list": "gridledger events list --config gateway.toml --meter m01 --limit 20",
    "bridge serial": "gridledger bridge serial --config gateway.toml --port /dev/ttyACM0",
    "loadgen run": "gridledger loadgen run --config gateway.toml --keys lg/ --meters 1000 --readings 10",
    "coordinator run": "gridledger coordinator run --config coordinator.toml",
    "storage run": "gridledger storage run --config storage-s1.toml",
    "storage inventory": "gridledger storage inventory --config storage-s1.toml",
    "storage read": "gridledger storage read --config reader.toml --height 7 --index 3",
    "verifier run": "gridledger verifier run --config verifier.toml",
    "query exact": "gridledger query exact --config coordinator.toml --area A --account acct-0001",
    "query interval": "gridledger query interval --config coordinator.toml --area A --account acct-0001 "
                      "--from 1767225600 --to 1767312000 --url http://127.0.0.1:8480",
}
EXAMPLES.update(FLASH_EXAMPLES)


def _cmd_keys_paillier(args) -> int:
    from . import paillier
    print(f"generating a {args.bits}-bit Paillier key pair ...", file=sys.stderr)
    pub, priv = paillier.generate(args.bits)
    pub_path, key_path = paillier.save_keypair(Path(args.out), pub, priv)
    print(f"public key  {pub_path}  (kid {paillier.PublicKey(pub.n).kid})")
    print(f"private key {key_path}  (mode 0600; TESTBED SHORTCUT: trustees hold shares in production)")
    return 0


def _cmd_keys_ceremony(args) -> int:
    import time
    from coordinator.threshold import ceremony, write_ceremony
    names = tuple(args.names.split(",")) if args.names else ()
    out = Path(args.out)
    # Fail on an existing key before minutes of prime search, not after.
    for name in ("paillier.pub.json", "threshold.pub.json"):
        if (out / name).exists():
            raise GridledgerError(f"{out / name} exists; refusing to overwrite key material")
    started = time.monotonic()
    state = {"stage": "", "tried": 0, "shown": 0.0}

    def progress(stage: str, tried: int) -> None:
        now = time.monotonic() - started
        if stage != state["stage"] and state["stage"]:
            print(f"[{now:6.1f} s] safe prime {state['stage']}: found after {state['tried']} candidates",
                  file=sys.stderr, flush=True)
        if stage == "deal":
            print(f"[{now:6.1f} s] dealing shares", file=sys.stderr, flush=True)
        elif now - state["shown"] >= 2.0:
            print(f"[{now:6.1f} s] safe prime {stage}: {tried} candidates tested", file=sys.stderr, flush=True)
            state["shown"] = now
        state.update(stage=stage, tried=tried)

    print(f"threshold key ceremony: {args.threshold} of {args.trustees} trustees, {args.bits}-bit modulus",
          file=sys.stderr)
    pub, shares = ceremony(args.trustees, args.threshold, args.bits, names, progress)
    paths = write_ceremony(out, pub, shares)
    del shares
    print(f"kid {pub.kid}: {pub.threshold} of {pub.trustees} trustees, n of {pub.n.bit_length()} bits")
    print(f"public key      {paths['paillier_public']}  (for gateways, meters, loadgen)")
    print(f"threshold key   {paths['threshold_public']}  (verification keys, for the combiner)")
    for name, path in paths["shares"].items():
        print(f"share {name:<10} {path}  (mode 0600: move to trustee {name}; keep no copy)")
    return 0


def _new_ed25519_key(ident: str, out: str, what: str):
    """A fresh Ed25519 key for `ident` and the path to write its seed to (refusing
    a bad id or an existing file); the caller writes it once its checks pass."""
    from .meterkeys import new_meter_key
    from .wire import METER_ID_RE
    if not METER_ID_RE.match(ident):
        raise GridledgerError(f"{what} id {ident!r} must match [A-Za-z0-9_-]{{1,32}}")
    path = Path(out) / f"{ident}.ed25519.key"
    if path.exists():
        raise GridledgerError(f"{path} exists; refusing to overwrite a {what} key")
    return new_meter_key(ident), path


def _cmd_keys_meter(args) -> int:
    from aggregator.registry import MeterEntry, Registry, dump_registry, load_registry
    from .errors import ConfigError
    key, path = _new_ed25519_key(args.meter, args.out, "meter")
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


def _cmd_keys_validator(args) -> int:
    from certlog.validators import (dump_validator_set, info_for, load_validator_set, new_secret_key,
                                    write_secret_key)
    from .errors import ConfigError
    key_path = Path(args.out) / f"{args.name}.bls.key"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; refusing to overwrite a validator key")
    set_path = Path(args.set) if args.set else None
    members, proposer = [], None
    if set_path and set_path.exists():
        vset = load_validator_set(set_path)
        members, proposer = list(vset.members), vset.proposer
    if args.proposer and not set_path:
        raise ConfigError("--proposer needs --set: the proposer key is named in the validator set")
    if args.proposer and proposer is not None:
        raise ConfigError(f"{set_path} already names proposer {proposer.name}")
    if any(m.name == args.name for m in members) or (proposer and proposer.name == args.name):
        raise ConfigError(f"{args.name} is already in {set_path}")
    sk = new_secret_key()
    write_secret_key(key_path, sk)
    info = info_for(args.name, sk)
    print(f"secret key  {key_path}  (mode 0600)\npublic key  {info.public_key.hex()}")
    if set_path:
        if args.proposer:
            set_path.write_text(dump_validator_set(members, info))
            print(f"named as the chain's proposer in {set_path}")
        else:
            set_path.write_text(dump_validator_set(members + [info], proposer))
            print(f"added as validator {len(members)} to {set_path} (with its proof of possession)")
    return 0


def _cmd_keys_signer(args) -> int:
    key, path = _new_ed25519_key(args.id, args.out, "signer")
    key.write_seed(path)
    print(f"signer {args.id}: secret seed {path} (mode 0600), public key {key.public_hex}")
    return 0


def _signer(ident: str, path: str):
    from .meterkeys import MeterKey
    return MeterKey.read_seed(ident, Path(path))


def _cmd_registry_genesis(args) -> int:
    from coordinator.registryapp import Genesis, dump_genesis
    regs = {}
    for item in args.registrar:
        ident, sep, key = item.partition("=")
        if not sep:
            raise GridledgerError(f"--registrar {item!r}: give ID=KEYFILE")
        regs[ident] = _signer(ident, key).public_hex
    out = Path(args.out)
    if out.exists():
        raise GridledgerError(f"{out} exists; a genesis is written once")
    out.write_text(dump_genesis(Genesis(regs)))
    print(f"registry genesis {out}: registrars {', '.join(sorted(regs))}")
    return 0


def _cmd_registry_run(args) -> int:
    from coordinator.registry import RegistryRole, load_registry_config
    return _run_role("registry", args.log_level, RegistryRole(load_registry_config(Path(args.config))))


def _submit_mqtt(args):
    """Where a submitting command connects: `--mqtt FILE`'s [mqtt] table (account, TLS)
    on a secured broker, else `--broker HOST:PORT`."""
    from .config import MqttConfig, mqtt_section, read_toml
    if args.mqtt:
        return mqtt_section(read_toml(Path(args.mqtt)), Path(args.mqtt))
    host, _, port = args.broker.partition(":")
    return MqttConfig(host=host, port=int(port or 1883))


def _submit_record(args, rec: dict, meter_key=None, *, meter_sig: str | None = None, when: int | None = None) -> int:
    import time
    from coordinator.registry import submit
    from coordinator.registryapp import sign_record
    signer = _signer(args.signer, args.key)
    rec = dict(rec, signer=args.signer, time=int(time.time()) if when is None else when)
    tx = sign_record(rec, signer.private, meter_key.private if meter_key else None, meter_sig=meter_sig)
    mqtt = _submit_mqtt(args)
    try:
        [result] = asyncio.run(submit(mqtt, [tx], chain=args.chain, timeout_s=args.timeout))
    except TimeoutError as exc:
        raise GridledgerError(f"{exc}: is `gridledger registry run` up on {mqtt.host}:{mqtt.port}?") from None
    return _report(result)


def _report(result: dict) -> int:
    """A record's fate as JSON on stdout; a refusal also in words on stderr, and exit 1."""
    import json
    from coordinator.registryapp import REASONS
    print(json.dumps(result))
    if result["status"] == "certified":
        return 0
    reason = result.get("reason", "")
    print(f"gridledger: refused: {reason}: {result.get('detail', '')}\n  {REASONS.get(reason, '')}".rstrip(),
          file=sys.stderr)
    return 1


def _cmd_registry_node(args) -> int:
    return _submit_record(args, {"kind": "node", "id": args.id, "role": args.role, "public_key": args.public_key})


def _enroll_fields(args, public_key: str) -> dict:
    from coordinator.registryapp import enroll_record
    rec = enroll_record(meter=args.meter, account=args.account, area=args.area, public_key=public_key,
                        signer=args.signer, time=0, board=args.board, firmware=args.firmware, replaces=args.replaces)
    return {k: v for k, v in rec.items() if k not in ("signer", "time")}


def _cmd_registry_enroll(args) -> int:
    """Two ways to prove the meter holds its key: the testbed's seed file (--meter-key),
    or, for a key made on the device, its signature over `enroll-request`'s bytes."""
    from coordinator.registryapp import meter_signature_ok
    from .meterkeys import MeterKey
    if args.meter_key:
        if args.public_key or args.meter_signature:
            raise GridledgerError("give --meter-key, or --public-key with --meter-signature, not both")
        key = MeterKey.read_seed(args.meter, Path(args.meter_key))
        return _submit_record(args, _enroll_fields(args, key.public_hex), key, when=args.time)
    if not (args.public_key and args.meter_signature and args.time):
        raise GridledgerError("without --meter-key, give --public-key, --meter-signature and the --time "
                              "that `registry enroll-request` printed (the device signed it)")
    rec = _enroll_fields(args, args.public_key.lower())
    signed = dict(rec, signer=args.signer, time=args.time)
    if not meter_signature_ok(signed, args.meter_signature.lower()):
        # Checked here as the registry would, so a technician hears it before anything is sent.
        return _report({"status": "refused", "reason": "tx_bad_meter_signature",
                        "detail": f"{args.meter}'s signature does not verify with {args.public_key[:16]}…"})
    return _submit_record(args, rec, meter_sig=args.meter_signature.lower(), when=args.time)


def _cmd_registry_enroll_request(args) -> int:
    """Print (and with --out write) the exact bytes the device must sign to enroll."""
    import json
    import time
    from coordinator.registryapp import enrollment_message
    from .meterkeys import verifier
    verifier(args.public_key)  # a malformed key is refused here, not by the registry later
    rec = dict(_enroll_fields(args, args.public_key.lower()), signer=args.signer,
               time=args.time or int(time.time()))
    message = enrollment_message(rec)
    if args.out:
        Path(args.out).write_bytes(message)
    print(json.dumps({"record": rec, "message": message.hex(), "time": rec["time"],
                      **({"file": args.out} if args.out else {})}))
    return 0


def _cmd_registry_retire(args) -> int:
    target, ident = ("meter", args.meter) if args.meter else ("node", args.node)
    return _submit_record(args, {"kind": "retire", "target": target, "id": ident, "reason": args.reason})


def _cmd_registry_publish_key(args) -> int:
    from coordinator.threshold import load_threshold_public
    key = load_threshold_public(Path(args.threshold))
    return _submit_record(args, {"kind": "paillier", "kid": key.kid, "key": key.to_dict()})


def _cmd_registry_show(args) -> int:
    import json
    import sqlite3
    from certlog.store import ChainStore
    from coordinator.registry import RegistryChainSettings
    from coordinator.registryapp import RegistryHistory
    from .config import read_toml
    doc = read_toml(Path(args.config))
    rc = RegistryChainSettings.from_doc(doc, Path(args.config).parent)
    if rc is None:
        raise GridledgerError(f"{args.config} has no [registry_chain] table")
    area = args.area or next((doc[t]["area"] for t in ("gateway", "validator") if t in doc), None)
    if area is None:
        raise GridledgerError("give --area")
    with sqlite3.connect(f"file:{rc.database}?mode=ro", uri=True, timeout=10) as conn:
        history = RegistryHistory.from_store(ChainStore(conn), rc.chain)
    view = history.view(area)
    print(json.dumps({"chain": rc.chain, "height": history.height, "area": area,
                      "meters": [{"meter": e.meter, "account": e.account, "public_key": e.public_key}
                                 for e in sorted(view, key=lambda e: e.meter)]}))
    return 0


def _cmd_broker_credentials_add(args) -> int:
    import json
    from .brokerauth import PASSWD, Account, add_credentials
    password = add_credentials(Path(args.out), Account(args.id, args.role, args.area or ""), rotate=args.rotate)
    print(json.dumps({"id": args.id, "role": args.role, "password": password,
                      "password_file": str(Path(args.out) / PASSWD), "rotated": args.rotate}))
    print(f"the password for {args.id} is shown once: put it in the device's or role's config now "
          "(Mosquitto reloads the password file on SIGHUP)", file=sys.stderr)
    return 0


def _cmd_broker_acl(args) -> int:
    import json
    from .brokerauth import load_members, read_accounts, render_acl, write_acl
    out = Path(args.out)
    accounts = read_accounts(Path(args.accounts) if args.accounts else out.parent)
    members = load_members(Path(args.registry_config), args.area)
    write_acl(out, render_acl(accounts, members))
    print(json.dumps({"acl": str(out), "meters": len(members.meters), "accounts": len(accounts),
                      "registry_height": members.height, "retired_nodes": sorted(members.retired_nodes)}))
    return 0


def _cmd_broker_config(args) -> int:
    from .brokertls import check_tls, render_config
    out = Path(args.out)
    check_tls(Path(args.tls_cert), Path(args.tls_key), Path(args.ca))
    out.mkdir(parents=True, exist_ok=True)
    conf = out / "mosquitto.conf"
    conf.write_text(render_config(out, tls_cert=Path(args.tls_cert), tls_key=Path(args.tls_key), ca=Path(args.ca),
                                  tls_port=args.tls_port, tls_bind=args.tls_bind or "", local_port=args.local_port))
    print(f"broker config {conf}: TLS on {args.tls_bind or '*'}:{args.tls_port}"
          + (f", plain on 127.0.0.1:{args.local_port}" if args.local_port else "") + ", accounts only")
    return 0


def _cmd_broker_testbed_ca(args) -> int:
    from .brokertls import make_testbed_ca
    paths = make_testbed_ca(Path(args.out), args.host)
    for name, path in paths.items():
        print(f"{name:<11} {path}" + ("  (mode 0600)" if name.endswith(".key") else ""))
    print("TESTBED CA: for labs; in production use your organisation's CA", file=sys.stderr)
    return 0


# The cyclic garbage collector for long-running roles. Reading by reading, a role makes
# and drops thousands of small containers (a JSON dict, a Reading, tuples); almost all
# are freed by reference counting, yet every 700 allocations CPython's default threshold
# walked the young ones and, every hundred such walks, everything alive: 10 % of a
# gateway's CPU under load (perf: gc_collect_main, visit_decref, visit_reachable).
# What start-up built (modules, keys, the registry) is frozen out of every walk, and a
# young generation of 50,000 is walked a seventieth as often, by when nearly all of it
# is gone. Cycles are still collected; memory between walks grows by at most that many
# objects.
GC_THRESHOLDS = (50_000, 20, 10)


def _run_role(name: str, level: str, role) -> int:
    """Run `role.run(stop)` until SIGTERM or SIGINT."""
    import gc
    import logging
    from . import eventloop
    from .logs import event, setup_logging
    setup_logging(name, level)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        event(logging.getLogger(f"gridledger.{name}"), "event_loop", loop=eventloop.running())
        await role.run(stop)

    eventloop.run(main())
    return 0


def _cmd_gateway_run(args) -> int:
    from aggregator.gateway import Gateway, load_gateway_config
    return _run_role("gateway", args.log_level, Gateway(load_gateway_config(Path(args.config))))


def _cmd_alerts_list(args) -> int:
    import json
    from datetime import datetime, timezone
    from aggregator.alerts import read_alerts
    from aggregator.gateway import load_gateway_config
    if args.limit <= 0:
        raise GridledgerError("--limit must be positive")
    alerts, refused = read_alerts(load_gateway_config(Path(args.config)).gateway.database, args.meter, args.limit)
    if args.json:
        for a in alerts:
            print(json.dumps({"meter": a.meter, "seq": a.seq, "t": a.t, "kind": a.kind, "state": a.state,
                              "value": a.value, "threshold": a.threshold, "received_at": a.received_at}))
        return 0
    for a in alerts:
        when = datetime.fromtimestamp(a.t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        unit = "dC" if a.kind == "temp_high" else "W"
        print(f"{when}  {a.meter:<12} #{a.seq:<5} {a.kind:<10} {a.state:<8} {a.value} {unit} "
              f"(threshold {a.threshold} {unit})")
    print(f"{len(alerts)} alerts; refused: {json.dumps(refused, sort_keys=True) if refused else 'none'}")
    return 0


def _cmd_events_list(args) -> int:
    import json
    from datetime import datetime, timezone
    from aggregator.events import read_events
    from aggregator.gateway import load_gateway_config
    if args.limit <= 0:
        raise GridledgerError("--limit must be positive")
    events, refused = read_events(load_gateway_config(Path(args.config)).gateway.database, args.meter, args.limit)
    if args.json:
        for e in events:
            print(json.dumps({"meter": e.meter, "eseq": e.eseq, "at": e.at, "kind": e.kind, "seq": e.seq,
                              "import_before": e.import_before, "export_before": e.export_before,
                              "import_wh": e.import_wh, "export_wh": e.export_wh, "by": e.by, "hash": e.hash,
                              "received_at": e.received_at}))
        return 0
    for e in events:
        when = datetime.fromtimestamp(e.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"{when}  {e.meter:<12} #{e.eseq:<4} {e.kind}  after seq {e.seq}  by {e.by}: "
              f"import {e.import_before} -> {e.import_wh} Wh, export {e.export_before} -> {e.export_wh} Wh")
    print(f"{len(events)} events; refused: {json.dumps(refused, sort_keys=True) if refused else 'none'}")
    return 0


def _cmd_bridge_serial(args) -> int:
    from aggregator.gateway import load_gateway_config
    from aggregator.serialbridge import SerialBridge
    from .errors import ConfigError
    if args.baud <= 0 or args.status_s <= 0:
        raise ConfigError("--baud and --status-s must be positive")
    return _run_role("bridge", args.log_level, SerialBridge(load_gateway_config(Path(args.config)), args.port,
                                                            args.baud, args.status_s))


def _cmd_validator_run(args) -> int:
    from aggregator.validator import ValidatorRole, load_validator_config
    return _run_role("validator", args.log_level, ValidatorRole(load_validator_config(Path(args.config))))


def _cmd_storage_run(args) -> int:
    from aggregator.storage import StorageNode, load_storage_config
    return _run_role("storage", args.log_level, StorageNode(load_storage_config(Path(args.config))))


def _cmd_storage_inventory(args) -> int:
    import json
    import sqlite3
    from aggregator.storage import load_storage_config
    from aggregator.storagestore import StorageStore
    s = load_storage_config(Path(args.config)).storage
    if not s.database.exists():
        raise GridledgerError(f"{s.database} does not exist: has the node run?")
    store = StorageStore(conn=sqlite3.connect(f"file:{s.database}?mode=ro", uri=True, timeout=10))
    try:
        kind = store.kind() or s.kind   # a promotion outranks the config file
        print(json.dumps({"node": s.name, "kind": kind, "chain": s.chain, "headers": store.header_height(),
                          "bodies": [list(r) for r in store.body_ranges(limit=1_000_000)],
                          "placed_missing": store.wanted(kind) if kind != "full" else []}))
    finally:
        store.close()
    return 0


def _cmd_storage_read(args) -> int:
    """One verified transaction: replicas from the certified P chain, best first, fall-back on any fault."""
    import json
    from aggregator.reader import Reader, ReadError, load_reader_config
    settings, mqtt = load_reader_config(Path(args.config))

    async def main() -> dict:
        async with Reader(settings, mqtt) as reader:
            r = await reader.read(args.height, args.index)
        return {"height": r.height, "index": r.index, "node": r.node, "tx": r.tx.hex(), "header": r.header.hash,
                "fell_back": [list(a) for a in r.attempts]}

    try:
        print(json.dumps(asyncio.run(main())))
    except ReadError as exc:
        raise GridledgerError(f"{exc.reason}: {exc.detail}") from exc
    return 0


def _cmd_verifier_run(args) -> int:
    from aggregator.verifier import Verifier, load_verifier_config
    return _run_role("verifier", args.log_level, Verifier(load_verifier_config(Path(args.config))))


def _cmd_coordinator_run(args) -> int:
    from coordinator.role import CoordinatorRole, load_coordinator_config
    return _run_role("coordinator", args.log_level, CoordinatorRole(load_coordinator_config(Path(args.config))))


def _cmd_query(args) -> int:
    """Fetch (local files, or the API with --url), verify with the area's validator
    set, print the verified result; exit 1 with the reason if it does not verify."""
    import json
    from certlog.block import ChainError
    from certlog.validators import load_validator_set
    from coordinator import client
    from coordinator.role import load_coordinator_config, open_ledger
    cfg = load_coordinator_config(Path(args.config))
    vset = load_validator_set(cfg.area(args.area).validators)
    source = client.HttpSource(args.url, args.area) if args.url else client.LedgerSource(open_ledger(cfg, args.area))
    try:
        if args.action == "exact":
            out = client.exact(source, vset, args.area, args.account, min_height=args.min_height)
        else:
            if args.from_ is None or args.to is None:
                raise GridledgerError("interval needs --from and --to")
            out = client.interval(source, vset, args.area, args.account, args.from_, args.to,
                                  min_height=args.min_height)
    except ChainError as exc:
        print(f"gridledger: verification failed: {exc.reason}: {exc.detail}", file=sys.stderr)
        print(json.dumps({"verified": False, "reason": exc.reason, "detail": exc.detail}))
        return 1
    print(json.dumps(out))
    return 0


def _cmd_chain_verify(args) -> int:
    import json
    from aggregator.audit import audit_from_config
    report = audit_from_config(Path(args.config), Path(args.database) if args.database else None)
    print(json.dumps(report.to_dict()))
    return 0 if report.ok else 1


def _cmd_trustee_run(args) -> int:
    from coordinator.trustee import TrusteeRole, load_trustee_config
    return _run_role("trustee", args.log_level, TrusteeRole(load_trustee_config(Path(args.config))))


def _cmd_settle_run(args) -> int:
    import json
    from coordinator.settle import Period, run_settlement
    from .errors import ConfigError
    if args.period and (args.start is None) == (args.end is None):
        period = Period.month(args.period) if args.start is None else Period(args.period, args.start, args.end)
    else:
        raise ConfigError("give --period YYYY-MM, or --period NAME with --from and --to (Unix seconds)")
    summary = run_settlement(Path(args.config), area=args.area, period=period, tariff=Path(args.tariff),
                             out=Path(args.out) if args.out else None, log_level=args.log_level)
    print(json.dumps(summary))
    return 0 if not summary["unbilled"] else 1


def _cmd_loadcurve(args) -> int:
    import json
    from coordinator.combine import TrusteesUnavailable
    from coordinator.loadcurve import parse_when, run_loadcurve
    try:
        doc = run_loadcurve(Path(args.config), area=args.area, t1=parse_when(args.start), t2=parse_when(args.end),
                            out=Path(args.out) if args.out else None, log_level=args.log_level)
    except TrusteesUnavailable as exc:
        raise GridledgerError(f"trustees: {exc}") from None
    print(json.dumps({"area": doc["area"], "from": doc["from"], "to": doc["to"], "min_meters": doc["min_meters"],
                      "points": len(doc["points"]), "withheld": len(doc["withheld"]),
                      "refused": len(doc["refused"]), "files": doc["files"]}))
    return 0 if not doc["refused"] else 1


def _cmd_bill_verify(args) -> int:
    import json
    from certlog.validators import load_validator_set
    from coordinator.settle import InvalidBill, verify_bill
    vset = load_validator_set(Path(args.validators))
    reg = load_validator_set(Path(args.registry_validators)) if args.registry_validators else vset
    try:
        bill = json.loads(Path(args.bill).read_text())
        summary = verify_bill(bill, vset, reg)
    except (OSError, ValueError) as exc:
        raise GridledgerError(f"cannot read {args.bill}: {exc}") from None
    except InvalidBill as exc:
        print(json.dumps({"ok": False, "reason": exc.reason, "detail": exc.detail}))
        return 1
    print(json.dumps({"ok": True, **summary}))
    return 0


def _cmd_testbed_run(args) -> int:
    from .testbed import TestbedPlan, run_testbed
    return run_testbed(TestbedPlan(workdir=Path(args.dir), meters=args.meters, intervals=args.intervals,
                                   seconds_per_interval=args.seconds_per_interval, heap=args.heap,
                                   broker=args.broker, validators=args.validators))


def _cmd_firmware_build(args) -> int:
    from .firmware_build import build_firmware
    out = build_firmware(Path(args.out)) if args.out else build_firmware()
    print(f"firmware bundle: {out}")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}  {f.stat().st_size} bytes")
    return 0


def _cmd_loadgen(args) -> int:
    import json
    from aggregator.gateway import load_gateway_config
    from .errors import ConfigError
    from .loadgen import open_area, run_area
    cfg = load_gateway_config(Path(args.config)) if args.config else None
    host = args.host or (cfg.mqtt.host if cfg else "127.0.0.1")
    port = args.port or (cfg.mqtt.port if cfg else 1883)
    area_id = args.area or (cfg.gateway.area if cfg else None)
    public = args.paillier_public or (cfg.gateway.paillier_public if cfg else None)
    for name, value in (("--meters", args.meters), ("--readings", args.readings), ("--window", args.window)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, not {value}")
    if not 0 < port < 65536 or args.timeout <= 0:
        raise ConfigError("--port must be 1..65535 and --timeout positive")
    keys = Path(args.keys)
    if args.generate_only and (keys / "loadgen.json").exists():
        raise ConfigError(f"{keys} already holds a load area; use another folder")
    area = open_area(keys, args.meters, area=area_id, paillier_public=Path(public) if public else None)
    if cfg and (cfg.gateway.registry is None or cfg.gateway.registry.resolve() != area.registry.resolve()):
        print(f"warning: {args.config} loads registry {cfg.gateway.registry}, not {area.registry}; "
              "the gateway will nack these meters as unknown_meter", file=sys.stderr)
    if args.generate_only:
        print(f"{len(area.keys)} meter keys and registry {area.registry} for area {area.area}; "
              f"point the gateway's registry at it, then run without --generate-only", file=sys.stderr)
        print(json.dumps({"meters": len(area.keys), "registry": str(area.registry), "area": area.area}))
        return 0
    from . import eventloop
    result = eventloop.run(run_area(area, host, port, args.readings, window=args.window, timeout=args.timeout,
                                    say=lambda s: print(s, file=sys.stderr, flush=True)))
    print(json.dumps({"meters": len(area.keys), "area": area.area, **result.summary()}))
    return 0 if result.complete else 1


def build_parser() -> argparse.ArgumentParser:
    from .firmware_build import METER_HEAP
    p = argparse.ArgumentParser(prog="gridledger", description=__doc__)
    roles = p.add_subparsers(dest="role", required=True, metavar="ROLE")

    def action(role_parsers, role: str, name: str, helptext: str, fn):
        """`ROLE NAME`, or with role "" the top-level command NAME."""
        sp = role_parsers.add_parser(name, help=helptext, description=helptext,
                                     epilog=f"example: {EXAMPLES[f'{role} {name}'.strip()]}")
        sp.set_defaults(fn=fn)
        return sp

    def daemon(role_parsers, role: str, helptext: str, fn, what: str) -> None:
        """`ROLE run --config FILE [--log-level]`: a long-running role."""
        sp = action(role_parsers, role, "run", helptext, fn)
        sp.add_argument("--config", required=True, help=f"{what} TOML file")
        sp.add_argument("--log-level", default="info")

    keys = roles.add_parser("keys", help="generate keys").add_subparsers(dest="action", required=True)
    sp = action(keys, "keys", "paillier", "generate a Paillier key pair (phe + gmpy2)", _cmd_keys_paillier)
    sp.add_argument("--out", required=True, help="folder for paillier.pub.json and paillier.key.json")
    sp.add_argument("--bits", type=int, default=2048, help="modulus size (>= 2048)")
    sp = action(keys, "keys", "ceremony", "deal a threshold Paillier key: t of l trustees decrypt together, "
                "the private key is never written", _cmd_keys_ceremony)
    sp.add_argument("--trustees", type=int, required=True, help="l, the number of trustees")
    sp.add_argument("--threshold", type=int, required=True, help="t, how many trustees it takes to decrypt")
    sp.add_argument("--out", required=True, help="folder for paillier.pub.json, threshold.pub.json and trustees/")
    sp.add_argument("--bits", type=int, default=2048, help="modulus size (>= 2048)")
    sp.add_argument("--names", help="trustee names, comma-separated (default trustee1..trusteeL)")
    sp = action(keys, "keys", "meter", "generate a testbed meter's Ed25519 key", _cmd_keys_meter)
    sp.add_argument("--meter", required=True, help="meter id, [A-Za-z0-9_-]{1,32}")
    sp.add_argument("--out", required=True, help="folder for METER.ed25519.key")
    sp.add_argument("--account", help="account the meter bills to (with --registry)")
    sp.add_argument("--registry", help="registry TOML file to enroll the meter in")

    sp = action(keys, "keys", "validator", "generate a validator's BLS12-381 key and proof of possession",
                _cmd_keys_validator)
    sp.add_argument("--name", required=True, help="validator name")
    sp.add_argument("--out", required=True, help="folder for NAME.bls.key")
    sp.add_argument("--set", help="validator-set TOML to append the public key and proof of possession to")
    sp.add_argument("--proposer", action="store_true", help="this key is the chain's proposer (the gateway), "
                    "not a validator")

    sp = action(keys, "keys", "bls", "generate a BLS12-381 key for a coordinator or trustee", _cmd_keys_validator)
    sp.add_argument("--name", required=True, help="its name")
    sp.add_argument("--out", required=True, help="folder for NAME.bls.key")
    sp.set_defaults(set=None, proposer=False)

    sp = action(keys, "keys", "signer", "generate an Ed25519 key for a registrar or technician", _cmd_keys_signer)
    sp.add_argument("--id", required=True, help="node id, [A-Za-z0-9_-]{1,32}")
    sp.add_argument("--out", required=True, help="folder for ID.ed25519.key")

    def enroll_args(sp) -> None:
        sp.add_argument("--meter", required=True)
        sp.add_argument("--account", required=True)
        sp.add_argument("--area", required=True)
        sp.add_argument("--board", default="unix")
        sp.add_argument("--firmware", default="")
        sp.add_argument("--replaces", help="the account's current meter, retired by this enrollment (a swap)")

    rg = roles.add_parser("registry", help="the registry chain: meters, nodes, roles").add_subparsers(
        dest="action", required=True)
    sp = action(rg, "registry", "genesis", "write the registry chain's genesis (its registrars)",
                _cmd_registry_genesis)
    sp.add_argument("--registrar", action="append", required=True, help="ID=KEYFILE (repeat for several)")
    sp.add_argument("--out", required=True, help="genesis TOML to write")
    daemon(rg, "registry", "run the registry chain's proposer: take signed records, certify them",
           _cmd_registry_run, "registry role")
    submits = []
    sp = action(rg, "registry", "node", "register a node (technician, gateway, validator, ...) signed by a registrar",
                _cmd_registry_node)
    sp.add_argument("--id", required=True)
    sp.add_argument("--role", required=True, choices=["registrar", "technician", "gateway", "validator", "trustee",
                                                       "coordinator"])
    sp.add_argument("--public-key", required=True, help="hex: Ed25519 (64 digits) or, for a validator, BLS (96)")
    submits.append(sp)
    sp = action(rg, "registry", "enroll", "enroll a meter (signed by a technician and by the meter's own key)",
                _cmd_registry_enroll)
    enroll_args(sp)
    sp.add_argument("--meter-key", help="testbed: the meter's Ed25519 seed file (the CLI makes its proof of "
                    "possession)")
    sp.add_argument("--public-key", help="the key the device generated, hex (with --meter-signature and --time)")
    sp.add_argument("--meter-signature", help="the device's Ed25519 signature, hex, over the bytes "
                    "`registry enroll-request` printed")
    sp.add_argument("--time", type=int, help="the record time `registry enroll-request` printed")
    submits.append(sp)
    sp = action(rg, "registry", "enroll-request", "print the exact bytes a meter must sign to enroll a key "
                "generated on the device (its proof of possession)", _cmd_registry_enroll_request)
    enroll_args(sp)
    sp.add_argument("--public-key", required=True, help="the key the device generated, hex")
    sp.add_argument("--signer", required=True, help="the technician's node id that will sign the enrollment")
    sp.add_argument("--time", type=int, help="record time, Unix seconds (default: now)")
    sp.add_argument("--out", help="also write the bytes to this file (for the device to sign)")
    sp = action(rg, "registry", "publish-key", "publish the trustees' threshold Paillier key (a registrar signs)",
                _cmd_registry_publish_key)
    sp.add_argument("--threshold", required=True, help="threshold.pub.json from `keys ceremony`")
    submits.append(sp)
    sp = action(rg, "registry", "retire", "retire a meter or a node", _cmd_registry_retire)
    who = sp.add_mutually_exclusive_group(required=True)
    who.add_argument("--meter")
    who.add_argument("--node")
    sp.add_argument("--reason", required=True)
    submits.append(sp)
    for sp in submits:
        sp.add_argument("--signer", required=True, help="the signing node's id")
        sp.add_argument("--key", required=True, help="the signer's Ed25519 seed file")
        sp.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker")
        sp.add_argument("--mqtt", help="TOML file with an [mqtt] table (host, port, username, password, tls_ca) "
                        "for a secured broker; replaces --broker")
        sp.add_argument("--chain", default="registry")
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the certificate")
    sp = action(rg, "registry", "show", "list the meters a role's registry replica holds for an area",
                _cmd_registry_show)
    sp.add_argument("--config", required=True, help="gateway or validator TOML with [registry_chain]")
    sp.add_argument("--area", help="default: the config's area")

    bk = roles.add_parser("broker", help="broker security: accounts, ACLs, TLS (Mosquitto)").add_subparsers(
        dest="action", required=True)
    cr = bk.add_parser("credentials", help="broker accounts").add_subparsers(dest="what", required=True)
    sp = action(cr, "broker credentials", "add", "make an account: print its password once, keep only its hash "
                "in the Mosquitto password file", _cmd_broker_credentials_add)
    sp.add_argument("--id", required=True, help="account (MQTT user name): the meter or node id")
    sp.add_argument("--role", required=True, choices=list(ROLE_CHOICES))
    sp.add_argument("--area", help="the area a gateway, storage node or verifier serves; for a validator, "
                    "optional: the only area whose meter readings it may read")
    sp.add_argument("--out", required=True, help="folder of passwd and accounts.toml")
    sp.add_argument("--rotate", action="store_true", help="replace an existing account's password")
    sp = action(bk, "broker", "acl", "write the Mosquitto ACL from the registry and the accounts", _cmd_broker_acl)
    sp.add_argument("--registry-config", required=True, help="a role's TOML with [registry_chain] (or a gateway's "
                    "with registry = FILE), a static registry TOML, or `registry show` JSON")
    sp.add_argument("--area", help="area of a static registry's meters (default: the gateway config's)")
    sp.add_argument("--out", required=True, help="ACL file to write")
    sp.add_argument("--accounts", help="folder with accounts.toml (default: --out's folder)")
    sp = action(bk, "broker", "config", "write mosquitto.conf: accounts only, ACL, a TLS listener "
                "(and optionally a plain loopback one)", _cmd_broker_config)
    sp.add_argument("--out", required=True, help="folder of passwd and acl; mosquitto.conf is written there")
    sp.add_argument("--tls-cert", required=True, help="the broker's certificate (PEM)")
    sp.add_argument("--tls-key", required=True, help="its private key (PEM, unencrypted)")
    sp.add_argument("--ca", required=True, help="the CA that issued it, which clients trust")
    sp.add_argument("--tls-port", type=int, default=8883)
    sp.add_argument("--tls-bind", help="address of the TLS listener (default: all)")
    sp.add_argument("--local-port", type=int, help="also a plain listener on 127.0.0.1 only, for roles on this host")
    sp = action(bk, "broker", "testbed-ca", "make a lab CA and a server certificate (ECDSA P-256)",
                _cmd_broker_testbed_ca)
    sp.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.crt, server.key")
    sp.add_argument("--host", required=True, action="append", help="the broker's DNS name or IP (repeat)")

    gw = roles.add_parser("gateway", help="the gateway (aggregator) role").add_subparsers(dest="action", required=True)
    daemon(gw, "gateway", "run the gateway: MQTT ingest, checks, SQLite, acks", _cmd_gateway_run, "gateway")

    al = roles.add_parser("alerts", help="device alerts the gateway verified and stored").add_subparsers(
        dest="action", required=True)
    sp = action(al, "alerts", "list", "list the newest stored alerts (oldest first) and the refusal counts",
                _cmd_alerts_list)
    sp.add_argument("--config", required=True, help="the gateway's TOML file (its database)")
    sp.add_argument("--meter", help="only this meter's alerts")
    sp.add_argument("--limit", type=int, default=100, help="at most this many, the newest")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")

    ev = roles.add_parser("events", help="signed meter events (set-register) the gateway verified and stored"
                          ).add_subparsers(dest="action", required=True)
    sp = action(ev, "events", "list", "list the newest stored meter events (oldest first) and the refusal counts",
                _cmd_events_list)
    sp.add_argument("--config", required=True, help="the gateway's TOML file (its database)")
    sp.add_argument("--meter", help="only this meter's events")
    sp.add_argument("--limit", type=int, default=100, help="at most this many, the newest")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")

    br = roles.add_parser("bridge", help="bridges for meters without a network").add_subparsers(
        dest="action", required=True)
    sp = action(br, "bridge", "serial", "bridge one wired meter (USB or UART, serial framing v1) to the broker: "
                "its readings published as an MQTT meter would, the gateway's acks written back", _cmd_bridge_serial)
    sp.add_argument("--config", required=True, help="the gateway's TOML file (area, [mqtt], max_payload)")
    sp.add_argument("--port", required=True, help="serial device, e.g. /dev/ttyACM0 or /dev/serial/by-id/...")
    sp.add_argument("--baud", type=int, default=115200, help="line speed (a USB CDC port ignores it)")
    sp.add_argument("--status-s", type=float, default=10.0, help="seconds between status log lines")
    sp.add_argument("--log-level", default="info")

    va = roles.add_parser("validator", help="an area-chain validator").add_subparsers(dest="action", required=True)
    daemon(va, "validator", "run a validator: re-check proposed blocks, sign each height once",
           _cmd_validator_run, "validator")

    ch = roles.add_parser("chain", help="certified chains").add_subparsers(dest="action", required=True)
    sp = action(ch, "chain", "verify", "check a stored area chain offline: every header, certificate, "
                "root and signature; report the first fault", _cmd_chain_verify)
    sp.add_argument("--config", required=True, help="a gateway or validator TOML (registry, key, validator set)")
    sp.add_argument("--database", help="the SQLite file to audit (default: the config's database)")

    tr = roles.add_parser("trustee", help="a trustee: one share of the Paillier key").add_subparsers(
        dest="action", required=True)
    daemon(tr, "trustee", "answer decryption requests that policy allows, with proofs", _cmd_trustee_run, "trustee")

    sp = action(roles, "", "settle", "bill every account of an area for a period from certified totals "
                "(resumable)", _cmd_settle_run)
    sp.add_argument("--config", required=True, help="coordinator TOML file (with [settlement])")
    sp.add_argument("--area", required=True, help="area chain id")
    sp.add_argument("--period", required=True, help="YYYY-MM, or a name with --from/--to")
    sp.add_argument("--from", dest="start", type=int, help="period start, Unix seconds (readings ending after it)")
    sp.add_argument("--to", dest="end", type=int, help="period end, Unix seconds (readings ending at or before it)")
    sp.add_argument("--tariff", required=True, help="tariff TOML file")
    sp.add_argument("--out", help="folder for the bills (JSON, HTML, CSV); default: [settlement] bills")
    sp.add_argument("--log-level", default="warning")

    sp = action(roles, "", "loadcurve", "decrypt an area's total per interval over at least k meters and plot "
                "it (resumable)", _cmd_loadcurve)
    sp.add_argument("--config", required=True, help="coordinator TOML file (with [settlement])")
    sp.add_argument("--area", required=True, help="area chain id")
    sp.add_argument("--from", dest="start", required=True,
                    help="window start: Unix seconds or ISO date/datetime, UTC (intervals ending after it)")
    sp.add_argument("--to", dest="end", required=True,
                    help="window end: Unix seconds or ISO date/datetime, UTC (intervals ending at or before it)")
    sp.add_argument("--out", help="folder for the JSON, CSV and SVG; default: [settlement] loadcurves")
    sp.add_argument("--log-level", default="warning")

    sp = action(roles, "", "verify-bill", "check a bill's every proof and certificate with the validator keys "
                "alone, and recompute it", _cmd_bill_verify)
    sp.add_argument("bill", help="the bill's JSON file")
    sp.add_argument("--validators", required=True, help="validator-set TOML of the area chain")
    sp.add_argument("--registry-validators", help="validator set of the registry chain (default: the same)")

    st = roles.add_parser("storage", help="a storage node (full, heavy or light) of an area chain").add_subparsers(
        dest="action", required=True)
    daemon(st, "storage", "run a storage node: keep certified blocks, sign receipts, serve peers, catch up",
           _cmd_storage_run, "storage node")
    sp = action(st, "storage", "inventory", "print a storage node's headers and held bodies (read-only)",
                _cmd_storage_inventory)
    sp.add_argument("--config", required=True, help="the storage node's TOML file")
    sp = action(st, "storage", "read", "read one transaction of a certified block from its replicas, verified "
                "against the certified header (falls back to the next replica on any fault)", _cmd_storage_read)
    sp.add_argument("--config", required=True, help="the reader's TOML file ([reader] and [mqtt])")
    sp.add_argument("--height", type=int, required=True, help="area block height")
    sp.add_argument("--index", type=int, required=True, help="transaction index in the block")

    vf = roles.add_parser("verifier", help="the verifier: placement by reliability, the P chain's proposer"
                          ).add_subparsers(dest="action", required=True)
    daemon(vf, "verifier", "run the verifier: place certified blocks by RV, record placements and receipts "
           "on the P chain, re-send placements without receipts", _cmd_verifier_run, "verifier")

    co = roles.add_parser("coordinator", help="the coordinator: follows area chains, answers queries").add_subparsers(
        dest="action", required=True)
    daemon(co, "coordinator", "follow the registry and area chains, index them, serve the HTTP query "
           "API (docs/queries.md)", _cmd_coordinator_run, "coordinator")

    qy = roles.add_parser("query", help="verified queries of an area chain").add_subparsers(dest="action",
                                                                                          required=True)
    for name, helptext in (("exact", "an account's latest certified state and reading, verified"),
                           ("interval", "every reading of an account in [--from, --to], verified complete")):
        sp = action(qy, "query", name, helptext + " against the area's validator set", _cmd_query)
        sp.add_argument("--config", required=True, help="coordinator TOML (areas, validator sets, database)")
        sp.add_argument("--area", required=True, help="the area chain's id")
        sp.add_argument("--account", required=True)
        sp.add_argument("--url", help="ask this coordinator's API (default: read the coordinator's own files)")
        sp.add_argument("--min-height", type=int, default=0,
                        help="refuse an answer complete only as of a lower height (a head you know)")
        if name == "interval":
            sp.add_argument("--from", dest="from_", type=int, required=True, help="Unix seconds, inclusive")
            sp.add_argument("--to", type=int, required=True, help="Unix seconds, inclusive")

    tb = roles.add_parser("testbed", help="one-machine testbed").add_subparsers(dest="action", required=True)
    sp = action(tb, "testbed", "run", "run broker, gateway and firmware meters in accelerated time", _cmd_testbed_run)
    sp.add_argument("--meters", type=int, default=5)
    sp.add_argument("--intervals", type=int, default=48, help="15-minute intervals per meter")
    sp.add_argument("--seconds-per-interval", type=float, default=1.0, help="real seconds per 15 minutes")
    sp.add_argument("--heap", default=METER_HEAP, help=f"MicroPython heap per meter (default {METER_HEAP})")
    sp.add_argument("--validators", type=int, default=4, help="area-chain validators (N = 3f+1)")
    sp.add_argument("--dir", default=".testbed", help="working folder (recreated)")
    sp.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                    help="auto: Mosquitto when installed, else the pure-Python amqtt (demo only)")

    fw = roles.add_parser("firmware", help="meter firmware").add_subparsers(dest="action", required=True)
    sp = action(fw, "firmware", "build", "fetch umqtt.simple and compile the firmware with mpy-cross",
                _cmd_firmware_build)
    sp.add_argument("--out", help="output folder (default build/firmware)")
    add_flash_commands(roles, action)

    lg = roles.add_parser("loadgen", help="load generator: many wire-v1 meters in one process").add_subparsers(
        dest="action", required=True)
    sp = action(lg, "loadgen", "run", "publish precomputed readings of many meters to a gateway and "
                "measure acked readings per second", _cmd_loadgen)
    sp.add_argument("--config", help="gateway TOML: MQTT host/port, area and Paillier public key come from it")
    sp.add_argument("--host", help="MQTT broker host (default: --config's, else 127.0.0.1)")
    sp.add_argument("--port", type=int, help="MQTT broker port (default: --config's, else 1883)")
    sp.add_argument("--area", help="area id (default: --config's)")
    sp.add_argument("--paillier-public", help="the area's paillier.pub.json (default: --config's)")
    sp.add_argument("--keys", required=True, help="folder for the generated meter keys and registry.toml")
    sp.add_argument("--meters", type=int, default=100)
    sp.add_argument("--readings", type=int, default=10, help="readings per meter")
    sp.add_argument("--window", type=int, default=256, help="most unacknowledged readings in flight")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds before the run gives up")
    sp.add_argument("--generate-only", action="store_true",
                    help="write the meter keys and registry, then exit (start the gateway with that registry)")
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
