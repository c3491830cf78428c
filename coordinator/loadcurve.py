"""Area load curves: `gridledger loadcurve --config coordinator.toml --area A --from T1 --to T2`.

For every interval end t in (T1, T2], the area's certified readings ending at
t (one per meter, one `dt`) become an area item (`areatotal`); intervals over
at least `[settlement] min_meters` meters are decrypted by the trustees, who
check every certificate and inclusion, count the meters and refuse any meter
set that would difference against one they decrypted before. Intervals over
fewer meters, or not yet behind a certified block, are withheld: never asked.

Points are stored in the settlement database as they are decrypted (or
refused), so a run resumes where it stopped and never asks twice; withheld
intervals are looked at again by the next run. Exports: JSON, CSV and an SVG
plot (`curverender`). docs/loadcurves.md.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiomqtt

from certlog.validators import ValidatorSet
from gridledger.errors import GridledgerError
from gridledger.wire import BANDS, parse_reading, unpack_slots

from .areatotal import area_item, check_area_item
from .combine import TrusteeClient
from .curverender import write_curve_files
from .decrypt import DecryptError, MAX_ITEMS
from .settle import Progress

__all__ = ["CurveStore", "Interval", "intervals", "curve_chain", "run_loadcurve", "parse_when", "curve_document",
           "ITEMS_PER_REQUEST"]

# A request is one batched proof per trustee; an area item carries every reading
# of its interval (~1.4 KB each with a 2048-bit key), so requests are bounded by
# readings as well as items: 4096 readings are ~6 MB of MQTT payload.
ITEMS_PER_REQUEST = 32
READINGS_PER_REQUEST = 4096
_DIGITS = re.compile(r"\d{1,12}\Z")


def parse_when(text: str) -> int:
    """Unix seconds from `1767225600`, `2026-01-01` (midnight UTC) or an ISO
    datetime (`2026-01-01T06:00`, UTC unless it carries an offset)."""
    if _DIGITS.match(text):
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise GridledgerError(f"{text!r} is neither Unix seconds nor an ISO date or datetime") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())


@dataclass(frozen=True, slots=True)
class Interval:
    """One interval's readings, one per meter, all ending at `t` after `dt` seconds."""
    t: int
    dt: int
    readings: list[dict]    # the ledger's {height, index, tx, path}

    @property
    def meters(self) -> int:
        return len(self.readings)


def intervals(ledger, t: int, kid: str) -> list[Interval]:
    """The certified readings under key `kid` ending at `t`, by `dt`; a meter's
    first reading only (a meter never has two for one interval on a sound chain)."""
    by_dt: dict[int, dict[str, dict]] = defaultdict(dict)
    for row in ledger.readings_ending(t):
        r = parse_reading(row["tx"].encode("ascii"))
        if r.kid == kid:
            by_dt[r.dt].setdefault(r.meter, row)
    return [Interval(t, dt, list(rows.values())) for dt, rows in sorted(by_dt.items())]


# -- the run's durable state ------------------------------------------------------------------

class CurveStore:
    """Load-curve points in the settlement database. `decrypted` and `refused` points
    are final (never asked again); `withheld` ones are replaced when looked at again."""

    FINAL = ("decrypted", "refused")

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        conn.executescript("""
            CREATE TABLE IF NOT EXISTS loadcurve_points (
                chain TEXT NOT NULL, t INTEGER NOT NULL, dt INTEGER NOT NULL, meters INTEGER NOT NULL,
                status TEXT NOT NULL, reason TEXT, energy TEXT, request TEXT, item INTEGER, trustees TEXT,
                at REAL NOT NULL, PRIMARY KEY (chain, t, dt)) WITHOUT ROWID;
        """)

    def final(self, chain: str, t1: int, t2: int) -> dict[int, set[int]]:
        """t -> the dts whose point is final, in (t1, t2]."""
        out: dict[int, set[int]] = defaultdict(set)
        for t, dt in self.conn.execute("SELECT t, dt FROM loadcurve_points WHERE chain = ? AND t > ? AND t <= ? "
                                       "AND status IN (?, ?)", (chain, t1, t2, *self.FINAL)):
            out[t].add(dt)
        return out

    def save(self, chain: str, points: list[dict]) -> None:
        """Points as `curve_document` gives them; a final point is never replaced."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for p in points:
                row = (chain, p["t"], p["dt"], p["meters"], p["status"], p.get("reason"),
                       json.dumps(p["energy_wh"]) if "energy_wh" in p else None, p.get("request"), p.get("item"),
                       json.dumps(p.get("trustees")), time.time())
                self.conn.execute("INSERT INTO loadcurve_points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                                  "ON CONFLICT (chain, t, dt) DO UPDATE SET meters = excluded.meters, "
                                  "status = excluded.status, reason = excluded.reason, energy = excluded.energy, "
                                  "request = excluded.request, item = excluded.item, trustees = excluded.trustees, "
                                  "at = excluded.at WHERE status NOT IN ('decrypted', 'refused')", row)

    def points(self, chain: str, t1: int, t2: int) -> list[dict]:
        out = []
        for t, dt, meters, status, reason, energy, request, item, trustees in self.conn.execute(
                "SELECT t, dt, meters, status, reason, energy, request, item, trustees FROM loadcurve_points "
                "WHERE chain = ? AND t > ? AND t <= ? ORDER BY t, dt", (chain, t1, t2)):
            p = {"t": t, "dt": dt, "meters": meters, "status": status}
            if status == "decrypted":
                p.update(_energy(json.loads(energy)), request=request, item=item, trustees=json.loads(trustees))
            else:
                p["reason"] = reason
            out.append(p)
        return out


def _energy(slots: list[int]) -> dict:
    return {"import_wh": sum(slots[0::2]), "export_wh": sum(slots[1::2]),
            "import_wh_by_band": slots[0::2], "export_wh_by_band": slots[1::2], "energy_wh": slots}


# -- one run ------------------------------------------------------------------------------------

async def curve_chain(*, client: aiomqtt.Client, trustees: TrusteeClient, ledger, validators: ValidatorSet,
                      chain: str, t1: int, t2: int, min_meters: int, store: CurveStore,
                      progress: Progress | None = None) -> None:
    """Decrypt every interval of (t1, t2] over at least `min_meters` meters not done yet
    (resumable); withheld intervals are stored as such."""
    key = trustees.key
    head, _ = ledger.head()
    final = store.final(chain, t1, t2)
    ends = ledger.interval_ends(t1, t2)
    if progress:
        progress.total = len(ends)
    batch: list[tuple[Interval, dict, int]] = []

    async def flush() -> None:
        if batch:
            await _decrypt(client, trustees, chain, batch, store, f"{chain}/{t1}-{t2}/{batch[0][0].t}")
            batch.clear()

    for t in ends:
        withheld = []
        for iv in intervals(ledger, t, key.kid):
            if iv.dt in final.get(t, ()):
                continue
            point = {"t": t, "dt": iv.dt, "meters": iv.meters, "status": "withheld"}
            if t * 1000 >= head.time:
                withheld.append(dict(point, reason="open"))   # no block certified after it yet
                continue
            if iv.meters < min_meters:
                withheld.append(dict(point, reason="too_few_meters"))
                continue
            blocks = [ledger.certified(h) for h in sorted({r["height"] for r in iv.readings})]
            item = area_item(chain, t, blocks, iv.readings)
            try:  # the trustees' own checks, so a bad item is withheld here, not refused there
                f = check_area_item(item, {chain: validators}, key.kid, key.nsquare)
            except DecryptError as exc:
                withheld.append(dict(point, reason=exc.reason))
                continue
            if batch and (len(batch) >= min(ITEMS_PER_REQUEST, MAX_ITEMS)
                          or sum(b[0].meters for b in batch) + iv.meters > READINGS_PER_REQUEST):
                await flush()
            batch.append((iv, item, f.c))
        store.save(chain, withheld)
        if progress:
            progress.add(1)
    await flush()


async def _decrypt(client, trustees: TrusteeClient, chain: str, batch, store: CurveStore, nonce: str) -> None:
    dec = await trustees.decrypt(client, [item for _, item, _ in batch], [c for _, _, c in batch], nonce=nonce)
    points = []
    for j, (iv, _, _) in enumerate(batch):
        point = {"t": iv.t, "dt": iv.dt, "meters": iv.meters}
        if j in dec.refused:
            reasons = sorted(set(dec.refused[j].values()))
            points.append(dict(point, status="refused", reason=", ".join(reasons)))
            continue
        _, used = dec.batches[j]
        points.append(dict(point, status="decrypted", energy_wh=unpack_slots(dec.plaintexts[j]),
                           request=dec.requests[j], item=dec.positions[j],
                           trustees=[trustees.key.name(i) for i in sorted(b.index for b in used)]))
    store.save(chain, points)


def curve_document(chain: str, t1: int, t2: int, min_meters: int, points: list[dict]) -> dict:
    """What the exports hold: the decrypted points, and the intervals refused or withheld."""
    return {"v": 1, "area": chain, "from": t1, "to": t2, "min_meters": min_meters, "bands": BANDS,
            "points": [p for p in points if p["status"] == "decrypted"],
            "refused": [p for p in points if p["status"] == "refused"],
            "withheld": [p for p in points if p["status"] == "withheld"]}


def run_loadcurve(config: Path | str, *, area: str, t1: int | str, t2: int | str, out: Path | str | None = None,
                  log_level: str = "warning", progress: bool = True) -> dict:
    """The load curve of `area` over intervals ending in (t1, t2] (Unix seconds, or
    text for `parse_when`): decrypt what is missing, write the files; the document
    (`curve_document`) with a `files` entry (kind -> path)."""
    import asyncio

    from gridledger.logs import setup_logging
    from .settle import open_run

    t1, t2 = (parse_when(t) if isinstance(t, str) else t for t in (t1, t2))
    if not 0 <= t1 < t2:
        raise GridledgerError("--from must be before --to")
    setup_logging("loadcurve", log_level)
    run = open_run(Path(config), area)
    if run.ledger.height == 0:
        raise GridledgerError(f"{area}: no certified block indexed yet (is `gridledger coordinator run` following it?)")
    store = CurveStore(run.store.conn)
    k = run.settings.min_meters
    bar = Progress(0, f"load curve {area}") if progress else None

    async def go() -> None:
        async with run.mqtt_client(f"loadcurve-{area}") as client:
            await curve_chain(client=client, trustees=run.trustees, ledger=run.ledger, validators=run.validators,
                              chain=area, t1=t1, t2=t2, min_meters=k, store=store, progress=bar)

    asyncio.run(go())
    doc = curve_document(area, t1, t2, k, store.points(area, t1, t2))
    folder = out or run.settings.loadcurves or run.settings.bills.parent / "loadcurves"
    files = write_curve_files(doc, Path(folder))
    return dict(doc, files={kind: str(p) for kind, p in files.items()})

