"""The broker gone for a while and back on the same port (Mosquitto stopped and started
again, the real meter and gateway processes left running): every reading the meter made
meanwhile waits in its journal and then arrives exactly once, in order."""

from __future__ import annotations


from aggregator.store import GatewayStore, stored_counts
from gridledger.broker import start_mosquitto
from gridledger.testbed import wait_up

from helpers import wait_until
from test_end_to_end import Area
from test_meter_crash import log_events, recent_past


def test_broker_down_and_back_every_reading_once_in_order(tmp_path, broker, firmware_bundle):
    """Readings made with no broker wait in the journal, are resent in seq order after the
    reconnect, and the gateway stores each once, in the order of their seqs."""
    area = Area(tmp_path, broker, firmware_bundle, ["b1"], intervals=40)
    again = None
    try:
        area.start_gateway()
        wait_up(tmp_path / "gateway.log", area.gateway)
        recent_past(area, "b1")
        area.start_meter("b1")
        wait_until(lambda: stored_counts(tmp_path / "gateway.db").get("b1", 0) >= 3, 60, "first readings stored")
        broker.stop()
        stored_before = stored_counts(tmp_path / "gateway.db")["b1"]
        made_before = max(area.truth("b1"))
        wait_until(lambda: max(area.truth("b1")) >= made_before + 8, 60, "readings made with the broker down")
        waiting = area.spooled("b1")
        assert len(waiting) >= 8 and waiting == list(range(waiting[0], waiting[-1] + 1))
        again = start_mosquitto(tmp_path / "broker-again", port=broker.port)
        area.wait_meters_done(180)
        assert area.stop_gateway() == 0
        area.assert_complete_and_true()
    finally:
        area.cleanup()
        if again is not None:
            again.stop()

    events = log_events(tmp_path / "b1.log")
    assert any(e["ev"] == "uplink_down" for e in events) and sum(e["ev"] == "uplink_up" for e in events) >= 2
    store = GatewayStore(tmp_path / "gateway.db")
    try:
        rows = store.db.execute("SELECT seq, received_at FROM readings WHERE meter = 'b1' ORDER BY seq").fetchall()
        rejected = dict(store.db.execute("SELECT reason, count FROM rejections").fetchall())
    finally:
        store.close()
    assert [s for s, _ in rows] == list(range(1, len(rows) + 1))
    assert [a for _, a in rows] == sorted(a for _, a in rows), "stored in seq order"
    assert len(rows) - stored_before >= 8
    # The restarted broker forgets the gateway's session: what the meter publishes before
    # the gateway is back on it is lost, and later readings arrive ahead of it (refused as
    # seq_gap, never stored) until the meter goes back to its oldest unacked one. Never a
    # fork: nothing the meter resent differed from what it first sent.
    assert not {"prev_mismatch", "equivocation", "replayed_seq"} & set(rejected), rejected
