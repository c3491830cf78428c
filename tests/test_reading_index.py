"""The gateway's readings found by (meter, seq) through an index file beside the
database (aggregator/store.py, certlog/store.py `LogIndex`), on real SQLite: the
bytes a batch writes do not grow with the table, heads and stored hashes are what
the table holds, and a lost, lagging or too new index costs a rebuild, never a
reading."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from aggregator.store import GatewayStore
from gridledger.wire import Reading

from helpers import SimMeter, meter_keys

METERS = 200


def plain(meter: int, seq: int) -> Reading:
    """A stored reading's shape without the signing: the store checks no signature."""
    return Reading(f"m{meter:03d}", seq, 1_000_000 + 900 * seq, 900, f"{seq:064x}", "cd" * 8, "e1" * 512,
                   "f0" * 64)


def fill(store: GatewayStore, first_seq: int, rounds: int, batch: int = 1000) -> None:
    """`rounds` readings of every meter from `first_seq` on, interleaved as an area sends them."""
    rs = [plain(m, s) for s in range(first_seq, first_seq + rounds) for m in range(METERS)]
    for i in range(0, len(rs), batch):
        store.commit(rs[i:i + batch], [], {})


def wal_bytes(path: Path, files: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for f in (Path(f"{path}{x}-wal") for x in files) if f.exists())


def keyed(path: Path) -> None:
    """The layout before: the readings keyed by (meter, seq) inside the database."""
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE readings (meter TEXT, seq INTEGER, t INTEGER, dt INTEGER, prev TEXT, kid TEXT, "
                    "c TEXT, sig TEXT, hash TEXT, received_at FLOAT, PRIMARY KEY (meter, seq))")


def written_per_reading(path: Path, stored: int, files: tuple[str, ...]) -> float:
    """WAL bytes of `files` per reading for 20 batches of 130 readings from 200 meters,
    with `stored` readings already in the table."""
    store = GatewayStore(path)
    fill(store, 1, stored // METERS)
    for conn in (store.db.conn, store.index.db):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # every page the batches write stays in the WAL
    before = wal_bytes(path, files)
    seq = stored // METERS + 1
    rs = [plain(m, s) for s in range(seq, seq + 13) for m in range(METERS)]  # 2,600 readings
    for i in range(0, len(rs), 130):
        store.commit(rs[i:i + 130], [], {})
    written = wal_bytes(path, files) - before  # before closing: the last connection's close checkpoints
    store.close()
    return written / len(rs)


def test_the_bytes_a_batch_writes_stay_near_the_readings_own(tmp_path):
    """With the (meter, seq) key in the database each batch dirtied one 8 KiB page of it
    per meter, so the bytes written per reading grew with the table (5.2 KB once
    60,000 were stored; 4.3 KB at 40,000). Appended rows and a 512-byte-page index
    file: about one small page per reading beside the row itself (1.9 KB in all)."""
    keyed(tmp_path / "before.db")
    before = written_per_reading(tmp_path / "before.db", 60_000, ("",))  # its database only
    now = written_per_reading(tmp_path / "now.db", 60_000, ("", ".readingindex"))
    assert now < 2_500 and now < 0.5 * before, (now, before)


def test_heads_and_stored_hashes_are_the_tables(tmp_path):
    path = tmp_path / "gw.db"
    store = GatewayStore(path)
    meters = [SimMeter(k) for k in meter_keys([f"m{i}" for i in range(5)]).values()]
    sent = [m.next() for _ in range(4) for m in meters] + [meters[0].next()]
    for i in range(0, len(sent), 3):
        store.commit(sent[i:i + 3], [], {})
    expected = {m.key.meter: (m.seq, m.prev, m.sent[-1].t) for m in meters}
    for s in (store, GatewayStore(path)):  # as committed, and as a restart finds them
        assert {k: (h.seq, h.hash, h.t) for k, h in s.heads().items()} == expected
        assert all(s.stored_hash(r.meter, r.seq) == r.hash for r in sent)
        assert s.stored_hash("m0", 6) is None and s.stored_hash("nobody", 1) is None


def test_a_lost_index_is_rebuilt_from_the_table(tmp_path):
    path = tmp_path / "gw.db"
    store = GatewayStore(path)
    fill(store, 1, 3)
    store.close()
    for f in tmp_path.glob("gw.db.readingindex*"):
        f.unlink()
    store = GatewayStore(path)
    assert store.index.high == 3 * METERS
    assert store.stored_hash("m007", 2) == plain(7, 2).hash
    assert {h.seq for h in store.heads().values()} == {3} and len(store.heads()) == METERS


def test_readings_the_index_missed_are_found_past_its_end_and_indexed_at_the_next_open(tmp_path):
    """A batch that is durable but whose indexing failed (a full disk, a kill -9 in
    between) is still found, by a scan of the table's short tail; the next open
    indexes it."""
    path = tmp_path / "gw.db"
    store = GatewayStore(path)
    store.INDEX_EVERY = 1  # each batch indexed as it is committed
    fill(store, 1, 2)

    def full_disk(rows):
        raise sqlite3.OperationalError("database or disk is full")

    store.index.add = full_disk
    store.commit([plain(m, 3) for m in range(METERS)], [], {})  # committed, not indexed
    assert store.index.high == 2 * METERS
    assert store.stored_hash("m011", 3) == plain(11, 3).hash
    store.close()
    store = GatewayStore(path)
    assert store.index.high == 3 * METERS
    assert store.heads()["m011"].seq == 3


def test_a_database_restored_under_a_newer_index_reads_its_own_readings(tmp_path):
    """An older copy of the database put back beside the index of a later one: the
    index is ahead of the table, so it is rebuilt; nothing of the later copy shows."""
    path = tmp_path / "gw.db"
    store = GatewayStore(path)
    fill(store, 1, 2)
    store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(path, tmp_path / "old.db")
    fill(store, 3, 2)
    store.close()
    path.unlink()
    Path(f"{path}-wal").unlink(missing_ok=True)
    Path(f"{path}-shm").unlink(missing_ok=True)
    shutil.copy(tmp_path / "old.db", path)
    store = GatewayStore(path)
    assert store.index.high == 2 * METERS
    assert store.stored_hash("m001", 3) is None and store.stored_hash("m001", 2) == plain(1, 2).hash
    assert {h.seq for h in store.heads().values()} == {2}


def test_a_database_made_with_the_key_works_as_before(tmp_path):
    """A gateway database from before keeps its (meter, seq) key and is indexed once."""
    path = tmp_path / "gw.db"
    keyed(path)
    store = GatewayStore(path)
    fill(store, 1, 2)
    with pytest.raises(sqlite3.IntegrityError):  # the key still refuses a second copy
        store.commit([plain(5, 2)], [], {})
    store.close()
    store = GatewayStore(path)
    assert store.stored_hash("m005", 2) == plain(5, 2).hash and store.heads()["m005"].seq == 2


def test_a_second_reading_for_a_stored_seq_is_refused_as_the_key_refused_it(tmp_path):
    """With no (meter, seq) key inside the database, the store keeps each meter's highest
    stored seq (from `heads`, as the gateway starts) and refuses a batch that would store
    a seq again, from the table or within the batch itself; nothing of it is stored."""
    path = tmp_path / "gw.db"
    store = GatewayStore(path)
    fill(store, 1, 2)
    store.close()
    store = GatewayStore(path)  # a restart: the highest seqs come from the table
    assert store.heads()["m004"].seq == 2
    count = lambda: store.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
    before = count()
    for batch in ([plain(3, 3), plain(4, 2)],             # seq 2 of m004 is stored
                  [plain(3, 3), plain(3, 3)],             # twice in one batch
                  [plain(5, 4), plain(5, 3)]):            # falling within the batch
        with pytest.raises(sqlite3.IntegrityError, match="stored once"):
            store.commit(batch, [], {})
        assert count() == before
    assert store.commit([plain(4, 3), plain(4, 4)], [], {}) is not None
    with pytest.raises(sqlite3.IntegrityError):
        store.commit([plain(4, 4)], [], {})
    assert count() == before + 2 and store.stored_hash("m004", 4) == plain(4, 4).hash
