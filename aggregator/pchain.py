"""How roles find the P and R chains: their ids, validator sets, genesis and local replicas.

Both run on the generic engine with their own chain ids (`P-{area}` and `R-{area}`
unless configured), co-signed by the area's validators; their validator-set files
name the verifier as proposer (one file may serve both). A validator with a
`[p_chain]` (`[r_chain]`) table votes on that chain beside its area chain (or
follows it, when its name is not in the chain's set). Both read the same genesis
file (`pchain-genesis.toml`: the storage nodes and their keys).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from certlog.follower import Follower
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import ValidatorSet, load_validator_set, read_secret_key
from certlog.voter import ValidatorNode, Voter
from gridledger.config import MqttConfig, section
from gridledger.errors import ConfigError
from gridledger.wire import METER_ID_RE

from .pchainapp import PChainApp, load_pgenesis
from .rchainapp import RChainApp

__all__ = ["PChainSettings", "pchain_id", "pchain_replica", "pchain_node"]


APPS = {"P": PChainApp, "R": RChainApp}


def pchain_id(area: str, chain: str = "", prefix: str = "P") -> str:
    chain = chain or f"{prefix}-{area}"
    if not METER_ID_RE.match(chain):
        raise ConfigError(f"P chain id {chain!r} must match [A-Za-z0-9_-]{{1,32}}")
    return chain


@dataclass(frozen=True, slots=True, kw_only=True)
class PChainSettings:
    """`[p_chain]` (or `[r_chain]`) of a validator config."""
    validators: Path      # the P chain's set: the same validators, [proposer] = the verifier's key
    genesis: Path         # pchain-genesis.toml: area, replicas, storage nodes and their keys
    database: Path        # this role's replica of the P chain (its own file)
    chain: str = ""       # default P-{area}

    @classmethod
    def from_doc(cls, doc: dict, base: Path, table: str = "p_chain") -> "PChainSettings | None":
        if table not in doc:
            return None
        return section(cls, doc, table, base, ("validators", "genesis", "database"))


def pchain_replica(chain: str, genesis: Path, validators: Path, database: Path,
                   area_validators: ValidatorSet, prefix: str = "P") -> Replica:
    g = load_pgenesis(genesis)
    return Replica(chain, APPS[prefix](g, area_validators), ChainStore(connect(database)),
                   load_validator_set(validators))


def pchain_node(s: PChainSettings, area: str, area_validators: ValidatorSet, mqtt: MqttConfig, name: str,
                secret_key: Path, prefix: str = "P") -> ValidatorNode | Follower:
    """A validator of the P (prefix "R": the R) chain if `name` is in its set, else a follower."""
    chain = pchain_id(area, s.chain, prefix)
    replica = pchain_replica(chain, s.genesis, s.validators, s.database, area_validators, prefix)
    if replica.app.genesis.area != area:
        raise ConfigError(f"{s.genesis} is the P-chain genesis of {replica.app.genesis.area}, not {area}")
    if mqtt.client_id:  # its own MQTT session beside the role's main one
        mqtt = dataclasses.replace(mqtt, client_id=f"{mqtt.client_id}-{chain}")
    if any(m.name == name for m in replica.validators.members):
        return ValidatorNode(Voter(replica, replica.validators.index(name), read_secret_key(secret_key)), mqtt,
                             name=name)
    return Follower(replica, mqtt, name=name)
