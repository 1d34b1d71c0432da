"""The unified answer head (UnIVAL's unified input/output): answer tokens, records, and that it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmerge.data import default_tokenizer
from vlmerge.finetune import evaluate, finetune
from vlmerge.finetune.unified import (
    ANSWER_SPACE,
    answer_token_ids,
    materialize,
    task_for,
    unified_dataset,
    unified_text,
)
from vlmerge.models import VLMo, load_model, preset_config, save_model


@pytest.fixture(scope="module")
def pico(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised pico VLMo (width 32, 2 layers, 16 px) with ITC / ITM / MLM heads."""
    tok = default_tokenizer()
    torch.manual_seed(0)
    m = VLMo(preset_config("micro", image_size=16, heads=("itc", "itm", "mlm"), vocab_size=tok.vocab_size,
                           num_vl_layers=2))
    return save_model(m, tmp_path_factory.mktemp("pico") / "init", tokenizer=tok.to_config())


def test_answer_tokens_are_first_word_pieces_and_distinct() -> None:
    tok = default_tokenizer()
    for task, answers in ANSWER_SPACE.items():
        ids = answer_token_ids(tok, answers, task)
        assert len(set(ids)) == len(answers)
    yes, no = answer_token_ids(tok, ("yes", "no"))
    assert tok.tokens[yes] == "y" and tok.tokens[no] == "n"  # not single tokens in the world vocabulary
    assert tok.tokens[answer_token_ids(tok, ("circle",))[0]] == "circle"
    with pytest.raises(ValueError, match="'yes' / 'y'"):
        answer_token_ids(tok, ("yes", "y"), "bad")


def test_unknown_unified_task_and_head_are_refused() -> None:
    with pytest.raises(ValueError, match="no unified answer mode"):
        task_for("seg", "unified")
    with pytest.raises(ValueError, match="allowed values"):
        task_for("vqa", "both")


def test_mask_is_first_and_survives_truncation() -> None:
    tok = default_tokenizer()
    long = "a small red circle " * 20
    ids = tok.encode([unified_text("itm", long)], 12)["input_ids"][0]
    assert int(ids[1]) == tok.mask_id


def test_ood_families_are_well_posed() -> None:
    ds = unified_dataset("largest-color", "test", 40, image_size=16)
    assert 0 < len(ds) <= 40
    item = ds[0]
    assert item["text"] == "what color is the largest object?" and item["answer"] in ANSWER_SPACE["largest-color"]
    size = unified_dataset("size", "test", 20, image_size=16)
    assert {size[i]["answer"] for i in range(len(size))} <= {"small", "large"}


@pytest.mark.parametrize("task,scenes", [("vqa", 8), ("nlvr2", 40), ("cls", 40), ("itm", 8)])
def test_unified_head_trains_pico_above_chance(pico: Path, tmp_path: Path, task: str, scenes: int) -> None:
    """60 steps on 40 items: the MLM head at [MASK], restricted to the task's answers, fits them well above the
    best constant answer; the checkpoint records the unified answer space and keeps the parameter set."""
    items = materialize(unified_dataset(task, "train", scenes, image_size=16))
    out = finetune(task, pico, tmp_path / task, preset="micro", train_data=items, eval_data=items,
                   sets=["head=unified", "max_steps=60", "lr=3e-3", "batch_size=40", "device=cpu", "log_every=1000"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == "unified"
    assert metrics["score"] > metrics["baseline"]["accuracy"] + 10
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["unified"]["answers"][task] == list(ANSWER_SPACE[task])
    assert set(load_model(out).state_dict()) == set(load_model(pico).state_dict())  # no head added
    # evaluate() recognises a unified checkpoint and reproduces the fine-tune's own evaluation
    again = evaluate(task, out, dataset=items, sets=["device=cpu"])
    assert again["score"] == pytest.approx(metrics["score"])
