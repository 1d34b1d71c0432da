"""``vlmerge predict``: per-layer risk on cases whose answer is known, the drop predictor on a planted line, the
calibration file, and the command's refusals.

Oracles: equal expert copies (zero distance, zero drift), α = 1 / α = 0 interpolation (the merged block *is*
the vision / language expert, so that route's drift is exactly 0), the relative L2 computed here in numpy from
the state dict, and calibration points drawn from a known line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmerge.cli import main
from vlmerge.data import default_tokenizer
from vlmerge.metrics.predict import (
    calibration_point,
    fit_drop_model,
    layer_report,
    load_calibration,
    predict_drop,
    recommend,
    save_calibration,
)
from vlmerge.models import VLMo, preset_config, save_model

DIFFERENT = 1  # the layer made to differ


def _ckpt(root: Path, noise: float = 0.05, seed: int = 0, layers: tuple[int, ...] = (DIFFERENT,)) -> Path:
    """A micro MSA whose v / l copies are equal (tied init) except in ``layers``, where l gets noise."""
    torch.manual_seed(seed)
    model = VLMo(preset_config("micro", "msa", vocab_size=default_tokenizer().vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(f"blocks.{i}.") for i in layers) and ".l." in name:
                p.add_(noise * torch.randn_like(p))
    return save_model(model, root / f"ck-{seed}-{noise}")


def _batches(n: int = 2, size: int = 8, seed: int = 0):
    from vlmerge.merge.gram_data import world_batches

    cfg = preset_config("micro", "msa", vocab_size=default_tokenizer().vocab_size)
    return list(world_batches(VLMo(cfg), n, seed, batch_size=size))


def test_equal_copies_have_zero_risk_and_the_differing_layer_ranks_first(tmp_path) -> None:
    ck = _ckpt(tmp_path)
    for batches in (None, _batches()):
        rep = layer_report(ck, batches=batches)
        risk = {r["layer"]: r["risk"] for r in rep["per_layer"]}
        assert rep["ranked"][0] == DIFFERENT and risk[DIFFERENT] > 0
        assert risk[0] == 0.0, rep["per_layer"][0]
        assert rep["risk_from"] == ("rel_l2" if batches is None else "drift")


def test_rel_l2_is_the_relative_distance_of_the_copies(tmp_path) -> None:
    from safetensors.torch import load_file

    ck = _ckpt(tmp_path, layers=(0, 1))
    sd = {k: v.double().numpy() for k, v in load_file(str(ck / "model.safetensors")).items()}
    rep = layer_report(ck)
    for row in rep["per_layer"]:
        keys = [k for k in sd if k.startswith(f"blocks.{row['layer']}.") and ".v." in k]
        v = np.concatenate([sd[k].ravel() for k in keys])
        lang = np.concatenate([sd[k.replace(".v.", ".l.")].ravel() for k in keys])
        want = np.linalg.norm(v - lang) / math.sqrt((v @ v + lang @ lang) / 2)
        assert row["rel_l2"] == pytest.approx(want, rel=1e-9)
        assert row["l2"] == pytest.approx(np.linalg.norm(v - lang), rel=1e-6)


def test_drift_is_zero_on_the_route_whose_expert_the_merge_keeps(tmp_path) -> None:
    ck = _ckpt(tmp_path, layers=(0, 1))
    batches = _batches()
    keep_v = layer_report(ck, batches=batches, params={"alpha": 1.0})
    keep_l = layer_report(ck, batches=batches, params={"alpha": 0.0})
    for a, b in zip(keep_v["per_layer"], keep_l["per_layer"], strict=True):
        # float32 rounding of the same products, not 0.0 (the top layer's merge is ⅔ W_v + ⅓ W_vl, W_vl = W_v)
        assert a["drift_v"] < 1e-5 and a["drift_l"] > 0.05
        if b["layer"] < DIFFERENT:  # below the VL layer: α = 0 is W_l itself (above it, ⅓ W_vl joins in)
            assert b["drift_l"] < 1e-5 and b["drift_v"] > 0.05
    assert keep_v["global"]["out_drift"] > 0


def test_task_vector_features_with_a_base(tmp_path) -> None:
    base = _ckpt(tmp_path, layers=())  # W0: equal copies
    ck = _ckpt(tmp_path, layers=(DIFFERENT,))  # same seed: W0 + noise on layer 1's l copy
    rep = layer_report(ck, base=base)
    rows = {r["layer"]: r for r in rep["per_layer"]}
    assert rows[0]["tv_rel_l2"] == 0.0 and rows[DIFFERENT]["tv_rel_l2"] == pytest.approx(math.sqrt(2))
    # τ_v = 0 and τ_l ≠ 0: orthogonal-by-definition task vectors, cosine dissimilarity 1
    assert rows[DIFFERENT]["tv_cosine"] == 1.0 and "tv_rel_l2" in rep["global"]


def _planted(n_groups: int = 6, per_group: int = 2, noise: float = 0.05, seed: int = 0) -> list[dict]:
    """drop = 2 + 30·tssd (+ small noise); the other features are unrelated random numbers."""
    rng = np.random.default_rng(seed)
    pts = []
    for g in range(n_groups):
        for _ in range(per_group):
            t = float(rng.uniform(0, 0.1))
            feats = {"tssd": t, "l2": float(rng.uniform(1, 5)), "cosine": float(rng.uniform(0, 0.2)),
                     "ssd": float(rng.uniform(0, 0.3)), "rel_l2": float(rng.uniform(0, 1))}
            pts.append(calibration_point(feats, "interpolation", {"alpha": 0.5}, 2 + 30 * t + noise * rng.normal(),
                                         group=f"seed={g}"))
    pts.append(calibration_point({"tssd": 0.5, "l2": 1, "cosine": 0, "ssd": 0, "rel_l2": 0}, "ties",
                                 {"density": 0.5}, 99.0, group="other"))  # another method: never used for alpha
    return pts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_predictor_finds_the_planted_feature_and_line(seed: int) -> None:
    pts = _planted(seed=seed)
    model = fit_drop_model(pts, "interpolation", {"alpha": 0.5})
    assert model["feature"] == "tssd" and model["n"] == 12 and model["groups"] == 6
    assert model["b"] == pytest.approx(30, rel=0.05) and model["a"] == pytest.approx(2, abs=0.1)
    assert model["loo_r"] > 0.99 and all(model["per_feature"][f]["loo_r"] < 0.9 for f in ("l2", "rel_l2"))
    est = predict_drop(model, {"tssd": 0.05, "l2": 3.0})
    lo, hi = est["interval"]
    assert lo < 3.5 < hi and hi - lo < 0.6 and est["drop"] == pytest.approx(3.5, abs=0.1)


def test_too_few_points_and_a_missing_feature_are_refused() -> None:
    pts = _planted(n_groups=1, per_group=2)
    with pytest.raises(ValueError, match="needs ≥ 3 points in ≥ 2 groups"):
        fit_drop_model(pts, "interpolation", {"alpha": 0.5})
    model = fit_drop_model(_planted(), "interpolation", {"alpha": 0.5})
    with pytest.raises(ValueError, match="uses feature 'tssd', which this report lacks"):
        predict_drop(model, {"l2": 1.0})


def test_calibration_round_trips_and_bad_files_name_the_entry(tmp_path) -> None:
    pts = _planted()
    path = save_calibration(pts, tmp_path / "cal.json")
    assert load_calibration(path) == pts
    data = json.loads(path.read_text())
    data["points"][3]["drop"] = "a lot"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: points\[3\] is invalid"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="not a calibration file"):
        load_calibration(tmp_path / "other.json")


def test_recommend_orders_the_calibrated_merges_by_estimated_drop() -> None:
    pts = _planted()
    pts += [calibration_point(p["features"], "interpolation", {"alpha": 0.75}, p["drop"] / 2, group=p["group"])
            for p in pts if p["method"] == "interpolation"]
    advice = recommend({"global": {"tssd": 0.05, "l2": 2.0, "cosine": 0.1, "ssd": 0.1, "rel_l2": 0.3}}, pts)
    assert [o["params"] for o in advice["options"]] == [{"alpha": 0.75}, {"alpha": 0.5}]  # ties: 1 point only
    assert advice["best"]["drop"] == pytest.approx(1.75, abs=0.1)


def test_cli_predict_with_calibration_plot_and_json(tmp_path, capsys) -> None:
    ck = _ckpt(tmp_path)
    cal = save_calibration(_planted(), tmp_path / "cal.json")
    assert main(["predict", str(ck), "--calibration", str(cal), "--plot", str(tmp_path / "risk.png")]) == 0
    out = capsys.readouterr().out
    assert "riskiest layers (by rel_l2): 1, 0" in out and "estimated drop with interpolation {'alpha': 0.5}" in out
    assert (tmp_path / "risk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["predict", str(ck), "--json", "--data", "world", "--batches", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["risk_from"] == "drift" and rep["ranked"][0] == DIFFERENT and rep["advice"] is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--batches", "2"], "--batches needs --data NAME"),
    (["--param", "alpha=2"], "alpha"),
    (["--method", "regmean", "--data", "world"], "needs Gram matrices"),
    (["--method", "task_arithmetic", "--data", "world"], "needs --base W0"),
    (["--calibration", "nope.json"], "no such file"),
])
def test_cli_predict_refusals_are_one_line(tmp_path, capsys, argv, message) -> None:
    ck = _ckpt(tmp_path)
    assert main(["predict", str(ck), *argv, "--plot", str(tmp_path / "p.png")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p.png").exists()


# ------------------------------------------------------------------------------------ merge-aware, pooled
def _flat(tensors) -> np.ndarray:
    return np.concatenate([t.double().numpy().ravel() for t in tensors])


def test_merge_features_are_the_relative_distances_of_the_merged_weights_to_each_copy(tmp_path) -> None:
    from safetensors.torch import load_file

    from vlmerge.metrics.predict import merge_features
    from vlmerge.models.roles import merge_groups

    sd = load_file(str(_ckpt(tmp_path, layers=(0, 1)) / "model.safetensors"))
    groups = [g for g in merge_groups(sd) if "v" in g.sources and "l" in g.sources]
    kept = {g.target for g in groups if g.layer == 0}  # a partial merge: layer 0 stays modality-specific
    c = 0.3  # W* = W^v + c (W^l − W^v): the vision copy moves by c, the language copy by 1 − c
    merged = {g.target: sd[g.sources["v"]] + c * (sd[g.sources["l"]] - sd[g.sources["v"]])
              for g in groups if g.target not in kept}
    got = merge_features(sd, merged)
    for mod in ("v", "l"):
        w = _flat(sd[g.sources[mod]] for g in merge_groups(sd) if mod in g.sources)
        star = _flat(merged.get(g.target, sd[g.sources[mod]]) for g in merge_groups(sd) if mod in g.sources)
        want = np.linalg.norm(star - w) / math.sqrt((star @ star + w @ w) / 2)
        assert got[f"merge_rel_{mod}"] == pytest.approx(want, rel=1e-9)
    assert got["merge_rel_max"] == max(got["merge_rel_v"], got["merge_rel_l"]) > 0
    assert got["merge_rel_v"] < got["merge_rel_l"]  # c = 0.3 < 1 − c
    same = merge_features(sd, {g.target: sd[g.sources["v"]] for g in groups})
    assert same["merge_rel_v"] == 0.0 and same["merge_rel_l"] > 0


def _pooled(n_runs: int = 6, noise: float = 0.05, seed: int = 0) -> list[dict]:
    """Merges of several methods and coefficients per run: drop = 1 + 20·merge_rel_v + 40·merge_rel_l (+ noise);
    the checkpoint's own features are unrelated random numbers shared by a run's merges."""
    rng = np.random.default_rng(seed)
    pts = []
    for g in range(n_runs):
        run = {"tssd": float(rng.uniform(0, 0.1)), "l2": float(rng.uniform(1, 5)), "rel_l2": float(rng.uniform(0, 1))}
        for method, params in (("interpolation", {"alpha": 0.25}), ("interpolation", {"alpha": 0.75}),
                               ("ties", {"density": 0.5})):
            mv, ml = float(rng.uniform(0, 0.3)), float(rng.uniform(0, 0.3))
            feats = {**run, "merge_rel_v": mv, "merge_rel_l": ml, "merge_rel_max": max(mv, ml)}
            pts.append(calibration_point(feats, method, params, 1 + 20 * mv + 40 * ml + noise * rng.normal(),
                                         group=f"run={g}"))
    return pts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_pooled_predictor_finds_the_planted_plane_across_methods(seed: int) -> None:
    pts = _pooled(seed=seed)
    model = fit_drop_model(pts)  # no method: every point
    assert model["features"] == ["merge_rel_v", "merge_rel_l"] and model["n"] == 18 and model["groups"] == 6
    assert model["coef"] == pytest.approx([1, 20, 40], abs=0.5)
    assert model["loo_r"] > 0.99
    assert all(model["per_feature"][f]["loo_r"] < 0.9 for f in ("tssd", "l2", "rel_l2"))
    est = predict_drop(model, {"merge_rel_v": 0.1, "merge_rel_l": 0.2})
    lo, hi = est["interval"]
    assert lo < 11.0 < hi and hi - lo < 0.6 and est["drop"] == pytest.approx(11.0, abs=0.15)
    # the prediction interval of a single feature reduces to the textbook line formula
    line = fit_drop_model(pts, features=["merge_rel_l"])
    xs = np.array([p["features"]["merge_rel_l"] for p in pts])
    ys = np.array([p["drop"] for p in pts])
    b, a = np.polyfit(xs, ys, 1)
    s = math.sqrt(np.sum((ys - a - b * xs) ** 2) / (len(xs) - 2))
    half = 2.120 * s * math.sqrt(  # t_0.975 with 16 degrees of freedom
        1 + 1 / len(xs) + (0.2 - xs.mean()) ** 2 / np.sum((xs - xs.mean()) ** 2))
    got = predict_drop(line, {"merge_rel_l": 0.2})
    assert got["drop"] == pytest.approx(a + b * 0.2, rel=1e-9)
    assert got["interval"][1] - got["drop"] == pytest.approx(half, rel=1e-9)


def test_recommend_uses_the_pooled_predictor_for_an_uncalibrated_merge() -> None:
    pts = _pooled()
    moves = {0.25: (0.05, 0.15), 0.75: (0.15, 0.05), 0.6: (0.12, 0.08)}

    def merge_feats(method: str, params) -> dict[str, float]:
        if method != "interpolation":
            raise ValueError("not in memory")
        mv, ml = moves[params["alpha"]]
        return {"merge_rel_v": mv, "merge_rel_l": ml, "merge_rel_max": max(mv, ml)}

    report = {"global": {"tssd": 0.05, "l2": 2.0, "rel_l2": 0.3}}
    advice = recommend(report, pts, merge_feats, extra=[("interpolation", {"alpha": 0.6})])
    by = {(o["method"], json.dumps(o["params"])): o for o in advice["options"]}
    uncal = by[("interpolation", '{"alpha": 0.6}')]
    assert uncal["from"] == "pooled" and uncal["drop"] == pytest.approx(1 + 20 * 0.12 + 40 * 0.08, abs=0.2)
    assert by[("ties", '{"density": 0.5}')]["from"] == "own"  # not mergeable here: its own 6 points
    assert advice["best"]["params"] == {"alpha": 0.75}  # 1 + 3 + 2 = 6, the smallest planted drop
    assert [o["drop"] for o in advice["options"]] == sorted(o["drop"] for o in advice["options"])


def test_cli_predict_estimates_an_uncalibrated_coefficient_from_the_pooled_fit(tmp_path, capsys) -> None:
    from vlmerge.metrics.predict import _t975

    ck = _ckpt(tmp_path, layers=(0, 1))
    cal = save_calibration(_pooled(), tmp_path / "cal.json")
    assert main(["predict", str(ck), "--calibration", str(cal), "--alpha", "0.6", "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)["advice"]
    mine = next(o for o in advice["options"] if o["params"] == {"alpha": 0.6})
    assert mine["from"] == "pooled" and mine["feature"] == "merge_rel_v + merge_rel_l"
    mv, ml = mine["values"]["merge_rel_v"], mine["values"]["merge_rel_l"]
    assert 0 < mv < ml  # α = 0.6 keeps more of the vision copy than of the language one
    assert mine["drop"] == pytest.approx(1 + 20 * mv + 40 * ml, abs=0.3)
    assert main(["predict", str(ck), "--calibration", str(cal), "--alpha", "0.6"]) == 0
    assert "pooled over methods and coefficients" in capsys.readouterr().out
    assert (_t975(16), _t975(40), _t975(120)) == pytest.approx((2.120, 2.021, 1.980), abs=1e-3)


def test_cli_predict_measures_each_merges_drift_once(tmp_path, capsys, monkeypatch) -> None:
    """With --data and --calibration the report's merge (--alpha 0.5) has its drift measured once, and the
    advice for it carries the report's numbers; the other calibrated merge (α = 0.75) is measured as before."""
    import vlmerge.metrics.predict as predict

    ck = _ckpt(tmp_path, layers=(0, 1))
    pts = [calibration_point({"drift": 0.01 * i, "tssd": 0.1}, "interpolation", {"alpha": a}, 1.0 + i,
                             group=f"run={i}") for i in range(4) for a in (0.5, 0.75)]
    cal = save_calibration(pts, tmp_path / "cal.json")
    calls = []
    real = predict._merge_activation_drift
    monkeypatch.setattr(predict, "_merge_activation_drift", lambda *a: calls.append(1) or real(*a))
    assert main(["predict", str(ck), "--data", "world", "--batches", "1", "--calibration", str(cal), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(calls) == 2  # the report's merge (α = 0.5) and the calibrated α = 0.75; α = 0.5 not again
    mine = next(o for o in out["advice"]["options"] if o["params"] == {"alpha": 0.5})
    assert mine["values"]["drift"] == out["global"]["drift"] > 0


def test_the_reports_drift_describes_its_own_merge_only() -> None:
    """``drift`` in a report is that of the report's merge (--method / --alpha): another calibrated merge's
    estimate must not read it (it would predict α = 0.75's drop from α = 0.5's drift)."""
    rng = np.random.default_rng(0)
    pts = []
    for g in range(6):
        for alpha in (0.5, 0.75):
            d, t = float(rng.uniform(0, 0.2)), float(rng.uniform(0, 0.1))
            pts.append(calibration_point({"drift": d, "tssd": t}, "interpolation", {"alpha": alpha}, 2 + 30 * d,
                                         group=f"run={g}"))
    report = {"method": "interpolation", "params": {"alpha": 0.5}, "global": {"drift": 0.1, "tssd": 0.05}}
    by = {o["params"]["alpha"]: o for o in recommend(report, pts)["options"]}
    assert by[0.5]["feature"] == "drift" and by[0.5]["drop"] == pytest.approx(5.0, abs=0.1)
    assert by[0.75]["feature"] == "tssd" and by[0.75]["from"] == "own"


def test_merge_drift_is_the_reports_drift_of_the_same_merge(tmp_path) -> None:
    from vlmerge.metrics.predict import state_merge_features

    ck = _ckpt(tmp_path, layers=(0, 1))
    batches = _batches()
    rep = layer_report(ck, batches=batches, params={"alpha": 0.3})
    feats = state_merge_features(ck, None, batches)("interpolation", {"alpha": 0.3})
    assert feats["out_drift"] == pytest.approx(rep["global"]["out_drift"], rel=1e-9) and feats["out_drift"] > 0
    assert feats["drift"] == pytest.approx(rep["global"]["drift"], rel=1e-9)
    with pytest.raises(ValueError, match="regmean"):
        state_merge_features(ck, None, batches)("regmean", {"gamma": 0.5})
