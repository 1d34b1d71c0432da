"""The study's report: ``results.json`` (every number), PNG plots, and ``report.md`` that embeds them.

All tables and findings are generated from ``results``; see :mod:`vlmerge.study.runner` for the schema.
A score dict holds ``avg_tr`` / ``avg_ir`` / ``r_mean`` (retrieval), optional task scores (``vqa``, ``nlvr2``,
``cls``, ``seg``, ``ood_*``), with several seeds ``<name>_std``, and its bootstrap replicates (in memory,
:class:`~vlmerge.study.stats.Scores`; ``ci`` in ``results.json``). Tables print each score with its 95 %
interval over test queries, ``[lo, hi]``, and with several seeds ``± std`` over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..models.checkpoint import atomic_write_bytes, atomic_write_json
from .findings import PAPER, check_findings, decide, format_r, retrieval
from .stats import Scores, with_intervals

TASK_LABELS = {"vqa": "VQA", "avg_tr": "Avg TR", "avg_ir": "Avg IR", "r_mean": "retrieval", "nlvr2": "NLVR2",
               "cls": "Cls top-1", "seg": "Seg mIoU", "ood_avg_tr": "OOD Avg TR", "ood_avg_ir": "OOD Avg IR",
               "ood_r_mean": "OOD retrieval"}
RETRIEVAL = ["vqa", "avg_tr", "avg_ir", "r_mean"]
OUTCOME_MARK = {"reproduced": "✅ reproduced", "contradicted": "❌ contradicted", "inconclusive": "➖ inconclusive"}


def _interval(scores: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    if isinstance(scores, Scores):
        return scores.interval(key)
    ci = scores.get("ci", {}).get(key) if isinstance(scores.get("ci"), Mapping) else None
    return tuple(ci) if ci else None  # type: ignore[return-value]


def _cell(scores: Mapping[str, Any], key: str) -> str:
    if key not in scores:
        return "–"
    std, ci = scores.get(f"{key}_std"), _interval(scores, key)
    return (f"{scores[key]:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
            + (f" ± {std:.2f}" if std is not None else ""))


def _table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str], first: str) -> str:
    keys = [k for k in keys if any(k in r for r in rows.values())]
    lines = [f"| {first} | " + " | ".join(TASK_LABELS.get(k, k) for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(r, k) for k in keys) + " |" for name, r in rows.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots
def _yerr(rows: Sequence[Mapping[str, Any]], key: str = "r_mean") -> list[list[float]] | None:
    """Asymmetric error bars [[below...], [above...]] from each row's 95 % interval of ``key`` (None if any
    row has none)."""
    cis = [_interval(r, key) for r in rows]
    if any(c is None for c in cis):
        return None
    return [[r[key] - c[0] for r, c in zip(rows, cis, strict=True)],  # type: ignore[index]
            [c[1] - r[key] for r, c in zip(rows, cis, strict=True)]]  # type: ignore[index]


def _savefig(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_all(results: Mapping[str, Any], out: Path) -> list[str]:
    """Write every plot the results allow; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    f3 = results.get("figure3")
    if f3:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for rows, style, label in ((f3["before"], "o-", "MSA before merging"),
                                   (f3["after"], "s--", "after merging (interpolation)")):
            ax.errorbar(f3["k_seed"], [retrieval(s) for s in rows], yerr=_yerr(rows), fmt=style, capsize=3,
                        label=label)
        ax.set_xlabel("K_seed (steps of seed pre-training)")
        ax.set_ylabel("retrieval (mean of Avg TR, Avg IR)")
        ax.set_title("Figure 3: seed pre-training")
        ax.legend()
        _savefig(fig, out / "figure3.png")
        written.append("figure3.png")
    t2 = results.get("table2")
    if t2:
        fig, axes = plt.subplots(1, len(t2), figsize=(4 * len(t2), 3.2), squeeze=False)
        symbol = {"interpolation": "α", "modality_arithmetic": "λ", "regmean": "γ"}
        for ax, (method, cells) in zip(axes[0], t2.items(), strict=True):
            xs = sorted(cells, key=float)
            ax.errorbar([float(x) for x in xs], [retrieval(cells[x]) for x in xs], yerr=_yerr([cells[x] for x in xs]),
                        fmt="o-", capsize=3)
            ax.set_title(method)
            ax.set_xlabel(symbol.get(method, "param"))
            ax.set_ylabel("retrieval")
        fig.suptitle("Table 2: merging methods")
        _savefig(fig, out / "table2.png")
        written.append("table2.png")
    f4 = results.get("figure4")
    if f4:
        archs = list(f4)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(archs))
        for shift, when, label in ((-0.2, "before", "before merging"), (0.2, "after", "after merging")):
            rows = [f4[a][when] for a in archs]
            ax.bar([i + shift for i in x], [retrieval(r) for r in rows], 0.4, yerr=_yerr(rows), capsize=3, label=label)
        ax.set_xticks(list(x), archs)
        ax.set_ylabel("retrieval")
        ax.set_title("Figure 4: shared-weight architectures")
        ax.legend()
        _savefig(fig, out / "figure4.png")
        written.append("figure4.png")
    pareto = results.get("pareto")
    if pareto:
        fig, axes = plt.subplots(1, len(pareto), figsize=(5 * len(pareto), 3.6), squeeze=False)
        for ax, (src, pr) in zip(axes[0], pareto.items(), strict=True):
            ax.scatter([p["params"] / 1e6 for p in pr["points"]], [retrieval(p["scores"]) for p in pr["points"]],
                       s=14, color="0.65", label="every kept-layer set" if pr["exhaustive"] else "sampled sets")
            rows = pr["by_k"]
            for key, style, label in (("predictor", "o-", "predictor: riskiest k kept"),
                                      ("depth", "s--", "deepest k kept")):
                ax.errorbar([r[key]["params"] / 1e6 for r in rows], [retrieval(r[key]["scores"]) for r in rows],
                            yerr=_yerr([r[key]["scores"] for r in rows]), fmt=style, capsize=3, label=label)
            ax.plot([r["predictor"]["params"] / 1e6 for r in rows], [retrieval(r["random"]) for r in rows], ":",
                    color="k", label="random k (mean)")
            ax.set_xlabel("parameters after merging (M)")
            ax.set_ylabel("retrieval")
            ax.set_title(f"partial merges of {src}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Parameters vs retrieval", y=1.02)
        _savefig(fig, out / "pareto.png")
        written.append("pareto.png")
    t5 = results.get("table5")
    if t5 and t5.get("metrics"):
        metrics = t5["metrics"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
        for ax, (name, values) in zip(axes[0], metrics.items(), strict=True):
            ax.scatter(values, t5["drop"])
            for v, d, k in zip(values, t5["drop"], t5["k_seed"], strict=True):
                ax.annotate(str(k), (v, d), fontsize=7)
            ax.set_xlabel(name)
            ci = (t5.get("pearson_ci") or {}).get(name)
            ax.set_title(f"r = {format_r(t5['pearson'].get(name))}"
                         + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""), fontsize=9)
        axes[0][0].set_ylabel("retrieval drop after merging")
        fig.suptitle("Table 5: distance vs merge drop", y=1.04)
        _savefig(fig, out / "table5.png")
        written.append("table5.png")
    plt.close("all")
    return written


# ------------------------------------------------------------------------------------------------ markdown
def render_markdown(results: Mapping[str, Any], plots: Sequence[str], findings: Sequence[Any] | None = None) -> str:
    meta = results.get("meta", {})
    parts = [
        f"# vlmerge study: preset `{meta.get('preset', '?')}`",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Seeds: {meta.get('seeds', [])} · wall time {meta.get('wall_time_s', 0):.0f} s"
        + (f" (this invocation; {meta['cells_computed']} of {meta['cells_total']} cells computed in it, the rest "
           f"read from the cache; the cells' own compute time {meta['cell_seconds']:.0f} s in all)"
           if meta.get("cells_total") and meta.get("cells_computed", 0) < meta["cells_total"] else "")
        + f" · device {meta.get('device', '?')} · config hash `{meta.get('config_hash', '')}`",
        "",
        f"Machine: {meta.get('cpu', '?')}, {meta.get('threads', '?')} threads.",
        "",
        "Retrieval is zero-shot on the embedded world's test split unless a table says otherwise; "
        "``retrieval`` = mean of Avg TR and Avg IR (each the mean of R@1/5/10). "
        "A retrieved item counts as a hit when the caption is true of the image (the world knows what each "
        "caption means and tests it on every scene), so generic captions (\"two objects\") match many images; "
        "the ceiling is 100. Each score is followed by its 95 % bootstrap interval over test queries "
        f"({(meta.get('bootstrap') or {}).get('resamples', '?')} resamples of the test images / examples, "
        "the same for every model, so differences are paired)"
        + ("; with several seeds, over training seeds too (seeds drawn with replacement per resample), and "
           "± is the sample std over seeds. " if len(meta.get("seeds", [0])) > 1 else
           ". With one training seed the intervals hold the test set's noise, not training's: rerun with "
           "--seeds to include it. ")
        +
        "Every number comes from a run recorded under `cells` in `results.json` (config + seed).",
        "",
    ]
    findings = check_findings(results) if findings is None else findings
    if findings:
        counts = {o: sum(f.outcome == o for f in findings) for o in OUTCOME_MARK}
        parts += ["## Findings", "",
                  f"{counts['reproduced']} reproduced, {counts['contradicted']} contradicted, "
                  f"{counts['inconclusive']} inconclusive of {len(findings)}. A finding is reproduced when the "
                  "95 % interval of its margin (positive = the paper's direction) lies above 0, contradicted when it "
                  "lies below 0, inconclusive otherwise.", "",
                  "| | source | paper's claim | paper | here | margin [95 % interval] | decided by |",
                  "|---|---|---|---|---|---|---|"]
        for f in findings:
            ci = f"[{f.interval[0]:.2f}, {f.interval[1]:.2f}]" if f.interval and f.interval[0] == f.interval[0] else \
                "no interval"
            margin = f"{f.margin:.2f}" if f.margin == f.margin else "undefined"
            parts.append(f"| {OUTCOME_MARK[f.outcome]} | {f.source} | {f.claim} | {f.paper} | {f.ours} | "
                         f"{margin} {ci} | {f.decided_by} |")
        parts.append("")
    parts += _baselines(results)
    if "table1" in results:
        parts += ["## Table 1: merging without seed pre-training", "",
                  _table(results["table1"], RETRIEVAL, "model"), "",
                  "Paper (ViT-B/16): " + "; ".join(f"{k} VQA {v['vqa']}, TR {v['avg_tr']}, IR {v['avg_ir']}"
                                                   for k, v in PAPER["table1"].items()), ""]
    if "figure3" in results:
        f3 = results["figure3"]
        rows = {}
        for k, b, a in zip(f3["k_seed"], f3["before"], f3["after"], strict=True):
            rows[f"K_seed={k} before"] = b
            rows[f"K_seed={k} after"] = a
        parts += ["## Figure 3: seed pre-training", "", _table(rows, RETRIEVAL, "model"), ""]
    if "table2" in results:
        parts += ["## Table 2: merging methods and their hyper-parameters", ""]
        for method, cells in results["table2"].items():
            parts += [f"**{method}**", "", _table({k: cells[k] for k in sorted(cells, key=float)},
                                                  RETRIEVAL, "param"), ""]
    if "figure4" in results:
        rows = {}
        for arch, v in results["figure4"].items():
            rows[f"{arch} before"] = v["before"]
            rows[f"{arch} after"] = v["after"]
        parts += ["## Figure 4: shared-weight architectures", "", _table(rows, RETRIEVAL, "model"), ""]
    if "table3" in results:
        parts += ["## Table 3: more tasks", "",
                  _table(results["table3"], ["nlvr2", "avg_tr", "avg_ir", "ood_avg_tr", "ood_avg_ir", "cls", "seg"],
                         "model"), ""]
    if "table5" in results:
        t5 = results["table5"]
        lines = ["| metric | " + " | ".join(f"K_seed={k}" for k in t5["k_seed"]) + " | Pearson [95 %] | Spearman |",
                 "|---" * (len(t5["k_seed"]) + 3) + "|"]
        for name, values in t5["metrics"].items():
            r, rho = format_r(t5["pearson"].get(name)), format_r(t5["spearman"].get(name))
            ci = (t5.get("pearson_ci") or {}).get(name)
            if ci:
                r += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
            lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {r} | {rho} |")
        lines.append("| retrieval drop | " + " | ".join(f"{d:.2f}" for d in t5.get("drop", [])) + " | | |")
        parts += ["## Table 5: distances between vision and language weights", "", *lines, "",
                  "Paper: Pearson " + ", ".join(f"{k} {v}" for k, v in PAPER["table5"]["pearson"].items()) + ". "
                  f"Pearson r over {len(t5['k_seed'])} K_seed points; its interval covers the test queries' noise "
                  "in the drops, not the run-to-run noise of the K_seed models (use --seeds for that).", ""]
    parts += _predictor(results.get("predictor"), results.get("predictor_pooled"))
    parts += _layerwise(results.get("layerwise"))
    parts += _pareto(results.get("pareto"))
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    parts += _provenance(results)
    return "\n".join(parts)


def _predictor(pr: Mapping[str, Any] | None, pooled: Mapping[str, Any] | None = None) -> list[str]:
    """The ``vlmerge predict`` drop models over every merge the study evaluated (Table 5's extension): the one
    for the baseline merge alone and the one pooled over every method and coefficient."""
    if not pr and not pooled:
        return []
    out = ["## Predicting the drop before merging (`vlmerge predict`)", ""]
    for model in (pr, pooled):
        if not model:
            continue
        what = "all merges" if model["method"] is None else f"{model['method']} {model['params']}"
        if "error" in model:
            out += [f"No predictor for {what}: {model['error']}.", ""]
            continue
        ci = model.get("loo_r_ci")
        lines = ["| features | held-out r [95 %] (fit on these alone) | r (all points) |", "|---|---|---|"]
        for f, v in model["per_feature"].items():
            mark = " (chosen)" if f == model["feature"] else ""
            fci = v.get("loo_r_ci")
            lines.append(f"| {f}{mark} | {format_r(v['loo_r'])}" + (f" [{fci[0]:.2f}, {fci[1]:.2f}]" if fci else "")
                         + f" | {format_r(v['r'])} |")
        if model["method"] is None:
            intro = (f"**Pooled over every merge** ({model['n']} merges of {', '.join(model['methods'])}, every "
                     f"coefficient, {model['groups']} source runs): a least-squares fit drop ≈ a + Σ b·f on the "
                     "candidate features with the smallest leave-one-run-out error, among every single feature and "
                     "the pair (merge_rel_v, merge_rel_l). Besides the checkpoint's distances the candidates "
                     "describe the merge itself, so they know its method and coefficient: how far it moves each "
                     "modality's weights (merge_rel_*) and how far the merged model's states move from the "
                     f"unmerged model's on {model.get('drift_pairs', '?')} validation pairs (drift: per block; "
                     "out_drift: 1 − cos of the final [CLS] states).")
        else:
            intro = (f"**{what} alone**: a line drop ≈ a + b·f on the feature f with the smallest leave-one-run-out "
                     f"error, fitted on the {model['n']} {what} merges the study evaluated ({model['groups']} source "
                     "runs; points of one run are held out together).")
        out += [intro + f" Chosen: **{model['feature']}**, held-out Pearson r = {format_r(model['loo_r'])}"
                + (f" [95 % {ci[0]:.2f}, {ci[1]:.2f}, Fisher z over the {model['n']} points]" if ci else "")
                + f", held-out RMSE {model['loo_rmse']:.2f} points. The held-out r of the chosen candidate is "
                "slightly optimistic (the choice saw the same held-out errors).", "", *lines, ""]
    return [*out, "The points are in `predict-calibration.json`; `vlmerge predict CKPT --calibration "
                  "predict-calibration.json` uses them (the pooled fit for any method and coefficient that can be "
                  "merged in memory).", ""]


def _verdict(diff: Mapping[str, Any], key: str = "r_mean") -> str:
    """``better`` / ``worse`` when the 95 % interval of a paired difference excludes 0, else ``inconclusive``."""
    ci = _interval(diff, key)
    if ci is None:
        return "no interval"
    return {"reproduced": "**better**", "contradicted": "**worse**"}.get(decide(ci), "inconclusive")


def _diff(diff: Mapping[str, Any], key: str = "r_mean") -> str:
    ci = _interval(diff, key)
    return f"{diff[key]:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


SOURCES = {"recipe": "recipe MSA (seed pre-training)", "msa": "MSA without seed pre-training"}


def _layerwise(lw: Mapping[str, Any] | None) -> list[str]:
    """Table 2's layer-wise rows: learned per-layer α against the best global α of the grid."""
    if not lw:
        return []
    lines = ["## Table 2, layer-wise: learned per-layer α against the best global α", "",
             "Interpolation with one α per layer, learned by gradient descent through the merge on the world's "
             "validation split (`merge --alpha-schedule learned`): *supervised* minimises the merged model's "
             "image-text contrastive loss, *entropy* (AdaMerging-style) the entropy of its image↔caption softmaxes "
             "without labels. The global α is the grid's best **on the test split itself**, which favours it. Δ is "
             "learned − best global with its paired 95 % interval; *better* / *worse* only beyond it. With several "
             "seeds, each seed's Δ is against its own best α (the α shown is seed 0's) and the schedules shown are "
             "the seed mean.", "",
             "| source | merge | α | retrieval [95 %] | Δ vs best global [95 %] | verdict |",
             "|---|---|---|---|---|---|"]
    for src, r in lw.items():
        best = r["best_global"]
        lines.append(f"| {SOURCES.get(src, src)} | best global α | {best} | {_cell(r['global'][best], 'r_mean')} | | |")
        for objective, sc in r["learned"].items():
            sched = ", ".join(f"{a:.2f}" if not isinstance(a, Mapping) else
                              "{" + ", ".join(f"{m}: {v:.2f}" for m, v in a.items()) + "}"
                              for a in r["schedules"][objective])
            d = r["vs_best_global"][objective]
            lines.append(f"| | layer-wise α ({objective}) | [{sched}] | {_cell(sc, 'r_mean')} | {_diff(d)} | "
                         f"{_verdict(d)} |")
    return [*lines, ""]


def _pareto(pareto: Mapping[str, Any] | None) -> list[str]:
    """Partial merges: parameters vs retrieval, the predictor's choice against random and depth."""
    if not pareto:
        return []
    lines = ["## Partial merges: parameters vs retrieval", "",
             "Interpolation at the baseline α, keeping k of the n layers with modality copies modality-specific "
             "(`merge --keep-specific` / `--budget k/n`). *Random* is the mean over every set of k layers (a "
             "seeded sample where there are too many), with the test set's interval; the predictor keeps the k "
             "riskiest layers by relative L2 (`vlmerge predict`), *depth* the deepest k. Δ: predictor − random, "
             "paired 95 % interval (over test images; where the sets are sampled, the sampling error of the random "
             "mean is not in it). With several seeds each seed's predictor ranks its own model's layers; the kept "
             "layers shown are seed 0's.", ""]
    for src, pr in pareto.items():
        lines += [f"**{SOURCES.get(src, src)}** (layers {pr['layers']}"
                  + (", every subset evaluated)" if pr["exhaustive"] else ", sampled subsets)"), "",
                  "| k kept | parameters (predictor's) | random [95 %] (sets) | predictor: kept | predictor [95 %] | "
                  "depth [95 %] | Δ predictor − random | verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in pr["by_k"]:
            p, d = r["predictor"], r["depth"]
            one = r["n_random"] == 1 and pr["exhaustive"]  # k = 0 or n: every choice is the same set
            n_params = p["params"]  # a mean over seeds where their predictors kept different layers
            params = f"{int(n_params):,}" if float(n_params).is_integer() else f"{n_params:,.0f} (mean over seeds)"
            lines.append(f"| {r['k']} | {params} | {_cell(r['random'], 'r_mean')} ({r['n_random']}) | "
                         f"{p['keep'] or '–'} | {_cell(p['scores'], 'r_mean')} | {_cell(d['scores'], 'r_mean')} | "
                         f"{_diff(r['predictor_vs_random'])} | "
                         f"{'one choice' if one else _verdict(r['predictor_vs_random'])} |")
        lines.append("")
    return lines


def _baselines(results: Mapping[str, Any]) -> list[str]:
    """Every pre-trained model's zero-shot retrieval against chance and the ceiling, and the task baselines."""
    b = results.get("baselines") or {}
    chance = (b.get("retrieval") or {}).get("r_mean")
    if chance is None:
        return []
    rows: dict[str, Mapping[str, Any]] = {}
    for name, sc in (results.get("table1") or {}).items():
        if name != "merging_baseline":
            rows[name] = sc
    f3 = results.get("figure3") or {}
    for k, sc in zip(f3.get("k_seed", []), f3.get("before", []), strict=False):
        if k:  # K_seed = 0 is Table 1's msa
            rows[f"msa K_seed={k}"] = sc
    for arch, v in (results.get("figure4") or {}).items():
        if (arch == "maa" and "maa" in rows) or (arch == "msa" and f3):  # already a row (Table 1, Figure 3)
            continue
        rows[arch if arch == "maa" else f"{arch} (K_seed = recipe)"] = v["before"]
    if not rows:
        return []
    ceiling = 100.0
    lines = ["## Pre-trained models against chance and the ceiling", "",
             f"Zero-shot retrieval (mean of Avg TR / Avg IR) on the test split: chance {chance:.2f} (a uniformly "
             f"random ranking, computed for the same relevance sets), ceiling {ceiling:.0f} (an oracle that knows "
             "every scene). *Progress* = (score − chance) / (ceiling − chance); the ratio is score / chance.", "",
             "| model | retrieval [95 %] | progress | × chance |", "|---|---|---|---|"]
    for name, sc in rows.items():
        x = retrieval(sc)
        ci = _interval(sc, "r_mean")
        lines.append(f"| {name} | {x:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
                     + f" | {(x - chance) / (ceiling - chance):.2f} | {x / chance:.2f} |")
    tasks = {k: v for k, v in b.items() if not k.startswith("retrieval")}
    if tasks:
        lines += ["", "Task baselines (fine-tuned scores above read against these): " + "; ".join(
            f"{TASK_LABELS.get(k, k)} {v.get('score', float('nan')):.2f} ({v.get('kind')})" for k, v in tasks.items())
            + (f"; OOD retrieval chance {b['retrieval_ood']['r_mean']:.2f}" if "retrieval_ood" in b else "") + "."]
    return [*lines, ""]


def _provenance(results: Mapping[str, Any]) -> list[str]:
    """The study config and, per cell, where its spec (full config + seed) and result live."""
    import yaml

    meta, cells = results.get("meta", {}), results.get("cells", {})
    out: list[str] = []
    if "config" in meta:
        out += ["## Configuration", "", "```yaml", yaml.safe_dump(meta["config"], sort_keys=False).rstrip(), "```", ""]
    if cells:
        out += ["## Provenance", "",
                f"{len(cells)} cells; each cell's full config and seed are in `cells/<kind>-<hash>/spec.json`, its "
                f"numbers and run time in `result.json` beside it"
                + (f" ({meta['cells_computed']} computed by this invocation, the rest loaded from the cache)."
                   if "cells_computed" in meta else "."), "", "| cell | kind | hash |", "|---|---|---|"]
        out += [f"| {name} | {c.get('kind', '')} | `{c.get('hash', '')}` |" for name, c in cells.items()]
        out.append("")
    return out


def write_report(out_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json``, the plots and ``report.md`` into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", with_intervals(results))
    plots = plot_all(results, out)
    findings = check_findings(results)
    atomic_write_json(out / "findings.json", [f.to_dict() for f in findings])
    atomic_write_bytes(out / "report.md", render_markdown(results, plots, findings).encode())
    return out / "report.md"
