"""Image-text retrieval: the one evaluator of vlmerge (VLMo §3.5; recall@1/5/10 as the merging paper §5).

Used by pre-training, the study, ``vlmerge eval retrieval`` and fine-tuning alike. TR (text retrieval): each
image queries all texts; IR (image retrieval): each text queries all images.

**Relevance** (which candidates count as a hit) is a bool matrix ``relevant`` [I, T]: image i and text t
match. :func:`owner_relevance` builds the usual one (COCO / Flickr30k): t was written for i, or t's string
is identical to one of i's texts (an identical string cannot be told apart, so it is the same statement).
On the embedded world every caption carries its meaning, and :meth:`~vlmerge.data.ImageTextDataset.relevance`
marks every image the caption truthfully describes (``"there are two shapes in the image"`` matches every
two-object scene): an oracle that knows every scene then scores 100, the ceiling.

**Tie rule** (pessimistic): a query's rank is 1 + the number of *non-matching* candidates scoring
**greater than or equal to** its best-scoring match. A constant scorer gets R@k = 0 for k < #candidates, and
no result depends on the sort order of equal scores. NaN scores rank below everything.

**Keys** (percent): ``tr_r{k}``, ``ir_r{k}``, ``avg_tr`` / ``avg_ir`` (mean over k: the paper's "Avg TR" /
"Avg IR") and ``r_mean`` (their mean: "retrieval" in the study). :func:`retrieval_chance` gives the same keys
for a uniformly random ranking (hypergeometric, exact for the same relevance sets).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..data import default_tokenizer
from ..data.datasets import MEAN, STD
from ..models.vlmo import VLMo

RECALL_KS: tuple[int, ...] = (1, 5, 10)


# ---------------------------------------------------------------------------------------------- metrics
def match_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best match under the pessimistic tie rule.

    scores [Q, C] (higher = better), positives [Q, C] bool (≥ 1 per row) -> ranks [Q] long, with
    rank = 1 + #{c not positive : scores[q, c] >= max_{p positive} scores[q, p]}.
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
    """Recall@k in percent: the share of queries with a match among the top k. scores, positives [Q, C]."""
    ranks = match_ranks(scores, positives)
    return {int(k): 100.0 * float((ranks <= k).double().mean()) for k in ks}


def owner_relevance(txt2img: torch.Tensor | Sequence[int], n_images: int | None = None,
                    texts: Sequence[str] | None = None) -> torch.Tensor:
    """relevant [I, T] bool: text t was written for image ``txt2img[t]``, or (with ``texts``) its string equals
    one of image i's texts. ``n_images`` defaults to ``max(txt2img) + 1``."""
    owner = torch.as_tensor(txt2img, dtype=torch.long)
    n_txt = len(owner)
    n_img = n_images if n_images is not None else (int(owner.max()) + 1 if n_txt else 0)
    if owner.dim() != 1 or (n_txt and (int(owner.min()) < 0 or int(owner.max()) >= n_img)):
        raise ValueError(f"txt2img must be [T={n_txt}] image indices in [0, {n_img})")
    rel = torch.zeros(n_img, n_txt, dtype=torch.bool)
    rel[owner, torch.arange(n_txt)] = True
    if texts is not None:
        if len(texts) != n_txt:
            raise ValueError(f"texts has {len(texts)} entries but txt2img has {n_txt}")
        string_id = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        sid = torch.tensor([string_id[t] for t in texts], dtype=torch.long)
        has = torch.zeros(n_img, len(string_id), dtype=torch.bool)  # image i has a text with string s
        has[owner, sid] = True
        rel = has[:, sid]
    return rel


def _as_relevance(relevant: torch.Tensor | Sequence[int], n_images: int | None) -> torch.Tensor:
    rel = torch.as_tensor(relevant)
    if rel.dtype != torch.bool:  # a txt2img vector
        rel = owner_relevance(rel, n_images)
    return rel


def retrieval_ranks(sim_i2t: torch.Tensor, relevant: torch.Tensor | Sequence[int],
                    sim_t2i: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-query ranks: ``tr`` [I'] (image queries that have a relevant text; ``tr_query`` their image
    indices) and ``ir`` [T] (every text). ``relevant`` [I, T] bool, or a txt2img vector [T] for owner
    relevance; ``sim_t2i`` [T, I] scores the IR direction when it differs from ``sim_i2tᵀ`` (a rerank)."""
    rel = _as_relevance(relevant, sim_i2t.shape[0])
    if rel.shape != sim_i2t.shape:
        raise ValueError(f"relevant {tuple(rel.shape)} must match sim_i2t {tuple(sim_i2t.shape)}")
    keep = rel.any(dim=1)  # an image no text describes cannot be a text-retrieval query
    return {"tr": match_ranks(sim_i2t[keep], rel[keep]), "tr_query": keep.nonzero().flatten(),
            "ir": match_ranks(sim_i2t.t() if sim_t2i is None else sim_t2i, rel.t())}


def ranks_record(ranks: dict[str, torch.Tensor], image_of_text: Sequence[int]) -> dict[str, list[int]]:
    """:func:`retrieval_ranks`' output as JSON lists, with ``ir_image`` [T] (each text's image): what a bootstrap
    over test images resamples (:func:`vlmerge.study.stats.retrieval_scores`)."""
    return {"tr": ranks["tr"].tolist(), "tr_query": ranks["tr_query"].tolist(), "ir": ranks["ir"].tolist(),
            "ir_image": [int(i) for i in image_of_text]}


def recalls_from_ranks(tr: torch.Tensor, ir: torch.Tensor, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """The metric keys from per-query ranks ``tr`` [Q_tr] and ``ir`` [Q_ir]."""
    ks = tuple(ks)
    out: dict[str, float] = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float((ranks <= k).double().mean())
        out[f"avg_{name}"] = sum(out[f"{name}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["avg_tr"] + out["avg_ir"]) / 2
    return out


def retrieval_metrics(sim_i2t: torch.Tensor, relevant: torch.Tensor | Sequence[int], ks: Iterable[int] = RECALL_KS,
                      sim_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """TR and IR recall@k (see the module docstring for relevance, ties and keys).

    sim_i2t [I, T] (image i vs text t); ``relevant`` [I, T] bool, or txt2img [T] (owner relevance).
    """
    r = retrieval_ranks(sim_i2t, relevant, sim_t2i)
    return recalls_from_ranks(r["tr"], r["ir"], ks)


def _chance_hit(positives: torch.Tensor, candidates: int, k: int) -> float:
    """% of queries with a match among ``k`` uniform draws without replacement from ``candidates``, averaged
    over queries with ``positives`` [Q] matches each: 1 − C(C − p, k) / C(C, k)."""
    k = min(k, candidates)
    miss = [math.comb(candidates - p, k) / math.comb(candidates, k) for p in positives.tolist()]
    return 100.0 * (1.0 - sum(miss) / max(len(miss), 1))


def retrieval_chance(relevant: torch.Tensor | Sequence[int], n_images: int | None = None,
                     ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """Expected :func:`retrieval_metrics` of a uniformly random ranking, same keys. ``relevant`` [I, T] bool, or
    txt2img [T] with ``n_images``."""
    ks = tuple(ks)
    rel = _as_relevance(relevant, n_images)
    tr_pos = rel.sum(dim=1)
    tr_pos = tr_pos[tr_pos > 0]
    ir_pos = rel.sum(dim=0)
    out: dict[str, float] = {}
    for name, pos, cands in (("tr", tr_pos, rel.shape[1]), ("ir", ir_pos, rel.shape[0])):
        for k in ks:
            out[f"{name}_r{k}"] = _chance_hit(pos, cands, k)
        out[f"avg_{name}"] = sum(out[f"{name}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["avg_tr"] + out["avg_ir"]) / 2
    return out


# ------------------------------------------------------------------------------------------------ models
@torch.no_grad()
def embed_split(
    model: VLMo, dataset: Any, tokenizer: Any, mean: Sequence[float], std: Sequence[float], batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[str]]:
    """Embed a split's distinct images and all its texts.

    Returns (image embeddings [I, E], text embeddings [T, E], the image index [T] of each text, the texts),
    on the CPU. Items without ``image_id`` are each their own image. Each distinct text string is encoded
    once, padded to the longest in its batch (padding is masked: the embedding is the same).
    """
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    imgs, pending, owner, texts = [], [], [], []
    image_index: dict[Any, int] = {}

    def flush() -> None:
        if pending:
            imgs.append(model.encode_image((torch.stack(pending).to(device) - m) / s).float().cpu())
            pending.clear()

    for i in range(len(dataset)):
        it = dataset[i]
        key = it.get("image_id", ("item", i))
        if key not in image_index:
            image_index[key] = len(image_index)
            pending.append(it["image"])
            if len(pending) == batch_size:
                flush()
        owner.append(image_index[key])
        texts.append(it["text"])
    flush()
    unique = list(dict.fromkeys(texts))
    parts = []
    for start in range(0, len(unique), batch_size):
        enc = tokenizer.encode(unique[start:start + batch_size], model.config.max_text_len)
        longest = int(enc["attention_mask"].sum(dim=1).max())
        ids, att = enc["input_ids"][:, :longest].to(device), enc["attention_mask"][:, :longest].to(device)
        parts.append(model.encode_text(ids, att).float().cpu())
    row = {t: j for j, t in enumerate(unique)}
    txt = torch.cat(parts)[torch.tensor([row[t] for t in texts], dtype=torch.long)]
    return torch.cat(imgs), txt, owner, texts


def dataset_relevance(dataset: Any, owner: Sequence[int], texts: Sequence[str]) -> tuple[torch.Tensor, str]:
    """The relevance matrix [I, T] of an embedded split and its name: the dataset's own (``relevance()``,
    the world's truthful one) where it has one, else :func:`owner_relevance` with identical strings."""
    own = getattr(dataset, "relevance", None)
    if callable(own):
        rel = own()
        if rel is not None:
            rel = torch.as_tensor(np.asarray(rel), dtype=torch.bool)
            if rel.shape != (max(owner) + 1, len(texts)):
                raise ValueError(f"dataset relevance {tuple(rel.shape)} does not match its {max(owner) + 1} images "
                                 f"and {len(texts)} texts")
            return rel, "truthful"
    return owner_relevance(owner, texts=texts), "owner"


def evaluate_retrieval(
    model: VLMo, dataset: Any, tokenizer: Any | None = None, *, mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD, batch_size: int = 128, ranks: bool = False,
) -> dict[str, Any]:
    """Zero-shot retrieval on a split (items ``{"image", "text"[, "image_id"]}``, e.g. ``ImageTextDataset``).

    Returns the metric keys of :func:`retrieval_metrics`, the chance level of each under ``chance``, the
    ``relevance`` rule (``truthful`` or ``owner``) and the counts ``images`` / ``texts``; with ``ranks``, also
    the per-query ranks (``ranks``: ``tr`` [I'], ``tr_query`` [I'], ``ir`` [T], ``ir_image`` [T] lists: what a
    bootstrap over test images resamples). ``tokenizer`` defaults to the world's; the model is left in eval
    mode.
    """
    tokenizer = tokenizer or default_tokenizer()
    if "itc" not in model.config.heads:
        raise ValueError("the model has no 'itc' head (contrastive projections): fine-tune it on retrieval first "
                         "(vlmerge finetune retrieval ...)")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: pass the tokenizer the model was trained with")
    model.eval()
    img, txt, owner, texts = embed_split(model, dataset, tokenizer, mean, std, batch_size)
    rel, rule = dataset_relevance(dataset, owner, texts)
    r = retrieval_ranks(img @ txt.t(), rel)
    out: dict[str, Any] = recalls_from_ranks(r["tr"], r["ir"])
    out |= {"chance": retrieval_chance(rel), "relevance": rule, "images": len(img), "texts": len(texts)}
    if ranks:
        out["ranks"] = ranks_record(r, owner)
    return out
