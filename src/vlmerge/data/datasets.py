"""Torch datasets over the world (or its disk cache), one per task, and a tokenizing :class:`Collate`.

Every dataset covers the first ``n`` scenes (NLVR2: examples) of a :class:`~vlmerge.data.world.World` or
:class:`~vlmerge.data.cache.CachedWorld`; with ``cache_dir`` it reads them from a shard cache of that world
in the directory, writing the cache first if it is missing (:func:`~vlmerge.data.cache.open_cache`).

Items are dicts. ``image`` is always a float32 tensor [3, S, S] with values in [0, 1]; models take it
normalised with :func:`normalize`, i.e. ``(image - MEAN) / STD`` per channel with MEAN = STD = (0.5, 0.5,
0.5) as BEiT / VLMo (values in [-1, 1]); the pre-training engine normalises after its augmentation.

=========================  ======================================================================  =========
dataset                    keys                                                                    length
=========================  ======================================================================  =========
``ImageTextDataset``       ``image``, ``text`` (a caption), ``image_id`` (the scene index)          5n or n
``VQADataset``             ``image``, ``text`` (question), ``answer`` (id in ANSWERS),              5n
                           ``answer_scores`` [A] float (1 at the answer), ``kind`` (question kind)
``NLVR2Dataset``           ``image`` (left), ``image_b`` (right), ``text`` (statement),             n
                           ``label`` (1 = true)
``ClassificationDataset``  ``image``, ``label`` (shape index of the largest object)                 n
``SegmentationDataset``    ``image``, ``mask`` [S, S] int64 (0 = background, k = shape index + 1)   n
=========================  ======================================================================  =========

:class:`Collate` stacks them into a batch ([B, ...] tensors, lists of strings) and tokenizes ``text`` into
``input_ids`` / ``attention_mask`` [B, max_len].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CachedWorld, open_cache
from .tokenizer import Tokenizer
from .world import ANSWERS, World, caption_relevance

# The one pixel normalisation of the project (BEiT / VLMo's): every default mean / std refers to these.
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = 5


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1] (contiguous)."""
    chw = torch.from_numpy(image).permute(2, 0, 1)
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def normalize(image: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
              ) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> ``(image - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - m) / s


class _WorldDataset(Dataset):
    """The first ``n`` examples of ``source``, read from a shard cache in ``cache_dir`` when given."""

    cache_kind = "scenes"

    def __init__(self, source: World | CachedWorld, n: int, cache_dir: str | Path | None = None) -> None:
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"dataset size n={n!r} is invalid; allowed values: an integer ≥ 1")
        if cache_dir is not None:
            if not isinstance(source, World):
                raise ValueError(f"cache_dir needs a World source to cache, got {source!r}")
            source = open_cache(source, n, cache_dir, self.cache_kind)
        if isinstance(source, CachedWorld) and (source.kind != self.cache_kind or len(source) < n):
            raise ValueError(f"{type(self).__name__} needs {n} {self.cache_kind!r} examples; {source!r} "
                             f"holds {len(source)} {source.kind!r} examples")
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        return i


class ImageTextDataset(_WorldDataset):
    """Image-caption pairs of the first ``n`` scenes. ``pairs=True``: every caption of every scene, item
    ``5 * i + c`` = (scene i, caption c), COCO-style; ``pairs=False``: one caption per scene, number
    ``default_rng([caption_seed, i]).integers(5)`` (a fixed, seeded choice)."""

    def __init__(self, source: World | CachedWorld, n: int, pairs: bool = True, caption_seed: int = 0,
                 cache_dir: str | Path | None = None) -> None:
        self.world = source if isinstance(source, World) else None  # what each caption means, for relevance()
        super().__init__(source, n, cache_dir)
        self.pairs, self.caption_seed = pairs, caption_seed
        self._relevance: np.ndarray | None = None
        self._last: tuple[int, Any] | None = None

    def relevance(self) -> np.ndarray | None:
        """relevant [n, len(self)] bool: item t's caption is true of scene i (its
        :class:`~vlmerge.data.world.Meaning` tested on scene i's objects; the world knows what every caption
        means). None when the meanings are unknown (a cache written before they were recorded, and no world
        to regenerate them from). Computed once (no pixels are rendered)."""
        if self._relevance is None:
            if self.world is not None:
                scenes = [self.world.content(i) for i in range(self.n)]
            else:
                scenes = [self.source[i] for i in range(self.n)]
                if any(s.meanings is None for s in scenes):
                    return None
            items = [divmod(t, CAPTIONS_PER_IMAGE) if self.pairs else (t, int(np.random.default_rng(
                [self.caption_seed, t]).integers(CAPTIONS_PER_IMAGE))) for t in range(len(self))]
            meanings = [scenes[i].meanings[c] for i, c in items]  # type: ignore[index]
            self._relevance = caption_relevance(meanings, [s.objects for s in scenes]).T
        return self._relevance

    def __len__(self) -> int:
        return self.n * (CAPTIONS_PER_IMAGE if self.pairs else 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        if self.pairs:
            image_id, caption = divmod(i, CAPTIONS_PER_IMAGE)
        else:
            image_id = i
            caption = int(np.random.default_rng([self.caption_seed, i]).integers(CAPTIONS_PER_IMAGE))
        if self._last is None or self._last[0] != image_id:  # consecutive items share a scene: decode it once
            self._last = (image_id, self.source[image_id])
        scene = self._last[1]
        return {"image": to_tensor(scene.image), "text": scene.captions[caption], "image_id": image_id, "pair_id": i}


class VQADataset(_WorldDataset):
    """Every question of the first ``n`` scenes: item ``5 * i + q`` = (scene i, question q). The answers
    are unambiguous, so the VQA soft-score target is 1 at the answer and 0 elsewhere."""

    def __len__(self) -> int:
        return self.n * QUESTIONS_PER_IMAGE

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id, q = divmod(self._check(i), QUESTIONS_PER_IMAGE)
        scene = self.source[image_id]
        qa = scene.questions[q]
        scores = torch.zeros(len(ANSWERS))
        scores[qa.answer_id] = 1.0
        return {"image": to_tensor(scene.image), "text": qa.question, "answer": qa.answer_id,
                "answer_scores": scores, "kind": qa.kind}


class NLVR2Dataset(_WorldDataset):
    """The first ``n`` NLVR2-style examples (two images + a statement -> true/false, balanced)."""

    cache_kind = "nlvr2"

    def __getitem__(self, i: int) -> dict[str, Any]:
        left, right, statement, label = self.source.nlvr2(self._check(i))
        return {"image": to_tensor(left.image), "image_b": to_tensor(right.image), "text": statement.text,
                "label": int(label)}


class ClassificationDataset(_WorldDataset):
    """Scenes labelled with the shape index of their largest object (``NUM_CLASSES`` classes)."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.source[self._check(i)]
        return {"image": to_tensor(scene.image), "label": scene.label}


class SegmentationDataset(_WorldDataset):
    """Scenes with their per-pixel class masks (``NUM_SEG_CLASSES`` classes, 0 = background)."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.source[self._check(i)]
        return {"image": to_tensor(scene.image), "mask": torch.from_numpy(scene.mask.astype(np.int64))}


class Collate:
    """Items -> a batch: tensors stacked to [B, ...], ints/floats/bools to a [B] tensor, anything else
    (strings) kept as a list; with a tokenizer, ``text`` also becomes ``input_ids`` / ``attention_mask``
    [B, L] long (``[CLS] … [SEP]``, padded). L = ``max_len``, or with ``pad_to_longest`` the batch's longest
    text (padding is masked out of attention and every loss, so it changes no result, only the cost).
    ``defaults``: values for keys some items lack (e.g. ``image_id=-1``); ``keys``: keep only these."""

    def __init__(self, tokenizer: Tokenizer | None = None, max_len: int = 40, pad_to_longest: bool = False,
                 defaults: dict[str, Any] | None = None, keys: tuple[str, ...] | None = None) -> None:
        self.tokenizer, self.max_len, self.pad_to_longest = tokenizer, max_len, pad_to_longest
        self.defaults, self.keys = dict(defaults or {}), keys

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        names = list(dict.fromkeys([*items[0], *self.defaults]))
        for key in names:
            values = [item.get(key, self.defaults.get(key)) for item in items]
            if isinstance(values[0], torch.Tensor):
                out[key] = torch.stack(values)
            elif isinstance(values[0], (bool, int, float)):
                out[key] = torch.tensor(values)
            else:
                out[key] = values
        if self.tokenizer is not None and "text" in out:
            enc = self.tokenizer.encode(out["text"], self.max_len)
            if self.pad_to_longest:
                longest = int(enc["attention_mask"].sum(dim=1).max())
                enc = {k: v[:, :longest].contiguous() for k, v in enc.items()}
            out.update(enc)
        return out if self.keys is None else {k: out[k] for k in self.keys}
