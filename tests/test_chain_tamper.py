"""Tampered blocks: one byte in a body, a header field or a certificate is caught
by `chain verify` and by light clients, each with its exact reason."""

from __future__ import annotations

import json

import pytest

from aggregator.areaapp import AccountState, account_key
from certlog import merkle
from certlog.audit import verify_store
from certlog.block import Certificate, ChainError, Header
from certlog.light import LightClient
from trie import HexaryTrie

from chainkit import CHAIN, certify, make_area, replica, txs_of, validator_keys, validator_set, voters


@pytest.fixture
def chain(tmp_path):
    """Five certified blocks of readings from three meters, in a proposer's SQLite store."""
    sks = validator_keys(4)
    area = make_area(["m1", "m2", "m3"])
    vs = voters(tmp_path, area, sks)
    prop = replica(tmp_path / "gw.db", area, validator_set(sks))
    for _ in range(5):
        certify(prop, vs, txs_of(m.next(wh=10) for m in area.meters.values() for _ in range(2)), voting=vs[:3])
    return prop, area, sks


def _audit(prop, area, sks):
    return verify_store(prop.store.conn, CHAIN, area.app(), validator_set(sks))


def test_an_untampered_chain_verifies(chain):
    prop, area, sks = chain
    report = _audit(prop, area, sks)
    assert report.ok and report.certified == 5 and report.txs == 30


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


@pytest.mark.parametrize("where, reason", [
    ("body_byte_in_signature", "tx_root_mismatch"),
    ("body_reordered", "tx_root_mismatch"),
    ("header_state_root", "cert_mismatch"),
    ("header_time", "cert_mismatch"),
    ("header_not_canonical", "header_schema"),
    ("cert_signature_byte", "cert_signature"),
    ("cert_signers", "cert_signature"),
    ("cert_dropped_signer", "cert_quorum"),
    ("block_deleted", "missing_block"),
])
def test_chain_verify_reports_the_first_fault_exactly(chain, where, reason):
    prop, area, sks = chain
    c = prop.store.conn
    h = 3
    header, cert = c.execute("SELECT header, cert FROM chain_blocks WHERE height = ?", (h,)).fetchone()
    if where == "body_byte_in_signature":
        data = c.execute("SELECT data FROM chain_txs WHERE height = ? AND idx = 2", (h,)).fetchone()[0]
        c.execute("UPDATE chain_txs SET data = ? WHERE height = ? AND idx = 2", (_flip(data, len(data) - 5), h))
    elif where == "body_reordered":
        c.execute("UPDATE chain_txs SET idx = -1 WHERE height = ? AND idx = 0", (h,))
        c.execute("UPDATE chain_txs SET idx = 0 WHERE height = ? AND idx = 1", (h,))
        c.execute("UPDATE chain_txs SET idx = 1 WHERE height = ? AND idx = -1", (h,))
    elif where.startswith("header_"):
        obj = json.loads(header)
        if where == "header_state_root":
            obj["state_root"] = "00" + obj["state_root"][2:]
        elif where == "header_time":
            obj["time"] += 1
        new = Header.from_dict(obj).encode() if where != "header_not_canonical" else header.replace(b",", b", ", 1)
        c.execute("UPDATE chain_blocks SET header = ? WHERE height = ?", (new, h))
    else:
        obj = json.loads(cert)
        if where == "cert_signature_byte":
            obj["sig"] = obj["sig"][:10] + ("0" if obj["sig"][10] != "0" else "1") + obj["sig"][11:]
        elif where == "cert_signers":
            obj["signers"] = [0, 1, 3]
        elif where == "cert_dropped_signer":
            obj["signers"] = [0, 1]
        if where == "block_deleted":
            c.execute("DELETE FROM chain_blocks WHERE height = ?", (h,))
        else:
            c.execute("UPDATE chain_blocks SET cert = ? WHERE height = ?", (json.dumps(obj).encode(), h))
    report = _audit(prop, area, sks)
    assert not report.ok
    assert (report.fault.reason, report.fault.height, report.certified) == (reason, h, h - 1)


def test_a_body_tampered_into_another_valid_reading_is_caught_by_reexecution(chain, tmp_path):
    """Recompute tx_root over a body whose reading was swapped for a validly signed
    reading with a different ciphertext: roots are then consistent, the app is not."""
    prop, area, sks = chain
    c = prop.store.conn
    h = 5
    m1 = area.meters["m1"]
    forged = m1.next(wh=999_999)  # a genuine signature, but seq and prev break the chain
    txs = [r[0] for r in c.execute("SELECT data FROM chain_txs WHERE height = ? ORDER BY idx", (h,))]
    txs[0] = forged.to_json()
    c.execute("UPDATE chain_txs SET data = ? WHERE height = ? AND idx = 0", (txs[0], h))
    obj = json.loads(c.execute("SELECT header FROM chain_blocks WHERE height = ?", (h,)).fetchone()[0])
    obj["tx_root"] = merkle.root(txs)
    c.execute("UPDATE chain_blocks SET header = ? WHERE height = ?", (Header.from_dict(obj).encode(), h))
    report = _audit(prop, area, sks)
    assert report.fault.reason == "cert_mismatch"  # the certificate pins the original header
    # Even with the certificate ignored (a colluding quorum), re-execution refuses the block.
    rep = replica(tmp_path / "fresh.db", area, validator_set(sks))
    for height in range(1, h):
        raw = prop.store.raw_block(height)
        rep.commit(Header.decode(raw[0]), raw[2], Certificate.from_dict(json.loads(raw[1])))
    with pytest.raises(ChainError) as e:
        rep.check(Header.from_dict(obj), txs)
    assert e.value.reason == "tx_seq_gap"


def _light(prop, sks) -> LightClient:
    lc = LightClient(CHAIN, validator_set(sks))
    for height in prop.store.heights():
        raw = prop.store.raw_block(height)
        lc.add(Header.decode(raw[0]), Certificate.from_dict(json.loads(raw[1])))
    return lc


def test_light_client_verifies_inclusion_and_account_state(chain):
    prop, area, sks = chain
    lc = _light(prop, sks)
    assert lc.height == 5
    txs = prop.store.txs(4)
    for i, tx in enumerate(txs):
        lc.verify_tx(4, tx, i, merkle.path(txs, i))
    with pytest.raises(ChainError) as e:
        lc.verify_tx(4, _flip(txs[1], 40), 1, merkle.path(txs, 1))
    assert e.value.reason == "bad_merkle_path"
    # The account's state at height 5 from an MPT proof against the certified state root.
    key = account_key("acct-m2")
    proof = HexaryTrie(prop.store.nodes, root_hash=bytes.fromhex(lc.header(5).state_root)).get_proof(key)
    st = AccountState.decode(lc.verify_state(5, key, proof))
    assert (st.meter, st.seq, st.count) == ("m2", 10, 10) and st.hash == area.meters["m2"].prev
    # ... and an older state at height 2 against that height's root.
    old = HexaryTrie(prop.store.nodes, root_hash=bytes.fromhex(lc.header(2).state_root)).get_proof(key)
    assert AccountState.decode(lc.verify_state(2, key, old)).seq == 4
    with pytest.raises(ChainError) as e:  # a proof for height 2 does not prove height 5
        lc.verify_state(5, key, old)
    assert e.value.reason == "bad_state_proof"


@pytest.mark.parametrize("what, reason", [
    ("header_field", "cert_mismatch"), ("cert_byte", "cert_signature"), ("skip", "wrong_height"),
    ("prev", "prev_mismatch"),
])
def test_light_client_refuses_tampered_headers(chain, what, reason):
    prop, area, sks = chain
    lc = LightClient(CHAIN, validator_set(sks))
    blocks = []
    for height in prop.store.heights():
        raw = prop.store.raw_block(height)
        blocks.append((Header.decode(raw[0]), Certificate.from_dict(json.loads(raw[1]))))
    lc.add(*blocks[0])
    header, cert = blocks[1]
    if what == "header_field":
        header = Header(**{**header.to_dict(), "app": {**header.app, "readings": 7}})
    elif what == "cert_byte":
        cert = Certificate(cert.chain, cert.height, cert.hash, cert.signers, _flip(cert.signature, 50))
    elif what == "skip":
        header, cert = blocks[2]
    elif what == "prev":
        header = Header(**{**header.to_dict(), "prev": "ab" * 32})
    with pytest.raises(ChainError) as e:
        lc.add(header, cert)
    assert e.value.reason == reason
    assert lc.height == 1
