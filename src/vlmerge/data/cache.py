"""Disk cache of generated scenes in ``.npz`` shards (no pickles), read back as a drop-in scene source.

Layout: ``DIR/meta.json`` (config, split, seed, n, shard size) and ``DIR/shard-00000.npz`` ... each with
``images`` [k, S, S, 3] uint8, ``masks`` [k, S, S] uint8, ``labels`` [k] and ``records`` [k] (JSON strings
with objects, captions and questions). Shards are written atomically, and an existing complete shard is
kept, so an interrupted ``write_cache`` resumes where it stopped.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..models.checkpoint import atomic_write_bytes, atomic_write_json, read_json
from .world import QA, Obj, Scene, World, WorldConfig


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def write_cache(world: World, n: int, out_dir: str | Path, shard_size: int = 1000, progress: bool = True) -> Path:
    """Generate the first ``n`` scenes of ``world`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(world.config), "split": world.split, "seed": world.seed, "n": n,
            "shard_size": shard_size}
    if (out / "meta.json").exists() and read_json(out / "meta.json") != meta:
        raise ValueError(f"{out / 'meta.json'}: the directory holds a different cache; use a new directory")
    for k in tqdm(range((n + shard_size - 1) // shard_size), desc=f"cache {world.split}", disable=not progress):
        if (out / _shard_name(k)).exists():
            continue
        scenes = [world[i] for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
        records = [json.dumps({"objects": [asdict(o) for o in s.objects], "captions": s.captions,
                               "questions": [asdict(q) for q in s.questions], "shift": s.shift}) for s in scenes]
        buf = io.BytesIO()
        np.savez(buf, images=np.stack([s.image for s in scenes]), masks=np.stack([s.mask for s in scenes]),
                 labels=np.array([s.label for s in scenes], dtype=np.int64), records=np.array(records))
        atomic_write_bytes(out / _shard_name(k), buf.getvalue())
    atomic_write_json(out / "meta.json", meta)
    return out


class CachedWorld:
    """Scenes read back from :func:`write_cache`'s shards; ``cached[i]`` equals ``world[i]``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        self.meta = read_json(self.dir / "meta.json")
        self.config = WorldConfig(**self.meta["config"])
        self.split, self.seed, self.n = self.meta["split"], self.meta["seed"], self.meta["n"]
        self._load = lru_cache(maxsize=2)(self._read_shard)

    def _read_shard(self, k: int) -> dict[str, np.ndarray]:
        path = self.dir / _shard_name(k)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard missing from the cache (re-run write_cache)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {key: z[key] for key in ("images", "masks", "labels", "records")}
        except (ValueError, OSError, KeyError) as e:
            raise ValueError(f"{path}: corrupt cache shard ({e})") from e

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a cache of {self.n} scenes ({self.dir})")
        shard = self._load(i // self.meta["shard_size"])
        j = i % self.meta["shard_size"]
        rec = json.loads(str(shard["records"][j]))
        return Scene([Obj(**o) for o in rec["objects"]], shard["images"][j], shard["masks"][j], rec["captions"],
                     [QA(**q) for q in rec["questions"]], int(shard["labels"][j]), rec["shift"])
