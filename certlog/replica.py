"""A replica of one chain: the engine's rules, with no network in sight.

Proposer, validators and `chain verify` all hold a `Replica`. It knows the last
certified header, checks that a block extends it (chain, height, prev, time,
body size, tx root), re-runs the app and compares every root and field, and
commits certified blocks. The network roles around it only move bytes.
"""

from __future__ import annotations

import time as _time
from typing import Any, Callable, Sequence

from . import merkle
from .app import App, Outcome
from .block import ZERO_HASH, Certificate, ChainError, Header
from .store import ChainStore
from .validators import ValidatorSet

__all__ = ["Replica"]


class Replica:
    def __init__(self, chain: str, app: App, store: ChainStore, validators: ValidatorSet):
        self.chain = chain
        self.app = app
        self.store = store
        self.validators = validators
        head = store.head()
        self.head: Header | None = head[0] if head else None
        self._checked: set[str] = set()  # hashes of headers executed against the current head
        # Called with each block once it is durably certified (e.g. the registry's read side).
        self.listeners: list[Callable[[Header, Sequence[bytes]], None]] = []

    @property
    def height(self) -> int:
        return self.head.height if self.head else 0

    @property
    def state_root(self) -> str:
        return self.head.state_root if self.head else self.app.genesis_root

    def _run(self, time_ms: int, txs: Sequence[bytes], trusted: bool,
             decoded: Sequence[Any] | None = None) -> Outcome:
        return self.app.execute(self.store.nodes, self.state_root, time_ms, txs, trusted=trusted, decoded=decoded)

    def build(self, txs: Sequence[bytes], time_ms: int | None = None, *,
              decoded: Sequence[Any] | None = None) -> Header:
        """The next header over `txs` (a proposer's job; its txs were checked at ingest).
        `decoded`: the app's own objects the proposer encoded as `txs`, one per tx."""
        now = int(_time.time() * 1000) if time_ms is None else time_ms
        t = max(now, self.head.time + 1) if self.head else now
        out = self._run(t, txs, trusted=True, decoded=decoded)
        header = Header(chain=self.chain, height=self.height + 1, prev=self.head.hash if self.head else ZERO_HASH,
                        time=t, tx_root=merkle.root(txs), state_root=out.state_root, txs=len(txs), app=out.app)
        self._checked.add(header.hash)
        return header

    def check(self, header: Header, txs: Sequence[bytes]) -> None:
        """Raise `ChainError` unless `header` over `txs` is the valid next block."""
        h = header.height
        if header.chain != self.chain:
            raise ChainError("wrong_chain", f"{header.chain!r} is not {self.chain!r}", height=h)
        if h != self.height + 1:
            raise ChainError("wrong_height", f"expected height {self.height + 1}, got {h}", height=h)
        if header.prev != (self.head.hash if self.head else ZERO_HASH):
            raise ChainError("prev_mismatch", "prev is not the hash of the parent header", height=h)
        if self.head and header.time <= self.head.time:
            raise ChainError("time_not_increasing", f"{header.time} <= parent {self.head.time}", height=h)
        if header.txs != len(txs):
            raise ChainError("tx_count_mismatch", f"header says {header.txs}, body has {len(txs)}", height=h)
        if header.hash in self._checked:
            return
        if merkle.root(txs) != header.tx_root:
            raise ChainError("tx_root_mismatch", "body does not hash to tx_root", height=h)
        try:
            out = self._run(header.time, txs, trusted=False)
        except ChainError as exc:
            exc.height = h
            raise
        if out.state_root != header.state_root:
            raise ChainError("state_root_mismatch", f"recomputed {out.state_root[:16]}…", height=h)
        if out.app != dict(header.app):
            diff = sorted(k for k in set(out.app) | set(header.app) if out.app.get(k) != header.app.get(k))
            raise ChainError("app_fields_mismatch", f"fields differ: {', '.join(diff)}", height=h)
        self._checked.add(header.hash)

    def commit(self, header: Header, txs: Sequence[bytes], cert: Certificate, *, stored: bool = False) -> None:
        """Check and durably append a certified block (`stored`: the proposal row exists).
        A certificate this node's set verified already (the proposer verifies the one it
        aggregates) is not verified again: exactly those bytes, see `check_certificate`."""
        self.validators.check_certificate(cert, header, remember=True)
        self.check(header, txs)
        with self.store.transaction():
            if stored:
                self.store.put_certificate(cert)
            else:
                self.store.put_block(header, list(txs), cert)
        self.head = header
        self._checked.clear()
        for listener in self.listeners:
            listener(header, txs)
