"""Pure downstream metrics (no model, no data): retrieval recall, VQA score, accuracy, mIoU, and the
chance / best-constant baselines each is compared against.

Every score is a percentage in [0, 100], as the papers report them (merging paper §5: VQA / NLVR2
accuracy, ImageNet top-1, ADE20k mIoU, and "Avg TR" / "Avg IR" = mean of R@1, R@5, R@10).

Tie rule for recall (pessimistic): a query's rank is 1 + the number of *non-matching* candidates scoring
**greater than or equal to** its best-scoring match. Ties therefore count against the query, so a model
that scores every candidate the same gets R@k = 0 for k < #candidates rather than a flattering 100, and
the result never depends on the sort order of equal scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

RECALL_KS: tuple[int, ...] = (1, 5, 10)


# ------------------------------------------------------------------------------------------------ retrieval
def match_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best match under the pessimistic tie rule.

    scores [Q, C] (higher = better), positives [Q, C] bool (True = a correct candidate; ≥ 1 per row)
    -> ranks [Q] long, with rank = 1 + #{c not positive : scores[q, c] >= max_{p positive} scores[q, p]}.
    NaN scores rank below everything.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must both be [Q, C]")
    positives = positives.bool()
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    best = s.masked_fill(~positives, -math.inf).max(dim=1).values
    return 1 + ((s >= best[:, None]) & ~positives).sum(dim=1)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Iterable[int] = RECALL_KS) -> dict[int, float]:
    """Recall@k in percent: the share of queries with a correct candidate among the top k.

    scores [Q, C]; positives [Q, C] bool. Ties count against the query (see the module docstring).
    """
    ranks = match_ranks(scores, positives)
    return {int(k): 100.0 * float((ranks <= k).double().mean()) for k in ks}


def retrieval_metrics(
    sim_i2t: torch.Tensor,
    txt2img: torch.Tensor | Sequence[int],
    ks: Iterable[int] = RECALL_KS,
    sim_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """Text retrieval (image queries) and image retrieval (text queries).

    sim_i2t [I, T] (image i vs text t), txt2img [T] (the image each text describes; an image may have
    several texts, as COCO's five captions). ``sim_t2i`` [T, I] scores the image-retrieval direction when
    it differs from ``sim_i2tᵀ`` (after a rerank). Returns ``tr_r{k}``, ``ir_r{k}``, ``avg_tr``, ``avg_ir``
    (mean over ks: the merging paper's "Avg TR"/"Avg IR") and ``r_mean`` (their mean), all percent.
    """
    ks = tuple(ks)
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    n_img, n_txt = sim_i2t.shape
    if txt2img.shape != (n_txt,) or (n_txt and (int(txt2img.min()) < 0 or int(txt2img.max()) >= n_img)):
        raise ValueError(f"txt2img must be [T={n_txt}] image indices in [0, {n_img})")
    pos_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)
    pos_i2t[txt2img, torch.arange(n_txt)] = True
    keep = pos_i2t.any(dim=1)  # an image without any caption cannot be a text-retrieval query
    tr = recall_at_k(sim_i2t[keep], pos_i2t[keep], ks)
    ir = recall_at_k(sim_i2t.t() if sim_t2i is None else sim_t2i, pos_i2t.t(), ks)
    out = {f"tr_r{k}": v for k, v in tr.items()} | {f"ir_r{k}": v for k, v in ir.items()}
    out["avg_tr"] = sum(tr.values()) / len(ks)
    out["avg_ir"] = sum(ir.values()) / len(ks)
    out["r_mean"] = (out["avg_tr"] + out["avg_ir"]) / 2
    return out


def retrieval_chance(txt2img: torch.Tensor | Sequence[int], n_images: int, ks: Iterable[int] = RECALL_KS
                     ) -> dict[str, float]:
    """Expected :func:`retrieval_metrics` of a random ranking (the chance baseline), in percent.

    Image retrieval: a text has one image among ``n_images``: P(hit@k) = min(k, I) / I. Text retrieval:
    image i with g_i of the T texts: P(hit@k) = 1 - C(T - g_i, k) / C(T, k), averaged over images.
    """
    ks = tuple(ks)
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    n_txt = len(txt2img)
    counts = [c for c in torch.bincount(txt2img, minlength=n_images).tolist() if c > 0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * sum(1 - math.comb(n_txt - g, k) / math.comb(n_txt, k) if k < n_txt else 1.0
                                      for g in counts) / max(len(counts), 1)
        out[f"ir_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["avg_tr"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["avg_ir"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["avg_tr"] + out["avg_ir"]) / 2
    return out


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
