"""The gateway store's block bookkeeping on real SQLite: readings are never rewritten;
a block is the oldest unblocked run (its last rowid), a refused reading is set aside,
anything that would put a reading in two blocks or none is refused, and a database
from before (a `height` column in readings) is carried over."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from aggregator.store import GatewayStore
from certlog.store import connect
from gridledger.wire import well_formed

from helpers import SimMeter, meter_keys


def filled(tmp_path, count: int) -> tuple[GatewayStore, sqlite3.Connection, list]:
    store = GatewayStore(tmp_path / "gw.db")
    m = SimMeter(meter_keys(["m1"])["m1"])
    sent = [m.next() for _ in range(count)]
    store.commit(sent, [], {})
    return store, connect(tmp_path / "gw.db"), sent


def seqs(store, conn, limit=100) -> list[int]:
    return [r.seq for r in store.unblocked(conn, limit)[1]]


def test_blocks_take_the_oldest_run_and_leave_the_rows_untouched(tmp_path):
    store, conn, _ = filled(tmp_path, 10)
    before = conn.execute("SELECT * FROM readings ORDER BY rowid").fetchall()
    rowids, readings = store.unblocked(conn, 4)
    assert [r.seq for r in readings] == [1, 2, 3, 4]
    store.mark_blocked(conn, 1, rowids, [])
    assert seqs(store, conn) == list(range(5, 11)) and store.unblocked_count(conn) == 6
    store.mark_blocked(conn, 2, store.unblocked(conn, 100)[0], [])
    assert seqs(store, conn) == [] and store.unblocked_count(conn) == 0
    assert conn.execute("SELECT * FROM readings ORDER BY rowid").fetchall() == before  # append-only
    assert conn.execute("SELECT height, hi FROM reading_blocks ORDER BY height").fetchall() == [
        (1, rowids[-1]), (2, rowids[-1] + 6)]


def test_a_set_aside_reading_is_skipped_by_every_later_block(tmp_path):
    store, conn, _ = filled(tmp_path, 5)
    rowids, _ = store.unblocked(conn, 5)
    store.mark_blocked(conn, 0, [rowids[0]], [])        # the chain refused seq 1
    assert seqs(store, conn) == [2, 3, 4, 5]
    assert store.unblocked_count(conn) == 4
    store.mark_blocked(conn, 1, rowids[1:3], [])
    assert seqs(store, conn) == [4, 5] and store.unblocked_count(conn) == 2
    store.mark_blocked(conn, 0, [rowids[4]], [])        # and seq 5, beyond the last block
    assert seqs(store, conn) == [4] and store.unblocked_count(conn) == 1


@pytest.mark.parametrize("pick", [lambda r: r[1:3], lambda r: [r[0], r[2]], lambda r: [r[0], r[0]]],
                         ids=["not_the_oldest", "with_a_hole", "twice"])
def test_anything_but_the_oldest_run_is_refused(tmp_path, pick):
    store, conn, _ = filled(tmp_path, 4)
    rowids, _ = store.unblocked(conn, 4)
    with pytest.raises(ValueError, match="not the oldest"):
        store.mark_blocked(conn, 1, pick(rowids), [])
    assert seqs(store, conn) == [1, 2, 3, 4]


def test_a_reading_already_in_a_block_is_refused_even_when_the_count_fits(tmp_path):
    """Block 1 took rows 1-2; rows 2 and 4 are as many as the unblocked rows up to 4 beside
    row 3, but row 2 is in a block already and row 3 would be in none."""
    store, conn, _ = filled(tmp_path, 5)
    rowids, _ = store.unblocked(conn, 2)
    store.mark_blocked(conn, 1, rowids, [])
    later, _ = store.unblocked(conn, 3)
    with pytest.raises(ValueError, match="not the oldest"):
        store.mark_blocked(conn, 2, [rowids[1], later[1]], [])
    store.mark_blocked(conn, 2, later[:2], [])
    assert seqs(store, conn) == [5]


def test_commit_numbers_its_readings_and_a_block_takes_them_by_those_rowids(tmp_path):
    """`commit` gives the first rowid of its batch and the others follow one by one, so
    the chain holds each reading by its rowid and a block uses those very objects
    without listing the rows; a second batch continues the numbering."""
    store = GatewayStore(tmp_path / "gw.db")
    conn = connect(tmp_path / "gw.db")
    m = SimMeter(meter_keys(["m1"])["m1"])
    n = SimMeter(meter_keys(["m2"])["m2"])
    held = {}
    for batch in ([m.next(), n.next(), m.next()], [n.next(), n.next(), m.next(), m.next()]):
        first = store.commit(batch, [], {})
        held.update({first + i: r for i, r in enumerate(batch)})
    assert store.commit([], [], {}) is None
    by_rowid = {rowid: (meter, seq) for rowid, meter, seq in conn.execute("SELECT rowid, meter, seq FROM readings")}
    assert {k: (r.meter, r.seq) for k, r in held.items()} == by_rowid
    expected = list(held.items())
    rowids, readings = store.unblocked(conn, 5, held)
    assert rowids == [k for k, _ in expected[:5]] and all(a is b for a, (_, b) in zip(readings, expected[:5]))
    assert list(held) == [k for k, _ in expected[5:]]  # taken out, the rest left for the next block
    store.mark_blocked(conn, 1, rowids, [])
    assert store.unblocked(conn, 5, held) == ([k for k, _ in expected[5:]], [r for _, r in expected[5:]])
    assert held == {}


def test_a_hole_in_the_rowids_is_no_reading(tmp_path):
    """Rows are never deleted, so rowids are dense; if one were missing all the same, a
    block would skip it rather than stop the chain (the check of a block's rowids
    falls back to the rows themselves), and what the rows hold stays in order."""
    store, conn, _ = filled(tmp_path, 5)
    rowids, _ = store.unblocked(conn, 5)
    with conn:
        conn.execute("DELETE FROM readings WHERE rowid = ?", (rowids[2],))
    got, readings = store.unblocked(conn, 5)
    assert got == rowids[:2] + rowids[3:] and [r.seq for r in readings] == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="not the oldest"):
        store.mark_blocked(conn, 1, rowids[3:], [])
    store.mark_blocked(conn, 1, got, [])
    assert seqs(store, conn) == []


def test_a_database_with_heights_in_its_readings_is_carried_over(tmp_path):
    path = tmp_path / "gw.db"
    store, conn, sent = filled(tmp_path, 6)
    store.close()
    conn.close()
    with sqlite3.connect(path) as old:  # the layout before: a height per reading, NULL for unblocked
        old.execute("DROP TABLE reading_blocks")
        old.execute("DROP TABLE readings_set_aside")
        old.execute("ALTER TABLE readings ADD COLUMN height INTEGER")
        for seq, h in zip(range(1, 7), (1, 1, 0, 2, None, None)):
            old.execute("UPDATE readings SET height = ? WHERE seq = ?", (h, seq))
    store = GatewayStore(path)
    conn = connect(path)
    assert seqs(store, conn) == [5, 6]
    assert conn.execute("SELECT COUNT(*) FROM readings_set_aside").fetchone()[0] == 1
    assert [h for h, _ in conn.execute("SELECT height, hi FROM reading_blocks ORDER BY height")] == [1, 2]


def test_held_readings_are_used_as_they_are_and_the_rest_read_back(tmp_path):
    """A block takes the readings the ingest still holds (the same objects) and reads
    back only the others; either way it gets the stored readings, oldest first."""
    store, conn, sent = filled(tmp_path, 6)
    first = conn.execute("SELECT MIN(rowid) FROM readings").fetchone()[0]
    held = {first + i: r for i, r in enumerate(sent) if i in (1, 2, 3)}
    rowids, readings = store.unblocked(conn, 5, held)
    assert readings == sent[:5]
    assert all(readings[i] is sent[i] for i in (1, 2, 3)) and readings[0] is not sent[0]
    assert held == {}  # taken out: a reading is held for one block only
    assert store.unblocked(conn, 5) == (rowids, sent[:5])


def test_hex_fields_are_stored_as_bytes_and_read_back_exactly(tmp_path):
    """prev, c, sig and hash are stored as the bytes they spell (half the size), and a
    reading read back equals the one stored, its ciphertext's hex digit for digit
    whether it has an odd or even number of digits; heads and stored hashes are hex."""
    store, conn, sent = filled(tmp_path, 4)
    extra = []
    r = sent[-1]
    for parity in (0, 1):  # both parities, whatever the meter's ciphertexts have: digits cut at the end
        c = r.c if len(r.c) & 1 == parity else r.c[:-1]
        extra.append(replace(r, seq=r.seq + len(extra) + 1, prev=(extra[-1] if extra else r).hash, c=c))
    store.commit(extra, [], {})
    sent += extra
    assert {len(r.c) & 1 for r in sent} == {0, 1}
    assert store.readings("m1") == sent
    assert store.unblocked(conn, 100)[1] == sent
    assert all(type(x) is bytes for x in conn.execute("SELECT prev, c, sig, hash FROM readings").fetchone())
    assert [n for (n,) in conn.execute("SELECT length(c) FROM readings ORDER BY rowid")] == [
        (len(r.c) + 1) // 2 for r in sent]
    assert store.heads()["m1"].hash == sent[-1].hash
    assert store.stored_hash("m1", 2) == sent[1].hash


def test_rows_read_back_are_well_formed_readings_with_their_ciphertext_parsed(tmp_path):
    """A row read back is what parse_reading makes of the reading's JSON: well formed,
    the same JSON, and its ciphertext already a number (taken from the stored bytes)."""
    store, conn, sent = filled(tmp_path, 4)
    back = store.unblocked(conn, 10)[1]
    assert back == sent and all(r.parsed and well_formed(r) for r in back)
    assert [r.to_json() for r in back] == [r.to_json() for r in sent]
    assert [r.ciphertext_mpz for r in back] == [int(r.c, 16) for r in sent]
    assert [r.hash for r in back] == [r.hash for r in sent]


@pytest.mark.parametrize("column, value", [
    ("prev", b"\x01" * 31), ("sig", b"\x02" * 65), ("c", b"\x00\x11"), ("c", b""), ("c", b"\x01" * 2049),
    ("meter", "m 1"), ("kid", "ABCDEF0123456789"), ("kid", "0123"), ("t", -1), ("dt", 0), ("tq", "gps"),
    ("seq", "x2"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_row_that_spells_no_reading_is_read_back_as_it_is_and_not_well_formed(tmp_path, column, value):
    """A row changed behind the gateway's back into something no reading is (a short
    prev, a ciphertext with a leading zero, a bad key id...) comes back field for field
    and judged not well formed, so the block it would go into refuses it; the other
    rows are read back as before."""
    store, conn, sent = filled(tmp_path, 3)
    with conn:
        conn.execute("BEGIN")
        conn.execute(f"UPDATE readings SET {column} = ? WHERE seq = 2", (value,))
        conn.execute("COMMIT")
    back = store.unblocked(conn, 10)[1]
    assert [back[0], back[2]] == [sent[0], sent[2]] and back[0].parsed and back[2].parsed
    bad = back[1]
    assert not bad.parsed and not well_formed(bad)
    if column == "c":  # the value it spells (a leading zero digit is the store's padding)
        assert int(bad.c or "0", 16) == int.from_bytes(value, "big")
    else:
        assert getattr(bad, column) == (value.hex() if isinstance(value, bytes) else value)


def test_rows_an_older_gateway_wrote_in_hex_are_read_as_they_are(tmp_path):
    path = tmp_path / "gw.db"
    store, conn, sent = filled(tmp_path, 3)
    with conn:  # rewrite the rows as an older gateway stored them: hex text
        conn.execute("BEGIN")
        for r in sent:
            conn.execute("UPDATE readings SET prev = ?, c = ?, sig = ?, hash = ? WHERE seq = ?",
                         (r.prev, r.c, r.sig, r.hash, r.seq))
        conn.execute("COMMIT")
    store.close()
    store = GatewayStore(path)
    m = SimMeter(meter_keys(["m1"])["m1"])
    later = [m.next() for _ in range(5)][3:]  # the same meter's readings 4 and 5, stored as bytes
    store.commit(later, [], {})
    assert store.readings("m1") == sent + later
    assert store.heads()["m1"].hash == later[-1].hash and store.stored_hash("m1", 1) == sent[0].hash
