"""Storage nodes in process: admission of certified headers and bodies, the store,
receipts, audit answers, chunked transfer and the request/response formats."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import pytest

from aggregator.admission import admit_body, admit_header
from aggregator.receipts import (AuditAnswer, StorageReceipt, answer_audit, check_audit, sign_receipt,
                                 verify_receipt)
from aggregator.storageserve import StorageServer
from aggregator.storagestore import StorageStore
from aggregator.storagewire import (BODIES_MAX, CHUNK_MIN, Reassembly, StorageError, chunk_count, chunk_of,
                                    decode_body, encode_body, encode_request, parse_placement, parse_request,
                                    parse_response, encode_response, split_bodies)
from certlog import bls
from certlog.block import Certificate, ChainError, Header
from certlog.light import LightClient

from storagekit import make_chain, sign

NODE_SK = bls.KeyGen(b"storage-node-s1" + bytes(17))
NODE_PK = bls.SkToPk(NODE_SK)


@pytest.fixture(scope="module")
def chain():
    return make_chain(4, 7)


@pytest.fixture
def store(tmp_path):
    s = StorageStore(tmp_path / "s.db")
    yield s
    s.close()


def _keep(store, vset, block) -> None:
    """What a node does with a block: admit header and body, then store them."""
    admit_header(vset, "area1", block.header, block.cert)
    admit_body(block.header, block.txs)
    store.put_header(block.header, block.cert)
    store.put_body(block.header, block.txs)


# -- admission -------------------------------------------------------------------

def test_a_certified_block_is_admitted_and_stored_whole(chain, store):
    blocks, vset, _ = chain
    for b in blocks:
        _keep(store, vset, b)
    assert store.body_heights() == [1, 2, 3, 4] and store.header_height() == 4
    assert store.body(2) == blocks[1].txs and store.tx(3, 6) == blocks[2].txs[6]
    assert store.put_body(blocks[0].header, blocks[0].txs) is False  # idempotent


def test_a_body_with_one_flipped_byte_is_refused_and_not_stored(chain, store):
    blocks, vset, _ = chain
    b = blocks[0]
    bad = list(b.txs)
    bad[3] = bad[3].replace(b'"i":3', b'"i":4')
    with pytest.raises(ChainError) as exc:
        _keep(store, vset, type(b)(b.header, b.cert, bad))
    assert exc.value.reason == "tx_root_mismatch"
    with pytest.raises(ChainError) as exc:
        admit_body(b.header, b.txs[:-1])
    assert exc.value.reason == "tx_count_mismatch"
    assert store.body_heights() == [] and store.header_height() == 0


@pytest.mark.parametrize("forge, reason", [
    (lambda b, sks: Certificate(b.cert.chain, b.cert.height, b.cert.hash, (0, 1), b.cert.signature), "cert_quorum"),
    (lambda b, sks: sign(sks, b.header, (0, 1)), "cert_quorum"),
    (lambda b, sks: Certificate(b.cert.chain, b.cert.height, b.cert.hash, (0, 1, 3), b.cert.signature),
     "cert_signature"),
    (lambda b, sks: Certificate(b.cert.chain, b.cert.height, "ab" * 32, b.cert.signers, b.cert.signature),
     "cert_mismatch"),
    (lambda b, sks: Certificate(b.cert.chain, b.cert.height, b.cert.hash, (2, 1, 0), b.cert.signature),
     "cert_signers"),
    (lambda b, sks: sign([bls.KeyGen(bytes([9]) * 32)] * 4, b.header), "cert_signature"),
    (lambda b, sks: None, "no_certificate"),
])
def test_a_forged_or_short_certificate_is_refused(chain, store, forge, reason):
    blocks, vset, sks = chain
    b = blocks[1]
    with pytest.raises(ChainError) as exc:
        admit_header(vset, "area1", b.header, forge(b, sks))
    assert exc.value.reason == reason
    assert store.header_height() == 0


def test_a_header_of_another_chain_is_refused_even_when_certified(chain):
    _, vset, sks = chain
    other, _, _ = make_chain(1, 2, chain="area2", sks=sks)
    with pytest.raises(ChainError) as exc:
        admit_header(vset, "area1", other[0].header, other[0].cert)
    assert exc.value.reason == "wrong_chain"


def test_a_second_header_at_a_held_height_is_refused(chain, store):
    blocks, vset, sks = chain
    store.put_header(blocks[0].header, blocks[0].cert)
    twin = Header(**{**blocks[0].header.to_dict(), "time": 5})
    with pytest.raises(ChainError) as exc:
        store.put_header(twin, sign(sks, twin))
    assert exc.value.reason == "conflicting_header"


def test_inventory_ranges_and_what_each_kind_wants(chain, store):
    blocks, vset, _ = chain
    for b in blocks:
        store.put_header(b.header, b.cert)
    for i in (0, 1, 3):
        store.put_body(blocks[i].header, blocks[i].txs)
    assert store.body_ranges() == [(1, 2), (4, 4)] and store.body_ranges(after=2) == [(4, 4)]
    assert store.wanted("full") == [3]
    store.place([3, 4, 9], by="verifier")
    assert store.wanted("heavy") == [3, 9]
    assert store.missing_headers(6) == [5, 6]
    changes = store.conn.total_changes
    store.place([9, 3], by="verifier")                 # sent again until receipted: a read, no write
    assert store.conn.total_changes == changes
    store.place([9, 10, 10], by="verifier")
    assert store.conn.total_changes == changes + 1 and store.wanted("heavy") == [3, 9, 10]


# -- receipts and audit answers --------------------------------------------------

def test_a_receipt_verifies_and_any_change_breaks_it(chain):
    blocks, _, _ = chain
    h = blocks[2].header
    r = sign_receipt(NODE_SK, h, "s1", "full")
    assert verify_receipt(r, NODE_PK, h)
    assert verify_receipt(StorageReceipt.from_dict(r.to_dict()), NODE_PK)
    for field, value in (("height", 2), ("hash", "00" * 32), ("node", "s2"), ("kind", "heavy"), ("chain", "area2")):
        forged = StorageReceipt(**{**{k: getattr(r, k) for k in r.__slots__}, field: value})
        assert not verify_receipt(forged, NODE_PK), field
    assert not verify_receipt(r, bls.SkToPk(bls.KeyGen(bytes(32))))   # someone else's key
    assert not verify_receipt(r, NODE_PK, blocks[1].header)           # another block's receipt
    for bad in ({**r.to_dict(), "sig": "00"}, {**r.to_dict(), "kind": "huge"}, {**r.to_dict(), "x": 1}, []):
        with pytest.raises(ChainError) as exc:
            StorageReceipt.from_dict(bad)
        assert exc.value.reason == "receipt_schema"


def test_an_audit_answer_verifies_against_the_certified_header_and_is_bound_to_its_nonce(chain):
    blocks, _, _ = chain
    b = blocks[1]
    nonce = os.urandom(16).hex()
    a = AuditAnswer.from_dict(answer_audit(NODE_SK, "s1", b.header, b.txs, 5, nonce).to_dict())
    check_audit(a, b.header, nonce=nonce, index=5, node="s1", public_key=NODE_PK)

    def refused(answer, **kw) -> str:
        args = {"nonce": nonce, "index": 5, "node": "s1", "public_key": NODE_PK, **kw}
        with pytest.raises(ChainError) as exc:
            check_audit(answer, kw.pop("header", b.header), **{k: v for k, v in args.items() if k != "header"})
        return exc.value.reason

    assert refused(a, nonce=os.urandom(16).hex()) == "audit_nonce"       # replayed for a new challenge
    assert refused(a, index=4) == "audit_wrong_question"
    assert refused(a, header=blocks[2].header) == "audit_wrong_block"
    assert refused(a, public_key=bls.SkToPk(bls.KeyGen(bytes(32)))) == "audit_signature"
    wrong_tx = AuditAnswer(**{**{k: getattr(a, k) for k in a.__slots__}, "tx": b.txs[4]})
    assert refused(wrong_tx) == "audit_bad_path"
    # a correct tx and path under a signature over another nonce
    other = answer_audit(NODE_SK, "s1", b.header, b.txs, 5, os.urandom(16).hex())
    spliced = AuditAnswer(**{**{k: getattr(a, k) for k in a.__slots__}, "signature": other.signature})
    assert refused(spliced) == "audit_signature"


# -- bodies and chunks -------------------------------------------------------------

def test_a_body_round_trips_through_bytes_and_chunks_reassemble_exactly():
    txs = [os.urandom(n) for n in (0, 1, 700, 5000, 3, 2048)]
    data = encode_body(txs)
    assert decode_body(data) == txs
    cs = CHUNK_MIN
    r = Reassembly(len(data), cs)
    assert r.count == chunk_count(len(data), cs) == -(-len(data) // cs)
    for i in reversed(range(r.count)):
        r.add(i, chunk_of(data, i, cs))
        r.add(i, chunk_of(data, i, cs))  # a duplicate (a retried request) is harmless
    assert r.complete and r.data() == data


def test_a_bad_chunk_is_refused():
    data = encode_body([os.urandom(3000)])
    cs = CHUNK_MIN
    r = Reassembly(len(data), cs)
    with pytest.raises(StorageError, match="bad_chunk"):
        r.add(0, chunk_of(data, 0, cs)[:-1])           # short
    with pytest.raises(StorageError, match="bad_chunk"):
        r.add(r.count, b"x")                            # beyond the end
    r.add(1, chunk_of(data, 1, cs))
    with pytest.raises(StorageError, match="bad_chunk"):
        r.add(1, bytes(cs))                            # a second copy that differs
    with pytest.raises(StorageError, match="bad_chunk"):
        r.data()                                       # incomplete
    for size, chunk in ((0, cs), (2 ** 40, cs), (100, 10), (100, 2 ** 30)):
        with pytest.raises(StorageError, match="bad_chunk"):
            Reassembly(size, chunk)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x02\x00\x00\x00\x01a", b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
                                  b"\x00\x00\x00\x00extra", b"\xff\xff\xff\xff"])
def test_a_malformed_body_is_refused(data):
    with pytest.raises(StorageError) as exc:
        decode_body(data)
    assert exc.value.reason == "body_format"


# -- requests, responses, placements --------------------------------------------------

def test_requests_parse_and_bad_ones_are_refused_with_a_reason():
    req = parse_request(encode_request("7", "s2", "body", height=3, hash="ab" * 32, chunk=0, chunk_size=4096))
    assert (req.id, req.sender, req.op, req.args["height"]) == ("7", "s2", "body", 3)
    assert parse_request(encode_request("8", "s2", "headers", lo=1, hi=10 ** 6)).args["hi"] == 128
    cases = [
        (b"not json", "bad_request", False), (b"[]", "bad_request", False), (b"x" * 5000, "bad_request", False),
        (encode_request("../x", "s2", "inventory"), "bad_request", False),
        (encode_request("1", "s2/#", "inventory"), "bad_request", False),
        (encode_request("1", "s2", "drop_tables"), "unknown_op", True),
        (encode_request("1", "s2", "body", height=0, hash="ab" * 32, chunk=0, chunk_size=4096), "bad_request", True),
        (encode_request("1", "s2", "body", height=1, hash="ab", chunk=0, chunk_size=4096), "bad_request", True),
        (encode_request("1", "s2", "body", height=1, hash="ab" * 32, chunk=0, chunk_size=10 ** 9), "bad_request",
         True),
        (encode_request("1", "s2", "tx", height=1, index=-1), "bad_request", True),
        (encode_request("1", "s2", "tx", height="1", index=0), "bad_request", True),
        (encode_request("1", "s2", "audit", height=1, index=0, nonce="short"), "bad_request", True),
        (encode_request("1", "s2", "headers", lo=5, hi=4), "bad_request", True),
    ]
    for payload, reason, answerable in cases:
        with pytest.raises(StorageError) as exc:
            parse_request(payload)
        assert exc.value.reason == reason, payload
        assert (getattr(exc.value, "request", None) is not None) == answerable, payload


def test_responses_carry_json_then_raw_bytes():
    meta, data = parse_response(encode_response({"id": "1", "ok": True}, b"\n\x00raw\n"))
    assert meta == {"id": "1", "ok": True} and data == b"\n\x00raw\n"
    assert parse_response(encode_response({"id": "2"})) == ({"id": "2"}, b"")
    for bad in (b"", b"{}", b"[1]\nxx", b'{"id": 1}'):
        with pytest.raises(StorageError):
            parse_response(bad)


def test_placements_parse_and_bad_ones_are_refused():
    assert parse_placement(b'{"heights":[5,3,5],"by":"verifier"}').heights == (3, 5)
    for bad in (b"{}", b'{"heights":[]}', b'{"heights":[0]}', b'{"heights":[1],"block":{}}', b'{"block":1}',
                b'{"heights":["1"]}', b"nope"):
        with pytest.raises(StorageError) as exc:
            parse_placement(bad)
        assert exc.value.reason == "bad_placement"


# -- serving ------------------------------------------------------------------------

def _ask(server, op, **args):
    return parse_response(server.answer(parse_request(encode_request("r1", "s9", op, **args))))


@pytest.fixture
def server(chain, store):
    blocks, vset, _ = chain
    for b in blocks:
        store.put_header(b.header, b.cert)
    for b in blocks[:3]:
        store.put_body(b.header, b.txs)
    return StorageServer(store, node="s1", kind="heavy", secret_key=NODE_SK)


def test_a_node_serves_inventory_headers_and_transactions_that_verify(chain, server):
    blocks, vset, _ = chain
    meta, _ = _ask(server, "inventory")
    assert (meta["ok"], meta["height"], meta["bodies"], meta["kind"]) == (True, 4, [[1, 3]], "heavy")
    meta, _ = _ask(server, "headers", lo=2, hi=9)
    got = [(Header.from_dict(x["header"]), Certificate.from_dict(x["cert"])) for x in meta["headers"]]
    assert [h.height for h, _ in got] == [2, 3, 4]
    for h, c in got:
        admit_header(vset, "area1", h, c)
    meta, _ = _ask(server, "tx", height=2, index=6)
    light = LightClient("area1", vset)
    for b in blocks[:2]:
        light.add(b.header, b.cert)
    light.verify_tx(2, bytes.fromhex(meta["tx"]), 6, meta["path"])


def test_an_audit_is_answered_with_a_signed_verifiable_answer(chain, server):
    blocks, _, _ = chain
    nonce = os.urandom(16).hex()
    meta, _ = _ask(server, "audit", height=3, index=2, nonce=nonce)
    check_audit(AuditAnswer.from_dict(meta["answer"]), blocks[2].header, nonce=nonce, index=2, node="s1",
                public_key=NODE_PK)


def test_a_body_is_served_in_chunks_that_reassemble_to_it(chain, server):
    blocks, _, _ = chain
    b = blocks[1]
    meta, first = _ask(server, "body", height=2, hash=b.header.hash, chunk=0, chunk_size=CHUNK_MIN)
    r = Reassembly(meta["size"], CHUNK_MIN)
    assert meta["chunks"] == r.count >= 1
    r.add(0, first)
    for i in r.missing():
        m, d = _ask(server, "body", height=2, hash=b.header.hash, chunk=i, chunk_size=CHUNK_MIN)
        r.add(m["chunk"], d)
    assert decode_body(r.data()) == b.txs


def test_small_bodies_are_served_whole_several_to_a_response_within_the_chunk_size(chain, server):
    blocks, _, _ = chain
    want = [[b.header.height, b.header.hash] for b in blocks]   # 4 is a header only: missing
    meta, data = _ask(server, "bodies", want=want, chunk_size=256 * 1024)
    got = split_bodies(meta["bodies"], data, [1, 2, 3, 4])
    assert [(h, decode_body(raw)) for h, raw in got] == [(b.header.height, b.txs) for b in blocks[:3]]
    assert (meta["missing"], meta["large"]) == ([4], [])
    one = len(encode_body(blocks[0].txs))
    assert one <= CHUNK_MIN < 2 * one   # so a 1 KiB limit holds one body per response
    meta, data = _ask(server, "bodies", want=want[:3], chunk_size=CHUNK_MIN)
    assert [h for h, _ in meta["bodies"]] == [1] and len(data) <= CHUNK_MIN   # the rest: asked again


def test_a_body_larger_than_the_chunk_size_is_named_large_and_a_wrong_hash_missing(chain, store):
    blocks, _, _ = chain
    big = make_chain(1, 40, tx_bytes=100)[0][0]   # ~6 KB: more than one 1 KiB chunk
    store.put_header(big.header, big.cert)
    store.put_body(big.header, big.txs)
    server = StorageServer(store, node="s1", kind="heavy", secret_key=NODE_SK)
    meta, data = _ask(server, "bodies", want=[[1, big.header.hash], [1, "ab" * 32]], chunk_size=CHUNK_MIN)
    assert meta["ok"] and (meta["bodies"], meta["large"], data) == ([], [1], b"")
    meta, _ = _ask(server, "bodies", want=[[1, "ab" * 32]], chunk_size=CHUNK_MIN)
    assert meta["missing"] == [1]


@pytest.mark.parametrize("want", [[], [[1]], [[1, "ab"]], [[0, "ab" * 32]], [["1", "ab" * 32]],
                                  [[h, "ab" * 32] for h in range(1, BODIES_MAX + 2)]])
def test_a_bad_bodies_request_is_refused(want):
    with pytest.raises(StorageError) as exc:
        parse_request(encode_request("r1", "s9", "bodies", want=want, chunk_size=CHUNK_MIN))
    assert exc.value.reason == "bad_request"


@pytest.mark.parametrize("listed, data", [
    ([[1, 4]], b"12345"),               # bytes after the last body
    ([[1, 5]], b"1234"),                # longer than the data
    ([[3, 4]], b"1234"),                # a height not asked
    ([[1, 4], [1, 4]], b"12341234"),    # twice
    ([[1, 2]], b"12"),                  # shorter than a body's count
    ({"1": 4}, b"1234"),
])
def test_a_bodies_response_that_does_not_add_up_is_refused(listed, data):
    with pytest.raises(StorageError) as exc:
        split_bodies(listed, data, [1, 2])
    assert exc.value.reason in ("bad_chunk", "bad_response")


def test_bodies_kept_together_commit_together_and_a_held_one_is_skipped(chain, store):
    blocks, _, _ = chain
    for b in blocks:
        store.put_header(b.header, b.cert)
    store.put_body(blocks[1].header, blocks[1].txs)
    assert store.put_bodies([(b.header, b.txs) for b in blocks]) == [1, 3, 4]
    assert store.body_heights() == [1, 2, 3, 4] and all(store.body(b.header.height) == b.txs for b in blocks)
    # a disk that fails on the second body of a batch: the first is not kept either
    store.conn.execute("CREATE TRIGGER fail BEFORE INSERT ON storage_bodies WHEN NEW.height = 6 "
                       "BEGIN SELECT RAISE(ABORT, 'disk'); END")
    at = [dataclasses.replace(blocks[0].header, height=h) for h in (5, 6)]
    with pytest.raises(sqlite3.IntegrityError):
        store.put_bodies([(h, blocks[0].txs) for h in at])
    assert not store.has_body(5) and store.body(5) is None and store.tx(5, 0) is None


@pytest.mark.parametrize("op, args, reason", [
    ("body", {"height": 4, "chunk": 0, "chunk_size": CHUNK_MIN}, "not_held"),       # header only
    ("body", {"height": 2, "hash": "ab" * 32, "chunk": 0, "chunk_size": CHUNK_MIN}, "not_held"),
    ("body", {"height": 2, "chunk": 99, "chunk_size": CHUNK_MIN}, "no_such_chunk"),
    ("tx", {"height": 9, "index": 0}, "unknown_height"),
    ("tx", {"height": 2, "index": 7}, "no_such_tx"),
    ("audit", {"height": 4, "index": 0, "nonce": "00" * 16}, "not_held"),
])
def test_a_request_for_what_is_not_there_gets_a_typed_error(chain, server, op, args, reason):
    blocks, _, _ = chain
    if op == "body" and "hash" not in args:
        args = {**args, "hash": blocks[args["height"] - 1].header.hash}
    meta, data = _ask(server, op, **args)
    assert (meta["ok"], meta["error"], meta["id"], data) == (False, reason, "r1", b"")


def test_catch_up_spreads_bodies_over_every_holder_and_tries_a_bad_peer_last():
    from aggregator.catchup import Inventory, assign
    invs = [Inventory("s1", 9, ((1, 9),)), Inventory("s2", 9, ((1, 4), (6, 9))), Inventory("s3", 9, ((9, 9),))]
    plan = assign([1, 2, 5, 9, 12], invs)
    assert plan[1] == ["s1", "s2"] and plan[2] == ["s2", "s1"] and plan[5] == ["s1"] and 12 not in plan
    assert {peers[0] for peers in plan.values()} == {"s1", "s2"}
    assert plan[9][0] in {"s1", "s2", "s3"} and sorted(plan[9]) == ["s1", "s2", "s3"]
    assert all(peers[-1] == "s2" for h, peers in assign([1, 2, 3], invs, demoted={"s2"}).items())


def test_batches_keep_each_peer_busy_up_to_its_window_and_stay_within_the_batch_size():
    from aggregator.catchup import _batches
    plan = {h: ["s1"] for h in range(1, 9)} | {h: ["s2", "s1"] for h in range(20, 50)} | {99: ["s3"]}
    got = _batches(plan, 12, 4)
    by_peer = {}
    for peer, hs in got:
        by_peer.setdefault(peer, []).append(hs)
    assert by_peer["s1"] == [[1, 2], [3, 4], [5, 6], [7, 8]]     # 8 heights: 4 requests in flight, not 1
    assert len(by_peer["s2"]) == 4 and all(len(hs) <= 12 for hs in by_peer["s2"])
    assert sorted(h for hs in by_peer["s2"] for h in hs) == list(range(20, 50)) and by_peer["s3"] == [[99]]
    assert _batches(plan, 12) == [("s1", list(range(1, 9))), ("s2", list(range(20, 30))),
                                  ("s2", list(range(30, 40))), ("s2", list(range(40, 50))), ("s3", [99])]
