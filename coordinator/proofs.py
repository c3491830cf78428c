"""Checking the coordinator's answers: nothing in them is trusted but the validator set.

A header is accepted when it carries a certificate that verifies, or when the
accepted header just above it names it as `prev`: validators sign a header only
on top of the block they hold certified, so one certificate vouches for every
header below it, and a client hashes a header (~30 us) instead of checking a
second certificate (~1.5 ms). Every certificate an answer carries is checked;
`require_certificates=True` refuses links and wants one on every header.

A transaction is believed with a Merkle path to an accepted header's tx root, an
account's state with an MPT proof against its state root. An interval answer
is complete when its readings, split by its anchors (certified states of the
account), pass `_check_run` between each pair of anchors: see docs/queries.md
for why an omitted, inserted, reordered or altered reading cannot pass. Every
refusal is a `ChainError` with a stable reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import rlp

from aggregator.areaapp import AccountState, account_key
from certlog import merkle
from certlog.block import Certificate, ChainError, Header
from certlog.light import proven_value
from certlog.validators import ValidatorSet
from gridledger.errors import Rejected
from gridledger.wire import ZERO_HASH, Reading, parse_reading

__all__ = ["ExactAnswer", "IntervalPage", "accept_headers", "verify_state_proof", "verify_exact",
           "verify_interval", "verify_interval_page"]


@dataclass(frozen=True, slots=True)
class ExactAnswer:
    height: int                  # the certified height the state is proven at
    state: AccountState | None   # None: no such account as of that height
    reading: Reading | None      # the reading whose hash the state holds


@dataclass(frozen=True, slots=True)
class IntervalPage:
    readings: list[Reading]  # every reading with from <= t <= to, in account order
    to: int                  # covered up to here (the asked `to` unless the page was cut)
    next: int | None         # where the next page starts
    height: int              # the last anchor's height
    final: bool              # True: a reading after `to` is certified, so no later block adds one


def _schema(detail: str) -> ChainError:
    return ChainError("answer_schema", detail)


def _field(obj: Any, key: str, kind: type | tuple) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _schema(f"missing {key}")
    v = obj[key]
    if kind is int and type(v) is not int or not isinstance(v, kind):
        raise _schema(f"{key} has the wrong type")
    return v


def accept_headers(entries: Any, validators: ValidatorSet, chain: str, *,
                   require_certificates: bool = False) -> dict[int, Header]:
    """Headers of an answer by height, each certified or linked (module doc)."""
    if not isinstance(entries, list):
        raise _schema("headers must be a list")
    parsed: dict[int, tuple[Header, Certificate | None]] = {}
    for e in entries:
        header = Header.from_dict(_field(e, "header", dict))
        cert = e.get("cert")
        cert = None if cert is None else Certificate.from_dict(cert)
        if header.chain != chain:
            raise ChainError("wrong_chain", f"{header.chain!r} is not {chain!r}", height=header.height)
        if header.height in parsed:
            raise _schema(f"two headers at height {header.height}")
        parsed[header.height] = (header, cert)
    accepted: dict[int, Header] = {}
    for h in sorted(parsed, reverse=True):
        header, cert = parsed[h]
        if cert is not None:
            validators.check_certificate(cert, header)
        elif require_certificates:
            raise ChainError("uncertified_header", f"header {h} carries no certificate", height=h)
        elif h + 1 not in accepted or accepted[h + 1].prev != header.hash:
            raise ChainError("unlinked_header", f"header {h} has no certificate and the header above does not "
                             "name it", height=h)
        accepted[h] = header
    return accepted


def _header(accepted: dict[int, Header], height: Any) -> Header:
    if type(height) is not int or height not in accepted:
        raise ChainError("unknown_header", f"no accepted header at height {height}")
    return accepted[height]


def _state(anchor: Any, header: Header, account: str) -> AccountState | None:
    """The account's leaf under `header`'s state root, from the anchor's MPT proof."""
    _field(anchor, "proof", list)
    value = proven_value(header.state_root, account_key(account), anchor, height=header.height)
    try:
        return AccountState.decode(value) if value else None
    except (rlp.exceptions.RLPException, ValueError, TypeError, AttributeError) as exc:
        raise ChainError("bad_state_proof", type(exc).__name__, height=header.height) from None


def _reading(item: Any, accepted: dict[int, Header]) -> tuple[int, int, Reading]:
    """(height, index, reading) of an answer's transaction, proven in its block."""
    header = _header(accepted, _field(item, "height", int))
    index, tx, path = _field(item, "index", int), _field(item, "tx", str), _field(item, "path", list)
    data = tx.encode("utf-8", "replace")
    if not merkle.verify_path(header.tx_root, data, index, header.txs, path):
        raise ChainError("bad_merkle_path", f"tx {index} is not in block {header.height}", height=header.height)
    try:
        r = parse_reading(data)
    except Rejected as exc:
        raise ChainError("bad_reading", exc.reason, height=header.height) from None
    if r.to_json() != data:
        raise ChainError("bad_reading", "not a reading's canonical JSON", height=header.height)
    return header.height, index, r


def _account(resp: Any, account: str | None) -> str:
    got = _field(resp, "account", str)
    if account is not None and got != account:
        raise ChainError("wrong_account", f"an answer about {got!r}, not {account!r}")
    return got


def verify_state_proof(obj: Any, validators: ValidatorSet, chain: str, *,
                       account: str | None = None) -> AccountState | None:
    """The account's certified state at obj's height (None: absent) from a
    `AreaLedger.state_proof` answer. Pass `account` (else the answer's own
    account field is what was proven: compare it)."""
    account = _account(obj, account)
    header = Header.from_dict(_field(obj, "header", dict))
    if header.chain != chain:
        raise ChainError("wrong_chain", f"{header.chain!r} is not {chain!r}", height=header.height)
    if _field(obj, "height", int) != header.height:
        raise ChainError("wrong_height", f"answer for {obj['height']}, header of {header.height}")
    validators.check_certificate(Certificate.from_dict(_field(obj, "cert", dict)), header)
    return _state(obj, header, account)


def verify_exact(resp: Any, validators: ValidatorSet, chain: str, *, account: str | None = None,
                 min_height: int = 0, require_certificates: bool = False) -> ExactAnswer:
    """The account's latest state and reading from an `AreaLedger.exact` answer."""
    account = _account(resp, account)
    accepted = accept_headers(_field(resp, "headers", list), validators, chain,
                              require_certificates=require_certificates)
    anchor = _field(resp, "state", dict)
    height = _field(anchor, "height", int)
    state = _state(anchor, _header(accepted, height), account)
    item = resp.get("reading")
    reading = None
    if state is None:
        if item is not None:
            raise _schema("a reading for an account that has no state")
    else:
        reading = _reading(item, accepted)[2]
        if (reading.meter, reading.seq, reading.hash, reading.t) != (state.meter, state.seq, state.hash, state.last_t):
            raise ChainError("anchor_mismatch", "the reading is not the one the state holds", height=height)
    if height < min_height:
        raise ChainError("stale_answer", f"state at height {height}, {min_height} wanted", height=height)
    return ExactAnswer(height, state, reading)


def verify_interval_page(resp: Any, validators: ValidatorSet, chain: str, account: str, t1: int, t2: int, *,
                         min_height: int = 0, require_certificates: bool = False) -> IntervalPage:
    """The readings of `account` with t1 <= t <= page.to, proven complete, from one
    `AreaLedger.interval` answer (a page ends before t2 when `next` is set)."""
    _account(resp, account)
    covered, nxt = _field(resp, "to", int), resp.get("next")
    if _field(resp, "from", int) != t1 or not t1 <= covered <= t2:
        raise ChainError("wrong_interval", f"answer for [{resp['from']}, {covered}], asked [{t1}, {t2}]")
    if (nxt is None) != (covered == t2) or (nxt is not None and nxt != covered + 1):
        raise _schema("next is to + 1 exactly when the page ends before the asked to")
    accepted = accept_headers(_field(resp, "headers", list), validators, chain,
                              require_certificates=require_certificates)
    anchors = _field(resp, "anchors", list)
    if not anchors:
        raise _schema("an interval answer has at least one anchor")
    states, heights = [], []
    for a in anchors:
        h = _field(a, "height", int)
        if heights and h <= heights[-1] or h == 0 and heights:
            raise _schema("anchor heights rise, and only the first may be 0 (before any block)")
        states.append(None if h == 0 else _state(a, _header(accepted, h), account))
        heights.append(h)
    if heights[-1] == 0:
        raise _schema("the last anchor is a certified state")
    readings = [_reading(item, accepted) for item in _field(resp, "readings", list)]
    for a, b in zip(readings, readings[1:]):
        if (a[0], a[1]) >= (b[0], b[1]):
            raise ChainError("reading_order", f"block {b[0]} tx {b[1]} after block {a[0]} tx {a[1]}", height=b[0])
    if states[0] is not None and states[0].last_t >= t1:
        raise ChainError("incomplete_start", f"the first anchor already holds a reading at {states[0].last_t} >= "
                         f"{t1}", height=heights[0])
    if readings and not heights[0] < readings[0][0] <= readings[-1][0] <= heights[-1]:
        raise ChainError("unanchored_reading", "a reading outside the anchors' heights", height=readings[0][0])
    i = 0
    for k in range(1, len(anchors)):
        j = i
        while j < len(readings) and readings[j][0] <= heights[k]:
            j += 1
        _check_run(states[k - 1], states[k], [r for _, _, r in readings[i:j]], heights[k])
        i = j
    top = states[-1]
    final = top is not None and top.last_t > covered
    if not final and heights[-1] < min_height:
        raise ChainError("stale_answer", f"complete as of height {heights[-1]}, {min_height} wanted",
                         height=heights[-1])
    out = [r for _, _, r in readings if t1 <= r.t <= covered]
    if nxt is not None and not out:
        raise _schema("a page that ends early holds at least one reading")
    return IntervalPage(out, covered, nxt, heights[-1], final)


def verify_interval(resp: Any, validators: ValidatorSet, chain: str, account: str, t1: int, t2: int, *,
                    min_height: int = 0, require_certificates: bool = False) -> list[Reading]:
    """Every reading of `account` with t1 <= t <= t2, proven complete, from one
    whole answer; a page (`next` set) is refused as `partial_answer`."""
    page = verify_interval_page(resp, validators, chain, account, t1, t2, min_height=min_height,
                                require_certificates=require_certificates)
    if page.next is not None:
        raise ChainError("partial_answer", f"covers [{t1}, {page.to}] of [{t1}, {t2}]; fetch from {page.next}")
    return page.readings


def _check_run(a: AccountState | None, b: AccountState | None, run: list[Reading], height: int) -> None:
    """The readings between two certified states of the account are all of them.

    Each reading continues the one before (same meter, seq + 1, prev = its hash)
    or starts a fresh meter chain (seq 1, zero prev: a replacement meter). The
    last must be the one `b` holds and their number `b.count - a.count`. With at
    most one fresh start (not counting the account's first reading), that pins
    the run: the part after the start is the hash chain back from `b`'s hash,
    the part before it continues `a`'s hash, and the count leaves no room.
    From the account's start (`a` None) nothing pins a first part, so the
    account's first reading must be the only fresh one.
    """
    prev: AccountState | Reading | None = a
    starts = 0
    for k, r in enumerate(run):
        if prev is not None and (r.meter, r.seq, r.prev) == (prev.meter, prev.seq + 1, prev.hash):
            pass
        elif r.seq == 1 and r.prev == ZERO_HASH:
            starts += 0 if k == 0 and a is None else 1
        else:
            raise ChainError("broken_chain", f"{r.meter} seq {r.seq} does not follow the reading before it",
                             height=height)
        prev = r
    if starts > (0 if a is None else 1):
        raise ChainError("unpinned_segment", f"{starts} fresh meter chains between two anchors", height=height)
    end = None if prev is None else (prev.meter, prev.seq, prev.hash, prev.last_t if prev is a else prev.t)
    if end != (None if b is None else (b.meter, b.seq, b.hash, b.last_t)):
        raise ChainError("anchor_mismatch", "the last reading is not the one the anchor's state holds",
                         height=height)
    if len(run) != (b.count if b else 0) - (a.count if a else 0):
        raise ChainError("count_mismatch", f"{len(run)} readings for a count going from {a.count if a else 0} to "
                         f"{b.count if b else 0}", height=height)
