"""The task interface: what a downstream task adds to the shared fine-tuning loop, and the input pipeline.

A task is a small object registered by name (:data:`TASKS`). It declares its heads and whether it is a
vision task, turns dataset items into a batch (:meth:`Task.collate`), computes its training loss
(:meth:`Task.loss`) and scores a model on a dataset (:meth:`Task.evaluate`, returning the task's metrics
and a ``baseline`` block: chance or the best constant answer on the same examples).

Items are plain dicts (the contract every dataset, embedded or read from files, satisfies):
``image`` [3, S, S] float in [0, 1]; ``text`` str; plus the task's label keys (see each task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ...data.datasets import MEAN, STD
from ...models import VLMo
from ..config import FinetuneConfig


@dataclass
class Prep:
    """Items -> model inputs: resize to the model's resolution, optional RandAugment (training only),
    normalise with the checkpoint's pixel mean / std, tokenize to ``max_len``."""

    tokenizer: Any
    max_len: int
    image_size: int
    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD
    augment_ops: int = 0
    augment_magnitude: float = 9.0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def images(self, images: Sequence[torch.Tensor], train: bool = False, augment: bool = True) -> torch.Tensor:
        """list of [3, h, w] in [0, 1] -> [B, 3, S, S] normalised (RandAugment when ``train`` and enabled)."""
        out = [self.resize(img) for img in images]
        x = torch.stack(out).float()
        if train and augment and self.augment_ops:
            from ...pretrain.augment import rand_augment

            x = rand_augment(x, self.augment_ops, self.augment_magnitude, self.generator)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        """[3, h, w] -> [3, S, S] (bilinear, antialiased when shrinking)."""
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"an image must be a [3, H, W] tensor, got {tuple(img.shape)}")
        if tuple(img.shape[-2:]) == (self.image_size, self.image_size):
            return img.float()
        return F.interpolate(img[None].float(), size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True)[0]

    def texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of str -> (input_ids [B, L], attention_mask [B, L]) long, L = ``max_len``."""
        enc = self.tokenizer.encode(list(texts), self.max_len)
        return enc["input_ids"].long(), enc["attention_mask"].long()


class Labeled(Dataset):
    """A dataset with its label-set sizes attached (``num_answers`` / ``num_classes``), items unchanged."""

    def __init__(self, base: Any, **sizes: Any) -> None:
        self.base = base
        for k, v in sizes.items():
            setattr(self, k, v)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        return self.base[i]


class Task:
    """One downstream task. Subclasses set the class attributes and implement the three methods (and
    :meth:`embedded` where the embedded world has the task's data): a new task is one module registered with
    :func:`register`, plus its ``configs/finetune/<name>.yaml``."""

    name: ClassVar[str]
    heads: ClassVar[tuple[str, ...]]  # heads the model needs; the fine-tune trains these
    vision: ClassVar[bool] = False  # a vision task: under scope "auto" only the vision encoder trains
    data_format: ClassVar[str]  # the real-data format this task reads
    headline: ClassVar[str]  # the metric key that summarises the task (``score`` in the results)
    trainable: ClassVar[bool] = True  # False for evaluation-only tasks (zero-shot ITM)
    unified_mode: ClassVar[bool] = False  # a u-<name> variant of the unified answer mode
    cache_kind: ClassVar[str] = "scenes"  # the embedded world's shard cache this task's data reads
    # the task's candidate answers as words of the shared vocabulary, in target-index order, for the unified
    # answer mode (vlmerge.finetune.unified); None = the task has no unified form
    unified_answers: ClassVar[tuple[str, ...] | None] = None

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        """The task's dataset over the first ``size`` scenes (NLVR2: examples) of ``source``, a
        :class:`~vlmerge.data.World` split; ``cache``: its shard-cache folder (None = render on the fly)."""
        raise ValueError(f"task {self.name!r} has no embedded-world data; read it from files (data.format)")

    def head_sizes(self, dataset: Any) -> dict[str, int]:
        """Model-config fields the task's head needs, read from the data (e.g. ``num_answers``)."""
        return {}

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        raise NotImplementedError

    # -- helpers shared by the tasks ---------------------------------------------------------------------
    def loader(self, dataset: Any, prep: Prep, batch_size: int, train: bool, seed: int = 0,
               workers: int = 0) -> DataLoader:
        """A DataLoader with this task's collate; shuffled (seeded) and dropping a ragged last batch when
        training (so contrastive batches never shrink to one pair)."""
        n = len(dataset)
        if n == 0:
            raise ValueError(f"{self.name}: the dataset is empty")
        batch_size = min(batch_size, n)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, generator=gen,
                          num_workers=workers, collate_fn=partial(self.collate, prep=prep, train=train))

    @staticmethod
    def batches(loader: DataLoader, model: VLMo) -> Iterator[dict[str, Any]]:
        device = next(model.parameters()).device
        for batch in loader:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def task_names(trainable: bool = False) -> tuple[str, ...]:
    """The registered tasks of the task-head mode (the config's ``task`` values), in registration order;
    ``trainable``: only those a task-head fine-tune trains (``itm`` is evaluation-only there). The unified
    mode's ``u-<name>`` variants (:mod:`vlmerge.finetune.unified`) are left out."""
    return tuple(n for n, t in TASKS.items() if not t.unified_mode and (t.trainable or not trainable))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed values: {sorted(TASKS)}")
    return TASKS[name]


@torch.no_grad()
def predict_all(model: VLMo, loader: DataLoader, fn: Callable[[VLMo, dict[str, Any]], dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """Run ``fn`` over every batch in eval mode and concatenate its outputs (on the CPU)."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in Task.batches(loader, model):
        for k, v in fn(model, batch).items():
            parts.setdefault(k, []).append(v.detach().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
