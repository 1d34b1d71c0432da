"""Checkpoints: safetensors weights + a JSON config beside them, read and written one tensor at a time.

A checkpoint is a directory::

    CKPT/config.json                      {"format": "vlmerge/1", "model": {...ModelConfig...}, ...}
    CKPT/model.safetensors                 the weights (or, sharded:)
    CKPT/model-00001-of-00003.safetensors  + CKPT/model.safetensors.index.json  {"weight_map": {key: file}}

Training state (optimiser, scheduler, RNG) is kept apart by the pre-training engine. Nothing is ever
unpickled. Every write goes to a temporary file in the same directory and is renamed into place, so a
killed process never leaves a half-written checkpoint under the final name.

Streaming: :class:`CheckpointReader` opens files lazily (``safe_open``) and hands out one tensor at a time;
:class:`SafetensorsStreamWriter` writes a safetensors file whose header is known in advance (names, dtypes,
shapes) tensor by tensor, so a merge holds one output tensor in memory, never a whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from ..files import atomic_write_bytes, make_temp_file, resolve_inside

FORMAT = "vlmerge/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype codes <-> torch dtypes (the subset a model uses).
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- atomic IO
def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def parse_json(raw: bytes, where: str) -> Any:
    """``raw`` (UTF-8 JSON) parsed; a :class:`CheckpointError` (a ``ValueError``) starting with ``where`` for
    bytes that are not UTF-8, invalid JSON, nesting too deep or a number too long to convert."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text (byte {e.start}); expected JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise CheckpointError(f"{where}: not readable JSON ({' '.join(str(e).split())[:160]})") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file, parsed by :func:`parse_json` (errors name the file). A leading UTF-8 byte-order mark is
    accepted (Windows editors write one), as in YAML configs and dataset files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return parse_json(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), str(path))


# ---------------------------------------------------------------------------------------- streaming writer
class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, given every (name, dtype, shape) up front.

    >>> w = SafetensorsStreamWriter(path, {"a": (torch.float32, (2, 3))})
    >>> w.write("a", torch.zeros(2, 3)); w.close()

    Tensors may be written in any order; :meth:`close` checks that all were written and renames the
    temp file into place. Used as a context manager, an exception discards the temp file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name in sorted(specs):
            dtype, shape = specs[name]
            if dtype not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (dtype, tuple(shape), offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(raw)
        fd, self._tmp = make_temp_file(self.path)
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise CheckpointError(f"{self.path}: tensor {name!r} was not declared")
        dtype, shape, offset, nbytes = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} declared {dtype} {list(shape)}, got {tensor.dtype} "
                f"{list(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous()
        self._f.seek(self._data_start + offset)
        if t.numel():
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self._layout) - self._written)
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: tensors never written: {', '.join(missing[:5])}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------- streaming reader
_Reader = TypeVar("_Reader", bound="WeightsReader")  # typing.Self needs Python 3.11; the project supports 3.10


class WeightsReader:
    """What every weights reader shares: the keys (``_where``: key -> the file that holds it), iteration,
    ``items`` / ``state_dict`` through ``get``, and ``close`` on leaving a ``with`` block. Subclasses set
    ``path`` and ``_where`` and define ``get``, ``shape``, ``dtype`` and ``close``."""

    path: Path
    _where: dict[str, Any]

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Reader) -> _Reader:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class CheckpointReader(WeightsReader):
    """Lazy, read-only view of a checkpoint directory (single-file or sharded) or a bare ``.safetensors``.

    ``reader.keys()``, ``reader.shape(k)``, ``reader.dtype(k)`` read only headers; ``reader.get(k)`` loads
    one tensor. ``reader.config`` is the parsed ``config.json`` (``{}`` for a bare file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = {}
        if self.path.is_file():
            files = {self.path.name: self.path}
            self._weight_map: dict[str, str] | None = None
        elif self.path.is_dir():
            if (self.path / CONFIG_NAME).is_file():
                self.config = read_json(self.path / CONFIG_NAME)
            if (self.path / WEIGHTS_NAME).is_file():
                files = {WEIGHTS_NAME: self.path / WEIGHTS_NAME}
                self._weight_map = None
            elif (self.path / INDEX_NAME).is_file():
                index = read_json(self.path / INDEX_NAME)
                if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                    raise CheckpointError(f"{self.path / INDEX_NAME}: expected a 'weight_map' object")
                self._weight_map = index["weight_map"]
                where = f"{self.path / INDEX_NAME} weight_map"
                for f in self._weight_map.values():  # every shard a name inside this folder
                    resolve_inside(self.path, f, where)
                    if not f.endswith(".safetensors"):
                        raise CheckpointError(f"{where}: {f!r} is not a .safetensors file name")
                files = {f: self.path / f for f in sorted(set(self._weight_map.values()))}
            else:
                raise FileNotFoundError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME} in this directory")
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        self.files: list[Path] = list(files.values())  # the weight files, in shard order
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for fname, fpath in files.items():
            if not fpath.is_file():
                raise FileNotFoundError(f"{fpath}: shard listed in {INDEX_NAME} is missing")
            try:
                h = self._stack.enter_context(safe_open(str(fpath), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                self._stack.close()
                raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from e
            self._handles[fname] = h
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if k in self._where:
                    raise CheckpointError(f"{fpath}: tensor {k!r} also stored in {self._where[k]}")
                self._where[k] = fname
        if self._weight_map is not None:
            for k, f in self._weight_map.items():
                if self._where.get(k) != f:
                    raise CheckpointError(f"{self.path / INDEX_NAME}: {k!r} mapped to {f} but not found there")

    def _handle(self, key: str) -> Any:
        if key not in self._where:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        return self._handles[self._where[key]]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._handle(key).get_slice(key).get_dtype()
        for dt, c in _DTYPES.items():
            if c == code:
                return dt
        raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")

    def close(self) -> None:
        self._stack.close()


# ------------------------------------------------------------------------------------------- whole-dict IO
def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write a state dict to one safetensors file (checks every tensor is finite)."""
    check_finite(tensors, source=str(path))
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with SafetensorsStreamWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor with a NaN or Inf."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k!r} contains NaN or Inf")


def save_checkpoint(
    out_dir: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (each atomically; weights first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, **dict(config)}
    save_tensors(out / WEIGHTS_NAME, {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                 metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, cfg)
    return out


def validate_state_dict(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Compare key sets and shapes; raise :class:`CheckpointError` listing exactly what differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {list(found[k])}, model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


# -------------------------------------------------------------------------------------------- model-level
def save_model(model: torch.nn.Module, out_dir: str | os.PathLike[str], **extra: Any) -> Path:
    """Save a :class:`~vlmerge.models.vlmo.VLMo` as ``out_dir/{model.safetensors, config.json}``.

    ``extra`` entries (e.g. ``tokenizer=tok.to_config()``, ``preset="tiny"``, ``merge={...}``) are stored in
    ``config.json`` beside ``"model"``.
    """
    return save_checkpoint(out_dir, model.state_dict(), {"model": model.config.to_dict(), **extra})


def load_model_config(ckpt_dir: str | os.PathLike[str]) -> Any:
    """The :class:`~vlmerge.models.vlmo.ModelConfig` stored in ``ckpt_dir/config.json``."""
    from .vlmo import ModelConfig

    path = Path(ckpt_dir) / CONFIG_NAME
    cfg = read_json(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected an object with a 'model' entry (a vlmerge checkpoint)")
    try:
        return ModelConfig.from_dict(cfg["model"], source=f"{path} 'model'")
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from e


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_checkpoint(reader: CheckpointReader, config: Any | None = None) -> Any:
    """Validate a vlmerge checkpoint before anything is computed from it; returns its ModelConfig.

    ``config.json`` must parse into a :class:`~vlmerge.models.vlmo.ModelConfig` (typed errors naming the
    file and key), the weights' keys and shapes must be exactly the ones that config's architecture
    defines (the first mismatches are named, the rest counted), and every tensor must be float32 / float16 /
    bfloat16 / float64 (an integer or float8 weight would be cast silently). ``CheckpointError`` otherwise.
    """
    from .vlmo import param_shapes

    if config is None:
        if not reader.path.is_dir():
            raise CheckpointError(f"{reader.path}: a bare weights file has no {CONFIG_NAME}; expected a "
                                  "checkpoint directory with config.json beside model.safetensors")
        config = load_model_config(reader.path)
    c = config
    where = (f"{reader.path}: the weights do not match the model in {CONFIG_NAME} (arch {c.arch}, embed_dim "
             f"{c.embed_dim}, depth {c.depth}, num_vl_layers {c.num_vl_layers})")
    validate_state_dict(param_shapes(config), {k: reader.shape(k) for k in reader}, where)
    check_float_dtypes(reader)
    return config


def check_float_dtypes(reader: CheckpointReader) -> None:
    """``CheckpointError`` naming the tensors that are not float32 / float16 / bfloat16 / float64."""
    bad = [f"{k} ({reader.dtype(k)})" for k in reader if reader.dtype(k) not in FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{reader.path}: {len(bad)} tensors are not floating point: {', '.join(bad[:8])}"
                              f"{' ...' if len(bad) > 8 else ''}; expected float32, float16, bfloat16 or float64")


def load_model(ckpt_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Any:
    """Build the model described by ``config.json`` and load its weights, validating keys, shapes, dtypes
    and values (:func:`check_checkpoint`, :func:`check_finite`)."""
    from .vlmo import VLMo

    with CheckpointReader(ckpt_dir) as reader:
        config = check_checkpoint(reader)
        state = reader.state_dict()
    check_finite(state, str(ckpt_dir))
    model = VLMo(config)
    model.load_state_dict(state)
    return model.to(device)
