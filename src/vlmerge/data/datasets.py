"""Torch datasets over the world (or its disk cache), one per task, and a tokenizing collate.

Every item is a dict; images are float tensors [3, S, S] in [0, 1] (models expect them normalised with
:func:`normalize`, i.e. mean = std = 0.5 per channel as BEiT/VLMo). Keys:

========================= =====================================================================
``ImageTextDataset``       ``image``, ``text`` (one caption), ``image_id`` (pairs = 5 captions per image)
``VQADataset``             ``image``, ``text`` (question), ``answer`` (id), ``answer_scores`` [A], ``kind``
``NLVR2Dataset``           ``image``, ``image_b``, ``text`` (statement), ``label`` (1 = true)
``ClassificationDataset``  ``image``, ``label`` (shape of the largest object)
``SegmentationDataset``    ``image``, ``mask`` [S, S] long (0 = background)
========================= =====================================================================
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from .world import ANSWERS, Scene, World

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class SceneSource(Protocol):
    """Anything indexable by example number that returns a :class:`Scene` (a World or a cache)."""

    def __getitem__(self, index: int) -> Scene: ...


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def normalize(image: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> (image - mean) / std per channel."""
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - m) / s


class _WorldDataset(Dataset):
    def __init__(self, source: SceneSource, n: int) -> None:
        if n < 1:
            raise ValueError(f"dataset size n must be ≥ 1, got {n}")
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        return i


class ImageTextDataset(_WorldDataset):
    """Image-caption pairs of the first ``n`` scenes: ``pairs=True`` gives all 5 captions of each image as
    separate items (len 5n, COCO-style), else one caption per image (the first, which names every object)."""

    def __init__(self, source: SceneSource, n: int, pairs: bool = True) -> None:
        super().__init__(source, n)
        self.pairs = pairs

    def __len__(self) -> int:
        return self.n * (5 if self.pairs else 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        image_id, cap = (i // 5, i % 5) if self.pairs else (i, 0)
        scene = self.source[image_id]
        return {"image": to_tensor(scene.image), "text": scene.captions[cap], "image_id": image_id}


class VQADataset(_WorldDataset):
    """Every question of the first ``n`` scenes (5 per scene)."""

    def __len__(self) -> int:
        return self.n * 5

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        scene = self.source[i // 5]
        qa = scene.questions[i % 5]
        scores = torch.zeros(len(ANSWERS))
        scores[qa.answer_id] = 1.0
        return {"image": to_tensor(scene.image), "text": qa.question, "answer": qa.answer_id,
                "answer_scores": scores, "kind": qa.kind}


class NLVR2Dataset(_WorldDataset):
    """The first ``n`` NLVR2-style examples of a :class:`World` (two images + a statement -> true/false)."""

    def __init__(self, world: World, n: int) -> None:
        super().__init__(world, n)
        self.world = world

    def __getitem__(self, i: int) -> dict[str, Any]:
        left, right, st, label = self.world.nlvr2(self._check(i))
        return {"image": to_tensor(left.image), "image_b": to_tensor(right.image), "text": st.text,
                "label": int(label)}


class ClassificationDataset(_WorldDataset):
    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.source[self._check(i)]
        return {"image": to_tensor(scene.image), "label": scene.label}


class SegmentationDataset(_WorldDataset):
    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.source[self._check(i)]
        return {"image": to_tensor(scene.image), "mask": torch.from_numpy(scene.mask.astype(np.int64))}


class Collate:
    """Stack tensors and tokenize ``text`` into ``input_ids`` / ``attention_mask`` [B, max_len]."""

    def __init__(self, tokenizer: Any | None = None, max_len: int = 40) -> None:
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in items[0]:
            values = [it[key] for it in items]
            if isinstance(values[0], torch.Tensor):
                out[key] = torch.stack(values)
            elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
                out[key] = torch.tensor(values)
            else:
                out[key] = values
        if self.tokenizer is not None and "text" in out:
            out.update(self.tokenizer.encode(out["text"], self.max_len))
        return out
