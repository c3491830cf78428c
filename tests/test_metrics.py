"""Prometheus metrics from real role processes, scraped over loopback HTTP."""

from __future__ import annotations

from gridledger.broker import free_port
from gridledger.metrics import scrape as scrape_metrics
from gridledger.wire import ack_topic, readings_topic

from chainkit import CHAIN, ChainBed
from conftest import MqttProbe
from helpers import wait_until


async def test_gateway_and_validator_export_ingest_and_chain_metrics(tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2"], block_max=4)
    gw_port, v_port = free_port(), free_port()
    bed.cfg.write_text(bed.cfg.read_text() + f"\n[metrics]\nport = {gw_port}\n")
    v0 = bed.validator_cfgs[0]
    v0.write_text(v0.read_text() + f"\n[metrics]\nport = {v_port}\n")
    try:
        for i in range(4):
            bed.start_validator(i)
        bed.start_gateway()
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            for _ in range(3):
                for m, sim in bed.sims.items():
                    await probe.publish(readings_topic(CHAIN, m), sim.next().to_json())
            await probe.publish(readings_topic(CHAIN, "m1"), b"{not json")
            await probe.publish(readings_topic(CHAIN, "m1"), bed.sims["m1"].sent[0].to_json())  # duplicate
            for m in bed.sims:
                await probe.expect(ack_topic(CHAIN, m), lambda b: b["seq"] == 3, timeout=30)
        g = wait_until(lambda: (lambda s: s if s.get("gridledger_chain_height") and
                                s.get("gridledger_chain_uncertified") == 0 else None)(scrape_metrics(gw_port)),
                       30, "the chain metrics to show certified blocks")
        assert g['gridledger_ingest_readings_total{result="accept"}'] == 6
        assert g['gridledger_ingest_readings_total{result="duplicate"}'] == 1
        assert g['gridledger_ingest_readings_total{result="malformed_json"}'] == 1
        assert g['gridledger_ingest_rejections_by_class_total{class="schema"}'] == 1
        assert g['gridledger_ingest_link_io_total{kind="received"}'] == 8  # 6 readings, the bad one, the duplicate
        assert 1 <= g['gridledger_ingest_link_io_total{kind="reads"}'] <= 8 + 4  # + CONNACK, SUBACK, PINGRESPs
        assert g["gridledger_ingest_batches_total"] >= 1
        assert g['gridledger_chain_events_total{event="certified"}'] == g["gridledger_chain_height"] >= 2
        assert g["gridledger_chain_cert_latency_seconds"] > 0
        v = wait_until(lambda: (lambda s: s if s["gridledger_validator_height"] == g["gridledger_chain_height"]
                                else None)(scrape_metrics(v_port)), 30, "v0's height")
        assert v['gridledger_validator_events_total{event="voted"}'] >= g["gridledger_chain_height"]
    finally:
        bed.cleanup()
