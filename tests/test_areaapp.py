"""The area app's refusals, in process: which fault a block is refused for, and at which
transaction, when it has several; and the proposer's shortcuts giving the same outcome."""

from __future__ import annotations

import time

import pytest

from aggregator.areaapp import AreaApp
from certlog.app import InvalidBlock
from certlog.store import NodeDB
from gridledger.wire import Reading, make_reading, parse_reading

from chainkit import make_area
from helpers import PRIV

NOW_MS = int(time.time() * 1000)


def forge_sig(tx: bytes) -> bytes:
    r = parse_reading(tx)
    return tx.replace(r.sig.encode(), (("0" if r.sig[0] != "0" else "1") + r.sig[1:]).encode())


def non_unit(sim) -> bytes:
    """The meter's next reading, validly signed, with a ciphertext that shares the factor p with n."""
    r = sim.next()
    bad = make_reading(meter=r.meter, seq=r.seq, t=r.t, dt=r.dt, prev=r.prev, kid=r.kid, c=PRIV.p * 12345,
                       sign=sim.key.sign)
    sim.prev = bad.hash
    return bad.to_json()


def outcome(app: AreaApp, txs: list[bytes], **kw) -> tuple:
    try:
        out = app.execute(NodeDB(None), app.genesis_root, NOW_MS, txs, **kw)
    except InvalidBlock as exc:
        return exc.reason, exc.index
    return out.state_root, out.app


@pytest.fixture
def area():
    return make_area(["m1", "m2", "m3"])


def test_the_first_fault_in_transaction_order_is_reported(area):
    """Each reading's ciphertext range is checked before its signature and chain link,
    and a reading's faults before the next reading's, however the checks are batched."""
    m1, m2, m3 = (area.meters[m] for m in ("m1", "m2", "m3"))
    app = area.app()
    ok1, ok2 = m1.next().to_json(), m2.next().to_json()
    bad_range, bad_sig = non_unit(m3), forge_sig(m1.next().to_json())
    assert outcome(app, [ok1, ok2, bad_range]) == ("tx_ciphertext_range", 2)
    assert outcome(app, [ok1, bad_sig, ok2, bad_range]) == ("tx_bad_signature", 1)
    assert outcome(app, [ok1, ok2, bad_range, bad_sig]) == ("tx_ciphertext_range", 2)
    # A proposer skips signatures (ingest checked them), never the range.
    assert outcome(app, [ok1, bad_sig, ok2, bad_range], trusted=True) == ("tx_ciphertext_range", 3)
    # The same reading with both faults: its range comes first.
    both = forge_sig(non_unit(area.meters["m2"]))
    assert outcome(app, [ok1, both]) == ("tx_ciphertext_range", 1)
    # A later reading's fault does not hide an earlier range fault, nor the reverse.
    gap = m1.next().to_json()  # m1's seq 3 after seq 1: a gap
    assert outcome(app, [bad_range, ok1, gap]) == ("tx_ciphertext_range", 0)
    assert outcome(app, [ok1, gap, bad_range]) == ("tx_seq_gap", 1)


def test_decoded_readings_give_what_parsing_the_bytes_gives(area):
    """A proposer's `decoded` readings are used only when they encode to the very tx
    bytes; a wrong or missing one falls back to parsing, so the outcome never changes."""
    app = area.app()
    readings = [sim.next() for sim in area.meters.values() for _ in range(3)]
    txs = [r.to_json() for r in readings]
    parsed = outcome(app, txs, trusted=True)
    assert parsed[0] != "tx_seq_gap" and parsed == outcome(app, txs)
    assert outcome(app, txs, trusted=True, decoded=readings) == parsed
    stale = [Reading(r.meter, r.seq + 1, r.t, r.dt, r.prev, r.kid, r.c, r.sig) for r in readings]
    assert outcome(app, txs, trusted=True, decoded=stale) == parsed
    assert outcome(app, txs, trusted=True, decoded=[None] * len(txs)) == parsed
    swapped = txs[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert outcome(app, swapped, trusted=True, decoded=readings) == ("tx_seq_gap", 1)
    with pytest.raises(ValueError):
        app.execute(NodeDB(None), app.genesis_root, NOW_MS, txs, decoded=readings)  # validators parse


def test_an_app_that_remembers_its_leaves_reaches_the_same_states_as_a_fresh_one(area):
    """The app keeps each account's last leaf with its decoded state, so the next block
    need not decode it; a fresh app per block decodes every leaf. Over a chain of blocks,
    then re-running the last block on its parent (where the remembered leaves are not
    the trie's, as on a fork), both reach the same roots and fields, and a remembered
    state is never changed by a block that used it."""
    meters = [area.meters[m] for m in ("m1", "m2", "m3")]
    warm = area.app()
    nodes = NodeDB(None)
    roots, blocks = [warm.genesis_root], []
    for height in range(4):
        txs = [m.next().to_json() for _ in range(1 + height % 2) for m in meters]
        kept = [(st, (st.seq, st.hash, st.count, st.last_t, st.total)) for _, st in warm._leaves.values()]
        out = warm.execute(nodes, roots[-1], NOW_MS + height, txs)
        assert all((st.seq, st.hash, st.count, st.last_t, st.total) == fields for st, fields in kept)
        cold = area.app().execute(nodes, roots[-1], NOW_MS + height, txs)
        assert (out.state_root, out.app) == (cold.state_root, cold.app)
        roots.append(out.state_root)
        blocks.append(txs)
    assert len(warm._leaves) == 3
    again = warm.execute(nodes, roots[-2], NOW_MS + 3, blocks[-1])  # every leaf differs from the one kept
    assert (again.state_root, again.app) == (out.state_root, out.app)
