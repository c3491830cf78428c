"""`chain verify`: check a whole stored chain offline and report the first fault.

Nothing in the audited database is trusted: every header is decoded strictly,
every certificate checked against the validator set, every body hashed to its
tx root, and the app re-run from genesis on a fresh in-memory state, so the
state roots and app fields are recomputed, not read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .app import App
from .block import Certificate, ChainError, Header
from .replica import Replica
from .store import ChainStore, Elsewhere, read_body
from .validators import ValidatorSet

__all__ = ["AuditReport", "verify_chain", "verify_store"]


@dataclass(frozen=True, slots=True)
class AuditReport:
    chain: str
    certified: int          # blocks that passed, from height 1
    txs: int
    uncertified: int        # a proposal still in flight at the tip (not a fault)
    fault: ChainError | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.fault is None

    def to_dict(self) -> dict:
        out = {"chain": self.chain, "ok": self.ok, "certified_height": self.certified, "txs": self.txs,
               "uncertified_tip": self.uncertified, "seconds": round(self.seconds, 3)}
        if self.fault is not None:
            out["fault"] = {"height": self.fault.height, "reason": self.fault.reason, "detail": self.fault.detail}
        return out


def verify_store(conn: sqlite3.Connection, chain: str, app: App, validators: ValidatorSet,
                 elsewhere: Elsewhere | None = None) -> AuditReport:
    """`elsewhere`: the app's reader of bodies kept in its own tables (`read_body`)."""
    t0 = time.monotonic()
    fresh = Replica(chain, app, ChainStore(sqlite3.connect(":memory:", isolation_level=None)), validators)
    rows = conn.execute("SELECT height, header, cert FROM chain_blocks ORDER BY height").fetchall()
    txs = uncertified = 0
    fault: ChainError | None = None
    for i, (height, raw_header, raw_cert) in enumerate(rows):
        try:
            if height != fresh.height + 1:
                raise ChainError("missing_block", f"expected height {fresh.height + 1}, found {height}",
                                 height=fresh.height + 1)
            if raw_cert is None:
                if i == len(rows) - 1:
                    uncertified = 1
                    break
                raise ChainError("uncertified_block", "a block below the tip has no certificate")
            header = Header.decode(raw_header)
            try:
                cert = Certificate.from_dict(json.loads(raw_cert))
            except ValueError:
                raise ChainError("cert_schema", "certificate is not JSON") from None
            body = read_body(conn, height, elsewhere)
            fresh.commit(header, body, cert)
            txs += len(body)
        except ChainError as exc:
            exc.height = exc.height or height
            fault = exc
            break
    return AuditReport(chain, fresh.height, txs, uncertified, fault, time.monotonic() - t0)


def verify_chain(database: Path, chain: str, app: App, validators: ValidatorSet,
                 elsewhere: Elsewhere | None = None) -> AuditReport:
    """Audit the chain stored in `database` (opened read-only; safe beside a running node)."""
    if not Path(database).exists():
        raise FileNotFoundError(database)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
        return verify_store(conn, chain, app, validators, elsewhere)
