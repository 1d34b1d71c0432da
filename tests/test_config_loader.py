"""The one config loader (``vlmerge.config``): YAML errors name the file, ``--set`` pairs, presets found by
name as package data -- also from a wheel installed outside the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from vlmerge.config import PRESET_ROOT, apply_sets, find_config, load, preset_names, read_yaml

REPO = Path(__file__).resolve().parents[1]


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1, ge=1)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "x"
    train: Inner = Field(default_factory=Inner)


def test_read_yaml_errors_name_the_file(tmp_path: Path) -> None:
    cases = {"bad.yaml": (b"a: [1, 2\n", r"bad.yaml: not valid YAML at line 2"),
             "list.yaml": (b"- 1\n- 2\n", r"list.yaml: expected a mapping .* got list"),
             "latin.yaml": (b"a: \xff\n", r"latin.yaml: not UTF-8"),
             "deep.yaml": (b"[" * 50_000 + b"]" * 50_000, r"deep.yaml: (nested too deeply|expected a mapping)")}
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=message):
            read_yaml(tmp_path / name)
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such config file"):
        read_yaml(tmp_path / "nope.yaml")


def test_sets_parse_yaml_values_and_never_modify_their_input() -> None:
    data = {"train": {"steps": 3}, "name": "a"}
    out = apply_sets(data, ["train.steps=7", "extra.list=[1, 2]", "name="])
    assert out == {"train": {"steps": 7}, "extra": {"list": [1, 2]}, "name": None}
    assert data == {"train": {"steps": 3}, "name": "a"}
    for bad, message in (("train.steps", "expects key=value"), ("=3", "expects key=value"),
                         ("a..b=1", "expects key=value"), ("name.x=1", "'name' is a value, not a section"),
                         ("train.steps=[", "--set train.steps: '\\[' is not a YAML value")):
        with pytest.raises(ValueError, match=message):
            apply_sets(data, [bad])


def test_validation_errors_name_the_source_key_and_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml: train.stepz: unknown key; allowed keys: steps$"):
        load(Outer, path)
    with pytest.raises(ValueError, match=r"c.yaml: train.steps: Input should be greater than or equal to 1 \(got 0\)"):
        load(Outer, path, overrides=["train={steps: 0}"])
    assert load(Outer, None, overrides=["train.steps=5"]).train.steps == 5


def test_presets_by_name_and_their_errors() -> None:
    assert find_config("tiny", "study") == PRESET_ROOT / "study" / "tiny.yaml"
    assert {"micro", "tiny", "small", "paper"} <= set(preset_names())
    with pytest.raises(FileNotFoundError, match=r"no preset 'tinny'; allowed values: \['micro', 'paper'"):
        find_config("tinny", "study")
    with pytest.raises(FileNotFoundError, match="no preset '../tiny'"):  # a name is a name, not a path
        find_config("../tiny", "study")


def test_a_wheel_install_finds_every_preset(tmp_path: Path) -> None:
    """Presets are package data: a non-editable install, run outside the repository, loads each of them."""
    # Built from a clean copy of the sources (an egg-info left in the checkout would list the data files itself),
    # without build isolation: setuptools comes with the test extra.
    src = tmp_path / "src-copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("vlmerge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"vlmerge/configs/{p.relative_to(PRESET_ROOT)}" for p in PRESET_ROOT.rglob("*.yaml")}
    assert shipped and shipped <= names
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("from vlmerge.config import PRESET_ROOT; from vlmerge.study.runner import load_study_config;"
            "from vlmerge.study.unival import load_unival_config; from vlmerge.pretrain import load_config;"
            "from vlmerge.finetune.config import resolve_config;"
            "assert 'site' in str(PRESET_ROOT), PRESET_ROOT;"
            "[load_study_config(p) for p in ('micro', 'tiny', 'small', 'paper')];"
            "[load_unival_config(p) for p in ('micro', 'tiny', 'small')];"
            "[load_config(p) for p in ('micro', 'tiny', 'small', 'paper')];"
            "[resolve_config(t, 'micro') for t in ('retrieval', 'vqa', 'nlvr2', 'cls', 'seg')]; print('ok')")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    # and the installed package runs the main job's smallest preset and a fine-tune from its result, as shipped
    # (``--only table1``: its seed branch comes before the first logged step, which once failed)
    cli = [sys.executable, "-c", "import sys; from vlmerge.cli import main; sys.exit(main(sys.argv[1:]))"]
    res = subprocess.run([*cli, "study", "--preset", "micro", "--only", "table1", "--out", "s", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and (tmp_path / "s" / "report.md").is_file(), res.stderr[-2000:]
    msa = sorted(p.parent for p in (tmp_path / "s" / "cells").rglob("final/config.json")
                 if json.loads(p.read_text())["model"]["arch"] == "msa")[0]
    res = subprocess.run([*cli, "finetune", "vqa", "--init", str(msa), "--out", "ft", "--set", "max_steps=2",
                          "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and (tmp_path / "ft" / "config.json").is_file(), res.stderr[-2000:]


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """'Billion laughs': 9 levels of 10 aliases name 10⁹ values in 300 bytes; validating or printing them once
    took gigabytes. Refused from the node graph, before anything is expanded."""
    names = "abcdefghi"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip(names, names[1:], strict=False)]
    path = tmp_path / "lol.yaml"
    path.write_text("\n".join(lines) + "\nmodels: *i\n")
    with pytest.raises(ValueError, match=r"lol\.yaml: not valid YAML .*expand it to more than 1,000,000 values"):
        read_yaml(path)
    path.write_text("a: &a [1, 2]\nb: [*a, *a]\n")  # ordinary aliases still work
    assert read_yaml(path) == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
