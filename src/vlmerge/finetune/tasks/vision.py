"""Vision-only tasks on the vision route (VLMo §4.5; merging paper §6.5, Table 3): image classification
(ImageNet-1k in the paper) and semantic segmentation (ADE20k).

Both are vision tasks: under scope ``auto`` a model with modality experts fine-tunes only its vision
encoder (paper §6.5), so its language and VL weights stay bit-identical.

* Classification — items ``image``, ``label`` (int). [I_CLS] → the ``cls`` head (LayerNorm → Linear);
  cross-entropy; metric top-1 accuracy, baseline the majority class.
* Segmentation — items ``image``, ``mask`` [h, w] long (class per pixel, 255 = ignore). Patch tokens → the
  ``seg`` head (per-patch LayerNorm → Linear, a light linear decoder) → [B, C, √P, √P] logits bilinearly
  upsampled to the mask; per-pixel cross-entropy. Masks are resized (nearest) to the model's input size,
  so mIoU is measured at that resolution. RandAugment is never applied here (its geometric operations
  would misalign image and mask). Metric mIoU (classes absent from both prediction and ground truth
  excluded) and pixel accuracy; baseline the best single class predicted everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...data.formats import IGNORE_INDEX, first_bad_class_id
from ...data.world import SHAPES
from ...models import VLMo
from ..config import FinetuneConfig
from ..metrics import accuracy, confusion_matrix, majority_accuracy, miou_best_constant, miou_from_confusion
from .base import Labeled, Prep, Task, predict_all, register


def num_classes_of(dataset: Any) -> int:
    """``num_classes`` or ``len(classes)`` of a dataset; else 1 + the largest label / mask value (≠ 255)."""
    for attr in ("num_classes", "classes"):
        v = getattr(dataset, attr, None)
        if v is not None:
            return int(v) if isinstance(v, int) else len(v)
    top = 0
    for i in range(len(dataset)):
        it = dataset[i]
        if "label" in it:
            top = max(top, int(it["label"]))
        else:
            m = torch.as_tensor(it["mask"])
            m = m[m != IGNORE_INDEX]
            top = max(top, int(m.max()) if m.numel() else 0)
    return top + 1


MAX_SEG_CLASSES = 1024  # confusion matrices are kept per image ([N, C, C]); more classes would not fit in memory


def check_mask_ids(mask: torch.Tensor, num_classes: int) -> None:
    """``ValueError`` when a mask holds a class id outside ``[0, num_classes)`` other than :data:`IGNORE_INDEX`
    (it would be dropped from the scores without a word, or fail the loss with an index error)."""
    bad = first_bad_class_id(mask, num_classes)
    if bad is not None:
        raise ValueError(f"a segmentation mask holds class id {bad} but the model's 'seg' head has "
                         f"{num_classes} classes (ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore); fine-tune on "
                         "data with the same classes")


@register
class Classification(Task):
    """Metrics: ``top1`` (= ``score``, percent), ``n``; baseline: majority-class accuracy."""

    name = "cls"
    heads = ("cls",)
    vision = True
    data_format = "imagefolder"
    headline = "top1"
    unified_answers = SHAPES  # class index k is SHAPES[k]

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        from ...data import NUM_CLASSES, ClassificationDataset

        return Labeled(ClassificationDataset(source, size, cache), num_classes=NUM_CLASSES)

    def head_sizes(self, dataset: Any) -> dict[str, int]:
        return {"num_classes": num_classes_of(dataset)}

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        return {"image": prep.images([it["image"] for it in items], train),
                "label": torch.tensor([int(it["label"]) for it in items])}

    @staticmethod
    def logits(model: VLMo, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.heads["cls"](model.forward_image(batch["image"])[:, 0])

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        logits = self.logits(model, batch)
        acc = (logits.argmax(1) == batch["label"]).float().mean().detach() * 100
        return {"loss": F.cross_entropy(logits.float(), batch["label"]), "top1": acc}

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "cls" not in model.heads:
            raise ValueError("the model has no 'cls' head: fine-tune it on classification first (vlmerge finetune cls)")
        loader = self.loader(dataset, prep, config.eval_batch_size, train=False)
        res = predict_all(model, loader, lambda m, b: {"pred": self.logits(m, b).argmax(1), "label": b["label"]})
        top1 = accuracy(res["pred"], res["label"])
        return {"top1": top1, "score": top1, "n": len(res["pred"]),
                "per_example": (100.0 * (res["pred"] == res["label"]).double()).tolist(),
                "baseline": {"kind": "majority class", "top1": majority_accuracy(res["label"])}}


@register
class Segmentation(Task):
    """Metrics: ``miou`` (= ``score``), ``pixel_acc``, ``iou`` per class (None where absent), ``n``;
    baseline: ``miou`` of the best constant class."""

    name = "seg"
    heads = ("seg",)
    vision = True
    data_format = "segfolder"
    headline = "miou"

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        from ...data import NUM_SEG_CLASSES, SegmentationDataset

        return Labeled(SegmentationDataset(source, size, cache), num_classes=NUM_SEG_CLASSES)

    def head_sizes(self, dataset: Any) -> dict[str, int]:
        n = max(2, num_classes_of(dataset))
        if n > MAX_SEG_CLASSES:
            raise ValueError(f"the segmentation masks hold class ids up to {n - 1}; at most {MAX_SEG_CLASSES} classes "
                             "are supported (are the masks class-id PNGs?)")
        return {"num_seg_classes": n}

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        s = prep.image_size
        masks = []
        for it in items:
            m = torch.as_tensor(it["mask"]).long()
            if tuple(m.shape) != (s, s):
                m = F.interpolate(m[None, None].float(), size=(s, s), mode="nearest")[0, 0].long()
            masks.append(m)
        return {"image": prep.images([it["image"] for it in items], train, augment=False), "mask": torch.stack(masks)}

    @staticmethod
    def logits(model: VLMo, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, C, H, W]: per-patch class logits on the √P × √P grid, bilinearly upsampled to the mask."""
        tokens = model.forward_image(batch["image"])[:, 1:]
        b, p, _ = tokens.shape
        g = int(round(p**0.5))
        grid = model.heads["seg"](tokens).transpose(1, 2).reshape(b, -1, g, g)
        return F.interpolate(grid, size=tuple(batch["mask"].shape[-2:]), mode="bilinear", align_corners=False)

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        logits = self.logits(model, batch)
        check_mask_ids(batch["mask"], logits.shape[1])
        loss = F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)
        valid = batch["mask"] != IGNORE_INDEX
        acc = ((logits.argmax(1) == batch["mask"]) & valid).sum() / valid.sum().clamp(min=1) * 100
        return {"loss": loss, "pixel_acc": acc.detach()}

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "seg" not in model.heads:
            raise ValueError("the model has no 'seg' head: fine-tune it on segmentation first (vlmerge finetune seg)")
        c = model.config.num_seg_classes
        loader = self.loader(dataset, prep, config.eval_batch_size, train=False)

        def cm(m: VLMo, b: Mapping[str, Any]) -> dict[str, torch.Tensor]:  # one confusion matrix per image
            check_mask_ids(b["mask"], c)
            pred = self.logits(m, b).argmax(1)
            return {"cm": torch.stack([confusion_matrix(p, t, c, IGNORE_INDEX) for p, t in zip(pred, b["mask"],
                                                                                              strict=True)])}

        per_image = predict_all(model, loader, cm)["cm"]  # [N, C, C]
        total = per_image.sum(0)
        res = miou_from_confusion(total)
        tp = per_image.diagonal(dim1=1, dim2=2)
        # per image and class: TP, FP (predicted c, truth not c), FN (truth c, predicted not c); cm[n, truth, pred]
        per_example = {"tp": tp.tolist(), "fp": (per_image.sum(1) - tp).tolist(),
                       "fn": (per_image.sum(2) - tp).tolist()}
        return {**res, "score": res["miou"], "n": len(dataset), "per_example": per_example,
                "baseline": {"kind": "best constant class", "miou": miou_best_constant(total)}}
