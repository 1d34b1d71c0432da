"""The study: the merging paper's experiments (Tables 1–3, 5; Figures 3–4) on the embedded world.

Every number comes from a cell (:mod:`vlmerge.study.cells`): pre-training runs, merges, Gram collections,
fine-tunes and evaluations are cached under the hash of the config that made them, so a re-run or a run
killed halfway recomputes nothing that finished. ``results.json`` (schema below) feeds the report.

Schema of ``results`` (scores: ``avg_tr`` / ``avg_ir`` / ``r_mean`` = Avg TR, Avg IR and their mean of
zero-shot retrieval on the test split, plus fine-tuned task scores ``vqa``, ``nlvr2``, ``cls``, ``seg`` and OOD
retrieval ``ood_avg_tr`` / ``ood_avg_ir`` / ``ood_r_mean``; in ``results.json`` each score dict also holds
``ci`` {key: [lo, hi]}, the 95 % bootstrap interval over test queries (:mod:`.stats`), and with several seeds
``<key>_std``)::

    table1:    {maa, msa, merging_baseline: scores}
    figure3:   {k_seed: [steps], k_seed_frac: [K_seed / K], before: [scores], after: [scores]}
    table2:    {interpolation | modality_arithmetic | regmean: {param: scores}}
    figure4:   {arch: {before: scores, after: scores}}
    table3:    {msa, maa, merging_baseline, ours: scores}
    table5:    {k_seed, metrics: {l2, cosine, ssd, tssd: [..]}, drop: [..], pearson: {..}, pearson_ci: {..},
                spearman: {..}}
    layerwise: {recipe | msa: {global: {α: scores}, best_global: α, learned: {objective: scores},
                schedules: {objective: [α per layer]}, vs_best_global: {objective: paired difference scores}}}
               -- learned per-layer α (supervised / AdaMerging-style entropy) against the best global α of the grid
    pareto:    {msa | recipe: {layers, exhaustive, points: [{keep, params, scores}], by_k: [{k, random, n_random,
                predictor: {keep, params, scores}, depth: {..}, predictor_vs_random, depth_vs_random}]}}
               -- partial merges (interpolation, the baseline α) keeping k layers modality-specific: every subset
                  (random = their mean), the predictor's riskiest k, the deepest k
    baselines: {retrieval: chance per key (test split), retrieval_ood, vqa | nlvr2 | cls | seg: best constant}
    predictor: {method, params, feature, n, groups, loo_r, loo_r_ci, loo_rmse, line, per_feature: {f: {loo_r, r}}}
               -- vlmerge predict's drop model fitted on every evaluated merge (predict-calibration.json)
    meta:      {preset, seeds, wall_time_s, command, config, config_hash, device, cpu}
    cells:     {name: {hash, spec}} -- the provenance of every number
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import load
from ..models.vlmo import ARCHS, ArchName
from .cells import Cell, CellStore, config_hash
from .report import write_report
from .stats import LEVEL, RESAMPLES, Scores, aggregate_seeds, mean_score, miou_score, retrieval_scores

ModelT = TypeVar("ModelT", bound=BaseModel)

log = logging.getLogger("vlmerge.study")

PARTS = ("table1", "figure3", "table2", "figure4", "table3", "table5", "layerwise", "pareto")
EVAL_VERSION = 2  # in every evaluating cell's spec: cells scored by an older evaluator are recomputed
PREDICT_BATCHES, PREDICT_BATCH_SIZE = 2, 32  # validation pairs for each calibration point's activation drift


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Table2Grid(_Strict):
    interpolation: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="α values")
    modality_arithmetic: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="λ")
    regmean: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="γ values")


class LayerwiseConfig(_Strict):
    """How the ``layerwise`` part learns per-layer α (:func:`vlmerge.merge.learned.learn_schedule`)."""

    objectives: list[Literal["supervised", "entropy"]] = Field(default_factory=lambda: ["supervised", "entropy"])
    granularity: Literal["layer", "module"] = "layer"
    batches: int = Field(4, ge=1, description="validation batches of world image-text pairs")
    batch_size: int = Field(32, ge=2)
    steps: int = Field(30, ge=1, description="full-batch Adam steps")
    lr: float = Field(0.1, gt=0)


class StudyConfig(_Strict):
    """One study preset (``configs/study/<name>.yaml``)."""

    name: str
    pretrain: str = Field(description="pre-training config (path, relative to configs/ or absolute)")
    pretrain_set: list[str] = Field(default_factory=list, description="dotted overrides of the pre-training config")
    steps: int = Field(gt=0, description="K: total pre-training steps of every model")
    k_seed: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], description="K_seed / K (Figure 3)")
    recipe_k_seed: float = Field(0.5, ge=0, lt=1, description="K_seed / K of the recipe (paper: 100k of 200k)")
    baseline_alpha: float = Field(0.5, ge=0, le=1, description="interpolation α of the merging baseline, Fig. 3/4")
    recipe_alpha: float = Field(0.75, ge=0, le=1, description="interpolation α of 'ours' in Table 3")
    table2: Table2Grid = Table2Grid()
    regmean_batches: int = Field(8, ge=1, description="batches of world image-text pairs for RegMean's Grams")
    layerwise: LayerwiseConfig = LayerwiseConfig()
    pareto_max_subsets: int = Field(64, ge=2, description="partial merges per source model in the pareto part: "
                                    "every subset of layers when 2^n − 1 fit, else a seeded sample per size")
    archs: list[ArchName] = Field(default_factory=lambda: list(ARCHS))
    eval_images: int = Field(200, ge=10, description="test/OOD images for zero-shot retrieval (5 captions each)")
    world: dict[str, Any] = Field(default_factory=dict, description="WorldConfig fields of the embedded world every "
                                  "cell uses (pre-training, Grams, fine-tuning, evaluation); {} = the full world")
    finetune: str = Field("tiny", description="fine-tuning preset (configs/finetune/<task>.yaml section)")
    finetune_set: dict[str, list[str]] = Field(default_factory=dict, description="per-task fine-tuning overrides")
    table1_tasks: list[Literal["vqa"]] = Field(default_factory=lambda: ["vqa"])
    table3_tasks: list[Literal["nlvr2", "cls", "seg"]] = Field(default_factory=lambda: ["nlvr2", "cls", "seg"])

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        for f in self.k_seed:
            if not 0 <= f < 1:
                raise ValueError(f"k_seed: each value must be in [0, 1), got {f}")
        if 0.0 not in self.k_seed:
            raise ValueError("k_seed must include 0 (the MSA without seed pre-training: Table 1's baseline)")
        return self


def load_preset(name_or_path: str | Path, model: type[ModelT], kind: str, overrides: Sequence[str] = ()) -> ModelT:
    """A study preset (name or YAML path) with ``key.sub=value`` overrides, validated as ``model``."""
    return load(model, name_or_path, kind, overrides)


def load_study_config(preset: str, overrides: Sequence[str] = ()) -> StudyConfig:
    return load_preset(preset, StudyConfig, "study", overrides)


def check_finetune_configs(config: StudyConfig) -> None:
    """Resolve every fine-tuning config the study will run (its tasks, ``finetune``, ``finetune_set``), so a bad
    override is refused before any cell runs, not after the pre-training cells (``ValueError`` naming it)."""
    from ..finetune.config import resolve_config

    tasks = [*config.table1_tasks, *config.table3_tasks]
    unused = sorted(set(config.finetune_set) - set(tasks))
    if unused:
        raise ValueError(f"finetune_set: tasks {unused} are not fine-tuned by this study; expected some of {tasks}")
    for task in dict.fromkeys(tasks):
        resolve_config(task, config.finetune, None, [f"data.world={json.dumps(config.world)}",
                                                     *config.finetune_set.get(task, [])])


def base_pretrain_config(config: StudyConfig, seed: int = 0) -> Any:
    """The :class:`~vlmerge.pretrain.PretrainConfig` every pre-training cell starts from: the preset's
    pre-training config with ``pretrain_set``, the study's world, K steps and ``seed``; each cell then sets
    its recipe."""
    from ..pretrain import load_config

    return load_config(config.pretrain, [*config.pretrain_set, f"train.steps={config.steps}",
                                                      f"data.world={json.dumps(config.world)}",
                                                      f"train.seed={seed}", "recipe={name: scratch}"])


def _cpu_name() -> str:
    """The processor, as /proc/cpuinfo names it (timings are meaningless without it)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ the study
class Study:
    """Runs the cells of one seed; :func:`run_study` aggregates seeds and writes the report."""

    def __init__(self, config: StudyConfig, out: Path, seed: int, progress: bool = True) -> None:
        self.cfg, self.out, self.seed, self.progress = config, out, seed, progress
        self.store = CellStore(out)
        self.base = base_pretrain_config(config, seed).to_dict()
        self.cells: dict[str, dict[str, Any]] = {}
        self._eval_sets: dict[tuple[str, int], Any] = {}
        self.baselines: dict[str, dict[str, float]] = {}
        self.merges: dict[str, tuple[Mapping[str, Any], Mapping[str, Any], str, dict[str, Any]]] = {}
        self._features: dict[str, dict[str, float]] = {}

    # -- cells -----------------------------------------------------------------------------------------
    def rel(self, path: str | Path) -> str:
        """``path`` relative to the study directory: specs and results stay valid if the directory moves."""
        return Path(path).resolve().relative_to(self.out.resolve()).as_posix()

    def path(self, rel: str) -> Path:
        return self.out / rel

    def _record(self, name: str, kind: str, spec: Mapping[str, Any]) -> Cell:
        cell = self.store.cell(kind, spec)
        self.cells[name] = {"hash": cell.hash, "kind": kind, "spec": cell.spec}
        return cell

    def k_seeds(self) -> list[int]:
        """Every K_seed > 0 the study uses, in steps."""
        fracs = {*self.cfg.k_seed, self.cfg.recipe_k_seed}
        return sorted({round(f * self.cfg.steps) for f in fracs} - {0})

    def branch_step(self, k_seed: int) -> int:
        """Where a K_seed-step ``wsd`` seed stage leaves the MAA's own run: the start of its decay."""
        from ..pretrain.optim import wsd_decay_steps

        return k_seed - wsd_decay_steps(k_seed, self.base["optim"]["decay_frac"])

    def shares_seed_stages(self) -> bool:
        """Whether the MAA trained from scratch passes through every seed stage up to its decay: with a ``wsd``
        schedule and a warm-up that fits the shortest seed stage, the MAA's checkpoint at K_seed − decay *is*
        the seed stage's (same init, data, draws and learning rates), so a seed stage costs only its decay."""
        from ..pretrain.optim import wsd_decay_steps

        o, ks = self.base["optim"], self.k_seeds()
        if o["schedule"] != "wsd" or not ks:
            return False
        maa_stable = self.cfg.steps - wsd_decay_steps(self.cfg.steps, o["decay_frac"])
        return all(0 < self.branch_step(k) <= maa_stable for k in ks) and o["warmup_steps"] <= min(ks) // 2

    def pretrain(self, arch: str, k_seed_frac: float) -> dict[str, Any]:
        """A model pre-trained for K steps: ``arch`` from a shared random init (K_seed = 0), or the seed recipe.
        The MAA's run also leaves the seed stages behind when :meth:`shares_seed_stages`."""
        from ..pretrain import pretrain

        k_seed = round(k_seed_frac * self.cfg.steps)
        data = {**self.base, "model": {**self.base["model"], "arch": arch}}
        data["recipe"] = ({"name": "seed", "seed_steps": k_seed} if k_seed and arch != "maa" else {"name": "scratch"})
        snapshots = arch == "maa" and not k_seed and self.shares_seed_stages()
        branches = [self.branch_step(k) for k in self.k_seeds()] if snapshots else []
        spec = {"pretrain": data, "eval": EVAL_VERSION, **({"branches": branches} if snapshots else {})}
        label = f"{arch}/kseed={k_seed}"
        cell = self._record(f"pretrain/{label}", "pretrain", spec)

        def run(c: Cell) -> dict[str, Any]:
            if data["recipe"]["name"] == "seed":  # the MAA seed stage is the same for every architecture
                start_from_checkpoint(self.path(self.seed_stage(k_seed)), c.dir / "run")
            stages: dict[str, str] = {}
            for k in branches:
                # laid out as a run directory (checkpoints/ beside metrics.jsonl), so start_from_checkpoint
                # hands the seed recipe the seed stage's log too
                keep = c.dir / f"branch-{k}" / "checkpoints" / f"step-{k:08d}"
                if not keep.is_dir():
                    stop = _checkpoint_at(c.dir / "run", k) or pretrain(self._cached(data), c.dir / "run",
                                                                        stop_after=k, progress=self.progress)
                    tmp = keep.with_name(keep.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(stop, tmp)
                    log = c.dir / "run" / "metrics.jsonl"  # absent when no step was logged before k yet
                    if log.is_file():
                        shutil.copy(log, keep.parents[1] / "metrics.jsonl")
                    tmp.rename(keep)
                stages[str(k)] = self.rel(keep)
            final = pretrain(self._cached(data), c.dir / "run", progress=self.progress)
            w0 = c.dir / "run" / "w0"
            return {"final": self.rel(final), "w0": self.rel(w0) if (w0 / "config.json").is_file() else None,
                    "k_seed": k_seed, "retrieval": self.retrieval(final, "test"), "branches": stages}

        return {**self.store.run("pretrain", cell.spec, run), "label": label}

    def _cached(self, data: Mapping[str, Any]) -> Any:
        """The validated pre-training config, reading scenes from the study's shared shard cache (the cache's
        location is not part of any cell's spec)."""
        from ..pretrain import validate_config

        return validate_config({**data, "data": {**data["data"], "cache_dir": str(self.out / "data-cache")}})

    def seed_stage(self, k_seed: int) -> str:
        """The training checkpoint that closes a K_seed-step MAA seed stage (shared by the seed recipe of every
        architecture: the seed stage never depends on the architecture it will be expanded into). Where
        :meth:`shares_seed_stages`, it resumes from the MAA's own run at :meth:`branch_step` and runs only its
        decay; else it is a run of its own."""
        from ..pretrain import pretrain

        data = {**self.base, "model": {**self.base["model"], "arch": "msa"},
                "recipe": {"name": "seed", "seed_steps": k_seed}}
        shared = self.shares_seed_stages()
        spec = {"pretrain": data, "stop_after": k_seed, **({"branch": self.branch_step(k_seed)} if shared else {})}
        cell = self._record(f"seed-stage/kseed={k_seed}", "seed-stage", spec)

        def run(c: Cell) -> dict[str, Any]:
            if shared:
                branch = self.pretrain("maa", 0.0)["branches"][str(self.branch_step(k_seed))]
                start_from_checkpoint(self.path(branch), c.dir / "run")
            return {"checkpoint": self.rel(pretrain(self._cached(data), c.dir / "run", stop_after=k_seed,
                                                    progress=self.progress))}

        return self.store.run("seed-stage", cell.spec, run)["checkpoint"]

    def merge(self, src: Mapping[str, Any], method: str, keep: Sequence[int] | None = None, **params: Any
              ) -> dict[str, Any]:
        """``src``'s modality copies merged by ``method``; scores of the merged model. ``keep``: a partial merge
        that keeps these layers modality-specific (not a calibration point: the predictor models full merges)."""
        from ..merge import merge_checkpoint

        if src.get("arch_is_maa"):
            return src
        spec = {"src": src["final"], "method": method, "params": params, "eval": EVAL_VERSION,
                **({"keep_specific": sorted(keep)} if keep is not None else {})}
        label = (f"{src['label']}+{method}({','.join(f'{k}={v}' for k, v in params.items())})"
                 + (f"+keep={layers_key(keep)}" if keep is not None else ""))
        cell = self._record(f"merge/{label}", "merge", spec)

        def run(c: Cell) -> dict[str, Any]:
            kwargs: dict[str, Any] = dict(params)
            if method == "modality_arithmetic":
                if not src.get("w0"):
                    raise ValueError(f"{src['label']}: modality arithmetic needs W0 (a seed-recipe run saves it)")
                kwargs["base_dir"] = self.path(src["w0"])
            if method == "regmean":
                kwargs["grams"] = self.grams(src)
            # overwrite: a merge killed before its cell finished may have left its output
            if keep is not None:
                kwargs["keep_layers"] = sorted(keep)
            out = merge_checkpoint(method, self.path(src["final"]), c.dir / "merged", overwrite=True, **kwargs)
            return {"final": self.rel(out), "retrieval": self.retrieval(out, "test")}

        merged = {**self.store.run("merge", cell.spec, run), "label": label}
        if keep is None:
            self.merges[label] = (src, merged, method, dict(params))
        return merged

    def learned_alpha(self, src: Mapping[str, Any], objective: str) -> dict[str, Any]:
        """Interpolation's per-layer α for ``src`` learned on the world's validation split (``layerwise``)."""
        lw = self.cfg.layerwise
        # "known_true": the supervised loss leaves captions the world knows to be true of an image out of its
        # negatives (merge.learned.contrastive_loss), as the tiny pre-training does
        spec = {"src": src["final"], "method": "interpolation", "objective": objective, "known_true": "exclude",
                **lw.model_dump(exclude={"objectives"}), "seed": self.seed, "world": self.cfg.world, "split": "val"}
        cell = self._record(f"learn/{src['label']}/{objective}", "learn", spec)

        def run(c: Cell) -> dict[str, Any]:
            from ..merge.learned import learn_schedule, world_split_batches
            from ..models import load_model

            model = load_model(self.path(src["final"])).eval()
            batches = world_split_batches(model, lw.batches, self.seed, "val", lw.batch_size, world=self.cfg.world)
            return learn_schedule(model, batches, objective, granularity=lw.granularity, steps=lw.steps, lr=lw.lr,
                                  progress=self.progress)

        return self.store.run("learn", cell.spec, run)

    def layerwise(self, src: Mapping[str, Any]) -> dict[str, Any]:
        """Learned per-layer α against the best global α of Table 2's grid (chosen on the test split itself, so
        the comparison favours the global α), with the paired bootstrap difference of each learned merge."""
        grid = {str(a): self.scores(self.merge(src, "interpolation", alpha=a)) for a in self.cfg.table2.interpolation}
        best = max(grid, key=lambda a: grid[a]["r_mean"])
        # a key of the grid (a string: with several seeds it is seed 0's best, each seed's Δ against its own)
        out: dict[str, Any] = {"global": grid, "best_global": best, "learned": {}, "schedules": {},
                               "vs_best_global": {}}
        for objective in self.cfg.layerwise.objectives:
            learned = self.learned_alpha(src, objective)
            sc = self.scores(self.merge(src, "interpolation", alpha=learned["schedule"]))
            out["learned"][objective] = sc
            out["schedules"][objective] = learned["schedule"]
            out["vs_best_global"][objective] = difference(sc, grid[best])
        return out

    def pareto(self, src: Mapping[str, Any]) -> dict[str, Any]:
        """Partial merges of ``src`` (interpolation at the baseline α) keeping k of its n layers with copies
        modality-specific, k = 0..n: every subset when there are at most ``pareto_max_subsets`` of them (the
        random choice's expectation is then exact), else a seeded sample of each size; the predictor's choice
        (the k riskiest layers, as ``merge --budget k/n`` picks them) and the deepest k."""
        import itertools
        import random

        from ..metrics.predict import layer_report
        from ..models import CheckpointReader
        from ..models.roles import merge_groups

        ckpt = self.path(src["final"])
        with CheckpointReader(ckpt) as r:
            layers = sorted({g.layer for g in merge_groups(r.keys())})
        n, alpha = len(layers), self.cfg.baseline_alpha
        exhaustive = 2**n - 1 <= self.cfg.pareto_max_subsets
        rng = random.Random(f"pareto/{src['label']}")  # the same sample of kept sets for every training seed
        ranked = [i for i in layer_report(ckpt)["ranked"] if i in layers]

        def point(keep: Sequence[int]) -> dict[str, Any]:
            m = src if len(keep) == n else self.merge(src, "interpolation", keep=keep or None, alpha=alpha)
            with CheckpointReader(self.path(m["final"])) as r:
                numel = sum(math.prod(r.shape(k)) for k in r)
            return {"keep": layers_key(keep), "params": numel, "scores": self.scores(m)}

        points, by_k = [], []
        for k in range(n + 1):
            subsets = list(itertools.combinations(layers, k))
            if not exhaustive and len(subsets) > self.cfg.pareto_max_subsets // (n + 1):
                subsets = rng.sample(subsets, max(1, self.cfg.pareto_max_subsets // (n + 1)))
            pts = [point(s) for s in subsets]
            points += pts
            by_keep = {p["keep"]: p for p in pts}
            chosen = {name: by_keep.get(layers_key(keep)) or point(keep)
                      for name, keep in (("predictor", ranked[:k]), ("depth", layers[n - k:]))}
            random_mean = average_scores([p["scores"] for p in pts])
            by_k.append({"k": k, "n_random": len(pts), "random": random_mean, **chosen,
                         "predictor_vs_random": difference(chosen["predictor"]["scores"], random_mean),
                         "depth_vs_random": difference(chosen["depth"]["scores"], random_mean)})
        return {"layers": layers, "exhaustive": exhaustive, "points": points, "by_k": by_k}

    def calibration_points(self) -> list[dict[str, Any]]:
        """Every evaluated merge as a ``vlmerge predict`` calibration point: the source checkpoint's weight
        features and the merge's own (:func:`~vlmerge.metrics.predict.merge_features` and the activation drift
        :func:`~vlmerge.metrics.predict.merge_drift` on :data:`PREDICT_BATCHES` batches of the world's
        validation split), the merge, its retrieval drop (Avg TR/IR mean, points) with the bootstrap interval.
        The group is the source run's label (architecture and K_seed), so a held-out fit never sees the held-out
        run. Points come grouped by source, each source read once."""
        from ..merge.gram_data import world_batches
        from ..metrics.predict import calibration_point, layer_report, merge_drift, merge_features
        from ..models.checkpoint import CheckpointReader, load_model

        by_source: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any], str, dict[str, Any]]]] = {}
        for merge in self.merges.values():
            by_source.setdefault(merge[0]["final"], []).append(merge)
        points, batches = [], None
        for final, merges in by_source.items():
            if final not in self._features:
                self._features[final] = layer_report(self.path(final))["global"]
            with CheckpointReader(self.path(final)) as r:
                sd = r.state_dict()
            model = load_model(self.path(final)).eval()
            if batches is None:  # the same validation pairs for every merge (every model shares the world)
                batches = list(world_batches(model, PREDICT_BATCHES, self.seed, batch_size=PREDICT_BATCH_SIZE,
                                             world=self.cfg.world, split="val"))
            for src, merged, method, params in merges:
                with CheckpointReader(self.path(merged["final"])) as r:
                    merged_sd = r.state_dict()
                moved = merge_features(sd, merged_sd) | merge_drift(model, merged_sd, batches)
                before, after = self.scores(src), self.scores(merged)
                interval = difference(before, after).interval("r_mean")  # paired: the same test resamples
                ci = list(interval) if interval is not None else None
                points.append(calibration_point({**self._features[final], **moved}, method, params,
                                                before["r_mean"] - after["r_mean"], group=src["label"],
                                                checkpoint=f"seed={self.seed}/{src['label']}", drop_ci=ci))
        return points

    def grams(self, src: Mapping[str, Any]) -> Any:
        from ..merge import collect_grams, load_grams, save_grams
        from ..merge.gram_data import world_batches
        from ..models import load_model

        spec = {"src": src["final"], "batches": self.cfg.regmean_batches, "seed": self.seed, "world": self.cfg.world}
        cell = self._record(f"grams/{src['label']}", "grams", spec)

        def run(c: Cell) -> dict[str, Any]:
            model = load_model(self.path(src["final"])).eval()
            g = collect_grams(model, world_batches(model, self.cfg.regmean_batches, self.seed, world=self.cfg.world))
            save_grams(g, c.dir / "grams.safetensors")
            return {"path": self.rel(c.dir / "grams.safetensors")}

        return load_grams(self.path(self.store.run("grams", cell.spec, run)["path"]))

    def retrieval(self, ckpt: str | Path, split: str) -> dict[str, Any]:
        """Zero-shot retrieval of ``ckpt`` on ``split``: the metric keys, the chance levels and the per-query
        ranks (for the bootstrap)."""
        from ..data import default_tokenizer
        from ..finetune.data import embedded_dataset
        from ..models import load_model
        from ..pretrain import evaluate_retrieval

        model = load_model(ckpt)
        key = (split, model.config.image_size)
        if key not in self._eval_sets:  # rendered once per process, read from the shared shard cache
            self._eval_sets[key] = embedded_dataset("retrieval", split, self.cfg.eval_images,
                                                    self.base["data"]["seed"], key[1], world=self.cfg.world,
                                                    cache_dir=self.out / "data-cache")
        return evaluate_retrieval(model, self._eval_sets[key], default_tokenizer(), ranks=True)

    def retrieval_scores(self, r: Mapping[str, Any], split: str = "test", prefix: str = "") -> Scores:
        """Avg TR / Avg IR / their mean with bootstrap replicates over ``split``'s images."""
        self.baselines.setdefault("retrieval" + (f"_{split}" if split != "test" else ""), r["chance"])
        sc = retrieval_scores(r["ranks"], r["images"], f"retrieval/{split}")
        return Scores({prefix + k: v for k, v in sc.items()}, {prefix + k: v for k, v in sc.boot.items()})

    def task(self, src: Mapping[str, Any], task: str) -> Scores:
        """Fine-tune ``src`` on ``task`` and evaluate on the test split: ``{task: score}`` with replicates."""
        from ..finetune import finetune

        spec = {"src": src["final"], "task": task, "preset": self.cfg.finetune, "seed": self.seed,
                "sets": self.cfg.finetune_set.get(task, []), "world": self.cfg.world, "eval": EVAL_VERSION}
        cell = self._record(f"finetune/{src['label']}/{task}", "finetune", spec)

        def run(c: Cell) -> dict[str, Any]:  # fine-tunes, then scores the test split (finetune's eval_split)
            shutil.rmtree(c.dir / "model", ignore_errors=True)  # left by a fine-tune killed before it finished
            ckpt = finetune(task, self.path(src["final"]), c.dir / "model", preset=self.cfg.finetune,
                            sets=[f"seed={self.seed}", "data.eval_split=test",
                                  f"data.world={json.dumps(self.cfg.world)}", *self.cfg.finetune_set.get(task, []),
                                  f"data.cache_dir={self.out / 'data-cache'}"])  # not in the hash: data alike
            metrics = json.loads((ckpt / "metrics.json").read_text())
            shutil.rmtree(ckpt)  # only the numbers are kept: a study makes dozens of task models
            return metrics

        m = self.store.run("finetune", cell.spec, run)
        base = m.get("baseline", {})
        self.baselines.setdefault(task, {"kind": base.get("kind"), "score": next(
            (float(v) for k, v in base.items() if k != "kind"), math.nan)})
        split = f"{task}/test/{m['n']}"
        if task == "seg":
            pe = m["per_example"]
            return miou_score(task, pe["tp"], pe["fp"], pe["fn"], split)
        return mean_score(task, m["per_example"], split)

    # -- parts -----------------------------------------------------------------------------------------
    def scores(self, r: Mapping[str, Any]) -> Scores:
        return self.retrieval_scores(r["retrieval"])

    def run(self, parts: Sequence[str]) -> dict[str, Any]:
        c, res = self.cfg, {}
        maa = {**self.pretrain("maa", 0.0), "arch_is_maa": True}  # first: its run holds the seed stages
        msa0 = self.pretrain("msa", 0.0)
        recipe = self.pretrain("msa", c.recipe_k_seed)
        baseline = self.merge(msa0, "interpolation", alpha=c.baseline_alpha)
        if "table1" in parts:
            rows = {"maa": maa, "msa": msa0, "merging_baseline": baseline}
            res["table1"] = {}
            for k, v in rows.items():
                sc = self.scores(v)
                for t in c.table1_tasks:
                    sc = sc.merged(self.task(v, t))
                res["table1"][k] = sc
        fracs = sorted(c.k_seed)
        if "figure3" in parts or "table5" in parts:  # the K_seed runs: only where a part reads them
            runs = {f: self.pretrain("msa", f) for f in fracs}
            merged = {f: self.merge(r, "interpolation", alpha=c.baseline_alpha) for f, r in runs.items()}
            res["figure3"] = {"k_seed": [runs[f]["k_seed"] for f in runs], "k_seed_frac": fracs,
                              "before": [self.scores(r) for r in runs.values()],
                              "after": [self.scores(m) for m in merged.values()]}
        if "table2" in parts:
            grid = c.table2
            res["table2"] = {
                "interpolation": {str(a): self.scores(self.merge(recipe, "interpolation", alpha=a))
                                  for a in grid.interpolation},
                "modality_arithmetic": {str(lam): self.scores(self.merge(recipe, "modality_arithmetic", lam=lam))
                                        for lam in grid.modality_arithmetic},
                "regmean": {str(g): self.scores(self.merge(recipe, "regmean", gamma=g)) for g in grid.regmean},
            }
        if "figure4" in parts:
            f4 = {}
            for arch in c.archs:
                if arch == "maa":
                    f4[arch] = {"before": self.scores(maa), "after": self.scores(maa)}
                    continue
                r = recipe if arch == "msa" else self.pretrain(arch, c.recipe_k_seed)
                f4[arch] = {"before": self.scores(r),
                            "after": self.scores(self.merge(r, "interpolation", alpha=c.baseline_alpha))}
            res["figure4"] = f4
        if "table3" in parts:
            ours = self.merge(recipe, "interpolation", alpha=c.recipe_alpha)
            rows = {"msa": msa0, "maa": maa, "merging_baseline": baseline, "ours": ours}
            t3 = {}
            for k, v in rows.items():
                ood = self.retrieval_scores(self.retrieval(self.path(v["final"]), "ood"), "ood", prefix="ood_")
                sc = self.scores(v).merged(ood)
                for t in c.table3_tasks:
                    sc = sc.merged(self.task(v, t))
                t3[k] = sc
            res["table3"] = t3
        if "layerwise" in parts:
            res["layerwise"] = {"recipe": self.layerwise(recipe), "msa": self.layerwise(msa0)}
        if "pareto" in parts:
            res["pareto"] = {"msa": self.pareto(msa0), "recipe": self.pareto(recipe)}
        if "table5" in parts:
            from ..metrics import checkpoint_distances

            dist = [checkpoint_distances(self.path(runs[f]["final"]))["global"] for f in runs]
            res["table5"] = {"k_seed": res["figure3"]["k_seed"],
                             "metrics": {m: [float(d[m]) for d in dist] for m in ("l2", "cosine", "ssd", "tssd")},
                             "sign_flips": [d["sign_flips"] for d in dist], "numel": dist[0]["numel"]}
        res["baselines"] = dict(self.baselines)
        return res


def layers_key(layers: Sequence[int]) -> str:
    """``"0,2,3"``: a set of layers as one sorted string (a label, and a key that seed aggregation keeps)."""
    return ",".join(map(str, sorted(layers)))


def difference(a: Scores, b: Scores) -> Scores:
    """``a − b`` for every score both have, with paired replicates (the same test resamples): the interval of a
    difference between two models on one split."""
    keys = [k for k in a if k in b and not k.endswith("_std")]
    return Scores({k: a[k] - b[k] for k in keys},
                  {k: a.boot[k] - b.boot[k] for k in keys if k in a.boot and k in b.boot})


def average_scores(rows: Sequence[Scores]) -> Scores:
    """The mean of several models' scores on one split, replicate by replicate (an expectation over models,
    e.g. over every random choice of kept layers, with the test set's uncertainty)."""
    keys = [k for k in rows[0] if all(k in r for r in rows) and not k.endswith("_std")]
    return Scores({k: sum(r[k] for r in rows) / len(rows) for k in keys},
                  {k: sum(r.boot[k] for r in rows) / len(rows) for k in keys if all(k in r.boot for r in rows)})


def _checkpoint_at(run_dir: Path, step: int) -> Path | None:
    """``run_dir``'s training checkpoint at ``step`` if it still has one (a run killed after stopping there);
    a run that went past ``step`` without keeping it is removed, so that it is redone up to ``step``."""
    from ..pretrain.state import latest_checkpoint, read_state_meta

    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    if (ckpt / "config.json").is_file():
        return ckpt
    last = latest_checkpoint(run_dir)
    if (last is not None and read_state_meta(last)["global_step"] > step) or (run_dir / "final").exists():
        shutil.rmtree(run_dir)
    return None


def start_from_checkpoint(checkpoint: Path, run_dir: Path) -> None:
    """Make ``checkpoint`` (a training checkpoint of another run) the latest checkpoint of ``run_dir``, so that
    :func:`~vlmerge.pretrain.pretrain` resumes from it; a run that has checkpoints of its own is left alone."""
    from ..models.checkpoint import atomic_write_json
    from ..pretrain.state import LATEST, latest_checkpoint, read_state_meta

    if latest_checkpoint(run_dir) is not None:
        return
    root = run_dir / "checkpoints"
    shutil.rmtree(root / checkpoint.name, ignore_errors=True)
    shutil.copytree(checkpoint, root / checkpoint.name)
    log_rows = checkpoint.parent.parent / "metrics.jsonl"  # the seed stage's log, truncated at the checkpoint
    if log_rows.is_file() and not (run_dir / "metrics.jsonl").exists():
        shutil.copy(log_rows, run_dir / "metrics.jsonl")
    step = read_state_meta(checkpoint)["global_step"]
    atomic_write_json(root / LATEST, {"dir": checkpoint.name, "global_step": step})


def _finite(x: float) -> float | None:
    """None where a correlation is undefined (a metric constant over K_seed): JSON has no NaN."""
    return x if math.isfinite(x) else None


def finish_table5(results: dict[str, Any]) -> None:
    """Table 5's drops (from Figure 3) and each metric's Pearson / Spearman correlation with them, with the
    Pearson r's 95 % bootstrap interval over test queries (the K_seed runs held fixed)."""
    import numpy as np

    from ..metrics import correlate
    from ..metrics.correlation import pearson
    from .stats import percentile_interval

    t5, f3 = results.get("table5"), results.get("figure3")
    if not t5 or not f3:
        return
    before, after = f3["before"], f3["after"]
    t5["drop"] = [b["r_mean"] - a["r_mean"] for b, a in zip(before, after, strict=True)]
    corr = correlate(t5["metrics"], t5["drop"])
    t5["pearson"] = {m: _finite(corr[m]["pearson"]) for m in t5["metrics"]}
    t5["spearman"] = {m: _finite(corr[m]["spearman"]) for m in t5["metrics"]}
    if all("r_mean" in x.boot for x in (*before, *after)):
        drops = np.stack([b.boot["r_mean"] - a.boot["r_mean"] for b, a in zip(before, after, strict=True)], axis=1)
        cis = {m: percentile_interval(np.array([pearson(v, d) for d in drops])) for m, v in t5["metrics"].items()}
        t5["pearson_ci"] = {m: list(ci) if all(map(math.isfinite, ci)) else None for m, ci in cis.items()}


def predictor_summary(points: Sequence[Mapping[str, Any]], method: str | None, params: Mapping[str, Any] | None
                      ) -> dict[str, Any]:
    """``vlmerge predict``'s drop model for ``method`` / ``params`` (None: pooled over every merge) over the
    study's merges: the features it picks, its held-out (leave-one-group-out) Pearson r with a 95 % Fisher-z
    interval over the n points, and each candidate's held-out r and plain r on the same points (a plain r for
    single features only); ``{"error": why}`` when it cannot fit."""
    from ..metrics.correlation import pearson
    from ..metrics.predict import fit_drop_model

    what = {"method": method, "params": None if params is None else dict(params)}
    try:
        model = fit_drop_model(points, method, params)
    except ValueError as e:
        return {**what, "error": str(e)}
    pts = list(points) if method is None else [p for p in points
                                               if p["method"] == method and p["params"] == dict(params or {})]
    drops = [p["drop"] for p in pts]

    def fisher(r: float, n: int) -> list[float] | None:
        if not math.isfinite(r) or n <= 3 or abs(r) >= 1:
            return None
        z, half = math.atanh(r), 1.959964 / math.sqrt(n - 3)
        return [math.tanh(z - half), math.tanh(z + half)]

    per = {}
    for f, score in model["per_feature"].items():
        plain = float("nan")
        if f in pts[0]["features"]:
            xs = [p["features"][f] for p in pts]
            plain = pearson(xs, drops) if len(set(xs)) > 1 and len(set(drops)) > 1 else float("nan")
        per[f] = {"loo_r": _finite(score["loo_r"]), "loo_r_ci": fisher(score["loo_r"], model["n"]),
                  "r": _finite(plain)}
    return {**what, "feature": model["feature"], "n": model["n"], "groups": model["groups"],
            "methods": sorted({p["method"] for p in pts}), "loo_r": _finite(model["loo_r"]),
            "loo_r_ci": fisher(model["loo_r"], model["n"]), "loo_rmse": model["loo_rmse"],
            "coef": model["coef"], "per_feature": per}


def study_command(experiment: str, preset: str, out: str | Path, *, only: Sequence[str] | None = None,
                  seeds: Sequence[int] = (0,), overrides: Sequence[str] = ()) -> str:
    """The ``vlmerge study`` command line that reproduces a run with these arguments."""
    words = ["vlmerge", "study", *([experiment] if experiment != "merging" else []), "--preset", preset, "--out",
             str(out)]
    if only:
        words += ["--only", ",".join(only)]
    if list(seeds) != [0]:
        words += ["--seeds", ",".join(str(s) for s in seeds)]
    for item in overrides:
        words += ["--set", shlex.quote(item)]
    return " ".join(words)


def run_study(preset: str, out_dir: str | Path, *, only: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
              overrides: Sequence[str] = (), progress: bool = True,
              on_seed: Callable[[int, dict[str, Any]], None] | None = None) -> Path:
    """Run (or resume) the study ``preset`` into ``out_dir``; returns the path of ``report.md``.

    ``only``: the parts to run (None: all; an empty list is refused). The arguments are checked before
    ``out_dir`` is created; it is then locked (:class:`~vlmerge.files.RunLock`) for the run.
    """
    from ..files import check_run_folder, locked_run_folder

    t0 = time.time()
    cfg = load_study_config(preset, overrides)
    parts = list(PARTS if only is None else only)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"--only: {f'unknown parts {bad}' if bad else 'no parts given'}; expected some of "
                         f"{', '.join(PARTS)}")
    if not seeds:
        raise ValueError("--seeds: give at least one seed, e.g. 0 or 0,1,2")
    check_finetune_configs(cfg)
    base_pretrain_config(cfg)  # a bad pretrain / pretrain_set is refused before the folder exists
    out = check_run_folder(out_dir, "cells", "study")
    with locked_run_folder(out, "study folder"):
        return _run_study(cfg, preset, out_dir, parts, only, seeds, overrides, progress, on_seed, t0)


def _cell_time(out: Path, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """How many distinct cells the run used and their recorded compute seconds (cached ones included)."""
    dirs = {out / "cells" / f"{c['kind']}-{c['hash']}" for c in cells.values()}
    seconds = 0.0
    for d in dirs:
        try:
            seconds += float(json.loads((d / "result.json").read_text()).get("seconds", 0.0))
        except (OSError, ValueError):
            continue  # a cell recorded but not finished (cannot happen after a completed run)
    return {"cells_total": len(dirs), "cell_seconds": seconds}


def _run_study(cfg: StudyConfig, preset: str, out_dir: str | Path, parts: list[str], only: Sequence[str] | None,
               seeds: Sequence[int], overrides: Sequence[str], progress: bool,
               on_seed: Callable[[int, dict[str, Any]], None] | None, t0: float) -> Path:
    """:func:`run_study` once its arguments are checked and ``out_dir`` is locked."""
    import torch

    from ..metrics.predict import CALIBRATION_NAME, save_calibration

    out = Path(out_dir)
    per_seed, cells, computed, points = [], {}, 0, []
    for seed in seeds:
        study = Study(cfg, out, seed, progress)
        per_seed.append(study.run(parts))
        cells.update({f"seed={seed}/{k}": v for k, v in study.cells.items()})
        computed += len(study.store.computed)
        points += study.calibration_points()
        if on_seed:
            on_seed(seed, per_seed[-1])
    results = aggregate_seeds(per_seed)
    finish_table5(results)
    if points:
        save_calibration(points, out / CALIBRATION_NAME)
        results["predictor"] = predictor_summary(points, "interpolation", {"alpha": cfg.baseline_alpha})
        results["predictor_pooled"] = {**predictor_summary(points, None, None),
                                       "drift_pairs": PREDICT_BATCHES * PREDICT_BATCH_SIZE}
    results["meta"] = {
        "preset": cfg.name, "seeds": list(seeds), "parts": parts, "wall_time_s": time.time() - t0,
        "command": study_command("merging", preset, out_dir, only=only, seeds=seeds, overrides=overrides),
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg.model_dump(mode="json")), "device": "cuda" if torch.cuda.is_available() else
        "cpu", "cpu": _cpu_name(), "threads": torch.get_num_threads(), "cells_computed": computed,
        **_cell_time(out, cells),
        "bootstrap": {"resamples": RESAMPLES, "level": LEVEL,
                      "unit": "test images (retrieval), examples (tasks); the same resamples for every model"},
    }
    results["cells"] = cells
    return write_report(out, results)
