"""UnIVAL §5 on the embedded world: merging models fine-tuned on *different multimodal tasks*.

    vlmerge study unival --preset tiny --out docs/results/unival-tiny

One pre-trained VLMo (MSA, ITC + ITM + MLM) is fine-tuned on each task of ``tasks`` (default VQA, NLVR2,
classification, ITM) three ways (:mod:`vlmerge.finetune.soups`): **vanilla** (from the pre-trained model),
**Fusing** (from the average of the other tasks' vanilla models) and **Ratatouille** (each other task's vanilla
model fine-tuned again on the task, then averaged). Then:

* **Scenario 1 (Fig. 2)**: for each pair (A, B) of ``pairs``, W = λ·W_A + (1 − λ)·W_B over ``lambdas``, both
  tasks scored at each λ (test split; the validation split picks the best λ), vanilla and Ratatouille;
* **Scenario 2 (Fig. 3, ID)**: uniform soups (λ = 1/N) of the N vanilla / Fusing / Ratatouille models, task
  arithmetic, TIES and DARE on the vanilla task vectors, a greedy soup, scored on every seen task beside
  the specialists;
* **Scenario 3 (Table 20, OOD)**: the same merged models on unseen splits / question families (``ood``:
  ``vqa@ood`` = VQA on the held-out colour-shape compositions with shifted rendering; ``size`` and
  ``largest-color``: question families never trained on), without further training.

``head: unified`` (the default) uses UnIVAL's unified answer head (:mod:`vlmerge.finetune.unified`): every
model has the same parameters and merges whole. ``head: task`` fine-tunes task-specific heads (ITM becomes
retrieval); merges then combine the backbones and each task keeps its own head; the OOD question families
need the unified head and are skipped.

**Statistics** (:mod:`vlmerge.study.stats`). Every score is a mean over test examples and carries its
bootstrap replicates (:class:`~vlmerge.study.stats.Scores`): B resamples of the test set's examples, the same
resamples for every model scored on that set (split name ``unival/<task>/<split>``), so differences between
models are paired. With several ``--seeds`` the scores are seed means with ``<key>_std`` beside them and the
replicates averaged over seeds. Each finding is a :class:`~vlmerge.study.findings.Claim` with a margin (positive:
the paper's direction) evaluated on the point values and on every replicate: reproduced / contradicted /
inconclusive as its 95 % interval lies above 0 / below 0 / contains 0 (:func:`~vlmerge.study.findings.decide`).

Writes ``report.md`` (tables with intervals, PNG plots, the computed findings beside the paper's numbers),
``results.json`` (every score with ``ci`` {task: [lo, hi]}) and ``findings.json``. Pre-training and fine-tunes
are cells (:mod:`vlmerge.study.cells`): a re-run resumes. Their results are model directories only; the
evaluations (and so the per-example outcomes behind the intervals) are recomputed on every run, never cached.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import find_config
from ..models.checkpoint import atomic_write_bytes, atomic_write_json
from .cells import Cell, CellStore, config_hash
from .findings import Claim, Finding, evaluate_claims
from .report import OUTCOME_MARK
from .runner import load_preset
from .stats import (
    LEVEL,
    RESAMPLES,
    Scores,
    mean_over_seeds,
    mean_score,
    n_resamples,
    percentile_interval,
    replicate_view,
    retrieval_scores,
    with_intervals,
)

log = logging.getLogger("vlmerge.study")

ID_TASKS = ("vqa", "nlvr2", "cls", "itm")
OOD_TASKS = ("vqa@ood", "size", "largest-color")
RECIPES = ("vanilla", "fusing", "ratatouille")
TASK_HEAD_NAMES = {"vqa": "vqa", "nlvr2": "nlvr2", "cls": "cls", "itm": "retrieval"}
"""Task -> the fine-tuning task in task-head mode (ITM's task-head counterpart is retrieval)."""
LABELS = {"vqa": "VQA", "nlvr2": "NLVR2", "cls": "Cls", "itm": "ITM", "vqa@ood": "VQA (OOD split)",
          "size": "Size Qs (new family)", "largest-color": "Largest-colour Qs (new family)"}

# The paper's numbers (UnIVAL, arXiv 2307.16184v2), quoted beside ours.
PAPER = {
    "fig2_beats_specialist": "CIDEr of 0.8·Cap + 0.2·VQA 138.51 vs 136.52 for the Captioning model",
    "fig2_transfer": {"vanilla": [45.64, 66.03, 118.0], "ratatouille": [57.80, 72.91, 121.29],
                      "pairs": ["VQA→Captioning", "VE→VGround", "VGround→Captioning"]},
    "table20": {"vanilla": {"OKVQA": 38.06, "VizWiz": 13.57, "NoCaps": 94.39},
                "fusing": {"OKVQA": 35.12, "VizWiz": 15.63, "NoCaps": 93.58},
                "ratatouille": {"OKVQA": 38.97, "VizWiz": 18.48, "NoCaps": 95.28}},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnivalConfig(_Strict):
    """One preset (``configs/unival/<name>.yaml``)."""

    name: str
    head: Literal["unified", "task"] = "unified"
    pretrain: str | None = Field(None, description="pre-training config (relative to configs/ or a path); "
                                 "None = the pre-training defaults")
    pretrain_set: list[str] = Field(default_factory=list, description="dotted overrides of the pre-training config")
    finetune_preset: str = Field("micro", description="fine-tuning preset (configs/finetune/<task>.yaml section)")
    finetune_set: list[str] = Field(default_factory=list, description="fine-tuning overrides, every task and recipe")
    task_set: dict[str, list[str]] = Field(default_factory=dict, description="per-task fine-tuning overrides")
    ratatouille_set: list[str] = Field(default_factory=list, description="extra overrides of Ratatouille's re-tunes")
    tasks: list[Literal["vqa", "nlvr2", "cls", "itm"]] = Field(default_factory=lambda: list(ID_TASKS))
    ood: list[Literal["vqa@ood", "size", "largest-color"]] = Field(default_factory=lambda: list(OOD_TASKS))
    train_size: dict[str, int] = Field(default_factory=dict, description="train scenes per task (NLVR2: examples)")
    val_size: dict[str, int] = Field(default_factory=dict, description="validation scenes per task")
    test_size: dict[str, int] = Field(default_factory=dict, description="test scenes per task / OOD set")
    default_size: int = Field(200, ge=1, description="scenes for any task not listed in a *_size map")
    pairs: list[tuple[str, str]] = Field(default_factory=lambda: [("vqa", "cls"), ("vqa", "nlvr2")])
    lambdas: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    task_arithmetic: dict[str, Any] = Field(default_factory=lambda: {"lam": 0.5})
    ties: dict[str, Any] = Field(default_factory=lambda: {"density": 0.5, "lam": 1.0})
    dare: dict[str, Any] = Field(default_factory=lambda: {"drop": 0.5, "lam": 0.5, "normalize": False, "seed": 0})
    greedy: bool = Field(True, description="greedy soup over every fine-tuned model (validation-selected)")
    eval_batch_size: int = Field(256, ge=1)
    threads: int | None = Field(1, ge=1, description="torch intra-op threads while the study runs (None = torch's "
                                "default); models this small run faster on one, and immune to oversubscription")

    @field_validator("lambdas")
    @classmethod
    def _lams(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1)]
        if bad or not v:
            raise ValueError(f"lambdas {bad or v} are invalid; allowed range: [0, 1], at least one value")
        return v

    @model_validator(mode="after")
    def _check(self) -> UnivalConfig:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks}: need ≥ 2 distinct tasks; allowed values: {list(ID_TASKS)}")
        for a, b in self.pairs:
            if a not in self.tasks or b not in self.tasks or a == b:
                raise ValueError(f"pairs: ({a}, {b}) must be two different tasks of {self.tasks}")
        return self

    def size(self, which: str, task: str) -> int:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[which].get(
            task, self.default_size)


def load_unival_config(preset: str, overrides: Sequence[str] = ()) -> tuple[UnivalConfig, Path]:
    path = find_config(preset, "unival")
    return load_preset(path, UnivalConfig, "unival", overrides), path


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------------------------ the study
class Unival:
    """Runs every cell of one seed; :func:`run_unival` aggregates and reports."""

    def __init__(self, config: UnivalConfig, out: Path, seed: int, progress: bool = True) -> None:
        from ..pretrain import load_config

        self.cfg, self.out, self.seed, self.progress = config, out, seed, progress
        self.store = CellStore(out)
        self.base_cfg = load_config(config.pretrain or None, [*config.pretrain_set, f"train.seed={seed}"])
        self.cells: dict[str, dict[str, Any]] = {}
        self.data: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.templates: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # -- helpers -----------------------------------------------------------------------------------------
    def rel(self, p: str | Path) -> str:
        return Path(p).resolve().relative_to(self.out.resolve()).as_posix()

    def path(self, rel: str) -> Path:
        return self.out / rel

    def _cell(self, name: str, kind: str, spec: Mapping[str, Any], fn: Callable[[Cell], dict[str, Any]]
              ) -> dict[str, Any]:
        cell = self.store.cell(kind, spec)
        self.cells[name] = {"hash": cell.hash, "kind": kind}
        return self.store.run(kind, cell.spec, fn)

    @property
    def unified(self) -> bool:
        return self.cfg.head == "unified"

    def items(self, task: str, split: str) -> list[dict[str, Any]]:
        """Rendered items of ``task``'s ``split`` (an OOD name: its own split), cached in memory."""
        from ..finetune.unified import materialize, unified_dataset

        key = (task, split)
        if key not in self.data:
            name, sp = (task.split("@") + [split])[:2] if "@" in task else (task, split)
            size = self.cfg.size(split if split != "ood" else "test", task)
            ds = unified_dataset(name, sp, size, image_size=self.image_size, seed=self.base_cfg.data.seed)
            self.data[key] = materialize(ds)
        return self.data[key]

    # -- cells ------------------------------------------------------------------------------------------
    def pretrain(self) -> Path:
        from ..pretrain import pretrain, validate_config

        data = self.base_cfg.to_dict()

        def run(c: Cell) -> dict[str, Any]:
            final = pretrain(validate_config(data), c.dir / "run", progress=self.progress)
            return {"final": self.rel(final)}

        t0 = time.time()
        res = self._cell("pretrain", "pretrain", {"pretrain": data}, run)
        self.timings["pretrain_s"] = time.time() - t0
        return self.path(res["final"])

    def finetune(self, task: str, init: Path, out: Path, extra: Sequence[str] = ()) -> Path:
        """One fine-tune with the preset's settings (train / val data rendered once per process)."""
        from ..finetune import finetune

        name = task if self.unified else TASK_HEAD_NAMES[task]
        sets = [f"seed={self.seed}", f"head={self.cfg.head}", "device=cpu", *self.cfg.finetune_set,
                *self.cfg.task_set.get(task, []), *extra]
        return finetune(name, init, out, preset=self.cfg.finetune_preset, sets=sets,
                        train_data=self.items(task, "train"), eval_data=self.items(task, "val"))

    def _spec(self, **kw: Any) -> dict[str, Any]:
        return {"seed": self.seed, "head": self.cfg.head, "finetune_preset": self.cfg.finetune_preset,
                "finetune_set": self.cfg.finetune_set, "sizes": [self.cfg.size("train", t) for t in self.cfg.tasks]
                + [self.cfg.size("val", t) for t in self.cfg.tasks], **kw}

    def vanilla(self, task: str, base: Path) -> Path:
        def run(c: Cell) -> dict[str, Any]:
            return {"dir": self.rel(self.finetune(task, base, c.dir / "model"))}

        spec = self._spec(task=task, init=self.rel(base), task_set=self.cfg.task_set.get(task, []))
        return self.path(self._cell(f"vanilla/{task}", "ft-vanilla", spec, run)["dir"])

    def fusing(self, task: str, aux: Sequence[Path]) -> Path:
        from ..finetune.soups import fusing

        def run(c: Cell) -> dict[str, Any]:
            return {"dir": self.rel(fusing(task, aux, c.dir, lambda t, i, o: self.finetune(t, i, o)))}

        spec = self._spec(task=task, aux=[self.rel(a) for a in aux], task_set=self.cfg.task_set.get(task, []))
        return self.path(self._cell(f"fusing/{task}", "ft-fusing", spec, run)["dir"])

    def ratatouille(self, task: str, aux: Sequence[Path]) -> Path:
        from ..finetune.soups import ratatouille

        extra = self.cfg.ratatouille_set

        def run(c: Cell) -> dict[str, Any]:
            model, tuned = ratatouille(task, aux, c.dir, lambda t, i, o: self.finetune(t, i, o, extra))
            return {"dir": self.rel(model), "members": [self.rel(t) for t in tuned]}

        spec = self._spec(task=task, aux=[self.rel(a) for a in aux], task_set=self.cfg.task_set.get(task, []),
                          ratatouille_set=extra)
        return self.path(self._cell(f"ratatouille/{task}", "ft-ratatouille", spec, run)["dir"])

    # -- evaluation -------------------------------------------------------------------------------------
    def model_for(self, merged: Mapping[str, Any], task: str) -> Any:
        """The in-memory model evaluating ``task``: a unified state, or (task mode) ``merged[task]``."""
        state = merged if self.unified else merged[task.split("@")[0]]
        key = "unified" if self.unified else task.split("@")[0]
        m = self.templates[key]
        m.load_state_dict(dict(state), strict=True)
        return m.eval()

    def score(self, merged: Mapping[str, Any], task: str, split: str = "test") -> Scores:
        """``{task: score}`` (percent) with its bootstrap replicates over the split's test examples.

        The replicates come from the evaluation's ``per_example`` outcomes (task-head ITM, i.e. retrieval: the
        per-query ranks, resampling images) under the split name ``unival/<task>/<split>``, so every model
        scored on one split gets the same resamples (:func:`~.stats.resample_counts`) and differences are paired.
        """
        from ..finetune.config import FinetuneConfig
        from ..finetune.tasks import Prep, get_task
        from ..finetune.unified import evaluate_unified

        sp = "ood" if "@" in task else split
        items = self.items(task, sp)
        model = self.model_for(merged, task)
        name = f"unival/{task}/{sp}"
        kind = task.split("@")[0]
        with torch.no_grad():
            if self.unified:
                r = evaluate_unified(model, kind, items, self.tok, batch_size=self.cfg.eval_batch_size)
            else:
                prep = Prep(self.tok, model.config.max_text_len, model.config.image_size)
                if kind == "itm":
                    r = self._retrieval(model, items, prep)
                else:
                    name_ = TASK_HEAD_NAMES[kind]
                    r = get_task(name_).evaluate(model, items, prep, FinetuneConfig(
                        task=name_, eval_batch_size=self.cfg.eval_batch_size))  # type: ignore[arg-type]
        self.n_evals += 1
        base = r.get("baseline", {})
        nums = [v for k, v in base.items() if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        value = next((base[k] for k in ("accuracy", "vqa_score", "top1", "r_mean") if k in base),
                     nums[0] if nums else None)
        which = split if sp != "ood" else "test"
        if value is not None:
            self.baselines.setdefault(which, {})[task] = float(value)
        self.counts.setdefault(which, {})[task] = int(r.get("n", len(items)))
        if "ranks" in r:
            sc = retrieval_scores(r["ranks"], r["n_images"], name)
            out = Scores({task: sc["r_mean"]}, {task: sc.boot["r_mean"]})
        else:
            if "per_example" not in r:
                raise ValueError(f"{task}: the evaluation returned no 'per_example' outcomes (needed for the "
                                 "bootstrap intervals)")
            out = mean_score(task, r["per_example"], name)
        if abs(out[task] - float(r["score"])) > 1e-3:
            raise ValueError(f"{task}: the mean of the per-example outcomes ({out[task]:.4f}) differs from the "
                             f"evaluation's score ({float(r['score']):.4f})")
        return out

    def _retrieval(self, model: Any, items: Sequence[Mapping[str, Any]], prep: Any) -> dict[str, Any]:
        """Task-head ITM = retrieval (the fine-tuning task's metric, ``r_mean``) with its per-query ranks."""
        from ..finetune.tasks.retrieval import encode_split
        from ..pretrain.evaluate import (
            dataset_relevance,
            ranks_record,
            recalls_from_ranks,
            retrieval_chance,
            retrieval_ranks,
        )

        enc = encode_split(model, items, prep, self.cfg.eval_batch_size)
        rel, _ = dataset_relevance(items, enc["txt2img"].tolist(), enc["texts"])
        rk = retrieval_ranks(enc["img"] @ enc["txt"].t(), rel)
        return {"score": recalls_from_ranks(rk["tr"], rk["ir"])["r_mean"], "n": len(items),
                "n_images": int(enc["img"].shape[0]),
                "ranks": ranks_record(rk, enc["txt2img"].tolist()),
                "baseline": {"kind": "chance", "r_mean": retrieval_chance(rel)["r_mean"]}}

    def scores(self, merged: Mapping[str, Any], tasks: Sequence[str], split: str = "test") -> Scores:
        """One :class:`~.stats.Scores` with every task of ``tasks`` (values and replicates)."""
        out = Scores()
        for t in tasks:
            out = out.merged(self.score(merged, t, split))
        return out

    # -- the scenarios ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from ..data import default_tokenizer
        from ..finetune import soups
        from ..models import load_model

        c = self.cfg
        self.n_evals = 0
        self.baselines: dict[str, dict[str, float]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.tok = default_tokenizer()
        base = self.pretrain()
        self.image_size = load_model(base).config.image_size
        t0 = time.time()
        tasks = list(c.tasks)
        vanilla = {t: self.vanilla(t, base) for t in tasks}
        fus = {t: self.fusing(t, [vanilla[a] for a in tasks if a != t]) for t in tasks}
        rat = {t: self.ratatouille(t, [vanilla[a] for a in tasks if a != t]) for t in tasks}
        self.timings["finetune_s"] = time.time() - t0
        t0 = time.time()
        dirs = {"vanilla": vanilla, "fusing": fus, "ratatouille": rat}
        states = {r: {t: soups.load_state(d) for t, d in ds.items()} for r, ds in dirs.items()}
        soups.check_records([json.loads((d / "config.json").read_text()) for ds in dirs.values() for d in ds.values()],
                            [str(d) for ds in dirs.values() for d in ds.values()])
        if self.unified:
            self.templates["unified"] = load_model(vanilla[tasks[0]])
        else:
            for t in tasks:
                self.templates[t] = load_model(vanilla[t])
        base_state = soups.load_state(base)
        ood = [o for o in c.ood if self.unified or o == "vqa@ood"]
        ood = [o for o in ood if o.split("@")[0] != "vqa" or "vqa" in tasks]

        def spec_view(r: str, t: str) -> Mapping[str, Any]:
            """Recipe r's model for task t, as a merged-model view (task mode: one map per task)."""
            return states[r][t] if self.unified else {t: states[r][t]}

        def merge_all(fn: Callable[[list[Mapping[str, torch.Tensor]], list[str] | None], dict[str, torch.Tensor]],
                      models: Mapping[str, Mapping[str, torch.Tensor]]) -> Any:
            if self.unified:
                return fn(list(models.values()), None)
            return soups.merge_task_head_models(lambda s, k: fn(s, k), models)

        # Specialists: each recipe's model for task t, scored on every seen task (cross-task transfer too).
        specialists = {r: {t: self.scores(spec_view(r, t), tasks if self.unified else [t]) for t in tasks}
                       for r in RECIPES}

        # Scenario 1: interpolation fronts.
        fronts: dict[str, Any] = {}
        for a, b in c.pairs:
            for r in ("vanilla", "ratatouille"):
                pts = []
                for lam in c.lambdas:
                    if self.unified:
                        merged: Any = soups.interpolate(states[r][a], states[r][b], lam)
                    else:
                        merged = soups.merge_task_head_models(
                            lambda s, k, lam=lam: soups.interpolate(s[0], s[1], lam, keys=k),
                            {a: states[r][a], b: states[r][b]})
                    pts.append({"lambda": lam, "test": self.scores(merged, [a, b]),
                                "val": self.scores(merged, [a, b], "val")})
                vals = {str(p["lambda"]): _mean([p["val"][t] for t in (a, b)]) for p in pts}
                best = max(pts, key=lambda p: (vals[str(p["lambda"])], -p["lambda"]))
                fronts[f"{a}|{b}|{r}"] = {"a": a, "b": b, "recipe": r, "points": pts,
                                          "grid_search": {"best_lambda": best["lambda"], "val": vals,
                                                          "test": best["test"]}}

        # Scenarios 2 and 3: merged models.
        merged_models: dict[str, Any] = {}
        for r in RECIPES:
            merged_models[f"soup/{r}"] = merge_all(lambda s, k: soups.soup(s, keys=k), states[r])
        for name in ("task_arithmetic", "ties", "dare"):
            params = dict(getattr(c, name))
            merged_models[f"{name}/vanilla"] = merge_all(
                lambda s, k, name=name, params=params: soups.task_vector_merge(name, s, base_state, keys=k, **params),
                states["vanilla"])
        greedy: dict[str, Any] | None = None
        if c.greedy:
            pool = {f"{r}/{t}": states[r][t] for r in RECIPES for t in tasks}
            cache: dict[tuple[str, ...], float] = {}

            def val_of(members: Sequence[str]) -> float:
                key = tuple(sorted(members))
                if key not in cache:
                    if self.unified:
                        m = soups.soup([pool[x] for x in key])
                    else:  # task mode: a candidate's backbone; each task's head from the task's vanilla model
                        bb = soups.soup([pool[x] for x in key],
                                        keys=[k for k in pool[key[0]] if not soups.is_head_key(k)])
                        m = {t: {**bb, **{k: v for k, v in states["vanilla"][t].items() if soups.is_head_key(k)}}
                             for t in tasks}
                    val = self.scores(m, tasks, "val")
                    cache[key] = _mean([val[t] for t in tasks])
                return cache[key]

            greedy = soups.greedy_soup(list(pool), val_of)
            if self.unified:
                merged_models["greedy_soup"] = soups.soup([pool[x] for x in greedy["members"]])
            else:
                bb = soups.soup([pool[x] for x in greedy["members"]],
                                keys=[k for k in pool[greedy["members"][0]] if not soups.is_head_key(k)])
                merged_models["greedy_soup"] = {t: {**bb, **{k: v for k, v in states["vanilla"][t].items()
                                                             if soups.is_head_key(k)}} for t in tasks}
        id_scores = {name: self.scores(m, tasks) for name, m in merged_models.items()}
        ood_scores = {name: self.scores(m, ood) for name, m in merged_models.items()}
        if "vqa" in tasks:  # Table 20: the VQA models on the unseen VQA-style sets
            for r in RECIPES:
                ood_scores[f"specialist/{r}/vqa"] = self.scores(spec_view(r, "vqa") if self.unified
                                                                else {"vqa": states[r]["vqa"]}, ood)
        ood_scores["pretrained"] = self.scores(base_state, ood) if self.unified else Scores()
        self.timings["evaluate_s"] = time.time() - t0
        return {
            "tasks": tasks, "ood": ood, "head": c.head,
            "val_scores": {r: {t: self.score(spec_view(r, t), t, "val")[t] for t in tasks} for r in RECIPES},
            "specialists": specialists,
            "scenario1": fronts,
            "scenario2": id_scores,
            "scenario3": ood_scores,
            "greedy_soup": greedy,
            "baselines": self.baselines,
            "counts": self.counts,
            "timings": {**self.timings, "evaluations": self.n_evals},
        }


# ----------------------------------------------------------------------------------------------- aggregate
def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over seeds, structure of the first seed: each :class:`~.stats.Scores` by
    :func:`~.stats.mean_over_seeds` (seed mean, ``<key>_std`` beside it, replicates averaged over seeds: the test
    sets are the same for every seed, so replicate b of each seed resamples the same examples), every other
    number by its mean; mappings key-wise (keys all seeds have), lists of equal length element-wise, anything
    else (strings, lists of other lengths) from the first seed. One seed: its results unchanged."""
    def merge(vals: list[Any]) -> Any:
        v0 = vals[0]
        if isinstance(v0, Scores) and all(isinstance(v, Scores) for v in vals):
            return mean_over_seeds(vals)
        if isinstance(v0, bool) or v0 is None or isinstance(v0, str):
            return v0
        if isinstance(v0, (int, float)):
            return _mean([float(v) for v in vals])
        if isinstance(v0, Mapping):
            return {k: merge([v[k] for v in vals]) for k in v0 if all(isinstance(v, Mapping) and k in v for v in vals)}
        if isinstance(v0, list) and all(isinstance(v, list) and len(v) == len(v0) for v in vals):
            return [merge([v[i] for v in vals]) for i in range(len(v0))]
        return v0

    return merge(list(per_seed)) if len(per_seed) > 1 else dict(per_seed[0])


# ------------------------------------------------------------------------------------------------- findings
def _front_gain(front: Mapping[str, Any]) -> float:
    """Mean over interior λ of how far the front's point lies above the chord between its endpoints,
    (A(λ) − chord_A(λ)) + (B(λ) − chord_B(λ)), in points; > 0: the front bulges outward (convex front)."""
    pts = sorted(front["points"], key=lambda p: p["lambda"])
    a, b = front["a"], front["b"]
    end1 = next((p for p in pts if p["lambda"] == 1.0), None)  # λ = 1: W_A
    end0 = next((p for p in pts if p["lambda"] == 0.0), None)
    inner = [p for p in pts if 0 < p["lambda"] < 1]
    if end1 is None or end0 is None or not inner:
        return float("nan")
    gains = []
    for p in inner:
        lam = p["lambda"]
        for t in (a, b):
            chord = lam * end1["test"][t] + (1 - lam) * end0["test"][t]
            gains.append(p["test"][t] - chord)
    return _mean(gains) * 2


def _endpoint(front: Mapping[str, Any], lam: float) -> Mapping[str, Any] | None:
    """The test scores of ``front``'s point at ``lam`` (None when the grid lacks it)."""
    return next((p["test"] for p in front["points"] if p["lambda"] == lam), None)


def _specialist_gap(front: Mapping[str, Any], task: str, end: float) -> float:
    """The best interior λ's score on ``task`` minus the specialist's (the front's end point ``end``: λ = 1 is
    the A model, λ = 0 the B model), the best λ taken on the scores given (a view: per replicate)."""
    spec = _endpoint(front, end)
    inner = [p["test"][task] for p in front["points"] if 0 < p["lambda"] < 1]
    return max(inner) - spec[task] if spec is not None and inner else float("nan")


def _transfer(fronts: Mapping[str, Any], pairs: Sequence[tuple[str, str]], recipe: str) -> float:
    """Mean cross-task score of ``recipe``'s endpoint models over ``pairs``: the A model (λ = 1) on B and the B
    model (λ = 0) on A."""
    vals: list[float] = []
    for a, b in pairs:
        f = fronts[f"{a}|{b}|{recipe}"]
        vals += [_endpoint(f, 1.0)[b], _endpoint(f, 0.0)[a]]  # type: ignore[index]
    return _mean(vals)


def _recipe_means(part: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """Each recipe's uniform soup's mean score over ``tasks``."""
    return {x: _mean([part[f"soup/{x}"][t] for t in tasks]) for x in RECIPES}


def _gaps(part: str, keys: Sequence[str], *pairs: tuple[str, str]) -> Callable[[Mapping[str, Any]], float]:
    """A margin: the smallest gap ``mean(a) − mean(b)`` over ``pairs`` of recipes' soups, their scores in
    ``part`` averaged over ``keys``."""
    def margin(x: Mapping[str, Any]) -> float:
        q = _recipe_means(x[part], keys)
        return min(q[a] - q[b] for a, b in pairs)

    return margin


def _task_keys(r: Mapping[str, Any], key: str, row: Mapping[str, Any]) -> list[str]:
    """The tasks of ``r[key]`` (``tasks`` / ``ood``) that ``row`` scores; without ``r[key]``, the row's own score
    keys (not ``<key>_std`` / ``ci``)."""
    names = r.get(key)
    if names is None:
        names = [k for k in row if k != "ci" and not k.endswith("_std")]
    return [t for t in names if t in row]


FINDING_PARTS = ("scenario1", "scenario2", "scenario3")
"""The parts of the results the findings' margins read (the bootstrap views are built over these only)."""


def unival_claims(r: Mapping[str, Any]) -> list[Claim]:
    """UnIVAL's claims whose inputs ``r`` holds (point values: a plain view of the aggregated results), each with
    a margin (positive: the paper's direction) evaluated on the views of :func:`check_unival_findings`."""
    out: list[Claim] = []
    fronts = r.get("scenario1") or {}
    chance_of = ((r.get("baselines") or {}).get("test") or {})
    van = {k: f for k, f in fronts.items() if f["recipe"] == "vanilla" and math.isfinite(_front_gain(f))}
    if van:
        gains = {k: _front_gain(f) for k, f in van.items()}
        label = {k: f"{f['a']}–{f['b']}" for k, f in van.items()}
        out.append(Claim(
            "convex_fronts", "§5 Scenario 1, Fig. 2",
            "interpolation reveals convex fronts: interpolated models trade off the two tasks better than the "
            "straight line between the two task models",
            "qualitative (Fig. 2 curves bulge outward for every pair)",
            "gain over the chord (points, A+B): " + ", ".join(f"{label[k]} {v:+.2f}" for k, v in gains.items())
            + f"; mean {_mean(list(gains.values())):+.2f} (vanilla fronts)",
            lambda x: _mean([_front_gain(x["scenario1"][k]) for k in van]),
            "the mean over the vanilla fronts of the mean gain over the chord, paired"))
    curves = [(k, t, end) for k, f in fronts.items() for t, end in ((f["a"], 1.0), (f["b"], 0.0))
              if math.isfinite(_specialist_gap(f, t, end))]
    if curves:
        gaps = {c: _specialist_gap(fronts[c[0]], c[1], c[2]) for c in curves}
        top = max(curves, key=gaps.__getitem__)
        f, t, end = fronts[top[0]], top[1], top[2]
        best = max((p for p in f["points"] if 0 < p["lambda"] < 1), key=lambda p: p["test"][t])
        out.append(Claim(
            "interpolation_beats_specialist", "§5 Scenario 1, Fig. 2",
            "some interpolated model outperforms the specialist on its own task",
            PAPER["fig2_beats_specialist"],
            f"largest margin: {t} ({f['recipe']}, {f['a']}–{f['b']}): best λ={best['lambda']} "
            f"{best['test'][t]:.2f} vs specialist {_endpoint(f, end)[t]:.2f} ({gaps[top]:+.2f}); "  # type: ignore[index]
            f"{sum(g > 0 for g in gaps.values())}/{len(gaps)} task curves have an interior λ above their specialist "
            "(point estimates)",
            lambda x, k=top[0], t=t, end=end: _specialist_gap(x["scenario1"][k], t, end),
            f"the best interior λ (maximum on each resample) minus the specialist, on the task curve with the largest "
            f"point margin ({t}, {f['recipe']}, {f['a']}–{f['b']}), paired"))
    pairs = [(f["a"], f["b"]) for f in fronts.values() if f["recipe"] == "ratatouille"
             and f"{f['a']}|{f['b']}|vanilla" in fronts
             and all(_endpoint(fronts[f"{f['a']}|{f['b']}|{x}"], lam) is not None
                     for x in ("vanilla", "ratatouille") for lam in (0.0, 1.0))]
    if pairs:
        v, t_ = _transfer(fronts, pairs, "vanilla"), _transfer(fronts, pairs, "ratatouille")
        pv, pr = PAPER["fig2_transfer"]["vanilla"], PAPER["fig2_transfer"]["ratatouille"]
        out.append(Claim(
            "ratatouille_transfer", "§5 Scenario 1, Fig. 2",
            "at λ = 0 or 1, Ratatouille models transfer better to the other task than vanilla ones",
            f"{'/'.join(map(str, pr))} vs {'/'.join(map(str, pv))} ({', '.join(PAPER['fig2_transfer']['pairs'])})",
            f"mean cross-task score {t_:.2f} (Ratatouille) vs {v:.2f} (vanilla) over {2 * len(pairs)} endpoint "
            "evaluations",
            lambda x: _transfer(x["scenario1"], pairs, "ratatouille") - _transfer(x["scenario1"], pairs, "vanilla"),
            "the mean cross-task score of the endpoint models, Ratatouille − vanilla, paired"))
    s2 = r.get("scenario2") or {}
    if all(f"soup/{x}" in s2 for x in RECIPES):
        tasks = _task_keys(r, "tasks", s2["soup/vanilla"])
        m = _recipe_means(s2, tasks)
        chance = _mean([chance_of[t] for t in tasks if t in chance_of])
        means = "mean ID score: " + ", ".join(f"{x} {m[x]:.2f}" for x in RECIPES)
        note = f" (best constant answer {chance:.2f})" if math.isfinite(chance) else ""
        id_order = _gaps("scenario2", tasks, ("ratatouille", "fusing"), ("fusing", "vanilla"))
        id_wa = _gaps("scenario2", tasks, ("ratatouille", "vanilla"), ("fusing", "vanilla"))

        out.append(Claim(
            "id_order", "§5 Scenario 2, Fig. 3; App. J.2",
            "on seen tasks (ID) the uniform soups rank Ratatouille > Fusing > vanilla",
            "Fig. 3: Ratatouille and Fusing soups above vanilla; App. J.2: Ratatouille better than Fusing",
            means + note, id_order,
            "the smaller of the consecutive gaps of the mean ID score (Ratatouille − Fusing, Fusing − vanilla), "
            "paired"))
        out.append(Claim(
            "id_wa_beats_vanilla", "§5 Scenario 2, Fig. 3",
            "on seen tasks (ID) both the Ratatouille and the Fusing soups outperform the vanilla soup",
            "Fig. 3 (ID bars): Ratatouille and Fusing above vanilla", means + note, id_wa,
            "the smaller of Ratatouille − vanilla and Fusing − vanilla (mean ID score), paired"))
    s3 = r.get("scenario3") or {}
    if all(f"soup/{x}" in s3 and s3[f"soup/{x}"] for x in RECIPES):
        ood = _task_keys(r, "ood", s3["soup/vanilla"])
        m = _recipe_means(s3, ood)
        p = {x: _mean(list(PAPER["table20"][x].values())) for x in RECIPES}
        chance = _mean([chance_of[t] for t in ood if t in chance_of])
        means = "mean OOD score of the soups: " + ", ".join(f"{x} {m[x]:.2f}" for x in RECIPES)
        note = f" (best constant answer {chance:.2f})" if math.isfinite(chance) else ""
        ood_order = _gaps("scenario3", ood, ("ratatouille", "fusing"), ("fusing", "vanilla"))
        ood_best = _gaps("scenario3", ood, ("ratatouille", "fusing"), ("ratatouille", "vanilla"))

        out.append(Claim(
            "ood_order", "§5 Scenario 3, Fig. 3; Table 20",
            "on unseen tasks (OOD, no further training) Ratatouille > Fusing > vanilla",
            "Table 20 mean of OKVQA / VizWiz / NoCaps: " + ", ".join(f"{x} {p[x]:.2f}" for x in RECIPES)
            + " (Ratatouille best; Fusing below vanilla on 2 of 3)", means + note, ood_order,
            "the smaller of the consecutive gaps of the mean OOD score (Ratatouille − Fusing, Fusing − vanilla), "
            "paired"))
        out.append(Claim(
            "ood_ratatouille_best", "Table 20",
            "Ratatouille beats both Fusing and vanilla on the unseen tasks",
            "Table 20: " + ", ".join(f"{x} {p[x]:.2f}" for x in RECIPES), means + note, ood_best,
            "the smaller of Ratatouille − Fusing and Ratatouille − vanilla (mean OOD score), paired"))
    return out


def check_unival_findings(r: Mapping[str, Any]) -> list[Finding]:
    """UnIVAL's findings on ``r`` (the aggregated results), each reproduced / contradicted / inconclusive by the
    95 % bootstrap interval of its margin (:func:`~.findings.evaluate_claims`: the margin on the point values and
    on every replicate; the replicates of all models scored on one test set resample the same examples, so the
    margins' differences are paired). Without replicates (plain numbers, e.g. read back from JSON) every finding
    is inconclusive."""
    claims = unival_claims(replicate_view(r, None))
    return evaluate_claims(claims, {k: r[k] for k in FINDING_PARTS if k in r})


# --------------------------------------------------------------------------------------------------- report
def _interval(row: Any, key: str) -> tuple[float, float] | None:
    """The 95 % interval of ``row[key]``: from its replicates (in memory) or its ``ci`` entry (JSON)."""
    if isinstance(row, Scores):
        return row.interval(key)
    ci = row.get("ci") if isinstance(row, Mapping) else None
    return tuple(ci[key]) if isinstance(ci, Mapping) and key in ci else None  # type: ignore[return-value]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _cell(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
    """``x [lo, hi] ± std``: the score, its 95 % bootstrap interval and (several seeds) its std over seeds."""
    v = _num(row.get(key))
    if v is None:
        return "–"
    ci, std = _interval(row, key), _num(row.get(f"{key}_std"))
    return (f"{v:.{digits}f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci and all(map(math.isfinite, ci)) else "")
            + (f" ± {std:.2f}" if std is not None else ""))


def _row_mean(row: Mapping[str, Any], cols: Sequence[str]) -> str:
    """The row's mean over ``cols`` (those it has), with the interval of the mean when every one has replicates."""
    keys = [c for c in cols if _num(row.get(c)) is not None]
    if not keys:
        return "–"
    m = _mean([float(row[c]) for c in keys])
    if isinstance(row, Scores) and all(c in row.boot for c in keys):
        lo, hi = percentile_interval(np.mean([row.boot[c] for c in keys], axis=0))
        return f"{m:.2f} [{lo:.1f}, {hi:.1f}]"
    return f"{m:.2f}"


def _yerr(rows: Sequence[Mapping[str, Any]], key: str) -> list[list[float]] | None:
    """Asymmetric error bars from each row's 95 % interval of ``key`` (None unless every row has one)."""
    cis = [_interval(r, key) for r in rows]
    if not rows or any(c is None or not all(map(math.isfinite, c)) for c in cis):
        return None
    return [[float(r[key]) - c[0] for r, c in zip(rows, cis, strict=True)],  # type: ignore[index]
            [c[1] - float(r[key]) for r, c in zip(rows, cis, strict=True)]]  # type: ignore[index]


def _plots(r: Mapping[str, Any], out: Path) -> list[str]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> str:
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(out / name, buf.getvalue())
        plt.close(fig)
        return name

    written = []
    fronts = r.get("scenario1") or {}
    pairs = list(dict.fromkeys((f["a"], f["b"]) for f in fronts.values()))
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
        for ax, (a, b) in zip(axes[0], pairs, strict=True):
            for rec, style in (("vanilla", "o-"), ("ratatouille", "s--")):
                f = fronts.get(f"{a}|{b}|{rec}")
                if not f:
                    continue
                pts = sorted(f["points"], key=lambda p: p["lambda"])
                xs, ys = [p["test"][a] for p in pts], [p["test"][b] for p in pts]
                tests = [p["test"] for p in pts]
                ax.errorbar(xs, ys, xerr=_yerr(tests, a), yerr=_yerr(tests, b), fmt=style, label=rec, ms=4,
                            capsize=2, elinewidth=0.6)
                for p, x, y in zip(pts, xs, ys, strict=True):
                    if p["lambda"] in (0.0, 0.5, 1.0):
                        ax.annotate(f"λ={p['lambda']:g}", (x, y), fontsize=7)
            ax.set_xlabel(f"{LABELS[a]} score")
            ax.set_ylabel(f"{LABELS[b]} score")
            ax.set_title(f"λ·W_{a} + (1−λ)·W_{b}")
            ax.legend(fontsize=8)
        fig.suptitle("Scenario 1 (UnIVAL Fig. 2): interpolation fronts (bars: 95 % bootstrap intervals)")
        written.append(save(fig, "scenario1_fronts.png"))
    s2, s3 = r.get("scenario2") or {}, r.get("scenario3") or {}
    if s2:
        names = [f"soup/{x}" for x in RECIPES if f"soup/{x}" in s2]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, data, cols, title in ((axes[0], s2, r.get("tasks") or [], "ID (seen tasks)"),
                                      (axes[1], s3, r.get("ood") or [], "OOD (unseen)")):
            present = [n for n in names if n in data and data[n]]
            tasks = [t for t in cols if present and all(t in data[n] for n in present)]
            if not tasks:
                continue
            width = 0.8 / max(1, len(names))
            for i, n in enumerate(names):
                if n in present:
                    rows = [Scores({"s": data[n][t]}, {"s": data[n].boot[t]} if isinstance(data[n], Scores)
                                   and t in data[n].boot else {}) for t in tasks]
                    ax.bar([j + i * width for j in range(len(tasks))], [data[n][t] for t in tasks], width,
                           yerr=_yerr(rows, "s"), capsize=2, label=n.split("/")[1])
            if title.startswith("ID"):
                spec = r.get("specialists", {}).get("vanilla", {})
                ax.scatter([j + 0.4 - width / 2 for j in range(len(tasks))], [spec.get(t, {}).get(t, float("nan"))
                           for t in tasks], marker="*", color="k", zorder=3, label="vanilla specialist")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [LABELS.get(t, t) for t in tasks],
                          fontsize=7, rotation=15)
            ax.set_title(title)
            ax.set_ylabel("score")
            ax.legend(fontsize=7)
        fig.suptitle("Scenarios 2-3 (UnIVAL Fig. 3 / Table 20): uniform soups λ = 1/N (95 % bootstrap intervals)")
        written.append(save(fig, "scenario23_soups.png"))
    return written


def _table(rows: Mapping[str, Mapping[str, Any]], cols: Sequence[str], first: str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(LABELS.get(c, c) for c in cols) + " | mean |",
             "|---" * (len(cols) + 2) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row, c) for c in cols) + f" | {_row_mean(row, cols)} |")
    return lines


def _diagonal(spec: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> Scores:
    """Each task's specialist on its own task, one row (values, std over seeds, replicates)."""
    out = Scores()
    for t in tasks:
        row = spec.get(t) or {}
        if t in row:
            out[t] = row[t]
            if f"{t}_std" in row:
                out[f"{t}_std"] = row[f"{t}_std"]
            if isinstance(row, Scores) and t in row.boot:
                out.boot[t] = row.boot[t]
    return out


def _gain_interval(front: Mapping[str, Any]) -> tuple[float, float] | None:
    b = n_resamples(front)
    return percentile_interval([_front_gain(replicate_view(front, i)) for i in range(b)]) if b else None


def render_report(r: Mapping[str, Any], findings: Sequence[Finding], plots: Sequence[str]) -> str:
    meta = r["meta"]
    tasks, ood = r["tasks"], r["ood"]
    seeds = meta["seeds"]
    b = (meta.get("bootstrap") or {}).get("resamples") or n_resamples(r)
    p = [f"# UnIVAL §5 on the embedded world: preset `{meta['preset']}`", "",
         f"Command: `{meta['command']}`  ",
         f"Seeds: {seeds} · wall time {meta['wall_time_s']:.0f} s · {meta['device']} · config hash "
         f"`{meta['config_hash']}` · head mode: **{r['head']}**"
         + (" (unified answer head: every model has the same parameters and merges whole)" if r["head"] == "unified"
            else " (task heads: backbones merged, each task keeps its own head)"), "",
         "Scores are percent on the test split (OOD sets: see below); for every task the score is accuracy "
         "(VQA: VQA score = accuracy, one answer per question)"
         + ("" if r["head"] == "unified" else "; ITM in task-head mode is retrieval, the mean of Avg TR and Avg IR")
         + ". Every number is computed by this run.", "",
         f"Each score is followed by its 95 % bootstrap interval, `[lo, hi]`: {b} resamples of the test examples "
         "(questions, statements, images, image-caption pairs"
         + ("" if r["head"] == "unified" else "; task-head retrieval: the test images with their queries")
         + "), the same resamples for every model scored on one test set, so differences between models are "
         "paired (percentile interval)."
         + (f" With {len(seeds)} seeds every score is the seed mean, `± std` the sample standard deviation over "
            "seeds, and the interval comes from the replicates averaged over seeds (it covers the test examples' "
            "noise, the std the seed-to-seed noise)." if len(seeds) > 1 else ""), "",
         "Seen tasks (fine-tuned): " + ", ".join(LABELS[t] for t in tasks) + ". Unseen (never trained on): "
         + ", ".join(LABELS[t] for t in ood) + ".", ""]
    counts = {o: sum(f.outcome == o for f in findings) for o in OUTCOME_MARK}
    p += ["## Findings", "",
          f"{counts['reproduced']} reproduced, {counts['contradicted']} contradicted, {counts['inconclusive']} "
          f"inconclusive of {len(findings)}. Each finding has a *margin*, positive in the paper's direction, "
          "computed from the numbers below; it is evaluated on the point estimates and on every bootstrap "
          "replicate (the same resampled test examples for every model). The finding is **reproduced** when the "
          "95 % interval of the margin lies above 0, **contradicted** when it lies below 0, **inconclusive** when "
          "it contains 0. *Decided by* names the margin.", "",
          "| | source | paper's claim | paper | here | margin [95 % interval] | decided by |",
          "|---|---|---|---|---|---|---|"]
    for f in findings:
        ci = (f"[{f.interval[0]:.2f}, {f.interval[1]:.2f}]" if f.interval and all(map(math.isfinite, f.interval))
              else "no interval")
        margin = f"{f.margin:+.2f}" if math.isfinite(f.margin) else "undefined"
        p.append(f"| {OUTCOME_MARK[f.outcome]} | {f.source} | {f.claim} | {f.paper} | {f.ours} | {margin} {ci} | "
                 f"{f.decided_by} |")
    p += ["", "## Specialists", "", "Each recipe's model for a task, scored on every seen task (diagonal: its own "
          "task; off-diagonal: transfer). Its validation score on its own task in brackets.", ""]
    for rec, rows in r["specialists"].items():
        p += [f"**{rec}**", ""]
        p += _table({f"{t} model ({r['val_scores'][rec][t]:.1f})": v for t, v in rows.items()}, tasks, "model")
        p.append("")
    p += ["## Scenario 1 (Fig. 2): interpolating two task models", "",
          "W = λ·W_A + (1 − λ)·W_B; λ = 1 is the A model, λ = 0 the B model. Grid search: λ maximising the "
          "mean validation score of A and B, its test scores. The front's gain over the chord: the mean over "
          "interior λ of (A + B) above the straight line between the end points, with its 95 % interval.", ""]
    for f in r["scenario1"].values():
        a, b_ = f["a"], f["b"]
        pts = sorted(f["points"], key=lambda q: q["lambda"])
        gi = _gain_interval(f)
        gain = f"{_front_gain(f):+.2f}" + (f" [{gi[0]:+.2f}, {gi[1]:+.2f}]" if gi and all(map(math.isfinite, gi))
                                          else "")
        gs = f["grid_search"]
        p += [f"**{a} ↔ {b_}, {f['recipe']}** (front gain over the chord {gain}; grid-searched "
              f"λ = {gs['best_lambda']}: {LABELS[a]} {_cell(gs['test'], a)}, {LABELS[b_]} {_cell(gs['test'], b_)})",
              "", "| λ | " + " | ".join(f"{q['lambda']:g}" for q in pts) + " |", "|---" * (len(pts) + 1) + "|",
              f"| {LABELS[a]} | " + " | ".join(_cell(q["test"], a, 1) for q in pts) + " |",
              f"| {LABELS[b_]} | " + " | ".join(_cell(q["test"], b_, 1) for q in pts) + " |", ""]
    spec_row = {"specialists (vanilla, own task)": _diagonal(r["specialists"]["vanilla"], tasks)}
    p += ["## Scenario 2 (Fig. 3, ID): one merged model for all seen tasks", "",
          "Uniform soups (λ = 1/N) of the N task models per recipe; task arithmetic, TIES and DARE on the vanilla "
          "task vectors (W − W_pretrained; parameters in the configuration below); the greedy soup over all "
          f"{len(RECIPES) * len(tasks)} fine-tuned models. The mean column: the mean over the tasks, with the "
          "interval of that mean.", ""]
    const = {"best constant answer (chance)": r.get("baselines", {}).get("test", {})}
    p += _table({**const, **spec_row, **r["scenario2"]}, tasks, "model") + [""]
    g = r.get("greedy_soup")
    if g:
        p += [f"Greedy soup: members {g['members']} (validation {g['score']:.2f})"
              + (" — **collapsed to one model**: no addition improved the validation score." if g["collapsed"]
                 else "."), ""]
    p += ["## Scenario 3 (Fig. 3 / Table 20, OOD): the same models on unseen tasks", "",
          "`vqa@ood`: VQA questions on the world's `ood` split (held-out colour-shape pairs, shifted rendering); "
          "`size`: *what size is the X?*; `largest-color`: *what color is the largest object?* (scenes with one "
          "large object). No further training; `specialist/<recipe>/vqa` is the VQA model (Table 20 uses the "
          "VQAv2 model).", ""]
    p += _table({**const, **{k: v for k, v in r["scenario3"].items() if v}}, ood, "model") + [""]
    t = r.get("timings", {})
    p += ["## Timings", "", ", ".join(f"{k} {v:.0f}" + (" s" if k.endswith("_s") else "") for k, v in t.items()), ""]
    if plots:
        p += ["## Plots", ""] + [f"![{x}]({x})" for x in plots] + [""]
    p += ["## Configuration", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```", "",
          f"{len(r.get('cells', {}))} cells (pre-training and fine-tunes) under `cells/<kind>-<hash>/` "
          "(spec.json, result.json); the model weights there are not part of the committed report. The "
          "evaluations are not cached: every run scores the models again.", ""]
    return "\n".join(p)


def unival_command(preset: str, out: str | Path, seeds: Sequence[int], overrides: Sequence[str]) -> str:
    cmd = ["vlmerge", "study", "unival", "--preset", preset, "--out", str(out)]
    if list(seeds) != [0]:
        cmd += ["--seeds", ",".join(map(str, seeds))]
    for s in overrides:
        cmd += ["--set", s]
    return shlex.join(cmd)


def run_unival(preset: str, out: str | Path, *, seeds: Sequence[int] = (0,), overrides: Sequence[str] = (),
               progress: bool = True) -> Path:
    """Run UnIVAL's three scenarios for ``preset`` (``configs/unival/<preset>.yaml``) into ``out``; returns
    ``out/report.md``. Re-running with the same ``out`` resumes from its cells."""
    t0 = time.time()
    cfg, path = load_unival_config(preset, overrides)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds {seeds} are invalid; allowed: distinct integers ≥ 0")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / ".gitignore", b"cells/\n")
    per_seed, cells = [], {}
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for seed in seeds:
            study = Unival(cfg, out_dir, seed, progress)
            per_seed.append(study.run())
            cells.update({f"seed{seed}/{k}": v for k, v in study.cells.items()})
    finally:
        torch.set_num_threads(threads)
    results = aggregate(per_seed)
    results["per_seed"] = {str(s): r for s, r in zip(seeds, per_seed, strict=True)} if len(seeds) > 1 else {}
    results["cells"] = cells
    results["meta"] = {"preset": preset, "config_file": str(path), "seeds": seeds,
                       "command": unival_command(preset, out, seeds, overrides),
                       "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg.model_dump(mode="json")),
                       "device": f"cpu ({platform.machine()}, torch {torch.__version__}, "
                                 f"{cfg.threads or threads} threads)",
                       "wall_time_s": time.time() - t0,
                       "bootstrap": {"resamples": n_resamples(results) or RESAMPLES, "level": LEVEL,
                                     "unit": "test examples (task-head ITM: test images); the same resamples for "
                                             "every model scored on one test set"}}
    findings = check_unival_findings(results)
    results["findings"] = [f.to_dict() for f in findings]
    atomic_write_json(out_dir / "results.json", with_intervals(results))
    atomic_write_json(out_dir / "findings.json", results["findings"])
    plots = _plots(results, out_dir)
    report = out_dir / "report.md"
    atomic_write_bytes(report, render_report(results, findings, plots).encode())
    return report
