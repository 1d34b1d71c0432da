"""Zero-shot image-text retrieval with the dual encoder (VLMo §3.5; recall@1/5/10 as the merging paper §5).

TR (text retrieval): each image queries all captions; IR (image retrieval): each caption queries all images.
Items sharing an ``image_id`` are one image with several captions (COCO style). A hit is a retrieved
caption equal to one of the query image's captions (TR), or a retrieved image that has the query caption
among its captions (IR): a generic caption ("there are two objects in the image") is relevant to every
image it describes. The chance level of every metric is computed for the same relevance sets
(hypergeometric), so results read against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data import default_tokenizer
from ..data.datasets import MEAN, STD
from ..models.vlmo import VLMo

KS = (1, 5, 10)


def recall_at_k(sim: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS) -> dict[int, float]:
    """sim [Q, C] scores; relevant [Q, C] bool -> {k: % of queries with a relevant item in the top k}."""
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices
    hit = relevant.gather(1, top)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def chance_recall(relevant_counts: torch.Tensor, candidates: int, k: int) -> float:
    """% of queries with a relevant item in ``k`` random draws (no replacement) from ``candidates``, averaged
    over queries with ``relevant_counts`` relevant items each."""
    k = min(k, candidates)
    miss = [math.comb(candidates - c, k) / math.comb(candidates, k) for c in relevant_counts.tolist()]
    return 100.0 * (1.0 - sum(miss) / len(miss))


@torch.no_grad()
def embed_split(
    model: VLMo, dataset: Any, tokenizer: Any, mean: Sequence[float], std: Sequence[float], batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[str]]:
    """Embed a split's unique images and all its captions.

    Returns (image embeddings [I, E], caption embeddings [N, E], the image index [N] of each caption, the
    captions), on the CPU. Items without ``image_id`` are each their own image.
    """
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    imgs, txts, owner, texts = [], [], [], []
    image_index: dict[int, int] = {}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        new = []
        for j, it in enumerate(items):
            key = int(it.get("image_id", -1 - start - j))
            if key not in image_index:
                image_index[key] = len(image_index)
                new.append(it["image"])
            owner.append(image_index[key])
        if new:
            image = torch.stack(new).to(device)
            imgs.append(model.encode_image((image - m) / s).float().cpu())
        enc = tokenizer.encode([it["text"] for it in items], model.config.max_text_len)
        txts.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
        texts += [it["text"] for it in items]
    return torch.cat(imgs), torch.cat(txts), owner, texts


def evaluate_retrieval(
    model: VLMo, dataset: Any, tokenizer: Any | None = None, *, mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD, batch_size: int = 128,
) -> dict[str, float]:
    """Zero-shot retrieval on a split (items ``{"image", "text"[, "image_id"]}``, e.g. ``ImageTextDataset``).

    Returns percentages ``tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10``, their means ``tr_mean`` / ``ir_mean``
    (the paper's "Avg TR" / "Avg IR"), the chance level of each (``chance_tr_r1`` …), and the counts
    ``images`` / ``captions``. ``tokenizer`` defaults to the world's; the model is left in eval mode.
    """
    tokenizer = tokenizer or default_tokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: pass the tokenizer the model was trained with")
    model.eval()
    img, txt, owner, texts = embed_split(model, dataset, tokenizer, mean, std, batch_size)
    caption_id = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    cap = torch.tensor([caption_id[t] for t in texts])
    has = torch.zeros(len(img), len(caption_id), dtype=torch.bool)  # image i has caption string c
    has[torch.tensor(owner), cap] = True
    relevant = has[:, cap]  # [I, N]: caption n is one of image i's captions
    sim = img @ txt.t()
    out: dict[str, float] = {"images": float(len(img)), "captions": float(len(texts))}
    for name, scores, rel in (("tr", sim, relevant), ("ir", sim.t(), relevant.t())):
        rec = recall_at_k(scores, rel)
        for k in KS:
            out[f"{name}_r{k}"] = rec[k]
            out[f"chance_{name}_r{k}"] = chance_recall(rel.sum(dim=1), rel.shape[1], k)
        out[f"{name}_mean"] = sum(rec.values()) / len(KS)
    return out
