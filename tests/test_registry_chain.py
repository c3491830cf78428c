"""The registry chain's app and the area chain reading it: in-process, real SQLite.

Every check of `coordinator.registryapp` is exercised by a block that breaks it;
the area chain judges membership at the exact registry height it names."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trie import HexaryTrie

from aggregator.areaapp import AccountState, AreaApp, account_key, registry_tx
from certlog.app import InvalidBlock
from certlog.block import ChainError, canonical
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.voter import Voter
from coordinator.registryapp import (Genesis, RegistryApp, RegistryHistory, dump_genesis, enroll_record,
                                     load_genesis, node_record, retire_record, sign_record)
from gridledger.meterkeys import MeterKey, public_hex
from gridledger.paillier import PublicKey

from chainkit import certify, make_area, replica, txs_of, validator_keys, validator_set
from helpers import N, SimMeter

NOW = 1_790_000_000
AREA = "area1"


def ed_key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([0x40 + i]) * 32)


def pub(k: Ed25519PrivateKey) -> str:
    return public_hex(k.public_key())


REGISTRAR, TECH = ed_key(1), ed_key(2)
GENESIS = Genesis({"ops": pub(REGISTRAR)})


def meter_key(i: int) -> MeterKey:
    return MeterKey(f"m{i}", bytes([i + 1]) * 32)


def enroll(i: int, *, account: str | None = None, area: str = AREA, signer=("tech", TECH), t: int = NOW,
           pop: MeterKey | None = None) -> bytes:
    k = meter_key(i)
    rec = enroll_record(meter=k.meter, account=account or f"acct-m{i}", area=area, public_key=k.public_hex,
                        signer=signer[0], time=t)
    return sign_record(rec, signer[1], (pop or k).private)


def tech_node() -> bytes:
    return sign_record(node_record(ident="tech", role="technician", public_key=pub(TECH), signer="ops", time=NOW),
                       REGISTRAR)


class Chains:
    """A registry chain and an area chain, each with a proposer and 4 voters; every
    replica's registry history follows the registry replica next to it."""

    def __init__(self, tmp):
        self.sks = validator_keys()
        self.vset = validator_set(self.sks)
        self.reg_prop, self.reg_voters = self._chain(tmp, "registry", lambda h: RegistryApp(GENESIS))
        self.histories = [RegistryHistory() for _ in range(5)]
        for h, r in zip(self.histories, [self.reg_prop] + [v.replica for v in self.reg_voters]):
            r.listeners.append(h.apply)
        apps = iter([AreaApp(AREA, h, PublicKey(N)) for h in self.histories])
        self.area_prop, self.area_voters = self._chain(tmp, AREA, lambda h: next(apps))

    def _chain(self, tmp, chain, app):
        reps = [Replica(chain, app(i), ChainStore(connect(tmp / f"{chain}{i}.db")), self.vset) for i in range(5)]
        return reps[0], [Voter(r, i, sk) for i, (r, sk) in enumerate(zip(reps[1:], self.sks))]

    def registry(self, txs):
        return certify(self.reg_prop, self.reg_voters, txs)

    def area(self, txs):
        return certify(self.area_prop, self.area_voters, txs)

    def area_move(self, txs):
        """An area block led by the move to the latest registry height."""
        h = self.histories[0]
        return self.area([registry_tx(h.height, h.hash_at(h.height))] + txs)


@pytest.fixture
def chains(tmp_path):
    return Chains(tmp_path)


def refused(replica: Replica, txs: list[bytes]) -> ChainError:
    with pytest.raises(ChainError) as info:
        replica.app.execute(replica.store.nodes, replica.state_root, NOW * 1000, txs)
    return info.value


# -- the registry app ----------------------------------------------------------------

def test_enrollments_certify_and_the_history_follows(chains):
    header, _ = chains.registry([tech_node(), enroll(0), enroll(1)])
    assert header.app == {"genesis": GENESIS.digest, "enroll": 2, "node": 1, "retire": 0}
    for h in chains.histories:
        view = h.view(AREA)
        assert {e.meter for e in view} == {"m0", "m1"} and view.get("m0").account == "acct-m0"
        assert h.hash_at(1) == header.hash


@pytest.mark.parametrize("case, reason", [
    ("garbage", "tx_malformed"),
    ("unknown_kind", "tx_unknown_kind"),
    ("extra_field", "tx_bad_field"),
    ("not_canonical", "tx_not_canonical"),
    ("bad_id", "tx_bad_field"),
    ("unknown_signer", "tx_unknown_signer"),
    ("technician_adds_node", "tx_signer_role"),
    ("forged_signer_sig", "tx_bad_signature"),
    ("no_meter_pop", "tx_bad_meter_signature"),
    ("duplicate_meter", "tx_duplicate_meter"),
    ("duplicate_key", "tx_duplicate_key"),
    ("duplicate_node", "tx_duplicate_node"),
    ("registrar_key_reused", "tx_duplicate_key"),
    ("retire_unknown", "tx_unknown_target"),
    ("retire_twice", "tx_already_retired"),
    ("future", "tx_future_time"),
])
def test_every_bad_record_is_refused_with_its_reason(chains, case, reason):
    chains.registry([tech_node(), enroll(0)])
    node = lambda ident, role, key, signer="ops", sk=REGISTRAR: sign_record(  # noqa: E731
        node_record(ident=ident, role=role, public_key=key, signer=signer, time=NOW), sk)
    retire = lambda ident: sign_record(retire_record(target="meter", ident=ident, reason="swap", signer="tech",  # noqa: E731
                                                     time=NOW), TECH)
    good = json.loads(enroll(1))
    txs = {
        "garbage": [b"\xff{"],
        "unknown_kind": [canonical({"kind": "mint"})],
        "extra_field": [canonical(dict(good, colour="red"))],
        "not_canonical": [json.dumps(good, indent=1).encode()],
        "bad_id": [enroll(1).replace(b'"m1"', b'"m 1"')],
        "unknown_signer": [enroll(1, signer=("nobody", TECH))],
        "technician_adds_node": [node("gw", "gateway", pub(ed_key(9)), "tech", TECH)],
        "forged_signer_sig": [enroll(1, signer=("tech", ed_key(7)))],
        "no_meter_pop": [enroll(1, pop=meter_key(5))],
        "duplicate_meter": [enroll(0, account="other")],
        "duplicate_key": [sign_record(enroll_record(meter="m1", account="a", area=AREA, signer="tech", time=NOW,
                                                    public_key=meter_key(0).public_hex), TECH, meter_key(0).private)],
        "duplicate_node": [node("tech", "gateway", pub(ed_key(9)))],
        "registrar_key_reused": [node("gw", "gateway", pub(REGISTRAR))],
        "retire_unknown": [retire("m9")],
        "retire_twice": [retire("m0"), retire("m0")],
        "future": [enroll(1, t=NOW + 10_000)],
    }[case]
    err = refused(chains.reg_voters[0].replica, txs)
    assert err.reason == reason, err
    # A refused block leaves nothing behind: the next good block certifies.
    chains.registry([enroll(1)])
    assert "m1" in chains.histories[3].view(AREA)


def test_a_retired_signer_signs_nothing(chains):
    chains.registry([tech_node()])
    chains.registry([sign_record(retire_record(target="node", ident="tech", reason="left", signer="ops",
                                               time=NOW), REGISTRAR)])
    assert refused(chains.reg_voters[0].replica, [enroll(0)]).reason == "tx_signer_retired"


def test_genesis_file_round_trip_and_mismatch(tmp_path):
    (tmp_path / "g.toml").write_text(dump_genesis(GENESIS))
    assert load_genesis(tmp_path / "g.toml") == GENESIS
    sks = validator_keys()
    vset = validator_set(sks)
    prop = Replica("registry", RegistryApp(GENESIS), ChainStore(connect(tmp_path / "p.db")), vset)
    other = Genesis({"ops": pub(REGISTRAR), "ops2": pub(ed_key(3))})
    voter = Voter(Replica("registry", RegistryApp(other), ChainStore(connect(tmp_path / "v.db")), vset), 0, sks[0])
    header = prop.build([tech_node()])
    with pytest.raises(ChainError) as info:
        voter.vote(header, [tech_node()])
    assert info.value.reason == "app_fields_mismatch"


# -- the area chain reading it ---------------------------------------------------------

def test_area_chain_accepts_a_meter_only_from_the_registry_height_it_names(chains):
    sim = SimMeter(meter_key(0))
    first = sim.next()
    # Before any registry block, nobody is a member.
    assert refused(chains.area_voters[0].replica, txs_of([first])).reason == "tx_unknown_meter"
    chains.registry([tech_node(), enroll(0)])
    header, _ = chains.area_move(txs_of([first]))
    assert header.app["registry_height"] == 1 and header.app["registry"] == chains.histories[0].hash_at(1)
    # m1 enrolls at registry height 2; a block still judged at height 1 refuses it.
    chains.registry([enroll(1)])
    m1 = SimMeter(meter_key(1)).next()
    assert refused(chains.area_voters[1].replica, txs_of([m1])).reason == "tx_unknown_meter"
    header, _ = chains.area_move(txs_of([m1, sim.next()]))
    assert header.app["registry_height"] == 2 and header.app["readings"] == 2


def test_registry_references_are_checked(chains):
    chains.registry([tech_node(), enroll(0)])
    chains.registry([enroll(1)])
    r = chains.area_voters[0].replica
    h = chains.histories[1]
    assert refused(r, [registry_tx(1, "ab" * 32)]).reason == "tx_registry_mismatch"
    assert refused(r, [registry_tx(3, "ab" * 32)]).reason == "registry_behind"
    assert refused(r, [b'{"registry":{"height":1}}']).reason == "tx_bad_registry"
    chains.area([registry_tx(2, h.hash_at(2))])
    assert refused(r, [registry_tx(1, h.hash_at(1))]).reason == "tx_registry_backwards"


def test_a_retired_meter_is_refused_and_a_replacement_continues_the_account(chains):
    old = SimMeter(meter_key(0))
    chains.registry([tech_node(), enroll(0, account="house-7")])
    chains.area_move(txs_of([old.next(), old.next()]))
    # The technician swaps the meter: the old one retired, the new one enrolled for the same account.
    chains.registry([sign_record(retire_record(target="meter", ident="m0", reason="replaced", signer="tech",
                                               time=NOW), TECH),
                     enroll(1, account="house-7")])
    new = SimMeter(meter_key(1), t=old.t + 900)  # installed after the old meter's last interval
    assert refused(chains.area_voters[0].replica,
                   [registry_tx(2, chains.histories[1].hash_at(2))] + txs_of([old.next()])).reason == "tx_unknown_meter"
    header, _ = chains.area_move(txs_of([new.next()]))
    assert header.app["registry_height"] == 2
    # The account's count continues across the swap, on the new meter's chain.
    leaf = HexaryTrie(chains.area_prop.store.nodes, root_hash=bytes.fromhex(header.state_root)).get(
        account_key("house-7"))
    st = AccountState.decode(leaf)
    assert (st.meter, st.seq, st.count) == ("m1", 1, 3)


def test_history_replays_from_the_store(chains, tmp_path):
    chains.registry([tech_node(), enroll(0)])
    chains.registry([enroll(1)])
    again = RegistryHistory.from_store(chains.reg_voters[2].replica.store)
    assert again.height == 2 and {e.meter for e in again.view(AREA)} == {"m0", "m1"}
    assert {e.meter for e in again.view(AREA, 1)} == {"m0"}
    assert again.hash_at(2) == chains.histories[0].hash_at(2)


def test_static_registry_chains_refuse_registry_transactions(tmp_path):
    area = make_area(["m0"])
    r = replica(tmp_path / "a.db", area, validator_set(validator_keys()))
    with pytest.raises(InvalidBlock) as info:
        r.app.execute(r.store.nodes, r.state_root, NOW * 1000, [registry_tx(1, "ab" * 32)])
    assert info.value.reason == "tx_bad_registry"
