"""Pre-training objectives: ITC, ITM with global hard negatives, MLM (VLMo §3.3) and pixel MIM (for §3.4).

Shapes: ``B`` local batch, ``W`` processes, ``G = W·B`` gathered batch, ``E`` embedding width, ``L`` text
length, ``V`` vocabulary, ``P`` patches, ``p`` patch size. The functional pieces are tested on hand-computed
cases; :class:`PretrainObjective` wires them to the model's routes so that DDP sees one ``forward``.

Loss weights (merging paper §5): ITC + ITM + 0.25·MLM — "using a smaller weight (0.25) for MLM empirically
leads to better results"; VLMo itself weighs the three equally. Both are settings (``loss.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vlmo import VLMo
from .augment import OPS, rand_augment
from .dist import gather_nograd, gather_with_local_grad, rank, world_size

IGNORE = -100  # cross-entropy ignore index for unmasked MLM positions


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for x [B, ...] and index [n] (repeats allowed), as a one-hot matmul: the backward of
    advanced indexing accumulates repeated rows with atomic adds on CPU, in an order that varies from run to
    run; a matmul's does not (the forward is exact: 1·x + 0·rest)."""
    onehot = F.one_hot(index, x.shape[0]).to(x.dtype)
    return (onehot @ x.reshape(x.shape[0], -1)).reshape(len(index), *x.shape[1:])


# --------------------------------------------------------------------------------------------------- ITC
def itc_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
             not_negative: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric image-text contrastive loss over the batch gathered from all ranks (VLMo eqs. 3-4, CLIP).

    img, txt: local L2-normalised embeddings [B, E]; logit_scale: log(1/σ), a scalar parameter.
    Returns (loss, logits): ``logits[i, j] = min(exp(logit_scale), 100) · img_i · txt_j`` over the gathered
    batch [G, G] (image rows, text columns; positives on the diagonal), and the loss
    ``(CE(logits, diag) + CE(logitsᵀ, diag)) / 2`` averaged over all G pairs. ``not_negative`` [G, G] bool
    (optional; image rows, text columns, the diagonal ignored): pairs left out of both softmaxes, because
    the caption is known to be true of that image too (a false negative); the returned logits are unmasked.

    The gathered features carry gradients only for the local slice (:func:`gather_with_local_grad`). The
    returned loss has the *value* of the global-batch loss and a gradient arranged so that DDP's average
    over ranks equals the single-process gradient on the global batch: features' gradient ×W (each rank
    only back-propagates into its own slice), the temperature's ×1 (every rank sees all of it).
    """
    w = world_size()
    all_img, all_txt = gather_with_local_grad(img), gather_with_local_grad(txt)
    scale = logit_scale.exp().clamp(max=100.0)
    if w > 1:
        scale = scale / w + (scale * (1 - 1 / w)).detach()  # value unchanged, gradient /W
    logits = scale * all_img.float() @ all_txt.float().t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    scored = logits
    if not_negative is not None:
        off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=logits.device)
        scored = logits.masked_fill(not_negative & off_diagonal, float("-inf"))
    loss = (F.cross_entropy(scored, labels) + F.cross_entropy(scored.t(), labels)) / 2
    if w > 1:
        loss = loss * w - (loss * (w - 1)).detach()  # value unchanged, gradient ×W
    return loss, logits


# ------------------------------------------------------------------------------------------ hard negatives
def sample_hard_negatives(
    logits: torch.Tensor, excluded: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative per row with probability ∝ softmax(similarity) over the allowed candidates (ALBEF).

    logits [B, C]: similarities of B queries to C candidates; excluded [B, C] bool: candidates that are
    not negatives (the positive itself and every candidate with the same caption). Masking happens before
    the softmax, so a peaked similarity cannot underflow the negatives' weights to zero.
    Returns (index [B] long, valid [B] bool); ``valid`` is False for a row with no allowed candidate (its
    index is arbitrary and the pair must not enter the loss).
    """
    if not bool(torch.isfinite(logits).all()):  # multinomial would fail on NaN weights with an obscure error
        raise FloatingPointError("image-text similarities are NaN / Inf: training diverged (lower the learning "
                                 "rate or check the inputs)")
    masked = logits.detach().float().masked_fill(excluded, float("-inf"))
    valid = ~excluded.all(dim=1)
    weights = torch.where(valid[:, None], masked.softmax(dim=1), torch.ones_like(masked))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid


def same_text(ids: torch.Tensor, all_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] × [C, L] token ids -> [B, C] bool: the two texts are identical (padding included)."""
    return (ids[:, None, :] == all_ids[None, :, :]).all(dim=-1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted binary ITM cross-entropy: logits [N, 2], labels [N] (1 = matched), weights [N] in {0, 1}."""
    per_pair = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_pair * weights).sum() / weights.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------------- MLM
@dataclass(frozen=True)
class SpecialTokens:
    """Token ids MLM needs: never-masked specials, the [MASK] id, and the vocabulary size."""

    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int


def mask_tokens(
    ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialTokens, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``prob`` of the real tokens (never [CLS]/[SEP]/[PAD]); of those 80 % -> [MASK],
    10 % -> a random non-special token, 10 % unchanged.

    ids, attention_mask [B, L] -> (masked ids [B, L], labels [B, L] with the original id where picked and
    ``IGNORE`` elsewhere).
    """
    specials = torch.tensor([special.pad_id, special.cls_id, special.sep_id, special.mask_id], device=ids.device)
    candidate = attention_mask.bool() & ~torch.isin(ids, specials[:3])
    picked = (torch.rand(ids.shape, generator=generator, device=ids.device) < prob) & candidate
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE))
    action = torch.rand(ids.shape, generator=generator, device=ids.device)
    keep = torch.ones(special.vocab_size, dtype=torch.bool, device=ids.device)
    keep[specials] = False
    pool = keep.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator, device=ids.device)]
    out = torch.where(picked & (action < 0.8), torch.full_like(ids, special.mask_id), ids)
    out = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the picked positions: logits [N, V], targets [N]; 0 (with a graph) when N = 0."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


# --------------------------------------------------------------------------------------------------- MIM
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, P, p·p·C], patches in the patch embedding's row-major order, pixels (y, x, c)."""
    b, c, s, _ = images.shape
    h = s // patch
    x = images.reshape(b, c, h, patch, h, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * h, patch * patch * c)


def mask_patches(
    images: torch.Tensor, patch: int, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``round(ratio·P)`` patches per image (at least one).

    A zeroed patch embeds to the patch projection's bias, which therefore acts as the learned [MASK]
    token (the model needs no extra parameter). Returns (masked images [B, C, S, S], mask [B, P] bool).
    """
    b, _, s, _ = images.shape
    h = s // patch
    n_mask = max(1, round(ratio * h * h))
    order = torch.rand(b, h * h, generator=generator, device=images.device).argsort(dim=1)
    mask = torch.zeros(b, h * h, dtype=torch.bool, device=images.device)
    mask.scatter_(1, order[:, :n_mask], True)
    pixel_mask = mask.view(b, 1, h, 1, h, 1).expand(b, 1, h, patch, h, patch).reshape(b, 1, s, s)
    return images.masked_fill(pixel_mask, 0.0), mask


def mim_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """MSE on the masked patches against per-patch normalised pixels (MAE's ``norm_pix_loss``).

    pred [B, P, p·p·C] from the MIM head; images: the *unmasked* images [B, C, S, S]; mask [B, P] bool.
    """
    target = patchify(images.float(), patch)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class ObjectiveSettings:
    """What :class:`PretrainObjective` needs from the run config (``loss.*`` and ``augment.*``)."""

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 0.25
    mlm_prob: float = 0.15
    mim_mask_ratio: float = 0.4
    global_negatives: bool = True
    augment_ops: int = 0  # RandAugment ops per image; 0 = no augmentation
    augment_magnitude: float = 9.0
    augment_names: tuple[str, ...] = tuple(OPS)  # the operations to draw from
    itm_fraction: float = 1.0  # share of each rank's pairs that get ITM's positive + 2 hard negatives
    exclude_false_negatives: bool = False  # needs the corpus's relevance (PretrainObjective's ``relevance``)


class PretrainObjective(nn.Module):
    """The model plus one stage's objectives, so that DDP wraps a single ``forward(batch, generator)``.

    ``kind`` picks the stage's task (VLMo §3.3-3.4):

    * ``vl``: ITC on the retrieval route, ITM (fusion [T_CLS], 1 positive + 2 hard negatives per pair) and
      MLM (fusion text tokens); total = w_itc·ITC + w_itm·ITM + w_mlm·MLM. ``batch["image_id"]`` [B] (−1 =
      unknown) keeps an image's other captions out of its negatives; with ``relevance`` [I, T] bool (the
      train split's truthful relevance: caption of pair t true of image i) and ``batch["pair_id"]`` [B] (the
      pair's index, −1 = unknown), every caption true of an image is kept out of that image's ITC and ITM
      negatives too (``loss.false_negatives: exclude``).
    * ``image``: MIM on the vision route (image-only stage).
    * ``text``: MLM on the language route (text-only stage).

    Images are expected in [0, 1] and are augmented here, on the training device, then normalised by
    ``mean``/``std``. Returns a dict: ``loss`` (to back-propagate) and detached scalars for logging.
    """

    def __init__(
        self,
        model: VLMo,
        kind: str,
        settings: ObjectiveSettings,
        special: SpecialTokens,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        relevance: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("vl", "image", "text"):
            raise ValueError(f"objective kind must be 'vl', 'image' or 'text', got {kind!r}")
        if settings.exclude_false_negatives and relevance is None and kind == "vl":
            raise ValueError("loss.false_negatives=exclude needs a corpus that knows which captions are true of "
                             "which images (the embedded world's train split; relevance() returned None)")
        self.model, self.kind, self.s, self.special = model, kind, settings, special
        self.relevance = relevance if settings.exclude_false_negatives else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare_image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> augmented (training only) and normalised."""
        if self.s.augment_ops and self.training:
            image = rand_augment(image, self.s.augment_ops, self.s.augment_magnitude, generator,
                                 self.s.augment_names)
        return (image - self.mean) / self.std

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, att = batch["input_ids"], batch["attention_mask"]
        if self.kind == "text":
            return self._text(ids, att, generator)
        image = self.prepare_image(batch["image"], generator)
        if self.kind == "image":
            return self._image(image, generator)
        return self._vl(image, ids, att, batch["image_id"], generator, batch.get("pair_id"))

    def _image(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        patch = self.model.config.patch_size
        masked, mask = mask_patches(image, patch, self.s.mim_mask_ratio, generator)
        pred = self.model.heads["mim"](self.model.forward_image(masked)[:, 1:])
        loss = mim_loss(pred, image, mask, patch)
        return {"loss": loss, "mim": loss.detach()}

    def _mlm_head(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM loss and accuracy on the picked positions only (the vocabulary projection is the costly part)."""
        picked = labels != IGNORE
        logits = self.model.heads["mlm"](hidden[picked])
        targets = labels[picked]
        acc = (logits.argmax(-1) == targets).float().mean() if targets.numel() else logits.new_zeros(())
        return mlm_loss(logits, targets), acc.detach()

    def _text(self, ids: torch.Tensor, att: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        masked, labels = mask_tokens(ids, att, self.special, self.s.mlm_prob, generator)
        loss, acc = self._mlm_head(self.model.forward_text(masked, att), labels)
        return {"loss": loss, "mlm": loss.detach(), "mlm_acc": acc}

    def _true_of(self, image_id: torch.Tensor, pair_id: torch.Tensor) -> torch.Tensor:
        """[len(image_id), len(pair_id)] bool: pair j's caption is true of image i (False where either is −1)."""
        assert self.relevance is not None
        rel = self.relevance.to(image_id.device)  # a no-op where the engine put it on the training device
        true = rel[image_id.clamp(min=0)[:, None], pair_id.clamp(min=0)[None, :]]
        return true & (image_id >= 0)[:, None] & (pair_id >= 0)[None, :]

    def _vl(
        self, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, image_id: torch.Tensor,
        generator: torch.Generator, pair_id: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        m, s = self.model, self.s
        b = image.shape[0]
        # ITC on the retrieval route (dual encoder). The states after the bottom N−M layers are the fusion
        # route's inputs to its top layers, so ITM and MLM below reuse them instead of recomputing them.
        st = m.routes(image, ids, att)
        itc_head = m.heads["itc"]
        img_emb = F.normalize(itc_head.image_proj(st["image"][:, 0]), dim=-1)
        txt_emb = F.normalize(itc_head.text_proj(st["text"][:, 0]), dim=-1)
        truthful = self.relevance is not None
        if truthful and pair_id is None:
            raise ValueError("loss.false_negatives=exclude: the batch has no 'pair_id' (the pair's dataset index)")
        all_iid, all_pid = (gather_nograd(image_id), gather_nograd(pair_id)) if truthful else (None, None)
        not_negative = self._true_of(all_iid, all_pid) if truthful else None  # [G, G]
        itc, logits = itc_loss(img_emb, txt_emb, itc_head.logit_scale, not_negative)
        # ITM: hard negatives drawn from the ITC similarities, over all ranks' pairs (global mining).
        rows = slice(rank() * b, (rank() + 1) * b)
        cols = slice(None) if s.global_negatives else rows  # the candidates: every rank's pairs, or this rank's
        i2t, t2i = logits[rows, cols], logits.t()[rows, cols]
        if s.global_negatives:
            cand_img, cand_ids, cand_att = gather_nograd(image), gather_nograd(ids), gather_nograd(att)
            cand_iid = all_iid if all_iid is not None else gather_nograd(image_id)
        else:
            cand_img, cand_ids, cand_att, cand_iid = image, ids, att, image_id
        # ITM on the first n pairs (all by default; the batch is shuffled, so any n are a random subset).
        # Not negatives: the positive, every identical caption, every pair of the same image (its other captions).
        n = max(1, round(s.itm_fraction * b))
        own = image_id[:n, None]
        excluded = same_text(ids[:n], cand_ids) | ((own == cand_iid[None, :]) & (own >= 0))
        excluded_txt = excluded_img = excluded
        if not_negative is not None:  # and every caption known to be true of the image, sliced as the logits are
            excluded_txt = excluded | not_negative[rows, cols][:n]
            excluded_img = excluded | not_negative.t()[rows, cols][:n]
        neg_txt, ok_txt = sample_hard_negatives(i2t[:n], excluded_txt, generator)  # a negative text per image
        neg_img, ok_img = sample_hard_negatives(t2i[:n], excluded_img, generator)  # a negative image per text
        pair_att = torch.cat([att[:n], att[:n], cand_att[neg_txt]])
        if world_size() == 1:  # candidates are this batch's pairs: take their bottom states
            x_img, x_txt = st["image_bottom"], st["text_bottom"]
            fused = m.fuse(torch.cat([x_txt[:n], x_txt[:n], take_rows(x_txt, neg_txt)]),
                           torch.cat([x_img[:n], take_rows(x_img, neg_img), x_img[:n]]), pair_att)
        else:  # candidates come from other ranks too: their bottom states go through this rank's layers
            fused = m.forward_fusion(torch.cat([image[:n], cand_img[neg_img], image[:n]]),
                                     torch.cat([ids[:n], ids[:n], cand_ids[neg_txt]]), pair_att)
        itm_logits = m.heads["itm"](fused[:, 0])
        itm_labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(image.device)
        itm_w = torch.cat([torch.ones(n, device=image.device), ok_img.float(), ok_txt.float()])
        itm = itm_loss(itm_logits, itm_labels, itm_w)
        itm_acc = ((itm_logits.argmax(-1) == itm_labels).float() * itm_w).sum() / itm_w.sum()
        # MLM on the fusion route's text tokens.
        masked, labels = mask_tokens(ids, att, self.special, s.mlm_prob, generator)
        masked_bottom = m.routes(input_ids=masked, attention_mask=att, top=False)["text_bottom"]
        mlm, mlm_acc = self._mlm_head(m.fuse(masked_bottom, st["image_bottom"], att)[:, : ids.shape[1]], labels)
        loss = s.itc_weight * itc + s.itm_weight * itm + s.mlm_weight * mlm
        return {
            "loss": loss, "itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach(),
            "itm_acc": itm_acc.detach(), "mlm_acc": mlm_acc,
            "temperature": 1 / m.heads["itc"].logit_scale.detach().exp().clamp(max=100.0),
        }
