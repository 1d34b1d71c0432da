"""Image-text retrieval with the dual encoder (VLMo §3.5, §4.4), optional ITM rerank (VLMo supp. A.2),
and zero-shot image-text matching accuracy.

Items: ``image`` [3, S, S] in [0, 1], ``text`` str, and optionally ``image_id`` (items sharing it show the
same image: COCO / Flickr30k have five captions per image; without it every item is its own image).

* Fine-tuning: the ITC loss on the retrieval route (VLMo: "our model is optimized for the image-text
  contrastive loss"), plus ``itm_weight`` × ITM on hard negatives drawn from the ITC similarities (the
  rerank variant of supp. A.2 fine-tunes "with image-text contrastive and image-text matching losses").
* Evaluation: every image against every text by the dot product of the L2-normalised embeddings;
  TR R@1/5/10 (image queries), IR R@1/5/10 (text queries), Avg TR / Avg IR (merging paper §5).
* Rerank (``rerank_k`` > 0, needs the ``itm`` head): each query's top-k candidates by the dual encoder are
  re-scored by ITM through the fusion route (log-odds of "matched"); they stay above every candidate
  outside the top-k, which keep their dual-encoder order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ...models import VLMo
from ...pretrain.evaluate import dataset_relevance, retrieval_chance, retrieval_metrics
from ...pretrain.losses import itc_loss, itm_loss, same_text, sample_hard_negatives
from ..config import FinetuneConfig
from .base import Prep, Task, register


def _group_ids(items: list[Mapping[str, Any]]) -> torch.Tensor:
    """Items' ``image_id`` as small ints within the batch ([B] long); each item its own group without one."""
    ids: dict[Any, int] = {}
    out = []
    for i, it in enumerate(items):
        key = it.get("image_id", ("item", i))
        out.append(ids.setdefault(key, len(ids)))
    return torch.tensor(out)


def rerank_scores(
    sim: torch.Tensor, k: int, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Re-score each query's top-``k`` candidates with ``score_fn`` (ALBEF / BLIP / VLMo supp. A.2).

    sim [Q, C] dual-encoder scores; ``score_fn(query_idx [n], cand_idx [n]) -> scores [n]`` (e.g. ITM
    log-odds). Returns [Q, C] float64: the top-k of each row ordered by ``score_fn`` and placed above every
    other candidate, which keep their ``sim`` order. Candidates outside the top-k are never promoted, so a
    correct top-k candidate can only move up to R@1 when the reranker prefers it.
    """
    q, c = sim.shape
    k = min(k, c)
    out = sim.double().clone()
    if k == 0 or q == 0:
        return out
    top = sim.topk(k, dim=1).indices  # [Q, k]
    rows = torch.arange(q)[:, None].expand(q, k)
    scores = score_fn(rows.reshape(-1), top.reshape(-1)).double().reshape(q, k)
    out[rows, top] = scores - scores.min() + float(sim.max()) + 1.0  # min of the top-k > max of the rest
    return out


def image_text_pairs(source: Any, size: int, cache: Path | None) -> Dataset:
    """Every caption of each of the first ``size`` scenes of ``source`` (5 pairs per image)."""
    from ...data import ImageTextDataset

    return ImageTextDataset(source, size, pairs=True, cache_dir=cache)


@register
class Retrieval(Task):
    """Image-text retrieval (COCO / Flickr30k in the papers). Metrics: ``tr_r{1,5,10}``, ``ir_r{1,5,10}``,
    ``avg_tr``, ``avg_ir``, ``r_mean`` (= ``score``), and with rerank the same keys under ``rerank``."""

    name = "retrieval"
    heads = ("itc",)
    data_format = "karpathy"
    headline = "r_mean"

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        return image_text_pairs(source, size, cache)

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        ids, att = prep.texts([it["text"] for it in items])
        out = {"image": prep.images([it["image"] for it in items], train), "input_ids": ids,
               "attention_mask": att, "group": _group_ids(items)}
        if train:
            out["seed"] = torch.randint(0, 2**62, (1,), generator=prep.generator)
        return out

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        image, ids, att = batch["image"], batch["input_ids"], batch["attention_mask"]
        img, txt = model.encode_image(image), model.encode_text(ids, att)
        itc, logits = itc_loss(img, txt, model.heads["itc"].logit_scale)
        out = {"itc": itc.detach()}
        loss = itc
        if config.itm_weight > 0:
            itm, acc = itm_hard_negative_loss(model, image, ids, att, logits, batch["group"], int(batch["seed"]))
            loss = loss + config.itm_weight * itm
            out |= {"itm": itm.detach(), "itm_acc": acc}
        return {"loss": loss, **out}

    @torch.no_grad()
    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "itc" not in model.heads:
            raise ValueError("the model has no 'itc' head (contrastive projections): fine-tune it on retrieval "
                             "first (vlmerge finetune retrieval ...)")
        model.eval()
        enc = encode_split(model, dataset, prep, config.eval_batch_size)
        sim = enc["img"] @ enc["txt"].t()
        rel, rule = dataset_relevance(dataset, enc["txt2img"].tolist(), enc["texts"])
        enc["relevant"] = rel
        out: dict[str, Any] = retrieval_metrics(sim, rel)
        out |= {"n_images": sim.shape[0], "n_texts": sim.shape[1], "relevance": rule}
        out["baseline"] = {"kind": "chance", **retrieval_chance(rel)}
        if config.rerank_k > 0:
            if "itm" not in model.heads:
                raise ValueError("rerank_k > 0 needs the model's 'itm' head (pre-trained with ITM, or fine-tuned "
                                 "with itm_weight > 0)")
            out["rerank"] = rerank_metrics(model, dataset, prep, enc, sim, config.rerank_k, config.eval_batch_size)
        out["score"] = out[self.headline]
        return out


def itm_hard_negative_loss(
    model: VLMo, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, logits: torch.Tensor,
    group: torch.Tensor, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM on each positive pair, a hard-negative text per image and a hard-negative image per text, drawn
    ∝ softmax of the ITC similarities ``logits`` [B, B] (VLMo §3.3, ALBEF). Candidates with the same image
    or the same caption are never negatives. Returns (loss, accuracy)."""
    b = image.shape[0]
    gen = torch.Generator(device=image.device).manual_seed(seed)
    excluded = same_text(ids, ids) | (group[:, None] == group[None, :]).to(image.device)
    neg_txt, ok_txt = sample_hard_negatives(logits, excluded, gen)
    neg_img, ok_img = sample_hard_negatives(logits.t(), excluded, gen)
    fused = model.forward_fusion(torch.cat([image, image[neg_img], image]), torch.cat([ids, ids, ids[neg_txt]]),
                                 torch.cat([att, att, att[neg_txt]]))
    itm_logits = model.heads["itm"](fused[:, 0])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(image.device)
    weights = torch.cat([torch.ones(b, device=image.device), ok_img.float(), ok_txt.float()])
    acc = ((itm_logits.argmax(-1) == labels).float() * weights).sum() / weights.sum()
    return itm_loss(itm_logits, labels, weights), acc.detach()


def encode_split(model: VLMo, dataset: Any, prep: Prep, batch_size: int) -> dict[str, Any]:
    """One pass over ``dataset``: embeddings of its distinct images and of all its texts.

    Returns ``img`` [I, E], ``txt`` [T, E], ``txt2img`` [T], ``texts`` [T] (the strings), ``image_item`` [I] (an
    item index showing each image, to fetch its pixels again for a rerank), ``ids`` / ``att`` [T, L] (token
    ids, for a rerank).
    """
    device = next(model.parameters()).device
    seen: dict[Any, int] = {}
    img_emb, txt_emb, ids_all, att_all, txt2img, image_item, texts = [], [], [], [], [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        new_images = []
        for j, it in enumerate(items):
            key = it.get("image_id", ("item", start + j))
            if key not in seen:
                seen[key] = len(seen)
                new_images.append(it["image"])
                image_item.append(start + j)
            txt2img.append(seen[key])
        if new_images:
            img_emb.append(model.encode_image(prep.images(new_images).to(device)).float().cpu())
        ids, att = prep.texts([it["text"] for it in items])
        texts += [it["text"] for it in items]
        txt_emb.append(model.encode_text(ids.to(device), att.to(device)).float().cpu())
        ids_all.append(ids)
        att_all.append(att)
    return {"img": torch.cat(img_emb), "txt": torch.cat(txt_emb), "txt2img": torch.tensor(txt2img), "texts": texts,
            "image_item": image_item, "ids": torch.cat(ids_all), "att": torch.cat(att_all)}


def itm_margin(model: VLMo, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """ITM log-odds of "matched" (logit₁ − logit₀) for pairs: image [n, 3, S, S], ids / att [n, L] -> [n]."""
    logits = model.heads["itm"](model.forward_fusion(image, ids, att)[:, 0]).float()
    return logits[:, 1] - logits[:, 0]


def rerank_metrics(model: VLMo, dataset: Any, prep: Prep, enc: Mapping[str, Any], sim: torch.Tensor, k: int,
                   batch_size: int) -> dict[str, Any]:
    """Retrieval metrics after re-scoring each query's top-``k`` by ITM (both directions)."""
    device = next(model.parameters()).device
    pixels: dict[int, torch.Tensor] = {}

    def image(i: int) -> torch.Tensor:
        if i not in pixels:
            pixels[i] = prep.images([dataset[enc["image_item"][i]]["image"]])[0]
        return pixels[i]

    def pair_scores(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(img_idx), batch_size):
            ii, tt = img_idx[s:s + batch_size].tolist(), txt_idx[s:s + batch_size]
            x = torch.stack([image(i) for i in ii]).to(device)
            out.append(itm_margin(model, x, enc["ids"][tt].to(device), enc["att"][tt].to(device)).cpu())
        return torch.cat(out)

    i2t = rerank_scores(sim, k, pair_scores)
    t2i = rerank_scores(sim.t(), k, lambda t, i: pair_scores(i, t))
    out: dict[str, Any] = retrieval_metrics(i2t, enc["relevant"], sim_t2i=t2i)
    out["k"] = k
    return out


@register
class ZeroShotITM(Task):
    """Image-text matching accuracy of the pre-trained ITM head, without fine-tuning.

    Each item gives a positive pair (its image, its text) and a negative (its image, the text of the next
    item showing another image with another caption): a balanced set, so chance is 50 %.
    Metrics: ``accuracy`` (= ``score``), ``pos_acc``, ``neg_acc``.
    """

    name = "itm"
    heads = ("itm",)
    data_format = "karpathy"
    headline = "accuracy"
    trainable = False  # in the task-head mode; the unified mode fine-tunes it
    unified_answers = ("yes", "no")

    def embedded(self, source: Any, size: int, cache: Path | None) -> Dataset:
        return image_text_pairs(source, size, cache)

    @torch.no_grad()
    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        """The metrics and ``per_example`` [2n]: 100 / 0 per pair (classified correctly or not), item i's
        positive pair at 2i and its negative at 2i + 1; ``accuracy`` is their mean."""
        if "itm" not in model.heads:
            raise ValueError("zero-shot ITM needs the model's 'itm' head (a VL pre-trained checkpoint)")
        model.eval()
        device = next(model.parameters()).device
        items = [dataset[i] for i in range(len(dataset))]
        n = len(items)
        keys = [it.get("image_id", ("item", i)) for i, it in enumerate(items)]
        negatives = []
        for i in range(n):
            j = next(((i + d) % n for d in range(1, n)
                      if keys[(i + d) % n] != keys[i] and items[(i + d) % n]["text"] != items[i]["text"]), None)
            if j is None:
                raise ValueError("zero-shot ITM needs at least two different images with different captions")
            negatives.append(j)
        pos, neg = [], []
        for s in range(0, n, config.eval_batch_size):
            idx = range(s, min(s + config.eval_batch_size, n))
            x = prep.images([items[i]["image"] for i in idx]).to(device)
            ids, att = prep.texts([items[i]["text"] for i in idx])
            nids, natt = prep.texts([items[negatives[i]]["text"] for i in idx])
            pos.append(itm_margin(model, x, ids.to(device), att.to(device)).cpu())
            neg.append(itm_margin(model, x, nids.to(device), natt.to(device)).cpu())
        p, q = torch.cat(pos), torch.cat(neg)
        pos_acc, neg_acc = 100.0 * float((p > 0).double().mean()), 100.0 * float((q <= 0).double().mean())
        acc = (pos_acc + neg_acc) / 2
        # Both kinds count n times, so the pairs' mean is ``accuracy``; reshape to [n, 2] to resample items (an
        # item's two pairs share its image) rather than pairs.
        per_pair = 100.0 * torch.stack([(p > 0), (q <= 0)], dim=1).double().reshape(-1)
        return {"accuracy": acc, "pos_acc": pos_acc, "neg_acc": neg_acc, "n_pairs": 2 * n, "score": acc,
                "per_example": per_pair.tolist(), "baseline": {"kind": "chance", "accuracy": 50.0}}
