"""The UnIVAL study: config validation, the computed findings, and one end-to-end micro run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmerge.study.findings import OUTCOMES
from vlmerge.study.unival import check_unival_findings, load_unival_config, run_unival
from vlmerge.study.unival import front_gain as _front_gain


def test_bad_config_values_are_refused_with_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"lambdas.*\[0, 1\]"):
        load_unival_config("micro", ["lambdas=[0.0, 1.2]"])
    with pytest.raises(ValueError, match="pairs"):
        load_unival_config("micro", ["pairs=[[vqa, seg]]"])
    with pytest.raises(ValueError, match="key=value"):
        load_unival_config("micro", ["lambdas"])


def _front(points: dict[float, tuple[float, float]], recipe: str = "vanilla") -> dict:
    return {"a": "vqa", "b": "cls", "recipe": recipe,
            "points": [{"lambda": k, "test": {"vqa": a, "cls": b}} for k, (a, b) in points.items()]}


def test_findings_are_computed_from_the_numbers() -> None:
    """Plain numbers (no bootstrap replicates): the margins follow the numbers, and with no interval every
    finding is inconclusive (the bootstrap cases are in test_unival_stats.py)."""
    bulge = _front({0.0: (10, 80), 0.5: (50, 70), 1.0: (60, 20)})
    sag = _front({0.0: (10, 80), 0.5: (20, 30), 1.0: (60, 20)})
    assert _front_gain(bulge) > 0 > _front_gain(sag)
    soups = {"soup/vanilla": {"vqa": 10.0}, "soup/fusing": {"vqa": 20.0}, "soup/ratatouille": {"vqa": 30.0}}
    res = {"scenario1": {"vqa|cls|vanilla": bulge}, "scenario2": soups, "scenario3": soups}
    found = {f.id: f for f in check_unival_findings(res)}
    assert set(found) == {"convex_fronts", "interpolation_beats_specialist", "id_order", "id_wa_beats_vanilla",
                          "ood_order", "ood_ratatouille_best"}
    assert found["convex_fronts"].margin == pytest.approx(_front_gain(bulge))
    assert found["id_order"].margin == pytest.approx(10.0) and found["id_wa_beats_vanilla"].margin == 10.0
    assert found["interpolation_beats_specialist"].margin == pytest.approx(-10.0)  # 50 < 60 and 70 < 80
    assert all(f.outcome == "inconclusive" and f.interval is None for f in found.values())
    flipped = {"soup/vanilla": {"vqa": 30.0}, "soup/fusing": {"vqa": 20.0}, "soup/ratatouille": {"vqa": 10.0}}
    res = {"scenario1": {"vqa|cls|vanilla": sag}, "scenario2": flipped, "scenario3": flipped}
    assert all(f.margin < 0 for f in check_unival_findings(res))


def test_micro_study_end_to_end(tmp_path: Path) -> None:
    report = run_unival("micro", tmp_path / "uv", progress=False)
    text = report.read_text()
    assert "vlmerge study unival --preset micro" in text and "head mode: **unified**" in text
    assert "95 % bootstrap interval" in text and "margin [95 % interval]" in text
    assert (tmp_path / "uv" / "scenario1_fronts.png").is_file()
    r = json.loads((tmp_path / "uv" / "results.json").read_text())
    assert {f["id"] for f in r["findings"]} >= {"convex_fronts", "interpolation_beats_specialist", "id_order",
                                                 "ood_order"}
    for f in r["findings"]:
        assert f["outcome"] in OUTCOMES and f["decided_by"]
        assert f["interval"] is not None and len(f["interval"]) == 2  # every margin has replicates here
    assert r["meta"]["bootstrap"]["resamples"] > 0
    # every score carries its 95 % interval (around the point estimate here: a mean of 0 / 100 outcomes)
    for name, sc in r["scenario2"].items():
        assert set(sc["ci"]) == set(r["tasks"]), name
        for t in r["tasks"]:
            lo, hi = sc["ci"][t]
            assert 0 <= lo <= hi <= 100 and lo - 1e-3 <= sc[t] <= hi + 1e-3
    assert set(r["scenario3"]["soup/ratatouille"]["ci"]) == {"vqa@ood", "size", "largest-color"}
    # λ = 1 / λ = 0 reproduce the endpoint (specialist) models' evaluations exactly, intervals included
    for f in r["scenario1"].values():
        pts = {p["lambda"]: p["test"] for p in f["points"]}
        spec = r["specialists"][f["recipe"]]
        for lam, model in ((1.0, f["a"]), (0.0, f["b"])):
            for t in (f["a"], f["b"]):
                assert pts[lam][t] == spec[model][t] and pts[lam]["ci"][t] == spec[model]["ci"][t]
    assert set(r["scenario2"]) >= {"soup/vanilla", "soup/fusing", "soup/ratatouille", "task_arithmetic/vanilla",
                                   "ties/vanilla", "dare/vanilla", "greedy_soup"}
    assert set(r["scenario3"]["soup/ratatouille"]) == {"vqa@ood", "size", "largest-color", "ci"}
    # a re-run resumes from the cells and gives the same numbers (determinism of the evaluations)
    again = json.loads((run_unival("micro", tmp_path / "uv", progress=False).parent / "results.json").read_text())
    assert again["scenario2"] == r["scenario2"] and again["scenario1"] == r["scenario1"]
    assert again["findings"] == r["findings"]
