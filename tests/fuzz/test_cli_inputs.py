"""Flags and outputs of the small commands: usage errors in one line, counts that must be positive, file
outputs that are never replaced without ``--overwrite``, and the exit codes of ``vlmerge.cli``."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fuzz_helpers import refused

from vlmerge.cli import error_message


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["data", "preview", "--n", "-1", "--out", "{tmp}/p.png"], ["--n", "≥ 1"]),
        (["data", "cache", "--split", "train", "--n", "0", "--out", "{tmp}/c"], ["--n", "≥ 1"]),
        (["data", "cache", "--split", "train", "--n", "2", "--shard-size", "-5", "--out", "{tmp}/c"],
         ["--shard-size"]),
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
