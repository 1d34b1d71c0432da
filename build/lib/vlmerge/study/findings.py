"""The merging paper's findings, checked against a study's numbers, each with one of three outcomes.

Each checker reads the study's ``results`` (the schema :mod:`vlmerge.study.runner` writes, documented there)
and returns a :class:`Claim`: the paper's claim with its own numbers, the same quantities here, and a
**margin**: a function of the results that is positive when the paper's direction holds (e.g. a merge
drop, or the best interior α minus the better end point). :func:`check_findings` evaluates the margin on
the point estimates and on every bootstrap replicate (:mod:`vlmerge.study.stats`: the same resampled test
queries for every model, so differences are paired), and decides:

* **reproduced**: the 95 % interval of the margin lies above 0 (the paper's direction holds beyond the
  uncertainty of the test set);
* **contradicted**: the interval lies below 0 (the opposite holds beyond it);
* **inconclusive**: the interval contains 0, or there are no replicates.

A checker whose inputs are missing (e.g. ``--only table2``) returns ``None``; nothing in a statement is
written by hand. Retrieval scores are "Avg TR" / "Avg IR" (mean of R@1/5/10); ``retrieval`` below is their
mean (``r_mean``), the quantity whose drop the paper's Table 5 reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..metrics.correlation import pearson
from .stats import n_resamples, percentile_interval, replicate_view

# The paper's numbers (ViT-B/16, 200k steps), quoted beside ours in each finding.
PAPER = {
    "table1": {"maa": {"vqa": 73.94, "avg_tr": 83.91, "avg_ir": 72.23},
               "msa": {"vqa": 75.14, "avg_tr": 86.46, "avg_ir": 74.67},
               "merging_baseline": {"vqa": 70.89, "avg_tr": 77.38, "avg_ir": 65.43}},
    "table2_vqa": {"interpolation": {0.0: 68.58, 0.25: 72.40, 0.5: 73.59, 0.75: 73.91, 1.0: 73.15},
                   "modality_arithmetic": {0.0: 73.44, 0.25: 73.85, 0.5: 73.59, 0.75: 72.49, 1.0: 69.49},
                   "regmean": {0.0: 74.14, 0.25: 74.17, 0.5: 74.13, 0.75: 74.07, 1.0: 74.15}},
    "table5": {"k_seed": ["0", "50k", "100k", "150k"], "drop": [9.16, 4.50, 2.80, 2.60],
               "pearson": {"l2": 0.881, "cosine": 0.938, "ssd": 0.939, "tssd": 0.971}},
    "table3": {"msa": {"nlvr2": 79.71, "cls": 83.25, "seg": 49.85}, "maa": {"nlvr2": 78.39, "cls": 82.78, "seg": 48.65},
               "merging_baseline": {"nlvr2": 52.55, "cls": 82.90, "seg": 46.80},
               "ours": {"nlvr2": 77.54, "cls": 83.00, "seg": 50.14}},
}
OUTCOMES = ("reproduced", "contradicted", "inconclusive")
CORRELATION_BAR = 0.9  # Table 5: the paper's distances correlate with the drop at r = 0.88-0.97


@dataclass(frozen=True)
class Claim:
    """A paper claim as a checker states it: ``margin(results) > 0`` when the paper's direction holds; ``ours``
    describes the point estimates; ``decided_by`` names the quantity whose interval decides."""

    id: str
    source: str  # where in the paper, e.g. "Table 1"
    claim: str  # the paper's claim, one sentence
    paper: str  # the paper's numbers behind it
    ours: str  # the same quantities here
    margin: Callable[[Mapping[str, Any]], float]
    decided_by: str


@dataclass(frozen=True)
class Finding:
    """A checked claim: the margin's point value, its 95 % bootstrap interval and the outcome."""

    id: str
    source: str
    claim: str
    paper: str
    ours: str
    decided_by: str
    margin: float
    interval: tuple[float, float] | None
    outcome: str  # one of OUTCOMES

    @property
    def reproduced(self) -> bool:
        return self.outcome == "reproduced"

    def to_dict(self) -> dict[str, Any]:
        """As JSON: an undefined margin or interval (NaN) becomes None."""
        d = asdict(self)
        d["margin"] = d["margin"] if math.isfinite(d["margin"]) else None
        if d["interval"] is not None and not all(math.isfinite(x) for x in d["interval"]):
            d["interval"] = None
        return d


def decide(interval: tuple[float, float] | None) -> str:
    """reproduced / contradicted / inconclusive from the margin's interval (None or NaN: inconclusive)."""
    if interval is None or not all(math.isfinite(x) for x in interval):
        return "inconclusive"
    lo, hi = interval
    return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"


def retrieval(scores: Mapping[str, float]) -> float:
    """Mean of Avg TR and Avg IR."""
    return scores["r_mean"] if "r_mean" in scores else (scores["avg_tr"] + scores["avg_ir"]) / 2


def _get(results: Mapping[str, Any], *path: str) -> Any:
    node: Any = results
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _fmt(x: float) -> str:
    return f"{x:.2f}"


Checker = Callable[[Mapping[str, Any]], "Claim | None"]
CHECKERS: list[Checker] = []


def checker(fn: Checker) -> Checker:
    CHECKERS.append(fn)
    return fn


# ------------------------------------------------------------------------------------------------ Table 1
@checker
def merging_baseline_drops(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table1")
    if not t or not {"msa", "merging_baseline"} <= set(t):
        return None
    tasks = [k for k in ("vqa",) if k in t["msa"] and k in t["merging_baseline"]]

    def margin(x: Mapping[str, Any]) -> float:
        b, a = x["table1"]["msa"], x["table1"]["merging_baseline"]
        return min([retrieval(b) - retrieval(a), *(b[k] - a[k] for k in tasks)])

    before, after = t["msa"], t["merging_baseline"]
    p = PAPER["table1"]
    ours = f"merging the MSA without seed pre-training: retrieval {_fmt(retrieval(before))} → " \
           f"{_fmt(retrieval(after))}" + "".join(f", {k.upper()} {_fmt(before[k])} → {_fmt(after[k])}" for k in tasks)
    return Claim("merging_baseline_drops", "Table 1", "Directly merging an MSA (interpolation α=0.5, no seed) loses "
                 "significantly.", f"retrieval {_fmt(retrieval(p['msa']))} → {_fmt(retrieval(p['merging_baseline']))},"
                 f" VQA {p['msa']['vqa']} → {p['merging_baseline']['vqa']}", ours, margin,
                 "the smaller of the drops (retrieval" + ", VQA" * bool(tasks) + "), paired")


@checker
def msa_beats_maa(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table1")
    if not t or not {"msa", "maa"} <= set(t):
        return None
    tasks = [k for k in ("vqa",) if k in t["msa"] and k in t["maa"]]

    def margin(x: Mapping[str, Any]) -> float:
        msa, maa = x["table1"]["msa"], x["table1"]["maa"]
        return min([retrieval(msa) - retrieval(maa), *(msa[k] - maa[k] for k in tasks)])

    msa, maa = t["msa"], t["maa"]
    p = PAPER["table1"]
    ours = f"retrieval MSA {_fmt(retrieval(msa))} vs MAA {_fmt(retrieval(maa))}" + "".join(
        f", {k.upper()} MSA {_fmt(msa[k])} vs MAA {_fmt(maa[k])}" for k in tasks)
    return Claim("msa_beats_maa", "Table 1", "The modality-specific model beats the modality-agnostic one (before "
                 "merging).", f"retrieval {_fmt(retrieval(p['msa']))} vs {_fmt(retrieval(p['maa']))}, "
                 f"VQA {p['msa']['vqa']} vs {p['maa']['vqa']}", ours, margin,
                 "the smaller of the MSA − MAA differences, paired")


# ----------------------------------------------------------------------------------------------- Figure 3
def _drops(x: Mapping[str, Any]) -> list[float]:
    f = x["figure3"]
    return [retrieval(b) - retrieval(a) for b, a in zip(f["before"], f["after"], strict=True)]


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


@checker
def seed_halves_drop(r: Mapping[str, Any]) -> Claim | None:
    f = _get(r, "figure3")
    recipe = _get(r, "meta", "config", "recipe_k_seed")
    if not f or len(f.get("k_seed", [])) < 2:
        return None
    fracs = f.get("k_seed_frac") or []
    if recipe is None or recipe not in fracs or 0.0 not in fracs:
        return None
    i0, ir = fracs.index(0.0), fracs.index(recipe)
    drops = _drops(r)

    def margin(x: Mapping[str, Any]) -> float:
        d = _drops(x)
        return d[i0] / 2 - d[ir]

    return Claim("seed_halves_drop", "Figure 3", "Seed pre-training (K_seed = K/2) cuts the merge drop of the "
                 "no-seed MSA by at least half.", f"retrieval drop {PAPER['table5']['drop'][0]} (no seed) → "
                 f"{PAPER['table5']['drop'][2]} (K_seed = K/2)",
                 f"drop {_fmt(drops[i0])} (K_seed=0) → {_fmt(drops[ir])} (K_seed={f['k_seed'][ir]})", margin,
                 "half the no-seed drop minus the recipe's drop, paired")


@checker
def longer_seed_smaller_drop(r: Mapping[str, Any]) -> Claim | None:
    f = _get(r, "figure3")
    if not f or len(f.get("k_seed", [])) < 3:
        return None
    k = [float(v) for v in f["k_seed"]]
    drops = _drops(r)
    scale = max(k) or 1.0

    def margin(x: Mapping[str, Any]) -> float:  # drop lost per K steps of seed pre-training
        return -_slope([v / scale for v in k], _drops(x))

    return Claim("longer_seed_smaller_drop", "Figure 3 / Table 5", "The longer the seed pre-training, the smaller "
                 "the drop.", "drops " + ", ".join(f"{x}" for x in PAPER["table5"]["drop"]) + " for K_seed "
                 "0/50k/100k/150k", "drops " + ", ".join(f"{_fmt(x)} (K_seed={int(kk)})" for kk, x in
                                                        zip(k, drops, strict=True)), margin,
                 "minus the least-squares slope of the drop over K_seed (per largest K_seed)")


# ------------------------------------------------------------------------------------------------ Table 2
def _table2(x: Mapping[str, Any], method: str) -> dict[float, float]:
    return {float(k): retrieval(v) for k, v in x["table2"][method].items()}


@checker
def vision_weights_matter_more(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table2", "interpolation")
    if not t or not {"0.0", "1.0"} <= set(t):
        return None
    v = _table2(r, "interpolation")
    p = PAPER["table2_vqa"]["interpolation"]
    return Claim("vision_weights_matter_more", "Table 2a", "Vision weights alone (α=1) beat language alone (α=0).",
                 f"VQA {p[1.0]} (α=1) vs {p[0.0]} (α=0)", f"retrieval {_fmt(v[1.0])} (α=1) vs {_fmt(v[0.0])} (α=0)",
                 lambda x: _table2(x, "interpolation")[1.0] - _table2(x, "interpolation")[0.0],
                 "retrieval at α=1 minus α=0, paired")


@checker
def interior_alpha_is_best(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table2", "interpolation")
    if not t or not {"0.0", "1.0"} <= set(t) or len(t) < 3:
        return None
    v = _table2(r, "interpolation")

    def margin(x: Mapping[str, Any]) -> float:
        s = _table2(x, "interpolation")
        return max(val for a, val in s.items() if 0 < a < 1) - max(s[0.0], s[1.0])

    best = max((a for a in v if 0 < a < 1), key=v.__getitem__)
    return Claim("interior_alpha_is_best", "Table 2a", "An interior interpolation α (0.5 / 0.75 in the paper) beats "
                 "both α = 0 and α = 1.", "best VQA at α=0.75 (73.91), then α=0.5 (73.59); α=0: 68.58, α=1: 73.15",
                 f"best interior α={best:g} ({_fmt(v[best])}); " + ", ".join(f"α={a:g}: {_fmt(s)}"
                                                                            for a, s in sorted(v.items())),
                 margin, "best interior α minus the better end point, paired")


@checker
def shorter_arithmetic_is_better(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table2", "modality_arithmetic")
    if not t or "1.0" not in t or len(t) < 2:
        return None
    v = _table2(r, "modality_arithmetic")

    def margin(x: Mapping[str, Any]) -> float:
        s = _table2(x, "modality_arithmetic")
        return max(val for lam, val in s.items() if lam < 1.0) - s[1.0]

    best = max((lam for lam in v if lam < 1.0), key=v.__getitem__)
    return Claim("shorter_arithmetic_is_better", "Table 2b", "Shrinking the modality-arithmetic vector (λ < 1) beats "
                 "the full sum (λ = 1).", "VQA 73.85 (λ=0.25) vs 69.49 (λ=1)",
                 f"retrieval {_fmt(v[best])} (best λ={best:g}) vs {_fmt(v[1.0])} (λ=1)", margin,
                 "best λ < 1 minus λ = 1, paired")


@checker
def regmean_is_robust(r: Mapping[str, Any]) -> Claim | None:
    if not _get(r, "table2", "regmean") or not _get(r, "table2", "interpolation") or len(r["table2"]["regmean"]) < 2:
        return None

    def spreads(x: Mapping[str, Any]) -> tuple[float, float]:
        g, a = _table2(x, "regmean").values(), _table2(x, "interpolation").values()
        return max(g) - min(g), max(a) - min(a)

    sr, si = spreads(r)
    return Claim("regmean_is_robust", "Table 2c", "RegMean is robust to γ: its spread over γ is smaller than "
                 "interpolation's over α.", "VQA spread 0.10 over γ vs 5.33 over α",
                 f"retrieval spread {_fmt(sr)} over γ vs {_fmt(si)} over α",
                 lambda x: spreads(x)[1] - spreads(x)[0], "interpolation's spread minus RegMean's, paired")


@checker
def interpolation_competitive_with_regmean(r: Mapping[str, Any]) -> Claim | None:
    if not _get(r, "table2", "regmean") or not _get(r, "table2", "interpolation"):
        return None

    def bests(x: Mapping[str, Any]) -> tuple[float, float]:
        return max(_table2(x, "interpolation").values()), max(_table2(x, "regmean").values())

    bi, br = bests(r)
    return Claim("interpolation_competitive_with_regmean", "Table 2", "Interpolation's best is within 1 point of "
                 "RegMean's best, without Gram matrices.", "VQA 73.91 (interpolation α=0.75) vs 74.17 (RegMean)",
                 f"retrieval {_fmt(bi)} (interpolation) vs {_fmt(br)} (RegMean)",
                 lambda x: bests(x)[0] - bests(x)[1] + 1.0, "best interpolation − best RegMean + 1, paired")


# ----------------------------------------------------------------------------------------------- Figure 4
def _fig4(x: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {a: {"before": retrieval(v["before"]), "after": retrieval(v["after"])} for a, v in x["figure4"].items()}


@checker
def msa_best_before_merging(r: Mapping[str, Any]) -> Claim | None:
    f = _get(r, "figure4")
    if not f or "msa" not in f or len(f) < 2:
        return None
    v = _fig4(r)

    def margin(x: Mapping[str, Any]) -> float:
        s = _fig4(x)
        return s["msa"]["before"] - max(val["before"] for a, val in s.items() if a != "msa")

    return Claim("msa_best_before_merging", "Figure 4", "The fully modality-specific architecture performs best "
                 "before merging.", "MSA highest on VQA and COCO before merging",
                 "before merging: " + ", ".join(f"{a} {_fmt(s['before'])}" for a, s in v.items()), margin,
                 "MSA minus the best other architecture, paired")


@checker
def custom_ln_retains_after_merging(r: Mapping[str, Any]) -> Claim | None:
    f = _get(r, "figure4")
    if not f or "custom-ln" not in f or len([a for a in f if a != "maa"]) < 2:
        return None

    def drops(x: Mapping[str, Any]) -> dict[str, float]:
        return {a: s["before"] - s["after"] for a, s in _fig4(x).items() if a != "maa"}

    d = drops(r)
    return Claim("custom_ln_retains", "Figure 4", "Custom-LN loses the least when merged.",
                 "custom LN largely retains its performance after merging",
                 "merge drops: " + ", ".join(f"{a} {_fmt(v)}" for a, v in d.items()),
                 lambda x: min(v for a, v in drops(x).items() if a != "custom-ln") - drops(x)["custom-ln"],
                 "the smallest other drop minus custom-LN's, paired")


@checker
def merged_msa_on_par_with_maa(r: Mapping[str, Any]) -> Claim | None:
    f = _get(r, "figure4")
    if not f or "msa" not in f or "maa" not in f:
        return None
    v = _fig4(r)

    def margin(x: Mapping[str, Any]) -> float:
        s = _fig4(x)
        return 2.0 - abs(s["maa"]["before"] - s["msa"]["after"])

    return Claim("merged_msa_on_par_with_maa", "Figure 4", "After merging, the recipe MSA is within 2 points of the "
                 "MAA.", "on par on VQA and COCO after interpolation",
                 f"retrieval merged MSA {_fmt(v['msa']['after'])} vs MAA {_fmt(v['maa']['before'])}", margin,
                 "2 − |MAA − merged MSA|, paired")


# ------------------------------------------------------------------------------------------------ Table 3
@checker
def recipe_beats_merging_baseline(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table3")
    if not t or not {"ours", "merging_baseline"} <= set(t):
        return None
    tasks = [k for k in ("nlvr2", "cls", "seg", "avg_tr", "avg_ir", "ood_avg_tr", "ood_avg_ir")
             if k in t["ours"] and k in t["merging_baseline"]]
    if not tasks:
        return None

    def margin(x: Mapping[str, Any]) -> float:
        o, b = x["table3"]["ours"], x["table3"]["merging_baseline"]
        return min(o[k] - b[k] for k in tasks)

    p = PAPER["table3"]
    return Claim("recipe_beats_merging_baseline", "Table 3", "The recipe (seed + interpolation) beats the merging "
                 "baseline on every task.", f"NLVR2 {p['ours']['nlvr2']} vs {p['merging_baseline']['nlvr2']}, "
                 f"ImageNet {p['ours']['cls']} vs {p['merging_baseline']['cls']}, ADE20k {p['ours']['seg']} vs "
                 f"{p['merging_baseline']['seg']}",
                 "; ".join(f"{k} {_fmt(t['ours'][k])} vs {_fmt(t['merging_baseline'][k])}" for k in tasks), margin,
                 "the smallest per-task difference (ours − baseline), paired per task")


# ------------------------------------------------------------------------------------------------ Table 5
def _table5_r(x: Mapping[str, Any], metric: str) -> float:
    t5 = x["table5"]
    return pearson(t5["metrics"][metric], _drops(x) if "figure3" in x else t5["drop"])


@checker
def distances_correlate_with_drop(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table5", "metrics")
    if not t or "figure3" not in r:
        return None
    names = [m for m in ("l2", "cosine", "ssd") if m in t]
    if not names:
        return None
    point = {m: _table5_r(r, m) for m in names}
    return Claim("distances_correlate_with_drop", "Table 5", f"The weight distances (L2, cosine, SSD) correlate with "
                 f"the merge drop at r ≥ {CORRELATION_BAR}.", ", ".join(f"{k} {v}" for k, v in
                                                                      PAPER["table5"]["pearson"].items()),
                 "Pearson r: " + ", ".join(f"{m} {format_r(v)}" for m, v in point.items())
                 + f" over {len(t[names[0]])} K_seed points",
                 lambda x: min(_table5_r(x, m) for m in names) - CORRELATION_BAR,
                 f"the smallest r minus {CORRELATION_BAR} (bootstrap over test queries; the K_seed runs fixed)")


@checker
def tssd_predicts_best(r: Mapping[str, Any]) -> Claim | None:
    t = _get(r, "table5", "metrics")
    if not t or "tssd" not in t or "figure3" not in r or len(t) < 2:
        return None
    point = {m: _table5_r(r, m) for m in t}
    claim = "TSSD correlates best with the merge drop."
    paper = ", ".join(f"{k} {v}" for k, v in PAPER["table5"]["pearson"].items())
    flips, numel = _get(r, "table5", "sign_flips"), _get(r, "table5", "numel")
    if not math.isfinite(point["tssd"]):
        why = "TSSD is the same at every K_seed here, so its correlation with the drop is undefined"
        if flips is not None:
            why += (f": entries whose vision and language signs differ after truncating the smaller half, per "
                    f"K_seed: {', '.join(str(int(f)) for f in flips)}" + (f" of {int(numel)}" if numel else ""))
        return Claim("tssd_predicts_best", "Table 5", claim, paper, why, lambda x: math.nan, "undefined correlation")
    seen = f"; sign flips that survive truncation per K_seed: {', '.join(str(int(f)) for f in flips)}" if flips else ""
    return Claim("tssd_predicts_best", "Table 5", claim, paper,
                 "Pearson r: " + ", ".join(f"{m} {format_r(v)}" for m, v in point.items()) + seen,
                 lambda x: _table5_r(x, "tssd") - max(_table5_r(x, m) for m in t if m != "tssd"),
                 "TSSD's r minus the best other metric's (bootstrap over test queries)")


def format_r(v: float | None) -> str:
    return "undefined" if v is None or v != v else f"{v:.3f}"


# -------------------------------------------------------------------------------------------------- check
def evaluate_claims(claims: Sequence[Claim], results: Mapping[str, Any]) -> list[Finding]:
    """Decide each claim on ``results``: its margin on the point values and on every bootstrap replicate the
    results' :class:`~vlmerge.study.stats.Scores` carry (none, e.g. results read back from JSON: inconclusive).
    Margins receive plain views (numbers in place of Scores), point or replicate b."""
    scored = {k: v for k, v in results.items() if k not in ("cells", "per_seed")}  # what margins read
    b = n_resamples(scored)
    views = [replicate_view(scored, i) for i in range(b)] if claims else []
    point = replicate_view(scored, None)
    out = []
    for c in claims:
        interval = percentile_interval([c.margin(v) for v in views]) if views else None
        out.append(Finding(c.id, c.source, c.claim, c.paper, c.ours, c.decided_by, c.margin(point), interval,
                           decide(interval)))
    return out


def check_findings(results: Mapping[str, Any]) -> list[Finding]:
    """Every finding of the merging paper whose inputs are present in ``results`` (see the module docstring)."""
    point = replicate_view(results, None)
    claims = [c for c in (check(point) for check in CHECKERS) if c is not None]
    return evaluate_claims(claims, results)
