"""Fine-tuning configs: one validated pydantic model, defaults per task and preset read from YAML.

Resolution order (later wins)::

    FinetuneConfig defaults
    < configs/finetune/{task}.yaml  ``common:``
    < configs/finetune/{task}.yaml  ``presets: {preset}:``   (preset: micro | tiny | paper | ...)
    < a user YAML (``--config``), flat keys of FinetuneConfig
    < ``--set key=value`` overrides (dotted keys reach into ``data``: ``--set data.root=/x``)

The preset defaults to the one the initial checkpoint was built from (``config.json``'s ``"preset"``, or
the :data:`~vlmerge.models.PRESETS` entry its model config matches); ``vit-tiny`` and ``vit-base`` map to
``paper``, the merging paper's Table 6 settings. The resolved config is saved with every fine-tuned
checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import apply_sets, check_float32_fields, config_root, deep_merge, read_yaml, validate
from ..data.formats import FORMATS

DataFormat = Literal[("embedded", *FORMATS)]  # type: ignore[valid-type]  # embedded + the format registry
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)

# Model-size preset -> the fine-tuning preset section used by default.
MODEL_PRESET_TO_FT: dict[str, str] = {"micro": "micro", "tiny": "tiny", "vit-tiny": "paper", "vit-base": "paper"}


class DataConfig(BaseModel):
    """Where the task's examples come from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: DataFormat = "embedded"  # embedded = the procedural world of vlmerge.data
    root: str | None = None  # real formats: the dataset folder
    train_split: str = "train"
    eval_split: str = "test"  # evaluated after fine-tuning (embedded: train | val | test | ood)
    max_train: int | None = Field(default=None, ge=1)  # cap on training examples (None = all)
    max_eval: int | None = Field(default=None, ge=1)  # cap on evaluation examples
    world_seed: int = 0  # embedded world: generator seed
    train_size: int = Field(default=2000, ge=1)  # embedded world: scenes (NLVR2: examples) in the train split
    eval_size: int = Field(default=500, ge=1)  # embedded world: scenes (NLVR2: examples) in an eval split
    image_size: int | None = Field(default=None, ge=16, le=512)  # embedded render size; None = the model's
    world: dict[str, Any] = Field(default_factory=dict)  # embedded: WorldConfig overrides (max_objects, ...)
    cache_dir: str | None = None  # embedded: render scenes once into .npz shards under this folder (None = on the fly)
    max_text_len: int | None = Field(default=None, ge=2)  # None = the model's max_text_len
    workers: int = Field(default=0, ge=0)  # DataLoader workers

    @model_validator(mode="after")
    def _root_for_files(self) -> DataConfig:
        if self.format != "embedded" and not self.root:
            raise ValueError(f"data.format={self.format!r} reads local files: set data.root to the dataset folder")
        return self


class FinetuneConfig(BaseModel):
    """Every setting of one fine-tuning run (VLMo supp. B.2–B.3, merging paper Table 6)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str  # a registered task (vlmerge.finetune.tasks.task_names())
    preset: str | None = None  # the preset section these defaults came from (recorded, not read)
    # -- schedule (VLMo: AdamW β=(0.9, 0.98), wd 0.01, linear warmup over 10% then linear decay to 0)
    epochs: float = Field(default=10.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # overrides epochs when set
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-5, gt=0)
    head_lr_mult: float = Field(default=1.0, gt=0)  # VLMo's lr_mult: task heads train at lr × this
    layer_decay: float = Field(default=1.0, gt=0, le=1)  # BEiT layer-wise lr decay (1 = off)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: float = Field(default=0.1, ge=0)  # < 1: fraction of the steps; ≥ 1: a number of steps
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    augment_ops: int = Field(default=0, ge=0)  # RandAugment ops per training image (VLMo: 2); 0 = off
    augment_magnitude: float = Field(default=9.0, ge=0, le=10)
    # -- model
    image_size: int | None = Field(default=None, ge=1)  # fine-tuning resolution; None = the checkpoint's
    scope: Literal["auto", "all", "vision"] = "auto"  # auto: vision tasks train only the vision encoder
    # task: a task-specific head (vqa / nlvr2 / cls ...); unified: UnIVAL's unified input/output, the answer a
    # word of the shared vocabulary predicted by the MLM head at a [MASK] (vlmerge.finetune.unified)
    head: Literal["task", "unified"] = "task"
    # -- task specifics
    itm_weight: float = Field(default=0.0, ge=0)  # retrieval: add ITM with hard negatives (needed for rerank)
    rerank_k: int = Field(default=0, ge=0)  # retrieval eval: rerank top-k by ITM (0 = dual encoder only)
    # -- evaluation / logging
    eval_batch_size: int = Field(default=64, ge=1)
    log_every: int = Field(default=50, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _in_range(self) -> FinetuneConfig:
        return check_float32_fields(self)

    @field_validator("task")
    @classmethod
    def _registered_task(cls, task: str) -> str:
        from .tasks import task_names  # the registry imports this module: look it up when validating

        if task not in task_names():
            raise ValueError(f"unknown task {task!r}; allowed values: {list(task_names())}")
        return task


def validate_config(d: Mapping[str, Any], source: str = "finetune config") -> FinetuneConfig:
    """Build a :class:`FinetuneConfig`; one ``ValueError`` naming each bad key (:func:`vlmerge.config.explain`)."""
    return validate(FinetuneConfig, d, source)


# ----------------------------------------------------------------------------------------------- defaults
def configs_dir() -> Path:
    """The fine-tuning presets: ``finetune/`` under :func:`vlmerge.config.config_root`."""
    return config_root() / "finetune"


def parse_sets(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-4", "data.root=/x"]`` -> nested dict; values are parsed as YAML (:func:`vlmerge.config.apply_sets`)."""
    return apply_sets({}, pairs)


def task_defaults(task: str, preset: str) -> dict[str, Any]:
    """The merged ``common`` + ``presets[preset]`` section of ``configs/finetune/{task}.yaml``."""
    from .tasks import task_names

    if task not in task_names():
        raise ValueError(f"unknown task {task!r}; allowed values: {list(task_names())}")
    path = configs_dir() / f"{task}.yaml"
    doc = read_yaml(path)
    bad = sorted(set(doc) - {"common", "presets"})
    if bad:
        raise ValueError(f"{path}: unknown top-level keys {bad}; allowed keys are ['common', 'presets']")
    presets = doc.get("presets") or {}
    if preset not in presets:
        raise ValueError(f"{path}: no preset {preset!r}; allowed values: {sorted(presets)}")
    return deep_merge(doc.get("common") or {}, presets[preset] or {})


def resolve_config(
    task: str,
    preset: str,
    user: Mapping[str, Any] | FinetuneConfig | None = None,
    sets: Iterable[str] = (),
) -> FinetuneConfig:
    """Defaults for ``task`` at ``preset``, then ``user`` (a dict, a config, or a YAML path's contents),
    then ``--set`` pairs; validated."""
    if isinstance(user, FinetuneConfig):
        user = user.model_dump(exclude_unset=True)
    d = deep_merge(task_defaults(task, preset), dict(user or {}))
    d = deep_merge(d, parse_sets(sets))
    if d.get("task", task) != task:
        raise ValueError(f"config task={d['task']!r} does not match the requested task {task!r}")
    d["task"] = task
    d.setdefault("preset", preset)
    return validate_config(d, f"finetune config ({task}, preset {preset})")
