"""The body file under the storage store: torn tails, flipped bytes, old databases,
one writer. Real files and SQLite in a temporary folder, no network (~2 s)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from aggregator.bodyfile import HEAD, BodyFileLocked, frame_head
from aggregator.storageserve import StorageServer
from aggregator.storagestore import StorageStore, body_file_path
from aggregator.storagewire import encode_body, encode_request, parse_request, parse_response
from certlog import bls, merkle

from storagekit import flip_body_byte, make_chain

NODE_SK = bls.KeyGen(b"storage-node-bodyfile" + bytes(11))


@pytest.fixture(scope="module")
def chain():
    return make_chain(4, 3, tx_bytes=4)   # small records: every byte of the last one is cut below


def _filled(path, blocks, upto=None) -> StorageStore:
    store = StorageStore(path)
    for b in blocks[:upto]:
        store.put_header(b.header, b.cert)
    store.put_bodies([(b.header, b.txs) for b in blocks[:upto][:-1]])
    store.put_bodies([(b.header, b.txs) for b in blocks[:upto][-1:]])   # the last record: a group of its own
    return store


def _reads_back(store, blocks) -> dict[int, bool]:
    """height -> the body reads back exactly (False: absent). Never anything else."""
    out = {}
    for b in blocks:
        got = store.body(b.header.height)
        assert got is None or got == b.txs, f"corrupt body {b.header.height} returned"
        out[b.header.height] = got is not None
    return out


def test_a_torn_last_record_at_every_byte_keeps_every_complete_record_and_returns_no_corrupt_one(chain, tmp_path):
    blocks, _, _ = chain
    store = _filled(tmp_path / "s.db", blocks)
    last = store.conn.execute("SELECT off, len FROM storage_bodies WHERE height = 4").fetchone()
    store.close()
    whole = body_file_path(tmp_path / "s.db").read_bytes()
    assert len(whole) == last[0] + HEAD.size + last[1]
    for cut in range(last[0], len(whole)):     # the index committed, the disk kept only part of the record
        db = tmp_path / f"cut{cut}.db"
        _copy_db(tmp_path / "s.db", db)
        body_file_path(db).write_bytes(whole[:cut])
        store = StorageStore(db)
        assert _reads_back(store, blocks) == {1: True, 2: True, 3: True, 4: False}, cut
        assert store.wanted("full") == [4] and store.counts["torn"] == 1
        assert store.put_body(blocks[3].header, blocks[3].txs)        # appended after the cut tail, read back
        assert store.body(4) == blocks[3].txs and store.tx(4, 2) == blocks[3].txs[2]
        store.close()
        assert body_file_path(db).stat().st_size == len(whole)


def test_a_torn_tail_no_index_points_at_is_cut_on_open(chain, tmp_path):
    blocks, _, _ = chain
    store = _filled(tmp_path / "s.db", blocks, upto=3)
    end = body_file_path(tmp_path / "s.db").stat().st_size
    store.close()
    with open(body_file_path(tmp_path / "s.db"), "ab") as f:   # written (even whole), killed before its commit
        f.write(b"GLB1" + os.urandom(40))
    store = StorageStore(tmp_path / "s.db")
    assert body_file_path(tmp_path / "s.db").stat().st_size == end
    assert _reads_back(store, blocks) == {1: True, 2: True, 3: True, 4: False}
    store.put_header(blocks[3].header, blocks[3].cert)
    assert store.put_body(blocks[3].header, blocks[3].txs) and store.body(4) == blocks[3].txs
    store.close()


def test_records_whose_index_commit_was_lost_are_indexed_again_on_open_and_others_are_not(chain, tmp_path):
    blocks, _, _ = chain
    store = _filled(tmp_path / "s.db", blocks)       # the last group (body 4) its own commit
    other = make_chain(1, 3, tx_bytes=5)[0][0]       # a whole record, but not the certified body at 1
    store.conn.execute("DELETE FROM storage_bodies WHERE height IN (3, 4)")   # a power cut took these commits
    store.close()
    store = StorageStore(tmp_path / "s.db")
    assert store.counts["reindexed"] == 2 and _reads_back(store, blocks) == {1: True, 2: True, 3: True, 4: True}
    assert store.tx(4, 1) == blocks[3].txs[1]
    store.conn.execute("DELETE FROM storage_bodies WHERE height = 1")
    end = body_file_path(tmp_path / "s.db").stat().st_size
    store.close()
    with open(body_file_path(tmp_path / "s.db"), "ab") as f:   # a record of another body at 1, then a torn one
        f.write(frame_head(1, encode_body(other.txs)) + encode_body(other.txs))
        f.write(frame_head(2, encode_body(blocks[1].txs))[:-1])
    store = StorageStore(tmp_path / "s.db")
    assert store.counts["reindexed"] == 0 and not store.has_body(1)   # the row of 1 is gone, and 1 is not `other`
    assert body_file_path(tmp_path / "s.db").stat().st_size == end + HEAD.size + len(encode_body(other.txs))
    assert _reads_back(store, blocks) == {1: False, 2: True, 3: True, 4: True}
    store.close()


@pytest.mark.parametrize("at", [0.0, 0.5, 0.999])
def test_a_flipped_byte_in_the_body_file_reads_as_missing_and_the_body_is_wanted_again(chain, tmp_path, at):
    blocks, _, _ = chain
    _filled(tmp_path / "s.db", blocks).close()
    flip_body_byte(tmp_path / "s.db", 2, at)
    store = StorageStore(tmp_path / "s.db")
    assert _reads_back(store, blocks) == {1: True, 2: False, 3: True, 4: True}
    assert store.counts["corrupt"] == 1 and store.wanted("full") == [2] and not store.has_body(2)
    store.close()


def test_a_flipped_byte_in_a_transaction_fails_its_read_and_the_server_says_corrupt(chain, tmp_path):
    blocks, _, _ = chain
    _filled(tmp_path / "s.db", blocks).close()
    writer = StorageStore(tmp_path / "s.db")
    server = StorageServer(StorageStore(tmp_path / "s.db", writer=False), node="s1", kind="full",
                           secret_key=NODE_SK)
    meta = _ask(server, "tx", height=3, index=1)
    assert meta["ok"] and merkle.verify_path(blocks[2].header.tx_root, bytes.fromhex(meta["tx"]), 1, 3, meta["path"])
    flip_body_byte(tmp_path / "s.db", 3, 0.5)         # inside transaction 1 of 3
    assert writer.tx(3, 0) == blocks[2].txs[0]        # another transaction of it: one pread, still right
    # the first read finds it (`corrupt`, the index row dropped), the next no longer holds it
    for op, args, reason in (("audit", {"nonce": "ab" * 16}, "corrupt"), ("tx", {}, "not_held")):
        meta = _ask(server, op, height=3, index=1, **args)
        assert meta["ok"] is False and meta["error"] == reason, meta
    assert server.store.counts["corrupt"] == 1 and not writer.has_body(3)
    meta = _ask(server, "bodies", want=[[3, blocks[2].header.hash]], chunk_size=1024)
    assert meta["missing"] == [3] and meta["bodies"] == []
    writer.close()
    server.store.close()


def test_a_database_with_bodies_in_sqlite_opens_migrated_and_reads_the_same(chain, tmp_path):
    blocks, _, _ = chain
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:   # the layout before the body file, as the earlier StorageStore made it
        conn.executescript("""
            CREATE TABLE storage_headers (height INTEGER PRIMARY KEY, hash TEXT NOT NULL, header BLOB NOT NULL,
                cert BLOB NOT NULL, at REAL NOT NULL);
            CREATE TABLE storage_bodies (height INTEGER PRIMARY KEY, txs INTEGER NOT NULL, bytes INTEGER NOT NULL,
                at REAL NOT NULL);
            CREATE TABLE storage_txs (height INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
                PRIMARY KEY (height, idx)) WITHOUT ROWID;
            CREATE TABLE storage_placements (height INTEGER PRIMARY KEY, by TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE storage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);""")
        for b in blocks:
            conn.execute("INSERT INTO storage_headers VALUES (?, ?, ?, ?, 0)",
                         (b.header.height, b.header.hash, b.header.encode(), b.cert.encode()))
        for b in blocks[:3]:
            conn.execute("INSERT INTO storage_bodies VALUES (?, ?, ?, 0)", (b.header.height, 3, sum(map(len, b.txs))))
            conn.executemany("INSERT INTO storage_txs VALUES (?, ?, ?)",
                             [(b.header.height, i, t) for i, t in enumerate(b.txs)])
        conn.execute("INSERT INTO storage_meta VALUES ('kind', 'heavy')")
    store = StorageStore(db)
    assert store.counts["migrated"] == 3 and store.kind() == "heavy"
    assert store.body_heights() == [1, 2, 3] and _reads_back(store, blocks) == {1: True, 2: True, 3: True, 4: False}
    assert store.tx(2, 2) == blocks[1].txs[2] and store.used_bytes() == sum(sum(map(len, b.txs)) for b in blocks[:3])
    assert store.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'storage_txs'").fetchone() is None
    assert store.put_body(blocks[3].header, blocks[3].txs) and store.body(4) == blocks[3].txs
    store.close()
    store = StorageStore(db)                        # and it opens again as the new layout
    assert _reads_back(store, blocks) == {1: True, 2: True, 3: True, 4: True} and store.counts["migrated"] == 0
    store.close()


def test_a_second_writer_is_refused_and_a_reader_never_cuts_the_tail(chain, tmp_path):
    blocks, _, _ = chain
    store = _filled(tmp_path / "s.db", blocks, upto=2)
    with pytest.raises(BodyFileLocked):
        StorageStore(tmp_path / "s.db")
    with open(body_file_path(tmp_path / "s.db"), "ab") as f:   # a group being appended, not yet indexed
        f.write(b"x" * 100)
    size = body_file_path(tmp_path / "s.db").stat().st_size
    reader = StorageStore(tmp_path / "s.db", writer=False)
    ro = StorageStore(conn=sqlite3.connect(f"file:{tmp_path / 's.db'}?mode=ro", uri=True))
    assert reader.body(2) == blocks[1].txs and ro.body(1) == blocks[0].txs
    assert body_file_path(tmp_path / "s.db").stat().st_size == size
    for s in (reader, ro, store):
        s.close()


def _ask(server, op, **args) -> dict:
    meta, _ = parse_response(server.answer(parse_request(encode_request("r-1", "s9", op, **args))))
    return meta


def _copy_db(src, dst) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
