"""Area totals: what a trustee may decrypt for a load curve (issue 7; docs/loadcurves.md).

    area  {"kind": "area", "chain", "t",
           "blocks":   [{"header", "cert"}, ...],
           "readings": [{"height", "index", "tx", "path"}, ...]}

The sum of one interval's readings over distinct meters of an area: every
reading is a wire-v1 transaction of a certified block (its Merkle path leads to
the certified `tx_root`), under the trustees' key, and ends at `t` with one
common `dt`. The trustee multiplies the ciphertexts itself; nobody sends it a
ciphertext. `check_area_item` checks all that; whether the total is allowed
(at least k meters, no differencing) is the trustee's policy, `smallest_atom`
its arithmetic.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import gmpy2

from certlog import merkle
from certlog.block import Certificate, ChainError, Header
from certlog.validators import ValidatorSet
from gridledger.errors import Rejected
from gridledger.wire import parse_reading

from .decrypt import DecryptError

__all__ = ["AreaFacts", "area_item", "check_area_item", "smallest_atom", "set_id", "MAX_AREA_READINGS"]

# One item per interval: a large area's every meter, but a bounded request.
MAX_AREA_READINGS = 10_000
_ITEM_KEYS = {"kind", "chain", "t", "blocks", "readings"}
_READING_KEYS = {"height", "index", "tx", "path"}


@dataclass(frozen=True, slots=True)
class AreaFacts:
    """What a checked area item proves: the ciphertext of the sum of these
    readings (hashes, one per meter), all ending at `t` after `dt` seconds."""
    chain: str
    t: int
    dt: int
    c: int
    meters: tuple[str, ...]
    readings: frozenset[str]     # reading hashes: the members the differencing defence counts
    heights: tuple[int, ...]

    @property
    def set_id(self) -> str:
        return set_id(self.readings)


def set_id(readings: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(readings)).encode("ascii")).hexdigest()


def area_item(chain: str, t: int, blocks: Iterable[tuple[Header, Certificate]], readings: list[dict]) -> dict:
    """An area item: `readings` as the ledger gives them ({height, index, tx, path})."""
    return {"kind": "area", "chain": chain, "t": t,
            "blocks": [{"header": h.to_dict(), "cert": c.to_dict()} for h, c in blocks], "readings": readings}


def _int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _schema(detail: str) -> DecryptError:
    return DecryptError("item_schema", detail)


def check_area_item(item: Any, validators: Mapping[str, ValidatorSet], kid: str, nsquare: int) -> AreaFacts:
    """Check every certificate, inclusion and reading of an area item; its facts, or
    `DecryptError`. Certificates are checked with the validator set's memory of those
    it verified already (one request may carry a block in many items)."""
    if not isinstance(item, dict) or item.get("kind") != "area" or set(item) != _ITEM_KEYS:
        raise _schema("an area item is {kind, chain, t, blocks, readings}")
    chain, t, blocks, readings = item["chain"], item["t"], item["blocks"], item["readings"]
    if not isinstance(chain, str) or chain not in validators:
        raise DecryptError("unknown_chain", repr(chain)[:40])
    if not _int(t):
        raise _schema("t is Unix seconds")
    if not isinstance(blocks, list) or not isinstance(readings, list) or not blocks or not readings:
        raise _schema("blocks and readings are non-empty lists")
    if len(readings) > MAX_AREA_READINGS or len(blocks) > len(readings):
        raise _schema(f"at most {MAX_AREA_READINGS} readings, and no more blocks than readings")
    for r in readings:
        if not isinstance(r, dict) or set(r) != _READING_KEYS or not _int(r["height"]) or not _int(r["index"]) \
                or not isinstance(r["tx"], str) or not isinstance(r["path"], list):
            raise _schema("a reading is {height, index, tx, path}")
    headers = _certified_headers(blocks, validators[chain], chain, kid)
    if {r["height"] for r in readings} != set(headers):
        raise _schema("blocks are exactly the blocks of the readings")

    nsq = gmpy2.mpz(nsquare)
    c, dt, meters, hashes = gmpy2.mpz(1), None, {}, set()
    for r in readings:
        h = headers[r["height"]]
        try:
            tx = r["tx"].encode("ascii")
        except UnicodeEncodeError:
            raise DecryptError("bad_inclusion", f"tx {r['index']} of block {h.height} is not ASCII") from None
        if not merkle.verify_path(h.tx_root, tx, r["index"], h.txs, r["path"]):
            raise DecryptError("bad_inclusion", f"tx {r['index']} is not in block {h.height}")
        try:
            reading = parse_reading(tx)
        except Rejected as exc:
            raise DecryptError("not_a_reading", f"tx {r['index']} of block {h.height}: {exc.reason}") from None
        if reading.kid != kid:
            raise DecryptError("wrong_key", f"{reading.meter}'s reading is under key {reading.kid}, not {kid}")
        if reading.t != t or reading.dt != (dt if dt is not None else reading.dt):
            raise DecryptError("mixed_intervals", f"{reading.meter}'s reading ends at {reading.t} after "
                                                  f"{reading.dt} s, not at {t} after {dt} s")
        dt = reading.dt
        if reading.meter in meters:
            raise DecryptError("duplicate_meter", f"{reading.meter} appears twice")
        ct = reading.ciphertext
        if ct >= nsquare:
            raise DecryptError("bad_ciphertext", f"{reading.meter}'s ciphertext is not below n^2")
        meters[reading.meter] = h.height
        hashes.add(reading.hash)
        c = c * ct % nsq
    return AreaFacts(chain, t, dt, int(c), tuple(sorted(meters)), frozenset(hashes), tuple(sorted(headers)))


def _certified_headers(blocks: list, vset: ValidatorSet, chain: str, kid: str) -> dict[int, Header]:
    headers: dict[int, Header] = {}
    for b in blocks:
        if not isinstance(b, dict) or set(b) != {"header", "cert"}:
            raise _schema("a block is {header, cert}")
        try:
            header, cert = Header.from_dict(b["header"]), Certificate.from_dict(b["cert"])
            if header.chain != chain:
                raise ChainError("wrong_chain", f"{header.chain!r} is not {chain!r}")
            if header.height in headers:
                raise _schema(f"block {header.height} is listed twice")
            vset.check_certificate(cert, header, remember=True)
        except ChainError as exc:
            raise DecryptError(exc.reason, exc.detail) from None
        if header.app.get("kid") != kid:
            raise DecryptError("wrong_key", f"block {header.height} is under key {header.app.get('kid')}, not {kid}")
        headers[header.height] = header
    return headers


def smallest_atom(sets: Iterable[frozenset[str]]) -> int:
    """The fewest members in any atom of the family: members grouped by exactly
    which sets hold them. Every sum derivable from the sets' sums is constant on
    atoms (docs/loadcurves.md), so no derivable sum is over fewer members."""
    member_of: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for x in s:
            member_of[x].append(i)
    sizes = Counter(tuple(v) for v in member_of.values())
    return min(sizes.values(), default=1 << 62)
