"""The UnIVAL study's preset schema (:class:`UnivalConfig`, ``configs/unival/<name>.yaml``), its loader, the task
and recipe lists every part of the study shares, and :func:`mean` (nan when empty), the average they all use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...config import find_config
from ..runner import load_preset

ID_TASKS = ("vqa", "nlvr2", "cls", "itm")
OOD_TASKS = ("vqa@ood", "size", "largest-color")
RECIPES = ("vanilla", "fusing", "ratatouille")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class UnivalConfig(_Strict):
    """One preset (``configs/unival/<name>.yaml``)."""

    name: str
    head: Literal["unified", "task"] = "unified"
    pretrain: str | None = Field(None, description="pre-training config (relative to configs/ or a path); "
                                 "None = the pre-training defaults")
    pretrain_set: list[str] = Field(default_factory=list, description="dotted overrides of the pre-training config")
    finetune_preset: str = Field("micro", description="fine-tuning preset (configs/finetune/<task>.yaml section)")
    finetune_set: list[str] = Field(default_factory=list, description="fine-tuning overrides, every task and recipe")
    task_set: dict[str, list[str]] = Field(default_factory=dict, description="per-task fine-tuning overrides")
    ratatouille_set: list[str] = Field(default_factory=list, description="extra overrides of Ratatouille's re-tunes")
    tasks: list[Literal["vqa", "nlvr2", "cls", "itm"]] = Field(default_factory=lambda: list(ID_TASKS))
    ood: list[Literal["vqa@ood", "size", "largest-color"]] = Field(default_factory=lambda: list(OOD_TASKS))
    train_size: dict[str, int] = Field(default_factory=dict, description="train scenes per task (NLVR2: examples)")
    val_size: dict[str, int] = Field(default_factory=dict, description="validation scenes per task")
    test_size: dict[str, int] = Field(default_factory=dict, description="test scenes per task / OOD set")
    default_size: int = Field(200, ge=1, description="scenes for any task not listed in a *_size map")
    pairs: list[tuple[str, str]] = Field(default_factory=lambda: [("vqa", "cls"), ("vqa", "nlvr2")])
    lambdas: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    task_arithmetic: dict[str, Any] = Field(default_factory=lambda: {"lam": 0.5})
    ties: dict[str, Any] = Field(default_factory=lambda: {"density": 0.5, "lam": 1.0})
    dare: dict[str, Any] = Field(default_factory=lambda: {"drop": 0.5, "lam": 0.5, "normalize": False, "seed": 0})
    greedy: bool = Field(True, description="greedy soup over every fine-tuned model (validation-selected)")
    eval_batch_size: int = Field(256, ge=1)
    threads: int | None = Field(1, ge=1, description="torch intra-op threads while the study runs (None = torch's "
                                "default); models this small run faster on one, and immune to oversubscription")

    @field_validator("lambdas")
    @classmethod
    def _lams(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1)]
        if bad or not v:
            raise ValueError(f"lambdas {bad or v} are invalid; allowed range: [0, 1], at least one value")
        return v

    @model_validator(mode="after")
    def _check(self) -> UnivalConfig:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks}: need ≥ 2 distinct tasks; allowed values: {list(ID_TASKS)}")
        for a, b in self.pairs:
            if a not in self.tasks or b not in self.tasks or a == b:
                raise ValueError(f"pairs: ({a}, {b}) must be two different tasks of {self.tasks}")
        return self

    def size(self, which: str, task: str) -> int:
        """Scenes (NLVR2: examples) of ``task``'s ``which`` split (train / val / test), ``default_size`` if unset."""
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[which].get(
            task, self.default_size)


def load_unival_config(preset: str, overrides: Sequence[str] = ()) -> tuple[UnivalConfig, Path]:
    """The validated preset (a name under ``configs/unival/`` or a YAML path) with ``overrides``, and its file."""
    path = find_config(preset, "unival")
    return load_preset(path, UnivalConfig, "unival", overrides), path


def mean(xs: Sequence[float]) -> float:
    """The mean of ``xs`` as a float; nan when empty."""
    return float(sum(xs) / len(xs)) if xs else float("nan")
