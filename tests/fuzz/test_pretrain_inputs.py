"""``vlmerge pretrain`` and its run folder: one writer at a time, nothing written on bad input, a resume reads
only this run's checkpoints, and a save that fails (disk full) leaves the previous checkpoint as the latest."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from vlmerge.cli import main
from vlmerge.files import RunLock
from vlmerge.models import load_model
from vlmerge.pretrain import state
from vlmerge.pretrain.state import LATEST, STATE_JSON, STATE_TENSORS, read_state_meta

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# micro with a 2-step seed stage and a 2-step VL stage on 20 images: a step takes milliseconds
SETS = ["train.steps=4", "recipe.seed_steps=2", "data.train_images=20", "data.eval_images=4", "train.batch_size=4",
        "train.ckpt_every=100", "train.log_every=1", "optim.warmup_steps=1", "train.device=cpu"]


def pretrain_argv(out: Path, *extra: str, sets: list[str] | None = None) -> list[str]:
    argv = ["pretrain", "--config", str(CONFIGS / "micro.yaml"), "--out", str(out), "--no-progress"]
    for s in [*SETS, *(sets or [])]:
        argv += ["--set", s]
    return [*argv, *extra]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlmerge pretrain: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after step 1, inside its seed stage: checkpoints/step-00000001 holds an optimiser state."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(pretrain_argv(out, "--stop-after", "1")) == 0
    assert json.loads((out / "checkpoints" / LATEST).read_text())["dir"] == "step-00000001"
    return out


@pytest.fixture
def run(stopped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


# ------------------------------------------------------------------------------------------------- the lock
def test_a_second_run_on_a_locked_run_folder_fails_at_once(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(run)
    with RunLock(run):
        assert main(pretrain_argv(run)) == 1
    assert "another vlmerge process is writing this pre-training run folder" in one_line_error(capsys)
    assert snapshot(run) == before


def test_a_new_run_folder_is_locked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        assert main(pretrain_argv(out)) == 1
    assert str(out) in one_line_error(capsys)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------- bad flags and --out
@pytest.mark.parametrize(("sets", "extra", "culprit"), [
    (["optim.lr=["], [], "--set optim.lr"),  # YAML that does not parse: named by its key
    (["optim.lr=abc"], [], "optim.lr"),
    (["train.micro_batch_size=3"], [], "train.micro_batch_size=3"),
    (["recipe.seed_steps=9"], [], "train.steps=4"),
    ([], ["--stop-after", "0"], "--stop-after"),
])
def test_bad_flags_are_refused_before_the_run_folder_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], extra: list[str], culprit: str
) -> None:
    out = tmp_path / "run"
    assert main(pretrain_argv(out, *extra, sets=sets)) == 2
    assert culprit in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["a checkpoint", "the run's own out"])
def test_a_cache_dir_that_is_someone_elses_folder_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"my weights")
    out = tmp_path / "run"
    cache = ckpt if where == "a checkpoint" else out
    before = snapshot(tmp_path)
    assert main(pretrain_argv(out, sets=[f"data.cache_dir={cache}"])) == 2
    line = one_line_error(capsys)
    assert f"data.cache_dir {cache}" in line and ("model.safetensors" in line or "output folder" in line), line
    assert snapshot(tmp_path) == before


def test_an_unwritable_cache_dir_is_refused_before_the_run_folder_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    (tmp_path / "cache").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "cache" else real_access(p, mode))
    assert main(pretrain_argv(tmp_path / "run", sets=[f"data.cache_dir={tmp_path / 'cache'}"])) == 1
    line = one_line_error(capsys)
    assert str(tmp_path / "cache") in line and "data.cache_dir" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_cache_dir_that_cannot_be_a_folder_is_refused_before_the_run_folder_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (tmp_path / "afile").write_bytes(b"x")
    cache = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    assert main(pretrain_argv(tmp_path / "run", sets=[f"data.cache_dir={cache}"])) == 2
    line = one_line_error(capsys)
    assert f"data.cache_dir {cache}" in line and "file" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_out_that_is_a_file_or_holds_something_else_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes(b"mine\n")
    assert main(pretrain_argv(f)) == 2
    assert "is not a directory" in one_line_error(capsys)
    folder = tmp_path / "folder"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "config.json").write_bytes(b"{}")
    before = snapshot(tmp_path)
    assert main(pretrain_argv(folder)) == 2
    assert "holds no pre-training run" in one_line_error(capsys)
    assert snapshot(tmp_path) == before and f.read_bytes() == b"mine\n"


# ------------------------------------------------------------------------------------------- latest.json
@pytest.mark.parametrize("pointer", [
    "absolute", {"dir": "../../other/checkpoints/step-00000001"}, {"dir": 1}, {"global_step": 1}, [1], "step",
])
def test_latest_json_must_name_a_checkpoint_inside_the_run(
    run: Path, stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: Any
) -> None:
    other = tmp_path / "other"
    shutil.copytree(stopped, other)  # a complete checkpoint of another run: still refused
    if pointer == "absolute":
        pointer = {"dir": str(other / "checkpoints" / "step-00000001")}
    (run / "checkpoints" / LATEST).write_text(json.dumps(pointer))
    before = snapshot(tmp_path)
    assert main(pretrain_argv(run)) == 2
    line = one_line_error(capsys)
    assert str(run / "checkpoints" / LATEST) in line and "expected" in line
    assert snapshot(tmp_path) == before


def test_a_latest_json_that_is_a_folder_is_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    pointer = run / "checkpoints" / LATEST
    pointer.unlink()
    pointer.mkdir()
    before = snapshot(tmp_path)
    assert main(pretrain_argv(run)) == 2
    line = one_line_error(capsys)
    assert str(pointer) in line and "not a file" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["pickle", "random", "missing key", "not an object"])
def test_a_damaged_training_state_is_refused_naming_the_file(
    run: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    ckpt = run / "checkpoints" / "step-00000001"
    if damage == "pickle":
        victim = ckpt / STATE_TENSORS
        victim.write_bytes(pickle.dumps({"rng.cpu": [1, 2, 3]}))
    elif damage == "random":
        victim = ckpt / STATE_TENSORS
        victim.write_bytes(bytes(range(256)) * 4)
    else:
        victim = ckpt / STATE_JSON
        meta = json.loads(victim.read_text())
        victim.write_text(json.dumps([meta] if damage == "not an object" else {k: v for k, v in meta.items()
                                                                               if k != "stage_step"}))
    before = snapshot(run)
    assert main(pretrain_argv(run)) == 2
    assert str(victim) in one_line_error(capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["nan optimiser state", "string lr", "negative eps", "betas", "stage not a name",
                                    "maximize", "unknown group key"])
def test_a_resume_refuses_training_state_it_cannot_continue_from(
    run: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = run / "checkpoints" / "step-00000001"
    if damage == "nan optimiser state":
        victim = ckpt / STATE_TENSORS
        tensors = load_file(str(victim))
        key = next(k for k in sorted(tensors) if k.startswith("optim.") and k.endswith(".exp_avg"))
        tensors[key][..., 0] = float("nan")
        save_file(tensors, str(victim))
        want = [key, "NaN"]
    else:
        victim = ckpt / STATE_JSON
        meta = json.loads(victim.read_text())
        group = meta["optimizer_groups"][0]
        if damage == "string lr":
            group["lr"], want = "0.001", ["optimizer_groups[0].lr"]
        elif damage == "negative eps":
            group["eps"], want = -1.0, ["optimizer_groups[0].eps"]
        elif damage == "betas":
            group["betas"], want = [0.9], ["optimizer_groups[0].betas"]
        elif damage == "maximize":  # would train uphill from the resumed step on
            group["maximize"], want = True, ["optimizer_groups[0].maximize=True"]
        elif damage == "unknown group key":
            group["momentum"], want = 0.9, ["optimizer_groups[0]", "'momentum'"]
        else:
            meta["stage"], want = 3, ["'stage'"]
        victim.write_text(json.dumps(meta))
    before = snapshot(run)
    assert main(pretrain_argv(run)) == 2
    line = one_line_error(capsys)
    assert str(victim) in line and all(w in line for w in want), line
    assert snapshot(run) == before


def test_a_deleted_latest_json_resumes_from_the_newest_step_folder(run: Path, stopped: Path, tmp_path: Path) -> None:
    """Without latest.json the run does not restart at step 0 over its own checkpoints: it resumes from the
    newest complete step folder and ends with the weights of a run that never lost the pointer."""
    import torch

    (run / "checkpoints" / LATEST).unlink()
    assert state.latest_checkpoint(run) == run / "checkpoints" / "step-00000001"
    assert main(pretrain_argv(run)) == 0
    reference = tmp_path / "reference"
    shutil.copytree(stopped, reference)
    assert main(pretrain_argv(reference)) == 0
    a, b = load_model(run / "final").state_dict(), load_model(reference / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ disk full
def _no_space(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["train_state", "latest.json"])
def test_a_save_that_runs_out_of_disk_keeps_the_previous_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "train_state":  # inside the step folder: half of it is written
        monkeypatch.setattr(state, "save_tensors", _no_space)
    else:  # the step folder is complete, the pointer to it cannot be written
        write_json = state.atomic_write_json

        def fail_latest(path: Path, obj: Any) -> None:
            if Path(path).name == LATEST:
                _no_space()
            write_json(path, obj)

        monkeypatch.setattr(state, "atomic_write_json", fail_latest)
    assert main(pretrain_argv(run, "--stop-after", "2")) == 1
    assert "no space left on device" in one_line_error(capsys)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-00000001"]  # no step-2, no .step-2 temp
    assert json.loads((root / LATEST).read_text())["dir"] == "step-00000001"
    ckpt = root / "step-00000001"
    assert read_state_meta(ckpt)["global_step"] == 1 and load_model(ckpt).config.arch == "maa"
    assert (ckpt / STATE_TENSORS).is_file()

    monkeypatch.undo()  # space again: the resume goes on from step 1
    assert main(pretrain_argv(run, "--stop-after", "2")) == 0
    assert json.loads((root / LATEST).read_text())["dir"] == "step-00000002"


def test_the_next_save_removes_the_temp_folder_of_a_killed_save(run: Path) -> None:
    root = run / "checkpoints"
    stale = root / ".step-00000002.tmp-99999999-x1y2z3w4"  # no such pid: its writer is gone
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(pretrain_argv(run, "--stop-after", "2")) == 0
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-00000001", "step-00000002"]
    assert not [p for p in run.rglob(".*")]
