"""The coordinator's read side of an area chain (interim: account boundaries and state proofs)."""

from __future__ import annotations

import json
from typing import Callable, Sequence

from trie import HexaryTrie

from aggregator.areaapp import AccountState, account_key
from certlog.block import Certificate, Header
from certlog.light import state_proof
from certlog.store import ChainStore
from gridledger.wire import parse_reading

__all__ = ["AreaLedger"]


class AreaLedger:
    def __init__(self, store: ChainStore, chain: str, account_of: Callable[[str], str | None]):
        self.store = store
        self.chain = chain
        self.account_of = account_of  # meter -> account (the area's registry)
        store.conn.executescript("""
            CREATE TABLE IF NOT EXISTS ledger_states (
                account TEXT NOT NULL, height INTEGER NOT NULL, count INTEGER NOT NULL, last_t INTEGER NOT NULL,
                PRIMARY KEY (account, height)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS ledger_states_t ON ledger_states(account, last_t, height);
        """)

    def index(self, header: Header, txs: Sequence[bytes]) -> None:
        meters = set()
        for tx in txs:
            if tx.startswith(b'{"alert"') or tx.startswith(b'{"registry"'):
                continue
            meters.add(parse_reading(tx).meter)
        trie = HexaryTrie(self.store.nodes, root_hash=bytes.fromhex(header.state_root))
        rows = []
        for account in sorted({a for a in map(self.account_of, meters) if a}):
            raw = trie.get(account_key(account))
            if raw:
                st = AccountState.decode(raw)
                rows.append((account, header.height, st.count, st.last_t))
        self.store.conn.executemany("INSERT OR IGNORE INTO ledger_states VALUES (?, ?, ?, ?)", rows)

    def certified(self, height: int) -> tuple[Header, Certificate]:
        raw = self.store.raw_block(height)
        if raw is None or raw[1] is None:
            raise KeyError(height)
        return Header.decode(raw[0]), Certificate.from_dict(json.loads(raw[1]))

    def state_proof(self, account: str, height: int) -> dict:
        header, cert = self.certified(height)
        return state_proof(self.store.nodes, header, cert, account_key(account))

    def boundary(self, account: str, t: int) -> int:
        row = self.store.conn.execute(
            "SELECT MAX(height) FROM ledger_states WHERE account = ? AND last_t < ?", (account, t)).fetchone()
        return row[0] or 0
