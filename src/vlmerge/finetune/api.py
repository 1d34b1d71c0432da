"""The fine-tuning API the study calls: :func:`finetune`, :func:`evaluate`, :func:`zero_shot`.

A fine-tuned checkpoint is a model directory (``load_model`` reads it) whose ``config.json`` keeps the
initial checkpoint's extras (tokenizer, pixel mean / std, pre-training and merge records) and adds
``finetune``: the task, the resolved config, the initial checkpoint, what was trained and the metrics.
``OUT/metrics.json`` holds the metrics on their own.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import default_tokenizer
from ..data.cache import check_cache_root
from ..data.datasets import MEAN, STD
from ..files import clean_stale_temps, guard_output_dir, locked_run_folder, make_temp_dir, publish_dir
from ..models import VLMo, load_model, load_model_config, save_model
from ..models.checkpoint import CONFIG_NAME, atomic_write_json
from .config import MODEL_PRESET_TO_FT, FinetuneConfig, parse_sets, read_yaml, resolve_config
from .data import load_split, tokenizer_from_config
from .engine import steps_for, train
from .model import build_task_model, checkpoint_extras, resolve_scope, trainable_names
from .tasks import Prep, get_task, task_names
from .unified import UNIFIED_FINETUNE_TASKS, task_for, unified_record

log = logging.getLogger("vlmerge.finetune")

ConfigLike = FinetuneConfig | Mapping[str, Any] | str | os.PathLike[str] | None


# ---------------------------------------------------------------------------------------------- resolution
def infer_preset(init: str | os.PathLike[str] | VLMo) -> str:
    """The fine-tuning preset for a checkpoint: its ``config.json`` ``"preset"`` if recorded, else the model
    preset whose width, depth and heads it has (``micro`` / ``tiny``; ``vit-*`` -> ``paper``), else ``paper``
    for a ≥ 12-layer model and ``tiny`` otherwise."""
    from ..models import PRESETS

    if isinstance(init, VLMo):
        config, extras = init.config, {}
    else:
        config, extras = load_model_config(init), checkpoint_extras(init)
    preset = extras.get("preset")
    if isinstance(preset, str) and preset in MODEL_PRESET_TO_FT:
        return MODEL_PRESET_TO_FT[preset]
    by_depth = "paper" if config.depth >= 12 else "tiny"
    for name, fields in PRESETS.items():  # the model's size (width, depth, heads), whatever its resolution
        if all(getattr(config, k) == fields[k] for k in ("embed_dim", "depth", "num_heads")):
            return MODEL_PRESET_TO_FT.get(name, by_depth)  # a new model preset needs no entry here
    return by_depth


def _user_config(config: ConfigLike) -> Mapping[str, Any] | FinetuneConfig | None:
    if isinstance(config, (str, os.PathLike)):
        return read_yaml(config)
    return config


def make_config(task: str, init: str | os.PathLike[str] | VLMo, config: ConfigLike = None,
                sets: tuple[str, ...] | list[str] = (), preset: str | None = None) -> FinetuneConfig:
    """The resolved :class:`FinetuneConfig` for ``task`` from ``init`` (see :mod:`.config` for the order)."""
    user = _user_config(config)
    if isinstance(user, FinetuneConfig) and not sets and preset is None:
        if user.task != task:
            raise ValueError(f"config task={user.task!r} does not match the requested task {task!r}")
        return user
    if preset is None and isinstance(user, Mapping) and isinstance(user.get("preset"), str):
        preset = user["preset"]
    return resolve_config(task, preset or infer_preset(init), user, sets)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def pixel_stats(value: Any, key: str, where: str) -> tuple[float, float, float]:
    """``value`` as the 3 per-channel numbers of ``image_mean`` / ``image_std`` (a std must be > 0);
    ``ValueError`` naming ``where`` and ``key`` otherwise."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and (key != "image_std" or all(v > 0 for v in value))
    )
    if not ok:
        r = repr(value)
        r = r if len(r) <= 80 else r[:77] + "..."
        what = "positive" if key == "image_std" else "finite"
        raise ValueError(f"{where}: {key}={r} is invalid; expected 3 {what} numbers (one per RGB channel)")
    return (float(value[0]), float(value[1]), float(value[2]))


def checked_extras(extras: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A checkpoint's extras (a copy, values unchanged) once ``image_mean`` / ``image_std`` passed
    :func:`pixel_stats`: checked before any work is done."""
    for key in ("image_mean", "image_std"):
        if key in extras:
            pixel_stats(extras[key], key, where)
    return dict(extras)


def _prep(config: FinetuneConfig, model: VLMo, extras: Mapping[str, Any], tokenizer: Any) -> Prep:
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids would index past the word embedding
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's model has "
                         f"vocab_size={model.config.vocab_size}; the checkpoint needs its own tokenizer record "
                         "(config.json 'tokenizer') or a tokenizer of that size")
    return Prep(
        tokenizer=tokenizer,
        max_len=min(config.data.max_text_len or model.config.max_text_len, model.config.max_text_len),
        image_size=model.config.image_size,
        mean=pixel_stats(extras.get("image_mean", MEAN), "image_mean", "checkpoint extras"),
        std=pixel_stats(extras.get("image_std", STD), "image_std", "checkpoint extras"),
        augment_ops=config.augment_ops,
        augment_magnitude=config.augment_magnitude,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _tokenizer(extras: Mapping[str, Any], tokenizer: Any, root: str | os.PathLike[str] | None = None,
               where: str = "checkpoint") -> Any:
    if tokenizer is not None:
        return tokenizer
    if "tokenizer" in extras:
        return tokenizer_from_config(extras["tokenizer"], root=root, where=f"{where} 'tokenizer'")
    return default_tokenizer()


# ------------------------------------------------------------------------------------------------ finetune
def finetune(
    task: str,
    init_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ConfigLike = None,
    *,
    sets: tuple[str, ...] | list[str] = (),
    preset: str | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    tokenizer: Any = None,
    overwrite: bool = True,
) -> Path:
    """Fine-tune the checkpoint ``init_dir`` on ``task``, evaluate it on the eval split, save it to ``out_dir``.

    ``config``: a :class:`FinetuneConfig`, a dict of overrides, or a YAML path (None = the preset's
    defaults). ``train_data`` / ``eval_data`` replace the configured datasets (any map-style dataset of
    the task's items). Returns ``out_dir``, a checkpoint directory with ``metrics.json``.

    ``out_dir`` may not be, contain or lie inside the initial checkpoint, the config file or ``data.root``
    (checked with the config, before anything is written); an existing non-empty ``out_dir`` is replaced
    only with ``overwrite`` (``vlmerge finetune`` passes ``--overwrite``, default off). ``out_dir`` is locked
    for the run (a second fine-tune into it fails at once, :class:`~vlmerge.files.RunLocked`); the output is
    built in a temp folder beside it and renamed into place, so a failed run leaves ``out_dir`` as it was
    (and none at all where it did not exist).
    """
    get_task(task)  # an unknown name fails here, listing the tasks
    cfg = make_config(task, init_dir, config, sets, preset)
    reads = [init_dir, config if isinstance(config, (str, os.PathLike)) else None, cfg.data.root]
    out = guard_output_dir(out_dir, reads, overwrite, flag="--out")
    if cfg.data.cache_dir is not None:
        check_cache_root(cfg.data.cache_dir, "data.cache_dir", outputs=[out])
    with locked_run_folder(out, "fine-tuning output folder"):
        guard_output_dir(out, reads, overwrite, flag="--out")  # again, now that no one else writes it
        clean_stale_temps(out, quiet=True)
        _finetune(task, init_dir, out, cfg, train_data=train_data, eval_data=eval_data, tokenizer=tokenizer,
                  overwrite=overwrite)
        return Path(out_dir)


def _finetune(
    task: str, init_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], cfg: FinetuneConfig, *,
    train_data: Any = None, eval_data: Any = None, tokenizer: Any = None, overwrite: bool = True,
) -> Path:
    """:func:`finetune` once its config is resolved and ``out_dir`` is checked and locked."""
    t = task_for(task, cfg.head)
    if cfg.head == "task" and task not in task_names(trainable=True):
        raise ValueError(f"task {task!r} is evaluation-only; fine-tunable tasks: {list(task_names(trainable=True))} "
                         f"(with head=unified: {list(UNIFIED_FINETUNE_TASKS)})")
    where = str(Path(init_dir) / CONFIG_NAME)
    extras = checked_extras(checkpoint_extras(init_dir), where)
    tok = _tokenizer(extras, tokenizer, init_dir, where)
    d = cfg.data
    size = cfg.image_size or load_model_config(init_dir).image_size
    train_ds = train_data if train_data is not None else load_split(task, d.train_split, d, size, d.max_train)
    eval_ds = eval_data if eval_data is not None else load_split(task, d.eval_split, d, size, d.max_eval)

    torch.manual_seed(cfg.seed)  # new heads' initialisation
    heads = t.heads + (("itm",) if task == "retrieval" and cfg.itm_weight > 0 else ())
    model = build_task_model(init_dir, heads, cfg.image_size, **t.head_sizes(train_ds))
    device = _device(cfg.device)
    model.to(device)
    prep = _prep(cfg, model, extras, tok)
    scope = resolve_scope(cfg.scope, t.vision, model)
    names = trainable_names(model, scope, heads)
    loader = t.loader(train_ds, prep, cfg.batch_size, train=True, seed=cfg.seed, workers=d.workers)
    steps = steps_for(cfg.epochs, len(loader), cfg.max_steps)
    log.info("fine-tuning %s from %s: %d steps of %d, scope %s, %d examples", task, init_dir, steps,
             loader.batch_size, scope, len(train_ds))
    result = train(model, lambda m, b: t.loss(m, b, cfg), loader, names, steps=steps, lr=cfg.lr, warmup=cfg.warmup,
                   weight_decay=cfg.weight_decay, betas=cfg.betas, head_lr_mult=cfg.head_lr_mult,
                   layer_decay=cfg.layer_decay, grad_clip=cfg.grad_clip, log_every=cfg.log_every, device=device)
    metrics = t.evaluate(model, eval_ds, prep, cfg)
    metrics = {"task": task, "split": d.eval_split, **metrics}

    out = Path(out_dir)
    record = {"task": task, "init": str(init_dir), "scope": scope, "config": cfg.model_dump(mode="json"),
              "train": result.summary(), "metrics": metrics}
    keep = {k: v for k, v in extras.items() if k != "finetune"}
    if hasattr(tok, "to_config") and ("tokenizer" not in keep or tokenizer is None):
        keep["tokenizer"] = tok.to_config()  # the one rebuilt from the checkpoint: recorded self-contained
    if cfg.head == "unified":
        keep["unified"] = unified_record(tok)
    else:
        keep.pop("unified", None)  # a task head was added: no longer a unified model
    return _write_output(out, model.cpu(), keep, record, metrics, result.history, overwrite)


def _write_output(out: Path, model: VLMo, keep: Mapping[str, Any], record: Mapping[str, Any],
                  metrics: Mapping[str, Any], history: Any, overwrite: bool = True) -> Path:
    """Build the fine-tuned checkpoint in a temp folder beside ``out`` and put it in place of ``out``."""
    tmp = make_temp_dir(out)
    try:
        save_model(model, tmp, **keep, finetune=record)
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "train_log.json", history)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Rename ``tmp`` to ``out`` (:func:`~vlmerge.files.publish_dir`)."""
    publish_dir(tmp, out, overwrite, doing="fine-tuning", flag="--out")


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(
    task: str,
    model: str | os.PathLike[str] | VLMo,
    split: str = "test",
    config: ConfigLike = None,
    *,
    sets: tuple[str, ...] | list[str] = (),
    dataset: Any = None,
    tokenizer: Any = None,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """Score a checkpoint directory (or a model in memory) on ``task``'s ``split`` without training it.

    The config defaults to the one the checkpoint was fine-tuned with for this task (same data source),
    else to the preset's defaults. ``dataset`` replaces the configured split (e.g. a real-format dataset).
    For a model in memory, ``tokenizer`` defaults to the embedded world's and the pixel mean / std to 0.5.
    Returns the task's metrics with ``score`` (its headline), ``baseline``, ``task`` and ``split``.
    """
    get_task(task)
    if isinstance(model, VLMo):
        net, extras, where, source = model, {}, "model", "model"
    else:
        source = str(Path(model) / CONFIG_NAME)
        net, where = load_model(model), str(model)
        extras = checked_extras(checkpoint_extras(model), source)
    if image_mean is not None:
        extras["image_mean"] = pixel_stats(image_mean, "image_mean", "evaluate(image_mean=...)")
    if image_std is not None:
        extras["image_std"] = pixel_stats(image_std, "image_std", "evaluate(image_std=...)")
    ft = extras.get("finetune") if isinstance(extras.get("finetune"), Mapping) else None
    if config is None and ft is not None and ft.get("task") == task:
        if not isinstance(ft.get("config"), Mapping):
            raise ValueError(f"{source}: finetune.config is invalid; expected the object of the fine-tuning "
                             "config this checkpoint was trained with")
        base = {k: v for k, v in ft["config"].items() if k != "task"}
        cfg = make_config(task, model, base, sets)
    else:
        cfg = make_config(task, model, config, sets)
    head_given = "head" in parse_sets(sets) or (isinstance(config, Mapping) and "head" in config) or (
        isinstance(config, FinetuneConfig) and "head" in config.model_fields_set)
    if "unified" in extras and cfg.head == "task" and not head_given:  # a unified checkpoint answers in words
        cfg = cfg.model_copy(update={"head": "unified"})
    t = task_for(task, cfg.head)
    tok = _tokenizer(extras, tokenizer, None if isinstance(model, VLMo) else model, source)
    d = cfg.data
    ds = dataset if dataset is not None else load_split(task, split, d, net.config.image_size, d.max_eval)
    device = _device(cfg.device)
    training = net.training
    orig = next(net.parameters()).device
    net.to(device)
    try:
        metrics = t.evaluate(net, ds, _prep(cfg, net, extras, tok), cfg)
    finally:
        net.to(orig).train(training)
    return {"task": task, "split": split if dataset is None else "given", "checkpoint": where, **metrics}


def zero_shot(model: str | os.PathLike[str] | VLMo, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """Zero-shot scores of a pre-trained (or merged) model: dual-encoder retrieval, and ITM accuracy when
    the model has an ITM head."""
    config = model.config if isinstance(model, VLMo) else load_model_config(model)
    out = {"retrieval": evaluate("retrieval", model, split, **kwargs)}
    if "itm" in config.heads:
        out["itm"] = evaluate("itm", model, split, **kwargs)
    return out
