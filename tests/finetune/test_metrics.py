"""Pure metrics on hand-made cases: recall@k (with ties), chance levels, VQA soft score, accuracy, mIoU."""

from __future__ import annotations

import math

import pytest
import torch

from vlmerge.finetune.metrics import (
    accuracy,
    confusion_matrix,
    majority_accuracy,
    match_ranks,
    miou,
    miou_best_constant,
    miou_from_confusion,
    recall_at_k,
    retrieval_chance,
    retrieval_metrics,
    vqa_best_constant,
    vqa_score,
    vqa_soft_score,
)
from vlmerge.finetune.tasks import rerank_scores


def test_recall_at_k_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    pos = torch.eye(3, dtype=torch.bool)  # query q matches candidate q
    # ranks: q0 -> 1; q1 -> c2 (0.8) above c1 (0.3): 2; q2 -> c0, c1 above c2: 3
    assert match_ranks(scores, pos).tolist() == [1, 2, 3]
    r = recall_at_k(scores, pos, ks=(1, 2, 3))
    assert r == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 100.0})


def test_ties_count_against_the_query() -> None:
    # A constant scorer must not look perfect: every tie with a wrong candidate pushes the match down.
    scores = torch.zeros(4, 4)
    pos = torch.eye(4, dtype=torch.bool)
    assert match_ranks(scores, pos).tolist() == [4, 4, 4, 4]
    assert recall_at_k(scores, pos, ks=(1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 100.0}
    # A tie between the match and one wrong candidate: rank 2, not 1.
    s = torch.tensor([[0.5, 0.5, 0.1]])
    assert match_ranks(s, torch.tensor([[True, False, False]])).tolist() == [2]
    # Ties among several matches do not hurt (the best match counts); NaN ranks last.
    s = torch.tensor([[0.5, 0.5, float("nan")]])
    assert match_ranks(s, torch.tensor([[True, True, False]])).tolist() == [1]
    assert match_ranks(s, torch.tensor([[False, False, True]])).tolist() == [3]


def test_recall_needs_a_positive_per_query() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_retrieval_metrics_with_several_captions_per_image() -> None:
    # 2 images, 4 texts: texts 0, 1 describe image 0; texts 2, 3 describe image 1.
    txt2img = [0, 0, 1, 1]
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0],  # image 0: best text is 1 (a match) -> TR hit@1
                        [0.7, 0.1, 0.2, 0.3]])  # image 1: text 0 (wrong) first, text 3 third -> rank 2
    m = retrieval_metrics(sim, txt2img, ks=(1, 2))
    assert m["tr_r1"] == 50.0 and m["tr_r2"] == 100.0
    # IR: text 0 -> image 1 first (miss@1); text 1 -> image 0; text 2 -> image 0 first (miss); text 3 -> image 1.
    assert m["ir_r1"] == 50.0 and m["ir_r2"] == 100.0
    assert m["avg_tr"] == 75.0 and m["avg_ir"] == 75.0 and m["r_mean"] == 75.0


def test_retrieval_chance_matches_a_random_ranking() -> None:
    txt2img = torch.arange(10).repeat_interleave(2)  # 10 images, 2 captions each
    chance = retrieval_chance(txt2img, 10)
    assert chance["ir_r1"] == pytest.approx(10.0) and chance["ir_r10"] == pytest.approx(100.0)
    assert chance["tr_r1"] == pytest.approx(100 * 2 / 20)
    assert chance["tr_r5"] == pytest.approx(100 * (1 - math.comb(18, 5) / math.comb(20, 5)))
    g = torch.Generator().manual_seed(0)
    sims = [retrieval_metrics(torch.rand(10, 20, generator=g), txt2img) for _ in range(300)]
    for key in ("tr_r5", "ir_r5", "avg_tr"):
        assert sum(s[key] for s in sims) / len(sims) == pytest.approx(chance[key], abs=3.0)


def test_rerank_fixes_a_wrong_top1_and_keeps_the_rest() -> None:
    # Dual encoder: candidate 1 (wrong) above the match 0; the reranker (an oracle) prefers the match.
    sim = torch.tensor([[0.6, 0.9, 0.1, 0.5], [0.2, 0.8, 0.7, 0.1]])
    pos = torch.tensor([[True, False, False, False], [False, False, True, False]])
    oracle = lambda q, c: pos[q, c].double()  # noqa: E731
    re = rerank_scores(sim, 3, oracle)
    assert recall_at_k(sim, pos, (1,))[1] == 0.0
    assert recall_at_k(re, pos, (1,))[1] == 100.0
    # Candidates outside the top-k keep their dual-encoder order, below every top-k candidate.
    assert bool((re[0, [0, 1, 3]].min() > re[0, 2]).item())
    # A match outside the top-k is never promoted: k=1 cannot fix query 0.
    assert recall_at_k(rerank_scores(sim, 1, oracle), pos, (1,))[1] == 0.0


def test_vqa_soft_score_and_vqa_score() -> None:
    assert [vqa_soft_score(c) for c in (0, 1, 2, 3, 7)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    targets = torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 2 / 3, 1 / 3], [0.0, 0.0, 0.0]])
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    assert vqa_score(logits, targets) == pytest.approx(100 * (1 + 1 / 3 + 0) / 3)
    assert vqa_score(torch.tensor([0, 1, 2]), targets) == pytest.approx(100 * (1 + 2 / 3) / 3)
    # Best single answer for all: answer 0 -> (1 + 0 + 0) / 3; answer 1 -> (1/3 + 2/3) / 3 -> tie at 1/3.
    assert vqa_best_constant(targets) == pytest.approx(100 / 3)


def test_accuracy_and_majority() -> None:
    assert accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 50.0
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 0])) == 100.0
    assert majority_accuracy(torch.tensor([2, 2, 0, 1, 2])) == 60.0


def test_miou_excludes_classes_absent_from_both() -> None:
    # 4 classes; class 3 appears nowhere, class 2 only in the prediction.
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 3]])  # the ignored pixel's prediction does not count
    cm = confusion_matrix(pred, target, 4)
    assert cm.sum() == 7
    res = miou_from_confusion(cm)
    # class 0: TP 3, FN 1 (pixel (1,1) predicted 1) -> 0.75; class 1: TP 2, FP 1 (pixel (1,1)), FN 1 (pixel
    # (0,3)) -> 0.5; class 2: TP 0, FP 1 -> 0 (present in the prediction, so it counts); class 3: excluded.
    assert res["iou"][:3] == pytest.approx([75.0, 50.0, 0.0]) and res["iou"][3] is None
    assert res["miou"] == pytest.approx(125 / 3)
    assert miou(pred, target, 4) == pytest.approx(125 / 3)
    assert res["pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_miou_best_constant() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    cm = confusion_matrix(torch.zeros_like(target), target, 4)
    assert miou_from_confusion(cm)["miou"] == pytest.approx(miou_best_constant(cm))
    assert miou_best_constant(cm) == pytest.approx(100 * 0.5 / 3)


def test_seg_masks_with_ids_beyond_the_head_are_refused_not_dropped() -> None:
    from vlmerge.finetune.tasks.vision import IGNORE_INDEX, check_mask_ids

    check_mask_ids(torch.tensor([[0, 2], [IGNORE_INDEX, 1]]), 3)  # ignore is fine
    for bad in (3, 254, -1):
        with pytest.raises(ValueError, match=f"class id {bad} but the model's 'seg' head has 3 classes"):
            check_mask_ids(torch.tensor([[0, bad]]), 3)
