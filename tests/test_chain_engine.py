"""The certified-log engine in process: build, vote, certify, commit, refuse."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from certlog import bls, merkle
from certlog.block import Certificate, ChainError, Header, Vote, cert_message
from certlog.proposer import Proposer
from chainkit import certify, make_area, replica, txs_of, validator_keys, validator_set, voters


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_blocks_certify_and_every_replica_agrees(tmp_path):
    sks = validator_keys(4)
    area = make_area(["m1", "m2", "m3"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    for _ in range(3):
        txs = txs_of(m.next(wh=50 + i) for m in area.meters.values() for i in range(3))
        header, cert = certify(prop, vs, txs)
        assert cert.signers == (0, 1, 2)  # all four voted; the first quorum is aggregated
    assert prop.height == 3 and {v.replica.state_root for v in vs} == {prop.state_root}
    assert header.app["readings"] == 9 and header.txs == 9
    # Restart: a replica reopened from disk resumes at its last certified block.
    again = replica(tmp_path / "v0.db", area, validator_set(sks))
    assert again.head == vs[0].replica.head


def test_validator_signs_a_height_once_even_after_restart(tmp_path):
    sks = validator_keys(4)
    area = make_area(["m1"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    txs = txs_of([area.meters["m1"].next()])
    a = prop.build(txs)
    vote = vs[0].vote(a, txs)
    assert vs[0].vote(a, txs).signature == vote.signature  # idempotent
    b = Header(**{**a.to_dict(), "time": a.time + 1})  # same block, another header
    with pytest.raises(ChainError) as e:
        vs[0].vote(b, txs)
    assert e.value.reason == "conflicting_header"
    reopened = voters(tmp_path, area, sks)[0]  # the promise is on disk
    with pytest.raises(ChainError) as e:
        reopened.vote(b, txs)
    assert e.value.reason == "conflicting_header"


@pytest.mark.parametrize("mutate, reason", [
    (lambda h, t: (Header(**{**h.to_dict(), "state_root": "ab" * 32}), t), "state_root_mismatch"),
    (lambda h, t: (Header(**{**h.to_dict(), "app": {**h.app, "total": "2"}}), t), "app_fields_mismatch"),
    (lambda h, t: (Header(**{**h.to_dict(), "prev": "cd" * 32}), t), "prev_mismatch"),
    (lambda h, t: (Header(**{**h.to_dict(), "height": 2}), t), "wrong_height"),
    (lambda h, t: (h, t[:-1]), "tx_count_mismatch"),
    (lambda h, t: (h, [t[1], t[0]] + t[2:]), "tx_root_mismatch"),
])
def test_validators_refuse_bad_proposals(tmp_path, mutate, reason):
    sks = validator_keys(4)
    area = make_area(["m1", "m2"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    txs = txs_of([area.meters["m1"].next(), area.meters["m2"].next()])
    header, bad_txs = mutate(prop.build(txs), txs)
    with pytest.raises(ChainError) as e:
        vs[1].vote(header, bad_txs)
    assert e.value.reason == reason
    assert vs[1].replica.store.vote_for(1) is None  # nothing promised for a refused block


def test_forged_reading_in_a_proposal_is_caught_by_validators(tmp_path):
    """The proposer skips signature checks (done at ingest); validators never do."""
    sks = validator_keys(4)
    area = make_area(["m1"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    r = area.meters["m1"].next()
    forged = r.to_json().replace(r.sig.encode(), (("0" if r.sig[0] != "0" else "1") + r.sig[1:]).encode())
    header = prop.build([forged])
    with pytest.raises(ChainError) as e:
        vs[0].vote(header, [forged])
    assert e.value.reason == "tx_bad_signature"


def test_certificates_need_a_quorum_of_valid_distinct_signers(tmp_path):
    sks = validator_keys(4)
    vset = validator_set(sks)
    area = make_area(["m1"])
    prop = replica(tmp_path / "gw.db", area, vset)
    txs = txs_of([area.meters["m1"].next()])
    h = prop.build(txs)
    msg = cert_message(h.chain, h.height, h.hash)
    sigs = [bls.Sign(sk, msg) for sk in sks]

    def cert(signers, sig=None):
        return Certificate(h.chain, h.height, h.hash, tuple(signers),
                           sig or bls.Aggregate([sigs[i] for i in signers]))

    vset.check_certificate(cert([0, 1, 3]), h)
    for c, reason in [(cert([0, 1]), "cert_quorum"), (cert([1, 0, 2]), "cert_signers"),
                      (cert([0, 0, 1]), "cert_signers"), (cert([0, 1, 9], sigs[0]), "cert_signers"),
                      (cert([0, 1, 2], bls.Aggregate(sigs[:2] + [sigs[3]])), "cert_signature")]:
        with pytest.raises(ChainError) as e:
            vset.check_certificate(c, h)
        assert e.value.reason == reason
    other = Header(**{**h.to_dict(), "time": h.time + 1})
    with pytest.raises(ChainError) as e:
        vset.check_certificate(cert([0, 1, 2]), other)
    assert e.value.reason == "cert_mismatch"
    assert not vset.check_vote(Vote(h.chain, h.height, h.hash, 1, sigs[2]))


def test_a_remembered_certificate_never_vouches_for_a_forged_one(tmp_path, monkeypatch):
    checks = []
    real = bls.FastAggregateVerify
    monkeypatch.setattr(bls, "FastAggregateVerify", lambda *a: checks.append(1) or real(*a))
    sks = validator_keys(4)
    vset = validator_set(sks)
    area = make_area(["m1"])
    h = replica(tmp_path / "gw.db", area, vset).build(txs_of([area.meters["m1"].next()]))
    msg = cert_message(h.chain, h.height, h.hash)
    sigs = [bls.Sign(sk, msg) for sk in sks]
    good = Certificate(h.chain, h.height, h.hash, (0, 1, 2), bls.Aggregate(sigs[:3]))
    forged = [Certificate(h.chain, h.height, h.hash, (0, 1, 2), bls.Aggregate(sigs[:2] + [sigs[3]])),
              Certificate(h.chain, h.height, h.hash, (0, 1, 3), good.signature),   # same signature, other signers
              Certificate(h.chain, h.height, h.hash, (0, 1, 2),
                          bls.Aggregate([bls.Sign(sk, msg) for sk in validator_keys(7)[4:]]))]  # outsiders
    for _ in range(2):  # verified the first time, remembered the second
        vset.check_certificate(good, h, remember=True)
    assert len(checks) == 1
    for c in forged * 2:  # never remembered, refused every time, each time after a pairing check
        with pytest.raises(ChainError) as e:
            vset.check_certificate(c, h, remember=True)
        assert e.value.reason == "cert_signature"
    assert len(checks) == 1 + 2 * len(forged)
    other = Header(**{**h.to_dict(), "time": h.time + 1})
    with pytest.raises(ChainError) as e:  # the remembered certificate on another header: still a mismatch
        vset.check_certificate(good, other, remember=True)
    assert e.value.reason == "cert_mismatch"


def test_header_encoding_is_canonical_and_strict():
    h = Header(chain="a", height=1, prev="0" * 64, time=5, tx_root=merkle.EMPTY_ROOT, state_root="1" * 64,
               txs=0, app={"x": 1})
    assert Header.decode(h.encode()) == h
    with pytest.raises(ChainError):
        Header.decode(h.encode().replace(b":", b": ", 1))
    for bad in [b"[]", b"{}", b"\xff", h.encode().replace(b'"height":1', b'"height":true')]:
        with pytest.raises(ChainError):
            Header.decode(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13])
def test_merkle_paths_verify_and_catch_tampering(n):
    txs = [f"tx{i}".encode() for i in range(n)]
    root = merkle.root(txs)
    for i in range(n):
        p = merkle.path(txs, i)
        assert merkle.verify_path(root, txs[i], i, n, p)
        assert not merkle.verify_path(root, txs[i] + b"x", i, n, p)
        if n > 1:
            assert not merkle.verify_path(root, txs[i], (i + 1) % n, n, p)


def test_cli_builds_a_validator_set_with_proofs_of_possession(tmp_path):
    import os
    from certlog.validators import load_validator_set
    from gridledger.cli import main
    vs = tmp_path / "validators.toml"
    for name in ["v0", "v1", "v2", "v3"]:
        assert main(["keys", "validator", "--name", name, "--out", str(tmp_path / "keys"), "--set", str(vs)]) == 0
    assert main(["keys", "validator", "--name", "gw", "--out", str(tmp_path / "keys"), "--set", str(vs),
                 "--proposer"]) == 0
    vset = load_validator_set(vs)
    assert (vset.n, vset.f, vset.quorum, vset.proposer.name) == (4, 1, 3, "gw")
    assert os.stat(tmp_path / "keys" / "v0.bls.key").st_mode & 0o777 == 0o600
    # refusals: a second proposer, a duplicate name, an existing key file
    assert main(["keys", "validator", "--name", "gw2", "--out", str(tmp_path / "keys"), "--set", str(vs),
                 "--proposer"]) == 2
    assert main(["keys", "validator", "--name", "v1", "--out", str(tmp_path / "k2"), "--set", str(vs)]) == 2
    assert main(["keys", "validator", "--name", "v0", "--out", str(tmp_path / "keys")]) == 2
    # a tampered proof of possession is refused when the set is loaded
    text = vs.read_text()
    pop = text.split('pop = "')[2][:8]
    vs.write_text(text.replace(pop, "00000000" if pop != "00000000" else "11111111", 1))
    from gridledger.errors import ConfigError
    with pytest.raises(ConfigError):
        load_validator_set(vs)


def test_a_queue_of_records_is_proposed_in_order_and_a_refused_one_is_dropped(tmp_path):
    """Proposer.prepare_queued: queued records become the next block, marked proposed in
    its transaction; a record the app refuses (a bug upstream) is marked refused and
    counted, the block is built without it; certify_queued marks what is certified."""
    area = make_area(["m1"])
    sks = validator_keys()
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "p.db", area, validator_set(sks))
    conn = prop.store.conn
    conn.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                 "tx BLOB NOT NULL, status TEXT NOT NULL, height INTEGER)")
    good = txs_of([area.meters["m1"].next() for _ in range(3)])
    queued = [good[0], b'{"not": "a reading"}', good[1], good[2]]
    conn.executemany("INSERT INTO q(id, tx, status) VALUES (?, ?, 'queued')",
                     [(f"r{i}", tx) for i, tx in enumerate(queued)])

    async def publish(topic, payload):
        pass

    counts: Counter[str] = Counter()
    p = Proposer(prop, publish, 0)
    header, txs = p.prepare_queued("q", 10, counts)
    assert txs == good and header.height == 1 and sum(counts.values()) == 1
    assert {r[0]: r[1] for r in conn.execute("SELECT id, status FROM q")} == {
        "r0": "proposed", "r1": "refused", "r2": "proposed", "r3": "proposed"}
    assert [r[0] for r in conn.execute("SELECT id FROM q WHERE status = 'refused'")] == ["r1"]
    assert p.certify_queued("q") == []                                   # proposed, not certified yet
    cert = prop.validators.aggregate([v.vote(header, txs) for v in vs])
    prop.commit(header, txs, cert, stored=True)   # as Proposer.certify does once 2f+1 have voted
    assert sorted(p.certify_queued("q")) == [("r0", 1), ("r2", 1), ("r3", 1)]
    assert p.prepare_queued("q", 10, counts) is None


async def test_the_proposer_verifies_a_quorum_once_and_falls_back_vote_by_vote(tmp_path, monkeypatch):
    """Proposer.certify: 2f+1 votes are checked as one aggregate (and the commit does not
    check that certificate again). A garbage vote, even one claiming an honest validator's
    index and arriving first, makes it verify vote by vote: the garbage is counted and
    dropped, the honest votes certify, and a late vote is still judged."""
    import asyncio
    from certlog.net import decode_block
    area = make_area(["m1"])
    sks = validator_keys(4)
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "p.db", area, validator_set(sks))
    aggregate_checks = Counter()
    real_aggregate, real_verify = bls.FastAggregateVerify, bls.Verify
    monkeypatch.setattr(bls, "FastAggregateVerify", lambda *a: aggregate_checks.update(["n"]) or real_aggregate(*a))
    monkeypatch.setattr(bls, "Verify", lambda *a: aggregate_checks.update(["one"]) or real_verify(*a))
    sent = []

    async def publish(topic, payload):
        sent.append((topic, payload))

    p = Proposer(prop, publish, bls.KeyGen(b"proposer key material, 32 bytes!"))

    def vote_msg(vote):
        return json.dumps(vote.to_dict()).encode()

    async def round_(garbage_first: bool):
        txs = txs_of([area.meters["m1"].next()])
        header = p.prepare(txs)
        task = asyncio.create_task(p.certify(header, txs))
        for _ in range(100):  # until the proposal is out
            if sent and decode_block(sent[-1][1]).header.height == header.height:
                break
            await asyncio.sleep(0.01)
        votes = [v.vote(header, txs) for v in vs]
        if garbage_first:  # "validator 0" signs garbage before the real validator 0 votes
            p.on_vote(vote_msg(Vote(header.chain, header.height, header.hash, 0, votes[3].signature)))
        for vote in votes:
            p.on_vote(vote_msg(vote))
            await asyncio.sleep(0)
        cert = await asyncio.wait_for(task, 10)
        checks = aggregate_checks.copy()
        for v in vs:
            v.replica.commit(header, txs, cert)
        return header, cert, checks

    header, cert, checks = await round_(False)
    # One aggregate check (the proposer's, not its commit's too), one check alone: the late vote's.
    assert checks == {"n": 1, "one": 1} and prop.height == 1
    prop.validators.check_certificate(cert, header)          # and it is a valid certificate
    assert p.counts["vote_bad_signature"] == 0
    header, cert, _ = await round_(True)
    assert prop.height == 2 and cert.signers == (0, 1, 2)
    prop.validators.check_certificate(cert, header)
    assert p.counts["vote_bad_signature"] == 1
    assert p.counts["vote_late"] >= 1                        # the fourth vote, verified and counted
    # A validator's next late votes within LATE_CHECK_S are counted, not verified; after it, verified again.
    late, before = p.counts["vote_late"], aggregate_checks.copy()
    _, _, checks = await round_(False)
    assert p.counts["vote_late_unverified"] == 1 and p.counts["vote_late"] == late
    assert checks == before + Counter(n=1)  # the aggregate only
    from certlog.proposer import LATE_CHECK_S
    p._late_checked = {k: t - LATE_CHECK_S for k, t in p._late_checked.items()}  # as if LATE_CHECK_S had passed
    await round_(False)
    assert p.counts["vote_late"] == late + 1 and p.counts["vote_late_unverified"] == 1


@settings(max_examples=300, deadline=None)
@given(txs=st.lists(st.text(max_size=40).map(str.encode) | st.binary(max_size=40).filter(_utf8), max_size=6),
       with_cert=st.booleans(), with_sig=st.booleans(), cut=st.integers(min_value=0), flip=st.integers(min_value=0))
def test_a_framed_block_message_round_trips_and_any_damage_is_a_typed_refusal(txs, with_cert, with_sig, cut, flip):
    """encode_block frames the transactions after the canonical JSON of the other fields;
    decode_block gives back exactly what was encoded (also from the JSON form proposers
    wrote before), and a truncated or bit-flipped message is refused with a ChainError
    (or, for a flip inside a transaction, read as that other transaction), never another
    exception."""
    from certlog.block import canonical
    from certlog.net import BODY_MAGIC, decode_block, encode_block
    header = Header("c", 1, "00" * 32, 5, "11" * 32, "22" * 32, len(txs), {"n": 1})
    cert = Certificate("c", 1, header.hash, (0, 1, 2), b"\x07" * 96) if with_cert else None
    sig = b"\x05" * 96 if with_sig else None
    msg = encode_block(header, txs, cert, sig)
    obj = {"header": header.to_dict()}
    if cert is not None:
        obj["cert"] = cert.to_dict()
    if sig is not None:
        obj["proposer_sig"] = sig.hex()
    assert msg.startswith(BODY_MAGIC) and canonical(obj) in msg
    back = decode_block(msg)
    assert (back.header, back.txs, back.cert, back.proposer_sig) == (header, txs, cert, sig)
    legacy = canonical({**obj, "txs": [t.decode("utf-8") for t in txs]})
    assert decode_block(legacy).txs == txs
    cut %= len(msg)
    with pytest.raises(ChainError):
        decode_block(msg[:cut])
    damaged = bytearray(msg)
    damaged[flip % len(msg)] ^= 0x41
    try:
        decode_block(bytes(damaged))
    except ChainError:
        pass


def test_the_trie_node_cache_is_bounded_and_reads_fall_back_to_sqlite(tmp_path):
    """A long-running node's trie cache is dropped once written and over its bound; the
    blocks after it read their nodes back from SQLite and reach the same state roots."""
    sks = validator_keys(4)
    area = make_area(["m1", "m2", "m3"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    prop.store.nodes.CACHE_MAX = 3
    for _ in range(4):
        txs = txs_of(m.next() for m in area.meters.values())
        certify(prop, vs, txs)
        assert len(prop.store.nodes.cache) <= 3 and not prop.store.nodes.pending
    assert {v.replica.state_root for v in vs} == {prop.state_root} and prop.height == 4
