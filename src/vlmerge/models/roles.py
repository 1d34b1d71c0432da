"""Which parameter belongs to which modality expert: the one declarative map of the project.

Every transformer-block weight of a vlmerge model is named

    blocks.{layer}.{module}.{expert}.{suffix}

* ``layer``   -- 0-based block index (layer ``i`` of the paper is ``layer = i - 1``).
* ``module``  -- one of :data:`MODULES`: ``norm1`` (pre-attention LayerNorm), ``attn`` (self-attention),
  ``norm2`` (pre-FFN LayerNorm), ``mlp`` (feed-forward network).
* ``expert``  -- ``v`` / ``l`` / ``vl`` for a modality-specific copy (the paper's W_i^v, W_i^l, W_i^vl),
  or ``shared`` for a modality-agnostic module used by every modality.
* ``suffix``  -- e.g. ``qkv.weight``, ``proj.bias``, ``fc1.weight``, ``weight``.

Every other parameter has a role too (:data:`OUTSIDE_BLOCKS`): ``embed`` (with the modality it embeds:
``v`` patch / [I_CLS] / image positions, ``l`` words / text positions / the BERT-import embedding norm,
``shared`` the modality-type table and VLMo's relative-position table), ``final_norm`` (the LayerNorm after
the last block, on both routes; ``norm.v`` / ``norm.l`` when a model has one per modality, BEiT-3; FLAVA's
multimodal encoder's ``mm_norm``), FLAVA's connector ``mm_proj.{v,l}`` / ``mm_cls_token`` (``embed``)
and ``head`` (``heads.{name}.*``, with the head's name). None of these is *mergeable*: the paper keeps
embeddings per modality and never merges heads. A name that matches nothing is ``other``.

Pre-training (freezing), merging (grouping copies), metrics (flattening W^v and W^l) and importers all use
this module, so a new architecture only has to follow the naming scheme.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MODULES: tuple[str, ...] = ("norm1", "attn", "norm2", "mlp")
MODALITIES: tuple[str, ...] = ("v", "l", "vl")
SHARED = "shared"
EXPERTS: tuple[str, ...] = (*MODALITIES, SHARED)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(norm1|attn|norm2|mlp)\.(v|l|vl|shared)\.(.+)$")
_HEAD_RE = re.compile(r"^heads\.([^.]+)\.(.+)$")

OUTSIDE_BLOCKS: dict[str, tuple[str, str, str]] = {
    # top-level module / parameter name -> (kind, modality, part)
    "patch_embed": ("embed", "v", "patch"),  # a projection (decayed like any matrix)
    "cls_token": ("embed", "v", "cls"),
    "image_pos_embed": ("embed", "v", "position"),
    "word_embed": ("embed", "l", "table"),
    "text_pos_embed": ("embed", "l", "position"),
    "text_embed_norm": ("embed", "l", "norm"),
    "type_embed": ("embed", SHARED, "table"),
    "rel_pos_bias": ("embed", SHARED, "position"),  # VLMo's relative-position table, every layer's heads
    "norm": ("final_norm", SHARED, "norm"),  # ``norm.{v,l}.*`` when there is one per modality (BEiT-3)
    # FLAVA's connector to its multimodal encoder (fusion "encoder"): kept per modality like the embeddings
    "mm_proj": ("embed", SHARED, "projection"),  # ``mm_proj.{v,l}.*``: each modality's last states -> encoder
    "mm_cls_token": ("embed", SHARED, "cls"),  # the fusion [CLS]
    "mm_norm": ("final_norm", SHARED, "norm"),  # the multimodal encoder's final LayerNorm
}
"""The parameters outside the blocks, by their first name component. ``part`` says what kind of tensor it
is: lookup ``table`` / ``position`` / ``cls`` tensors are not weight-decayed (BEiT's ``no_weight_decay``)."""


@dataclass(frozen=True)
class ParamRole:
    """Where one parameter sits. ``kind``: ``block``, ``embed``, ``final_norm``, ``head`` or ``other``.

    ``expert``: a block weight's expert (``v``/``l``/``vl``/``shared``), or the modality an embedding serves
    (``v``/``l``/``shared``). ``head``: the head's name for ``heads.{head}.*``. ``part``: for parameters
    outside the blocks, what the tensor is (:data:`OUTSIDE_BLOCKS`).
    """

    name: str
    kind: str
    layer: int | None = None
    module: str | None = None
    expert: str | None = None
    suffix: str | None = None
    head: str | None = None
    part: str | None = None

    @property
    def mergeable(self) -> bool:
        """True for a modality-specific block weight (one of several copies to merge)."""
        return self.kind == "block" and self.expert in MODALITIES

    @property
    def merged_name(self) -> str:
        """The name the merged (modality-agnostic) tensor takes: the ``shared`` expert of the same slot."""
        if self.kind != "block":
            return self.name
        return block_param_name(self.layer, self.module, SHARED, self.suffix)  # type: ignore[arg-type]


def block_param_name(layer: int, module: str, expert: str, suffix: str) -> str:
    """Build ``blocks.{layer}.{module}.{expert}.{suffix}`` after checking each part."""
    if module not in MODULES:
        raise ValueError(f"module must be one of {MODULES}, got {module!r}")
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    return f"blocks.{layer}.{module}.{expert}.{suffix}"


def parse_param_name(name: str) -> ParamRole:
    """Parse a state-dict key into its :class:`ParamRole`."""
    m = _BLOCK_RE.match(name)
    if m is None:
        h = _HEAD_RE.match(name)
        if h is not None:
            return ParamRole(name=name, kind="head", head=h.group(1), suffix=h.group(2))
        first, _, rest = name.partition(".")
        if first in OUTSIDE_BLOCKS:
            kind, modality, part = OUTSIDE_BLOCKS[first]
            if first in ("norm", "mm_proj") and rest.partition(".")[0] in ("v", "l"):
                modality = rest.partition(".")[0]
            return ParamRole(name=name, kind=kind, expert=modality, suffix=rest or None, part=part)
        return ParamRole(name=name, kind="other")
    layer, module, expert, suffix = m.groups()
    return ParamRole(name=name, kind="block", layer=int(layer), module=module, expert=expert, suffix=suffix)


@dataclass(frozen=True)
class MergeGroup:
    """The modality copies of one block parameter, to be merged into ``target``.

    ``sources`` maps modality (``v``/``l``/``vl``) to the source key; ``layer`` lets per-layer schedules and
    the paper's top-M rule (a ``vl`` copy present) act on the group.
    """

    target: str
    layer: int
    module: str
    suffix: str
    sources: dict[str, str]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.sources)


def merge_groups(names: Iterable[str]) -> list[MergeGroup]:
    """Group the mergeable keys of a state dict by slot (layer, module, suffix).

    A slot whose only copy is ``shared`` is not a group: it passes through a merge unchanged.
    Raises ``ValueError`` when a slot has both modality copies and a ``shared`` one (an ill-formed model).
    """
    slots: dict[tuple[int, str, str], dict[str, str]] = {}
    shared: set[tuple[int, str, str]] = set()
    for name in names:
        r = parse_param_name(name)
        if r.kind != "block":
            continue
        key = (r.layer, r.module, r.suffix)  # type: ignore[assignment]
        if r.expert == SHARED:
            shared.add(key)  # type: ignore[arg-type]
        else:
            slots.setdefault(key, {})[r.expert] = name  # type: ignore[index, arg-type]
    groups = []
    for (layer, module, suffix), sources in sorted(slots.items()):
        if (layer, module, suffix) in shared:
            raise ValueError(
                f"blocks.{layer}.{module}.*.{suffix} has both modality copies {sorted(sources)} and a shared "
                "copy; a slot is either modality-specific or shared"
            )
        groups.append(
            MergeGroup(
                target=block_param_name(layer, module, SHARED, suffix),
                layer=layer,
                module=module,
                suffix=suffix,
                sources=dict(sources),
            )
        )
    return groups
