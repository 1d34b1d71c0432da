"""The UnIVAL study's runner: :class:`Unival` runs every cell and evaluation of one seed (pre-training, the three
fine-tuning recipes, the scenarios' merges and scores), :func:`~..stats.aggregate_seeds` averages the seeds, and
:func:`run_unival` runs a preset's seeds and writes the results and report (:mod:`.report`)."""

from __future__ import annotations

import json
import platform
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...models.checkpoint import atomic_write_bytes
from ..cells import Cell, CellStore, config_hash
from ..stats import (
    LEVEL,
    RESAMPLES,
    Scores,
    aggregate_seeds,
    mean_score,
    n_resamples,
    retrieval_scores,
)
from .config import RECIPES, UnivalConfig, load_unival_config, mean
from .findings import check_unival_findings
from .heads import head_mode
from .report import write_report


class Unival:
    """Runs every cell of one seed; :func:`run_unival` aggregates and reports."""

    def __init__(self, config: UnivalConfig, out: Path, seed: int, progress: bool = True) -> None:
        from ...pretrain import load_config

        self.cfg, self.out, self.seed, self.progress = config, out, seed, progress
        self.heads = head_mode(config.head)
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

    def items(self, task: str, split: str) -> list[dict[str, Any]]:
        """Rendered items of ``task``'s ``split`` (an OOD name: its own split), cached in memory."""
        from ...finetune.unified import materialize, unified_dataset

        key = (task, split)
        if key not in self.data:
            name, sp = (task.split("@") + [split])[:2] if "@" in task else (task, split)
            size = self.cfg.size(split if split != "ood" else "test", task)
            ds = unified_dataset(name, sp, size, image_size=self.image_size, seed=self.base_cfg.data.seed)
            self.data[key] = materialize(ds)
        return self.data[key]

    # -- cells ------------------------------------------------------------------------------------------
    def pretrain(self) -> Path:
        from ...pretrain import pretrain, validate_config

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
        from ...finetune import finetune

        sets = [f"seed={self.seed}", f"head={self.cfg.head}", "device=cpu", *self.cfg.finetune_set,
                *self.cfg.task_set.get(task, []), *extra]
        return finetune(self.heads.finetune_task(task), init, out, preset=self.cfg.finetune_preset, sets=sets,
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
        from ...finetune.soups import fusing

        def run(c: Cell) -> dict[str, Any]:
            return {"dir": self.rel(fusing(task, aux, c.dir, lambda t, i, o: self.finetune(t, i, o)))}

        spec = self._spec(task=task, aux=[self.rel(a) for a in aux], task_set=self.cfg.task_set.get(task, []))
        return self.path(self._cell(f"fusing/{task}", "ft-fusing", spec, run)["dir"])

    def ratatouille(self, task: str, aux: Sequence[Path]) -> Path:
        from ...finetune.soups import ratatouille

        extra = self.cfg.ratatouille_set

        def run(c: Cell) -> dict[str, Any]:
            model, tuned = ratatouille(task, aux, c.dir, lambda t, i, o: self.finetune(t, i, o, extra))
            return {"dir": self.rel(model), "members": [self.rel(t) for t in tuned]}

        spec = self._spec(task=task, aux=[self.rel(a) for a in aux], task_set=self.cfg.task_set.get(task, []),
                          ratatouille_set=extra)
        return self.path(self._cell(f"ratatouille/{task}", "ft-ratatouille", spec, run)["dir"])

    # -- evaluation -------------------------------------------------------------------------------------
    def model_for(self, merged: Mapping[str, Any], task: str) -> Any:
        """The in-memory model evaluating ``task``: its template loaded with the merged model's state for it."""
        m = self.templates[self.heads.template(task)]
        m.load_state_dict(dict(self.heads.state(merged, task)), strict=True)
        return m.eval()

    def score(self, merged: Mapping[str, Any], task: str, split: str = "test") -> Scores:
        """``{task: score}`` (percent) with its bootstrap replicates over the split's test examples.

        The replicates come from the evaluation's ``per_example`` outcomes (task-head ITM, i.e. retrieval: the
        per-query ranks, resampling images) under the split name ``unival/<task>/<split>``, so every model
        scored on one split gets the same resamples (:func:`~..stats.resample_counts`) and differences are paired.
        """
        sp = "ood" if "@" in task else split
        items = self.items(task, sp)
        model = self.model_for(merged, task)
        name = f"unival/{task}/{sp}"
        with torch.no_grad():
            r = self.heads.evaluate(model, task.split("@")[0], items, self.tok, self.cfg.eval_batch_size)
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

    def scores(self, merged: Mapping[str, Any], tasks: Sequence[str], split: str = "test") -> Scores:
        """One :class:`~..stats.Scores` with every task of ``tasks`` (values and replicates)."""
        out = Scores()
        for t in tasks:
            out = out.merged(self.score(merged, t, split))
        return out

    # -- the scenarios ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from ...data import default_tokenizer
        from ...finetune import soups
        from ...models import load_model

        c, h = self.cfg, self.heads
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
        for key, t in h.templates(tasks).items():
            self.templates[key] = load_model(vanilla[t])
        base_state = soups.load_state(base)
        ood = [o for o in h.ood(c.ood) if o.split("@")[0] != "vqa" or "vqa" in tasks]

        # Specialists: each recipe's model for task t, scored on the seen tasks its head answers (unified: every
        # one, cross-task transfer too).
        specialists = {r: {t: self.scores(h.view(states[r][t], t), h.specialist_tasks(t, tasks)) for t in tasks}
                       for r in RECIPES}

        # Scenario 1: interpolation fronts.
        fronts: dict[str, Any] = {}
        for a, b in c.pairs:
            for r in ("vanilla", "ratatouille"):
                pts = []
                for lam in c.lambdas:
                    merged = h.merge(lambda s, k, lam=lam: soups.interpolate(s[0], s[1], lam, keys=k),
                                     {a: states[r][a], b: states[r][b]})
                    pts.append({"lambda": lam, "test": self.scores(merged, [a, b]),
                                "val": self.scores(merged, [a, b], "val")})
                vals = {str(p["lambda"]): mean([p["val"][t] for t in (a, b)]) for p in pts}
                best = max(pts, key=lambda p: (vals[str(p["lambda"])], -p["lambda"]))
                fronts[f"{a}|{b}|{r}"] = {"a": a, "b": b, "recipe": r, "points": pts,
                                          "grid_search": {"best_lambda": best["lambda"], "val": vals,
                                                          "test": best["test"]}}

        # Scenarios 2 and 3: merged models.
        merged_models: dict[str, Any] = {}
        for r in RECIPES:
            merged_models[f"soup/{r}"] = h.merge(lambda s, k: soups.soup(s, keys=k), states[r])
        for name in ("task_arithmetic", "ties", "dare"):
            params = dict(getattr(c, name))
            merged_models[f"{name}/vanilla"] = h.merge(
                lambda s, k, name=name, params=params: soups.task_vector_merge(name, s, base_state, keys=k, **params),
                states["vanilla"])
        greedy: dict[str, Any] | None = None
        if c.greedy:
            pool = {f"{r}/{t}": states[r][t] for r in RECIPES for t in tasks}
            cache: dict[tuple[str, ...], float] = {}

            def val_of(members: Sequence[str]) -> float:
                key = tuple(sorted(members))
                if key not in cache:
                    val = self.scores(h.soup([pool[x] for x in key], states["vanilla"], tasks), tasks, "val")
                    cache[key] = mean([val[t] for t in tasks])
                return cache[key]

            greedy = soups.greedy_soup(list(pool), val_of)
            merged_models["greedy_soup"] = h.soup([pool[x] for x in greedy["members"]], states["vanilla"], tasks)
        id_scores = {name: self.scores(m, tasks) for name, m in merged_models.items()}
        ood_scores = {name: self.scores(m, ood) for name, m in merged_models.items()}
        if "vqa" in tasks:  # Table 20: the VQA models on the unseen VQA-style sets
            for r in RECIPES:
                ood_scores[f"specialist/{r}/vqa"] = self.scores(h.view(states[r]["vqa"], "vqa"), ood)
        ood_scores["pretrained"] = self.scores(base_state, ood) if h.scores_pretrained else Scores()
        self.timings["evaluate_s"] = time.time() - t0
        return {
            "tasks": tasks, "ood": ood, "head": c.head,
            "val_scores": {r: {t: self.score(h.view(states[r][t], t), t, "val")[t] for t in tasks} for r in RECIPES},
            "specialists": specialists,
            "scenario1": fronts,
            "scenario2": id_scores,
            "scenario3": ood_scores,
            "greedy_soup": greedy,
            "baselines": self.baselines,
            "counts": self.counts,
            "timings": {**self.timings, "evaluations": self.n_evals},
        }


def unival_command(preset: str, out: str | Path, seeds: Sequence[int], overrides: Sequence[str]) -> str:
    """The ``vlmerge study unival`` command line that reruns this study (quoted for a shell)."""
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
    results = aggregate_seeds(per_seed)
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
    return write_report(out_dir, results, findings)
