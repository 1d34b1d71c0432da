"""Pre-training recipes as lists of stages, and which parameters each stage trains (by parameter role).

* ``scratch``: VL pre-training of the target architecture for K steps.
* ``seed`` (merging paper §4.3): VL pre-training of a modality-agnostic model (MAA) for K_seed steps, its
  shared weights copied into every modality expert of the target architecture (``maa_to_msa``), then VL
  pre-training for K − K_seed steps. Total K, as the paper's "K_seed + K_VL = 200k".
* ``stagewise`` (VLMo §3.4, Fig. 2): image-only MIM training the attention and the vision experts, then
  text-only MLM training the language experts' FFNs with attention and vision weights frozen, then VL
  pre-training of everything for the remaining steps.

The weights at the start of the last (VL) stage are the paper's W⁰ (modality arithmetic, §4.1); the engine
saves them as ``OUT/w0/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.roles import SHARED, parse_param_name

RECIPES = ("scratch", "seed", "stagewise")
VL_HEADS = ("itc", "itm", "mlm")


@dataclass(frozen=True)
class Stage:
    """One training stage: objective ``kind`` (``vl``/``image``/``text``) on ``arch`` for ``steps`` steps.

    ``init``: ``scratch`` (a fresh model from the run seed), ``expand`` (the previous stage's weights
    expanded into ``arch`` with ``maa_to_msa``) or ``continue`` (the previous stage's model as it is).
    """

    name: str
    kind: str
    arch: str
    steps: int
    init: str


def plan_stages(recipe: str, arch: str, total: int, seed_steps: int = 0, image_steps: int = 0,
                text_steps: int = 0) -> list[Stage]:
    """The stages of ``recipe``; their steps sum to ``total`` and the last one is always VL pre-training."""
    if recipe == "scratch":
        return [Stage("vl", "vl", arch, total, "scratch")]
    if recipe == "seed":
        return [Stage("seed", "vl", "maa", seed_steps, "scratch"),
                Stage("vl", "vl", arch, total - seed_steps, "expand")]
    if recipe == "stagewise":
        return [Stage("image", "image", arch, image_steps, "scratch"),
                Stage("text", "text", arch, text_steps, "continue"),
                Stage("vl", "vl", arch, total - image_steps - text_steps, "continue")]
    raise ValueError(f"recipe.name must be one of {list(RECIPES)}, got {recipe!r}")


def heads_for(recipe: str) -> tuple[str, ...]:
    """Heads the recipe trains: ITC/ITM/MLM, plus the MIM pixel head for ``stagewise``."""
    return (*VL_HEADS, "mim") if recipe == "stagewise" else VL_HEADS


def is_trainable(kind: str, name: str) -> bool:
    """Whether parameter ``name`` trains in a stage of objective ``kind`` (VLMo §3.4).

    * ``image``: shared block modules and vision experts, the vision embeddings, the type embedding (only
      its image row gets gradients), the final norm and the MIM head.
    * ``text``: the language experts of the FFN slot (``norm2``, ``mlp``; nothing in a block whose FFN is
      shared), the text embeddings and the MLM head; attention and everything visual stay frozen.
    * ``vl``: everything except the MIM head (unused by the VL objectives).
    """
    role = parse_param_name(name)
    if kind == "vl":
        return role.head != "mim"
    if kind == "image":  # the vision route: v / shared experts and embeddings, the final norm, MIM head
        if role.kind in ("block", "embed"):
            return role.expert in ("v", SHARED)
        return role.kind == "final_norm" or role.head == "mim"
    if kind == "text":
        if role.kind == "block":
            return role.expert == "l" and role.module in ("norm2", "mlp")
        return (role.kind == "embed" and role.expert == "l") or role.head == "mlm"
    raise ValueError(f"stage kind must be 'vl', 'image' or 'text', got {kind!r}")


def apply_freezing(model: nn.Module, kind: str) -> None:
    """Set ``requires_grad`` of every parameter for a stage of objective ``kind``."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(kind, name))
