"""Fine-tuning configs: every task/preset file validates; errors name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmerge.finetune.config import TASKS, configs_dir, parse_sets, resolve_config, task_defaults, validate_config


@pytest.mark.parametrize("task", TASKS)
def test_every_preset_of_every_task_validates(task: str) -> None:
    doc = yaml.safe_load((configs_dir() / f"{task}.yaml").read_text())
    assert {"micro", "tiny", "paper"} <= set(doc["presets"])
    for preset in doc["presets"]:
        cfg = resolve_config(task, preset)
        assert cfg.task == task and cfg.preset == preset


def test_paper_settings_are_table6() -> None:
    vqa = resolve_config("vqa", "paper")
    assert (vqa.image_size, vqa.lr, vqa.batch_size, vqa.epochs) == (480, 3e-5, 128, 10)
    coco = resolve_config("retrieval", "paper")
    assert (coco.image_size, coco.lr, coco.batch_size, coco.epochs) == (384, 6.25e-6, 640, 20)
    f30k = resolve_config("retrieval", "paper-flickr30k")
    assert (f30k.image_size, f30k.lr, f30k.batch_size, f30k.epochs) == (384, 6.25e-7, 128, 40)
    nlvr2 = resolve_config("nlvr2", "paper")
    assert (nlvr2.image_size, nlvr2.lr, nlvr2.batch_size, nlvr2.epochs) == (384, 5e-5, 128, 10)


def test_order_user_then_sets() -> None:
    cfg = resolve_config("vqa", "micro", {"lr": 1e-3, "data": {"max_train": 10}}, ["lr=2e-3", "data.eval_split=ood"])
    assert cfg.lr == 2e-3 and cfg.data.max_train == 10 and cfg.data.eval_split == "ood"
    assert parse_sets(["a.b=[1, 2]", "c=true"]) == {"a": {"b": [1, 2]}, "c": True}


def test_errors_name_key_and_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"lrr: unknown key.*allowed keys"):
        resolve_config("vqa", "micro", sets=["lrr=1"])
    with pytest.raises(ValueError, match=r"data.rot: unknown key"):
        resolve_config("vqa", "micro", sets=["data.rot=/x"])
    with pytest.raises(ValueError, match=r"scope: Input should be 'auto', 'all' or 'vision' \(got 'text'\)"):
        resolve_config("cls", "micro", sets=["scope=text"])
    with pytest.raises(ValueError, match=r"data.format: Input should be .* \(got 'coco'\)"):
        resolve_config("retrieval", "micro", sets=["data.format=coco"])
    with pytest.raises(ValueError, match=r"lr: .*\(got -1\)"):
        resolve_config("vqa", "micro", sets=["lr=-1"])
    with pytest.raises(ValueError, match=r"set data.root"):
        resolve_config("vqa", "micro", sets=["data.format=vqa2"])
    with pytest.raises(ValueError, match=r"no preset 'huge'; allowed values"):
        task_defaults("vqa", "huge")
    with pytest.raises(ValueError, match=r"unknown task 'caption'"):
        task_defaults("caption", "micro")
    with pytest.raises(ValueError, match=r"task='vqa' does not match"):
        resolve_config("nlvr2", "micro", {"task": "vqa"})
    with pytest.raises(ValueError, match=r"--set expects key=value"):
        parse_sets(["lr"])


def test_configs_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "vqa.yaml").write_text("common: {lr: 0.5}\npresets: {micro: {batch_size: 3}}\n")
    monkeypatch.setenv("VLMERGE_CONFIGS", str(tmp_path))
    cfg = resolve_config("vqa", "micro")
    assert cfg.lr == 0.5 and cfg.batch_size == 3
    assert validate_config({"task": "cls"}).scope == "auto"


def test_task_lists_agree_with_the_task_registry() -> None:
    """The config's task names (its Literal), the trainable list and the data formats are the registry's."""
    from vlmerge.finetune.config import DATA_FORMATS, FINETUNE_TASKS
    from vlmerge.finetune.tasks import TASKS as ALL
    from vlmerge.finetune.unified import UNIFIED_TASKS

    unified = {t.name for t in UNIFIED_TASKS.values()}  # the answer-as-word variants (head: unified)
    REGISTRY = {name: t for name, t in ALL.items() if name not in unified}
    assert set(TASKS) == set(REGISTRY)
    assert set(FINETUNE_TASKS) == {name for name, t in REGISTRY.items() if t.trainable}
    for name, task in REGISTRY.items():
        assert task.name == name and task.data_format in DATA_FORMATS and task.data_format != "embedded"
        assert (configs_dir() / f"{name}.yaml").is_file() or not task.trainable, name
