"""``StreamingReader`` (:mod:`vlmerge.merge.io`): each tensor a private mapping of its own bytes, checked
against the file's bytes decoded here, written into without changing the file, and unmapped with the tensor."""

from __future__ import annotations

import gc
import hashlib
import json
import mmap
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmerge.merge.io import StreamingReader
from vlmerge.models import CheckpointReader
from vlmerge.models.checkpoint import CheckpointError

# name -> (safetensors dtype, numpy dtype to decode the bytes with, shape); "odd" makes "late" start on a byte
# offset that is not a multiple of 4, and "big" spans several mapping granularities
TENSORS = {
    "big": ("F32", "<f4", (3, 3 * mmap.ALLOCATIONGRANULARITY // 4 + 5)),
    "odd": ("U8", "u1", (3,)),
    "late": ("F32", "<f4", (2, 5)),
    "half": ("F16", "<f2", (7,)),
    "brain": ("BF16", "<u2", (4, 2)),
    "count": ("I64", "<i8", (3,)),
    "flags": ("BOOL", "u1", (5,)),
    "empty": ("F32", "<f4", (0, 3)),
}


def write_file(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file written byte by byte (tensors in TENSORS' order, a header whose length is not a
    multiple of 8), and each tensor's values decoded from those bytes."""
    rng = np.random.default_rng(0)
    header: dict[str, object] = {}
    blobs, values, at = [], {}, 0
    for name, (code, np_dtype, shape) in TENSORS.items():
        n = int(np.prod(shape))
        if code == "BOOL":
            raw = (rng.integers(0, 2, n) > 0).astype(np.uint8).tobytes()
        else:
            raw = rng.integers(0, 256, n * np.dtype(np_dtype).itemsize, dtype=np.uint8).tobytes()
            if code in ("F32", "F16"):  # finite values: random bytes can be NaN, which never compare equal
                raw = rng.standard_normal(n).astype(np_dtype).tobytes()
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        values[name] = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        at += len(raw)
    text = json.dumps(header).encode() + b" "
    text += b" " * ((3 - len(text)) % 8)  # 8 + len(text) ≡ 3 (mod 8): no tensor starts 8-aligned by luck
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return values


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy().view(np.uint8) if t.dtype == torch.bool else t.numpy()


def mappings_of(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_tensors_equal_the_files_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    want = write_file(path)
    with StreamingReader(path) as r, CheckpointReader(path) as ref:
        assert r.keys() == sorted(TENSORS)
        for name in TENSORS:
            got = r.get(name)
            assert tuple(got.shape) == TENSORS[name][2] and got.dtype == ref.dtype(name), name
            assert np.array_equal(as_numpy(got), want[name]), name
            assert torch.equal(got, ref.get(name)), name


def test_writing_into_a_tensor_leaves_the_file_and_later_reads_alone(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    want = write_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with StreamingReader(path) as r:
        t = r.get("big")
        t.add_(1.0)  # a merge may write its result into an input's memory
        np.testing.assert_array_equal(t.numpy(), want["big"] + np.float32(1.0))
        assert np.array_equal(r.get("big").numpy(), want["big"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts mappings in /proc/self/maps (Linux)")
def test_a_tensors_mapping_goes_with_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_file(path)
    with StreamingReader(path) as r:
        gc.collect()
        before = mappings_of(path)
        t = r.get("big")
        view = t[1:]
        assert mappings_of(path) == before + 1
        del t
        gc.collect()
        assert mappings_of(path) == before + 1  # a view keeps its tensor's bytes
        del view
        gc.collect()
        assert mappings_of(path) == before
        for _ in range(50):  # many reads hold no more than the live tensors
            r.get("late"), r.get("big")
        gc.collect()
        assert mappings_of(path) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_live_tensors_hold_no_file_descriptor(tmp_path: Path) -> None:
    """A state dict of many tensors must not run out of descriptors (Python's mmap keeps one per mapping)."""
    path = tmp_path / "w.safetensors"
    write_file(path)
    fds = Path("/proc/self/fd")
    with StreamingReader(path) as r:
        before = len(list(fds.iterdir()))
        held = [r.get(name) for _ in range(300) for name in ("big", "late", "odd")]
        assert len(list(fds.iterdir())) == before
        assert all(bool((t == held[i % 3]).all()) for i, t in enumerate(held))


@pytest.mark.parametrize("change", ["rewrite", "truncate"])
def test_a_file_changed_after_opening_is_refused_at_the_next_get(tmp_path: Path, change: str) -> None:
    """Mapped pages would show the new bytes (or none: a bus error), so a changed file is an error naming it."""
    path = tmp_path / "w.safetensors"
    want = write_file(path)
    with StreamingReader(path) as r:
        assert np.array_equal(r.get("late").numpy(), want["late"])
        size = path.stat().st_size
        with open(path, "r+b") as f:
            if change == "rewrite":  # same size, other bytes, as an in-place re-save would leave it
                f.seek(size - 64)
                f.write(b"\0" * 64)
            else:
                f.truncate(size - 64)
        with pytest.raises(CheckpointError, match="w.safetensors: changed on disk since it was opened"):
            r.get("big")
