"""The gateway store's block bookkeeping on real SQLite: `mark_blocked` puts exactly
the readings it is given in a block, whether they are the oldest unblocked run (one
ranged statement) or not (one by one), and never touches another reading."""

from __future__ import annotations

from aggregator.store import GatewayStore
from certlog.store import connect

from helpers import SimMeter, meter_keys


def heights(conn) -> dict[int, int | None]:
    return dict(conn.execute("SELECT rowid, height FROM readings ORDER BY rowid").fetchall())


def filled(tmp_path, count: int) -> tuple[GatewayStore, object]:
    store = GatewayStore(tmp_path / "gw.db")
    m = SimMeter(meter_keys(["m1"])["m1"])
    store.commit([m.next() for _ in range(count)], [], {})
    return store, connect(tmp_path / "gw.db")


def test_the_oldest_unblocked_run_is_marked_and_nothing_after_it(tmp_path):
    store, conn = filled(tmp_path, 10)
    rowids, readings = store.unblocked(conn, 4)
    assert [r.seq for r in readings] == [1, 2, 3, 4]
    store.mark_blocked(conn, 1, rowids, [])
    rowids2, readings2 = store.unblocked(conn, 100)
    assert [r.seq for r in readings2] == list(range(5, 11))
    store.mark_blocked(conn, 2, rowids2, [])
    h = heights(conn)
    assert [h[r] for r in rowids] == [1] * 4 and [h[r] for r in rowids2] == [2] * 6
    assert store.unblocked(conn, 100) == ([], [])


def test_a_set_that_is_not_the_oldest_run_is_marked_one_by_one(tmp_path):
    store, conn = filled(tmp_path, 6)
    rowids, _ = store.unblocked(conn, 6)
    store.mark_blocked(conn, 0, [rowids[2]], [])          # one set aside (height 0)
    picked = [rowids[0], rowids[4]]                        # with unblocked ones between them
    store.mark_blocked(conn, 3, picked, [])
    h = heights(conn)
    assert h[rowids[0]] == h[rowids[4]] == 3
    assert h[rowids[2]] == 0
    assert h[rowids[1]] is None and h[rowids[3]] is None and h[rowids[5]] is None
