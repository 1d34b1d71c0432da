"""The study end to end on the micro preset, shrunk further: every part runs on real pre-training, merging,
fine-tuning and evaluation; the report, JSON and plots hold finite numbers; a re-run after a kill recomputes
only the cells that had not finished."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmerge.cli import main
from vlmerge.study.runner import PARTS, load_study_config, run_study
from vlmerge.study.stats import aggregate_seeds as aggregate

# micro (2 layers, width 32, 16-px images) with K = 40 steps and fine-tunes of 4 steps: about a minute.
SHRINK = ["steps=40", "eval_images=20", "regmean_batches=1", "layerwise.steps=5",
          "pretrain_set=[train.log_every=20, train.ckpt_every=40,"
          " data.train_images=100, data.eval_images=10, optim.warmup_steps=4]",
          *[f"finetune_set.{t}=[max_steps=4, data.train_size=40, data.eval_size=20]"
            for t in ("vqa", "nlvr2", "cls", "seg")]]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "micro"
    run_study("micro", out, overrides=SHRINK, progress=False)
    return out


def numbers(x: Any) -> Iterator[float]:
    if isinstance(x, dict):
        for v in x.values():
            yield from numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield float(x)


def test_report_json_and_plots_hold_finite_numbers_from_real_runs(study: Path) -> None:
    res = json.loads((study / "results.json").read_text())
    assert set(PARTS) <= set(res)
    tables = {k: res[k] for k in PARTS}
    values = list(numbers(tables))
    assert len(values) > 120 and all(math.isfinite(v) for v in values)
    assert set(res["table1"]) == {"maa", "msa", "merging_baseline"} and "vqa" in res["table1"]["msa"]
    assert res["figure3"]["k_seed"] == [0, 10, 20, 30]
    assert {len(v) for v in res["table2"].values()} == {5}
    assert set(res["figure4"]) == {"msa", "custom-attn", "custom-ffn", "custom-ln", "maa"}
    assert set(res["table3"]["ours"]) >= {"avg_tr", "avg_ir", "ood_avg_tr", "ood_avg_ir", "nlvr2", "cls", "seg"}
    # every score carries its 95 % bootstrap interval, and the interval holds the point estimate
    for row in (res["table1"]["msa"], res["table3"]["ours"], res["figure3"]["after"][0]):
        for key, (lo, hi) in row["ci"].items():
            assert lo <= row[key] <= hi, (key, lo, row[key], hi)
    assert set(res["table1"]["msa"]["ci"]) >= {"avg_tr", "avg_ir", "r_mean", "vqa"}
    assert res["baselines"]["retrieval"]["r_mean"] > 0 and res["meta"]["cpu"]
    # Real computation: the vision and language weights drift apart during VL pre-training from their tied
    # start, so the shorter the VL stage (the longer K_seed), the smaller the L2 distance (Table 5).
    l2 = res["table5"]["metrics"]["l2"]
    assert l2[0] > l2[1] > l2[2] > l2[3] > 0
    # the merge moved the weights: α = 0 (language copy) and α = 1 (vision copy) score differently
    interp = res["table2"]["interpolation"]
    assert interp["0.0"] != interp["1.0"]
    # the MAA has nothing to merge: "after" is "before"
    assert res["figure4"]["maa"]["before"] == res["figure4"]["maa"]["after"]
    drop = [b["r_mean"] - a["r_mean"] for b, a in zip(res["figure3"]["before"], res["figure3"]["after"], strict=True)]
    assert res["table5"]["drop"] == pytest.approx(drop)
    assert set(res["table5"]["pearson_ci"]) == {"l2", "cosine", "ssd", "tssd"}
    assert res["meta"]["command"].startswith("vlmerge study --preset micro --out ")
    meta = res["meta"]
    assert meta["cells_computed"] == meta["cells_total"] == len({c["hash"] for c in res["cells"].values()})
    recorded = [json.loads(p.read_text())["seconds"] for p in (study / "cells").glob("*/result.json")]
    assert meta["cell_seconds"] == pytest.approx(sum(recorded))

    report = (study / "report.md").read_text()
    for title in ("## Findings", "## Table 1", "## Figure 3", "## Table 2", "## Figure 4", "## Table 3", "## Table 5",
                  "## Table 2, layer-wise", "## Partial merges", "## Configuration", "## Provenance"):
        assert title in report
    findings = json.loads((study / "findings.json").read_text())
    assert len(findings) >= 10 and {f["outcome"] for f in findings} <= {"reproduced", "contradicted", "inconclusive"}
    assert sum(report.count(f"{o} |") for o in ("✅ reproduced", "❌ contradicted", "➖ inconclusive")) == len(findings)
    assert all(f["interval"] is not None for f in findings if f["id"] != "tssd_predicts_best")
    for png in ("figure3.png", "table2.png", "figure4.png", "table5.png", "pareto.png"):
        data = (study / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in report


def test_layerwise_rows_compare_learned_alpha_with_the_best_global_alpha_of_the_same_grid(study: Path) -> None:
    from vlmerge.models import load_model

    res = json.loads((study / "results.json").read_text())
    lw = res["layerwise"]
    # the recipe's global grid is Table 2's interpolation row: the same cells, so the same numbers
    assert {a: s["r_mean"] for a, s in lw["recipe"]["global"].items()} == {
        a: s["r_mean"] for a, s in res["table2"]["interpolation"].items()}
    for src in ("recipe", "msa"):
        r = lw[src]
        best = max(r["global"], key=lambda a: r["global"][a]["r_mean"])
        assert r["best_global"] == best
        assert set(r["learned"]) == {"supervised", "entropy"}
        for objective, sc in r["learned"].items():
            d = r["vs_best_global"][objective]
            assert d["r_mean"] == pytest.approx(sc["r_mean"] - r["global"][best]["r_mean"])
            assert d["ci"]["r_mean"][0] <= d["r_mean"] <= d["ci"]["r_mean"][1]
            assert len(r["schedules"][objective]) == 2 and all(0 < a < 1 for a in r["schedules"][objective])
    # the learned merge was written with its schedule: the merged weights are α_i W^v + (1 − α_i) W^l
    sched = lw["recipe"]["schedules"]["supervised"]
    cell = next(d for d in (study / "cells").glob("merge-*")
                if json.loads((d / "result.json").read_text())["spec"]["params"].get("alpha") == sched)
    src = json.loads((cell / "result.json").read_text())["spec"]["src"]
    sd, merged = load_model(study / src).state_dict(), load_model(cell / "merged").state_dict()
    k = "blocks.1.mlp.v.fc1.weight"
    want = sched[1] * sd[k] + (1 - sched[1]) * sd[k.replace(".v.", ".l.")]
    if k.replace(".v.", ".vl.") in sd:
        want = (2 / 3) * want + (1 / 3) * sd[k.replace(".v.", ".vl.")]
    torch.testing.assert_close(merged[k.replace(".v.", ".shared.")], want, rtol=0, atol=1e-5)


def test_layerwise_and_pareto_results_aggregate_over_seeds_and_render() -> None:
    """Two seeds whose best global α differ: the report names seed 0's, Δ is the mean of each seed's own."""
    import numpy as np

    from vlmerge.study.report import render_markdown
    from vlmerge.study.runner import average_scores, difference
    from vlmerge.study.stats import Scores, with_intervals

    def sc(x: float, seed: int) -> Scores:
        boot = x + np.random.default_rng(seed).normal(0, 1, 1000)
        return Scores({"r_mean": x}, {"r_mean": boot})

    def one(seed: int, best: str) -> dict:
        grid = {a: sc(40 + 5 * (a == best), seed) for a in ("0.25", "0.5", "0.75")}
        learned = sc(50 + seed, seed)
        pts = [{"keep": k, "params": 10 + len(k), "scores": sc(30 + len(k), seed)} for k in ("", "0", "1", "0,1")]
        rows = [{"k": k, "n_random": len(ps), "random": average_scores([p["scores"] for p in ps]),
                 "predictor": ps[0], "depth": ps[-1],
                 "predictor_vs_random": difference(ps[0]["scores"], average_scores([p["scores"] for p in ps])),
                 "depth_vs_random": difference(ps[-1]["scores"], average_scores([p["scores"] for p in ps]))}
                for k, ps in ((0, pts[:1]), (1, pts[1:3]), (2, pts[3:]))]
        return {"layerwise": {"recipe": {"global": grid, "best_global": best, "learned": {"supervised": learned},
                                         "schedules": {"supervised": [0.2 + seed, 0.4]},
                                         "vs_best_global": {"supervised": difference(learned, grid[best])}}},
                "pareto": {"msa": {"layers": [0, 1], "exhaustive": True, "points": pts, "by_k": rows}}}

    res = aggregate([one(0, "0.5"), one(1, "0.75")])
    r = res["layerwise"]["recipe"]
    assert r["best_global"] == "0.5" and r["vs_best_global"]["supervised"]["r_mean"] == pytest.approx(5.5)
    assert res["pareto"]["msa"]["by_k"][1]["predictor"]["keep"] == "0"
    md = render_markdown(with_intervals({**res, "meta": {"seeds": [0, 1]}}), [])
    assert "| best global α | 0.5 | 42.50" in md and "layer-wise α (supervised) | [0.70, 0.40]" in md
    assert "| 1 | 11 |" in md and "one choice" in md


def test_pareto_enumerates_every_kept_layer_set_and_scores_the_predictors_choice(study: Path) -> None:
    from vlmerge.metrics.predict import layer_report

    res = json.loads((study / "results.json").read_text())
    f3 = res["figure3"]
    for src, pr in res["pareto"].items():
        n = len(pr["layers"])
        assert pr["exhaustive"] and len(pr["points"]) == 2**n and [r["k"] for r in pr["by_k"]] == list(range(n + 1))
        by_keep = {p["keep"]: p for p in pr["points"]}
        assert len(by_keep) == 2**n
        # keeping nothing is the full merge, keeping every layer is the source itself
        if src == "msa":
            assert by_keep[""]["scores"]["r_mean"] == pytest.approx(f3["after"][0]["r_mean"])
            assert by_keep["0,1"]["scores"]["r_mean"] == pytest.approx(f3["before"][0]["r_mean"])
        # a kept layer keeps its copies: more parameters the more layers are kept
        size = {p["keep"]: len([x for x in p["keep"].split(",") if x]) for p in pr["points"]}
        params = [min(p["params"] for p in pr["points"] if size[p["keep"]] == k) for k in (1, 2)]
        assert by_keep[""]["params"] < params[0] < params[1]
        for r in pr["by_k"]:
            sets = [p for p in pr["points"] if size[p["keep"]] == r["k"]]
            assert r["n_random"] == len(sets) == math.comb(n, r["k"])
            assert r["random"]["r_mean"] == pytest.approx(sum(p["scores"]["r_mean"] for p in sets) / len(sets))
            d = r["predictor_vs_random"]
            assert d["r_mean"] == pytest.approx(r["predictor"]["scores"]["r_mean"] - r["random"]["r_mean"])
            assert r["depth"]["keep"] == ",".join(map(str, pr["layers"][n - r["k"]:]))
        # the predictor's choice is the k riskiest layers of vlmerge predict's ranking of the source
        label = {"msa": "msa/kseed=0", "recipe": f"msa/kseed={round(res['meta']['config']['recipe_k_seed'] * 40)}"}
        cell = res["cells"][f"seed=0/pretrain/{label[src]}"]
        ranked = layer_report(study / "cells" / f"pretrain-{cell['hash']}" / "run" / "final")["ranked"]
        for r in pr["by_k"]:
            assert r["predictor"]["keep"] == ",".join(map(str, sorted(ranked[: r["k"]])))


def test_every_evaluated_merge_is_a_calibration_point_and_the_predictor_is_reported(study: Path) -> None:
    """Runs before the re-run test below, whose ``--only table2`` run rewrites results.json and the calibration
    file with that run's merges only."""
    from vlmerge.metrics.predict import (
        CALIBRATION_NAME,
        MERGE_DEPENDENT,
        MERGE_FEATURES,
        layer_report,
        load_calibration,
    )

    res = json.loads((study / "results.json").read_text())
    points = load_calibration(study / CALIBRATION_NAME)
    base = {"alpha": res["meta"]["config"]["baseline_alpha"]}
    # Figure 3's merges are among them, with its drops (from the report's own before / after scores)
    f3 = [p for p in points if p["method"] == "interpolation" and p["params"] == base
          and p["group"].startswith("msa/kseed=")]
    want = {f"msa/kseed={k}": b["r_mean"] - a["r_mean"] for k, b, a in
            zip(res["figure3"]["k_seed"], res["figure3"]["before"], res["figure3"]["after"], strict=True)}
    assert {p["group"]: p["drop"] for p in f3} == pytest.approx(want)
    assert all(p["drop_ci"][0] <= p["drop"] <= p["drop_ci"][1] for p in points)
    table2 = sum(len(v) for v in res["table2"].values())
    assert len(points) >= table2 + len(res["figure3"]["k_seed"])
    # the features are the source checkpoint's, as vlmerge predict computes them
    ck = next(p for p in points if p["group"] == "msa/kseed=0")
    pr = res["predictor"]
    assert pr["method"] == "interpolation" and pr["params"] == base
    report = (study / "report.md").read_text()
    assert "## Predicting the drop before merging" in report
    if "error" not in pr:
        assert pr["n"] == len([p for p in points if p["method"] == "interpolation" and p["params"] == base])
        assert set(pr["per_feature"]) >= {"l2", "cosine", "ssd", "tssd", "rel_l2"}
        assert -1 <= pr["loo_r"] <= 1 and f"Chosen: **{pr['feature']}**" in report
    # pooled over every merge (methods and coefficients), which the merge's own features make possible
    pooled = res["predictor_pooled"]
    assert pooled["method"] is None and "**Pooled over every merge**" in report
    assert pooled["n"] == len(points) and {"interpolation", "regmean"} <= set(pooled["methods"])
    assert "merge_rel_v + merge_rel_l" in pooled["per_feature"] and -1 <= pooled["loo_r"] <= 1
    assert all({*MERGE_FEATURES, "drift", "out_drift"} <= set(p["features"]) for p in points)
    grids: dict[str, dict[float, dict]] = {}
    for p in points:
        if p["method"] == "interpolation" and not isinstance(p["params"]["alpha"], list):  # not learned
            grids.setdefault(p["group"], {})[p["params"]["alpha"]] = p["features"]
    alphas = max(grids.values(), key=len)  # Table 2's α grid
    assert len(alphas) >= 3
    # interpolation moves the vision copy by (1 − α)·‖W^v − W^l‖ and the language copy by α·‖W^v − W^l‖
    # (in the layers below the VL ones, which is most of the weights): the order follows α
    order = sorted(alphas)
    assert [alphas[a]["merge_rel_v"] for a in order] == sorted((alphas[a]["merge_rel_v"] for a in order),
                                                                 reverse=True)
    assert [alphas[a]["merge_rel_l"] for a in order] == sorted(alphas[a]["merge_rel_l"] for a in order)
    finals = [f for d in (study / "cells").glob("pretrain-*") if (f := d / "run" / "final").is_dir()
              and json.loads((f / "config.json").read_text())["model"]["arch"] != "maa"]
    own = {k: v for k, v in ck["features"].items() if k not in MERGE_DEPENDENT}
    assert any(layer_report(f)["global"] == pytest.approx(own) for f in finals)


def test_rerun_after_a_kill_recomputes_only_unfinished_cells(study: Path, capsys: pytest.CaptureFixture) -> None:
    res = json.loads((study / "results.json").read_text())
    results = sorted((study / "cells").glob("*/result.json"))
    # a kill while a merge cell ran: its result was never written (results are written last, atomically)
    victim = next(p for p in results if p.parent.name.startswith("merge-")
                  and json.loads(p.read_text())["spec"]["method"] == "regmean")
    victim.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in results if p != victim}
    sets = [a for s in SHRINK for a in ("--set", s)]
    assert main(["study", "--preset", "micro", "--out", str(study), "--only", "table2", "--no-progress", *sets]) == 0
    assert capsys.readouterr().out.strip() == str(study / "report.md")
    again = json.loads((study / "results.json").read_text())
    assert again["meta"]["cells_computed"] == 1 and victim.is_file()
    # a mostly cached run says so beside its wall time, with the cells' own compute time
    assert f"1 of {again['meta']['cells_total']} cells computed in it" in (study / "report.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["table2"] == res["table2"]  # the recomputed merge gives the same numbers (determinism)
    assert set(again) - {"meta", "cells", "baselines", "predictor", "predictor_pooled"} == {"table2"}


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="k_seed"):
        load_study_config("micro", ["k_seed=[0.25, 0.5]"])
    with pytest.raises(ValueError, match="steps"):
        load_study_config("micro", ["steps=0"])
    with pytest.raises(ValueError, match="stepz"):
        load_study_config("micro", ["stepz=3"])
    with pytest.raises(FileNotFoundError, match="nosuch"):
        load_study_config("nosuch")
    with pytest.raises(ValueError, match="--only: unknown parts \\['table9'\\]"):
        run_study("micro", tmp_path, only=["table9"])
    assert main(["study", "--preset", "micro", "--out", str(tmp_path), "--seeds", "0,x"]) == 2


def test_seeds_aggregate_to_mean_and_sample_std() -> None:
    import numpy as np

    from vlmerge.study.stats import Scores

    def sc(tr: float, ir: float, shift: float) -> Scores:
        return Scores({"avg_tr": tr, "avg_ir": ir}, {"avg_tr": np.arange(4.0) + shift, "avg_ir": np.zeros(4)})

    a = {"table1": {"msa": sc(10.0, 20.0, 0.0)}, "figure3": {"k_seed": [0, 5], "before": [sc(1.0, 1.0, 2.0)]}}
    b = {"table1": {"msa": sc(14.0, 20.0, 2.0)}, "figure3": {"k_seed": [0, 5], "before": [sc(3.0, 1.0, 4.0)]}}
    m = aggregate([a, b])
    msa = m["table1"]["msa"]
    assert msa["avg_tr"] == 12.0 and msa["avg_tr_std"] == pytest.approx(math.sqrt(8)) and msa["avg_ir_std"] == 0.0
    # replicate b: the mean of replicate b of two seeds drawn with replacement (seed draws shared by all scores)
    from vlmerge.study.stats import seed_draws

    draws = seed_draws(2)[:4]
    per = np.stack([np.arange(4.0), np.arange(4.0) + 2.0], axis=1)
    assert msa.boot["avg_tr"].tolist() == per[np.arange(4)[:, None], draws].mean(axis=1).tolist()
    assert m["figure3"]["k_seed"] == [0, 5] and m["figure3"]["before"][0]["avg_tr"] == 2.0


@pytest.mark.parametrize("preset", ["micro", "tiny", "small", "paper"])
def test_every_preset_and_its_pretraining_config_validate(preset: str) -> None:
    from vlmerge.finetune.config import resolve_config
    from vlmerge.pretrain import validate_config
    from vlmerge.study.runner import base_pretrain_config

    cfg = load_study_config(preset)
    base = base_pretrain_config(cfg)
    assert base.train.steps == cfg.steps
    seed_steps = max(1, round(max(cfg.k_seed) * cfg.steps))  # the longest seed recipe must validate too
    validate_config({**base.to_dict(), "recipe": {"name": "seed", "seed_steps": seed_steps}})
    for task in ["vqa", "nlvr2", "cls", "seg"]:
        ft = resolve_config(task, cfg.finetune, sets=cfg.finetune_set.get(task, []))
        assert ft.task == task


def test_a_shared_seed_stage_gives_the_same_weights_as_the_architectures_own_seed_run(tmp_path: Path) -> None:
    """The study runs each K_seed's MAA seed stage once and expands it into every architecture."""
    from safetensors.torch import load_file

    from vlmerge.pretrain import load_config, pretrain
    from vlmerge.study.runner import start_from_checkpoint

    sets = ["model.preset=micro", "recipe={name: seed, seed_steps: 3}", "train.steps=6", "train.batch_size=8",
            "data.train_images=12", "data.eval_images=4", "train.device=cpu", "optim.warmup_steps=1"]
    direct = pretrain(load_config(None, [*sets, "model.arch=custom-ln"]), tmp_path / "direct", progress=False)
    seed = pretrain(load_config(None, [*sets, "model.arch=msa"]), tmp_path / "seed", stop_after=3, progress=False)
    start_from_checkpoint(seed, tmp_path / "shared")
    shared = pretrain(load_config(None, [*sets, "model.arch=custom-ln"]), tmp_path / "shared", progress=False)
    a, b = load_file(str(direct / "model.safetensors")), load_file(str(shared / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w0a, w0b = load_file(str(direct.parent / "w0" / "model.safetensors")), load_file(str(shared.parent / "w0" /
                                                                                          "model.safetensors"))
    assert all(torch.equal(w0a[k], w0b[k]) for k in w0a)


def test_the_maa_run_passes_through_every_seed_stage(tmp_path: Path) -> None:
    """With a wsd schedule a K_seed-step seed stage is the MAA trained from scratch up to the start of its decay
    (same init, data, draws and learning rates), then its own decay: resumed from the MAA's checkpoint there
    (the study's MAA run), the seed recipe ends with the weights of the seed recipe run on its own."""
    from safetensors.torch import load_file

    from vlmerge.pretrain import load_config, pretrain
    from vlmerge.pretrain.optim import wsd_decay_steps
    from vlmerge.study.runner import start_from_checkpoint

    sets = ["model.preset=micro", "train.steps=8", "train.batch_size=8", "data.train_images=12",
            "data.eval_images=4", "train.device=cpu", "optim.warmup_steps=1", "optim.schedule=wsd",
            "optim.decay_frac=0.25"]
    seed = [*sets, "model.arch=custom-ln", "recipe={name: seed, seed_steps: 4}"]
    branch = 4 - wsd_decay_steps(4, 0.25)
    assert branch == 3
    direct = pretrain(load_config(None, seed), tmp_path / "direct", progress=False)
    maa = pretrain(load_config(None, [*sets, "model.arch=maa"]), tmp_path / "maa", stop_after=branch, progress=False)
    start_from_checkpoint(maa, tmp_path / "shared")
    shared = pretrain(load_config(None, seed), tmp_path / "shared", progress=False)
    a, b = load_file(str(direct / "model.safetensors")), load_file(str(shared / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the MAA run goes on to its own end, unchanged by the stop
    whole = pretrain(load_config(None, [*sets, "model.arch=maa"]), tmp_path / "maa-whole", progress=False)
    resumed = pretrain(load_config(None, [*sets, "model.arch=maa"]), tmp_path / "maa", progress=False)
    c, d = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(c[k], d[k]) for k in c)
