"""Batch sources for ``vlmerge merge --method regmean --data NAME --batches N`` (RegMean Grams from data).

A source is ``fn(model, batches, seed) -> iterable of batches`` that :func:`~vlmerge.merge.grams.run_vlmo`
understands (dicts with ``image`` [B, C, S, S] normalised, ``input_ids`` [B, L], ``attention_mask`` [B, L]),
registered with ``@register_gram_data(name)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .grams import GRAM_DATA, register_gram_data  # noqa: F401


@register_gram_data("world")
def world_batches(model: Any, batches: int, seed: int = 0, batch_size: int = 32,
                  world: dict[str, Any] | None = None, split: str = "train", truth: bool = False
                  ) -> Iterator[dict[str, Any]]:
    """Image-caption pairs of the embedded world's ``split`` (default train; ``seed`` = world seed; ``world``:
    WorldConfig fields, e.g. the CPU world a model was trained on), at the model's image size, tokenized with the
    world tokenizer (the model's vocabulary must match it). ``truth``: each batch also holds ``not_negative``
    [B, B] bool, caption j true of image i (the world knows what every caption means; the diagonal is True)."""
    from ..data import Collate, ImageTextDataset, World, WorldConfig, default_tokenizer, normalize

    cfg = model.config
    tok = default_tokenizer()
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"--data world: the model's vocab_size is {cfg.vocab_size} but the world tokenizer has "
                         f"{tok.vocab_size} tokens; pass --grams FILE collected with the model's own data")
    source = World(WorldConfig.from_dict({**(world or {}), "image_size": cfg.image_size}), split, seed)
    dataset = ImageTextDataset(source, batches * batch_size, pairs=False)
    relevance = torch.as_tensor(dataset.relevance()) if truth else None  # [n, n]: in order, no shuffling
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collate(tok, min(cfg.max_text_len, 40)))
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        out = {"image": normalize(batch["image"]), "input_ids": batch["input_ids"],
               "attention_mask": batch["attention_mask"]}
        if relevance is not None:
            rows = slice(i * batch_size, i * batch_size + len(out["image"]))
            out["not_negative"] = relevance[rows, rows].bool()
        yield out
