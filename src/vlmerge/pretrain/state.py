"""Training checkpoints: the model (``save_model``) plus optimiser / RNG / position in a separate state file.

Layout under the run directory::

    OUT/checkpoints/step-00000120/config.json, model.safetensors   a normal model checkpoint (load_model)
    OUT/checkpoints/step-00000120/train_state.safetensors          AdamW moments by parameter name, RNG states
    OUT/checkpoints/step-00000120/train_state.json                 stage, steps, optimiser hyper-parameters
    OUT/checkpoints/latest.json                                    {"dir": "step-00000120", ...}

A step folder is built whole in a temp folder beside it and renamed into place, and ``latest.json`` is
replaced only after that, so a run killed (or out of disk) at any moment resumes from the last complete
checkpoint; ``latest.json`` may only name a folder inside ``OUT/checkpoints``. Nothing is unpickled:
tensors are safetensors, everything else JSON. The learning-rate schedule is a pure function of the step
and needs no state; data order and every random draw of training are counter-based (seed, step), so
the step *is* their state. The global torch RNG states are stored anyway, for any code that uses them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..files import clean_stale_temps, make_temp_dir, resolve_inside
from ..models.checkpoint import CheckpointError, atomic_write_json, read_json, save_model, save_tensors
from ..models.vlmo import VLMo

log = logging.getLogger("vlmerge.pretrain")

LATEST = "latest.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
# the integer fields of ``train_state.json`` the engine resumes from
META_INTS = ("global_step", "stage_index", "stage_step", "world")
_STEP_TEMP = re.compile(r"^\.(step-\d{8})\.(?:tmp|old)-")
_STEP = re.compile(r"^step-\d{8}$")
# optimiser hyper-parameters in ``train_state.json`` ``optimizer_groups``: numbers (``betas`` a pair of them)
_GROUP_NUMBERS = ("lr", "initial_lr", "eps", "weight_decay")


def save_training_checkpoint(
    out_dir: Path, model: VLMo, optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int, **extra: Any
) -> Path:
    """Write ``OUT/checkpoints/step-{global_step}/`` and point ``latest.json`` at it; keep the last ``keep``.

    ``meta`` (JSON) must hold ``global_step``; ``extra`` goes into the model's ``config.json``. The step
    folder is built whole in a temp folder beside it and renamed into place, then ``latest.json`` is
    replaced: a save that fails (disk full) or is killed leaves the previous checkpoint as the latest and
    no partial step folder (temps of a killed save are removed by the next save).
    """
    root = out_dir / "checkpoints"
    ckpt = root / f"step-{meta['global_step']:08d}"
    root.mkdir(parents=True, exist_ok=True)
    clean_step_temps(root)
    tmp = make_temp_dir(ckpt)
    placed = False
    try:
        save_model(model, tmp, **extra)
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        sd = optimizer.state_dict()
        groups = []
        for g in sd["param_groups"]:
            for idx, name in zip(g["params"], g["param_names"], strict=True):
                for key, value in sd["state"].get(idx, {}).items():
                    tensors[f"optim.{name}.{key}"] = value
            groups.append({k: v for k, v in g.items() if k != "params"})
        save_tensors(tmp / STATE_TENSORS, tensors)
        atomic_write_json(tmp / STATE_JSON, {**meta, "optimizer_groups": groups})
        _place(tmp, ckpt)
        placed = True
        atomic_write_json(root / LATEST, {"dir": ckpt.name, "global_step": meta["global_step"]})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if placed:  # complete, but latest.json does not point to it: not a checkpoint of this run
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    previous = sorted(p for p in root.glob("step-*") if p.is_dir() and p != ckpt)
    for old in previous[: max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def _place(tmp: Path, ckpt: Path) -> None:
    """Rename the finished folder ``tmp`` to ``ckpt``. An existing ``ckpt`` (a step a killed run saved after
    the latest checkpoint, now redone) is moved aside first, as ``.{name}.old-{pid}-*/ckpt``, so that a kill
    between the two renames leaves it where :func:`~vlmerge.files.clean_stale_temps` restores it."""
    if not ckpt.exists():
        os.rename(tmp, ckpt)
    else:
        old = make_temp_dir(ckpt, kind="old")
        os.rename(ckpt, old / "ckpt")
        os.rename(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(ckpt.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_step_temps(root: Path) -> list[Path]:
    """Remove the ``.step-XXXXXXXX.tmp-PID-*`` / ``.old-`` folders that killed saves left in ``root``."""
    names = sorted({m[1] for e in root.iterdir() if (m := _STEP_TEMP.match(e.name))}) if root.is_dir() else []
    return [p for name in names for p in clean_stale_temps(root / name, quiet=True)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The directory ``latest.json`` points to, or None when the run has no checkpoint yet.

    ``latest.json`` must be ``{"dir": "<name inside OUT/checkpoints>", ...}``; anything else (an absolute path,
    a ``..`` escape to another run, a number, no ``dir``) is a :class:`CheckpointError`. Without
    ``latest.json`` (deleted by hand), the newest ``step-*`` folder with a training state is the latest: step
    folders are renamed into place whole, so each one is complete, and a run never restarts from step 0 over
    its own checkpoints.
    """
    pointer = out_dir / "checkpoints" / LATEST
    if pointer.exists() and not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a file; expected the JSON pointer to the latest checkpoint")
    if not pointer.is_file():
        steps = sorted(p for p in pointer.parent.glob("step-*") if _STEP.match(p.name) and (p / STATE_JSON).is_file())
        if steps:
            log.warning("%s is missing: resuming from the newest step folder, %s", pointer, steps[-1].name)
        return steps[-1] if steps else None
    data = read_json(pointer)
    if not isinstance(data, dict) or "dir" not in data:
        raise CheckpointError(f'{pointer}: expected {{"dir": "step-XXXXXXXX", ...}} naming a checkpoint folder '
                              f"inside {pointer.parent}, got {' '.join(json.dumps(data).split())[:80]}")
    try:
        ckpt = resolve_inside(pointer.parent, data["dir"], f"{pointer} 'dir'")
    except ValueError as e:
        raise CheckpointError(f"{e}; expected a checkpoint folder of this run") from None
    if not (ckpt / STATE_JSON).is_file():
        raise CheckpointError(f"{pointer} points to {ckpt}, which has no {STATE_JSON}")
    return ckpt


def read_state_meta(ckpt: Path) -> dict[str, Any]:
    """``train_state.json``, checked to hold what resuming needs (:data:`META_INTS`, ``optimizer_groups``)."""
    path = ckpt / STATE_JSON
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in META_INTS:
        if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise CheckpointError(f"{path}: {key!r} must be an integer >= 0, got {meta.get(key, 'nothing')!r}")
    groups = meta.get("optimizer_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("param_names"), list)
                                               for g in groups):
        raise CheckpointError(f"{path}: 'optimizer_groups' must be a list of objects with 'param_names'")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    for i, g in enumerate(groups):
        for key in _GROUP_NUMBERS:
            if key in g and not number(g[key]):
                raise CheckpointError(f"{path}: optimizer_groups[{i}].{key}={g[key]!r}; expected a finite number >= 0")
        betas = g.get("betas", (0.9, 0.999))
        if not (isinstance(betas, list | tuple) and len(betas) == 2 and all(number(b) and b < 1 for b in betas)):
            raise CheckpointError(f"{path}: optimizer_groups[{i}].betas={betas!r}; expected two numbers in [0, 1)")
    if "stage" in meta and not isinstance(meta["stage"], str):
        raise CheckpointError(f"{path}: 'stage' must be a stage name, got {meta['stage']!r}")
    return meta


def check_training_state(ckpt: Path) -> None:
    """Check, from its header alone, that ``ckpt``'s training state is a safetensors file with an RNG state
    (so that a resume fails before any data is built, not at the first stage)."""
    path = ckpt / STATE_TENSORS
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the training state of {ckpt})")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({' '.join(str(e).split())})") from None
    if "rng.cpu" not in keys:
        raise CheckpointError(f"{path}: no 'rng.cpu' tensor; not a training state")


# Optimiser group settings: where the run's state lives (taken from the checkpoint), how the optimiser computes
# (must agree with this run's: a saved ``maximize: true`` would train uphill) and how it is implemented (this
# run's own: resuming a CPU run on a GPU may switch foreach / fused).
_GROUP_STATE = ("lr", "initial_lr", "betas", "eps", "weight_decay", "param_names")
_GROUP_MATH = ("amsgrad", "maximize", "decoupled_weight_decay")
_GROUP_IMPL = ("foreach", "capturable", "differentiable", "fused")


def _resumed_group(path: Path, i: int, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The optimiser group to load: ``current`` with the run state of ``saved``; ``CheckpointError`` naming the
    key when ``saved`` holds an unknown key or a computation setting that differs from this run's."""
    unknown = sorted(set(saved) - set(_GROUP_STATE + _GROUP_MATH + _GROUP_IMPL))
    if unknown:
        raise CheckpointError(f"{path}: optimizer_groups[{i}] has unknown keys {unknown}; expected only "
                              f"{', '.join(_GROUP_STATE + _GROUP_MATH + _GROUP_IMPL)}")
    for key in _GROUP_MATH:
        if key in saved and key in current and saved[key] != current[key]:
            raise CheckpointError(f"{path}: optimizer_groups[{i}].{key}={saved[key]!r} but this run's optimiser has "
                                  f"{current[key]!r}; the checkpoint was not written by this kind of run")
    return {**current, **{k: saved[k] for k in _GROUP_STATE if k in saved}}


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimiser and the global RNG states from ``ckpt``; return its ``meta``.

    The optimiser must have been built over the same trainable parameters (checked by name).
    """
    meta = read_state_meta(ckpt)
    check_training_state(ckpt)
    path = ckpt / STATE_TENSORS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({' '.join(str(e).split())})") from None
    current = optimizer.state_dict()
    saved_groups = meta["optimizer_groups"]
    names = [g["param_names"] for g in current["param_groups"]]
    if names != [g["param_names"] for g in saved_groups]:
        raise CheckpointError(f"{ckpt}: optimiser parameters differ from this stage's trainable parameters")
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k!r} contains NaN or Inf; the run cannot resume from it")
        if k.startswith("optim."):
            if "." not in k[len("optim."):]:
                raise CheckpointError(f"{path}: tensor {k!r} is not 'optim.<parameter>.<state>'")
            name, key = k[len("optim."):].rsplit(".", 1)
            by_name.setdefault(name, {})[key] = v
    state = {idx: by_name[name] for g in current["param_groups"]
             for idx, name in zip(g["params"], g["param_names"], strict=True) if name in by_name}
    groups = [_resumed_group(ckpt / STATE_JSON, i, saved, g) for i, (saved, g) in
              enumerate(zip(saved_groups, current["param_groups"], strict=True))]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: the training state does not fit this run ({e})") from None
    return meta
