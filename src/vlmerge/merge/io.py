"""Reading tensors for a streaming merge without keeping the input files resident in the process.

``safetensors.safe_open`` hands out tensors that view the memory-mapped file: every page a merge touches
stays mapped (and counted in the process's RSS) until the file is closed, so a merge that reads three
0.9 GB models peaks at ~2.7 GB even though it holds one slot at a time. :class:`StreamingReader` is a
:class:`~vlmerge.models.checkpoint.CheckpointReader` (same validation, keys, shapes, dtypes, config) whose
:meth:`get` maps only the pages of that tensor, privately (copy-on-write: a merge may write into its
inputs, the file never changes), and the mapping goes with the tensor: no copy of the bytes and no fresh
memory to fault in. Task arithmetic of three 0.33 GB models (2-core AMD EPYC, files in the page cache): the
workers spent 0.42–0.47 s per run reading (``pread`` into new memory, 0.24–0.26 s) and merging; mapping
takes 0.02 s, and reading and merging 0.27–0.35 s in all. The mapping is made with libc's ``mmap`` (Python's
``mmap.mmap`` keeps a duplicate file descriptor per mapping: a state dict of 1,500 tensors ran out of them).
As with any memory-mapped reader (``safe_open`` too), an input must not change while a merge reads it: a
file found changed since it was opened (size, modification time) is refused at the next ``get``, but one
truncated under a live tensor ends the process with a bus error.

PyTorch pickles (``pytorch_model.bin``, a sharded ``pytorch_model.bin.index.json``, a ``.pt`` / ``.pth``) are
read by :class:`TorchReader` through ``torch.load(weights_only=True, map_location="cpu")`` only, memory-mapped
(``mmap=True``) when the file is in torch's zip format: a file that would need full unpickling (anything but
tensors and plain containers, e.g. a custom class or an ``os.system`` reduce) is refused naming the file and
nothing of it is executed. :func:`open_weights` picks the reader by what a path holds (safetensors first, as
``transformers`` does). :class:`ShardedWeightsWriter` writes one ``model.safetensors`` or, with a shard size,
``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``; :func:`parse_size` reads
``--out-shard-size``.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import struct
import warnings
import weakref
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import resolve_inside
from ..models.checkpoint import (
    _DTYPES,
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    SafetensorsStreamWriter,
    WeightsReader,
    atomic_write_json,
    read_json,
)

_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
if _LIBC is not None:
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    _LIBC.munmap.restype = ctypes.c_int
    _LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_private(fd: int, offset: int, nbytes: int) -> np.ndarray:
    """uint8 ``[nbytes]``: bytes ``offset .. offset + nbytes`` of open file ``fd`` as a private copy-on-write
    mapping (writes stay in this process), unmapped when the array and every view of it are freed. On POSIX
    through libc's ``mmap``, which keeps no file descriptor; elsewhere through ``mmap.mmap`` (one per
    mapping)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on the granularity
    length = offset + nbytes - start
    if _LIBC is None:
        return np.frombuffer(mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_COPY), dtype=np.uint8,
                             count=nbytes, offset=offset - start)
    addr = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    pages = (ctypes.c_uint8 * length).from_address(addr)
    view = np.frombuffer(pages, dtype=np.uint8, count=nbytes, offset=offset - start)
    unmap = weakref.finalize(view, _LIBC.munmap, addr, length)  # views of ``view`` keep it alive
    unmap.atexit = False  # the process's end unmaps everything anyway
    return view


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class StreamingReader(CheckpointReader):
    """A :class:`CheckpointReader` whose ``get(key)`` maps just that tensor's pages (no mmap residue)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)  # safe_open has checked every tensor's bytes lie inside its file
        self._loc: dict[str, tuple[int, int, int]] = {}  # key -> (fd, absolute offset, nbytes)
        self._fds: list[int] = []
        self._opened: dict[int, tuple[Path, int, int]] = {}  # fd -> (file, size, mtime_ns) when opened
        try:
            for file in self.files:
                fd = os.open(file, os.O_RDONLY)
                self._fds.append(fd)
                st = os.fstat(fd)
                self._opened[fd] = (file, st.st_size, st.st_mtime_ns)
                start, header = _header(file)
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    self._loc[key] = (fd, start + begin, end - begin)
        except BaseException:
            self.close()
            raise

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``, viewing a private copy-on-write mapping of its bytes that is unmapped when the tensor
        (and every view of it) is freed."""
        if key not in self._loc:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        fd, offset, nbytes = self._loc[key]
        shape, dtype = self.shape(key), self.dtype(key)
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {nbytes} bytes for shape {list(shape)}")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        file, size, mtime = self._opened[fd]
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime):  # mapped pages would show the new bytes, or none
            raise CheckpointError(f"{file}: changed on disk since it was opened (size or modification time); an "
                                  "input must not change while it is read")
        return torch.from_numpy(_map_private(fd, offset, nbytes)).view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        super().close()


# ------------------------------------------------------------------------------------------ PyTorch pickles
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: Files a training run keeps beside its weights (Hugging Face Trainer and others): never taken for weights.
NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
#: Wrapper keys unwrapped (repeatedly) when a loaded dict holds exactly one of them, with a dict value.
WRAPPER_KEYS = ("state_dict", "model", "module")


def _mappable(file: Path) -> bool:
    """Whether ``torch.load(mmap=True)`` reads ``file`` correctly: a zip whose entries are all stored
    uncompressed, as ``torch.save`` writes them. The legacy (pre-1.6) format cannot be mapped, and a zip whose
    entries were re-compressed (by ``zip`` or ``zipfile``) would map the compressed bytes as tensor data:
    torch 2.13 then returns garbage without an error, so such a file is read whole instead."""
    if not zipfile.is_zipfile(file):
        return False
    try:
        with zipfile.ZipFile(file) as z:
            return all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # torch.load reports what is wrong with it


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle's state dict: ``torch.load(weights_only=True)`` (memory-mapped for the zip format),
    wrappers unwrapped, every key a string and every value a plain dense tensor of a supported dtype.
    ``pickle.UnpicklingError`` naming the file when it needs more than ``weights_only``; ``CheckpointError``
    for anything else wrong, naming the file (and key)."""
    mmap = _mappable(file)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(file, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        raise pickle.UnpicklingError(
            f"{file}: refused: not loadable with torch.load(weights_only=True) "
            f"({'; '.join(reason)[:200] or 'unsupported content'}); it holds objects other than tensors, which "
            "would need full unpickling (running code from the file), and vlmerge never does that (or it is not "
            "a PyTorch checkpoint); convert it to safetensors with a tool you trust") from None
    except Exception as e:  # corrupt zip, truncated file, ...
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    path = []
    while isinstance(obj, Mapping) and sum(k in obj for k in WRAPPER_KEYS) == 1:
        k = next(k for k in WRAPPER_KEYS if k in obj)
        if not isinstance(obj[k], Mapping):
            break
        path.append(k)
        obj = obj[k]
    where = f"{file}{''.join(f'[{k!r}]' for k in path)}"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: key {k!r} is not a string; expected a state dict of named tensors")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: {k!r} is of type {type(v).__name__}, not a tensor; expected a state dict "
                                  "of tensors only")
        if v.layout != torch.strided or v.is_quantized or v.dtype not in _DTYPES:
            raise CheckpointError(f"{where}: tensor {k!r} is {v.dtype} {str(v.layout).removeprefix('torch.')}"
                                  f"{' quantized' if v.is_quantized else ''}; expected a dense tensor of "
                                  f"{', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}")
        if v.numel() * v.element_size() > v.untyped_storage().nbytes():  # an expanded / overlapping view
            raise CheckpointError(f"{where}: tensor {k!r} claims {v.numel():,} entries ({list(v.shape)}, strides "
                                  f"{list(v.stride())}) over a storage of {v.untyped_storage().nbytes():,} bytes; "
                                  "expected each entry stored once")
        out[k] = v.detach()
    return out


class TorchReader(WeightsReader):
    """The :class:`~vlmerge.models.checkpoint.CheckpointReader` interface (``keys``, ``shape``, ``dtype``,
    ``get``, ``config``, ``files``, ``close``, a context manager) over PyTorch pickles: a ``.bin`` / ``.pt`` /
    ``.pth`` file, or a folder with ``pytorch_model.bin``, a sharded ``pytorch_model.bin.index.json``, or one
    other ``.bin`` / ``.pt`` / ``.pth`` file (training files such as ``optimizer.pt`` are not counted).

    Every file is loaded once, when the reader is opened, by :func:`_load_torch` (``weights_only``; zip-format
    files memory-mapped, so tensors are read from disk when :meth:`get` copies them; a legacy-format file is
    held in memory). :meth:`get` returns a fresh copy, never a view of the mapped file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = {}
        if self.path.is_dir() and (self.path / CONFIG_NAME).is_file():
            self.config = read_json(self.path / CONFIG_NAME)
        self.files, weight_map = _torch_layout(self.path)
        self._tensors: dict[str, torch.Tensor] = {}
        self._where: dict[str, Path] = {}
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {TORCH_INDEX_NAME} is missing")
            for k, t in _load_torch(f).items():
                if k in self._where:
                    raise CheckpointError(f"{f}: tensor {k!r} also stored in {self._where[k]}")
                self._tensors[k], self._where[k] = t, f
        if weight_map is not None:
            for k, f in weight_map.items():
                if self._where.get(k) != self.path / f:
                    raise CheckpointError(f"{self.path / TORCH_INDEX_NAME}: {k!r} mapped to {f} but not found there")

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        return self._tensors[key]

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key).clone(memory_format=torch.contiguous_format)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def close(self) -> None:
        self._tensors.clear()  # drops the memory maps
        self._where.clear()


def _torch_layout(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(the weight files, in shard order; the index's weight map or None) of a PyTorch checkpoint at
    ``path``, from the names alone; errors name the file."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if (path / TORCH_WEIGHTS_NAME).is_file():
        return [path / TORCH_WEIGHTS_NAME], None
    if (path / TORCH_INDEX_NAME).is_file():
        index = read_json(path / TORCH_INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path / TORCH_INDEX_NAME}: expected a 'weight_map' object")
        weight_map = index["weight_map"]
        where = f"{path / TORCH_INDEX_NAME} weight_map"
        for f in weight_map.values():
            resolve_inside(path, f, where)
            if not f.endswith(TORCH_SUFFIXES):
                raise CheckpointError(f"{where}: {f!r} is not a .bin / .pt / .pth file name")
        return [path / f for f in sorted(set(weight_map.values()))], weight_map
    found = torch_weight_files(path)
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path}: no {WEIGHTS_NAME}, {INDEX_NAME}, {TORCH_WEIGHTS_NAME} or {TORCH_INDEX_NAME}"
            + (f", and {len(found)} other weight files ({', '.join(f.name for f in found[:4])}): which one?"
               if found else ", and no .bin / .pt / .pth file"))
    return found, None


def torch_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files :class:`TorchReader` reads for ``path`` (none when it cannot tell)."""
    try:
        return _torch_layout(Path(path))[0]
    except (ValueError, OSError):
        return []


def torch_weight_files(folder: Path) -> list[Path]:
    """The ``.bin`` / ``.pt`` / ``.pth`` files of a folder that may hold weights (not :data:`NOT_WEIGHTS`)."""
    return sorted(f for f in folder.iterdir()
                  if f.suffix in TORCH_SUFFIXES and f.is_file() and not NOT_WEIGHTS.match(f.name))


def is_torch_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`open_weights` reads ``path`` with :class:`TorchReader` (no safetensors weights there)."""
    p = Path(path)
    if p.is_file():
        return p.suffix in TORCH_SUFFIXES
    if not p.is_dir() or (p / WEIGHTS_NAME).is_file() or (p / INDEX_NAME).is_file():
        return False
    return (p / TORCH_WEIGHTS_NAME).is_file() or (p / TORCH_INDEX_NAME).is_file() or bool(torch_weight_files(p))


def open_weights(path: str | os.PathLike[str]) -> StreamingReader | TorchReader:
    """A reader for a checkpoint folder or file: :class:`StreamingReader` for safetensors (preferred when a
    folder has both, as ``transformers`` does), else :class:`TorchReader` for PyTorch pickles."""
    p = Path(path)
    if is_torch_checkpoint(p):
        return TorchReader(p)
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file() and not (p / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{p}: no weights: no {WEIGHTS_NAME}, {INDEX_NAME}, {TORCH_WEIGHTS_NAME}, "
                                f"{TORCH_INDEX_NAME} or .pt / .pth file in this directory")
    return StreamingReader(p)


# ------------------------------------------------------------------------------------------ sharded output
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|[kmgtb])?\s*$", re.IGNORECASE)
_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "b": 10**9,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str, flag: str = "--out-shard-size") -> int:
    """Bytes from ``1000000``, ``500MB``, ``5GB``, ``2GiB`` or mergekit's ``5B`` / ``500M`` / ``10K`` (``B``: a
    billion); ``ValueError`` naming ``flag`` for anything else or a size below 1 byte."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{flag}: expected a size such as 5GB, 500MB, 2GiB or 1000000 (bytes), got {text!r}")
    unit = (m.group(2) or "").lower()
    unit = unit[:-1] if len(unit) > 1 and unit.endswith("b") else unit
    value = float(m.group(1)) * _UNITS.get(unit, 1)
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(f"{flag}: {text!r} is too large; expected a size such as 5GB (at most 2^63 bytes)")
    size = int(value)
    if size < 1:
        raise ValueError(f"{flag}: {text!r} is less than one byte")
    return size


def shard_plan(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int | None) -> list[list[str]]:
    """Keys (sorted) split greedily into shards of at most ``max_bytes`` bytes, as mergekit does: a tensor
    starts a new shard when it would take a non-empty shard past the limit, so a tensor larger than the limit
    is alone in its shard. One shard with every key when ``max_bytes`` is None."""
    shards: list[list[str]] = [[]]
    size = 0
    for k in sorted(specs):
        dtype, shape = specs[k]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


class ShardedWeightsWriter:
    """Write the weights of ``folder`` tensor by tensor, in one ``model.safetensors`` or, when
    :func:`shard_plan` with ``max_shard_bytes`` gives several shards, ``model-00001-of-0000N.safetensors`` ...
    plus ``model.safetensors.index.json`` (``metadata.total_size``: the tensors' bytes; ``weight_map``).

    Same interface as :class:`~vlmerge.models.checkpoint.SafetensorsStreamWriter` (``write(name, tensor)``
    in any order, a context manager that discards everything on an exception); each shard is renamed into
    place when closed and the index written last, atomically.
    """

    def __init__(self, folder: str | os.PathLike[str], specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int | None = None, metadata: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        plan = shard_plan(specs, max_shard_bytes)
        n = len(plan)
        self.names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.weight_map = {k: name for name, keys in zip(self.names, plan, strict=True) for k in keys}
        self.total_size = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in specs.values())
        self._writers: dict[str, SafetensorsStreamWriter] = {}
        self._closed: list[str] = []
        try:
            for name, keys in zip(self.names, plan, strict=True):
                w = SafetensorsStreamWriter(self.folder / name, {k: specs[k] for k in keys}, metadata)
                self._writers[name] = w
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name!r} was not declared")
        self._writers[self.weight_map[name]].write(name, tensor)

    def close(self) -> None:
        try:
            for name, w in self._writers.items():
                w.close()
                self._closed.append(name)
        except BaseException:
            self.abort()
            raise
        if len(self.names) > 1:
            atomic_write_json(self.folder / INDEX_NAME, {"metadata": {"total_size": self.total_size},
                                                         "weight_map": dict(sorted(self.weight_map.items()))})

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        for name in self._closed:  # shards already renamed into place go too
            (self.folder / name).unlink(missing_ok=True)
        self._closed.clear()

    def __enter__(self) -> ShardedWeightsWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
