"""What pre-training reads: image-text pairs, a tokenizer and the pixel normalisation, behind one dataclass.

:func:`build_data` builds it from the procedural world of :mod:`vlmerge.data`; any other corpus plugs in by
passing a :class:`PretrainData` to :func:`~vlmerge.pretrain.engine.pretrain` (the "own data" hook):

* ``train`` / ``eval``: map-style datasets whose items are ``{"image": [3, S, S] float in [0, 1],
  "text": str}`` and optionally ``"image_id": int`` (pairs sharing an image: they are never each other's
  ITM negatives, and retrieval scores them as one image with several captions);
* ``tokenizer``: ``encode(texts, max_len) -> {"input_ids", "attention_mask"}`` ([B, max_len] long, [CLS]
  first, padded), ``pad_id``, ``cls_id``, ``sep_id``, ``mask_id``, ``vocab_size``, ``to_config()``;
* ``mean`` / ``std``: per-channel pixel normalisation applied after augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import ImageTextDataset, Tokenizer, World, WorldConfig, cache_folder, default_tokenizer
from ..data.datasets import MEAN, STD
from .losses import SpecialTokens

if TYPE_CHECKING:
    from .config import PretrainConfig


@dataclass
class PretrainData:
    train: Any
    eval: Any
    tokenizer: Any
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @property
    def special(self) -> SpecialTokens:
        t = self.tokenizer
        return SpecialTokens(t.pad_id, t.cls_id, t.sep_id, t.mask_id, t.vocab_size)


def build_data(config: PretrainConfig) -> PretrainData:
    """The world's train split (all 5 captions of ``data.train_images`` images) and ``data.eval_split``, rendered
    at the model's image size, with the world WordPiece tokenizer or bert-base-uncased (``data.tokenizer``)."""
    d = config.data
    image_size = config.build_model_config(vocab_size=1, heads=()).image_size
    world = WorldConfig.from_dict({**d.world, "image_size": image_size})

    train, evals = World(world, "train", d.seed), World(world, d.eval_split, d.seed)

    def cache(w: World) -> Path | None:
        return cache_folder(d.cache_dir, w) if d.cache_dir else None

    return PretrainData(
        train=ImageTextDataset(train, d.train_images, pairs=True, cache_dir=cache(train)),
        eval=ImageTextDataset(evals, d.eval_images, pairs=True, cache_dir=cache(evals)),
        tokenizer=Tokenizer.paper() if d.tokenizer == "paper" else default_tokenizer(),
    )


class Collate:
    """Items -> ``{"image": [B, 3, S, S], "input_ids": [B, L], "attention_mask": [B, L], "image_id": [B]}`` with
    image_id −1 where the items have none. L = ``max_len``, the same on every rank and step (ranks gather
    each other's texts for hard negatives), or with ``pad_to_longest`` the batch's longest text: padding is
    masked out of attention and MLM, so it changes no result, only the cost (a single process)."""

    def __init__(self, tokenizer: Any, max_len: int, pad_to_longest: bool = False) -> None:
        self.tokenizer, self.max_len, self.pad_to_longest = tokenizer, max_len, pad_to_longest

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.encode([it["text"] for it in items], self.max_len)
        ids, att = enc["input_ids"].long(), enc["attention_mask"].long()
        if self.pad_to_longest:
            longest = int(att.sum(dim=1).max())
            ids, att = ids[:, :longest].contiguous(), att[:, :longest].contiguous()
        return {
            "image": torch.stack([it["image"] for it in items]).float(),
            "input_ids": ids,
            "attention_mask": att,
            "image_id": torch.tensor([int(it.get("image_id", -1)) for it in items]),
        }
