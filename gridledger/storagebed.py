"""Seed 000's storage layout for the testbed, benches and tests: 2 full, 4 heavy and
4 light storage nodes of one area chain, the verifier (placement, audits, the P and R
chains' proposer) and a reader config, beside what `testbed.write_chain` wrote."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .testbed import storage_process, verifier_process, wait_up, write_pchain, write_storage_node

__all__ = ["seed000_nodes", "StorageLayout", "write_storage_layout", "start_storage_layout", "write_reader"]


def seed000_nodes(full: int = 2, heavy: int = 4, light: int = 4) -> dict[str, str]:
    """name -> kind: f1.., h1.., l1.."""
    return {**{f"f{i + 1}": "full" for i in range(full)}, **{f"h{i + 1}": "heavy" for i in range(heavy)},
            **{f"l{i + 1}": "light" for i in range(light)}}


@dataclass(frozen=True, slots=True)
class StorageLayout:
    workdir: Path
    nodes: dict[str, str]          # name -> kind (as the genesis has them)
    configs: dict[str, Path]       # name -> storage/NAME.toml
    verifier: Path                 # verifier.toml
    reader: Path                   # reader.toml (reads through v0's P replica)


def write_storage_layout(wd: Path, *, area: str, host: str, port: int, validator_configs: list[Path],
                         nodes: dict[str, str] | None = None, replicas: int = 2, audits: bool = True,
                         storage: dict | None = None, **verifier) -> StorageLayout:
    """Keys and configs of every storage node (each has every other as a peer), the P
    (and with `audits` the R) chain, the verifier (`verifier`: further [verifier] keys)
    and a reader. Call before the validators start: their configs gain [p_chain]."""
    nodes = nodes or seed000_nodes()
    configs = {n: write_storage_node(wd, n, kind=k, chain=area, host=host, port=port,
                                     peers=[p for p in nodes if p != n], **(storage or {}))
               for n, k in nodes.items()}
    vcfg = write_pchain(wd, area=area, host=host, port=port, nodes=nodes, replicas=replicas,
                        validator_configs=validator_configs, r_chain=audits, **verifier)
    p_db = validator_configs[0].parent / f"{validator_configs[0].stem}-p.db"
    return StorageLayout(wd, dict(nodes), configs, vcfg, write_reader(wd, area=area, host=host, port=port,
                                                                      p_database=p_db))


def write_reader(wd: Path, *, area: str, host: str, port: int, p_database: Path, timeout_s: float = 1.0) -> Path:
    cfg = wd / "reader.toml"
    cfg.write_text(f'[reader]\narea = "{area}"\np_database = "{p_database}"\np_validators = "p-validators.toml"\n'
                   f'genesis = "pchain-genesis.toml"\ntimeout_s = {timeout_s}\n\n'
                   f'[mqtt]\nhost = "{host}"\nport = {port}\n')
    return cfg


def start_storage_layout(layout: StorageLayout, logs: Path, *, timeout: float = 60.0) -> dict[str, subprocess.Popen]:
    """Every storage node and the verifier, launched together, then waited for."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {n: storage_process(c, logs / f"storage-{n}.log") for n, c in layout.configs.items()}
    procs["verifier"] = verifier_process(layout.verifier, logs / "verifier.log")
    for n, p in procs.items():
        wait_up(logs / (f"storage-{n}.log" if n != "verifier" else "verifier.log"), p, timeout)
    return procs
