"""Inputs and outputs of ``vlmerge merge CONFIG.yaml OUT_DIR``: PyTorch pickles (weights_only, never fully
unpickled), mixed dtypes, ``--missing-keys``, ``--out-shard-size``, the files copied beside the weights, the
model card and provenance record, ``--device``.

Oracles: the same merge of safetensors copies, hand formulas and hand-made shard plans; never the code under
test.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_mergekit_config import EMB, LN, POOL, POS, Q, bert_sd, floats, hf, refused, write_cfg

import vlmerge
from vlmerge.cli import main
from vlmerge.merge.io import StreamingReader, parse_size
from vlmerge.models import CheckpointReader


def hf_bin(root: Path, name: str, sd: dict[str, torch.Tensor], file: str = "pytorch_model.bin",
           wrap: Any = None, legacy: bool = False) -> Path:
    """``root/name`` like :func:`hf` but with the weights as a PyTorch pickle ``file``; ``wrap(sd)`` builds
    the saved object (default: the state dict itself)."""
    d = root / name
    d.mkdir()
    torch.save(wrap(sd) if wrap else sd, d / file, _use_new_zipfile_serialization=not legacy)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "name": name}))
    (d / "tokenizer.json").write_text(json.dumps({"model": name}))
    return d


def hf_bin_sharded(root: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    """Two ``pytorch_model-0000i-of-00002.bin`` shards and ``pytorch_model.bin.index.json``."""
    d = root / name
    d.mkdir()
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:4], "pytorch_model-00002-of-00002.bin": keys[4:]}
    for f, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, d / f)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "name": name}))
    return d


def run(tmp_path: Path, cfg: dict[str, Any], out: str = "out", *flags: str) -> Path:
    c = write_cfg(tmp_path / f"{out}.yaml", cfg)
    assert main(["merge", str(c), str(tmp_path / out), *flags]) == 0
    return tmp_path / out


def nothing_left(tmp_path: Path, out: str = "out") -> None:
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}.")]  # no temp folder either


def ties_cfg(base: Path, b: Path, c: Path) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "lambda": 0.8},
            "models": [{"model": str(b), "parameters": {"weight": 1.0}},
                       {"model": str(c), "parameters": {"weight": [0.5, 1.5]}}]}


# ------------------------------------------------------------------------------------------------ pickles
def test_bin_and_pt_inputs_merge_like_safetensors(tmp_path: Path) -> None:
    A, B, C = (bert_sd(s) for s in range(3))
    st = [hf(tmp_path, n, sd) for n, sd in zip(("a", "b", "c"), (A, B, C), strict=True)]
    want = run(tmp_path, ties_cfg(*st), "want") / "model.safetensors"
    # HF pytorch_model.bin (legacy, non-zip format: not memory-mapped), a wrapped .pt, a sharded .bin
    a = hf_bin(tmp_path, "a_bin", A, legacy=True)
    b = hf_bin(tmp_path, "b_pt", B, "checkpoint.pt",
               wrap=lambda sd: {"model": {"state_dict": sd}, "epoch": 3, "optimizer": {"lr": 0.1}})
    (b / "training_args.bin").write_bytes(b"not weights: never read")
    c = hf_bin_sharded(tmp_path, "c_bin", C)
    got = run(tmp_path, ties_cfg(a, b, c), "got")
    assert (got / "model.safetensors").read_bytes() == want.read_bytes()
    # {'state_dict': ...} in a .pth, and --inputs (vlmerge's own soups) reading a .bin: (A + C) / 2
    d = hf_bin(tmp_path, "d_pth", A, "weights.pth", wrap=lambda sd: {"state_dict": sd})
    assert main(["merge", "--method", "average", "--inputs", str(d), str(st[2]), "-o", str(tmp_path / "soup")]) == 0
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    for k in floats(A):
        torch.testing.assert_close(soup[k], (A[k] + C[k]) / 2, rtol=0, atol=1e-6)
    rec = json.loads((tmp_path / "soup" / "config.json").read_text())["merge"]
    assert rec["sources"][0]["files"]["weights.pth"]["bytes"] == (d / "weights.pth").stat().st_size


class Payload:
    """Unpickled, this would create ``marker`` (a file that must never appear)."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize(("how", "file", "save"), [
    ("system", "pytorch_model.bin", "torch"),   # a value of the state dict, torch's zip format
    ("open", "model.pt", "pickle"),             # the whole file a plain pickle
    ("system", "pytorch_model.bin", "legacy"),  # torch's legacy format
])
def test_malicious_pickle_is_refused_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str,
                                               file: str, save: str) -> None:
    marker = tmp_path / "MARKER"
    payload = Payload(marker, how)
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof", how)))  # the payload works when really unpickled
    assert (tmp_path / "proof").exists()
    a = hf(tmp_path, "a", bert_sd(0))
    evil = tmp_path / "evil"
    evil.mkdir()
    obj: Any = {**bert_sd(1), "x": payload} if save != "pickle" else payload
    if save == "pickle":
        (evil / file).write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, evil / file, _use_new_zipfile_serialization=save == "torch")
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                          "models": [{"model": str(a)}, {"model": str(evil)}]})
    for argv in (["merge", str(cfg), str(tmp_path / "out")],  # and the same through --inputs
                 ["merge", "--method", "average", "--inputs", str(a), str(evil), "-o", str(tmp_path / "out")]):
        assert main(argv) == 2
        assert not marker.exists()  # nothing of the file ran
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and str(evil / file) in lines[0] and "full unpickling" in lines[0], lines
        assert "weights_only=False" not in lines[0]  # torch's advice to unpickle fully is not repeated
        nothing_left(tmp_path)


def test_bad_pickles_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = hf(tmp_path, "a", bert_sd(0))
    out = str(tmp_path / "out")

    def bad(name: str, obj: Any, *names: str, file: str = "pytorch_model.bin") -> None:
        d = hf_bin(tmp_path, name, {}, file, wrap=lambda _: obj)
        cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                              "models": [{"model": str(a)}, {"model": str(d)}]})
        refused(capsys, ["merge", str(cfg), out], str(d / file), *names)

    bad("step", {**bert_sd(1), "step": 3}, "'step'", "int", "not a tensor")
    bad("nested", {"state_dict": {**bert_sd(1), "sub": {"w": torch.ones(1)}}}, "['state_dict']", "'sub'")
    bad("list", [torch.ones(2)], "list", "state dict")
    bad("cplx", {POOL: torch.ones(2, dtype=torch.complex64)}, POOL, "complex64")
    bad("sparse", {POOL: torch.eye(2).to_sparse()}, POOL, "sparse")
    d = tmp_path / "junk"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage that is no checkpoint")
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                          "models": [{"model": str(a)}, {"model": str(d)}]})
    refused(capsys, ["merge", str(cfg), out], str(d / "pytorch_model.bin"))
    two = hf_bin(tmp_path, "two", bert_sd(1), "x.pt")
    torch.save(bert_sd(1), two / "y.pt")
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                          "models": [{"model": str(a)}, {"model": str(two)}]})
    refused(capsys, ["merge", str(cfg), out], str(two), "x.pt, y.pt", "which one")
    nothing_left(tmp_path)


# ------------------------------------------------------------------------------------------------- dtypes
def test_mixed_dtypes_are_merged_in_float32(tmp_path: Path) -> None:
    A, B = bert_sd(0), bert_sd(1)
    Ah = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in A.items()}
    a, b = hf(tmp_path, "a", Ah), hf_bin(tmp_path, "b", B)
    cfg: dict[str, Any] = {"merge_method": "linear", "parameters": {"weight": 1.0},
                           "models": [{"model": str(a)}, {"model": str(b)}]}
    got = load_file(str(run(tmp_path, cfg) / "model.safetensors"))
    for k in floats(A):  # no dtype: the first model's; the arithmetic in float32
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ((Ah[k].float() + B[k]) / 2).to(torch.bfloat16)), k
    assert got[POS].dtype == torch.int64
    got = load_file(str(run(tmp_path, {**cfg, "dtype": "float32"}, "o32") / "model.safetensors"))
    for k in floats(A):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], (Ah[k].float() + B[k]) / 2, rtol=0, atol=1e-6)
    got = load_file(str(run(tmp_path, {**cfg, "out_dtype": "float16"}, "o16") / "model.safetensors"))
    assert all(got[k].dtype == torch.float16 for k in floats(A))


# ------------------------------------------------------------------------------------------- missing keys
def test_missing_keys_from_the_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    A, B, C = (bert_sd(s) for s in range(3))
    B.pop(POOL)
    C.pop(POOL)
    C.pop(Q.format(1))
    a, b, c = (hf(tmp_path, n, sd) for n, sd in zip("abc", (A, B, C), strict=True))
    cfg = write_cfg(tmp_path / "t.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(a), "parameters": {"weight": 1.0, "lambda": 0.5},
        "models": [{"model": str(b)}, {"model": str(c)}]})
    out = str(tmp_path / "out")
    refused(capsys, ["merge", str(cfg), out], "differ in 3 keys", f"{POOL} (missing in {c})",
            f"{Q.format(1)} (missing in {c})", "--missing-keys base")
    assert main(["merge", str(cfg), out, "--missing-keys", "base"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(A)
    assert torch.equal(got[POOL], A[POOL]) and torch.equal(got[Q.format(1)], A[Q.format(1)])
    for k in (EMB, Q.format(0), LN.format(2)):
        torch.testing.assert_close(got[k], A[k] + 0.5 * ((B[k] - A[k]) + (C[k] - A[k])), rtol=0, atol=1e-6)
    rec = json.loads((tmp_path / "out" / "vlmerge_merge.json").read_text())
    assert rec["taken_from_base"] == sorted([POOL, Q.format(1)])
    assert rec["options"]["missing_keys"] == "base"
    # a key the base lacks cannot come from it; no base at all: the flag is refused
    odd = dict(B)
    odd["extra.bias"] = torch.zeros(2)
    d = hf(tmp_path, "odd", odd)
    cfg2 = write_cfg(tmp_path / "t2.yaml", {"merge_method": "task_arithmetic", "base_model": str(a),
                                            "parameters": {"weight": 1.0}, "models": [{"model": str(d)}]})
    refused(capsys, ["merge", str(cfg2), str(tmp_path / "o2"), "--missing-keys", "base"],
            f"extra.bias (only in {d})")
    cfg3 = write_cfg(tmp_path / "l.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                           "models": [{"model": str(a)}, {"model": str(b)}]})
    refused(capsys, ["merge", str(cfg3), str(tmp_path / "o3"), "--missing-keys", "base"], "--missing-keys base",
            "no base_model")
    nothing_left(tmp_path, "o2")
    nothing_left(tmp_path, "o3")


# --------------------------------------------------------------------------------------------------- shards
SIZES = {"a.weight": 10, "b.weight": 10, "c.weight": 10, "d.weight": 50, "e.weight": 10}  # float32 elements


def shard_models(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    X = {k: torch.randn(n, generator=g) for k, n in SIZES.items()}
    Y = {k: torch.randn(n, generator=g) for k, n in SIZES.items()}
    return hf(tmp_path, "x", X), hf(tmp_path, "y", Y), X, Y


def test_sharded_output(tmp_path: Path) -> None:
    x, y, X, Y = shard_models(tmp_path)
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(x)}, {"model": str(y)}]}
    single = load_file(str(run(tmp_path, cfg, "single") / "model.safetensors"))
    out = run(tmp_path, cfg, "sharded", "--out-shard-size", "80")
    # 40, 40, 40, 200, 40 bytes, at most 80 a shard: [a, b] (exactly 80; + c = 120), [c] (+ d = 240), [d] (200 >
    # 80, alone), [e]
    plan = [["a.weight", "b.weight"], ["c.weight"], ["d.weight"], ["e.weight"]]
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * sum(SIZES.values())
    assert index["weight_map"] == {k: n for n, ks in zip(names, plan, strict=True) for k in ks}
    for n, ks in zip(names, plan, strict=True):
        part = load_file(str(out / n))
        assert sorted(part) == ks
        assert sum(t.numel() * 4 for t in part.values()) <= 80 or ks == ["d.weight"]
        for k in ks:
            assert torch.equal(part[k], single[k])
            torch.testing.assert_close(part[k], (X[k] + Y[k]) / 2, rtol=0, atol=1e-6)
    for cls in (CheckpointReader, StreamingReader):  # vlmerge reads the sharded output back
        with cls(out) as r:
            assert r.keys() == sorted(SIZES)
            assert all(torch.equal(r.get(k), single[k]) for k in SIZES)
    # the sharded output is an input like any other; a limit everything fits in: one model.safetensors
    again = run(tmp_path, {**cfg, "models": [{"model": str(out)}, {"model": str(x)}]}, "again", "--out-shard-size",
                "1MB")
    assert sorted(p.name for p in again.glob("model*")) == ["model.safetensors"]
    got = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(got[k], (single[k] + X[k]) / 2) for k in SIZES)


def test_shard_size_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for text, n in [("1000000", 10**6), ("500MB", 5 * 10**8), ("5GB", 5 * 10**9), ("5gb", 5 * 10**9),
                    ("2GiB", 2 * 2**30), ("5B", 5 * 10**9), ("500M", 5 * 10**8), ("10K", 10**4), ("1.5GB", 15 * 10**8)]:
        assert parse_size(text) == n, text
    x, y, _, _ = shard_models(tmp_path)
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                          "models": [{"model": str(x)}, {"model": str(y)}]})
    for bad in ("5XB", "-1", "0", "GB", "1e9", "1" + "0" * 400, "99999999999GB"):  # huge: once an OverflowError
        refused(capsys, ["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", bad], "--out-shard-size")
    nothing_left(tmp_path)


def test_failure_while_writing_shards_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, _, X, Y = shard_models(tmp_path)
    Y["d.weight"][3] = float("inf")  # found only when d is read, after shards a-c were written
    y = hf(tmp_path, "yinf", Y)
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "parameters": {"weight": 1.0},
                                          "models": [{"model": str(x)}, {"model": str(y)}]})
    refused(capsys, ["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", "100"], str(y), "d.weight",
            "NaN or Inf")
    nothing_left(tmp_path)


@pytest.mark.parametrize(("method", "bad"), [
    ("linear", "y"),  # weight 0 on the bad model: 0 · Inf = NaN still reaches the result
    ("task_arithmetic", "base"),
    ("task_arithmetic", "y"),
    ("passthrough", "x"),
    ("ties", "y"),  # checked input by input (selection may drop the bad entry)
    ("dare_linear", "base"),
    ("dare_linear", "y"),  # weight 0 and density 0 on the bad model: its mask drops every entry, NaN · 0 stays
    ("dare_ties", "y"),
    ("della_linear", "y"),  # density 0: nothing kept, so checked input by input
])
def test_a_non_finite_input_is_named_whether_checked_first_or_from_the_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, bad: str) -> None:
    g = torch.Generator().manual_seed(1)
    sds = {name: {k: torch.randn(n, generator=g) for k, n in SIZES.items()} for name in ("x", "y", "base")}
    sds[bad]["b.weight"][2] = float("inf")
    paths = {name: hf(tmp_path, name, sd) for name, sd in sds.items()}
    doc: dict[str, Any] = {"merge_method": method, "models": [{"model": str(paths["x"])}]}
    if method != "passthrough":
        y_params: dict[str, Any] = {"weight": 0.0 if method in ("linear", "dare_linear") else 1.0}
        if method in ("dare_linear", "dare_ties", "della_linear"):
            y_params["density"] = 0.0
        doc["models"].append({"model": str(paths["y"]), "parameters": y_params})
        doc["models"][0]["parameters"] = {"weight": 1.0}
    if method != "linear" and method != "passthrough":
        doc["base_model"] = str(paths["base"])
        doc["parameters"] = {} if method == "task_arithmetic" else {"density": 0.5}
    cfg = write_cfg(tmp_path / "m.yaml", doc)
    refused(capsys, ["merge", str(cfg), str(tmp_path / "out")], str(paths[bad]), "b.weight", "NaN or Inf")
    nothing_left(tmp_path)


# ------------------------------------------------------------------------- files beside the weights, records
def header_sha256(f: Path) -> str:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 : 8 + n]).hexdigest()


def test_copied_files_model_card_and_provenance(tmp_path: Path) -> None:
    A, B, C = (bert_sd(s) for s in range(3))
    a, b = hf(tmp_path, "a", A), hf_bin(tmp_path, "b", B)
    c = hf(tmp_path, "c", C)
    (a / "generation_config.json").write_text('{"max_length": 7}')
    (b / "generation_config.json").write_text('{"max_length": 9}')
    (c / "chat_template.jinja").write_text("{{ messages }} from c")
    (c / "tokenizer_config.json").write_text('{"chat_template": "c"}')
    (c / "preprocessor_config.json").write_text('{"size": 224}')
    (a / "README.md").write_text("the base's own card: not copied")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(a), "tokenizer_source": str(c), "dtype": "float16",
           "parameters": {"lambda": 0.5}, "models": [{"model": str(b), "parameters": {"weight": [0.2, 0.8]}},
                                                     {"model": str(c), "parameters": {"weight": 1.0}}]}
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    out = run(tmp_path, cfg, "out", "--hash-inputs")
    assert (out / "generation_config.json").read_text() == '{"max_length": 7}'  # with config.json: the base's
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()
    for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json", "vocab.txt",
                 "preprocessor_config.json"):
        assert (out / name).read_bytes() == (c / name).read_bytes(), name

    rec = json.loads((out / "vlmerge_merge.json").read_text())
    assert rec["kind"] == "mergekit" and rec["method"] == "task_arithmetic"
    assert rec["parameters"] == {"lambda": 0.5} and rec["dtype"] == "float16"
    assert rec["vlmerge_version"] == vlmerge.__version__
    assert before <= datetime.fromisoformat(rec["created"]) <= datetime.now(timezone.utc)
    assert rec["options"] == {"missing_keys": "error", "out_shard_size": None, "device": "cpu"}
    assert rec["weights"] == ["model.safetensors"] and rec["config"] == "mergekit_config.yml"
    base_f = a / "model.safetensors"
    assert rec["base"]["path"] == str(a.resolve())
    assert rec["base"]["files"] == {"model.safetensors": {
        "bytes": base_f.stat().st_size, "header_sha256": header_sha256(base_f),
        "sha256": hashlib.sha256(base_f.read_bytes()).hexdigest()}}
    mb, mc = rec["models"]
    assert (mb["key"], mb["path"], mb["parameters"]) == ("models[0]", str(b.resolve()), {"weight": [0.2, 0.8]})
    bin_entry = mb["files"]["pytorch_model.bin"]
    assert bin_entry["bytes"] == (b / "pytorch_model.bin").stat().st_size
    assert bin_entry["sha256"] == hashlib.sha256((b / "pytorch_model.bin").read_bytes()).hexdigest()
    assert datetime.fromisoformat(bin_entry["mtime"]).timestamp() == pytest.approx(
        (b / "pytorch_model.bin").stat().st_mtime, abs=1e-3)
    assert mc["key"] == "models[1]" and mc["files"]["model.safetensors"]["header_sha256"] == header_sha256(
        c / "model.safetensors")

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "vlmerge" in card.split("---")[1]
    assert f"merged with vlmerge {vlmerge.__version__}" in card
    assert "**task_arithmetic**" in card and "`lambda: 0.5`" in card and "float16" in card
    assert f"base model: `{a.resolve()}`" in card
    assert f"`{b.resolve()}` (models[0]), parameters: `weight: [0.2, 0.8]`" in card
    assert f"`{c.resolve()}` (models[1]), parameters: `weight: 1.0`" in card
    yml = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(yml) == yaml.safe_load((out / "mergekit_config.yml").read_text())


# --------------------------------------------------------------------------------------------------- device
def test_device_cpu_and_auto_match_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    A, B, C = (bert_sd(s) for s in range(3))
    dirs = [hf(tmp_path, n, sd) for n, sd in zip("abc", (A, B, C), strict=True)]
    cfg = ties_cfg(*dirs)
    default = (run(tmp_path, cfg, "default") / "model.safetensors").read_bytes()
    assert (run(tmp_path, cfg, "cpu", "--device", "cpu") / "model.safetensors").read_bytes() == default
    if not torch.cuda.is_available():
        assert (run(tmp_path, cfg, "auto", "--device", "auto") / "model.safetensors").read_bytes() == default
        rec = json.loads((tmp_path / "auto" / "vlmerge_merge.json").read_text())
        assert rec["options"]["device"] == "cpu"
        refused(capsys, ["merge", str(write_cfg(tmp_path / "c.yaml", cfg)), str(tmp_path / "out"), "--device",
                         "cuda"], "--device cuda", "no CUDA GPU")
        nothing_left(tmp_path)
    else:  # on a GPU the sums may round differently: equal to float32 precision
        for dev in ("cuda", "auto"):
            got = load_file(str(run(tmp_path, cfg, dev, "--device", dev) / "model.safetensors"))
            want = load_file(str(tmp_path / "default" / "model.safetensors"))
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    # the mergekit-only flags are refused for vlmerge's own merges
    refused(capsys, ["merge", "--method", "average", "--inputs", str(dirs[0]), str(dirs[1]), "-o",
                     str(tmp_path / "out"), "--device", "cpu", "--out-shard-size", "5GB"],
            "--out-shard-size", "--device", "only for a mergekit config")


def test_a_recompressed_zip_checkpoint_is_read_whole_not_mapped(tmp_path: Path) -> None:
    """A ``.bin`` re-zipped with DEFLATE (``zip``, ``zipfile``): torch.load(mmap=True) would map the compressed
    bytes as the tensors' data and return garbage without an error; the reader must read it whole."""
    import zipfile

    sd_a, sd_b = bert_sd(0), bert_sd(1)
    plain = tmp_path / "plain.bin"
    torch.save(sd_a, plain)
    a = tmp_path / "a"
    a.mkdir()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(a / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    (a / "config.json").write_text(json.dumps({"model_type": "bert"}))
    b = hf(tmp_path, "b", sd_b)
    out = run(tmp_path, {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                              {"model": str(b), "parameters": {"weight": 1.0}}]})
    got = load_file(str(out / "model.safetensors"))
    for k, v in sd_a.items():
        want = v if not v.is_floating_point() else (v + sd_b[k]) / 2
        assert torch.equal(got[k], want), k


def test_a_pickled_view_claiming_more_than_its_storage_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    """16 bytes on disk claiming 10¹³ entries (a stride-0 view) once made the writer try a 40 TB file."""
    sds = [bert_sd(0), bert_sd(1)]
    for sd in sds:
        sd["huge"] = torch.zeros(4).as_strided((10**13,), (0,))
    a, b = hf_bin(tmp_path, "a", sds[0]), hf_bin(tmp_path, "b", sds[1])
    cfg = write_cfg(tmp_path / "m.yaml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    refused(capsys, ["merge", str(cfg), str(tmp_path / "out")], "pytorch_model.bin", "'huge'", "storage of 16 bytes")
    nothing_left(tmp_path)
