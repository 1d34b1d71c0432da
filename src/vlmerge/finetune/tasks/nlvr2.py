"""NLVR2: is a statement true of a pair of images? (VLMo §4.3, following OSCAR / VinVL.)

Items: ``image`` and ``image_b`` (the left and right images, [3, S, S]), ``text`` (the statement), ``label``
(1 = true, 0 = false).

The triplet becomes two image-text pairs, (image0, text) and (image1, text), both run through the fusion
route in one batch of 2B; their [T_CLS] vectors are concatenated ([B, 2D]) and classified by the NLVR2 head
(Linear → LayerNorm → GELU → Linear to 2 logits) with cross-entropy. Metric: accuracy; baseline: the
majority label of the evaluated split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...models import VLMo
from ..config import FinetuneConfig
from ..metrics import accuracy, majority_accuracy
from .base import Prep, Task, predict_all, register


def pair_images(item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) images of an item: ``image`` / ``image_b`` (also accepted: ``images`` as a pair)."""
    if "images" in item:
        a, b = item["images"]
        return a, b
    return item["image"], item["image_b"]


@register
class NLVR2(Task):
    """Metrics: ``accuracy`` (= ``score``, percent), ``n``; baseline: majority-label accuracy."""

    name = "nlvr2"
    heads = ("nlvr2",)
    data_format = "nlvr2"
    headline = "accuracy"
    cache_kind = "nlvr2"
    unified_answers = ("true", "false")

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        from ...data import NLVR2Dataset

        return NLVR2Dataset(source, size, cache)

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        ids, att = prep.texts([it["text"] for it in items])
        pairs = [pair_images(it) for it in items]
        return {"image0": prep.images([p[0] for p in pairs], train),
                "image1": prep.images([p[1] for p in pairs], train),
                "input_ids": ids, "attention_mask": att, "label": torch.tensor([int(it["label"]) for it in items])}

    @staticmethod
    def logits(model: VLMo, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, 2] from the two pairs' fusion [T_CLS] vectors, concatenated."""
        b = batch["input_ids"].shape[0]
        ids, att = batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1)
        t_cls = model.forward_fusion(torch.cat([batch["image0"], batch["image1"]]), ids, att)[:, 0]
        return model.heads["nlvr2"](torch.cat([t_cls[:b], t_cls[b:]], dim=-1))

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        logits = self.logits(model, batch)
        acc = (logits.argmax(1) == batch["label"]).float().mean().detach() * 100
        return {"loss": F.cross_entropy(logits.float(), batch["label"]), "accuracy": acc}

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "nlvr2" not in model.heads:
            raise ValueError("the model has no 'nlvr2' head: fine-tune it on NLVR2 first (vlmerge finetune nlvr2 ...)")
        loader = self.loader(dataset, prep, config.eval_batch_size, train=False)
        res = predict_all(model, loader, lambda m, b: {"pred": self.logits(m, b).argmax(1), "label": b["label"]})
        acc = accuracy(res["pred"], res["label"])
        return {"accuracy": acc, "score": acc, "n": len(res["pred"]),
                "per_example": (100.0 * (res["pred"] == res["label"]).double()).tolist(),
                "baseline": {"kind": "majority label", "accuracy": majority_accuracy(res["label"])}}
