"""Assertions of the fuzz suite (a plain module, not conftest, so its name is unique across test folders):
exit code, one line naming the culprit, inputs byte-identical, nothing left behind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    rc: int
    err: str  # stderr

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(res: Result, code: int, *names: str) -> None:
    """The command failed with ``code`` and one stderr line naming every one of ``names``; no traceback."""
    assert res.rc == code, res.err
    assert len(res.lines) == 1, res.err
    assert "Traceback" not in res.err
    for n in names:
        assert n in res.lines[0], (n, res.lines[0])


def leftovers(root: Path, allowed: Iterable[str]) -> list[str]:
    """Entries of ``root`` (recursively, names relative) that are not under one of ``allowed``."""
    keep = tuple(allowed)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if str(p.relative_to(root)).split("/")[0] not in keep)
