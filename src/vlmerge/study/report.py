"""The study's report: ``results.json`` (every number), PNG plots, and ``report.md`` that embeds them.

All tables and findings are generated from ``results``; see :mod:`vlmerge.study.runner` for the schema.
A score dict holds ``tr``/``ir`` (Avg TR / Avg IR), optional task scores (``vqa``, ``nlvr2``, ``cls``,
``seg``, ``tr_ood``, ``ir_ood``) and, with several seeds, ``<name>_std``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..models.checkpoint import atomic_write_bytes, atomic_write_json
from .findings import PAPER, check_findings, format_r, retrieval

TASK_LABELS = {"vqa": "VQA", "tr": "Avg TR", "ir": "Avg IR", "nlvr2": "NLVR2", "cls": "Cls top-1", "seg": "Seg mIoU",
               "tr_ood": "OOD Avg TR", "ir_ood": "OOD Avg IR"}


def _cell(scores: Mapping[str, Any], key: str) -> str:
    if key not in scores:
        return "–"
    std = scores.get(f"{key}_std")
    return f"{scores[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str], first: str) -> str:
    keys = [k for k in keys if any(k in r for r in rows.values())]
    lines = [f"| {first} | " + " | ".join(TASK_LABELS.get(k, k) for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(r, k) for k in keys) + " |" for name, r in rows.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots
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
        ax.plot(f3["k_seed"], [retrieval(s) for s in f3["before"]], "o-", label="MSA before merging")
        ax.plot(f3["k_seed"], [retrieval(s) for s in f3["after"]], "s--", label="after merging (interpolation)")
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
            ax.plot([float(x) for x in xs], [retrieval(cells[x]) for x in xs], "o-")
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
        ax.bar([i - 0.2 for i in x], [retrieval(f4[a]["before"]) for a in archs], 0.4, label="before merging")
        ax.bar([i + 0.2 for i in x], [retrieval(f4[a]["after"]) for a in archs], 0.4, label="after merging")
        ax.set_xticks(list(x), archs)
        ax.set_ylabel("retrieval")
        ax.set_title("Figure 4: shared-weight architectures")
        ax.legend()
        _savefig(fig, out / "figure4.png")
        written.append("figure4.png")
    t5 = results.get("table5")
    if t5 and t5.get("metrics"):
        metrics = t5["metrics"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
        for ax, (name, values) in zip(axes[0], metrics.items(), strict=True):
            ax.scatter(values, t5["drop"])
            for v, d, k in zip(values, t5["drop"], t5["k_seed"], strict=True):
                ax.annotate(str(k), (v, d), fontsize=7)
            ax.set_xlabel(name)
            ax.set_title(f"r = {format_r(t5['pearson'].get(name))}")
        axes[0][0].set_ylabel("retrieval drop after merging")
        fig.suptitle("Table 5: distance vs merge drop")
        _savefig(fig, out / "table5.png")
        written.append("table5.png")
    plt.close("all")
    return written


# ------------------------------------------------------------------------------------------------ markdown
def render_markdown(results: Mapping[str, Any], plots: Sequence[str]) -> str:
    meta = results.get("meta", {})
    parts = [
        f"# vlmerge study: preset `{meta.get('preset', '?')}`",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"Seeds: {meta.get('seeds', [])} · wall time {meta.get('wall_time_s', 0):.0f} s · "
        f"device {meta.get('device', '?')} · config hash `{meta.get('config_hash', '')}`",
        "",
        "Retrieval is zero-shot on the embedded world's test split unless a table says otherwise; "
        "``retrieval`` = mean of Avg TR and Avg IR (each the mean of R@1/5/10). "
        "Every number comes from a run recorded under `cells` in `results.json` (config + seed).",
        "",
    ]
    findings = check_findings(results)
    if findings:
        parts += ["## Findings", "", "| | source | paper's claim | paper | here |", "|---|---|---|---|---|"]
        for f in findings:
            mark = "✅ reproduced" if f.reproduced else "❌ not reproduced"
            parts.append(f"| {mark} | {f.source} | {f.claim} | {f.paper} | {f.ours} |")
        parts.append("")
    if "table1" in results:
        parts += ["## Table 1: merging without seed pre-training", "",
                  _table(results["table1"], ["vqa", "tr", "ir"], "model"), "",
                  "Paper (ViT-B/16): " + "; ".join(f"{k} VQA {v['vqa']}, TR {v['tr']}, IR {v['ir']}"
                                                   for k, v in PAPER["table1"].items()), ""]
    if "figure3" in results:
        f3 = results["figure3"]
        rows = {}
        for k, b, a in zip(f3["k_seed"], f3["before"], f3["after"], strict=True):
            rows[f"K_seed={k} before"] = b
            rows[f"K_seed={k} after"] = a
        parts += ["## Figure 3: seed pre-training", "", _table(rows, ["vqa", "tr", "ir"], "model"), ""]
    if "table2" in results:
        parts += ["## Table 2: merging methods and their hyper-parameters", ""]
        for method, cells in results["table2"].items():
            parts += [f"**{method}**", "", _table({k: cells[k] for k in sorted(cells, key=float)},
                                                  ["vqa", "tr", "ir"], "param"), ""]
    if "figure4" in results:
        rows = {}
        for arch, v in results["figure4"].items():
            rows[f"{arch} before"] = v["before"]
            rows[f"{arch} after"] = v["after"]
        parts += ["## Figure 4: shared-weight architectures", "", _table(rows, ["vqa", "tr", "ir"], "model"), ""]
    if "table3" in results:
        parts += ["## Table 3: more tasks", "",
                  _table(results["table3"], ["nlvr2", "tr", "ir", "tr_ood", "ir_ood", "cls", "seg"], "model"), ""]
    if "table5" in results:
        t5 = results["table5"]
        lines = ["| metric | " + " | ".join(f"K_seed={k}" for k in t5["k_seed"]) + " | Pearson | Spearman |",
                 "|---" * (len(t5["k_seed"]) + 3) + "|"]
        for name, values in t5["metrics"].items():
            r, rho = format_r(t5["pearson"].get(name)), format_r(t5["spearman"].get(name))
            lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {r} | {rho} |")
        lines.append("| retrieval drop | " + " | ".join(f"{d:.2f}" for d in t5["drop"]) + " | | |")
        parts += ["## Table 5: distances between vision and language weights", "", *lines, "",
                  "Paper: Pearson " + ", ".join(f"{k} {v}" for k, v in PAPER["table5"]["pearson"].items()), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    parts += _provenance(results)
    return "\n".join(parts)


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
    atomic_write_json(out / "results.json", results)
    plots = plot_all(results, out)
    findings = [f.to_dict() for f in check_findings(results)]
    atomic_write_json(out / "findings.json", findings)
    atomic_write_bytes(out / "report.md", render_markdown(results, plots).encode())
    return out / "report.md"


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
