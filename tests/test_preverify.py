"""Pre-verification in process: the bounded cache of verified signatures, what the
stream side accepts and drops, and the block check's use of the cache."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.preverify import PreverifyConfig, Preverifier, VerifiedSignatures, signature_key
from aggregator.registry import MeterEntry, Registry
from aggregator.validator import build_node, load_validator_config
from certlog.block import ChainError
from gridledger.errors import ConfigError
from gridledger.meterkeys import MeterKey
from gridledger.testbed import write_chain
from gridledger.wire import MAX_PAYLOAD, kid_of, readings_topic

from chainkit import CHAIN, Area, make_area, replica, txs_of, validator_keys, validator_set
from helpers import N, SimMeter, make_area as gateway_area


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pre(area: Area, cache: VerifiedSignatures | None = None, clock=None, **cfg) -> Preverifier:
    return Preverifier(CHAIN, lambda: area.registry, kid_of(N), VerifiedSignatures(100) if cache is None else cache,
                       PreverifyConfig(**cfg), clock=clock or Clock())


def _offer(pre: Preverifier, *readings) -> None:
    for r in readings:
        pre.offer(readings_topic(CHAIN, r.meter), r.to_json())


def _flip_sig(r) -> bytes:
    return r.to_json().replace(r.sig.encode(), (("0" if r.sig[0] != "0" else "1") + r.sig[1:]).encode())


def test_the_cache_holds_at_most_its_capacity_and_drops_the_oldest_first():
    cache = VerifiedSignatures(3)
    keys = [bytes([i]) * 32 for i in range(5)]
    for k in keys:
        cache.add(k)
    cache.add(keys[4])  # already there: no second entry, nothing evicted
    assert len(cache) == 3
    assert [k in cache for k in keys] == [False, False, True, True, True]
    with pytest.raises(ValueError):
        VerifiedSignatures(0)
    with pytest.raises(ConfigError):
        PreverifyConfig(queue=0)


def test_the_cache_remembers_only_what_verified():
    cache = VerifiedSignatures(10)
    assert cache.check(b"a" * 32, lambda: False) is False and b"a" * 32 not in cache
    assert cache.check(b"b" * 32, lambda: True) is True and b"b" * 32 in cache
    assert cache.check(b"b" * 32, lambda: pytest.fail("a hit does not verify")) is True
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_key_binds_public_key_reading_hash_and_signature():
    pk, h, sig = "aa" * 32, "bb" * 32, "cc" * 64
    base = signature_key(pk, h, sig)
    assert len({base, signature_key("ab" * 32, h, sig), signature_key(pk, "bc" * 32, sig),
                signature_key(pk, h, "cd" * 64)}) == 4


def test_a_stream_checked_block_skips_only_the_signature_and_still_runs_every_other_check(tmp_path):
    area = make_area(["m1", "m2"])
    sks = validator_keys(4)
    cache = VerifiedSignatures(100)
    pre = _pre(area, cache)
    readings = [area.meters[m].next() for m in ("m1", "m2") for _ in range(3)]
    _offer(pre, *readings)
    pre.step(1.0)
    assert pre.counts == {"verified": 6} and len(cache) == 6
    _offer(pre, readings[0])
    pre.step(1.0)
    assert pre.counts["known"] == 1  # a resend costs no second verify

    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    val = replica(tmp_path / "v0.db", area, validator_set(sks))
    val.app.verified = cache
    txs = txs_of(readings)
    val.check(prop.build(txs), txs)
    assert (cache.hits, cache.misses) == (6, 0)
    # A hit is only the signature: a cached reading out of order still breaks its chain.
    swapped = [txs[1], txs[0]] + txs[2:]
    with pytest.raises(ChainError) as e:
        val.check(prop.build(swapped), swapped)
    assert e.value.reason == "tx_seq_gap"


def test_an_entry_made_under_one_meter_key_does_not_pass_the_same_bytes_under_a_new_key(tmp_path):
    """m1 re-keyed (its registry entry now names another key): the reading that was
    verified under the old key is a miss, verified against the new key, and refused."""
    area = make_area(["m1"])
    cache = VerifiedSignatures(100)
    pre = _pre(area, cache)
    r = area.meters["m1"].next()
    _offer(pre, r)
    pre.step(1.0)
    assert pre.counts == {"verified": 1}
    new_key = MeterKey("m1", b"\x77" * 32)
    rekeyed = Area(area.meters, Registry([MeterEntry("m1", "acct-m1", new_key.public_hex)]))
    sks = validator_keys(4)
    prop = replica(tmp_path / "gw.db", rekeyed, validator_set(sks))
    val = replica(tmp_path / "v0.db", rekeyed, validator_set(sks))
    val.app.verified = cache
    txs = [r.to_json()]
    header = prop.build(txs)  # the proposer trusts its ingest: it builds the block regardless
    with pytest.raises(ChainError) as e:
        val.check(header, txs)
    assert e.value.reason == "tx_bad_signature"
    assert (cache.hits, cache.misses) == (0, 1) and len(cache) == 1
    # and the stream under the new key refuses it too, and caches nothing
    pre2 = _pre(rekeyed, cache)
    _offer(pre2, r)
    pre2.step(1.0)
    assert pre2.counts == {"bad_signature": 1} and len(cache) == 1


def test_the_stream_drops_everything_but_validly_signed_readings_of_registered_meters_with_a_reason():
    area = make_area(["m1", "m2"])
    cache = VerifiedSignatures(100)
    pre = _pre(area, cache)
    m1 = area.meters["m1"]
    good = m1.next()
    stranger = SimMeter(MeterKey("m9", b"\x09" * 32)).next()
    other_kid = SimMeter(MeterKey("m2", bytes([2]) * 32), n=N + 2)  # another Paillier modulus
    t = readings_topic(CHAIN, "m1")
    for topic, payload in [
        (t, b"{not json"),
        (t, b"\xff\xfe garbage"),
        (t, b"x" * (MAX_PAYLOAD + 1)),
        (t, b'{"v":1}'),
        (readings_topic(CHAIN, "m2"), good.to_json()),           # m1's reading under m2's topic
        (readings_topic(CHAIN, "m9"), stranger.to_json()),       # not in the registry
        (readings_topic(CHAIN, "m2"), other_kid.next().to_json()),
        (t, _flip_sig(good)),                                    # one hex digit of the signature changed
        (t, good.to_json()),
    ]:
        pre.offer(topic, payload)
    pre.step(1.0)
    assert pre.counts == {"malformed_json": 2, "oversized": 1, "missing_field": 1, "topic_mismatch": 1,
                          "unknown_meter": 1, "unknown_key_id": 1, "bad_signature": 1, "verified": 1}
    assert len(cache) == 1 and signature_key(m1.key.public_hex, good.hash, good.sig) in cache


def test_stream_work_is_bounded_old_work_is_dropped_and_each_step_keeps_to_its_slice():
    area = make_area(["m1"])
    clock = Clock()
    pre = _pre(area, clock=clock, queue=3, max_age_s=5)
    rs = [area.meters["m1"].next() for _ in range(5)]
    _offer(pre, *rs)
    assert len(pre) == 3 and pre.counts == {"queue_full": 2}  # the two oldest went
    clock.now += 6
    _offer(pre, rs[0])  # full again: rs[2] goes; rs[3] and rs[4] are now too old
    assert pre.step(0.0) == 1  # a zero budget still makes progress: one item per step
    assert pre.counts["stale"] == 1
    pre.step(1.0)
    assert pre.counts == {"queue_full": 3, "stale": 2, "verified": 1} and len(pre) == 0


async def test_the_stream_works_only_while_the_chain_side_is_idle():
    area = make_area(["m1"])
    pre = _pre(area)
    idle = False
    task = asyncio.create_task(pre.work(lambda: idle))
    try:
        _offer(pre, *(area.meters["m1"].next() for _ in range(20)))
        await asyncio.sleep(0.05)
        assert len(pre) == 20 and not pre.counts  # a proposal in hand: nothing done meanwhile
        idle = True
        async with asyncio.timeout(10):
            while len(pre):
                await asyncio.sleep(0.01)
        assert pre.counts == {"verified": 20}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_preverify_table_configures_or_turns_off_the_stream_side(tmp_path):
    gateway_area(tmp_path, ["m1"], host="127.0.0.1", port=1883)
    [cfg] = write_chain(tmp_path, area=CHAIN, host="127.0.0.1", port=1883, validators=1,
                        paillier_public="paillier.pub.json")
    base = cfg.read_text()
    node, _ = build_node(load_validator_config(cfg))
    assert node.side.topics == (f"gl/v1/{CHAIN}/meters/+/readings",) and node.replica.app.verified is node.side.cache
    node.replica.store.conn.close()
    cfg.write_text(base + "\n[preverify]\ncache = 5\nslice_ms = 1.0\n")
    node, _ = build_node(load_validator_config(cfg))
    assert node.side.cache.capacity == 5 and node.side.cfg.slice_ms == 1.0
    node.replica.store.conn.close()
    cfg.write_text(base + "\n[preverify]\nenabled = false\n")
    node, _ = build_node(load_validator_config(cfg))
    assert node.side is None and node.replica.app.verified is None
    node.replica.store.conn.close()
    for bad in ("chache = 5", "queue = 0", "max_age_s = -1"):
        cfg.write_text(base + f"\n[preverify]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_validator_config(cfg)
