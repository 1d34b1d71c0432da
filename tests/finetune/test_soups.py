"""Soups and recipes of task-fine-tuned models (UnIVAL §5): interpolation, uniform soups, Fusing, Ratatouille,
coefficient search, task-vector merges, and the refusal of incompatible inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmerge.data import default_tokenizer
from vlmerge.finetune import finetune, soups
from vlmerge.finetune.unified import evaluate_unified, materialize, unified_dataset, unified_record
from vlmerge.models import VLMo, load_model, preset_config, save_model


def _state(seed: int, keys: tuple[str, ...] = ("a", "b")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 4, generator=g) for k in keys}


@pytest.fixture(scope="module")
def picos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three pico unified checkpoints with different random weights (same architecture and answer space)."""
    tok = default_tokenizer()
    root = tmp_path_factory.mktemp("picos")
    out = []
    for i in range(3):
        torch.manual_seed(i)
        m = VLMo(preset_config("micro", image_size=16, heads=("itc", "itm", "mlm"), vocab_size=tok.vocab_size,
                               num_vl_layers=2))
        out.append(save_model(m, root / f"m{i}", tokenizer=tok.to_config(), unified=unified_record(tok)))
    return out


def test_interpolation_endpoints_are_exact_and_lambda_range_checked() -> None:
    w1, w2 = _state(1), _state(2)
    for k in w1:
        assert torch.equal(soups.interpolate(w1, w2, 1.0)[k], w1[k])
        assert torch.equal(soups.interpolate(w1, w2, 0.0)[k], w2[k])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"allowed range: \[0, 1\]"):
            soups.interpolate(w1, w2, bad)


def test_interpolation_at_interior_lambda_matches_the_formula() -> None:
    """W = λ·W₁ + (1 − λ)·W₂ away from the endpoints (where ``interpolate`` returns copies without merging):
    the oracle is written out entry by entry from plain numbers; λ ≠ 0.5 tells W₁'s weight from W₂'s."""
    a = [[1.0, -2.0, 4.0], [0.5, 8.0, -16.0]]
    b = [[-3.0, 6.0, 0.0], [2.5, -8.0, 32.0]]
    w1 = {"w": torch.tensor(a), "v": torch.tensor(a[0])}
    w2 = {"w": torch.tensor(b), "v": torch.tensor(b[0])}
    for lam in (0.3, 0.25, 0.8):
        out = soups.interpolate(w1, w2, lam)
        want = torch.tensor([[lam * x + (1 - lam) * y for x, y in zip(ra, rb, strict=True)]
                             for ra, rb in zip(a, b, strict=True)])
        assert torch.allclose(out["w"], want, rtol=0, atol=1e-5), (lam, out["w"], want)
        assert torch.allclose(out["v"], want[0], rtol=0, atol=1e-5), lam
    assert torch.equal(soups.interpolate(w1, w2, 0.25)["w"][0], torch.tensor([-2.0, 4.0, 1.0]))  # exact here


def test_interpolated_models_reproduce_evaluations(picos: list[Path]) -> None:
    a, b = load_model(picos[0]), load_model(picos[1])
    sa, sb = a.state_dict(), b.state_dict()
    items = materialize(unified_dataset("vqa", "val", 4, image_size=16))
    for lam, ref in ((1.0, a), (0.0, b)):
        m = load_model(picos[0])
        m.load_state_dict(soups.interpolate(sa, sb, lam))
        assert evaluate_unified(m, "vqa", items) == evaluate_unified(ref, "vqa", items)
    # an interior λ: every float weight is λ·W_a + (1 − λ)·W_b (the oracle computed here), and the merged
    # model scores as the model holding the oracle's weights does
    lam = 0.3
    merged = soups.interpolate(sa, sb, lam)
    oracle = {k: lam * sa[k] + (1 - lam) * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa}
    assert merged.keys() == oracle.keys()
    for k in sa:
        assert torch.allclose(merged[k], oracle[k], rtol=1e-6, atol=1e-6), k
    assert any(not torch.allclose(merged[k], sa[k]) for k in sa) and any(not torch.allclose(merged[k], sb[k])
                                                                         for k in sa)
    m, ref = load_model(picos[0]), load_model(picos[0])
    m.load_state_dict(merged)
    ref.load_state_dict(oracle)
    assert evaluate_unified(m, "vqa", items) == evaluate_unified(ref, "vqa", items)


def test_soup_of_identical_models_is_that_model(picos: list[Path]) -> None:
    s = soups.load_state(picos[0])
    out = soups.soup([s, s, s])
    assert all(torch.allclose(out[k], s[k], rtol=0, atol=1e-6) for k in s)
    m = load_model(picos[0])
    m.load_state_dict(out)
    items = materialize(unified_dataset("cls", "val", 8, image_size=16))
    assert evaluate_unified(m, "cls", items)["score"] == evaluate_unified(load_model(picos[0]), "cls", items)["score"]


def test_soup_weights_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        soups.soup([_state(1), _state(2)], weights=[0.5, 0.6])
    with pytest.raises(ValueError, match=r"weights\[0\]=1.5.*\[0, 1\]"):
        soups.soup([_state(1), _state(2)], weights=[1.5, -0.5])
    out = soups.soup([_state(1), _state(2)], weights=[0.25, 0.75])
    assert torch.allclose(out["a"], 0.25 * _state(1)["a"] + 0.75 * _state(2)["a"], atol=1e-6)


def test_mismatched_keys_shapes_and_answers_are_named() -> None:
    with pytest.raises(ValueError, match=r"c \(missing in model 1\)"):
        soups.soup([_state(1, ("a", "c")), _state(2, ("a", "b"))])
    bad = {"a": torch.zeros(3, 4), "b": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"b \(W2: \[2, 2\] vs W1: \[3, 4\]\)"):
        soups.interpolate(_state(1), bad, 0.5)
    rec = unified_record(default_tokenizer())
    other = json.loads(json.dumps(rec))
    other["answers"]["nlvr2"] = ["yes", "no"]
    with pytest.raises(ValueError, match=r"tasks \['nlvr2'\]"):
        soups.check_records([{"unified": rec}, {"unified": other}], ["m0", "m1"])
    with pytest.raises(ValueError, match="unified and task-head"):
        soups.check_records([{"unified": rec}, {}], ["m0", "m1"])


def test_merge_task_models_refuses_before_writing(picos: list[Path], tmp_path: Path) -> None:
    cfg = json.loads((picos[1] / "config.json").read_text())
    cfg["unified"]["answers"]["cls"] = ["a", "b"]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    (odd / "model.safetensors").write_bytes((picos[1] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"\['cls'\]"):
        soups.merge_task_models("average", [picos[0], odd], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = soups.merge_task_models("average", picos[:2], tmp_path / "ok")
    s0, s1, m = soups.load_state(picos[0]), soups.load_state(picos[1]), soups.load_state(out)
    assert all(torch.allclose(m[k], (s0[k] + s1[k]) / 2, atol=1e-6) for k in m)


def test_fusing_initialises_from_the_average_of_auxiliary_weights(picos: list[Path], tmp_path: Path) -> None:
    seen: dict[str, Path] = {}

    def fake_finetune(task: str, init: Path, out: Path) -> Path:
        seen["init"] = init
        return init

    soups.fusing("vqa", picos, tmp_path / "fus", fake_finetune)
    init = soups.load_state(seen["init"])
    aux = [soups.load_state(p) for p in picos]
    for k in init:
        assert torch.allclose(init[k], sum(a[k] for a in aux) / 3, atol=1e-6), k


def test_ratatouille_averages_the_re_finetuned_weights(picos: list[Path], tmp_path: Path) -> None:
    items = materialize(unified_dataset("cls", "train", 16, image_size=16))

    def ft(task: str, init: Path, out: Path) -> Path:
        return finetune(task, init, out, preset="micro", train_data=items, eval_data=items[:4],
                        sets=["head=unified", "max_steps=2", "lr=1e-2", "batch_size=8", "device=cpu"])

    model, tuned = soups.ratatouille("cls", picos[:2], tmp_path / "rat", ft)
    avg = soups.load_state(model)
    re = [soups.load_state(t) for t in tuned]
    aux = [soups.load_state(p) for p in picos[:2]]
    for k in avg:
        assert torch.allclose(avg[k], (re[0][k] + re[1][k]) / 2, atol=1e-6), k
    moved = [k for k in avg if not torch.allclose(avg[k], (aux[0][k] + aux[1][k]) / 2, atol=1e-6)]
    assert moved  # the average is over the re-fine-tuned weights, not the auxiliary ones


def test_greedy_soup_picks_the_expected_set() -> None:
    table = {("a",): 50.0, ("b",): 60.0, ("c",): 40.0, ("a", "b"): 65.0, ("a", "b", "c"): 64.0}
    res = soups.greedy_soup(["a", "b", "c"], lambda m: table[tuple(sorted(m))])
    assert res["members"] == ["b", "a"] and res["score"] == 65.0 and not res["collapsed"]
    assert [h["added"] for h in res["history"]] == [True, True, False]
    collapse = {("a",): 50.0, ("b",): 60.0, ("a", "b"): 60.0}
    res = soups.greedy_soup(["a", "b"], lambda m: collapse[tuple(sorted(m))])
    assert res["members"] == ["b"] and res["collapsed"]  # equal is not an improvement


def test_grid_search_picks_the_best_lambda() -> None:
    res = soups.grid_search(lambda lam: -(lam - 0.3) ** 2, [0.0, 0.1, 0.3, 0.5, 1.0])
    assert res["best"] == 0.3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soups.grid_search(lambda lam: lam, [0.5, 2.0])


def _ties_oracle(base: list[float], taus: list[list[float]], density: float, lam: float,
                 weights: list[float] | None = None) -> list[float]:
    """TIES (Yadav et al. 2023) written out entry by entry: keep each task vector's top ``density`` share by
    magnitude, elect each entry's sign by the (weighted) sum of the kept values, average the kept values of
    that sign (weighted), W = W0 + λ·merged. Inputs must have distinct magnitudes (no trimming ties)."""
    n, w = len(base), weights or [1.0] * len(taus)
    k = max(1, int(density * n))
    trimmed = []
    for t in taus:
        top = set(sorted(range(n), key=lambda i: -abs(t[i]))[:k])
        trimmed.append([t[i] if i in top else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        total = sum(wi * t[i] for wi, t in zip(w, trimmed, strict=True))
        sign = (total > 0) - (total < 0)
        agree = [(wi, t[i]) for wi, t in zip(w, trimmed, strict=True) if t[i] != 0 and (t[i] > 0) - (t[i] < 0) == sign]
        merged = sum(wi * v for wi, v in agree) / sum(wi for wi, _ in agree) if agree else 0.0
        out.append(base[i] + lam * merged)
    return out


# Task vectors with distinct magnitudes (no trimming ties) and dyadic values, so W_m − W0 is exact in float32.
TIES_BASE = [0.5, -1.0, 2.0, 0.0, 1.25, -0.5, 3.0, -2.0]
TIES_TAUS = [[4.0, -3.0, 2.0, 0.5, -1.0, 6.0, 0.25, -0.75],
             [-1.0, -2.0, -5.0, 3.0, 0.5, 4.0, -0.25, 7.0],
             [-2.5, 1.5, 1.0, -0.5, 3.5, -8.0, 0.125, -6.0]]


def test_ties_matches_the_papers_definition() -> None:
    base = {"w": torch.tensor(TIES_BASE).reshape(2, 4)}
    states = [{"w": torch.tensor([b + t for b, t in zip(TIES_BASE, tau, strict=True)]).reshape(2, 4)}
              for tau in TIES_TAUS]
    cases = [(0.5, 0.6, None), (1.0, 0.6, None), (0.5, 1.0, [1.0, 1.0, 3.0])]
    for density, lam, weights in cases:
        want = torch.tensor(_ties_oracle(TIES_BASE, TIES_TAUS, density, lam, weights)).reshape(2, 4)
        kw = {"weights": weights} if weights else {}
        got = soups.task_vector_merge("ties", states, base, density=density, lam=lam, **kw)["w"]
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (density, lam, weights, got, want)
    # the cases exercise trimming, the election and the disjoint mean: hand-checked values of the first one
    # (entry 5: 6 + 4 − 8 > 0 elects +, the mean of 6 and 4; entry 6: nothing survives the trim)
    merged = (soups.task_vector_merge("ties", states, base, density=0.5, lam=1.0)["w"] - base["w"]).reshape(-1)
    assert merged.tolist() == [4.0, -3.0, -5.0, 3.0, 3.5, 5.0, 0.0, 7.0]
    weighted = (soups.task_vector_merge("ties", states, base, density=0.5, lam=1.0, weights=[1.0, 1.0, 3.0])["w"]
                - base["w"]).reshape(-1)
    assert weighted.tolist()[0] == -2.5 and weighted.tolist()[5] == -8.0  # the weights flip the election


def test_task_vector_merges() -> None:
    base, w1, w2 = _state(0), _state(1), _state(2)
    t1, t2 = w1["a"] - base["a"], w2["a"] - base["a"]
    ta = soups.task_vector_merge("task_arithmetic", [w1, w2], base, lam=0.5)
    assert torch.allclose(ta["a"], base["a"] + 0.5 * (t1 + t2), atol=1e-6)
    # DARE without dropping is a linear combination of the task vectors: their mean (normalize, the default)
    # or their sum, scaled by λ
    dare = soups.task_vector_merge("dare", [w1, w2], base, drop=0.0, lam=0.7)
    assert torch.allclose(dare["a"], base["a"] + 0.7 * (t1 + t2) / 2, atol=1e-6)
    dare = soups.task_vector_merge("dare", [w1, w2], base, drop=0.0, lam=0.7, normalize=False)
    assert torch.allclose(dare["a"], base["a"] + 0.7 * (t1 + t2), atol=1e-6)
    with pytest.raises(ValueError, match="allowed values"):
        soups.task_vector_merge("magic", [w1, w2], base)


def test_dare_drops_a_share_p_and_rescales_the_kept_entries() -> None:
    """With drop p, each task vector entry is either dropped or kept as τ/(1 − p) (λ = 1, summed): the merged
    delta of every entry is one of 0, τ₁/(1 − p), τ₂/(1 − p), (τ₁ + τ₂)/(1 − p). |τ₁| ∈ [1, 2) and |τ₂| ∈ [10, 20)
    keep those four at least 1 apart, so each entry tells which inputs kept it."""
    g = torch.Generator().manual_seed(0)
    shape, p = (100, 100), 0.3

    def signed(lo: float, hi: float) -> torch.Tensor:
        mag = lo + (hi - lo) * torch.rand(shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) < 0.5, -mag, mag)

    base = {"a": 0.1 * torch.randn(shape, generator=g)}
    t1, t2 = signed(1.0, 2.0), signed(10.0, 20.0)
    states = [{"a": base["a"] + t1}, {"a": base["a"] + t2}]
    t1, t2 = states[0]["a"] - base["a"], states[1]["a"] - base["a"]  # the task vectors as float32 holds them
    out = soups.task_vector_merge("dare", states, base, drop=p, lam=1.0, normalize=False, seed=7)
    delta = out["a"] - base["a"]
    cands = torch.stack([torch.zeros(shape), t1, t2, t1 + t2]) / (1 - p)
    close = torch.isclose(delta[None], cands, rtol=1e-4, atol=1e-4)
    assert bool((close.sum(0) == 1).all()), "an entry is not a dropped / rescaled combination of the inputs"
    which = close.int().argmax(0)
    kept1, kept2 = (which == 1) | (which == 3), (which == 2) | (which == 3)
    n = delta.numel()
    for kept in (kept1, kept2):
        assert abs((n - int(kept.sum())) / n - p) < 0.03
    assert abs(int((~kept1 & ~kept2).sum()) / n - p * p) < 0.03  # the inputs draw their masks independently
    again = soups.task_vector_merge("dare", states, base, drop=p, lam=1.0, normalize=False, seed=7)
    assert torch.equal(again["a"], out["a"])
    other = soups.task_vector_merge("dare", states, base, drop=p, lam=1.0, normalize=False, seed=8)
    assert not torch.equal(other["a"], out["a"])


def test_task_head_mode_merges_backbone_and_keeps_heads() -> None:
    m1 = {"blocks.0.w": torch.ones(2), "heads.vqa.w": torch.full((3,), 5.0)}
    m2 = {"blocks.0.w": torch.zeros(2), "heads.cls.w": torch.full((4,), 7.0)}
    out = soups.merge_task_head_models(lambda s, k: soups.soup(s, keys=k), {"vqa": m1, "cls": m2})
    assert torch.equal(out["vqa"]["blocks.0.w"], torch.full((2,), 0.5))
    assert torch.equal(out["vqa"]["heads.vqa.w"], m1["heads.vqa.w"]) and "heads.cls.w" not in out["vqa"]
    assert torch.equal(out["cls"]["heads.cls.w"], m2["heads.cls.w"])


def test_task_head_checkpoints_average_their_shared_keys(tmp_path: Path) -> None:
    """Fusing / Ratatouille on task-head models average the backbone and the heads all of them have."""
    tok = default_tokenizer()
    dirs = []
    for i, head in enumerate(("vqa", "cls")):
        torch.manual_seed(i)
        m = VLMo(preset_config("micro", image_size=16, heads=("itc", "mlm", head), vocab_size=tok.vocab_size,
                               num_answers=5, num_classes=3))
        dirs.append(save_model(m, tmp_path / head, tokenizer=tok.to_config()))
    out = soups.average_checkpoints(dirs, tmp_path / "avg")
    avg, a, b = soups.load_state(out), soups.load_state(dirs[0]), soups.load_state(dirs[1])
    assert load_model(out).config.heads == ("itc", "mlm")
    assert set(avg) == {k for k in a if not k.startswith(("heads.vqa.", "heads.cls."))}
    assert all(torch.allclose(avg[k], (a[k] + b[k]) / 2, atol=1e-6) for k in avg)
    assert soups.check_checkpoints(dirs) == "task"
