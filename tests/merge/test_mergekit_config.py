"""mergekit-style YAML configs (``vlmerge merge CONFIG.yaml OUT_DIR``) on tiny Hugging-Face-style checkpoints.

Every expected value is written here from the method's formula (or by hand), never by calling the code under
test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlmerge.cli import main

Q = "encoder.layer.{}.attention.self.query.weight"
D = "encoder.layer.{}.output.dense.weight"
LN = "encoder.layer.{}.output.LayerNorm.weight"
EMB = "embeddings.word_embeddings.weight"
POOL = "pooler.dense.weight"
POS = "embeddings.position_ids"


def bert_sd(seed: int, n_layers: int = 3) -> dict[str, torch.Tensor]:
    """A BERT-shaped state dict: embeddings, ``n_layers`` layers (query, output dense, LayerNorm), pooler and
    an int64 buffer. The LayerNorm weights of all seeds are colinear (``(1 + seed) · 1``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {EMB: torch.randn(5, 3, generator=g), POOL: torch.randn(3, 3, generator=g),
          POS: torch.arange(4, dtype=torch.int64)[None]}
    for i in range(n_layers):
        sd[Q.format(i)] = torch.randn(3, 3, generator=g)
        sd[D.format(i)] = torch.randn(3, 3, generator=g)
        sd[LN.format(i)] = torch.full((3,), 1.0 + seed)
    return sd


def hf(root: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    """``root/name``: config.json + model.safetensors + tokenizer.json + vocab.txt (contents naming the model)."""
    d = root / name
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "name": name}))
    (d / "tokenizer.json").write_text(json.dumps({"model": name}))
    (d / "vocab.txt").write_text(f"[PAD]\n{name}\n")
    return d


@pytest.fixture()
def three(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    sds = [bert_sd(s) for s in range(3)]
    return [hf(tmp_path, n, sd) for n, sd in zip("abc", sds, strict=True)], sds


def write_cfg(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def merge(tmp_path: Path, cfg: dict[str, Any], out: str = "out") -> dict[str, torch.Tensor]:
    c = write_cfg(tmp_path / f"{out}.yaml", cfg)
    assert main(["merge", str(c), str(tmp_path / out)]) == 0
    return load_file(str(tmp_path / out / "model.safetensors"))


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *names: str) -> str:
    """The command exits 2 with one stderr line naming every one of ``names``."""
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def floats(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


# --------------------------------------------------------------------------------------------------- linear
def test_linear_weights_normalize_and_gradient(tmp_path: Path, three) -> None:
    (a, b, c), (A, B, C) = three
    models = [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 2.0}},
              {"model": str(c), "parameters": {"weight": 1.0}}]
    got = merge(tmp_path, {"merge_method": "linear", "models": models})
    for k in floats(A):
        torch.testing.assert_close(got[k], (A[k] + 2 * B[k] + C[k]) / 4, rtol=0, atol=1e-6)
    assert torch.equal(got[POS], A[POS])

    # normalize: false, and a gradient weight [0, 1] on c: layer i of 3 -> i / 2; non-layer tensors -> 0
    models[2]["parameters"]["weight"] = [0.0, 1.0]
    got = merge(tmp_path, {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}, "o2")
    for i, wc in enumerate((0.0, 0.5, 1.0)):
        for k in (Q.format(i), D.format(i)):
            torch.testing.assert_close(got[k], A[k] + 2 * B[k] + wc * C[k], rtol=0, atol=1e-6)
    for k in (EMB, POOL):
        torch.testing.assert_close(got[k], A[k] + 2 * B[k], rtol=0, atol=1e-6)


def test_global_weight_is_the_default_and_per_model_overrides(tmp_path: Path, three) -> None:
    (a, b, _), (A, B, _) = three
    got = merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0, "normalize": False},
                           "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 3.0}}]})
    torch.testing.assert_close(got[POOL], A[POOL] + 3 * B[POOL], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ task arithmetic
def test_task_arithmetic_lambda_and_normalize(tmp_path: Path, three) -> None:
    (a, b, c), (A, B, C) = three
    cfg: dict[str, Any] = {
        "merge_method": "task_arithmetic", "base_model": str(a),
        "models": [{"model": str(b), "parameters": {"weight": 0.5}}, {"model": str(c), "parameters": {"weight": 1.5}}],
        "parameters": {"lambda": 0.7},
    }
    got = merge(tmp_path, cfg)
    for k in floats(A):
        want = A[k] + 0.7 * (0.5 * (B[k] - A[k]) + 1.5 * (C[k] - A[k]))
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-5)
    cfg["parameters"]["normalize"] = True
    got = merge(tmp_path, cfg, "o2")
    for k in floats(A):
        want = A[k] + 0.7 * (0.5 * (B[k] - A[k]) + 1.5 * (C[k] - A[k])) / 2.0
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-5)


def test_base_listed_among_models_is_left_out(tmp_path: Path, three) -> None:
    (a, b, _), (A, B, _) = three
    got = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a), "parameters": {"weight": 2.0},
                           "models": [{"model": str(a)}, {"model": str(b)}]})
    torch.testing.assert_close(got[POOL], A[POOL] + 2 * (B[POOL] - A[POOL]), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- ties
TIES_KEY = "encoder.layer.0.attention.self.query.weight"


def ties_models(tmp_path: Path) -> list[Path]:
    """Base b = 1 everywhere; x_i = b + τ_i with hand-made τ (distinct magnitudes within each model)."""
    b = torch.ones(6)
    taus = [torch.tensor([4.0, -1.0, 3.0, -6.0, 0.5, 0.1]),    # top 3 by |τ|: idx 3, 0, 2 -> [4, 0, 3, -6, 0, 0]
            torch.tensor([-4.0, 5.0, -3.0, -1.0, 0.2, 0.3]),   # top 3: idx 1, 0, 2 -> [-4, 5, -3, 0, 0, 0]
            torch.tensor([0.1, -2.0, 0.2, 0.3, -7.0, 6.0])]    # top 3: idx 4, 5, 1 -> [0, -2, 0, 0, -7, 6]
    pos = torch.arange(4, dtype=torch.int64)
    dirs = [hf(tmp_path, "base", {TIES_KEY: b, POS: pos})]
    dirs += [hf(tmp_path, f"t{i}", {TIES_KEY: b + t, POS: pos}) for i, t in enumerate(taus)]
    return dirs


def test_ties_trim_elect_disjoint_mean(tmp_path: Path) -> None:
    base, m1, m2, m3 = ties_models(tmp_path)
    cfg: dict[str, Any] = {
        "merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
        "models": [{"model": str(m1), "parameters": {"weight": 1.0}}, {"model": str(m2), "parameters": {"weight": 1.0}},
                   {"model": str(m3), "parameters": {"weight": 2.0}}],
    }
    # weighted trimmed d_i: d1 = [4, 0, 3, -6, 0, 0], d2 = [-4, 5, -3, 0, 0, 0], d3 = 2·τ̂3 = [0, -4, 0, 0, -14, 12]
    # Σ d = [0, 1, 0, -6, -14, 12] -> elected [+, +, +, -, -, +] (idx 0, 2: zero sum -> +)
    # idx 0: survivors 4 / -4 disagree, + wins: 4 / 1;  idx 1: 5 (d2) vs -4 (d3): 5 / 1;  idx 2: 3 / 1
    # idx 3: -6 / 1;  idx 4: -14 / 2 = -7;  idx 5: 12 / 2 = 6
    got = merge(tmp_path, cfg)
    assert torch.equal(got[TIES_KEY], 1 + torch.tensor([4.0, 5.0, 3.0, -6.0, -7.0, 6.0]))
    assert torch.equal(got[POS], torch.arange(4))
    # normalize false, lambda 0.5: b + 0.5 · Σ d_i mask_i = 1 + 0.5 · [4, 5, 3, -6, -14, 12]
    cfg["parameters"].update(normalize=False, **{"lambda": 0.5})
    got = merge(tmp_path, cfg, "o2")
    assert torch.equal(got[TIES_KEY], torch.tensor([3.0, 3.5, 2.5, -2.0, -6.0, 7.0]))


def test_ties_trimmed_everywhere_entry_is_base(tmp_path: Path) -> None:
    """density 1/6 keeps one entry per model (k = int(6/6) = 1): untouched entries stay at the base."""
    base, m1, m2, _ = ties_models(tmp_path)
    got = merge(tmp_path, {"merge_method": "ties", "base_model": str(base),
                           "parameters": {"density": 1 / 6, "weight": 1.0},
                           "models": [{"model": str(m1)}, {"model": str(m2)}]})
    # τ̂1 = [0, 0, 0, -6, 0, 0], τ̂2 = [0, 5, 0, 0, 0, 0]
    assert torch.equal(got[TIES_KEY], torch.tensor([1.0, 6.0, 1.0, -5.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------------- slerp
def slerp_formula(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp, written out: lerp when the directions are within |dot| > 0.9995, else
    sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with Ω = arccos(â · b̂)."""
    fa, fb = a.double().flatten(), b.double().flatten()
    dot = float((fa / fa.norm()) @ (fb / fb.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    om = math.acos(max(-1.0, min(1.0, dot)))
    return (math.sin((1 - t) * om) / math.sin(om) * a.double() + math.sin(t * om) / math.sin(om) * b.double()).float()


def test_slerp_gradient_over_layers(tmp_path: Path, three) -> None:
    (a, b, _), (A, B, _) = three
    got = merge(tmp_path, {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": [0, 0.5, 1]},
                           "models": [{"model": str(a)}, {"model": str(b)}]})
    for k in (Q.format(0), D.format(0), LN.format(0), EMB, POOL):  # t = 0: the base (non-layer: first value)
        assert torch.equal(got[k], A[k]), k
    for k in (Q.format(2), D.format(2), LN.format(2)):  # t = 1: the other model
        assert torch.equal(got[k], B[k]), k
    for k in (Q.format(1), D.format(1)):
        torch.testing.assert_close(got[k], slerp_formula(A[k], B[k], 0.5), rtol=0, atol=1e-6)
        assert not torch.allclose(got[k], (A[k] + B[k]) / 2, atol=1e-3)  # really spherical, not linear
    # LayerNorm weights of a and b are colinear (1 vs 2): the linear fallback, 0.5 · 1 + 0.5 · 2
    assert torch.equal(got[LN.format(1)], torch.full((3,), 1.5))


def test_slerp_filter_list(tmp_path: Path, three) -> None:
    (a, b, _), (A, B, _) = three
    t = [{"filter": "attention", "value": 0.8}, {"value": 0.3}]
    got = merge(tmp_path, {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": t},
                           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]},
                                                   {"model": str(b), "layer_range": [0, 3]}]}]})
    for i in range(3):
        torch.testing.assert_close(got[Q.format(i)], slerp_formula(A[Q.format(i)], B[Q.format(i)], 0.8),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(got[D.format(i)], slerp_formula(A[D.format(i)], B[D.format(i)], 0.3),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(got[POOL], slerp_formula(A[POOL], B[POOL], 0.3), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_outputs_dtype_and_tokenizer(tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b, c), (A, B, _) = three
    cfg = write_cfg(tmp_path / "m.yml", {
        "merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"weight": 1.0}, "dtype": "bfloat16"})
    assert main(["merge", str(cfg), str(tmp_path / "o1")]) == 0
    assert "mergekit config" in capsys.readouterr().out
    out = tmp_path / "o1"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "mergekit_config.yml",
                                                     "model.safetensors", "tokenizer.json", "vlmerge_merge.json",
                                                     "vocab.txt"]
    got = load_file(str(out / "model.safetensors"))
    assert got[POOL].dtype == torch.bfloat16 and got[POS].dtype == torch.int64
    assert torch.equal(got[POOL], ((A[POOL] + B[POOL]) / 2).to(torch.bfloat16))
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()  # no base: the first model
    assert (out / "vocab.txt").read_text() == (a / "vocab.txt").read_text()
    resolved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert resolved["merge_method"] == "linear" and resolved["dtype"] == "bfloat16"
    assert resolved["models"][1]["model"] == str(b.resolve())

    # -o, a base model (config + default tokenizer from it), tokenizer_source another model, out_dtype wins
    cfg = write_cfg(tmp_path / "t.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(a), "models": [{"model": str(b)}],
        "parameters": {"weight": 1.0}, "dtype": "bfloat16", "out_dtype": "float16", "tokenizer_source": str(c)})
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o2")]) == 0
    out = tmp_path / "o2"
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()
    assert load_file(str(out / "model.safetensors"))[POOL].dtype == torch.float16
    # an existing output needs --overwrite
    refused(capsys, ["merge", str(cfg), "-o", str(tmp_path / "o2")], "--overwrite")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "o2"), "--overwrite"]) == 0


def test_tokenizer_source_base(tmp_path: Path, three) -> None:
    (a, b, _), _ = three
    merge(tmp_path, {"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                     "parameters": {"weight": 1.0, "density": 0.5}, "tokenizer_source": "base"})
    assert (tmp_path / "out" / "vocab.txt").read_text() == (a / "vocab.txt").read_text()


def test_gradient_on_a_model_without_layers(tmp_path: Path) -> None:
    A, B = {POOL: torch.ones(2, 2)}, {POOL: torch.full((2, 2), 3.0)}
    a, b = hf(tmp_path, "a", A), hf(tmp_path, "b", B)
    got = merge(tmp_path, {"merge_method": "linear", "parameters": {"normalize": False},
                           "models": [{"model": str(a), "parameters": {"weight": [0.25, 1.0]}},
                                      {"model": str(b), "parameters": {"weight": 1.0}}]})
    assert torch.equal(got[POOL], torch.full((2, 2), 0.25 + 3.0))  # no layer index: the first value


def test_gradient_on_a_one_layer_model_takes_the_last_value(tmp_path: Path) -> None:
    """mergekit evaluates a one-layer slice at t = 1 (plan.py, MergePlanner.plan_slice): the layer's tensors take
    a gradient's last value; tensors outside the layers still take the first (t = 0)."""
    A, B = bert_sd(0, n_layers=1), bert_sd(1, n_layers=1)
    a, b = hf(tmp_path, "a", A), hf(tmp_path, "b", B)
    got = merge(tmp_path, {"merge_method": "linear", "parameters": {"normalize": False},
                           "models": [{"model": str(a), "parameters": {"weight": [0.25, 0.5, 1.0]}},
                                      {"model": str(b), "parameters": {"weight": 1.0}}]})
    for k in floats(A):
        w = 1.0 if k.startswith("encoder.layer.0.") else 0.25
        torch.testing.assert_close(got[k], w * A[k] + B[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- mergekit's leniencies
def test_global_parameter_given_per_model_is_ignored_with_one_warning(
        tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    """mergekit reads a method's global parameters from the top-level settings only (parameter_resolver.py,
    resolve_parameters): one given per model is ignored. vlmerge ignores it too, with one warning line naming
    the key and every place it was given."""
    (a, b, c), (A, B, C) = three
    cfg = write_cfg(tmp_path / "w.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 1.0, "normalize": False}},
                   {"model": str(b), "parameters": {"weight": 3.0, "normalize": False}}]})
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: ") and "'normalize'" in lines[0] and "ignored" in lines[0]
    assert "models[0].parameters.normalize" in lines[0] and "models[1].parameters.normalize" in lines[0]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in floats(A):  # normalize stays the global default (true)
        torch.testing.assert_close(got[k], (A[k] + 3 * B[k]) / 4, rtol=0, atol=1e-6)
    # a task-vector method: lambda and random_seed per model are ignored alike
    tv = {"merge_method": "dare_linear", "base_model": str(c),
          "models": [{"model": str(a), "parameters": {"weight": 1.0, "lambda": 5.0, "random_seed": 3}}]}
    got = merge(tmp_path, tv, "o2")
    for k in floats(A):
        torch.testing.assert_close(got[k], A[k], rtol=0, atol=1e-6)


def test_minimum_model_counts_match_mergekit(tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    """mergekit's input contracts (merge_methods/*.py, InputContract): linear takes one model; the task-vector
    methods and sce take the base model alone (their merge returns the base); model_stock needs two besides it."""
    (a, b, c), (A, B, C) = three
    got = merge(tmp_path, {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 2.0}}]})
    assert all(torch.equal(got[k], A[k]) for k in A)  # normalize: 2·A / 2
    got = merge(tmp_path, {"merge_method": "linear", "parameters": {"normalize": False},
                           "models": [{"model": str(a), "parameters": {"weight": 2.0}}]}, "o2")
    assert all(torch.equal(got[k], 2 * A[k]) for k in floats(A))
    for m in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "sce"):
        cfg: dict[str, Any] = {"merge_method": m, "base_model": str(c), "models": [{"model": str(c)}]}
        if m != "sce":
            cfg["parameters"] = {"weight": 1.0}
        got = merge(tmp_path, cfg, f"only-{m}")
        assert all(torch.equal(got[k], C[k]) for k in C), m
    refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", {
        "merge_method": "model_stock", "base_model": str(c), "models": [{"model": str(a)}]})), str(tmp_path / "bad")],
        "model_stock", "at least 2", "got 1")


def test_density_and_select_topk_above_one_keep_everything(tmp_path: Path, three) -> None:
    """mergekit's sparsify.py returns the task vector unchanged for density ≥ 1 (every method), and sce selects
    every entry for select_topk ≥ 1 (sce.py): accepted, the same as 1."""
    (a, b, c), _ = three
    base = {"base_model": str(c), "models": [{"model": str(a)}, {"model": str(b)}]}
    for m, params in (("ties", {"weight": 1.0, "density": 1.5}), ("dare_linear", {"weight": 1.0, "density": 2}),
                      ("breadcrumbs", {"weight": 1.0, "density": [0.5, 1.2]}),
                      ("sce", {"select_topk": 3})):
        one = {k: (1.0 if k in ("density", "select_topk") else v) for k, v in params.items()}
        got = merge(tmp_path, {"merge_method": m, "parameters": params, **base}, f"{m}-big")
        want = merge(tmp_path, {"merge_method": m, "parameters": one, **base}, f"{m}-one")
        for k in got:
            if m == "breadcrumbs" and "layer.2." not in k:
                continue  # the gradient [0.5, 1.2] reaches 1.2 at the last of the 3 layers only
            assert torch.equal(got[k], want[k]), (m, k)


# -------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_key(tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b, _), (A, _, _) = three
    ok: dict[str, Any] = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                              {"model": str(b), "parameters": {"weight": 1}}]}
    out = str(tmp_path / "out")

    def run(cfg: dict[str, Any], *names: str, output: str = out) -> str:
        return refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", cfg)), output], *names)

    run({**ok, "foo": 1}, "bad.yaml", "foo", "unknown key", "merge_method")
    run({**ok, "merge_method": "nearswap"}, "merge_method", "nearswap", "linear, task_arithmetic, ties, slerp",
        "dare_ties", "passthrough")
    run({**ok, "dtype": "float8"}, "dtype", "float32")
    run({**ok, "parameters": {"lamda": 1}}, "parameters.lamda", "unknown parameter", "normalize")
    run({**ok, "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 1}}]},
        "models[0].parameters", "weight")
    run({**ok, "models": [{"model": str(a), "parameters": {"weight": True}}, ok["models"][1]]},
        "models[0].parameters.weight", "True")
    run({"merge_method": "ties", "models": ok["models"]}, "base_model", "required")
    run({"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5},
         "models": [{"model": str(a)}, {"model": str(b)}, {"model": str(tmp_path / "c")}]}, "slerp", "exactly two")
    run({"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]},
        "parameters", "'t'")
    run({"merge_method": "linear", "parameters": {"weight": 1},
         "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}]},
        "slices[0].sources[0].layer_range", "[0, 2]", "3 layers", "not supported yet")
    run({"merge_method": "linear", "parameters": {"weight": 1},
         "slices": [{"sources": [{"model": str(a), "layer_range": [1, 3]}]}]},
        "slices[0].sources[0].layer_range", "not supported yet")
    whole = {"model": str(a), "layer_range": [0, 3]}
    run({"merge_method": "linear", "parameters": {"weight": 1}, "slices": [{"sources": [whole]}] * 2},
        "slices", "2 slices", "not supported yet")
    run({"merge_method": "linear", "parameters": {"weight": 1}, "models": ok["models"],
         "slices": [{"sources": [whole]}]}, "exactly one of 'models' or 'slices'")
    run({**ok, "tokenizer_source": "union"}, "tokenizer_source", "union", "not supported yet")
    refused(capsys, ["merge", str(tmp_path / "bad.yaml")], "mergekit config", "OUT_DIR")
    refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", ok)), out, "--alpha", "0.5"], "--alpha")
    run(ok, "output", "lies inside the input", output=str(a / "merged"))
    run(ok, "output", "is also an input", output=str(a))
    run({**ok, "models": [ok["models"][0], {"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]},
        "models[1]", "nope", "no such model directory")
    assert not (tmp_path / "out").exists()

    # keys differ (listed, both directions)
    sd = dict(A)
    sd.pop(POOL)
    sd["extra.bias"] = torch.zeros(2)
    odd = hf(tmp_path, "odd", sd)
    run({**ok, "models": [ok["models"][0], {"model": str(odd), "parameters": {"weight": 1}}]},
        "differ in 2 keys", f"{POOL} (missing in {odd})", f"extra.bias (only in {odd})")
    # NaN input: the file and the key
    sd = dict(A)
    sd[POOL] = A[POOL].clone()
    sd[POOL][0, 0] = float("nan")
    nan = hf(tmp_path, "nan", sd)
    run({**ok, "models": [ok["models"][0], {"model": str(nan), "parameters": {"weight": 1}}]},
        str(nan), POOL, "NaN")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


def test_vlmerge_schema_refuses_a_mergekit_file_by_name(tmp_path: Path) -> None:
    from vlmerge.merge import load_merge_config

    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "models": []})
    with pytest.raises(ValueError, match="mergekit config.*OUT_DIR"):
        load_merge_config(cfg)


def test_more_refusals(tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b, _), (A, _, _) = three
    ok: dict[str, Any] = {"merge_method": "linear", "parameters": {"weight": 1.0},
                          "models": [{"model": str(a)}, {"model": str(b)}]}
    out = str(tmp_path / "out")

    def run(cfg: dict[str, Any], *names: str) -> str:
        return refused(capsys, ["merge", str(write_cfg(tmp_path / "bad.yaml", cfg)), out], *names)

    run({**ok, "parameters": {"weight": 1.0, "normalize": 1}}, "parameters.normalize", "true or false")
    run({**ok, "models": [{"model": str(a), "parameters": {"lambda": 1.0}}, {"model": str(b)}]},
        "models[0].parameters.lambda", "unknown parameter")  # not linear's at all: an error (mergekit ignores it)
    run({**ok, "parameters": {"weight": [{"filter": "q", "value": 1}, {"value": 1}, {"value": 2}]}},
        "parameters.weight", "at most one default")
    run({**ok, "parameters": {"weight": [{"filter": "q", "valu": 1}]}}, "parameters.weight[0]", "valu")
    run({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
         "parameters": {"weight": 1.0, "density": -0.5}}, "density=-0.5", "≥ 0")
    run({**ok, "models": []}, "models", "empty")
    # shape / integer-buffer differences are listed like key differences
    sd = dict(A)
    sd[POOL] = torch.zeros(2, 2)
    sd[POS] = A[POS].to(torch.int32)
    odd = hf(tmp_path, "odd", sd)
    run({**ok, "models": [{"model": str(a)}, {"model": str(odd)}]}, "differ in 2 keys", POOL, POS, "torch.int32")
    # integer buffers must be equal
    sd = dict(A)
    sd[POS] = A[POS] + 1
    shifted = hf(tmp_path, "shifted", sd)
    run({**ok, "models": [{"model": str(a)}, {"model": str(shifted)}]}, str(shifted), POS, "must be equal")
    # a result that overflows the output dtype names the tensor
    big = {k: (v * 3e4 if v.is_floating_point() else v) for k, v in A.items()}
    huge = hf(tmp_path, "huge", big)
    run({**ok, "dtype": "float16", "parameters": {"weight": 10.0, "normalize": False},
         "models": [{"model": str(huge)}, {"model": str(b)}]}, "merged tensor", "not finite", "float16")
    assert not (tmp_path / "out").exists()


def test_relative_paths_sharded_input_and_filters_in_order(tmp_path: Path, three,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (a, _, _), (A, B, _) = three
    # b again, sharded in two files with an index
    d = tmp_path / "sharded"
    d.mkdir()
    keys = sorted(B)
    parts = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
    for f, ks in parts.items():
        save_file({k: B[k] for k in ks}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in parts.items()
                                                                               for k in ks}}))
    monkeypatch.chdir(tmp_path)
    # entries are tried in order, as in mergekit: a default written first shadows the filters after it
    w = [{"filter": "pooler", "value": 3.0}, {"value": 1.0}, {"filter": "embeddings", "value": 7.0}]
    got = merge(Path("."), {"merge_method": "linear", "parameters": {"normalize": False},
                            "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                       {"model": "sharded", "parameters": {"weight": w}}]})
    torch.testing.assert_close(got[POOL], A[POOL] + 3 * B[POOL], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[EMB], A[EMB] + B[EMB], rtol=0, atol=1e-6)
    assert (tmp_path / "out" / "config.json").read_bytes() == (a / "config.json").read_bytes()


def test_bad_paths_empty_configs_and_layer_ranges_are_refused_naming_the_key(
        tmp_path: Path, three, capsys: pytest.CaptureFixture[str]) -> None:
    (a, b, _), _ = three
    out = str(tmp_path / "out")

    def run(cfg: Any, *names: str, text: str | None = None) -> str:
        path = tmp_path / "bad.yaml"
        if text is not None:
            path.write_text(text)
        else:
            write_cfg(path, cfg)
        return refused(capsys, ["merge", str(path), out], *names)

    ok = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    # an empty path is not the current folder
    run({**ok, "models": [{"model": "", "parameters": {"weight": 1.0}}]}, "models.0.model", "empty path",
        "expected a model folder")
    run({**ok, "base_model": ""}, "base_model", "empty path", "expected a model folder")
    run({**ok, "tokenizer_source": ""}, "tokenizer_source", "empty path")
    run({"merge_method": "linear", "slices": [{"sources": [{"model": " ", "layer_range": [0, 3]}]}]},
        "slices.0.sources.0.model", "empty path")
    # an empty or comment-only file names itself and both schemas
    for text in ("", "# nothing here\n"):
        run(None, "bad.yaml", "empty config", "merge_method", "method", text=text)
    # layer_range: two integers, 0 ≤ start < end (no booleans, no floats)
    for lr in ([False, 3], [0, True], [0, 3.0], [0, 1.5], [-1, 3], [2, 1], [3, 3], [0], [0, 1, 2]):
        run({"merge_method": "linear", "parameters": {"weight": 1.0},
             "slices": [{"sources": [{"model": str(a), "layer_range": lr}]}]},
            "slices.0.sources.0.layer_range", "two integers with 0 ≤ start < end")
    # a path that is a file but not a weights file
    (tmp_path / "notes.txt").write_text("x")
    run({**ok, "models": [{"model": str(tmp_path / "notes.txt"), "parameters": {"weight": 1.0}}]},
        "models[0]", "notes.txt", "not a folder", ".pt")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_one_weights_file_is_a_model(tmp_path: Path, three) -> None:
    (a, _, _), sds = three
    pt = tmp_path / "c.pt"
    torch.save(sds[2], pt)
    sd = merge(tmp_path, {"merge_method": "linear",
                          "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                     {"model": str(pt), "parameters": {"weight": 3.0}}]})
    for k in floats(sds[0]):
        torch.testing.assert_close(sd[k], (sds[0][k] + 3 * sds[2][k]) / 4)
    assert (tmp_path / "out" / "config.json").is_file()  # from the first model, a folder
    record = json.loads((tmp_path / "out" / "vlmerge_merge.json").read_text())
    assert "c.pt" in record["models"][1]["files"]
    # the file first: no config.json to copy
    sd = merge(tmp_path, {"merge_method": "linear", "models": [{"model": str(pt), "parameters": {"weight": 1.0}}]},
               out="out2")
    assert not (tmp_path / "out2" / "config.json").exists()
    for k in floats(sds[2]):
        torch.testing.assert_close(sd[k], sds[2][k])


def test_linear_subnormal_weights_with_normalize_merge(tmp_path: Path, three,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (a, b, _), sds = three
    sd = merge(tmp_path, {"merge_method": "linear",
                          "models": [{"model": str(a), "parameters": {"weight": 1e-320}},
                                     {"model": str(b), "parameters": {"weight": 3e-320}}]})
    for k in floats(sds[0]):
        torch.testing.assert_close(sd[k], (sds[0][k] + 3 * sds[1][k]) / 4)
    sd = merge(tmp_path, {"merge_method": "linear",
                          "models": [{"model": str(a), "parameters": {"weight": 1e300}},
                                     {"model": str(b), "parameters": {"weight": 1e300}}]}, out="big")
    for k in floats(sds[0]):
        torch.testing.assert_close(sd[k], (sds[0][k] + sds[1][k]) / 2)
    # without normalize a huge weight overflows float32 itself: said so, not blamed on the cast
    cfg = write_cfg(tmp_path / "bad.yaml", {"merge_method": "linear", "parameters": {"normalize": False},
                                            "models": [{"model": str(a), "parameters": {"weight": 1e300}}]})
    line = refused(capsys, ["merge", str(cfg), str(tmp_path / "o3")], "merged tensor", "not finite in float32")
    assert "cast" not in line
    assert not (tmp_path / "o3").exists()
