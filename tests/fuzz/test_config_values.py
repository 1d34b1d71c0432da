"""Config values through the one loader: booleans where numbers go, NaN / Inf, and values of every YAML type
for every section of pre-training, fine-tuning and the studies are refused in one line naming the key (or
accepted as a valid config), never passed on to crash a run; a cache record that is not one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_helpers import refused, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmerge.finetune.config import FinetuneConfig, resolve_config
from vlmerge.pretrain import PretrainConfig, load_config
from vlmerge.study.runner import StudyConfig, load_study_config


def leaf_keys(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += leaf_keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


YAML_VALUES = st.sampled_from(["true", "false", ".inf", "-.inf", ".nan", "1e999", "-1", "0", "3", "0.5", "1e-3",
                               "abc", "''", "[1, 2]", "{a: 1}", "null", "[0.9, .nan]", "99999999999999999999"])


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(leaf_keys(PretrainConfig)), value=YAML_VALUES)
def test_pretrain_values_validate_or_are_refused(key: str, value: str) -> None:
    try:
        load_config("micro", [f"{key}={value}"])
    except ValueError as e:
        assert key.split(".")[0] in str(e) and "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(leaf_keys(FinetuneConfig)), value=YAML_VALUES)
def test_finetune_values_validate_or_are_refused(key: str, value: str) -> None:
    try:
        resolve_config("vqa", "micro", sets=[f"{key}={value}"])
    except ValueError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(leaf_keys(StudyConfig)), value=YAML_VALUES)
def test_study_values_validate_or_are_refused(key: str, value: str) -> None:
    try:
        load_study_config("micro", [f"{key}={value}"])
    except ValueError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(("sets", "names"), [
    (["optim.lr=.inf"], ["optim.lr", "finite"]),
    (["train.steps=true"], ["train.steps", "true"]),
    (["optim.betas=[0.9, .nan]"], ["optim.betas[1]", "finite"]),
    (["optim.warmup_steps=1e999"], ["optim.warmup_steps"]),
])
def test_pretrain_cli_refuses_before_the_run_folder_exists(tmp_path: Path, cli, sets: list[str],
                                                          names: list[str]) -> None:
    res = cli("pretrain", "--config", "micro", "--out", tmp_path / "run", *[a for s in sets for a in ("--set", s)])
    refused(res, 2, *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("meta", ["[1, 2]", '"text"', "0", '{"format": 1}',
                                  '{"format": "x", "kind": "scenes", "config": {}, "split": "train", "seed": 0, '
                                  '"shard_size": "big", "n": 3, "complete": true}'])
def test_data_cache_refuses_a_record_that_is_not_one(tmp_path: Path, cli, meta: str) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "meta.json").write_text(meta)
    before = snapshot(tmp_path)
    res = cli("data", "cache", "--split", "train", "--n", "2", "--out", tmp_path / "c")
    refused(res, 2, "meta.json")
    assert snapshot(tmp_path) == before


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(micro_ckpts: Path, tmp_path: Path, cli) -> None:
    """The micro checkpoint has 40 word rows and no tokenizer record: the world tokenizer's ids would index
    past its embedding (an IndexError deep in a forward pass before)."""
    res = cli("finetune", "retrieval", "--init", micro_ckpts / "msa", "--out", tmp_path / "ft",
              "--set", "max_steps=1", "--set", "data.train_size=8", "--set", "data.eval_size=8")
    refused(res, 2, "vocab_size=40", "tokenizer")
    assert not (tmp_path / "ft").exists()


def test_a_diverging_fine_tune_is_exit_1_in_one_line(tmp_path: Path, cli) -> None:
    """A learning rate so large that the loss becomes NaN: the run failed, not the code or its input."""
    import torch

    from vlmerge.data import default_tokenizer
    from vlmerge.models import VLMo, preset_config, save_model

    tok = default_tokenizer()
    torch.manual_seed(0)
    save_model(VLMo(preset_config("micro", "msa", vocab_size=tok.vocab_size)), tmp_path / "init",
               tokenizer=tok.to_config())
    res = cli("finetune", "retrieval", "--init", tmp_path / "init", "--out", tmp_path / "ft",
              "--set", "lr=1e30", "--set", "max_steps=4", "--set", "data.train_size=16", "--set", "data.eval_size=8")
    refused(res, 1, "diverged")
    assert not (tmp_path / "ft").exists()
