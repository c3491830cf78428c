"""certlog.mpt writes, batch by batch, the trie py-trie's HexaryTrie would: the same
roots, and nodes that HexaryTrie reads and proves from (hypothesis, derandomized)."""

from __future__ import annotations

import hashlib
import random

import pytest
import rlp
from hypothesis import HealthCheck, given, settings, strategies as st
from trie import HexaryTrie

from certlog.mpt import BLANK_ROOT, Trie, rlp_decode, rlp_encode

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Short keys share prefixes and end inside other keys' paths (branch values); the app's
# keys are 32-byte hashes.
KEYS = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=3),
                 st.sampled_from([b"\x00", b"\x00\x01", b"\x01", b"\x10", b"\x11", b"\x00" * 32, b"\xff" * 32]))
VALUES = st.binary(min_size=1, max_size=80)  # short values make nodes under 32 bytes: inlined


@SETTINGS
@given(st.lists(st.lists(st.tuples(KEYS, VALUES), max_size=12), min_size=1, max_size=4), st.data())
def test_batches_give_hexary_tries_roots_and_readable_nodes(batches, data):
    ref_db: dict[bytes, bytes] = {}
    db: dict[bytes, bytes] = {}
    ref_root = root = BLANK_ROOT
    model: dict[bytes, bytes] = {}
    for batch in batches:
        ref, ours = HexaryTrie(ref_db, ref_root), Trie(db, root)
        for key, value in batch:
            if data.draw(st.booleans()):  # reads between writes see the writes so far
                probe = data.draw(KEYS)
                assert ours.get(probe) == model.get(probe, b"")
            ref.set(key, value)
            ours.set(key, value)
            model[key] = value
        ref_root, root = ref.root_hash, ours.commit()
        assert root == ref_root
        reader = HexaryTrie(db, root)
        for key, value in model.items():
            assert reader.get(key) == value
            assert HexaryTrie.get_from_proof(root, key, reader.get_proof(key)) == value
            assert Trie(db, root).get(key) == value


def test_a_large_trie_over_many_batches_matches_and_stores_only_live_nodes():
    rng = random.Random(5)
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(3000)]
    ref_db: dict[bytes, bytes] = {}
    db: dict[bytes, bytes] = {}
    ref_root = root = BLANK_ROOT
    for size in (700, 1, 50, 700, 300):
        ref, ours = HexaryTrie(ref_db, ref_root), Trie(db, root)
        for key in rng.sample(keys, size):
            value = rng.randbytes(rng.choice([1, 40, 600]))
            assert ours.get(key) == ref.get(key)
            ref.set(key, value)
            ours.set(key, value)
        ref_root, root = ref.root_hash, ours.commit()
        assert root == ref_root
    assert len(db) < len(ref_db) / 2  # HexaryTrie also keeps every intermediate version


def test_a_batch_without_writes_keeps_the_root_and_writes_nothing():
    db: dict[bytes, bytes] = {}
    t = Trie(db)
    t.set(b"k" * 32, b"v")
    root = t.commit()
    before = dict(db)
    again = Trie(db, root)
    assert again.get(b"k" * 32) == b"v" and again.get(b"x" * 32) == b""
    assert again.commit() == root and db == before
    assert Trie({}).commit() == BLANK_ROOT == HexaryTrie.BLANK_NODE_HASH


def test_empty_values_are_refused_not_taken_as_deletions():
    with pytest.raises(ValueError):
        Trie({}).set(b"k", b"")


@SETTINGS
@given(st.recursive(st.binary(max_size=70), lambda items: st.lists(items, max_size=5), max_leaves=20))
def test_rlp_matches_the_rlp_package(item):
    assert rlp_encode(item) == rlp.encode(item)
    assert rlp_decode(rlp.encode(item)) == rlp.decode(rlp.encode(item))


@pytest.mark.parametrize("data", [b"", b"\x81", b"\xc2\x01", b"\x01\x02", b"\xb8", b"\xc1\xc2"])
def test_rlp_decode_refuses_truncated_or_trailing_bytes(data):
    with pytest.raises(ValueError):
        rlp_decode(data)
