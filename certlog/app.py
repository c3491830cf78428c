"""What an app on the certified log is: a deterministic state machine.

The engine never looks inside transactions. It hands an app the parent's state
root, the block's time and its transactions; the app validates and applies
them and returns the new state root and its header fields. Proposer, validators,
`chain verify` and light clients all run the same code, so any difference is a
fault, not a matter of opinion. `trusted=True` lets a proposer skip checks it
already made at ingest (meter signatures); validators never pass it. A proposer
that encoded the transactions itself may also hand over what it encoded
(`decoded`), so the app need not decode its own bytes again; the app must get
exactly what decoding the bytes would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, MutableMapping, Protocol, Sequence

from .block import ChainError

__all__ = ["App", "Outcome", "InvalidBlock"]


class InvalidBlock(ChainError):
    """The app refuses a block; `index` is the offending transaction, if one is."""

    def __init__(self, reason: str, detail: str = "", *, index: int | None = None):
        super().__init__(reason, detail if index is None else f"tx {index}: {detail}")
        self.index = index


@dataclass(frozen=True, slots=True)
class Outcome:
    state_root: str                                    # hex
    app: dict[str, Any] = field(default_factory=dict)  # header app fields (str, int, bool)


class App(Protocol):
    name: str
    genesis_root: str  # state root before height 1

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False, decoded: Sequence[Any] | None = None) -> Outcome:
        """Validate and apply `txs` on the state at `parent_root`; raise `InvalidBlock`."""
        ...
