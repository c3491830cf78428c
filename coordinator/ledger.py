"""The coordinator's read side of an area chain (interim: account boundaries and state proofs)."""

from __future__ import annotations

import json
import sqlite3
from typing import Callable, Sequence

from trie import HexaryTrie

from aggregator.areaapp import AccountState, account_key
from certlog.block import Certificate, Header
from certlog.light import state_proof
from certlog.store import ChainStore
from gridledger.wire import parse_reading

__all__ = ["AreaLedger"]


class AreaLedger:
    def __init__(self, store: ChainStore, chain: str, account_of: Callable[[str], str | None],
                 index_conn: sqlite3.Connection | None = None):
        self.store = store
        self.chain = chain
        self.account_of = account_of  # meter -> account (the area's registry)
        self.conn = index_conn or store.conn  # the index may live apart from a read-only replica
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS ledger_states (
                chain TEXT NOT NULL, account TEXT NOT NULL, height INTEGER NOT NULL, count INTEGER NOT NULL, last_t INTEGER NOT NULL,
                PRIMARY KEY (chain, account, height)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS ledger_indexed (chain TEXT PRIMARY KEY, height INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS ledger_states_t ON ledger_states(chain, account, last_t, height);
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
                rows.append((self.chain, account, header.height, st.count, st.last_t))
        self.conn.executemany("INSERT OR IGNORE INTO ledger_states VALUES (?, ?, ?, ?, ?)", rows)
        self.conn.execute("INSERT OR REPLACE INTO ledger_indexed VALUES (?, ?)", (self.chain, header.height))

    def catch_up(self) -> int:
        """Index the certified blocks of the replica not indexed yet."""
        row = self.conn.execute("SELECT height FROM ledger_indexed WHERE chain = ?", (self.chain,)).fetchone()
        head = self.store.head()
        done = 0
        for height in range((row[0] if row else 0) + 1, (head[0].height if head else 0) + 1):
            header, _ = self.certified(height)
            with self.conn:
                self.index(header, self.store.txs(height))
            done += 1
        return done

    def certified(self, height: int) -> tuple[Header, Certificate]:
        raw = self.store.raw_block(height)
        if raw is None or raw[1] is None:
            raise KeyError(height)
        return Header.decode(raw[0]), Certificate.from_dict(json.loads(raw[1]))

    def state_proof(self, account: str, height: int) -> dict:
        header, cert = self.certified(height)
        return state_proof(self.store.nodes, header, cert, account_key(account))

    def boundary(self, account: str, t: int) -> int:
        row = self.conn.execute("SELECT MAX(height) FROM ledger_states WHERE chain = ? AND account = ? AND last_t < ?",
                                (self.chain, account, t)).fetchone()
        return row[0] or 0
