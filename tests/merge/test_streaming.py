"""Checkpoint-level merges: streaming == in memory, atomic output, config record, and every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from merge_synthetic import msa_state_dict, write

from vlmerge.merge import Grams, merge_checkpoint, merge_models, merge_tensors
from vlmerge.models import CheckpointReader
from vlmerge.models.roles import merge_groups

NON_BLOCK = ("word_embed.weight", "norm.weight", "heads.itc.image_proj.weight")


def in_memory(method: str, sd: dict, base: dict | None, grams: dict | None = None, **params) -> dict:
    """The reference: merge_tensors on each group of the in-memory state dict."""
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.") or ".shared." in k}
    for g in merge_groups(sd):
        mods = g.modalities
        srcs = [sd[g.sources[m]] for m in mods]
        kw = dict(params)  # DARE: name=g.target seeds each tensor as the checkpoint merge does
        if grams is not None and g.module in ("attn", "mlp") and g.suffix.endswith(".weight"):
            kw["grams"] = [grams[g.sources[m]] for m in mods]
        b = base[g.sources[mods[0]]] if base is not None else None
        out[g.target] = merge_tensors(method, srcs, base=b, layer=g.layer, modalities=mods, name=g.target,
                                      **kw)
    return out


def random_grams(sd: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and (".attn." in k or ".mlp." in k):
            x = torch.randn(40, v.shape[1], generator=gen, dtype=torch.float64)
            out[k] = x.T @ x
    return out


CASES = [
    ("interpolation", {"alpha": 0.75}),
    ("interpolation", {"alpha": [0.1, 0.5, 0.9]}),
    ("modality_arithmetic", {"lam": 0.5}),
    ("ties", {"density": 0.4}),
    ("dare", {"drop": 0.3, "seed": 5}),
    ("average", {}),
    ("regmean", {"gamma": 0.8}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_streaming_equals_in_memory(msa_pair, tmp_path: Path, method: str, params: dict) -> None:
    in_dir, base_dir, sd, base = msa_pair
    kw: dict = {}
    grams = None
    if method in ("modality_arithmetic", "ties", "dare"):
        kw["base_dir"] = base_dir
    if method == "regmean":
        grams = random_grams(sd)
        kw["grams"] = Grams(grams, {})
    out = merge_checkpoint(method, in_dir, tmp_path / "out", **kw, **params)
    want = in_memory(method, sd, base if "base_dir" in kw else None, grams, **params)
    with CheckpointReader(out) as r:
        got = r.state_dict()
    assert sorted(got) == sorted(want)
    assert not any(".v." in k or ".l." in k or ".vl." in k for k in got)
    for k in want:
        assert got[k].dtype == sd.get(k, want[k]).dtype
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    for k in NON_BLOCK:
        assert torch.equal(got[k], sd[k])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["arch"] == "maa" and cfg["merge"]["method"] == method
    assert cfg["merge"]["kind"] == "modality"
    assert cfg["merge"]["sources"][0]["files"]["model.safetensors"]["bytes"] > 0
    assert sorted(os.listdir(tmp_path)) == ["base", "msa", "out"]  # no temp dirs left


def test_interpolation_alpha_one_gives_vision_weights(msa_pair, tmp_path: Path) -> None:
    in_dir, _, sd, _ = msa_pair
    out = merge_checkpoint("interpolation", in_dir, tmp_path / "out", alpha=1.0, vl_ratio=0.0)
    with CheckpointReader(out) as r:
        for g in merge_groups(sd):
            assert torch.equal(r.get(g.target), sd[g.sources["v"]])


def test_per_module_schedules_apply_per_slot_and_a_missing_slot_is_refused(msa_pair, tmp_path: Path) -> None:
    """Oracle: each merged tensor computed by hand from its own layer's and module's coefficient."""
    in_dir, base_dir, sd, base = msa_pair
    depth = 1 + max(g.layer for g in merge_groups(sd))
    alpha = [{"norm1": 0.1, "attn": 0.2, "norm2": 0.3, "mlp": 0.9}, *[0.6] * (depth - 1)]
    lam = {layer: {"norm1": 0.5, "attn": 0.1 * (layer + 1), "norm2": 0.5, "mlp": 0.7} for layer in range(depth)}
    a_out = merge_checkpoint("interpolation", in_dir, tmp_path / "a", alpha=alpha, vl_ratio=0.25)
    m_out = merge_checkpoint("modality_arithmetic", in_dir, tmp_path / "m", base_dir=base_dir, lam=lam)
    with CheckpointReader(a_out) as ra, CheckpointReader(m_out) as rm:
        for g in merge_groups(sd):
            a = alpha[g.layer][g.module] if g.layer == 0 else 0.6
            want = a * sd[g.sources["v"]] + (1 - a) * sd[g.sources["l"]]
            if "vl" in g.sources:
                want = 0.75 * want + 0.25 * sd[g.sources["vl"]]
            torch.testing.assert_close(ra.get(g.target), want, rtol=0, atol=1e-6)
            w0 = base[g.sources["v"]]
            tau = sum(sd[k] - w0 for k in g.sources.values())
            torch.testing.assert_close(rm.get(g.target), w0 + lam[g.layer][g.module] * tau, rtol=0, atol=1e-5)
    no_mlp = [{"attn": 0.5, "norm1": 0.5, "norm2": 0.5}, *[0.5] * (depth - 1)]
    with pytest.raises(ValueError, match=r"interpolation: alpha: layer 0's entry has no value for module 'mlp'"):
        merge_checkpoint("interpolation", in_dir, tmp_path / "x", alpha=no_mlp)
    with pytest.raises(ValueError, match=r"lam: the schedule has no entry for layer 1"):
        merge_checkpoint("modality_arithmetic", in_dir, tmp_path / "x", base_dir=base_dir, lam={0: 0.5})
    with pytest.raises(ValueError, match=r"unknown module 'ffn'"):
        merge_checkpoint("interpolation", in_dir, tmp_path / "x", alpha=[{"ffn": 0.5}] * depth)
    with pytest.raises(ValueError, match=r"each value must be ≥ 0"):
        merge_checkpoint("modality_arithmetic", in_dir, tmp_path / "x", base_dir=base_dir, lam=[-0.1] * depth)
    assert not (tmp_path / "x").exists()

def test_shared_slots_pass_through_and_maa_seed_base(tmp_path: Path) -> None:
    """A custom-ffn-like checkpoint (mlp shared) and a base with MAA (shared) names."""
    seed = msa_state_dict(seed=4, shared_modules=("norm1", "attn", "norm2", "mlp"))
    sd = msa_state_dict(seed=5, shared_modules=("norm2", "mlp"))
    in_dir, base_dir = write(tmp_path, "ffn", sd, "custom-attn"), write(tmp_path, "seed", seed, "maa")
    out = merge_checkpoint("modality_arithmetic", in_dir, tmp_path / "out", base_dir=base_dir, lam=0.5)
    with CheckpointReader(out) as r:
        assert torch.equal(r.get("blocks.0.mlp.shared.fc1.weight"), sd["blocks.0.mlp.shared.fc1.weight"])
        k = "blocks.0.attn.shared.qkv.weight"
        w0 = seed[k]
        want = w0 + 0.5 * (sd["blocks.0.attn.v.qkv.weight"] - w0 + sd["blocks.0.attn.l.qkv.weight"] - w0)
        assert torch.allclose(r.get(k), want, atol=1e-6)


def test_merged_vlmo_checkpoint_loads_as_maa(tmp_path: Path) -> None:
    from vlmerge.models import VLMo, load_model, preset_config, save_model

    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=30))
    save_model(model, tmp_path / "msa")
    merge_checkpoint("interpolation", tmp_path / "msa", tmp_path / "maa", alpha=0.75)
    merged = load_model(tmp_path / "maa")
    assert merged.config.arch == "maa"
    with torch.no_grad():
        out = merged(torch.randn(1, 3, 16, 16), torch.randint(0, 30, (1, 4)))
    assert torch.isfinite(out).all()


def test_bad_inputs(msa_pair, tmp_path: Path) -> None:
    in_dir, base_dir, sd, base = msa_pair
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown merge method 'mean'; allowed methods"):
        merge_checkpoint("mean", in_dir, out)
    with pytest.raises(ValueError, match="needs a base checkpoint"):
        merge_checkpoint("ties", in_dir, out)
    with pytest.raises(ValueError, match="does not use a base"):
        merge_checkpoint("interpolation", in_dir, out, base_dir=base_dir)
    with pytest.raises(ValueError, match="needs Gram matrices"):
        merge_checkpoint("regmean", in_dir, out)
    with pytest.raises(ValueError, match="no Gram for 28 linear weights in the Grams given"):
        merge_checkpoint("regmean", in_dir, out, grams=Grams({}, {}))
    with pytest.raises(ValueError, match="params: alpha"):
        merge_checkpoint("interpolation", in_dir, out, alpha=2)
    with pytest.raises(ValueError, match="schedule has 2 values; the model has 3 layers"):
        merge_checkpoint("interpolation", in_dir, out, alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="weights has no entry for modality 'vl'"):
        merge_checkpoint("average", in_dir, out, weights={"v": 1, "l": 1})
    with pytest.raises(ValueError, match="is also an input"):
        merge_checkpoint("interpolation", in_dir, in_dir)
    # a base missing keys / with a wrong shape: a vlmerge base fails its own architecture check, a plain
    # one (no model config) the slot-by-slot comparison with the input
    small = {k: v for k, v in base.items() if "blocks.2." not in k}
    with pytest.raises(ValueError, match=r"b2: the weights do not match .*: missing keys \(36\): blocks.2."):
        merge_checkpoint("ties", in_dir, out, base_dir=write(tmp_path, "b2", small))
    with pytest.raises(ValueError, match="missing 36 keys"):
        merge_checkpoint("ties", in_dir, out, base_dir=write(tmp_path, "b2p", small, plain=True))
    wrong = dict(base)
    wrong["blocks.0.attn.v.qkv.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"b3: .*: shape mismatches \(1\): blocks.0.attn.v.qkv.weight: checkpoint \["):
        merge_checkpoint("ties", in_dir, out, base_dir=write(tmp_path, "b3", wrong))
    with pytest.raises(ValueError, match=r"base blocks.0.attn.v.qkv.weight is torch.float32 \[2, 2\] but the"):
        merge_checkpoint("ties", in_dir, out, base_dir=write(tmp_path, "b3p", wrong, plain=True))
    # modality copies of different shapes, a missing expert copy, a missing config: the input's own check
    bad = dict(sd)
    bad["blocks.1.mlp.l.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"bad: .*: shape mismatches \(1\): blocks.1.mlp.l.fc1.weight: checkpoint \["):
        merge_checkpoint("interpolation", write(tmp_path, "bad", bad), out)
    one_less = {k: v for k, v in sd.items() if k != "blocks.2.mlp.vl.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.2.mlp.vl.fc2.weight"):
        merge_checkpoint("average", write(tmp_path, "one_less", one_less), out)
    with pytest.raises(ValueError, match="no 'model' entry|expected an object with a 'model' entry"):
        merge_checkpoint("average", write(tmp_path, "plain", sd, plain=True), out)
    # NaN in a weight: error naming it, nothing left under out
    nan = dict(sd)
    nan["blocks.2.mlp.vl.fc2.weight"] = nan["blocks.2.mlp.vl.fc2.weight"].clone()
    nan["blocks.2.mlp.vl.fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'blocks.2.mlp.vl.fc2.weight' contains NaN or Inf"):
        merge_checkpoint("interpolation", write(tmp_path, "nan", nan), out)
    # base copies that differ
    differ = dict(base)
    differ["blocks.0.norm1.l.weight"] = differ["blocks.0.norm1.l.weight"] + 1
    with pytest.raises(ValueError, match="base copies .* differ"):
        merge_checkpoint("ties", in_dir, out, base_dir=write(tmp_path, "b4", differ))
    # an already-merged checkpoint
    with pytest.raises(ValueError, match="no modality-specific block weights"):
        merge_checkpoint("interpolation", write(tmp_path, "maa", msa_state_dict(shared_modules=(
            "norm1", "attn", "norm2", "mlp")), "maa"), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dirs cleaned


def test_corrupt_safetensors_and_missing_dir(msa_pair, tmp_path: Path) -> None:
    in_dir, *_ = msa_pair
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        merge_checkpoint("interpolation", tmp_path / "corrupt", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        merge_checkpoint("interpolation", tmp_path / "nope", tmp_path / "out")


def test_overwrite_is_atomic(msa_pair, tmp_path: Path) -> None:
    in_dir, *_ = msa_pair
    out = merge_checkpoint("interpolation", in_dir, tmp_path / "out", alpha=0.5)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="exists and is not empty"):
        merge_checkpoint("interpolation", in_dir, out, alpha=1.0)
    merge_checkpoint("interpolation", in_dir, out, alpha=1.0, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["base", "msa", "out"]


def models(tmp_path: Path, n: int, plain: bool = False) -> tuple[list[Path], list[dict]]:
    """``n`` vlmerge checkpoints of one architecture; ``plain``: checkpoints without a model config that
    also hold an integer buffer ``step`` (equal in all)."""
    sds = [msa_state_dict(seed=10 + i, int_buffer=plain) for i in range(n)]
    for sd in sds[1:]:
        if plain:
            sd["step"] = sds[0]["step"]
    return [write(tmp_path, f"m{i}", sd, plain=plain) for i, sd in enumerate(sds)], sds


def test_merge_models_soup(tmp_path: Path) -> None:
    dirs, sds = models(tmp_path, 3)
    out = merge_models("average", dirs, tmp_path / "soup", weights=[1, 2, 1], progress=True)
    (tmp_path / "plain").mkdir()
    plain, psds = models(tmp_path / "plain", 2, plain=True)
    with CheckpointReader(merge_models("average", plain, tmp_path / "psoup")) as r:
        assert torch.equal(r.get("step"), psds[0]["step"])  # integer buffers pass through
    with CheckpointReader(out) as r:
        for k in sds[0]:
            if k == "step":
                assert torch.equal(r.get(k), sds[0][k])
                continue
            want = (sds[0][k] + 2 * sds[1][k] + sds[2][k]) / 4
            assert torch.allclose(r.get(k), want, atol=1e-6), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["merge"]["kind"] == "models" and cfg["merge"]["weights"] == [1.0, 2.0, 1.0]
    assert len(cfg["merge"]["sources"]) == 3 and cfg["model"]["arch"] == "msa"
    # two models, interpolation = α W1 + (1 − α) W2; task arithmetic with a base
    out2 = merge_models("interpolation", dirs[:2], tmp_path / "pair", alpha=0.25)
    with CheckpointReader(out2) as r:
        k = "blocks.1.attn.v.proj.weight"
        assert torch.allclose(r.get(k), 0.25 * sds[0][k] + 0.75 * sds[1][k], atol=1e-6)
    out3 = merge_models("modality_arithmetic", dirs[:2], tmp_path / "ta", base_dir=dirs[2], lam=0.5)
    with CheckpointReader(out3) as r:
        k = "word_embed.weight"
        assert torch.allclose(r.get(k), sds[2][k] + 0.5 * (sds[0][k] + sds[1][k] - 2 * sds[2][k]), atol=1e-5)


@pytest.mark.parametrize("method", ["dare", "average", "modality_arithmetic", "ties"])
def test_nonfinite_named_whether_checked_before_or_after_merging(tmp_path: Path, method: str) -> None:
    """Methods that propagate NaN / Inf are checked on their result (ties on its inputs); either way the
    error names the file and key of the bad input or base, and nothing is written."""
    dirs, sds = models(tmp_path, 3)
    key = "blocks.1.mlp.l.fc2.weight"
    for i, bad in ((1, float("nan")), (2, float("-inf"))):
        sd = {k: v.clone() for k, v in sds[i].items()}
        sd[key][3, 2] = bad
        bad_dir = write(tmp_path, f"bad{i}", sd)
        ins = [dirs[0], bad_dir] if i == 1 else dirs[:2]
        what = "tensor" if i == 1 else "base tensor"
        with pytest.raises(ValueError, match=rf"{bad_dir}: {what} '{key}' contains NaN or Inf"):
            merge_models(method, ins, tmp_path / "out", base_dir=bad_dir if i == 2 else dirs[2])
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["average", "ties", "modality_arithmetic", "dare"])
def test_overflow_from_finite_inputs_is_an_error(tmp_path: Path, method: str) -> None:
    """Finite inputs whose merge overflows float32 must not become an Inf weight: the error names the tensor
    and nothing is written, whichever way the method checks its inputs."""
    dirs, sds = models(tmp_path, 3)
    key = "blocks.0.attn.v.proj.weight"
    big = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    for sd in big[:2]:
        sd[key][0, 0] = 3e38
    big[2][key][0, 0] = -3e38
    ins = [write(tmp_path, f"big{i}", sd) for i, sd in enumerate(big)]
    kw: dict = {"weights": [1, 1], "normalize": False} if method == "average" else {"base_dir": ins[2], "lam": 1.0}
    if method == "dare":
        kw.update(drop=0.0, normalize=False)  # nothing dropped: the entry that overflows is kept
    with pytest.raises(ValueError, match=rf"{key}: the {method} merge of finite inputs overflowed"):
        merge_models(method, ins[:2], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_buffers_are_recycled_not_shared() -> None:
    from vlmerge.merge.streaming import _OutputBuffers

    pool = _OutputBuffers()
    a, va = pool.take((4, 5))
    b, _ = pool.take((3,))
    assert va.shape == (4, 5) and va.is_contiguous() and a.data_ptr() != b.data_ptr()
    pool.give(a)
    c, vc = pool.take((2, 3))  # fits in a: reused, a view on its first entries
    assert c.data_ptr() == a.data_ptr() and vc.shape == (2, 3)
    d, _ = pool.take((2, 3))  # nothing free: fresh memory, never a buffer still in use
    assert d.data_ptr() not in (b.data_ptr(), c.data_ptr())
    pool.give(b)
    e, _ = pool.take((100,))  # free ones too small: one is dropped, so the set does not grow
    assert e.numel() == 100 and pool._free == []


def test_merge_models_mismatch_before_writing(tmp_path: Path) -> None:
    dirs, sds = models(tmp_path, 2, plain=True)
    other = dict(sds[1])
    del other["norm.weight"]
    other["extra.weight"] = torch.zeros(2)
    other["blocks.0.attn.v.qkv.weight"] = torch.zeros(4, 8)
    bad = write(tmp_path, "bad", other, plain=True)
    with pytest.raises(ValueError, match="differ in 3 keys") as e:
        merge_models("average", [dirs[0], bad], tmp_path / "out")
    msg = str(e.value)
    assert "norm.weight (missing in" in msg and "extra.weight (only in" in msg
    assert "blocks.0.attn.v.qkv.weight (" in msg and "bad torch.float32 [4, 8]: all inputs need one shape" in msg
    with pytest.raises(ValueError, match="at most 2 models"):
        merge_models("interpolation", [*dirs, dirs[0]], tmp_path / "out")
    with pytest.raises(ValueError, match="weights has 1 values but there are 2"):
        merge_models("average", dirs, tmp_path / "out", weights=[1])
    assert not (tmp_path / "out").exists()
    ints = dict(sds[1])
    ints["step"] = torch.tensor([8])
    with pytest.raises(ValueError, match="non-float tensor 'step' differs"):
        merge_models("average", [dirs[0], write(tmp_path, "ints", ints, plain=True)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_ahead_keeps_order_bounds_work_in_flight_and_raises_in_turn() -> None:
    """The look-ahead behind every streaming merge (vlmerge's own and mergekit configs): results in item order
    whatever order workers finish in, never more than ``ahead`` items started beyond the one being consumed,
    and a failing item raises only when its turn comes (earlier results are all delivered first)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from vlmerge.merge.streaming import read_ahead

    started: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        if i == 7:
            raise ValueError("item 7")
        return i * i

    got: list[int] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        gen = read_ahead(pool, fn, list(range(10)), ahead=2)
        with pytest.raises(ValueError, match="item 7"):
            for r in gen:
                with lock:
                    assert max(started) <= len(got) + 2  # consuming item len(got): at most 2 beyond it
                got.append(r)
    assert got == [i * i for i in range(7)]


def test_merge_workers_run_torch_on_their_share_of_the_threads() -> None:
    """Each worker runs torch on its share of the intra-op threads; the caller keeps its own count."""
    from vlmerge.merge.streaming import _WORKERS, merge_workers

    saved = torch.get_num_threads()  # the suite runs on one thread (conftest); give the workers some to share
    torch.set_num_threads(2 * _WORKERS)
    try:
        with merge_workers("t") as pool:
            inside = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
            assert torch.get_num_threads() == 2 * _WORKERS
        assert inside == {2}
        assert torch.get_num_threads() == 2 * _WORKERS
    finally:
        torch.set_num_threads(saved)
