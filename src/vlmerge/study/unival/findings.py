"""The UnIVAL study's findings: the paper's claims (:func:`unival_claims`, each a
:class:`~vlmerge.study.findings.Claim` with a margin, positive in the paper's direction), the helpers their
margins read (interpolation fronts, endpoints, soups' recipe means) and :func:`check_unival_findings`, which
decides each claim on the bootstrap interval of its margin; :data:`PAPER` holds the paper's numbers quoted
beside ours."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..findings import Claim, Finding, evaluate_claims
from ..stats import replicate_view
from .config import RECIPES, mean

# The paper's numbers (UnIVAL, arXiv 2307.16184v2), quoted beside ours.
PAPER = {
    "fig2_beats_specialist": "CIDEr of 0.8·Cap + 0.2·VQA 138.51 vs 136.52 for the Captioning model",
    "fig2_transfer": {"vanilla": [45.64, 66.03, 118.0], "ratatouille": [57.80, 72.91, 121.29],
                      "pairs": ["VQA→Captioning", "VE→VGround", "VGround→Captioning"]},
    "table20": {"vanilla": {"OKVQA": 38.06, "VizWiz": 13.57, "NoCaps": 94.39},
                "fusing": {"OKVQA": 35.12, "VizWiz": 15.63, "NoCaps": 93.58},
                "ratatouille": {"OKVQA": 38.97, "VizWiz": 18.48, "NoCaps": 95.28}},
}


def front_gain(front: Mapping[str, Any]) -> float:
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
    return mean(gains) * 2


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
    return mean(vals)


def _recipe_means(part: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """Each recipe's uniform soup's mean score over ``tasks``."""
    return {x: mean([part[f"soup/{x}"][t] for t in tasks]) for x in RECIPES}


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
    van = {k: f for k, f in fronts.items() if f["recipe"] == "vanilla" and math.isfinite(front_gain(f))}
    if van:
        gains = {k: front_gain(f) for k, f in van.items()}
        label = {k: f"{f['a']}–{f['b']}" for k, f in van.items()}
        out.append(Claim(
            "convex_fronts", "§5 Scenario 1, Fig. 2",
            "interpolation reveals convex fronts: interpolated models trade off the two tasks better than the "
            "straight line between the two task models",
            "qualitative (Fig. 2 curves bulge outward for every pair)",
            "gain over the chord (points, A+B): " + ", ".join(f"{label[k]} {v:+.2f}" for k, v in gains.items())
            + f"; mean {mean(list(gains.values())):+.2f} (vanilla fronts)",
            lambda x: mean([front_gain(x["scenario1"][k]) for k in van]),
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
        chance = mean([chance_of[t] for t in tasks if t in chance_of])
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
        p = {x: mean(list(PAPER["table20"][x].values())) for x in RECIPES}
        chance = mean([chance_of[t] for t in ood if t in chance_of])
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
    95 % bootstrap interval of its margin (:func:`~..findings.evaluate_claims`: the margin on the point values and
    on every replicate; the replicates of all models scored on one test set resample the same examples, so the
    margins' differences are paired). Without replicates (plain numbers, e.g. read back from JSON) every finding
    is inconclusive."""
    claims = unival_claims(replicate_view(r, None))
    return evaluate_claims(claims, {k: r[k] for k in FINDING_PARTS if k in r})
