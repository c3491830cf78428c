"""Settlement: `gridledger settle --config coordinator.toml --period 2026-10 --tariff FILE`.

For each account of an area, over [T0, T1):

1. the account's certified states at the period's ends (`AreaLedger.boundary`:
   the last certified state holding only readings that ended before T0, resp.
   T1), each with its MPT proof and certificate;
2. the ciphertext of the period, E(total at T1) / E(total at T0) mod n^2
   (O(1) homomorphic work, whatever the number of readings);
3. threshold decryption by t trustees, each checking policy first
   (`coordinator.trustee`), their partials checked and combined here;
4. unpacking into Wh per band and direction, the tariff, the bill.

Bills carry every proof (`verify_bill` needs only the validator keys). They are
stored in SQLite as they are made, in the transaction that marks the account
done, so a run that crashes resumes where it stopped and never bills twice;
they are exported as JSON, HTML and one CSV per period, and the run is recorded
on the registry chain (the Merkle root of its bill ids).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Mapping, Sequence

import aiomqtt
import rlp

from certlog import merkle
from certlog.block import canonical
from certlog.light import check_state_proof
from certlog.validators import ValidatorSet
from gridledger.errors import GridledgerError, Rejected
from gridledger.mqtt import auth_options
from gridledger.wire import unpack_slots

from .billrender import bills_csv, write_bill_files
from .decrypt import DecryptError, bill_item, check_bill_item
from .registryapp import paillier_key_id
from .combine import TrusteeClient
from .tariff import Charges, Tariff
from .threshold import PartialBatch, ThresholdPublicKey

__all__ = ["covers", "Period", "SettlementStore", "InvalidBill", "make_bill", "bill_id", "verify_bill",
           "ITEMS_PER_REQUEST", "SettlementSettings", "CoordinatorRun", "open_run", "Progress"]

ITEMS_PER_REQUEST = 32   # one batched proof per trustee per request; a bill carries its batch's ciphertexts
PERIOD_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])\Z")


class InvalidBill(Rejected):
    """A bill that does not verify; `reason` names the first check that failed."""


@dataclass(frozen=True, slots=True)
class Period:
    name: str
    start: int   # unix seconds: the period holds the readings whose interval ends in (start, end]
    end: int

    @classmethod
    def month(cls, name: str) -> "Period":
        if not PERIOD_RE.match(name):
            raise GridledgerError(f"period {name!r} must be YYYY-MM")
        y, m = int(name[:4]), int(name[5:])
        start = calendar.timegm((y, m, 1, 0, 0, 0))
        y2, m2 = (y + 1, 1) if m == 12 else (y, m + 1)
        return cls(name, start, calendar.timegm((y2, m2, 1, 0, 0, 0)))

    @property
    def days(self) -> int:
        return -(-(self.end - self.start) // 86_400)

    def to_dict(self) -> dict:
        return {"name": self.name, "from": self.start, "to": self.end}


def bill_id(bill: Mapping) -> str:
    return hashlib.sha256(canonical({k: v for k, v in bill.items() if k != "bill_id"})).hexdigest()


def covers(facts) -> dict:
    """Exactly which readings a bill holds: seq (from, to] of the account's hash chain,
    whose intervals end in (after_t, through_t]."""
    return {"after_seq": facts.start.seq, "to_seq": facts.end.seq, "after_t": facts.start.last_t,
            "through_t": facts.end.last_t, "meter": facts.end.meter}


def make_bill(*, chain: str, account: str, period: Period, start: dict | None, end: dict, slots: Sequence[int],
              readings: int, tariff: Tariff, covered: dict, key_proof: dict, registry_chain: str, cs: Sequence[int],
              position: int, batches: Sequence[PartialBatch]) -> dict:
    charges = tariff.charge(list(slots), period.days)
    bill = {"v": 1, "account": account, "chain": chain, "period": period.to_dict(), "readings": readings,
            "covers": covered,
            "energy_wh": list(slots), "tariff": tariff.to_dict(), "tariff_sha256": tariff.sha256,
            "charges": charges.to_dict(),
            "proofs": {"from": start, "to": end,
                       "key": {"chain": registry_chain, "state": key_proof},
                       "decryption": {"ciphertexts": [format(c, "x") for c in cs], "position": position,
                                      "partials": [b.to_dict() for b in batches]}}}
    bill["bill_id"] = bill_id(bill)
    return bill


def verify_bill(bill: object, validators: ValidatorSet, registry_validators: ValidatorSet | None = None) -> dict:
    """Check everything a bill claims, from the validator keys alone; its summary or `InvalidBill`.

    The area states and the threshold key (published on the registry chain) must
    be certified; the ciphertext is recomputed from the two proven totals; every
    partial decryption's proof is checked and t of them combined; the plaintext
    must unpack to the bill's energy, and the tariff must give its charges."""
    registry_validators = registry_validators or validators
    try:
        chain, account, proofs = bill["chain"], bill["account"], bill["proofs"]
        dec, key_part = proofs["decryption"], proofs["key"]
        if bill.get("v") != 1 or bill_id(bill) != bill["bill_id"]:
            raise InvalidBill("bill_id", "the bill's content does not hash to its id")
        # 1. The trustees' key, as published on the certified registry chain.
        kid = proofs["to"]["header"]["app"]["kid"]
        _, leaf = check_state_proof(key_part["state"], registry_validators, key_part["chain"], paillier_key_id(kid))
        if not leaf:
            raise InvalidBill("key_not_published", f"threshold key {kid} is not in the certified registry state")
        key = ThresholdPublicKey.from_dict(json.loads(rlp.decode(leaf)[0]))
        # 2. The period's ciphertext from the two certified account states.
        facts = check_bill_item(bill_item(chain, account, proofs["from"], proofs["to"]), {chain: validators},
                                key.kid, key.nsquare)
        period = Period(bill["period"]["name"], bill["period"]["from"], bill["period"]["to"])
        if facts.end.last_t > period.end or (facts.start.count and facts.start.last_t > period.start):
            raise InvalidBill("period_mismatch", "the states do not bound the period")
        if facts.readings != bill["readings"] or covers(facts) != bill["covers"]:
            raise InvalidBill("readings_mismatch", f"proofs give {facts.readings}, bill says {bill['readings']}")
        # 3. The decryption: every partial's proof, then t of them combined.
        cs = [int(c, 16) for c in dec["ciphertexts"]]
        pos = dec["position"]
        if type(pos) is not int or not 0 <= pos < len(cs) or cs[pos] != facts.c:
            raise InvalidBill("ciphertext_mismatch", "the decrypted ciphertext is not the period's")
        batches = [PartialBatch.from_dict(b) for b in dec["partials"]]
        if len({b.index for b in batches}) < key.threshold:
            raise InvalidBill("too_few_partials", f"{len(batches)} of {key.threshold}")
        for b in batches:
            if not key.verify(cs, b):
                raise InvalidBill("bad_partial", f"trustee {b.index}'s partial decryption does not verify")
        slots = unpack_slots(key.combine(cs, batches).plaintexts[pos])
        if list(slots) != bill["energy_wh"]:
            raise InvalidBill("energy_mismatch", "the decrypted energy differs from the bill's")
        # 4. The money.
        tariff = Tariff.from_dict(bill["tariff"])
        if tariff.sha256 != bill["tariff_sha256"]:
            raise InvalidBill("tariff_mismatch", "tariff does not hash to tariff_sha256")
        if tariff.charge(list(slots), period.days).to_dict() != bill["charges"]:
            raise InvalidBill("charges_mismatch", "the tariff gives different charges")
    except InvalidBill:
        raise
    except DecryptError as exc:
        raise InvalidBill(exc.reason, exc.detail) from None
    except Exception as exc:  # any other malformation: typed, with its cause
        reason = getattr(exc, "reason", None) or "bill_schema"
        raise InvalidBill(reason, f"{type(exc).__name__}: {exc}") from None
    return {"bill_id": bill["bill_id"], "account": account, "period": period.name, "readings": facts.readings,
            "total": Charges.from_dict(bill["charges"]).total, "currency": tariff.currency,
            "from_height": facts.from_height, "to_height": facts.to_height}


# -- the run's durable state ------------------------------------------------------------------

class SettlementStore:
    def __init__(self, path: Path):
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS bills (
                chain TEXT NOT NULL, period TEXT NOT NULL, account TEXT NOT NULL,
                bill_id TEXT NOT NULL, bill TEXT NOT NULL, PRIMARY KEY (chain, period, account));
            CREATE TABLE IF NOT EXISTS unbilled (
                chain TEXT NOT NULL, period TEXT NOT NULL, account TEXT NOT NULL, reason TEXT NOT NULL,
                PRIMARY KEY (chain, period, account));
            CREATE TABLE IF NOT EXISTS runs (
                chain TEXT NOT NULL, period TEXT NOT NULL, tariff TEXT NOT NULL, root TEXT, bills INTEGER,
                recorded TEXT, PRIMARY KEY (chain, period));
        """)

    def done(self, chain: str, period: str) -> set[str]:
        return {r[0] for r in self.conn.execute(
            "SELECT account FROM bills WHERE chain = ? AND period = ? UNION "
            "SELECT account FROM unbilled WHERE chain = ? AND period = ?", (chain, period, chain, period))}

    def save(self, chain: str, period: str, bills: Sequence[dict], unbilled: Mapping[str, str]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR IGNORE INTO bills VALUES (?, ?, ?, ?, ?)",
                                  [(chain, period, b["account"], b["bill_id"], json.dumps(b)) for b in bills])
            self.conn.executemany("INSERT OR IGNORE INTO unbilled VALUES (?, ?, ?, ?)",
                                  [(chain, period, a, r) for a, r in unbilled.items()])

    def bills(self, chain: str, period: str) -> list[dict]:
        return [json.loads(r[0]) for r in self.conn.execute(
            "SELECT bill FROM bills WHERE chain = ? AND period = ? ORDER BY account", (chain, period))]

    def unbilled(self, chain: str, period: str) -> dict[str, str]:
        return dict(self.conn.execute("SELECT account, reason FROM unbilled WHERE chain = ? AND period = ?",
                                      (chain, period)).fetchall())

    def begin_run(self, chain: str, period: str, tariff: str) -> None:
        row = self.conn.execute("SELECT tariff FROM runs WHERE chain = ? AND period = ?", (chain, period)).fetchone()
        if row is not None and row[0] != tariff:
            raise GridledgerError(f"{chain}/{period} was started with another tariff ({row[0][:12]}…); "
                                  "a period is settled under one tariff")
        self.conn.execute("INSERT OR IGNORE INTO runs(chain, period, tariff) VALUES (?, ?, ?)", (chain, period, tariff))

    def finish_run(self, chain: str, period: str, root: str, count: int, recorded: str | None) -> None:
        self.conn.execute("UPDATE runs SET root = ?, bills = ?, recorded = ? WHERE chain = ? AND period = ?",
                          (root, count, recorded, chain, period))


def bills_root(bills: Sequence[dict]) -> str:
    """Merkle root (RFC 6962) of the bill ids in account order: what goes on chain."""
    return merkle.root([bytes.fromhex(b["bill_id"]) for b in sorted(bills, key=lambda b: b["account"])])


def export(bills: Sequence[dict], out: Path, chain: str, period: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for b in bills:
        write_bill_files(b, out)
    csv_path = out / f"bills-{chain}-{period}.csv"
    csv_path.write_text(bills_csv(list(bills)))
    return csv_path


class Progress:
    """A one-line progress bar on stderr (a terminal), or a line per tenth of the work (a log)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream, self.done = total, label, stream, 0
        self.tty = stream.isatty()
        self._tenth = -1

    def add(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // max(self.total, 1)
        if not self.tty and tenth == self._tenth and self.done < self.total:
            return
        self._tenth = tenth
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()



# -- one run ------------------------------------------------------------------------------------

@dataclass(slots=True)
class RunResult:
    chain: str
    period: str
    bills: list[dict]
    unbilled: dict[str, str]
    root: str
    csv: Path | None


async def settle_chain(*, client: aiomqtt.Client, trustees: TrusteeClient, ledger, validators: ValidatorSet,
                       chain: str,
                       accounts: Sequence[str], period: Period, tariff: Tariff, key_proof: dict,
                       registry_chain: str, store: SettlementStore, out: Path | None,
                       progress: Progress | None = None) -> RunResult:
    """Bill every account of `chain` not billed yet for `period` (resumable)."""
    store.begin_run(chain, period.name, tariff.sha256)
    done = store.done(chain, period.name)
    todo = [a for a in sorted(set(accounts)) if a not in done]
    key = trustees.key
    if progress:
        progress.add(len(done))
    for i in range(0, len(todo), ITEMS_PER_REQUEST):
        chunk = todo[i:i + ITEMS_PER_REQUEST]
        items, facts, unbilled = [], [], {}
        for account in chunk:
            h1 = ledger.boundary(account, period.end + 1)  # readings ending at or before the period's end
            if h1 == 0:
                unbilled[account] = "no_readings"
                continue
            h0 = ledger.boundary(account, period.start + 1)
            if h0 == h1:
                unbilled[account] = "no_readings_in_period"
                continue
            item = bill_item(chain, account, ledger.state_proof(account, h0) if h0 else None,
                             ledger.state_proof(account, h1))
            try:  # the same checks the trustees and the customer make
                f = check_bill_item(item, {chain: validators}, key.kid, key.nsquare)
            except DecryptError as exc:
                unbilled[account] = exc.reason
                continue
            items.append(item)
            facts.append(f)
        bills = []
        if items:
            dec = await trustees.decrypt(client, items, [f.c for f in facts], nonce=f"{chain}/{period.name}/{i}")
            for j, (item, f) in enumerate(zip(items, facts)):
                if j in dec.refused:
                    unbilled[f.account] = "refused: " + ", ".join(sorted(set(dec.refused[j].values())))
                    continue
                cs, batches = dec.batches[j]
                bills.append(make_bill(chain=chain, account=f.account, period=period, start=item["from"],
                                       end=item["to"], slots=unpack_slots(dec.plaintexts[j]), readings=f.readings,
                                       covered=covers(f),
                                       tariff=tariff, key_proof=key_proof, registry_chain=registry_chain, cs=cs,
                                       position=dec.positions[j], batches=batches))
        store.save(chain, period.name, bills, unbilled)
        if progress:
            progress.add(len(chunk))
    bills = store.bills(chain, period.name)
    csv = export(bills, out, chain, period.name) if out is not None else None
    return RunResult(chain, period.name, bills, store.unbilled(chain, period.name), bills_root(bills), csv)


# -- the command -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class SettlementSettings:
    """`[settlement]` of the coordinator's TOML (beside `coordinator.role`'s tables,
    whose name, area replicas and index it uses)."""
    key: Path                       # BLS secret key that signs trustee requests
    threshold_public: Path          # threshold.pub.json from the ceremony
    database: Path                  # bills and runs (resumable), and the account index
    bills: Path                     # export folder
    timeout_s: float = 60.0
    registry_signer: str = ""       # node id that records runs on the registry chain ("" = do not record)
    registry_key: Path | None = None
    min_meters: int = 10            # load curves: intervals over fewer meters are not even asked for
    loadcurves: Path | None = None  # load-curve export folder; default "loadcurves" beside the bills


@dataclass(slots=True)
class CoordinatorRun:
    """What a settlement or load-curve run of one area works with: the coordinator's
    config and `[settlement]`, the trustees' key, the run database, the registry
    replica, the area's ledger (caught up), and a client for the trustees."""
    cfg: object                     # coordinator.role.CoordinatorConfig
    settings: SettlementSettings
    key: ThresholdPublicKey
    store: SettlementStore
    registry: object                # certlog.store.ChainStore of the registry chain (read only)
    history: object                 # coordinator.registryapp.RegistryHistory
    ledger: object                  # coordinator.ledger.AreaLedger
    validators: ValidatorSet
    trustees: TrusteeClient

    def mqtt_client(self, purpose: str) -> aiomqtt.Client:
        mqtt = self.cfg.mqtt
        return aiomqtt.Client(mqtt.host, mqtt.port, identifier=f"{purpose}-{self.cfg.coordinator.name}",
                              **auth_options(mqtt))


def open_run(config: Path, area: str) -> CoordinatorRun:
    from certlog.store import ChainStore
    from certlog.validators import load_validator_set, read_secret_key
    from gridledger.config import read_toml, section
    from .role import load_coordinator_config, open_ledger
    from .registryapp import RegistryHistory
    from .threshold import load_threshold_public

    cfg = load_coordinator_config(config)
    s = section(SettlementSettings, read_toml(config), "settlement", config.parent,
                ("key", "threshold_public", "database", "bills", "registry_key", "loadcurves"))
    if type(s.min_meters) is not int or s.min_meters < 2:
        raise GridledgerError("[settlement] min_meters must be an integer >= 2")
    src = cfg.area(area)
    key = load_threshold_public(s.threshold_public)
    store = SettlementStore(s.database)
    reg_store = ChainStore(sqlite3.connect(f"file:{cfg.registry_chain.database}?mode=ro", uri=True,
                                           check_same_thread=False, timeout=10))
    history = RegistryHistory.from_store(reg_store, cfg.registry_chain.chain)
    ledger = open_ledger(cfg, area, registry=history)  # the coordinator role's replica and index
    ledger.catch_up()
    trustees = TrusteeClient(key, cfg.coordinator.name, read_secret_key(s.key), timeout_s=s.timeout_s)
    return CoordinatorRun(cfg, s, key, store, reg_store, history, ledger, load_validator_set(src.validators),
                          trustees)


def run_settlement(config: Path, *, area: str, period: Period, tariff: Path, out: Path | None,
                   log_level: str = "warning") -> dict:
    import asyncio

    from certlog.light import state_proof
    from gridledger.logs import setup_logging
    from .registry import submit
    from .registryapp import sign_record

    setup_logging("settle", log_level)
    tariff_obj = Tariff.from_toml(tariff)
    run = open_run(config, area)
    cfg, s, key, store, ledger = run.cfg, run.settings, run.key, run.store, run.ledger
    reg_settings, mqtt = cfg.registry_chain, cfg.mqtt
    accounts = run.history.accounts(area)
    reg_head = run.registry.head()
    if reg_head is None:
        raise GridledgerError("the registry replica holds no certified block yet")
    key_proof = state_proof(run.registry.nodes, reg_head[0], reg_head[1], paillier_key_id(key.kid))
    if key_proof["leaf"] is None:
        raise GridledgerError(f"threshold key {key.kid} is not published on the registry chain "
                              "(gridledger registry publish-key)")
    head = ledger.store.head()
    if head is None or head[0].time // 1000 <= period.end:
        raise GridledgerError(f"{area}/{period.name} is still open: no block certified after its end yet")
    out_dir = out or s.bills

    async def go() -> RunResult:
        async with run.mqtt_client(f"settle-{period.name}") as client:
            return await settle_chain(client=client, trustees=run.trustees, ledger=ledger,
                                      validators=run.validators, chain=area, accounts=accounts,
                                      period=period, tariff=tariff_obj, key_proof=key_proof,
                                      registry_chain=reg_settings.chain, store=store, out=out_dir,
                                      progress=Progress(len(accounts), f"settling {area} {period.name}"))

    result = asyncio.run(go())
    recorded = None
    if s.registry_signer and s.registry_key is not None:
        from gridledger.meterkeys import MeterKey
        signer = MeterKey.read_seed(s.registry_signer, s.registry_key)
        rec = {"kind": "settlement", "chain": area, "period": period.name, "tariff": tariff_obj.sha256,
               "bills": len(result.bills), "root": result.root, "signer": s.registry_signer,
               "time": int(time.time())}
        [res] = asyncio.run(submit(mqtt, [sign_record(rec, signer.private)], chain=reg_settings.chain))
        recorded = (f"height {res['height']}" if res["status"] == "certified" else
                    "already recorded" if res.get("reason") == "tx_duplicate_settlement" else None)
        if recorded is None:
            raise GridledgerError(f"the registry refused the settlement record: {res}")
    store.finish_run(area, period.name, result.root, len(result.bills), recorded)
    return {"area": area, "period": period.to_dict(), "bills": len(result.bills),
            "unbilled": result.unbilled, "root": result.root, "recorded": recorded,
            "csv": str(result.csv) if result.csv else None,
            "total": str(sum(Decimal(b["charges"]["total"]) for b in result.bills)),
            "currency": tariff_obj.currency}
