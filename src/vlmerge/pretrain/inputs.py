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

from ..data import ImageTextDataset, Tokenizer, World, WorldConfig, cache_folder, default_tokenizer
from ..data.datasets import MEAN, STD, Collate
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


def data_worlds(config: PretrainConfig) -> tuple[World, World]:
    """The train and ``data.eval_split`` worlds of a run, at the model's image size."""
    d = config.data
    image_size = config.build_model_config(vocab_size=1, heads=()).image_size
    world = WorldConfig.from_dict({**d.world, "image_size": image_size})
    return World(world, "train", d.seed), World(world, d.eval_split, d.seed)


def cache_needs(config: PretrainConfig) -> list[tuple[Path, int]]:
    """(cache folder, examples) of every cache the run reads under ``data.cache_dir`` (none without one)."""
    d = config.data
    if not d.cache_dir:
        return []
    train, evals = data_worlds(config)
    return [(cache_folder(d.cache_dir, train), d.train_images), (cache_folder(d.cache_dir, evals), d.eval_images)]


def build_data(config: PretrainConfig) -> PretrainData:
    """The world's train split (all 5 captions of ``data.train_images`` images) and ``data.eval_split``, rendered
    at the model's image size, with the world WordPiece tokenizer or bert-base-uncased (``data.tokenizer``)."""
    d = config.data
    train, evals = data_worlds(config)

    def cache(w: World) -> Path | None:
        return cache_folder(d.cache_dir, w) if d.cache_dir else None

    return PretrainData(
        train=ImageTextDataset(train, d.train_images, pairs=True, cache_dir=cache(train)),
        eval=ImageTextDataset(evals, d.eval_images, pairs=True, cache_dir=cache(evals)),
        tokenizer=Tokenizer.paper() if d.tokenizer == "paper" else default_tokenizer(),
    )


def pretrain_collate(tokenizer: Any, max_len: int, pad_to_longest: bool = False) -> Collate:
    """Items -> ``{"image": [B, 3, S, S], "input_ids": [B, L], "attention_mask": [B, L], "image_id": [B],
    "pair_id": [B]}`` with image_id / pair_id (the item's index in its dataset) −1 where the items have none.
    L = ``max_len``, the same on every rank and step (ranks gather
    each other's texts for hard negatives), or with ``pad_to_longest`` the batch's longest text (a single
    process). The one :class:`~vlmerge.data.Collate`, configured."""
    return Collate(tokenizer, max_len, pad_to_longest=pad_to_longest, defaults={"image_id": -1, "pair_id": -1},
                   keys=("image", "input_ids", "attention_mask", "image_id", "pair_id"))
