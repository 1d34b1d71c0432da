"""The pre-training loop: stages of a recipe, DDP, accumulation, checkpoints, resume, metrics.

One code path for one CPU process, N gloo processes and N GPUs (``torchrun``). Read top to bottom:
:func:`pretrain` plans the stages, finds where to resume, and runs :func:`_train_stage` for each stage.

Run directory::

    OUT/config.yaml        the resolved config (a resumed run must match it)
    OUT/metrics.jsonl      one JSON object per log step / evaluation
    OUT/checkpoints/       training checkpoints (see :mod:`.state`)
    OUT/w0/                the weights at the start of the VL stage (W⁰ of modality arithmetic)
    OUT/final/             the pre-trained model (``load_model``), written last
    OUT/retrieval.json     zero-shot retrieval of the final model on the eval split

Bitwise reproducibility on CPU: model init, data order and every random draw are functions of the seed
and the step (:func:`~.dist.derive_seed`); the optimiser state is saved exactly; the schedule is a
function of the step. A run killed and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import read_yaml
from ..data.cache import check_cache_root
from ..files import RunLock, check_output_path, clean_stale_temps
from ..models.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_model, save_model
from ..models.vlmo import VLMo, maa_to_msa, meta_model
from . import dist
from .config import PretrainConfig, dump_config, validate_config
from .evaluate import evaluate_retrieval
from .flops import peak_flops, train_flops
from .inputs import PretrainData, build_data, cache_needs, pretrain_collate
from .losses import ObjectiveSettings, PretrainObjective
from .optim import build_optimizer, lr_at, set_lr
from .recipes import Stage, apply_freezing, heads_for, plan_stages
from .state import (
    LATEST,
    STATE_JSON,
    check_training_state,
    clean_step_temps,
    latest_checkpoint,
    load_training_state,
    read_state_meta,
    save_training_checkpoint,
)

log = logging.getLogger("vlmerge.pretrain")

# Settings that may change when a run is resumed: they do not change the weights.
RESUMABLE_KEYS = {"train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.eval_every", "train.peak_tflops",
                  "train.compile", "data.num_workers", "data.cache_dir"}


@dataclass
class _Run:
    """Everything a stage needs besides its model."""

    config: PretrainConfig
    out: Path
    data: PretrainData
    info: dist.DistInfo
    stages: list[Stage]
    micro: int
    accum: int
    metrics: _Metrics


def pretrain(
    config: PretrainConfig, out_dir: str | Path, *, data: PretrainData | None = None, stop_after: int | None = None,
    progress: bool = True,
) -> Path:
    """Pre-train (or resume pre-training) under ``out_dir``; returns ``OUT/final``.

    ``data`` replaces the default corpus (:func:`~.inputs.build_data`). ``stop_after``: stop once the global
    step reaches it, with a checkpoint (a later call resumes); the return value is then that checkpoint.
    Call under ``torchrun`` for several processes; every rank returns the same path.

    Every check of the config and of ``out_dir`` runs before the run folder is created; the main process then
    holds a :class:`~vlmerge.files.RunLock` on it for the whole run, so a second run on the same folder fails
    at once (:class:`~vlmerge.files.RunLocked`) instead of interleaving logs and checkpoints.
    """
    out = Path(out_dir)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be a step >= 1, got {stop_after}")
    info = dist.init_distributed(config.train.device)
    t = config.train
    micro = t.micro_batch_size or t.batch_size // info.world
    if micro < 1 or t.batch_size % (micro * info.world):
        raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={micro} × "
                         f"{info.world} processes")
    r = config.recipe
    stages = plan_stages(r.name, config.model.arch, t.steps, r.seed_steps, r.image_steps, r.text_steps)
    _check_out(out, config)
    knows_truth = data is None or callable(getattr(data.train, "relevance", None))
    if config.loss.false_negatives == "exclude" and not knows_truth:
        raise ValueError("loss.false_negatives=exclude needs a train set that knows which captions are true of "
                         "which images (a relevance() method, as the embedded world's); this corpus has none")
    dist.barrier()  # every rank has checked ``out`` before the main process writes there (a temp file would fail it)
    with ExitStack() as held:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(out, "pre-training run folder"))
            _clean_temps(out)
            atomic_write_bytes(out / "config.yaml", dump_config(config).encode())
        dist.barrier()
        return _pretrain(config, out, data, info, stages, micro, stop_after, progress)


def _pretrain(config: PretrainConfig, out: Path, data: PretrainData | None, info: dist.DistInfo, stages: list[Stage],
              micro: int, stop_after: int | None, progress: bool) -> Path:
    """The run itself, once ``out`` is checked, locked and holds the config."""
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    # Where to start: the last checkpoint's stage and step, or the very beginning (checked before the data).
    ckpt = latest_checkpoint(out)
    meta: dict[str, Any] = {}
    model, stage_idx, stage_step = None, 0, 0
    if ckpt is not None:
        meta = read_state_meta(ckpt)
        stage_idx, stage_step = meta["stage_index"], meta["stage_step"]
        # by index, not name: the study resumes a seed recipe from the MAA run's own "vl" stage (the same steps)
        if stage_idx >= len(stages) or stage_step > stages[stage_idx].steps:
            raise CheckpointError(f"{ckpt / STATE_JSON}: stage_index={stage_idx}, stage_step={stage_step} is not a "
                                  f"step of this run's stages {[(s.name, s.steps) for s in stages]}")
        if stage_step < stages[stage_idx].steps:  # resumed inside the stage: from its optimiser state
            check_training_state(ckpt)
    data = data or build_data(config)
    t = config.train
    run = _Run(config, out, data, info, stages, micro, t.batch_size // (micro * info.world),
               _Metrics(out, info.is_main))
    if ckpt is not None:
        if meta["world"] != info.world and info.is_main:
            log.warning("resuming a %d-process run on %d processes: results will not be bitwise equal",
                        meta["world"], info.world)
        model = load_model(ckpt)
        if stage_step == stages[stage_idx].steps:  # the checkpoint closed its stage
            stage_idx, stage_step, ckpt = stage_idx + 1, 0, None
        run.metrics.truncate(meta["global_step"])

    bar = tqdm(total=t.steps, initial=sum(s.steps for s in stages[:stage_idx]) + stage_step, unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    for i in range(stage_idx, len(stages)):
        stage = stages[i]
        if stage_step == 0:
            model = _enter_stage(run, stage, model)
            if i == len(stages) - 1:
                _save_main(run, model, out / "w0", w0=True)
        model = model.to(info.device)
        done = _train_stage(run, i, model, stage_step, ckpt, stop_after, bar)
        if not done:
            bar.close()
            dist.barrier()
            return latest_checkpoint(out)  # type: ignore[return-value]
        stage_step, ckpt = 0, None
    bar.close()

    model = model.to(info.device)  # type: ignore[union-attr]
    if info.is_main:
        result = evaluate_retrieval(model, data.eval, data.tokenizer, mean=data.mean, std=data.std)
        run.metrics.write({"step": t.steps, "stage": "final", "eval": result})
        atomic_write_json(out / "retrieval.json", result)
    _save_main(run, model, final)
    return final


# ------------------------------------------------------------------------------------------------ stages
def _enter_stage(run: _Run, stage: Stage, previous: VLMo | None) -> VLMo:
    """The model a stage starts from: fresh, expanded from the previous stage, or the previous one as is."""
    heads = heads_for(run.config.recipe.name)
    cfg = run.config.build_model_config(run.data.tokenizer.vocab_size, heads, arch=stage.arch)
    if stage.init == "scratch":
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            # one init per seed, whichever recipe's first stage it starts: a seed stage (wsd) is then the MAA
            # trained from scratch up to its own decay
            torch.manual_seed(dist.derive_seed(run.config.train.seed, "init"))
            return VLMo(cfg)
    assert previous is not None, f"stage {stage.name!r} needs the previous stage's model"
    if stage.init == "continue":
        return previous
    state = maa_to_msa({k: v.cpu() for k, v in previous.state_dict().items()}, cfg)
    model = meta_model(cfg)
    model.load_state_dict(state, assign=True)
    return model


def _train_stage(run: _Run, index: int, model: VLMo, start: int, ckpt: Path | None, stop_after: int | None,
                 bar: tqdm) -> bool:
    """Train stage ``index`` from its step ``start`` (restoring the optimiser from ``ckpt`` when given).

    Returns False when ``stop_after`` stopped it early (after writing a checkpoint).
    """
    cfg, info, stage = run.config, run.info, run.stages[index]
    t, o, lc = cfg.train, cfg.optim, cfg.loss
    base = sum(s.steps for s in run.stages[:index])  # global step of this stage's step 0
    apply_freezing(model, stage.kind)
    optimizer = build_optimizer(model, o.lr, o.weight_decay, tuple(o.betas), o.eps)  # type: ignore[arg-type]
    if ckpt is not None:
        load_training_state(ckpt, optimizer)
    if t.compile:
        for block in model.blocks:
            block.compile()
    settings = ObjectiveSettings(lc.itc, lc.itm, lc.mlm, lc.mlm_prob, lc.mim_mask_ratio,
                                 lc.hard_negatives == "global", cfg.augment.num_ops, cfg.augment.magnitude,
                                 cfg.augment.ops, lc.itm_fraction, lc.false_negatives == "exclude")
    relevance = None
    if settings.exclude_false_negatives and stage.kind == "vl":
        relevance = _train_relevance(run.data)
        # a plain tensor on the device, not a buffer: DDP would broadcast a buffer every step
        relevance = relevance.to(info.device) if relevance is not None else None
    objective = PretrainObjective(model, stage.kind, settings, run.data.special, run.data.mean, run.data.std,
                                  relevance)
    objective = objective.to(info.device).train()
    net: torch.nn.Module = objective
    if info.world > 1:
        net = DistributedDataParallel(objective, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    cuda = info.device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and t.precision == "bf16" else nullcontext())
    sampler = dist.StreamSampler(len(run.data.train), dist.derive_seed(t.seed, "data"), run.micro, info.world,
                                 info.rank, run.accum, start_step=base + start)
    collate = pretrain_collate(run.data.tokenizer, model.config.max_text_len, pad_to_longest=info.world == 1)
    loader = DataLoader(run.data.train, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=cuda,
                        collate_fn=collate)
    batches = iter(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    warmup = min(o.warmup_steps, stage.steps // 2)
    step_flops = train_flops(model.config, stage.kind, t.batch_size, model.config.max_text_len)
    peak = peak_flops(info.device, t.peak_tflops)
    run.metrics.start(stage.name, step_flops, peak, info.world, t.batch_size)

    for step in range(start, stage.steps):
        g = base + step
        set_lr(optimizer, lr_at(step, stage.steps, o.lr, warmup, o.schedule, o.min_lr_ratio,
                                decay_frac=o.decay_frac))
        for a in range(run.accum):
            batch = {k: v.to(info.device, non_blocking=True) for k, v in next(batches).items()}
            gen = dist.generator(info.device, t.seed, "step", g, a, info.rank)
            sync = net.no_sync() if info.world > 1 and a < run.accum - 1 else nullcontext()  # type: ignore[operator]
            with sync:
                with autocast:
                    out = net(batch, gen)
                (out["loss"] / run.accum).backward()
            run.metrics.add(out)
        if o.grad_clip:
            run.metrics.add({"grad_norm": torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.metrics.step()
        bar.update(1)

        g += 1
        last = step + 1 == stage.steps
        if g % t.log_every == 0 or last:
            row = run.metrics.flush(g, optimizer.param_groups[0]["lr"])
            bar.set_postfix(stage=stage.name, loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}")
        if t.eval_every and g % t.eval_every == 0 and not last and info.is_main:
            run.metrics.write({"step": g, "stage": stage.name, "eval": evaluate_retrieval(
                model, run.data.eval, run.data.tokenizer, mean=run.data.mean, std=run.data.std)})
            objective.train()
        stop = g == stop_after and g < t.steps
        if g % t.ckpt_every == 0 or last or stop:
            meta = {"global_step": g, "stage_index": index, "stage": stage.name, "stage_step": step + 1,
                    "world": info.world, "seed": t.seed}
            if info.is_main:
                save_training_checkpoint(run.out, model, optimizer, meta, t.keep_ckpts, **_extra(run, meta))
            dist.barrier()
        if stop:
            return False
    return True


def _train_relevance(data: PretrainData) -> torch.Tensor | None:
    """The train split's truthful relevance [I, T] bool (caption of pair t true of image i), where the corpus
    knows it (``train.relevance()``, the embedded world: I × 5I booleans, 45 MB for 3,000 images), else None."""
    own = getattr(data.train, "relevance", None)
    rel = own() if callable(own) else None
    if rel is None:
        return None
    rel = torch.as_tensor(np.asarray(rel), dtype=torch.bool)
    if rel.dim() != 2 or rel.shape[1] != len(data.train):
        raise ValueError(f"train.relevance() is {tuple(rel.shape)}; expected [images, {len(data.train)} pairs]")
    return rel


def _extra(run: _Run, meta: dict[str, Any]) -> dict[str, Any]:
    """What a saved model's ``config.json`` records beside the model config."""
    return {"tokenizer": run.data.tokenizer.to_config(), "image_mean": list(run.data.mean),
            "image_std": list(run.data.std), "pretrain": {**meta, "recipe": run.config.recipe.name}}


def _save_main(run: _Run, model: VLMo, where: Path, w0: bool = False) -> None:
    """Rank 0 saves ``model`` to ``where`` (all ranks wait)."""
    if run.info.is_main:
        stage = run.stages[-1]
        meta = {"global_step": sum(s.steps for s in run.stages[:-1]) if w0 else run.config.train.steps,
                "stage": stage.name, "w0": w0}
        save_model(model, where, **_extra(run, meta))
    dist.barrier()


def _check_out(out: Path, config: PretrainConfig) -> None:
    """Refuse ``out`` before anything is written: a file, a folder that holds something other than a
    pre-training run, or a run with a different config (up to :data:`RESUMABLE_KEYS`)."""
    check_output_path(out, "--out")
    if config.data.cache_dir is not None:  # found now, not after config.yaml is written
        check_cache_root(config.data.cache_dir, "data.cache_dir", outputs=[out], needed=cache_needs(config))
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if not (out / "config.yaml").is_file() and not (out / "checkpoints").is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty and holds no pre-training run (no config.yaml); "
                             "give a new or empty directory")
    path = out / "config.yaml"
    if path.is_file():
        saved = _flatten(validate_config(read_yaml(path), source=str(path)).to_dict())
        now = _flatten(config.to_dict())
        diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUMABLE_KEYS)
        if diff:
            raise ValueError(f"{out} holds a run with a different config (keys {diff}); use a new --out directory")


def _clean_temps(out: Path) -> None:
    """Remove the temp files and folders a killed run left in ``out`` (their writers' pids are gone)."""
    targets = [out / "config.yaml", out / "retrieval.json", out / "metrics.jsonl", out / "checkpoints" / LATEST]
    targets += [out / sub / name for sub in ("w0", "final") for name in ("config.json", "model.safetensors")]
    for target in targets:
        clean_stale_temps(target, quiet=True)
    clean_step_temps(out / "checkpoints")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# ----------------------------------------------------------------------------------------------- metrics
class _Metrics:
    """Running sums of the step outputs; on flush, rank means to ``metrics.jsonl`` (+ TensorBoard if installed)."""

    def __init__(self, out: Path, main: bool) -> None:
        self.path, self.main = out / "metrics.jsonl", main
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.tb = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def start(self, stage: str, step_flops: float, peak: float | None, world: int, batch: int) -> None:
        self.stage, self.step_flops, self.peak, self.world, self.batch = stage, step_flops, peak, world, batch
        self.t0, self.steps = time.perf_counter(), 0

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """Accumulate one micro-step's (or one optimizer step's) detached scalars."""
        for k, v in out.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def step(self) -> None:
        self.steps += 1

    def flush(self, step: int, lr: float) -> dict[str, Any]:
        """Average since the last flush over micro-steps and ranks; write and return the row."""
        keys = sorted(self.sums)
        means = dist.all_reduce_mean(torch.stack([self.sums[k] / self.counts[k] for k in keys])).tolist()
        elapsed = time.perf_counter() - self.t0
        row: dict[str, Any] = {"step": step, "stage": self.stage, "lr": lr, **dict(zip(keys, means, strict=True))}
        row["images_per_s"] = self.batch * self.steps / elapsed
        row["s_per_step"] = elapsed / self.steps
        if self.peak:
            row["mfu"] = self.step_flops * self.steps / elapsed / (self.peak * self.world)
        self.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)
        self.sums, self.counts = {}, {}
        self.t0, self.steps = time.perf_counter(), 0
        return row

    def write(self, row: dict[str, Any]) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """Drop rows logged after ``step`` (written before a kill, then redone by the resumed run)."""
        if self.main and self.path.is_file():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            atomic_write_bytes(self.path, "".join(r + "\n" for r in rows).encode())
