"""The files a mergekit-YAML merge copies beside the weights (config, tokenizer, processor): symlinks are followed
and their content copied (a Hugging Face cache links every file into ``blobs/``); anything else of a copied
name that is not a regular file, and a ``tokenizer_source`` without a tokenizer, is refused before the output
is opened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fuzz_helpers import refused, snapshot


def config(work: Path, **extra: str) -> Path:
    cfg = work / "mk.yaml"
    lines = [f"merge_method: linear\nbase_model: {work / 'base'}\nmodels:",
             f"  - {{model: {work / 'msa'}, parameters: {{weight: 1}}}}",
             f"  - {{model: {work / 'base'}, parameters: {{weight: 1}}}}"]
    cfg.write_text("\n".join([*lines, *(f"{k}: {v}" for k, v in extra.items())]) + "\n")
    return cfg


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_symlinks_out_of_the_model_folder_are_copied_as_content(work: Path, cli) -> None:
    blobs = work / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_text('{"tok": 1}')
    (blobs / "def456").write_text("[PAD]\nx\n")
    (work / "base" / "tokenizer.json").symlink_to(blobs / "abc123")
    (work / "base" / "vocab.txt").symlink_to(os.path.relpath(blobs / "def456", work / "base"))
    res = cli("merge", config(work), work / "out")
    assert res.rc == 0, res.err
    for name, blob in (("tokenizer.json", "abc123"), ("vocab.txt", "def456")):
        assert not (work / "out" / name).is_symlink()  # the output owns its copy
        assert (work / "out" / name).read_bytes() == (blobs / blob).read_bytes()
    assert (blobs / "abc123").read_text() == '{"tok": 1}'


@pytest.mark.parametrize("name", ["vocab.txt", "tokenizer.json", "preprocessor_config.json",
                                  "generation_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling symlink", "symlink to a fifo", "device"])
def test_a_copied_name_that_is_no_regular_file_is_refused(work: Path, cli, name: str, kind: str) -> None:
    p = work / "base" / name
    if kind == "fifo":  # was silently skipped: the output lacked the file the user saw in the folder
        os.mkfifo(p)
    elif kind == "folder":
        p.mkdir()
    elif kind == "dangling symlink":
        p.symlink_to(work / "gone.txt")
    elif kind == "symlink to a fifo":
        os.mkfifo(work / "pipe")
        p.symlink_to(work / "pipe")
    else:
        p.symlink_to("/dev/null")
    cfg = config(work)
    before, names = snapshot(work), listing(work)
    refused(cli("merge", cfg, work / "out"), 2, "mk.yaml", "base_model", str(p), "expected a regular file")
    assert snapshot(work) == before and listing(work) == names  # no output, no temp folder


def test_a_tokenizer_source_without_a_tokenizer_is_refused(work: Path, cli) -> None:
    (work / "empty").mkdir()
    (work / "empty" / "preprocessor_config.json").write_text("{}")  # a processor file is no tokenizer
    for source, names in ((str(work / "empty"), [str(work / "empty"), "tokenizer.json"]),
                          ("base", [str(work / "base")])):  # the base has none either
        cfg = config(work, tokenizer_source=source)
        before, listed = snapshot(work), listing(work)
        refused(cli("merge", cfg, work / "out"), 2, "tokenizer_source", "none of the tokenizer files", *names)
        assert snapshot(work) == before and listing(work) == listed
    (work / "empty" / "vocab.txt").write_text("[PAD]\n")
    res = cli("merge", config(work, tokenizer_source=str(work / "empty")), work / "out")
    assert res.rc == 0, res.err
    assert (work / "out" / "vocab.txt").read_text() == "[PAD]\n"
    assert (work / "out" / "preprocessor_config.json").read_text() == "{}"


def test_no_tokenizer_is_fine_when_none_was_asked_for(work: Path, cli) -> None:
    res = cli("merge", config(work), work / "out")  # default: the base's tokenizer files, whichever exist
    assert res.rc == 0, res.err
    assert stat.S_ISREG(os.lstat(work / "out" / "config.json").st_mode)
    assert not (work / "out" / "tokenizer.json").exists()
