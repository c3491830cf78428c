"""The trie node store (certlog/store.py: `NodeDB`, `_NodeIndex`): nodes appended to a
log in the chain's database, found by hash through an index file beside it.

Every state a block committed must stay readable whatever happened between the
block's commit and its index's: a SIGKILL at a random moment, a lost index file, a
database restored from an older copy under a newer index, a transaction rolled back,
a database written in the old layout (nodes keyed by hash in `trie_nodes`), and a
reader on another, read-only connection."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certlog.mpt import BLANK_ROOT, Trie
from certlog.store import ChainStore, NodeDB, connect

ROOT = Path(__file__).resolve().parent.parent

# Block b sets 40 keys of its own and rewrites two of earlier blocks, so old nodes are
# both kept (earlier roots) and superseded (the newest root).
CHILD = r'''
import sys
import time
from certlog.mpt import Trie
from certlog.store import ChainStore, connect
sys.path.insert(0, sys.argv[2])
from test_nodestore import ops
store = ChainStore(connect(sys.argv[1]))
store.conn.execute("CREATE TABLE IF NOT EXISTS roots (b INTEGER PRIMARY KEY, root BLOB NOT NULL)")
row = store.conn.execute("SELECT b, root FROM roots ORDER BY b DESC LIMIT 1").fetchone()
b, root = (row[0] + 1, row[1]) if row else (1, None)
while True:
    trie = Trie(store.nodes, root) if root else Trie(store.nodes)
    for k, v in ops(b):
        trie.set(k, v)
    with store.transaction() as c:
        root = trie.commit()
        c.execute("INSERT INTO roots(b, root) VALUES (?, ?)", (b, root))
    print(b, flush=True)
    b += 1
    time.sleep(0.005)
'''


def key(b: int, i: int) -> bytes:
    return hashlib.sha256(f"{b}/{i}".encode()).digest()


def ops(b: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(b)
    out = [(key(b, i), rng.randbytes(rng.choice((8, 40, 300, 600)))) for i in range(40)]
    out += [(key(a, b % 40), f"rewritten in block {b}".encode()) for a in {b - 1, rng.randrange(1, b) if b > 1 else 0} if a]
    return out


def expected(upto: int) -> tuple[bytes, dict[bytes, bytes]]:
    """The root and every key's value after blocks 1..upto, computed in memory."""
    state: dict[bytes, bytes] = {}
    trie = Trie(NodeDB(None))
    for b in range(1, upto + 1):
        for k, v in ops(b):
            trie.set(k, v)
            state[k] = v
    return (trie.commit() if upto else BLANK_ROOT), state


def write_blocks(store: ChainStore, first: int, last: int, root: bytes | None) -> bytes:
    for b in range(first, last + 1):
        trie = Trie(store.nodes, root) if root else Trie(store.nodes)
        for k, v in ops(b):
            trie.set(k, v)
        with store.transaction():
            root = trie.commit()
    return root


def assert_state(nodes: NodeDB, upto: int) -> None:
    root, state = expected(upto)
    trie = Trie(nodes, root)
    assert {k: trie.get(k) for k in state} == state


def fresh(path: Path) -> ChainStore:
    return ChainStore(connect(path))


def test_every_committed_state_survives_sigkill_at_random_moments(tmp_path):
    """A writer SIGKILLed 12 times at random moments: after each restart, the last
    block it recorded has its whole state readable, from a fresh store and from a
    read-only reader, and the index holds the whole log once the store has opened."""
    db = tmp_path / "chain.db"
    rng = random.Random(20261122)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(ROOT / "tests")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip(), child.stderr.read()  # one block, then anywhere
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        store = fresh(db)
        [(upto,)] = store.conn.execute("SELECT MAX(b) FROM roots").fetchall()
        [(root,)] = store.conn.execute("SELECT root FROM roots WHERE b = ?", (upto,)).fetchall()
        assert root == expected(upto)[0]
        assert_state(NodeDB(store.conn), upto)  # a second NodeDB: nothing from the cache
        ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert_state(NodeDB(ro), upto)
        ro.close()
        last = store.conn.execute("SELECT MAX(id) FROM trie_log").fetchone()[0]
        assert store.nodes.index.high == last
        store.conn.close()
    assert upto >= 12


def test_a_lost_index_file_is_rebuilt_and_a_reader_without_one_still_reads(tmp_path):
    db = tmp_path / "chain.db"
    store = fresh(db)
    write_blocks(store, 1, 4, None)
    store.conn.close()
    for f in tmp_path.glob("chain.db.nodeindex*"):
        f.unlink()
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    reader = NodeDB(ro)
    assert reader.index.mem is not None  # no file: the log indexed in memory
    assert_state(reader, 4)
    ro.close()
    store = fresh(db)
    assert store.nodes.index.high == store.conn.execute("SELECT MAX(id) FROM trie_log").fetchone()[0]
    assert_state(NodeDB(store.conn), 4)


def test_a_database_restored_under_a_newer_index_reads_its_own_nodes(tmp_path):
    """The database copied at block 3; the area goes on (its cache dropped, so block 3's
    nodes are logged again under new ids, which the index then points to) to block 6;
    the copy is put back under the newer index file and other blocks are written, their
    nodes taking those same ids: every state still reads its own nodes."""
    db = tmp_path / "chain.db"
    store = fresh(db)
    root3 = write_blocks(store, 1, 3, None)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(db, tmp_path / "copy.db")
    trie = Trie(store.nodes, root3)
    for k, v in ops(3):  # the same values: the same nodes, logged again once the cache is dropped
        trie.set(k, v)
    store.nodes.cache.clear()
    with store.transaction():
        assert trie.commit() == root3
    write_blocks(store, 4, 6, root3)
    store.conn.close()
    for f in tmp_path.glob("chain.db-*"):
        f.unlink()  # the copy holds everything up to block 3; this WAL is from later
    shutil.copy(tmp_path / "copy.db", db)
    store = fresh(db)
    other = {}
    root = root3
    for b in range(4):
        trie = Trie(store.nodes, root)
        for i in range(300):
            other[key(100 + b, i)] = f"after the restore {b}/{i}".encode()
            trie.set(key(100 + b, i), other[key(100 + b, i)])
        with store.transaction():
            root = trie.commit()
    store.conn.close()
    store = fresh(db)
    assert_state(NodeDB(store.conn), 3)
    trie = Trie(NodeDB(store.conn), root)
    assert all(trie.get(k) == v for k, v in other.items())


def test_nodes_of_a_rolled_back_transaction_are_written_when_made_again(tmp_path):
    """A block's transaction fails after its nodes were flushed: they are not stored,
    so they leave the cache, and the same block made again stores them."""
    db = tmp_path / "chain.db"
    store = fresh(db)
    trie = Trie(store.nodes)
    for k, v in ops(1):
        trie.set(k, v)
    flush = store.nodes.flush

    def flush_then_fail() -> None:
        flush()
        raise RuntimeError("the disk is full")

    store.nodes.flush = flush_then_fail
    with pytest.raises(RuntimeError):
        with store.transaction():
            made = trie.commit()
    store.nodes.flush = flush
    assert store.conn.execute("SELECT COUNT(*) FROM trie_log").fetchone()[0] == 0
    assert made not in store.nodes.cache
    write_blocks(store, 1, 2, None)  # block 1 again, from scratch, then block 2
    store.conn.close()
    assert_state(NodeDB(fresh(db).conn), 2)


def test_nodes_in_the_old_layout_are_read_and_built_on(tmp_path):
    """A database whose nodes are keyed by hash in `trie_nodes` (before the log)."""
    db = tmp_path / "chain.db"
    store = fresh(db)
    root = write_blocks(store, 1, 2, None)
    with store.transaction() as c:  # move them into the old table, as an old gateway left them
        c.execute("INSERT INTO trie_nodes(key, value) SELECT key, value FROM trie_log")
        c.execute("DROP TABLE trie_log")
    store.conn.close()
    for f in tmp_path.glob("chain.db.nodeindex*"):
        f.unlink()
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # as `gridledger registry show` opens one
    assert_state(ChainStore(ro).nodes, 2)
    ro.close()
    store = fresh(db)
    assert_state(NodeDB(store.conn), 2)
    write_blocks(store, 3, 4, root)
    store.conn.close()
    store = fresh(db)
    assert_state(NodeDB(store.conn), 4)
    assert store.conn.execute("SELECT COUNT(*) FROM trie_log").fetchone()[0] > 0


def test_a_block_the_index_misses_is_read_past_its_end_and_indexed_at_the_next_open(tmp_path):
    """The index cannot take a block's nodes (its write raises, as on a full disk; a
    writer killed between the two commits leaves the same state): the block is stored
    all the same, the writer and a read-only reader find its nodes by scanning the log
    past the index's end, and the next open indexes them."""
    db = tmp_path / "chain.db"
    store = fresh(db)
    root = write_blocks(store, 1, 1, None)
    trie = Trie(store.nodes, root)
    for k, v in ops(2):
        trie.set(k, v)

    def full_disk(rows) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.nodes.index.add = full_disk
    with store.transaction():
        trie.commit()
    assert_state(NodeDB(store.conn), 2)
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert_state(NodeDB(ro), 2)
    ro.close()
    store.conn.close()
    store = fresh(db)
    assert store.nodes.index.high == store.conn.execute("SELECT MAX(id) FROM trie_log").fetchone()[0]
    assert_state(NodeDB(store.conn), 2)
