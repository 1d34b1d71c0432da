"""Fine-tuning configs: every task/preset file validates; errors name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlmerge.finetune.config import configs_dir, parse_sets, resolve_config, task_defaults, validate_config
from vlmerge.finetune.tasks import task_names


@pytest.mark.parametrize("task", task_names())
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


def test_every_registered_task_is_usable_from_its_registry_entry_alone() -> None:
    """Config names, --data-format values, fine-tunable tasks and embedded data all come from the registries:
    each registered task validates as a config, reads a registered file format, has its YAML when it trains,
    and builds its embedded-world dataset through its own hook."""
    from vlmerge.data.formats import FORMATS
    from vlmerge.finetune.config import DATA_FORMATS
    from vlmerge.finetune.data import embedded_dataset
    from vlmerge.finetune.tasks import TASKS

    assert ("embedded", *FORMATS) == DATA_FORMATS
    assert set(task_names()) == {"retrieval", "vqa", "nlvr2", "cls", "seg", "itm"}  # stated, not derived
    assert set(task_names(trainable=True)) == {"retrieval", "vqa", "nlvr2", "cls", "seg"}
    for name in task_names():
        task = TASKS[name]
        assert task.name == name and validate_config({"task": name}).task == name
        assert task.data_format in FORMATS, name
        assert (configs_dir() / f"{name}.yaml").is_file() or not task.trainable, name
        ds = embedded_dataset(name, "val", 3, image_size=16)
        assert len(ds) >= 3 and ds[0]["image"].shape == (3, 16, 16), name
    with pytest.raises(ValueError, match=r"unknown task 'caption'; allowed values: \['vqa'"):
        validate_config({"task": "caption"})


def test_a_new_task_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a Task subclass is all it takes for the config, the task lists and the embedded data."""
    from vlmerge.data import ImageTextDataset
    from vlmerge.finetune.data import embedded_dataset
    from vlmerge.finetune.tasks import TASKS, Task
    from vlmerge.finetune.tasks.base import register

    monkeypatch.setattr("vlmerge.finetune.tasks.base.TASKS", dict(TASKS))
    from vlmerge.finetune.tasks import base

    @register
    class Caption(Task):
        name = "caption"
        heads = ("mlm",)
        data_format = "karpathy"
        headline = "accuracy"

        def embedded(self, source, size, cache):  # type: ignore[no-untyped-def]
            return ImageTextDataset(source, size, pairs=True, cache_dir=cache)

    assert "caption" in base.TASKS and "caption" not in TASKS
    assert "caption" in task_names() and "caption" in task_names(trainable=True)
    assert validate_config({"task": "caption"}).task == "caption"
    assert len(embedded_dataset("caption", "val", 2, image_size=16)) == 10  # 5 captions per scene


@pytest.mark.parametrize(("pair", "key"), [("lr=1e300", "lr=1e+300"), ("weight_decay=-1e39", "weight_decay"),
                                          ("betas=[0.9, 1e39]", "betas"), (f"seed={10**23}", "seed=")])
def test_numbers_beyond_what_the_math_takes_are_refused_naming_the_key(pair: str, key: str) -> None:
    """lr=1e300 once passed validation and overflowed in the optimiser (an internal error); a 23-digit seed
    failed inside torch.manual_seed without naming the key."""
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("+", r"\+")):
        resolve_config("vqa", "micro", None, [pair])
