"""Training checkpoints: the model (``save_model``) plus optimiser / RNG / position in a separate state file.

Layout under the run directory::

    OUT/checkpoints/step-00000120/config.json, model.safetensors   a normal model checkpoint (load_model)
    OUT/checkpoints/step-00000120/train_state.safetensors          AdamW moments by parameter name, RNG states
    OUT/checkpoints/step-00000120/train_state.json                 stage, steps, optimiser hyper-parameters
    OUT/checkpoints/latest.json                                    {"dir": "step-00000120", ...}

Every file is written atomically, and ``latest.json`` is replaced only after the whole directory is
complete, so a run killed at any moment resumes from the last complete checkpoint. Nothing is unpickled:
tensors are safetensors, everything else JSON. The learning-rate schedule is a pure function of the step
and needs no state; data order and every random draw of training are counter-based (seed, step), so
the step *is* their state. The global torch RNG states are stored anyway, for any code that uses them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..models.checkpoint import CheckpointError, atomic_write_json, read_json, save_model, save_tensors
from ..models.vlmo import VLMo

LATEST = "latest.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def save_training_checkpoint(
    out_dir: Path, model: VLMo, optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int, **extra: Any
) -> Path:
    """Write ``OUT/checkpoints/step-{global_step}/`` and point ``latest.json`` at it; keep the last ``keep``.

    ``meta`` (JSON) must hold ``global_step``; ``extra`` goes into the model's ``config.json``.
    """
    root = out_dir / "checkpoints"
    ckpt = root / f"step-{meta['global_step']:08d}"
    save_model(model, ckpt, **extra)
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
    save_tensors(ckpt / STATE_TENSORS, tensors)
    atomic_write_json(ckpt / STATE_JSON, {**meta, "optimizer_groups": groups})
    atomic_write_json(root / LATEST, {"dir": ckpt.name, "global_step": meta["global_step"]})
    previous = sorted(p for p in root.glob("step-*") if p.is_dir() and p != ckpt)
    for old in previous[: max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The directory ``latest.json`` points to, or None when the run has no checkpoint yet."""
    pointer = out_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    ckpt = pointer.parent / read_json(pointer)["dir"]
    if not (ckpt / STATE_JSON).is_file():
        raise CheckpointError(f"{pointer} points to {ckpt}, which has no {STATE_JSON}")
    return ckpt


def read_meta(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / STATE_JSON)


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimiser and the global RNG states from ``ckpt``; return its ``meta``.

    The optimiser must have been built over the same trainable parameters (checked by name).
    """
    meta = read_meta(ckpt)
    tensors = load_file(str(ckpt / STATE_TENSORS))
    current = optimizer.state_dict()
    saved_groups = meta["optimizer_groups"]
    names = [g["param_names"] for g in current["param_groups"]]
    if names != [g["param_names"] for g in saved_groups]:
        raise CheckpointError(f"{ckpt}: optimiser parameters differ from this stage's trainable parameters")
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, key = k[len("optim."):].rsplit(".", 1)
            by_name.setdefault(name, {})[key] = v
    state = {idx: by_name[name] for g in current["param_groups"]
             for idx, name in zip(g["params"], g["param_names"], strict=True) if name in by_name}
    groups = [{**saved, "params": g["params"]} for saved, g in zip(saved_groups, current["param_groups"], strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
