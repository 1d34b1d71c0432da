"""The UnIVAL study's report: :func:`plot_all` (the PNG plots: Scenario 1's interpolation fronts, Scenarios 2-3's
soups), :func:`render_report` (``report.md``: tables with intervals, the findings beside the paper's numbers) and
:func:`write_report`, which writes ``results.json``, ``findings.json``, the plots and ``report.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ...models.checkpoint import atomic_write_bytes, atomic_write_json
from ..findings import Finding
from ..report import OUTCOME_MARK
from ..stats import Scores, n_resamples, percentile_interval, replicate_view, with_intervals
from .config import RECIPES, mean
from .findings import front_gain

LABELS = {"vqa": "VQA", "nlvr2": "NLVR2", "cls": "Cls", "itm": "ITM", "vqa@ood": "VQA (OOD split)",
          "size": "Size Qs (new family)", "largest-color": "Largest-colour Qs (new family)"}


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
    m = mean([float(row[c]) for c in keys])
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


def plot_all(r: Mapping[str, Any], out: Path) -> list[str]:
    """Write the PNG plots of results ``r`` into ``out`` (Scenario 1's fronts, Scenarios 2-3's soups, each when
    ``r`` has its part); returns their file names."""
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
    return percentile_interval([front_gain(replicate_view(front, i)) for i in range(b)]) if b else None


def render_report(r: Mapping[str, Any], findings: Sequence[Finding], plots: Sequence[str]) -> str:
    """``report.md`` of results ``r`` (with ``meta``) and its ``findings``, linking the ``plots`` (file names)."""
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
        gain = f"{front_gain(f):+.2f}" + (f" [{gi[0]:+.2f}, {gi[1]:+.2f}]" if gi and all(map(math.isfinite, gi))
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


def write_report(out_dir: Path, results: Mapping[str, Any], findings: Sequence[Finding]) -> Path:
    """Write ``results.json`` (with intervals), ``findings.json``, the plots and ``report.md`` into ``out_dir``
    (each atomically); returns ``report.md``'s path."""
    atomic_write_json(out_dir / "results.json", with_intervals(results))
    atomic_write_json(out_dir / "findings.json", results["findings"])
    plots = plot_all(results, out_dir)
    report = out_dir / "report.md"
    atomic_write_bytes(report, render_report(results, findings, plots).encode())
    return report
