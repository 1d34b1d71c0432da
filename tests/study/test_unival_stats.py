"""The UnIVAL study's statistics: bootstrap intervals over test examples, paired across models, seed means, and
the three outcomes of a finding, on hand-made cases whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmerge.study.stats import Scores, mean_score, percentile_interval
from vlmerge.study.stats import aggregate_seeds as aggregate
from vlmerge.study.unival import check_unival_findings, render_report

N = 400  # test examples per task in the hand-made cases


def outcomes(correct: range | list[int], n: int = N) -> list[float]:
    """Per-example outcomes in percent: 100 on the ``correct`` examples, 0 elsewhere."""
    x = [0.0] * n
    for i in correct:
        x[i] = 100.0
    return x


def scores(per_task: dict[str, list[float]]) -> Scores:
    """One model's Scores on the hand-made test sets (one split per task: every model shares its resamples)."""
    out = Scores()
    for t, pe in per_task.items():
        out = out.merged(mean_score(t, pe, f"test-unival/{t}"))
    return out


def soups(van: range, fus: range, rat: range, tasks: tuple[str, ...] = ("vqa", "cls")) -> dict[str, Scores]:
    return {f"soup/{name}": scores({t: outcomes(c) for t in tasks})
            for name, c in (("vanilla", van), ("fusing", fus), ("ratatouille", rat))}


def front(recipe: str, pts: dict[float, tuple[range, range]]) -> dict:
    """An interpolation front vqa ↔ cls: at each λ the examples of vqa and cls answered correctly."""
    return {"a": "vqa", "b": "cls", "recipe": recipe,
            "points": [{"lambda": lam, "test": scores({"vqa": outcomes(a), "cls": outcomes(b)})}
                       for lam, (a, b) in pts.items()]}


BULGE = {1.0: (range(240), range(80)), 0.5: (range(200), range(280)), 0.0: (range(40), range(320))}
"""λ -> the examples of vqa and cls right: the vqa model (λ = 1) 60 % / 20 %, the cls model (λ = 0) 10 % / 80 %,
their average 50 % / 70 %: above the chord (35 % / 50 %) and below both specialists."""


def findings(r: dict) -> dict[str, object]:
    return {f.id: f for f in check_unival_findings(r)}


# ------------------------------------------------------------------------------------------------ outcomes
def test_better_by_construction_is_reproduced_and_reversed_is_contradicted() -> None:
    """Nested sets of correct examples: Ratatouille right on every example Fusing gets right and 60 more, Fusing
    likewise over vanilla, so every paired resample keeps the order: the intervals exclude 0."""
    ordered = soups(range(0, 160), range(0, 220), range(0, 280))
    res = {"tasks": ["vqa", "cls"], "ood": ["vqa", "cls"], "scenario2": ordered, "scenario3": ordered}
    f = findings(res)
    for key in ("id_order", "id_wa_beats_vanilla", "ood_order", "ood_ratatouille_best"):
        assert f[key].outcome == "reproduced", key
        assert f[key].margin == pytest.approx(15.0)  # 60 of 400 examples
        lo, hi = f[key].interval
        assert 0 < lo < 15.0 < hi
    reversed_ = soups(range(0, 280), range(0, 220), range(0, 160))
    f = findings({"tasks": ["vqa", "cls"], "ood": ["vqa", "cls"], "scenario2": reversed_, "scenario3": reversed_})
    assert all(x.outcome == "contradicted" for x in f.values()), {k: x.outcome for k, x in f.items()}


def test_identical_in_distribution_is_inconclusive() -> None:
    """Three models with the same accuracy (50 %) on different examples: the margins' intervals contain 0."""
    same = soups(range(0, 200), range(100, 300), range(200, 400))
    f = findings({"tasks": ["vqa", "cls"], "ood": ["vqa", "cls"], "scenario2": same, "scenario3": same})
    for key in ("id_order", "id_wa_beats_vanilla", "ood_order", "ood_ratatouille_best"):
        assert f[key].margin == pytest.approx(0.0)
        assert f[key].outcome == "inconclusive", (key, f[key].interval)


def test_pairing_decides_a_small_but_consistent_gain() -> None:
    """A gain of 8 examples in 400 (2 points) on the *same* examples is reproduced (paired resamples), while the
    two models' own intervals overlap widely: the difference is not read off the separate intervals."""
    van, better = scores({"vqa": outcomes(range(0, 200))}), scores({"vqa": outcomes(range(0, 208))})
    assert better.interval("vqa")[0] < van.interval("vqa")[1]  # overlapping marginal intervals
    s2 = {"soup/vanilla": van, "soup/fusing": better, "soup/ratatouille": better}
    f = findings({"tasks": ["vqa"], "scenario2": s2})
    assert f["id_wa_beats_vanilla"].outcome == "reproduced"
    assert f["id_order"].outcome == "inconclusive"  # Ratatouille = Fusing: a zero gap


def test_scenario1_findings_on_known_fronts() -> None:
    """vqa ↔ cls fronts with nested correct sets: a bulging front (convex, reproduced) whose interior points stay
    below both specialists (contradicted), and Ratatouille's endpoint models transferring better."""
    bulge = front("vanilla", BULGE)
    rat = front("ratatouille", {1.0: (range(240), range(120)), 0.5: (range(200), range(280)),
                                0.0: (range(80), range(320))})
    f = findings({"scenario1": {"vqa|cls|vanilla": bulge, "vqa|cls|ratatouille": rat}})
    assert f["convex_fronts"].outcome == "reproduced" and f["convex_fronts"].margin > 0
    assert f["interpolation_beats_specialist"].outcome == "contradicted"
    assert f["interpolation_beats_specialist"].margin == pytest.approx(-10.0)  # vqa 200 vs 240 of 400
    assert f["ratatouille_transfer"].outcome == "reproduced"
    assert f["ratatouille_transfer"].margin == pytest.approx(10.0)  # (+40 + 40) / 2 examples of 400
    sag = front("vanilla", {1.0: (range(240), range(80)), 0.5: (range(40), range(80)), 0.0: (range(40), range(320))})
    peak = front("ratatouille", {1.0: (range(240), range(80)), 0.5: (range(300), range(200)),
                                 0.0: (range(40), range(320))})
    f = findings({"scenario1": {"vqa|cls|vanilla": sag, "vqa|cls|ratatouille": peak}})
    assert f["convex_fronts"].outcome == "contradicted"
    assert f["interpolation_beats_specialist"].outcome == "reproduced"  # the Ratatouille curve, vqa: 300 > 240
    assert "ratatouille" in f["interpolation_beats_specialist"].decided_by
    assert f["ratatouille_transfer"].outcome == "inconclusive"  # the same endpoint models


# ------------------------------------------------------------------------------------------------ seeds
def test_aggregate_over_two_seeds_gives_mean_std_and_averaged_replicates() -> None:
    s0 = scores({"vqa": outcomes(range(100)), "cls": outcomes(range(200))})
    s1 = scores({"vqa": outcomes(range(140)), "cls": outcomes(range(220))})
    per_seed = [{"tasks": ["vqa", "cls"], "scenario2": {"soup/vanilla": s0}, "timings": {"n": 2}},
                {"tasks": ["vqa", "cls"], "scenario2": {"soup/vanilla": s1}, "timings": {"n": 4}}]
    agg = aggregate(per_seed)
    m = agg["scenario2"]["soup/vanilla"]
    assert isinstance(m, Scores)
    assert m["vqa"] == pytest.approx(30.0) and m["cls"] == pytest.approx(52.5)
    assert m["vqa_std"] == pytest.approx(np.std([25.0, 35.0], ddof=1))
    assert m["cls_std"] == pytest.approx(np.std([50.0, 55.0], ddof=1))
    from vlmerge.study.stats import seed_draws

    both = np.stack([s0.boot["vqa"], s1.boot["vqa"]], axis=1)  # two-level bootstrap: seeds drawn per replicate
    np.testing.assert_allclose(m.boot["vqa"], both[np.arange(len(both))[:, None], seed_draws(2)].mean(axis=1))
    assert agg["tasks"] == ["vqa", "cls"] and agg["timings"]["n"] == 3.0
    assert aggregate([{"k": [0, 5], "n": 7}, {"k": [0, 5], "n": 7}]) == {"k": [0, 5], "n": 7}  # agreeing ints kept
    # the findings read the seed means and the averaged replicates, not the _std keys
    s2 = {"soup/vanilla": m, "soup/fusing": m, "soup/ratatouille": m}
    f = findings({"tasks": ["vqa", "cls"], "scenario2": s2})
    assert f["id_order"].margin == pytest.approx(0.0) and f["id_order"].outcome == "inconclusive"
    one = aggregate(per_seed[:1])["scenario2"]["soup/vanilla"]  # one seed: its numbers unchanged
    assert dict(one) == dict(s0) and all(np.array_equal(one.boot[k], s0.boot[k]) for k in s0.boot)


# ------------------------------------------------------------------------------------------------ coverage
def test_mean_score_interval_covers_the_true_mean() -> None:
    """Simulated Bernoulli populations (p = 0.3, n = 200 examples): the 95 % interval of ``mean_score`` holds the
    true mean in about 95 % of 200 repetitions."""
    rng = np.random.default_rng(1234)
    p, n, reps = 0.3, 200, 200
    hits = 0
    for i in range(reps):
        x = 100.0 * (rng.random(n) < p)
        lo, hi = percentile_interval(mean_score("t", x, f"coverage/{i}").boot["t"])
        hits += lo <= 100 * p <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps


# ------------------------------------------------------------------------------------------------ report
def test_report_shows_intervals_outcomes_and_what_decided() -> None:
    ordered = soups(range(0, 160), range(0, 220), range(0, 280))
    bulge = front("vanilla", BULGE)
    spec = {t: scores({"vqa": outcomes(range(240)), "cls": outcomes(range(320))}) for t in ("vqa", "cls")}
    r = {"tasks": ["vqa", "cls"], "ood": ["vqa@ood"], "head": "unified",
         "scenario1": {"vqa|cls|vanilla": {**bulge, "grid_search": {"best_lambda": 0.5,
                                                                   "test": bulge["points"][1]["test"]}}},
         "scenario2": ordered, "scenario3": {}, "specialists": {"vanilla": spec},
         "val_scores": {"vanilla": {"vqa": 50.0, "cls": 60.0}},
         "meta": {"preset": "hand", "command": "x", "seeds": [0, 1], "wall_time_s": 1.0, "device": "cpu",
                  "config_hash": "h", "config": {}, "bootstrap": {"resamples": 1000}}}
    found = check_unival_findings(r)
    text = render_report(r, found, [])
    assert "1000 resamples of the test examples" in text and "standard deviation over seeds" in text
    assert "✅ reproduced" in text and "❌ contradicted" in text
    assert "| 40.00 [" in text  # soup/vanilla on vqa: 160 / 400, with its interval
    for f in found:
        assert f.decided_by in text


# ------------------------------------------------------------------------------------------------ per example
def test_evaluations_return_per_example_outcomes_whose_mean_is_the_score() -> None:
    from vlmerge.data import default_tokenizer
    from vlmerge.finetune.config import FinetuneConfig
    from vlmerge.finetune.tasks import Prep, get_task
    from vlmerge.finetune.unified import evaluate_unified, materialize, unified_dataset
    from vlmerge.models import VLMo, preset_config

    tok = default_tokenizer()
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", image_size=16, heads=("itc", "itm", "mlm"), vocab_size=tok.vocab_size,
                               num_vl_layers=2)).eval()
    for task in ("cls", "itm"):
        items = materialize(unified_dataset(task, "test", 10, image_size=16))
        r = evaluate_unified(model, task, items, tok, batch_size=4)
        assert len(r["per_example"]) == r["n"] == len(items)
        assert set(r["per_example"]) <= {0.0, 100.0} and np.mean(r["per_example"]) == pytest.approx(r["score"])
    items = materialize(unified_dataset("itm", "test", 6, image_size=16))
    prep = Prep(tok, model.config.max_text_len, model.config.image_size)
    r = get_task("itm").evaluate(model, items, prep, FinetuneConfig(task="itm", eval_batch_size=4))
    pe = np.asarray(r["per_example"])
    assert len(pe) == r["n_pairs"] == 2 * len(items) and set(pe) <= {0.0, 100.0}
    assert pe.mean() == pytest.approx(r["accuracy"])
    assert pe[0::2].mean() == pytest.approx(r["pos_acc"]) and pe[1::2].mean() == pytest.approx(r["neg_acc"])
