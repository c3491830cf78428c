"""The testbed's trustees and settlement (issue 7's demo ending).

A real key ceremony (threshold Paillier, 2048 bits, any 2 of 3 trustees), its
public key published on the registry chain, three trustee processes and the
coordinator following the chains; after the meters stop, `gridledger settle`
runs as an operator would run it, and every bill is verified from the validator
keys alone (`verify_bill`) and compared with the simulator's truth; then
`gridledger loadcurve` decrypts the area's total per interval (over at least k
meters) and each point is compared with the truth too. Nothing in
the testbed ever holds the whole private key.

The trustees' policy is scaled to the testbed's compressed day (`TestbedPolicy`);
production defaults are in `coordinator.trustee.Policy`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from certlog import bls
from certlog.validators import ValidatorSet, new_secret_key, write_secret_key
from coordinator.registry import submit
from coordinator.registryapp import sign_record
from coordinator.settle import InvalidBill, Period, SettlementStore, verify_bill
from coordinator.tariff import Tariff
from coordinator.threshold import ThresholdPublicKey, ceremony, write_ceremony
from gridledger.wire import SLOTS, slot_index

from .config import MqttConfig

__all__ = ["TRUSTEES", "THRESHOLD", "SettlementBed", "TestbedPolicy", "key_ceremony", "publish_key",
           "write_settlement", "settle", "loadcurve", "BillCheck", "check_bills", "truth_slots", "TARIFF"]

TRUSTEES = ("t1", "t2", "t3")
THRESHOLD = 2
BAND_NAMES = ("night", "day", "peak")  # the testbed's band calendar (testbed.DEFAULT_BANDS)
TARIFF = """name = "gridledger testbed time-of-use"
currency = "EUR"
minor_units = 2
standing_charge_per_day = "0.45"
""" + "".join(f'\n[[band]]\nband = {b}\nname = "{name}"\nimport_per_kwh = "{imp}"\nexport_per_kwh = "{exp}"\n'
              for b, name, imp, exp in ((0, "night", "0.18", "0.05"), (1, "day", "0.29", "0.08"),
                                        (2, "peak", "0.41", "0.12")))


@dataclass(frozen=True, slots=True)
class TestbedPolicy:
    """The trustees' policy for a compressed day: a bill needs `min_readings`
    readings, a load-curve point `min_meters` meters."""
    min_readings: int
    min_meters: int

    @classmethod
    def for_plan(cls, meters: int, intervals: int) -> "TestbedPolicy":
        return cls(min_readings=max(2, min(24, intervals)), min_meters=max(2, min(5, meters)))


@dataclass(frozen=True, slots=True)
class SettlementBed:
    key: ThresholdPublicKey
    trustees: tuple[Path, ...]     # one TOML per trustee
    coordinator: Path              # coordinator.toml, with [settlement]
    tariff: Path


def key_ceremony(keys: Path, say: Callable[[str], None]) -> tuple[ThresholdPublicKey, dict]:
    """The 2048-bit ceremony, its files under `keys` (shares 0600), progress through `say`."""
    t0 = time.monotonic()
    tried = {"p": 0, "q": 0}

    def progress(stage: str, n: int) -> None:
        if stage in tried:
            tried[stage] = n

    key, shares = ceremony(len(TRUSTEES), THRESHOLD, 2048, names=TRUSTEES, progress=progress)
    paths = write_ceremony(keys, key, shares)
    say(f"[testbed] key ceremony: threshold Paillier, 2048-bit modulus from safe primes "
        f"({tried['p'] + tried['q']} candidates, {time.monotonic() - t0:.1f} s); any {THRESHOLD} of "
        f"{len(TRUSTEES)} trustees decrypt; no private key exists anywhere")
    return key, paths


def publish_key(registrar, mqtt: MqttConfig, key: ThresholdPublicKey, *, timeout_s: float = 60.0) -> int:
    """The registrar "ops" publishes the threshold key on the registry chain; the certified height."""
    rec = {"kind": "paillier", "kid": key.kid, "key": key.to_dict(), "signer": "ops", "time": int(time.time())}
    [res] = asyncio.run(submit(mqtt, [sign_record(rec, registrar.private)], timeout_s=timeout_s))
    if res["status"] != "certified":
        raise RuntimeError(f"the registry refused the threshold key: {res}")
    return res["height"]


def write_settlement(wd: Path, key: ThresholdPublicKey, paths: dict, *, area: str, host: str, port: int,
                     policy: TestbedPolicy) -> SettlementBed:
    """BLS keys, trustee configs, coordinator.toml and the tariff, beside what
    `testbed.write_chain` and `write_registry_chain` wrote under `wd`."""
    keys = wd / "keys"
    coord_sk = new_secret_key()
    write_secret_key(keys / "coord.bls.key", coord_sk)
    mqtt = f'[mqtt]\nhost = "{host}"\nport = {port}\n'
    trustees = []
    for name in TRUSTEES:
        write_secret_key(keys / f"{name}.bls.key", new_secret_key())
        cfg = wd / "trustees" / f"{name}.toml"
        cfg.parent.mkdir(exist_ok=True)
        share = Path(paths["shares"][name]).relative_to(wd)
        cfg.write_text(f'[trustee]\nname = "{name}"\ndatabase = "{name}.db"\nshare = "../{share}"\n'
                       f'secret_key = "../keys/{name}.bls.key"\n'
                       f'coordinator_public = "{bls.SkToPk(coord_sk).hex()}"\nvalidators = "../validators.toml"\n'
                       f'chains = ["{area}"]\n\n'
                       f'[policy]\nmin_readings = {policy.min_readings}\nmin_period_s = 0\n'
                       f'min_meters = {policy.min_meters}\n\n'
                       f'{mqtt}client_id = "trustee-{name}"\n')
        trustees.append(cfg)
    coordinator = wd / "coordinator.toml"
    coordinator.write_text(
        f'[coordinator]\nname = "coord"\ndatabase = "coordinator.db"\n\n'
        f'[settlement]\nkey = "keys/coord.bls.key"\nthreshold_public = "keys/threshold.pub.json"\n'
        f'database = "settlement.db"\nbills = "bills"\ntimeout_s = 60\n'
        f'registry_signer = "ops"\nregistry_key = "keys/ops.ed25519.key"\n'
        f'min_meters = {policy.min_meters}\nloadcurves = "loadcurves"\n\n'
        f'[[area]]\nchain = "{area}"\nvalidators = "validators.toml"\npaillier_public = "keys/paillier.pub.json"\n\n'
        f'[api]\nport = 0\n\n'
        f'[registry_chain]\nvalidators = "registry-validators.toml"\ngenesis = "registry-genesis.toml"\n'
        f'database = "coordinator-registry.db"\n\n{mqtt}')
    tariff = wd / "tariff.toml"
    tariff.write_text(TARIFF)
    return SettlementBed(key, tuple(trustees), coordinator, tariff)


def _command(args: list[str], cwd: Path, timeout_s: float) -> dict:
    """`gridledger ARGS` as an operator runs it (its progress on our stderr); the JSON
    summary it prints last."""
    res = subprocess.run([sys.executable, "-m", "gridledger", *args], stdout=subprocess.PIPE, text=True,
                         timeout=timeout_s, cwd=cwd)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"gridledger {args[0]} failed ({res.returncode}): {res.stdout[-2000:]}") from None


def settle(bed: SettlementBed, *, area: str, period: Period, cwd: Path, timeout_s: float = 600) -> dict:
    """`gridledger settle` over the period; its summary."""
    return _command(["settle", "--config", str(bed.coordinator), "--area", area, "--period", period.name,
                     "--from", str(period.start), "--to", str(period.end), "--tariff", str(bed.tariff)],
                    cwd, timeout_s)


def loadcurve(bed: SettlementBed, *, area: str, period: Period, cwd: Path, timeout_s: float = 600) -> dict:
    """`gridledger loadcurve` over the period; the curve's JSON document, with its files."""
    summary = _command(["loadcurve", "--config", str(bed.coordinator), "--area", area, "--from", str(period.start),
                        "--to", str(period.end)], cwd, timeout_s)
    return dict(json.loads(Path(summary["files"]["json"]).read_text()), files=summary["files"])


def truth_slots(records: Iterable[dict]) -> list[int]:
    """Wh per slot of the simulator's truth records (`testbed.read_truth`)."""
    slots = [0] * SLOTS
    for rec in records:
        slots[slot_index(rec["band"], 0)] += rec["import_wh"]
        slots[slot_index(rec["band"], 1)] += rec["export_wh"]
    return slots


@dataclass(frozen=True, slots=True)
class BillCheck:
    account: str
    readings: int
    slots: list[int]          # the bill's decrypted Wh per slot
    truth: list[int]          # the simulator's
    total: str                # the bill's amount
    truth_total: str          # the tariff applied to the truth
    verified: str | None      # None, or why verify_bill refused it

    @property
    def ok(self) -> bool:
        return self.verified is None and self.slots == self.truth and self.total == self.truth_total


def check_bills(db: Path, *, area: str, period: Period, tariff: Path, truth: dict[str, list[int]],
                validators: ValidatorSet, registry_validators: ValidatorSet) -> list[BillCheck]:
    """Every stored bill verified from the validator keys alone and set against the
    truth of its account (`truth`: account -> Wh per slot); accounts without a bill
    come back with an empty bill, so they fail."""
    store = SettlementStore(db)
    try:
        bills = {b["account"]: b for b in store.bills(area, period.name)}
    finally:
        store.conn.close()
    tariff_obj = Tariff.from_toml(tariff)
    out = []
    for account, want in sorted(truth.items()):
        expected = str(tariff_obj.charge(want, period.days).total)
        bill = bills.get(account)
        if bill is None:
            out.append(BillCheck(account, 0, [0] * SLOTS, want, "-", expected, "no bill"))
            continue
        try:
            verify_bill(bill, validators, registry_validators)
            why = None
        except InvalidBill as exc:
            why = f"{exc.reason}: {exc.detail}"
        out.append(BillCheck(account, bill["readings"], list(bill["energy_wh"]), want, bill["charges"]["total"],
                             expected, why))
    return out
