"""`vlmerge merge` on bad inputs, through the real CLI: exit code, one line naming the culprit, inputs
byte-identical, nothing left behind. One case (at least) per failure the issue "Nothing lost, nothing
silently wrong" lists for merging."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fuzz_helpers import Result, leftovers, refused, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vlmerge.models import load_model

INTERP = ("merge", "--method", "interpolation", "--alpha", "0.5")


def rewrite(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    sd = load_file(str(ckpt / "model.safetensors"))
    edit(sd)
    (ckpt / "model.safetensors").unlink()
    save_file(sd, str(ckpt / "model.safetensors"))


def edit_config(ckpt: Path, **model: object) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"].update(model)
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------- data destroyed
@pytest.mark.parametrize(
    ("out", "extra", "why"),
    [
        (".", ["--overwrite"], "contains the input"),  # the output is the parent of the input
        ("msa/final", ["--overwrite"], "lies inside the input"),
        ("msa", ["--overwrite"], "is also an input"),
        ("base", ["--overwrite"], "is also an input"),  # the base
    ],
)
def test_output_never_contains_or_lies_inside_an_input(work: Path, cli, out: str, extra: list[str],
                                                      why: str) -> None:
    before = snapshot(work)
    res = cli("merge", "--method", "modality_arithmetic", "--lam", "0.5", "--base", work / "base", work / "msa",
              work / out, *extra)
    refused(res, 2, why)
    assert snapshot(work) == before


def test_merge_inputs_soup_output_is_parent_of_an_input(work: Path, cli) -> None:
    (work / "runs").mkdir()
    shutil.move(work / "msa", work / "runs" / "msa")
    before = snapshot(work)
    res = cli("merge", "--method", "average", "--inputs", work / "runs" / "msa", work / "base", "-o",
              work / "runs", "--overwrite")
    refused(res, 2, "contains the input", "runs/msa")
    assert snapshot(work) == before


def test_save_grams_never_overwrites(work: Path, cli) -> None:
    (work / "grams.safetensors").write_bytes(b"precious")
    before = snapshot(work)
    res = cli("merge", "--method", "regmean", "--data", "world", "--batches", "1", "--save-grams",
              work / "grams.safetensors", work / "msa", work / "out")
    refused(res, 2, "save_grams", "grams.safetensors", "--overwrite")
    # even with --overwrite: never the checkpoint being read, nor a file inside the output it replaces
    res = cli("merge", "--method", "regmean", "--data", "world", "--batches", "1", "--save-grams",
              work / "msa" / "model.safetensors", work / "msa", work / "out", "--overwrite")
    refused(res, 2, "save_grams", "msa")
    res = cli("merge", "--method", "regmean", "--data", "world", "--batches", "1", "--save-grams",
              work / "out" / "g.safetensors", work / "msa", work / "out", "--overwrite")
    refused(res, 2, "save_grams", "inside the output")
    assert snapshot(work) == before
    assert leftovers(work, ["msa", "base", "grams.safetensors"]) == []


@pytest.mark.parametrize("schema", ["flags", "mergekit"])
def test_overwrite_never_replaces_a_folder_that_holds_no_model(work: Path, cli, schema: str) -> None:
    (work / "docs" / "sub").mkdir(parents=True)  # someone's folder: --overwrite once deleted all of it
    (work / "docs" / "notes.txt").write_text("precious")
    (work / "docs" / "sub" / "thesis.tex").write_text("x")
    if schema == "flags":
        argv: list[object] = [*INTERP, work / "msa", work / "docs", "--overwrite"]
    else:
        cfg = work / "mk.yaml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - {{model: {work / 'msa'}, parameters: {{weight: 1}}}}\n"
                       f"  - {{model: {work / 'base'}, parameters: {{weight: 1}}}}\n")
        argv = ["merge", cfg, work / "docs", "--overwrite"]
    before = snapshot(work)
    refused(cli(*argv), 2, "docs", "holds no model")
    assert snapshot(work) == before
    res = cli(*argv[:-2], work / "fresh")  # the same merge into a new folder works, and may then be replaced
    assert res.rc == 0, res.err
    assert cli(*argv[:-2], work / "fresh", "--overwrite").rc == 0


@pytest.mark.parametrize("schema", ["vlmerge", "mergekit"])
def test_the_config_file_is_an_input_too(work: Path, cli, schema: str) -> None:
    out = work / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output, which --overwrite may replace...
    cfg = out / "merge.yaml"  # ...but not while the config being run lies inside it
    if schema == "vlmerge":
        cfg.write_text(f"method: interpolation\ninput: {work / 'msa'}\noutput: {out}\n")
        argv: list[object] = ["merge", cfg, "--overwrite"]
    else:
        cfg.write_text(f"merge_method: linear\nmodels:\n  - {{model: {work / 'msa'}, parameters: {{weight: 1}}}}\n"
                       f"  - {{model: {work / 'base'}, parameters: {{weight: 1}}}}\n")
        argv = ["merge", cfg, out, "--overwrite"]
    before = snapshot(work)
    refused(cli(*argv), 2, "merge.yaml", "contains the input")
    assert snapshot(work) == before


def test_save_grams_is_never_a_fifo_and_needs_collected_grams(work: Path, cli) -> None:
    import stat

    os.mkfifo(work / "pipe")  # --overwrite once replaced it with a regular file
    res = cli("merge", "--method", "regmean", "--data", "world", "--batches", "1", "--save-grams", work / "pipe",
              work / "msa", work / "out", "--overwrite")
    refused(res, 2, "save_grams", "pipe", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(work / "pipe").st_mode)
    (work / "pipe").unlink()
    (work / "g.st").write_bytes(b"Grams")  # refused from the options alone: the file is never read
    before = snapshot(work)  # --grams with --save-grams once exited 0 and wrote no second file
    res = cli("merge", "--method", "regmean", "--grams", work / "g.st", "--save-grams", work / "g2.st",
              work / "msa", work / "out2")
    refused(res, 2, "save_grams", "'data'")
    soup = work / "soup.yaml"  # one Gram path for a soup of two once raised a TypeError
    soup.write_text(f"method: regmean\ninputs: [{work / 'msa'}, {work / 'base'}]\ngrams: {work / 'g.st'}\n"
                    f"output: {work / 'out3'}\n")
    res = cli("merge", soup)
    refused(res, 2, "soup.yaml", "'grams'", "one Gram file per model")
    assert snapshot(work) == {**before, "soup.yaml": soup.read_bytes()}


@pytest.mark.parametrize("argv", [
    ["--batches", str(10**20)], ["--batches", "0"], ["--batches", "-1"], ["--seed", "-1"], ["--seed", str(2**64)],
])
def test_counts_beyond_range_are_usage_errors(work: Path, cli, capsys: pytest.CaptureFixture[str],
                                              argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:  # an argparse usage error: exit 2, one line
        cli("merge", "--method", "regmean", "--data", "world", *argv, work / "msa", work / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argv[0] in err[0] and "expected an integer from" in err[0], err
    assert not (work / "out").exists()


@pytest.mark.parametrize("kind", ["symlink loop", "name too long"])
def test_an_output_path_that_cannot_exist_is_bad_input(work: Path, cli, kind: str) -> None:
    if kind == "symlink loop":
        (work / "a").symlink_to(work / "b")
        (work / "b").symlink_to(work / "a")
        out, want = work / "a" / "merged", "loop of symbolic links"
    else:
        out, want = work / ("m" * 300), "File name too long"
    before = snapshot(work)
    refused(cli(*INTERP, work / "msa", out), 2, want)
    assert snapshot(work) == before


def test_a_soup_names_each_model_once_and_its_base_is_no_input(work: Path, cli) -> None:
    """`--inputs A A` (a hidden 2:1 weight) and a base that is one of the inputs (a zero task vector) are
    refused, however the path is spelled."""
    before = snapshot(work)
    res = cli("merge", "--method", "average", "--inputs", work / "msa", work / "base", f"{work}/./msa", "-o",
              work / "out")
    refused(res, 2, "--inputs", "given twice", "--weights")
    res = cli("merge", "--method", "modality_arithmetic", "--lam", "0.5", "--inputs", work / "msa", work / "base",
              "--base", work / "base", "-o", work / "out")
    refused(res, 2, "--base", "also one of the inputs")
    assert snapshot(work) == before and leftovers(work, ["msa", "base"]) == []


# ----------------------------------------------------------------------------- broken or wrong models
def _drop_config(w: Path) -> None:
    (w / "msa" / "config.json").unlink()


BROKEN: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing config": (_drop_config, ["config.json"]),
    "config not an object": (lambda w: (w / "msa" / "config.json").write_text("[1, 2]"), ["config.json"]),
    "config nested too deep": (lambda w: (w / "msa" / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                               ["config.json"]),
    "config not UTF-8": (lambda w: (w / "msa" / "config.json").write_bytes(b'{"model": "\xff\xfe"}'),
                         ["config.json"]),
    "wrong type": (lambda w: edit_config(w / "msa", embed_dim="32"), ["embed_dim"]),
    "bool for a number": (lambda w: edit_config(w / "msa", depth=True), ["depth"]),
    "width mismatch": (lambda w: edit_config(w / "msa", embed_dim=64),
                       ["shape mismatches", "config.json", "embed_dim 64"]),
    "extra tensor": (lambda w: rewrite(w / "msa", lambda sd: sd.update(junk=torch.zeros(3))),
                     ["unexpected keys (1): junk"]),
    "missing tensor": (lambda w: rewrite(w / "msa", lambda sd: sd.pop("norm.bias")), ["missing keys (1): norm.bias"]),
    "one expert copy missing": (lambda w: rewrite(w / "msa", lambda sd: sd.pop("blocks.1.mlp.vl.fc1.weight")),
                                ["blocks.1.mlp.vl.fc1.weight"]),
    "wrong shape": (lambda w: rewrite(w / "msa", lambda sd: sd.update({"blocks.0.attn.v.proj.bias": torch.zeros(5)})),
                    ["blocks.0.attn.v.proj.bias", "[5]"]),
    "int64 weight": (lambda w: rewrite(w / "msa", lambda sd: sd.update(
        {"blocks.0.norm1.v.weight": torch.ones(32, dtype=torch.int64)})), ["blocks.0.norm1.v.weight", "int64"]),
    "float8 weight": (lambda w: rewrite(w / "msa", lambda sd: sd.update(
        {"blocks.0.norm1.v.weight": torch.ones(32).to(torch.float8_e4m3fn)})), ["blocks.0.norm1.v.weight"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_input_is_refused_before_writing(work: Path, cli, case: str) -> None:
    corrupt, names = BROKEN[case]
    corrupt(work)
    before = snapshot(work)
    res = cli(*INTERP, work / "msa", work / "out")
    refused(res, 2, *names)
    assert snapshot(work) == before
    assert leftovers(work, ["msa", "base"]) == []


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--method", "modality_arithmetic", "--param", "lam=.inf", "--base", "{base}"], ["lam", "finite"]),
        (["--method", "modality_arithmetic", "--lam", "1e39", "--base", "{base}"], ["lam", "float32"]),
        (["--method", "interpolation", "--param", "alpha=true"], ["alpha", "true"]),
        (["--method", "interpolation", "--param", "alpha=["], ["--param alpha", "YAML"]),  # bad YAML in --param
        (["--method", "ties", "--density", "nan", "--base", "{base}"], ["density"]),
    ],
)
def test_bad_parameters_refused(work: Path, cli, argv: list[str], names: list[str]) -> None:
    before = snapshot(work)
    res = cli("merge", *(a.replace("{base}", str(work / "base")) for a in argv), work / "msa", work / "out")
    refused(res, 2, *names)
    assert snapshot(work) == before and not (work / "out").exists()


def test_weights_that_overflow_are_an_error(work: Path, cli) -> None:
    before = snapshot(work)
    res = cli("merge", "--method", "average", "--inputs", work / "msa", work / "base", "--weights", "3e38,3e38",
              "--no-normalize", "-o", work / "out")
    refused(res, 2, "overflowed")
    assert snapshot(work) == before
    assert leftovers(work, ["msa", "base"]) == []


def test_ties_on_finite_inputs_near_float32_max(work: Path, cli) -> None:
    key = "blocks.0.attn.{}.proj.weight"

    def near_max(sign: float) -> Callable[[dict[str, torch.Tensor]], None]:
        def edit(sd: dict[str, torch.Tensor]) -> None:
            for m in ("v", "l"):
                sd[key.format(m)][0, 0] = sign * 3e38
        return edit

    rewrite(work / "msa", near_max(1.0))
    rewrite(work / "base", near_max(-1.0))
    before = snapshot(work)
    res = cli("merge", "--method", "ties", "--base", work / "base", work / "msa", work / "out")
    refused(res, 2, "blocks.0.attn.shared.proj.weight", "overflowed")
    assert snapshot(work) == before
    assert leftovers(work, ["msa", "base"]) == []


# ------------------------------------------------------------------------------ paths out of the folder
def _shard(work: Path, target: str) -> None:
    ckpt = work / "msa"
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    sd = load_file(str(ckpt / "model-00001-of-00001.safetensors"))
    weight_map = {k: "model-00001-of-00001.safetensors" for k in sd}
    weight_map["norm.bias"] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("target", ["../other/model.safetensors", "/etc/passwd", "/nonexistent/x.safetensors",
                                    "sub/../../other/model.safetensors"])
def test_shard_names_stay_inside_the_checkpoint(work: Path, cli, target: str) -> None:
    (work / "other").mkdir()
    shutil.copy(work / "base" / "model.safetensors", work / "other" / "model.safetensors")
    _shard(work, target)
    before = snapshot(work)
    res = cli(*INTERP, work / "msa", work / "out")
    refused(res, 2, "model.safetensors.index.json", repr(target))
    assert "exist" not in res.lines[0].replace(target, "")  # says nothing of whether the target exists
    assert snapshot(work) == before and not (work / "out").exists()


# -------------------------------------------------------------------- pickles, environment failures
def test_a_pickle_given_as_grams_is_never_unpickled(work: Path, cli) -> None:
    marker = work / "unpickled"

    class Boom:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    (work / "grams.pt").write_bytes(pickle.dumps(Boom()))
    res = cli("merge", "--method", "regmean", "--grams", work / "grams.pt", work / "msa", work / "out")
    refused(res, 2, "grams.pt")
    assert not marker.exists() and not (work / "out").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_exit_1_and_leaves_nothing(work: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                             code: int) -> None:
    from vlmerge.models import checkpoint

    def fail(self: checkpoint.SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> None:
        assert ".out.tmp-" in str(self.path)  # the writer writes into the temp folder ...
        raise OSError(code, os.strerror(code), str(self.path))

    monkeypatch.setattr(checkpoint.SafetensorsStreamWriter, "write", fail)
    before = snapshot(work)
    res = cli(*INTERP, work / "msa", work / "out")
    refused(res, 1, str(work / "out" / "model.safetensors"))  # ... and the error names the file it was for
    assert ".tmp-" not in res.err
    assert snapshot(work) == before
    assert leftovers(work, ["msa", "base"]) == []


# ----------------------------------------------------------------------------- leftovers, permissions
def test_stale_temps_of_a_killed_merge_are_removed_or_restored(work: Path, cli) -> None:
    dead = 4_194_305  # above Linux's largest pid_max: never a running process
    (work / f".out.tmp-{dead}-abcd1234").mkdir()
    (work / f".out.tmp-{dead}-abcd1234" / "model.safetensors").write_bytes(b"half")
    res = cli(*INTERP, work / "msa", work / "out")
    assert res.rc == 0, res.err
    assert leftovers(work, ["msa", "base", "out"]) == []
    assert "removed" in res.err and f".out.tmp-{dead}-abcd1234" in res.err
    # killed between the two renames of a replace: the previous output is only in .old-*/ckpt
    good = snapshot(work / "out")
    old = work / f".out.old-{dead}-xyz_9876"
    old.mkdir()
    (work / "out").rename(old / "ckpt")
    res = cli(*INTERP, work / "msa", work / "out")  # no --overwrite: restored, then refused as existing
    assert res.rc == 2 and len(res.lines) == 2 and "restored the previous output" in res.lines[0]
    assert "exists and is not empty" in res.lines[1]
    assert snapshot(work / "out") == good and not old.exists()


def test_outputs_follow_the_umask(work: Path, cli) -> None:
    old = os.umask(0o027)
    try:
        res = cli(*INTERP, work / "msa", work / "out")
    finally:
        os.umask(old)
    assert res.rc == 0, res.err
    assert (work / "out").stat().st_mode & 0o777 == 0o750
    for f in ("model.safetensors", "config.json"):
        assert (work / "out" / f).stat().st_mode & 0o777 == 0o640, f


def test_a_good_merge_still_works_and_loads(work: Path, cli) -> None:
    """The positive control of this file: the same inputs, untouched, merge and load."""
    res = cli(*INTERP, work / "msa", work / "out")
    assert res.rc == 0, res.err
    assert load_model(work / "out").config.arch == "maa"


# ------------------------------------------------------------------------------------------- hypothesis
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                    st.integers(), max_size=2),
)
FIELDS = ["arch", "image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
          "num_vl_layers", "vocab_size", "max_text_len", "type_vocab_size", "qkv_bias", "prenorm", "ln_eps",
          "text_embed_norm", "proj_dim", "heads", "num_answers", "init_std", "tied_init", "not_a_field"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_any_config_value_is_merged_correctly_or_refused_in_one_line(micro_ckpts: Path, tmp_path_factory,
                                                                    capsys, key: str, value: object) -> None:
    from vlmerge.cli import main

    work = tmp_path_factory.mktemp("hyp")
    shutil.copytree(micro_ckpts / "msa", work / "msa")
    edit_config(work / "msa", **{key: value})
    before = snapshot(work)
    capsys.readouterr()
    rc = main([*INTERP, str(work / "msa"), str(work / "out")])
    res = Result(rc, capsys.readouterr().err)
    assert snapshot(work / "msa") == {k.removeprefix("msa/"): v for k, v in before.items()}
    if rc == 0:  # the value was valid and the architecture matched: the result must load
        load_model(work / "out")
    else:
        refused(res, 2)
        assert leftovers(work, ["msa"]) == []


def test_an_output_that_appears_during_the_merge_is_not_replaced(work: Path, cli,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two merges to one new output: the one that finishes second must not replace the first's result."""
    from vlmerge.models import checkpoint

    close = checkpoint.SafetensorsStreamWriter.close

    def other_writer_first(self: checkpoint.SafetensorsStreamWriter) -> None:
        (work / "out").mkdir(exist_ok=True)
        (work / "out" / "theirs.txt").write_text("the other merge's result")
        close(self)

    monkeypatch.setattr(checkpoint.SafetensorsStreamWriter, "close", other_writer_first)
    res = cli(*INTERP, work / "msa", work / "out")
    refused(res, 2, "filled by someone else while merging")
    assert snapshot(work / "out") == {"theirs.txt": b"the other merge's result"}
    assert leftovers(work, ["msa", "base", "out"]) == []


@pytest.mark.parametrize("case", ["int64 weight", "float8 weight", "width mismatch", "one expert copy missing"])
@pytest.mark.parametrize("command", [("eval", "itm"), ("distance",)])
def test_eval_and_distance_refuse_what_merge_refuses(work: Path, cli, case: str, command: tuple[str, ...]) -> None:
    """The same architecture check guards every reader: no silent cast of integer / float8 weights."""
    corrupt, names = BROKEN[case]
    corrupt(work)
    before = snapshot(work)
    res = cli(*command, work / "msa")
    refused(res, 2, *names)
    assert snapshot(work) == before and not (work / "msa" / "eval").exists()


def test_user_files_that_look_like_temps_are_never_touched(work: Path, cli) -> None:
    """Only names exactly as vlmerge makes them (pid + 8 random characters) are its temps."""
    (work / ".out.tmp-notes.txt").write_text("notes")
    (work / ".out.old-2024").mkdir()
    (work / ".out.old-2024" / "important.txt").write_text("keep")
    (work / f".out.old-{os.getpid()}-abcd1234").mkdir()  # a live writer's (ours): not stale
    before = snapshot(work)
    res = cli(*INTERP, work / "msa", work / "out")
    assert res.rc == 0 and "removed" not in res.err, res.err
    after = snapshot(work)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


@pytest.mark.parametrize("out", ["", "."])
def test_the_working_directory_is_never_an_output(work: Path, cli, monkeypatch: pytest.MonkeyPatch,
                                                   out: str) -> None:
    monkeypatch.chdir(work)
    (work / "precious.txt").write_text("p")
    before = snapshot(work)
    res = cli(*INTERP, work / "msa", out, "--overwrite")
    refused(res, 2, "working directory")  # "" is the working directory to every path API
    assert snapshot(work) == before


@pytest.mark.parametrize(("flag", "value"), [("--alpha-schedule", "0.5,,0.5"), ("--alpha-schedule", "0.5,0.5,"),
                                             ("--alpha-schedule", ""), ("--weights", "0.5,,0.5"),
                                             ("--weights", "v=0.5,,l=0.5")])
def test_an_empty_list_item_is_refused_not_dropped(work: Path, cli, capsys: pytest.CaptureFixture[str], flag: str,
                                                   value: str) -> None:
    # '0.5,,0.5' on a 2-layer model once merged with [0.5, 0.5]: the dropped item shifts every later layer's value
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:  # an argparse usage error: exit 2, one line
        cli("merge", work / "msa", work / "out", "--method", "interpolation", flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "empty item" in err[0], err
    assert snapshot(work) == before and not (work / "out").exists()
