"""Content-addressed cells: every result of the study is cached under the hash of the config that made it.

A cell is one unit of work (a pre-training run, a merge, a fine-tune, an evaluation). Its ``spec`` is a
JSON-able dict holding everything that determines the result, including the hashes of the cells it
builds on, so changing a setting recomputes exactly the cells downstream of it. Results are written
atomically; a re-run, or a run killed halfway, finds finished cells and does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.checkpoint import atomic_write_json

log = logging.getLogger("vlmerge.study")


def config_hash(spec: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of ``spec``."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    kind: str
    spec: dict[str, Any]
    dir: Path

    @property
    def hash(self) -> str:
        return self.dir.name.rsplit("-", 1)[-1]

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def done(self) -> bool:
        return self.result_path.is_file()


class CellStore:
    """Cells under ``root/cells/{kind}-{hash}/`` with ``spec.json`` and, once finished, ``result.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "cells"
        self.computed: list[str] = []  # cells computed (not loaded from cache) in this process

    def cell(self, kind: str, spec: Mapping[str, Any]) -> Cell:
        spec = json.loads(json.dumps(spec, sort_keys=True, default=str))
        return Cell(kind, spec, self.root / f"{kind}-{config_hash({'kind': kind, **spec})}")

    def run(self, kind: str, spec: Mapping[str, Any], fn: Callable[[Cell], dict[str, Any]]) -> dict[str, Any]:
        """The cell's cached result, or ``fn(cell)`` computed now and stored (with its spec and timing)."""
        cell = self.cell(kind, spec)
        if cell.done:
            return json.loads(cell.result_path.read_text())["result"]
        cell.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cell.dir / "spec.json", {"kind": kind, "spec": cell.spec})
        t0 = time.time()
        result = fn(cell)
        atomic_write_json(cell.result_path, {"kind": kind, "hash": cell.hash, "spec": cell.spec,
                                             "seconds": time.time() - t0, "result": result})
        self.computed.append(cell.dir.name)
        log.info("cell %s done in %.1fs", cell.dir.name, time.time() - t0)
        return result
