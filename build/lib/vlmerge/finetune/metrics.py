"""Pure downstream metrics (no model, no data): retrieval recall, VQA score, accuracy, mIoU, and the
chance / best-constant baselines each is compared against.

Every score is a percentage in [0, 100], as the papers report them (merging paper §5: VQA / NLVR2
accuracy, ImageNet top-1, ADE20k mIoU, and "Avg TR" / "Avg IR" = mean of R@1, R@5, R@10).

Retrieval recall is :mod:`vlmerge.pretrain.evaluate`'s (the one evaluator: relevance, pessimistic tie rule,
keys), re-exported here.
"""

from __future__ import annotations

import torch

# Retrieval: one implementation, shared with pre-training and the study (relevance, tie rule, keys).
from ..pretrain.evaluate import (  # noqa: F401  (re-exported)
    RECALL_KS,
    match_ranks,
    owner_relevance,
    recall_at_k,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
)


# -------------------------------------------------------------------------------------------- classification
def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent: pred [N] (labels) or [N, C] (logits), target [N] labels."""
    if pred.dim() == 2:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if target.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return 100.0 * float((pred == target).double().mean())


def majority_accuracy(target: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent label of ``target`` [N] (the best constant guess)."""
    return 100.0 * float(torch.bincount(target.long()).max()) / target.numel()


# ---------------------------------------------------------------------------------------------------- VQA
def vqa_soft_score(count: int | torch.Tensor) -> float | torch.Tensor:
    """The VQA v2 soft accuracy of an answer given by ``count`` of the 10 annotators: min(1, count / 3).

    The common approximation of the official metric (which averages min(1, matches / 3) over the ten
    leave-one-out subsets of annotators); identical for counts 0 and ≥ 4.
    """
    if isinstance(count, torch.Tensor):
        return (count.float() / 3).clamp(max=1.0)
    return min(1.0, count / 3)


def vqa_score(pred: torch.Tensor, targets: torch.Tensor) -> float:
    """VQA score in percent: the mean soft score of the predicted answers.

    pred [N] answer indices or [N, A] logits; targets [N, A] soft scores in [0, 1] (0 for answers no
    annotator gave, and for answers outside the vocabulary, which no prediction can earn).
    """
    if pred.dim() == 2:
        pred = pred.argmax(dim=1)
    if targets.dim() != 2 or pred.shape != targets.shape[:1]:
        raise ValueError(f"pred {tuple(pred.shape)} must be [N] for targets [N, A], got {tuple(targets.shape)}")
    if targets.shape[0] == 0:
        raise ValueError("VQA score of an empty set")
    return 100.0 * float(targets.gather(1, pred.long()[:, None]).double().mean())


def vqa_best_constant(targets: torch.Tensor) -> float:
    """VQA score of answering the single best answer for every question (the majority baseline)."""
    return 100.0 * float(targets.double().mean(dim=0).max())


# ------------------------------------------------------------------------------------------- segmentation
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """cm [C, C] long with cm[t, p] = #pixels of true class t predicted as p; ``ignore_index`` pixels and
    labels outside [0, C) in ``target`` are skipped. pred and target: same shape, integer labels."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    t, p = t[keep], p[keep].clamp(0, num_classes - 1)
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_from_confusion(cm: torch.Tensor) -> dict[str, object]:
    """mIoU in percent from a confusion matrix [C, C] (rows = truth).

    IoU_c = TP / (TP + FP + FN). A class absent from both prediction and ground truth (TP + FP + FN = 0)
    has no IoU and is excluded from the mean (its entry in ``iou`` is None), as in mmseg / BEiT's ADE20k
    evaluation. Returns ``miou``, ``pixel_acc`` and ``iou`` (per class, percent or None).
    """
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = cm.sum()
    return {
        "miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_acc": 100.0 * float(tp.sum() / total) if total > 0 else 0.0,
        "iou": [100.0 * float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist(), strict=True)],
    }


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU in percent over the classes present in prediction or ground truth (see
    :func:`miou_from_confusion`). pred, target: [...] integer label maps of the same shape."""
    return float(miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))["miou"])


def miou_best_constant(cm: torch.Tensor) -> float:
    """mIoU of predicting one class everywhere, best class chosen: the segmentation majority baseline.

    Predicting class c everywhere gives IoU_c = n_c / N (pixels of c over all pixels) and 0 for every other
    present class, so mIoU = max_c n_c / (N · #classes present in the ground truth).
    """
    n = cm.sum(1).double()
    present = int((n > 0).sum())
    return 100.0 * float(n.max() / n.sum()) / present if present else 0.0
