"""Reading tensors for a streaming merge without keeping the input files resident in the process.

``safetensors.safe_open`` hands out tensors that view the memory-mapped file: every page a merge touches
stays mapped (and counted in the process's RSS) until the file is closed, so a merge that reads three
0.9 GB models peaks at ~2.7 GB even though it holds one slot at a time. :class:`StreamingReader` is a
:class:`~vlmerge.models.checkpoint.CheckpointReader` (same validation, keys, shapes, dtypes, config) whose
:meth:`get` copies the tensor's bytes with ``pread`` into fresh memory that is freed with the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import CheckpointError, CheckpointReader

_MAX_READ = 1 << 30  # bytes per preadv call (Linux caps one read at ~2 GiB)


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class StreamingReader(CheckpointReader):
    """A :class:`CheckpointReader` whose ``get(key)`` reads the bytes with ``pread`` (no mmap residue)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._loc: dict[str, tuple[int, int, int]] = {}  # key -> (fd, absolute offset, nbytes)
        self._fds: list[int] = []
        try:
            for file in self.files:
                start, header = _header(file)
                fd = os.open(file, os.O_RDONLY)
                self._fds.append(fd)
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    self._loc[key] = (fd, start + begin, end - begin)
        except BaseException:
            self.close()
            raise

    def get(self, key: str) -> torch.Tensor:
        if key not in self._loc:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        fd, offset, nbytes = self._loc[key]
        t = torch.empty(self.shape(key), dtype=self.dtype(key))
        if nbytes != math.prod(t.shape) * t.element_size():
            raise CheckpointError(f"{self.path}: tensor {key!r} has {nbytes} bytes for shape {list(t.shape)}")
        if nbytes:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buf[done : done + _MAX_READ]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: file ends inside tensor {key!r} (truncated?)")
                done += got
        return t

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        super().close()
