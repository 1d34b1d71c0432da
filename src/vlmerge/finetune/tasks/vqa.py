"""Visual question answering as classification over a fixed answer vocabulary (VLMo §4.3).

Items: ``image``, ``text`` (the question), ``answer_scores`` [A] float soft scores in [0, 1] (VQA v2:
min(1, #annotators who gave the answer / 3); ``target`` is accepted as well).

The fusion route's [T_CLS] goes through the VQA head (pooler → Linear → LayerNorm → GELU → Linear over
the A answers). Loss: binary cross-entropy against the soft scores, averaged over the elements and
multiplied by A (= summed over answers, averaged over questions), as VLMo / ViLT do. Metric: the VQA score
of the arg-max answer; baseline: the best single answer given to every question.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...data.world import ANSWERS
from ...models import VLMo
from ..config import FinetuneConfig
from ..metrics import vqa_best_constant, vqa_score
from .base import Labeled, Prep, Task, predict_all, register


def num_answers_of(dataset: Any) -> int:
    """The answer-vocabulary size of a VQA dataset (``num_answers`` or ``len(answers)``; else the length of
    its first item's ``answer_scores``)."""
    for attr in ("num_answers", "answers"):
        v = getattr(dataset, attr, None)
        if v is not None:
            return int(v) if isinstance(v, int) else len(v)
    return int(len(_scores(dataset[0])))


def _scores(item: Mapping[str, Any]) -> torch.Tensor:
    return torch.as_tensor(item["answer_scores"] if "answer_scores" in item else item["target"]).float()


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target BCE × number of answers: logits, targets [B, A] -> scalar."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


@register
class VQA(Task):
    """Metrics: ``vqa_score`` (= ``score``, percent), ``n``; baseline ``vqa_score`` of the best constant answer."""

    name = "vqa"
    heads = ("vqa",)
    data_format = "vqa2"
    headline = "vqa_score"
    unified_answers = ANSWERS

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        from ...data import VQADataset

        return Labeled(VQADataset(source, size, cache), num_answers=len(ANSWERS))

    def head_sizes(self, dataset: Any) -> dict[str, int]:
        return {"num_answers": num_answers_of(dataset)}

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        ids, att = prep.texts([it["text"] for it in items])
        return {"image": prep.images([it["image"] for it in items], train), "input_ids": ids,
                "attention_mask": att, "target": torch.stack([_scores(it) for it in items])}

    @staticmethod
    def logits(model: VLMo, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, A] answer logits from the fusion [T_CLS]."""
        fused = model.forward_fusion(batch["image"], batch["input_ids"], batch["attention_mask"])
        return model.heads["vqa"](fused[:, 0])

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        logits = self.logits(model, batch)
        loss = vqa_loss(logits, batch["target"])
        with torch.no_grad():
            score = batch["target"].gather(1, logits.argmax(1, keepdim=True)).mean() * 100
        return {"loss": loss, "vqa_score": score}

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "vqa" not in model.heads:
            raise ValueError("the model has no 'vqa' head: fine-tune it on VQA first (vlmerge finetune vqa ...)")
        if model.config.num_answers != num_answers_of(dataset):
            raise ValueError(f"the model's VQA head has {model.config.num_answers} answers, the data "
                             f"{num_answers_of(dataset)}: evaluate with the answer vocabulary it was fine-tuned on")
        loader = self.loader(dataset, prep, config.eval_batch_size, train=False)
        res = predict_all(model, loader, lambda m, b: {"pred": self.logits(m, b).argmax(1), "target": b["target"]})
        score = vqa_score(res["pred"], res["target"])
        per_question = 100.0 * res["target"].gather(1, res["pred"].long()[:, None])[:, 0].double()
        return {"vqa_score": score, "score": score, "n": len(res["pred"]), "per_example": per_question.tolist(),
                "baseline": {"kind": "best constant answer", "vqa_score": vqa_best_constant(res["target"])}}
