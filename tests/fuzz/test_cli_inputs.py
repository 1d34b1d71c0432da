"""Flags and outputs of the small commands: usage errors in one line, counts that must be positive, file
outputs that are never replaced without ``--overwrite``, and the exit codes of ``vlmerge.cli``."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fuzz_helpers import refused, snapshot

from vlmerge.cli import error_message


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["data", "preview", "--n", "-1", "--out", "{tmp}/p.png"], ["--n", "from 1 to"]),
        (["data", "cache", "--split", "train", "--n", "0", "--out", "{tmp}/c"], ["--n", "from 1 to"]),
        (["data", "cache", "--split", "train", "--n", "2", "--shard-size", "-5", "--out", "{tmp}/c"],
         ["--shard-size"]),
        (["data", "cache", "--split", "train", "--n", str(2**40), "--out", "{tmp}/c"], ["--n", "2147483647"]),
        (["pretrain", "--config", "micro", "--out", "{tmp}/r", "--stop-after", "-3"], ["--stop-after"]),
        (["eval", "retrieval", "{tmp}", "--rerank-k", str(10**30)], ["--rerank-k"]),
        (["model", "info", "--vocab-size", "x"], ["--vocab-size", "'x'"]),
        (["distance", "{tmp}", "--k", "nan"], ["--k", "finite"]),
        (["merge", "--method", "nope"], ["--method", "nope"]),
        (["no-such-command"], ["no-such-command"]),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                   names: list[str]) -> None:
    from vlmerge.cli import main

    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--help" in err[0], err
    for n in names:
        assert n in err[0], (n, err[0])
    assert list(tmp_path.iterdir()) == []


def test_preview_never_replaces_a_file_without_overwrite(tmp_path: Path, cli) -> None:
    target = tmp_path / "mine.png"
    target.write_bytes(b"my picture")
    res = cli("data", "preview", "--n", "2", "--image-size", "16", "--out", target)
    refused(res, 2, "--out", "mine.png", "--overwrite")
    assert target.read_bytes() == b"my picture"
    res = cli("data", "preview", "--n", "2", "--image-size", "16", "--out", target, "--overwrite")
    assert res.rc == 0 and target.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ValueError("bad value"), 2, "bad value"),
        (KeyError("model 'x' unknown"), 2, "model 'x' unknown"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b"), 2, "/a/b: No such file"),
        (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x"), 1, "/out/x: no space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro"), 1, "/ro: Permission denied"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/x" * 200), 2, "File name too long"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/l"), 2, "/l: Too many levels"),
        (RuntimeError("boom"), 1, "internal error RuntimeError: boom (run with --debug"),
    ],
)
def test_exit_codes(exc: BaseException, code: int, text: str) -> None:
    msg, rc = error_message(exc)
    assert rc == code and text in msg


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlmerge.cli import main

    for argv, traceback in (([], False), (["--debug"], True)):
        rc = main([*argv, "distance", str(tmp_path / "missing")])
        err = capsys.readouterr().err
        assert rc == 2 and ("Traceback" in err) == traceback


def test_preview_never_replaces_a_fifo_even_with_overwrite(tmp_path: Path, cli) -> None:
    import os
    import stat

    os.mkfifo(tmp_path / "pipe.png")
    res = cli("data", "preview", "--n", "2", "--image-size", "16", "--out", tmp_path / "pipe.png", "--overwrite")
    refused(res, 2, "pipe.png", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.png").st_mode) and len(list(tmp_path.iterdir())) == 1


def test_preview_never_replaces_a_dangling_symlink(tmp_path: Path, cli) -> None:
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")
    res = cli("data", "preview", "--n", "2", "--image-size", "16", "--out", tmp_path / "link.png")
    refused(res, 2, "link.png", "--overwrite")
    assert (tmp_path / "link.png").is_symlink()


def test_data_cache_refuses_an_empty_path(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = cli("data", "cache", "--split", "train", "--n", "2", "--out", "")
    refused(res, 2, "--out", "empty path")
    assert list(tmp_path.iterdir()) == []


def test_yaml_with_a_repeated_key_is_refused(tmp_path: Path, cli, micro_ckpts: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: interpolation\ninput: {micro_ckpts / 'msa'}\noutput: {tmp_path / 'o'}\n"
                   "method: average\n")
    res = cli("merge", cfg)
    refused(res, 2, "m.yaml", "duplicate key 'method'")
    with pytest.raises(SystemExit):  # an argparse usage error, one line (checked for every flag above)
        cli("merge", "--method", "average", "--weights", "v=1,v=2,l=1,vl=1", micro_ckpts / "msa", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_study_never_writes_into_a_folder_it_did_not_make(tmp_path: Path, cli, micro_ckpts: Path) -> None:
    import shutil

    shutil.copytree(micro_ckpts / "msa", tmp_path / "ckpt")
    before = snapshot(tmp_path)
    res = cli("study", "--preset", "micro", "--out", tmp_path / "ckpt")
    refused(res, 2, "ckpt", "holds no study")
    assert snapshot(tmp_path) == before


def test_finetune_output_filled_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    from vlmerge.finetune.api import _replace_dir

    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.txt").write_text("theirs")
    with pytest.raises(ValueError, match="filled by someone else"):
        _replace_dir(tmp_path / "tmp", tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "theirs.txt").read_text() == "theirs"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["model", "info", "--heads", ","], ["vlmerge model info: error:", "--heads", "comma-separated head names"]),
        (["model", "info", "--heads", "vqa,,itc"], ["--heads"]),
        (["merge", "--method", "ties", "--param", "=1", "{ckpt}", "{tmp}/out"], ["--param", "'=1'", "before '='"]),
        (["merge", "--method", "ties", "--param", "density", "{ckpt}", "{tmp}/out"], ["--param", "KEY=VALUE"]),
    ],
)
def test_malformed_lists_and_parameters_are_named(tmp_path: Path, cli, micro_ckpts: Path, argv: list[str],
                                                 names: list[str]) -> None:
    res = cli(*[a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(micro_ckpts / "msa")) for a in argv])
    refused(res, 2, *names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--method", "interpolation", "--alpha", "0.5", "{ckpt}", "{tmp}/afile/out"],
        ["merge", "--method", "regmean", "--data", "world", "--batches", "1", "--save-grams", "{tmp}/afile/g",
         "{ckpt}", "{tmp}/out"],
        ["pretrain", "--config", "micro", "--out", "{tmp}/afile/run"],
        ["finetune", "vqa", "--init", "{ckpt}", "--out", "{tmp}/afile/deeper/ft"],
        ["eval", "vqa", "{ckpt}", "--out", "{tmp}/afile/r.json"],
        ["study", "--preset", "micro", "--out", "{tmp}/afile/st"],
        ["data", "cache", "--split", "train", "--n", "2", "--out", "{tmp}/afile/c"],
        ["data", "preview", "--out", "{tmp}/afile/p.png"],
    ],
)
def test_an_output_below_a_file_names_that_file(tmp_path: Path, cli, micro_ckpts: Path, argv: list[str]) -> None:
    (tmp_path / "afile").write_bytes(b"precious")
    before = snapshot(tmp_path)
    res = cli(*[a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(micro_ckpts / "msa")) for a in argv])
    refused(res, 2, f"{tmp_path / 'afile'} is a file, not a folder")
    assert snapshot(tmp_path) == before
