"""The merging paper's findings, checked against a study's numbers.

Each checker reads the study's ``results`` (the schema :mod:`vlmerge.study.runner` writes, documented
there) and returns a :class:`Finding`: the paper's claim with its own numbers, the same quantity computed
here, and whether the claim reproduced. A checker whose inputs are missing (e.g. ``--only table2``)
returns ``None``; nothing in a statement is written by hand.

Retrieval scores are "Avg TR" / "Avg IR" (mean of R@1/5/10); ``retrieval`` below is their mean, the
quantity whose drop the paper's Table 5 reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

# The paper's numbers (ViT-B/16, 200k steps), quoted beside ours in each finding.
PAPER = {
    "table1": {"maa": {"vqa": 73.94, "tr": 83.91, "ir": 72.23}, "msa": {"vqa": 75.14, "tr": 86.46, "ir": 74.67},
               "merging_baseline": {"vqa": 70.89, "tr": 77.38, "ir": 65.43}},
    "table2_vqa": {"interpolation": {0.0: 68.58, 0.25: 72.40, 0.5: 73.59, 0.75: 73.91, 1.0: 73.15},
                   "modality_arithmetic": {0.0: 73.44, 0.25: 73.85, 0.5: 73.59, 0.75: 72.49, 1.0: 69.49},
                   "regmean": {0.0: 74.14, 0.25: 74.17, 0.5: 74.13, 0.75: 74.07, 1.0: 74.15}},
    "table5": {"k_seed": ["0", "50k", "100k", "150k"], "drop": [9.16, 4.50, 2.80, 2.60],
               "pearson": {"l2": 0.881, "cosine": 0.938, "ssd": 0.939, "tssd": 0.971}},
    "table3": {"msa": {"nlvr2": 79.71, "cls": 83.25, "seg": 49.85}, "maa": {"nlvr2": 78.39, "cls": 82.78, "seg": 48.65},
               "merging_baseline": {"nlvr2": 52.55, "cls": 82.90, "seg": 46.80},
               "ours": {"nlvr2": 77.54, "cls": 83.00, "seg": 50.14}},
}


@dataclass(frozen=True)
class Finding:
    """One paper claim, checked: ``reproduced`` is computed from ``ours``."""

    id: str
    source: str  # where in the paper, e.g. "Table 1"
    claim: str  # the paper's claim, one sentence
    paper: str  # the paper's numbers behind it
    ours: str  # the same quantity here
    reproduced: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrieval(scores: Mapping[str, float]) -> float:
    """Mean of Avg TR and Avg IR."""
    return (scores["tr"] + scores["ir"]) / 2


def _get(results: Mapping[str, Any], *path: str) -> Any:
    node: Any = results
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _fmt(x: float) -> str:
    return f"{x:.2f}"


Checker = Callable[[Mapping[str, Any]], "Finding | None"]
CHECKERS: list[Checker] = []


def checker(fn: Checker) -> Checker:
    CHECKERS.append(fn)
    return fn


@checker
def merging_baseline_drops(r: Mapping[str, Any]) -> Finding | None:
    t = _get(r, "table1")
    if not t or not {"msa", "merging_baseline"} <= set(t):
        return None
    before, after = t["msa"], t["merging_baseline"]
    p = PAPER["table1"]
    d_ret, d_vqa = retrieval(before) - retrieval(after), before.get("vqa", 0) - after.get("vqa", 0)
    ours = f"merging the MSA without seed pre-training changed retrieval {_fmt(retrieval(before))} → " \
           f"{_fmt(retrieval(after))} (drop {_fmt(d_ret)})"
    if "vqa" in before and "vqa" in after:
        ours += f" and VQA {_fmt(before['vqa'])} → {_fmt(after['vqa'])} (drop {_fmt(d_vqa)})"
    return Finding(
        "merging_baseline_drops", "Table 1", "Directly merging an MSA (interpolation α=0.5, no seed) loses a lot.",
        f"retrieval {_fmt(retrieval(p['msa']))} → {_fmt(retrieval(p['merging_baseline']))}, "
        f"VQA {p['msa']['vqa']} → {p['merging_baseline']['vqa']}",
        ours, reproduced=d_ret > 0 and ("vqa" not in before or d_vqa > 0),
    )


@checker
def msa_beats_maa(r: Mapping[str, Any]) -> Finding | None:
    t = _get(r, "table1")
    if not t or not {"msa", "maa"} <= set(t):
        return None
    msa, maa = t["msa"], t["maa"]
    p = PAPER["table1"]
    tasks = [k for k in ("vqa",) if k in msa and k in maa]
    better = retrieval(msa) > retrieval(maa) and all(msa[k] > maa[k] for k in tasks)
    ours = f"retrieval MSA {_fmt(retrieval(msa))} vs MAA {_fmt(retrieval(maa))}" + "".join(
        f", {k.upper()} MSA {_fmt(msa[k])} vs MAA {_fmt(maa[k])}" for k in tasks)
    return Finding("msa_beats_maa", "Table 1", "The modality-specific model beats the modality-agnostic one.",
                   f"retrieval {_fmt(retrieval(p['msa']))} vs {_fmt(retrieval(p['maa']))}, "
                   f"VQA {p['msa']['vqa']} vs {p['maa']['vqa']}", ours, better)


def _drops(r: Mapping[str, Any]) -> tuple[list[Any], list[float]] | None:
    f = _get(r, "figure3")
    if not f or len(f.get("k_seed", [])) < 2:
        return None
    return f["k_seed"], [retrieval(b) - retrieval(a) for b, a in zip(f["before"], f["after"], strict=True)]


@checker
def seed_reduces_drop(r: Mapping[str, Any]) -> Finding | None:
    d = _drops(r)
    if d is None:
        return None
    k, drops = d
    best = min(range(1, len(drops)), key=lambda i: drops[i])
    p = PAPER["table5"]
    return Finding(
        "seed_reduces_drop", "Figure 3 / Table 5", "Seed pre-training reduces the merge drop.",
        f"retrieval drop {p['drop'][0]} at K_seed=0 → {min(p['drop'][1:])} with seed pre-training",
        f"seed pre-training changed the retrieval drop from {_fmt(drops[0])} (K_seed=0) to {_fmt(drops[best])} "
        f"(K_seed={k[best]})", drops[best] < drops[0],
    )


@checker
def longer_seed_smaller_drop(r: Mapping[str, Any]) -> Finding | None:
    d = _drops(r)
    if d is None or len(d[1]) < 3:
        return None
    k, drops = d
    monotone = all(a >= b for a, b in zip(drops, drops[1:], strict=False))
    return Finding(
        "longer_seed_smaller_drop", "Figure 3 / Table 5", "The longer the seed pre-training, the smaller the drop.",
        "drops " + ", ".join(f"{x}" for x in PAPER["table5"]["drop"]) + " for K_seed 0/50k/100k/150k",
        "drops " + ", ".join(f"{_fmt(x)} (K_seed={kk})" for kk, x in zip(k, drops, strict=True)), monotone,
    )


def _table2(r: Mapping[str, Any], method: str) -> dict[float, float] | None:
    t = _get(r, "table2", method)
    if not t:
        return None
    return {float(k): retrieval(v) for k, v in t.items()}


@checker
def vision_weights_matter_more(r: Mapping[str, Any]) -> Finding | None:
    t = _table2(r, "interpolation")
    if not t or 0.0 not in t or 1.0 not in t:
        return None
    p = PAPER["table2_vqa"]["interpolation"]
    return Finding("vision_weights_matter_more", "Table 2a", "Vision weights alone (α=1) beat language alone (α=0).",
                   f"VQA {p[1.0]} (α=1) vs {p[0.0]} (α=0)",
                   f"retrieval {_fmt(t[1.0])} (α=1) vs {_fmt(t[0.0])} (α=0)", t[1.0] > t[0.0])


@checker
def best_alpha_is_half_or_three_quarters(r: Mapping[str, Any]) -> Finding | None:
    t = _table2(r, "interpolation")
    if not t or len(t) < 3:
        return None
    best = max(t, key=t.__getitem__)
    return Finding("best_alpha", "Table 2a", "Interpolation works best at α = 0.5 or 0.75.",
                   "best VQA at α=0.75 (73.91), then α=0.5 (73.59)",
                   "best retrieval at α=" + f"{best:g} ({_fmt(t[best])}); " +
                   ", ".join(f"α={a:g}: {_fmt(v)}" for a, v in sorted(t.items())), best in (0.5, 0.75))


@checker
def shorter_arithmetic_is_better(r: Mapping[str, Any]) -> Finding | None:
    t = _table2(r, "modality_arithmetic")
    if not t or 1.0 not in t or len(t) < 3:
        return None
    smaller = [lam for lam in t if lam < 1.0]
    best_small = max(smaller, key=t.__getitem__)
    return Finding("shorter_arithmetic_is_better", "Table 2b",
                   "Shrinking the modality-arithmetic vector (λ < 1) beats the full sum (λ = 1).",
                   "VQA 73.85 (λ=0.25) vs 69.49 (λ=1)",
                   f"retrieval {_fmt(t[best_small])} (λ={best_small:g}) vs {_fmt(t[1.0])} (λ=1)",
                   t[best_small] > t[1.0])


@checker
def regmean_is_robust(r: Mapping[str, Any]) -> Finding | None:
    reg, interp = _table2(r, "regmean"), _table2(r, "interpolation")
    if not reg or not interp or len(reg) < 2:
        return None
    spread = max(reg.values()) - min(reg.values())
    spread_i = max(interp.values()) - min(interp.values())
    return Finding("regmean_is_robust", "Table 2c", "RegMean is robust to γ (far less spread than interpolation's α).",
                   "VQA spread 0.10 over γ vs 5.33 over α",
                   f"retrieval spread {_fmt(spread)} over γ vs {_fmt(spread_i)} over α", spread < spread_i)


@checker
def interpolation_competitive_with_regmean(r: Mapping[str, Any]) -> Finding | None:
    reg, interp = _table2(r, "regmean"), _table2(r, "interpolation")
    if not reg or not interp:
        return None
    bi, br = max(interp.values()), max(reg.values())
    return Finding("interpolation_competitive_with_regmean", "Table 2",
                   "Interpolation's best is within 1 point of RegMean's best, without Gram matrices.",
                   "VQA 73.91 (interpolation α=0.75) vs 74.17 (RegMean)",
                   f"retrieval {_fmt(bi)} (interpolation) vs {_fmt(br)} (RegMean)", bi >= br - 1.0)


def _fig4(r: Mapping[str, Any]) -> dict[str, dict[str, float]] | None:
    f = _get(r, "figure4")
    if not f or len(f) < 2:
        return None
    return {a: {"before": retrieval(v["before"]), "after": retrieval(v["after"])} for a, v in f.items()
            if "before" in v and "after" in v}


@checker
def msa_best_before_merging(r: Mapping[str, Any]) -> Finding | None:
    f = _fig4(r)
    if not f or "msa" not in f:
        return None
    best = max(f, key=lambda a: f[a]["before"])
    return Finding("msa_best_before_merging", "Figure 4",
                   "The fully modality-specific architecture performs best before merging.",
                   "MSA highest on VQA and COCO before merging",
                   "before merging: " + ", ".join(f"{a} {_fmt(v['before'])}" for a, v in f.items()), best == "msa")


@checker
def custom_ln_retains_after_merging(r: Mapping[str, Any]) -> Finding | None:
    f = _fig4(r)
    if not f or "custom-ln" not in f:
        return None
    drops = {a: v["before"] - v["after"] for a, v in f.items() if a != "maa"}
    smallest = min(drops, key=drops.__getitem__)
    return Finding("custom_ln_retains", "Figure 4", "Custom-LN loses the least when merged.",
                   "custom LN largely retains its performance after merging",
                   "merge drops: " + ", ".join(f"{a} {_fmt(d)}" for a, d in drops.items()), smallest == "custom-ln")


@checker
def merged_msa_on_par_with_maa(r: Mapping[str, Any]) -> Finding | None:
    f = _fig4(r)
    if not f or "msa" not in f or "maa" not in f:
        return None
    gap = f["maa"]["before"] - f["msa"]["after"]
    return Finding("merged_msa_on_par_with_maa", "Figure 4",
                   "The merged MSA (with seed pre-training) is on par with the MAA (within 2 points).",
                   "on par on VQA and COCO after interpolation",
                   f"retrieval merged MSA {_fmt(f['msa']['after'])} vs MAA {_fmt(f['maa']['before'])}", gap <= 2.0)


@checker
def recipe_beats_merging_baseline(r: Mapping[str, Any]) -> Finding | None:
    t = _get(r, "table3")
    if not t or not {"ours", "merging_baseline"} <= set(t):
        return None
    tasks = sorted(set(t["ours"]) & set(t["merging_baseline"]))
    wins = [k for k in tasks if t["ours"][k] > t["merging_baseline"][k]]
    p = PAPER["table3"]
    return Finding("recipe_beats_merging_baseline", "Table 3", "The recipe (seed + interpolation) beats the merging "
                   "baseline on every task.", f"NLVR2 {p['ours']['nlvr2']} vs {p['merging_baseline']['nlvr2']}, "
                   f"ImageNet {p['ours']['cls']} vs {p['merging_baseline']['cls']}, ADE20k {p['ours']['seg']} vs "
                   f"{p['merging_baseline']['seg']}",
                   "; ".join(f"{k} {_fmt(t['ours'][k])} vs {_fmt(t['merging_baseline'][k])}" for k in tasks),
                   bool(tasks) and len(wins) == len(tasks))


@checker
def tssd_predicts_best(r: Mapping[str, Any]) -> Finding | None:
    t = _get(r, "table5", "pearson")
    if not t or "tssd" not in t:
        return None
    finite = {k: v for k, v in t.items() if v is not None and v == v}  # None / NaN: a constant metric
    p = PAPER["table5"]["pearson"]
    paper = ", ".join(f"{k} {v}" for k, v in p.items())
    claim = "TSSD correlates best with the merge drop; L2 worst."
    if "tssd" not in finite:
        return Finding("tssd_predicts_best", "Table 5", claim, paper,
                       "TSSD is the same at every K_seed here, so its correlation with the drop is undefined", False)
    best, worst = max(finite, key=finite.__getitem__), min(finite, key=finite.__getitem__)
    return Finding("tssd_predicts_best", "Table 5", claim, paper,
                   "Pearson r: " + ", ".join(f"{k} {format_r(v)}" for k, v in t.items()),
                   best == "tssd" and worst == "l2")


def format_r(v: float | None) -> str:
    return "undefined" if v is None or v != v else f"{v:.3f}"


def check_findings(results: Mapping[str, Any]) -> list[Finding]:
    """Every finding whose inputs are present in ``results``."""
    return [f for f in (c(results) for c in CHECKERS) if f is not None]
