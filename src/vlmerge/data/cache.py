"""Disk cache of generated examples in ``.npz`` shards (no pickles), read back as a drop-in :class:`World`.

Layout of a cache directory::

    meta.json          {"format", "kind", "config", "split", "seed", "n", "shard_size", "complete"}
    shard-00000.npz    examples 0 .. shard_size-1
    shard-00001.npz    ...

``kind`` is ``"scenes"`` (``world[i]``, m = 1 scene per example) or ``"nlvr2"`` (``world.nlvr2(i)``, m = 2:
left, right). Each shard of k examples holds ``images`` [k, m, S, S, 3] uint8, ``masks`` [k, m, S, S] uint8,
``labels`` [k] int64 (the class label, or the NLVR2 truth), and the text as JSON: ``records`` [bytes] uint8
(UTF-8 JSON objects back to back, with objects, captions, questions and the statement) cut by
``record_offsets`` [k + 1] int64.

Shards are written atomically (temp file + ``os.replace``) after ``meta.json`` marks the cache incomplete,
and ``meta.json`` is marked complete last, so an interrupted :func:`write_cache` resumes (keeping finished
shards) and a reader never sees a half-written cache. Readers memory-map the shards' arrays (their bytes
are stored uncompressed in the zip), so random access costs one copy of one example, not a shard load.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..models.checkpoint import atomic_write_bytes, atomic_write_json, read_json
from .world import COLOR_NAMES, QA, SHAPES, Meaning, NLVR2Example, Obj, Scene, Statement, World, WorldConfig

FORMAT = 1
CACHE_KINDS = ("scenes", "nlvr2")
SHARD_BYTES = 64 * 2**20  # default shard size: about this many bytes of pixels, at most 1000 examples
_LAYOUT_KEYS = ("format", "kind", "config", "split", "seed", "shard_size")


def default_shard_size(world: World, kind: str) -> int:
    """Examples per shard so that a shard's images and masks take about 64 MiB (16 to 1000 examples)."""
    per_example = (2 if kind == "nlvr2" else 1) * 4 * world.config.image_size ** 2
    return max(16, min(1000, SHARD_BYTES // per_example))


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def _config_record(config: WorldConfig) -> dict[str, Any]:
    """``config`` as recorded in ``meta.json``; ``size_scale`` only when it is not the default 1 (and
    ``shapes`` / ``colors`` only when they are subsets), so caches of the default world written before those
    fields existed still match."""
    d = asdict(config)
    if d["size_scale"] == 1.0:
        del d["size_scale"]
    for key, full in (("shapes", SHAPES), ("colors", COLOR_NAMES)):  # likewise the full vocabularies
        if d[key] == full:
            del d[key]
        else:
            d[key] = list(d[key])
    return d


def cache_folder(root: str | Path, world: World, kind: str = "scenes") -> Path:
    """The folder under ``root`` that holds ``world``'s cache of ``kind``: ``{split}-{size}px-seed{seed}``,
    then ``-nlvr2`` for NLVR2 examples and ``-world<hash>`` when the world's config is not the default at that
    size. One root can so serve every split, size, kind and world (a cache holds one layout; it grows to the
    largest ``n`` asked of it)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind={kind!r} is invalid; allowed values: {list(CACHE_KINDS)}")
    name = f"{world.split}-{world.config.image_size}px-seed{world.seed}"
    if kind != "scenes":
        name += f"-{kind}"
    record = _config_record(world.config)
    if record != _config_record(WorldConfig(image_size=world.config.image_size)):
        name += "-world" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / name


def _object_record(o: Obj) -> dict[str, Any]:
    """An object as recorded in a shard; ``scale`` only when it is not 1 (records written before it existed)."""
    d = asdict(o)
    if d["scale"] == 1.0:
        del d["scale"]
    return d


def _scene_record(s: Scene) -> dict[str, Any]:
    rec = {"objects": [_object_record(o) for o in s.objects], "captions": s.captions,
           "questions": [asdict(q) for q in s.questions], "label": s.label, "shift": s.shift}
    if s.meanings is not None:
        rec["meanings"] = [[m.kind, m.args] for m in s.meanings]
    return rec


def _frozen(x: Any) -> Any:
    """JSON lists back to the tuples a :class:`Meaning` holds."""
    return tuple(_frozen(v) for v in x) if isinstance(x, list) else x


def _scene_from_record(rec: dict[str, Any], image: np.ndarray, mask: np.ndarray) -> Scene:
    meanings = [Meaning(k, _frozen(a)) for k, a in rec["meanings"]] if "meanings" in rec else None
    return Scene([Obj(**o) for o in rec["objects"]], image, mask, rec["captions"],
                 [QA(**q) for q in rec["questions"]], rec["label"], rec["shift"], meanings)


def _shard_bytes(examples: list[tuple[list[Scene], int, dict[str, Any]]]) -> bytes:
    """One shard (see the module docstring) of examples given as (scenes, label, extra record fields)."""
    records = [json.dumps({"scenes": [_scene_record(s) for s in scenes], **extra}).encode()
               for scenes, _, extra in examples]
    buf = io.BytesIO()
    np.savez(buf,
             images=np.stack([np.stack([s.image for s in scenes]) for scenes, _, _ in examples]),
             masks=np.stack([np.stack([s.mask for s in scenes]) for scenes, _, _ in examples]),
             labels=np.array([label for _, label, _ in examples], dtype=np.int64),
             records=np.frombuffer(b"".join(records), dtype=np.uint8),
             record_offsets=np.cumsum([0, *map(len, records)], dtype=np.int64))
    return buf.getvalue()


def _map_npz(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every array of an uncompressed ``.npz`` (as ``np.savez`` writes it) read-only, without
    reading the data: each member's ``.npy`` header is parsed where the zip stores it. Raises ``ValueError``
    for compressed members, object (pickled) arrays or a truncated file."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not an uncompressed .npy array")
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename!r} has no local zip header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"member {info.filename!r} has unsupported .npy version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects (pickles are not allowed)")
            arrays[info.filename[:-4]] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                                   order="F" if fortran else "C")
    return arrays


def _shard_length(path: Path) -> int | None:
    """Number of examples in an existing, readable shard; None if it is missing or unreadable."""
    try:
        return int(_map_npz(path)["labels"].shape[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def read_cache_meta(path: Path) -> dict[str, Any]:
    """A cache's ``meta.json``, checked: an object with every layout key, ``n`` and ``shard_size`` positive
    integers, ``complete`` a boolean, ``config`` an object; ``ValueError`` naming the file otherwise."""
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a cache record (an object), got {type(meta).__name__}")
    missing = [k for k in (*_LAYOUT_KEYS, "n", "complete") if k not in meta]
    if missing:
        raise ValueError(f"{path}: not a vlmerge cache record (missing {missing}); use another directory")
    for key in ("n", "shard_size"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key}={value!r} is invalid; expected a positive integer")
    if not isinstance(meta["complete"], bool) or not isinstance(meta["config"], dict):
        raise ValueError(f"{path}: 'complete' must be true/false and 'config' an object")
    return meta


def cache_complete(folder: Path, n: int) -> bool:
    """Whether ``folder`` holds a complete cache of at least ``n`` examples (its record says so)."""
    try:
        meta = read_cache_meta(folder / "meta.json")
    except (ValueError, OSError):
        return False
    return bool(meta["complete"]) and meta["n"] >= n


def check_cache_root(root: str | Path, flag: str, outputs: Sequence[str | Path] = (),
                     needed: Sequence[tuple[Path, int]] = ()) -> None:
    """Refuse a cache root (``data.cache_dir``) before a run writes anything: a file, the working directory,
    one of the run's ``outputs``, a folder that holds anything but caches (a checkpoint, a run, a user's
    files), or a folder the run cannot write while a cache it ``needs`` ((folder, n) pairs) is not complete
    there. ``ValueError`` naming ``flag`` (``PermissionError`` for the unwritable folder: the environment)."""
    from ..files import check_output_path

    check_output_path(root, flag)
    path = Path(root).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {root} is a file; expected a folder for the scene cache")
    for o in outputs:
        if path.resolve() == Path(o).expanduser().absolute().resolve():
            raise ValueError(f"{flag} {root} is also the run's output folder; give the cache a folder of its own")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir()
                         if not p.name.startswith(".") and not (p.is_dir() and (p / "meta.json").is_file()))
        if foreign:
            raise ValueError(f"{flag} {root} holds {len(foreign)} entries that are not scene caches (e.g. "
                             f"{foreign[0]!r}); give a new folder, or one used only as a cache")
    above = next((p for p in (path, *path.parents) if p.exists()), None)
    missing = [f for f, n in needed if not cache_complete(f, n)]
    if missing and above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write the cache {missing[0].name} there ({flag})", str(above))


def write_cache(world: World, n: int, out_dir: str | Path, kind: str = "scenes",
                shard_size: int | None = None, progress: bool = True) -> Path:
    """Generate the first ``n`` examples of ``world`` (``kind`` "scenes": ``world[i]``; "nlvr2":
    ``world.nlvr2(i)``) into ``out_dir`` in shards of ``shard_size`` examples (default: the existing
    cache's, else :func:`default_shard_size`). An existing cache of the same world, kind and shard size is
    extended, never shrunk; one of anything else raises ``ValueError``. Returns ``out_dir``."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind={kind!r} is invalid; allowed values: {list(CACHE_KINDS)}")
    if n < 1:
        raise ValueError(f"cache size n={n} is invalid; allowed values: an integer ≥ 1")
    out = Path(out_dir)
    meta_path = out / "meta.json"
    old = read_cache_meta(meta_path) if meta_path.is_file() else None
    size = shard_size or (old["shard_size"] if old else default_shard_size(world, kind))
    layout = {"format": FORMAT, "kind": kind, "config": _config_record(world.config), "split": world.split,
              "seed": world.seed, "shard_size": size}
    if size < 1:
        raise ValueError(f"shard_size={shard_size} is invalid; allowed values: an integer ≥ 1")
    if old is None and any(out.glob("shard-*.npz")):
        raise ValueError(f"{out}: the directory has cache shards but no meta.json; use another directory")
    if old is not None:
        differ = [k for k in _LAYOUT_KEYS if old.get(k) != layout[k]]
        if differ:
            recorded, requested = {k: old.get(k) for k in differ}, {k: layout[k] for k in differ}
            raise ValueError(f"{out}: the directory holds a different cache (recorded {recorded}, requested "
                             f"{requested}); use another directory")
        n = max(n, old["n"])
        if old["complete"] and all(_shard_length(out / _shard_name(k)) == min(size, n - k * size)
                                   for k in range(-(-n // size))):
            return out  # complete, and every shard is there and readable: a deleted or truncated one is re-made
    atomic_write_json(meta_path, {**layout, "n": n, "complete": False})
    for k in tqdm(range(-(-n // size)), desc=f"cache {world.split} {kind}", disable=not progress):
        indices = range(k * size, min(n, (k + 1) * size))
        if _shard_length(out / _shard_name(k)) == len(indices):
            continue
        if kind == "scenes":
            examples = [([s], s.label, {}) for s in map(world.__getitem__, indices)]
        else:
            examples = [([ex.left, ex.right], int(ex.label), {"statement": asdict(ex.statement)})
                        for ex in map(world.nlvr2, indices)]
        atomic_write_bytes(out / _shard_name(k), _shard_bytes(examples))
    atomic_write_json(meta_path, {**layout, "n": n, "complete": True})
    return out


def open_cache(world: World, n: int, cache_dir: str | Path, kind: str = "scenes") -> CachedWorld:
    """The cache of ``world``'s first ``n`` examples of ``kind`` in ``cache_dir``, generated first (without
    a progress bar) where the directory has none or fewer examples."""
    write_cache(world, n, cache_dir, kind, progress=False)
    return CachedWorld(cache_dir)


class CachedWorld:
    """A cache written by :func:`write_cache`, read like the world it came from: ``cached[i]`` equals
    ``world[i]`` (kind "scenes") and ``cached.nlvr2(i)`` equals ``world.nlvr2(i)`` (kind "nlvr2"), for
    ``i < len(cached)``. Attributes ``config``, ``split``, ``seed``, ``kind``, ``n`` describe it."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        meta = read_cache_meta(self.dir / "meta.json")
        if meta.get("format") != FORMAT or not meta.get("complete"):
            raise ValueError(f"{self.dir}: not a complete cache of format {FORMAT} (re-run write_cache)")
        self.config = WorldConfig.from_dict(meta["config"])
        self.split, self.seed, self.kind, self.n = meta["split"], meta["seed"], meta["kind"], meta["n"]
        self._shard_size = meta["shard_size"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"CachedWorld({str(self.dir)!r}, kind={self.kind!r}, split={self.split!r}, n={self.n})"

    def __getstate__(self) -> dict[str, Any]:  # memory maps are re-opened, not pickled, in worker processes
        return {**self.__dict__, "_shards": {}}

    def _example(self, i: int, kind: str) -> tuple[list[Scene], int, dict[str, Any]]:
        if self.kind != kind:
            raise ValueError(f"{self.dir} caches {self.kind!r} examples, not {kind!r}")
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self.n:
            raise IndexError(f"index {i!r} out of range for a cache of {self.n} examples ({self.dir})")
        k, j = divmod(int(i), self._shard_size)
        if k not in self._shards:
            path = self.dir / _shard_name(k)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard missing from the cache (re-run write_cache)")
            try:
                self._shards[k] = _map_npz(path)
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: corrupt cache shard ({e})") from e
        a = self._shards[k]
        try:
            rec = json.loads(a["records"][a["record_offsets"][j]:a["record_offsets"][j + 1]].tobytes())
            scenes = [_scene_from_record(r, np.array(a["images"][j, m]), np.array(a["masks"][j, m]))
                      for m, r in enumerate(rec["scenes"])]
            return scenes, int(a["labels"][j]), rec
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{self.dir / _shard_name(k)}: corrupt cache shard ({e!r})") from e

    def __getitem__(self, index: int) -> Scene:
        return self._example(index, "scenes")[0][0]

    def nlvr2(self, index: int) -> NLVR2Example:
        (left, right), label, rec = self._example(index, "nlvr2")
        st = rec["statement"]
        return NLVR2Example(left, right, Statement(st["kind"], tuple(st["args"])), bool(label))
