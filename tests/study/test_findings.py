"""The findings checker on hand-made results whose answer is known: every finding reproduces on paper-like
numbers measured precisely, is contradicted by reversed numbers, and comes out inconclusive when the same
numbers are too noisy; the bootstrap's intervals cover the truth."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from vlmerge.study.findings import CHECKERS, check_findings, decide
from vlmerge.study.stats import Scores, mean_score, percentile_interval, replicate_view, retrieval_scores

B = 400


def s(tr: float, ir: float | None = None, vqa: float | None = None, *, sd: float = 0.05, seed: int = 0) -> Scores:
    """Scores with replicates: the value plus independent N(0, sd²) noise per replicate."""
    rng = np.random.default_rng(seed)
    ir = tr if ir is None else ir
    values = {"avg_tr": tr, "avg_ir": ir, "r_mean": (tr + ir) / 2}
    boot = {"avg_tr": tr + rng.normal(0, sd, B), "avg_ir": ir + rng.normal(0, sd, B)}
    boot["r_mean"] = (boot["avg_tr"] + boot["avg_ir"]) / 2
    if vqa is not None:
        values["vqa"], boot["vqa"] = vqa, vqa + rng.normal(0, sd, B)
    return Scores(values, boot)


def paper_like(sd: float = 0.05) -> dict:
    n = iter(range(1000))

    def m(*a: float, **k: float) -> Scores:
        return s(*a, **k, sd=sd, seed=next(n))

    return {
        "table1": {"maa": m(80, 70, vqa=70), "msa": m(85, 75, vqa=72), "merging_baseline": m(70, 60, vqa=65)},
        "figure3": {"k_seed": [0, 25, 50, 75], "k_seed_frac": [0.0, 0.25, 0.5, 0.75],
                    "before": [m(80), m(79), m(78), m(77)], "after": [m(70), m(73), m(76), m(76)]},
        "table2": {
            "interpolation": {"0.0": m(60), "0.25": m(70), "0.5": m(74), "0.75": m(75), "1.0": m(72)},
            "modality_arithmetic": {"0.0": m(73), "0.25": m(74), "0.5": m(74), "0.75": m(71), "1.0": m(65)},
            "regmean": {"0.0": m(75), "0.25": m(75.2), "0.5": m(75.1), "0.75": m(75), "1.0": m(75.1)},
        },
        "figure4": {"msa": {"before": m(80), "after": m(75)}, "custom-attn": {"before": m(78), "after": m(74)},
                    "custom-ffn": {"before": m(79), "after": m(74)}, "custom-ln": {"before": m(76), "after": m(75.5)},
                    "maa": {"before": m(76), "after": m(76)}},
        "table3": {"ours": Scores({"nlvr2": 70.0}, {"nlvr2": 70 + np.zeros(B)}),
                   "merging_baseline": Scores({"nlvr2": 52.0}, {"nlvr2": 52 + np.zeros(B)})},
        # drops 10, 6, 2, 1: l2 / cosine / ssd follow them closely, TSSD exactly
        "table5": {"k_seed": [0, 25, 50, 75], "metrics": {"l2": [5.0, 2.5, 1.5, 0.6], "cosine": [0.1, 0.05, 0.03, 0.01],
                                                           "ssd": [9.0, 7.0, 1.5, 1.4], "tssd": [1.0, 0.6, 0.2, 0.1]}},
        "meta": {"config": {"recipe_k_seed": 0.5}},
    }


def reverse(r: dict) -> dict:
    """The same study with every claim's direction reversed."""
    r = copy.deepcopy(r)
    t1 = r["table1"]
    t1["maa"], t1["merging_baseline"] = s(90, 80, vqa=75, seed=1), s(95, 85, vqa=80, seed=2)
    r["figure3"]["after"] = [s(79), s(72, seed=3), s(70, seed=4), s(65, seed=5)]  # drops 1, 7, 8, 12
    r["table2"]["interpolation"] = {"0.0": s(76), "0.25": s(70, seed=6), "0.5": s(60, seed=7), "0.75": s(62, seed=8),
                                    "1.0": s(70, seed=9)}
    r["table2"]["modality_arithmetic"]["1.0"] = s(80, seed=10)
    r["table2"]["regmean"] = {"0.0": s(40, seed=11), "1.0": s(90, seed=12)}
    f4 = r["figure4"]
    f4["custom-attn"]["before"], f4["custom-ln"]["after"], f4["msa"]["after"] = s(90), s(50, seed=13), s(60, seed=14)
    r["table3"]["ours"] = Scores({"nlvr2": 40.0}, {"nlvr2": 40 + np.zeros(B)})
    r["table5"]["metrics"] = {"l2": [0.5, 1.1, 3.0, 5.1], "cosine": [0.01, 0.02, 0.06, 0.1], "ssd": [1, 2, 6, 9],
                              "tssd": [0.1, 0.9, 0.1, 0.5]}
    return r


def test_every_finding_reproduces_on_precise_paper_like_numbers() -> None:
    found = check_findings(paper_like())
    assert len(found) == len(CHECKERS)
    assert all(f.outcome == "reproduced" for f in found), [(f.id, f.margin, f.interval) for f in found
                                                           if f.outcome != "reproduced"]
    by_id = {f.id: f for f in found}
    assert by_id["seed_halves_drop"].margin == pytest.approx(10 / 2 - 2)
    assert "drop 10.00 (K_seed=0) → 2.00 (K_seed=50)" in by_id["seed_halves_drop"].ours
    assert "9.16" in by_id["seed_halves_drop"].paper
    lo, hi = by_id["merging_baseline_drops"].interval
    assert lo < 7 < hi  # min(retrieval drop 15, VQA drop 7): the interval is around the truth


def test_every_finding_is_contradicted_by_reversed_numbers() -> None:
    found = {f.id: f for f in check_findings(reverse(paper_like()))}
    not_contradicted = {k: (f.margin, f.interval) for k, f in found.items() if f.outcome != "contradicted"}
    assert not not_contradicted, not_contradicted


def test_noisy_numbers_are_inconclusive_not_reproduced() -> None:
    """The same point values with replicates ten points wide: no finding may claim either direction."""
    noisy = paper_like(sd=25.0)
    for i, row in enumerate(noisy["table3"].values()):  # no noise given for these: widen them too
        row.boot["nlvr2"] = row["nlvr2"] + np.random.default_rng(50 + i).normal(0, 25, B)
    outcomes = {f.id: f.outcome for f in check_findings(noisy)}
    assert set(outcomes.values()) == {"inconclusive"}, outcomes
    assert {f.outcome for f in check_findings(replicate_view(paper_like(), None))} == {"inconclusive"}  # no replicates


def test_decide_has_three_outcomes() -> None:
    assert decide((0.1, 2.0)) == "reproduced" and decide((-3.0, -0.2)) == "contradicted"
    assert decide((-1.0, 1.0)) == "inconclusive" and decide(None) == "inconclusive"
    assert decide((float("nan"), float("nan"))) == "inconclusive"


def test_missing_parts_are_skipped() -> None:
    assert check_findings({}) == []
    only = check_findings({"table2": paper_like()["table2"]})
    assert {f.source.split()[0] for f in only} == {"Table"} and len(only) == 5


def test_undefined_tssd_correlation_is_inconclusive_with_a_reason() -> None:
    r = paper_like()
    r["table5"]["metrics"]["tssd"] = [0.0, 0.0, 0.0, 0.0]
    f = {f.id: f for f in check_findings(r)}["tssd_predicts_best"]
    assert f.outcome == "inconclusive" and "undefined" in f.ours


# ------------------------------------------------------------------------------------------ the bootstrap
def test_retrieval_interval_covers_the_true_recall() -> None:
    """Simulated test sets: every query hits at k = 1, 5, 10 with known probabilities; the 95 % interval of
    Avg TR / Avg IR must contain the population value in about 95 % of test sets."""
    rng = np.random.default_rng(0)
    p = {1: 0.3, 5: 0.6, 10: 0.8}
    truth = 100 * sum(p.values()) / 3
    covered = {"avg_tr": 0, "avg_ir": 0}
    reps = 200
    for rep in range(reps):
        n = 300
        u = rng.random(n * 6)
        ranks = np.where(u < p[1], 1, np.where(u < p[5], 5, np.where(u < p[10], 10, 11)))
        r = {"tr": ranks[:n], "tr_query": np.arange(n), "ir": ranks[n:], "ir_image": np.repeat(np.arange(n), 5)}
        sc = retrieval_scores(r, n, f"sim-{rep}")
        for key in covered:
            lo, hi = sc.interval(key)
            covered[key] += lo <= truth <= hi
    for key, c in covered.items():
        assert 0.88 <= c / reps <= 0.99, (key, c / reps)


def test_paired_differences_are_tighter_than_unpaired_ones() -> None:
    """Two models that differ on 5 % of the same 2,000 examples: the paired interval of the difference is the
    interval of that 5 %, far narrower than each score's own."""
    rng = np.random.default_rng(1)
    a = 100.0 * (rng.random(2000) < 0.6)
    b = a.copy()
    flip = rng.choice(2000, 100, replace=False)
    b[flip] = 100.0 - b[flip]
    sa, sb = mean_score("acc", a, "same-split"), mean_score("acc", b, "same-split")
    diff = percentile_interval(sa.boot["acc"] - sb.boot["acc"])
    own = sa.interval("acc")
    assert diff[0] <= sa["acc"] - sb["acc"] <= diff[1]
    assert diff[1] - diff[0] < 0.6 * (own[1] - own[0])


def test_seed_spread_widens_the_interval_of_the_seed_mean() -> None:
    """Two training seeds that disagree (40 vs 60, each measured to ±0.1): the seed mean's interval must hold
    the run-to-run spread, not only the test set's; a finding that needs 45 < mean is then inconclusive."""
    from vlmerge.study.stats import mean_over_seeds

    rng = np.random.default_rng(0)
    seeds = [Scores({"r_mean": v}, {"r_mean": v + rng.normal(0, 0.05, 1000)}) for v in (40.0, 60.0)]
    m = mean_over_seeds(seeds)
    lo, hi = m.interval("r_mean")
    assert m["r_mean"] == 50.0 and m["r_mean_std"] == pytest.approx(math.sqrt(200))
    assert lo < 42 and hi > 58
    one = mean_over_seeds(seeds[:1]).interval("r_mean")
    assert one[1] - one[0] < 0.5


def test_retrieval_replicates_are_paired_across_models_on_one_split() -> None:
    """Two models whose ranks differ on 20 of 400 image queries: the interval of their difference (one set of
    resamples for both) is far narrower than either score's own, and it holds the true difference."""
    rng = np.random.default_rng(3)
    n = 400
    tr = rng.choice([1, 3, 7, 20], size=n)
    ir = rng.choice([1, 3, 7, 20], size=5 * n)
    other = tr.copy()
    other[:20] = 20  # model b misses the first 20 image queries
    r = {"tr_query": np.arange(n), "ir": ir, "ir_image": np.repeat(np.arange(n), 5)}
    a, b = retrieval_scores({**r, "tr": tr}, n, "split-x"), retrieval_scores({**r, "tr": other}, n, "split-x")
    lo, hi = percentile_interval(a.boot["avg_tr"] - b.boot["avg_tr"])
    own = a.interval("avg_tr")
    assert lo <= a["avg_tr"] - b["avg_tr"] <= hi and hi - lo < 0.5 * (own[1] - own[0])
