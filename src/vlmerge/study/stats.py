"""Uncertainty of the study's numbers: a bootstrap over test queries, paired wherever models share them.

Every score of the study is a mean over test examples (retrieval: image queries and caption queries; VQA:
questions; NLVR2 / classification: examples; segmentation: images). Its uncertainty is estimated by the
nonparametric bootstrap: ``B`` resamples of the test *images* (or examples) with replacement, the score
recomputed on each (Efron & Tibshirani 1993, percentile interval). All models scored on one test split use
the **same** resamples (:func:`resample_counts` is a function of the split's name and size only), so any
difference of two models, such as a merge drop, is a *paired* bootstrap: its replicates are the
differences of the two models' replicates on the same resampled queries.

Retrieval resamples images: an image brings its text-retrieval query and its captions' image-retrieval
queries along (the candidates, every test image and caption, stay fixed).

:class:`Scores` is a dict of point scores that carries each score's replicates (``boot``); a finding is a
function of such scores, evaluated on the point values and on every replicate (:func:`replicate_view`), and
its 95 % interval is the 2.5 / 97.5 percentiles of those values.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..pretrain.evaluate import RECALL_KS

RESAMPLES = 1000  # B: bootstrap resamples of every test split
LEVEL = 0.95


class Scores(dict):
    """Point scores ``{name: float}`` with their bootstrap replicates ``boot[name]`` [B] (where known).

    A plain dict to JSON (the replicates are not written); arithmetic on findings goes through
    :func:`replicate_view`."""

    def __init__(self, values: Mapping[str, float] = (), boot: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(values)
        self.boot: dict[str, np.ndarray] = dict(boot or {})

    def merged(self, other: Mapping[str, Any]) -> Scores:
        """These scores and ``other``'s (values and replicates) in one."""
        return Scores({**self, **other}, {**self.boot, **getattr(other, "boot", {})})

    def interval(self, key: str) -> tuple[float, float] | None:
        return percentile_interval(self.boot[key]) if key in self.boot else None


def resample_counts(name: str, n: int, resamples: int = RESAMPLES) -> np.ndarray:
    """counts [B, n] float64: how often each of ``n`` test items is drawn in each of ``B`` resamples of size n.

    Seeded by the split's ``name`` and ``n``, so every model scored on that split gets the same resamples."""
    seed = int.from_bytes(hashlib.sha256(f"{name}/{n}".encode()).digest()[:8], "little")
    draws = np.random.default_rng(seed).integers(n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``replicates`` [B] (NaNs, e.g. undefined correlations, are
    left out; all NaN gives (nan, nan))."""
    x = np.asarray(replicates, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo, hi = np.quantile(x, [a, 1 - a])
    return float(lo), float(hi)


def retrieval_scores(ranks: Mapping[str, Sequence[int]], n_images: int, split: str,
                     ks: Sequence[int] = RECALL_KS) -> Scores:
    """``avg_tr``, ``avg_ir`` and ``r_mean`` with replicates, from per-query ranks (what
    :func:`~vlmerge.pretrain.evaluate.evaluate_retrieval` returns with ``ranks=True``): ``tr`` [Q] and
    ``tr_query`` [Q] (image of each text-retrieval query), ``ir`` [T] and ``ir_image`` [T] (image of each
    caption). Resamples the ``n_images`` images of ``split``.

    Per image i: s_tr(i) = mean_k 1[rank ≤ k] of its TR query; S_ir(i) and c(i) = the sum of the same over
    its captions and their count. A resample with counts w gives Avg TR = Σ w s_tr / Σ w q (q: i is a
    query) and Avg IR = Σ w S_ir / Σ w c, in percent.
    """
    tr, tr_q = np.asarray(ranks["tr"]), np.asarray(ranks["tr_query"], dtype=np.int64)
    ir, ir_img = np.asarray(ranks["ir"]), np.asarray(ranks["ir_image"], dtype=np.int64)
    hits_tr = np.mean([tr <= k for k in ks], axis=0) * 100.0
    hits_ir = np.mean([ir <= k for k in ks], axis=0) * 100.0
    s_tr, q = np.zeros(n_images), np.zeros(n_images)
    np.add.at(s_tr, tr_q, hits_tr)
    np.add.at(q, tr_q, 1.0)
    s_ir, c = np.zeros(n_images), np.zeros(n_images)
    np.add.at(s_ir, ir_img, hits_ir)
    np.add.at(c, ir_img, 1.0)
    w = resample_counts(split, n_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_tr, boot_ir = (w @ s_tr) / (w @ q), (w @ s_ir) / (w @ c)
    values = {"avg_tr": float(hits_tr.mean()), "avg_ir": float(hits_ir.mean())}
    values["r_mean"] = (values["avg_tr"] + values["avg_ir"]) / 2
    return Scores(values, {"avg_tr": boot_tr, "avg_ir": boot_ir, "r_mean": (boot_tr + boot_ir) / 2})


def mean_score(name: str, per_example: Sequence[float], split: str) -> Scores:
    """``{name: mean}`` with replicates, for a score that is a mean over test examples (VQA soft score,
    accuracy: ``per_example`` [N] in percent)."""
    x = np.asarray(per_example, dtype=np.float64)
    w = resample_counts(split, len(x))
    return Scores({name: float(x.mean())}, {name: (w @ x) / len(x)})


def miou_score(name: str, tp: Sequence[Sequence[int]], fp: Sequence[Sequence[int]], fn: Sequence[Sequence[int]],
               split: str) -> Scores:
    """``{name: mIoU}`` with replicates from per-image true / false positives and false negatives [N, C]
    (pixels): mIoU = mean over classes with TP + FP + FN > 0 of TP / (TP + FP + FN), sums over images."""
    tp_, fp_, fn_ = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    w = resample_counts(split, len(tp_))

    def miou(t: np.ndarray, u: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(u > 0, t / np.where(u > 0, u, 1), np.nan)
        return 100.0 * np.nanmean(iou, axis=-1)

    union = tp_ + fp_ + fn_
    point = float(miou(tp_.sum(0), union.sum(0)))
    return Scores({name: point}, {name: miou(w @ tp_, w @ union)})


def replicate_view(node: Any, b: int | None) -> Any:
    """``node`` (nested dicts / lists of results) with every :class:`Scores` value replaced by its ``b``-th
    replicate (values without replicates kept); ``b=None`` gives the point values."""
    if isinstance(node, Scores):
        return {k: (float(node.boot[k][b]) if b is not None and k in node.boot else v) for k, v in node.items()}
    if isinstance(node, Mapping):
        return {k: replicate_view(v, b) for k, v in node.items()}
    if isinstance(node, list):
        return [replicate_view(v, b) for v in node]
    return node


def n_resamples(node: Any) -> int:
    """B of the first :class:`Scores` with replicates inside ``node`` (0 when there is none)."""
    if isinstance(node, Scores) and node.boot:
        return len(next(iter(node.boot.values())))
    children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
    for v in children:
        n = n_resamples(v)
        if n:
            return n
    return 0


def seed_draws(n_seeds: int, resamples: int = RESAMPLES) -> np.ndarray:
    """draws [B, S]: which training seeds replicate b averages (S draws with replacement; the identity for one
    seed). The same for every score of a study, so differences stay paired across seeds too."""
    if n_seeds == 1:
        return np.zeros((resamples, 1), dtype=np.int64)
    return np.random.default_rng([7, n_seeds]).integers(n_seeds, size=(resamples, n_seeds))


def mean_over_seeds(per_seed: Sequence[Scores]) -> Scores:
    """The seed mean of each score, ``<key>_std`` (sample std over seeds) beside it, and replicates of the seed
    mean by a two-level bootstrap: replicate b averages the b-th test-query replicates of S training seeds drawn
    with replacement (:func:`seed_draws`), so the interval holds the run-to-run spread of training as well as the
    test set's (with one seed: the test set's alone). The test split is the same for every seed, so resample b
    of each seed scores the same queries."""
    first = per_seed[0]
    out = Scores()
    draws = seed_draws(len(per_seed))
    for k in first:
        xs = [float(s[k]) for s in per_seed]
        m = sum(xs) / len(xs)
        out[k] = m
        if len(xs) > 1:
            out[f"{k}_std"] = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        if all(k in s.boot for s in per_seed):
            stacked = np.stack([s.boot[k] for s in per_seed], axis=1)  # [B, S]
            b = len(stacked)
            out.boot[k] = stacked[np.arange(b)[:, None], draws[:b]].mean(axis=1)
    return out


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The results of both studies over training seeds, in the structure of the first seed's: each
    :class:`Scores` by :func:`mean_over_seeds` (seed mean, ``<key>_std``, two-level bootstrap replicates), every
    other number by its mean (kept as it is when all seeds agree, e.g. step counts), mappings key-wise over the
    keys every seed has, lists of one length element-wise; anything else (strings, bools, None, lists of other
    lengths) from the first seed. One seed: its numbers unchanged."""
    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, Scores) and all(isinstance(v, Scores) for v in values):
            return mean_over_seeds(values)
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first
        if isinstance(first, (int, float)):
            if all(v == first for v in values):
                return first
            return sum(float(v) for v in values) / len(values)
        if isinstance(first, Mapping):
            return {k: merge([v[k] for v in values]) for k in first
                    if all(isinstance(v, Mapping) and k in v for v in values)}
        if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
            return [merge([v[i] for v in values]) for i in range(len(first))]
        return first

    return merge(list(per_seed))


def with_intervals(node: Any) -> Any:
    """``node`` as plain JSON: each :class:`Scores` gets ``ci`` {key: [lo, hi]} (95 %) for its replicated keys."""
    if isinstance(node, Scores):
        out = dict(node)
        if node.boot:
            out["ci"] = {k: [round(v, 4) for v in percentile_interval(b)] for k, b in node.boot.items()}
        return out
    if isinstance(node, Mapping):
        return {k: with_intervals(v) for k, v in node.items()}
    if isinstance(node, list):
        return [with_intervals(v) for v in node]
    return node
