"""Other codebases' multimodal checkpoints in and out: VLMo, the merging paper's own (vl-merging), BEiT-3, FLAVA.

Each layout is one :class:`Layout` in :data:`LAYOUTS`: ``to_vlmerge`` turns the source's state dict into a
:class:`Converted` (a :class:`~vlmerge.models.vlmo.ModelConfig`, a state dict whose names follow the role map
of :mod:`vlmerge.models.roles`, and every source tensor that has no slot, kept under its source name), and
``from_vlmerge`` writes a vlmerge model (merged or not) back in the source's names, loadable by the source's
own code. Nothing is dropped: a source key the importer does not know is kept aside and listed, and so are
heads without a slot and tables the source saves but its forward never reads.

============== ======================================================================================
``vlmo``       microsoft/unilm VLMo (MoME): shared ``norm1`` / ``attn`` (fused ``qkv`` without a k bias,
               ``q_bias`` / ``v_bias``), ``norm2_{imag,text,vl}`` / ``mlp_{imag,text,vl}`` (the VL expert in
               the top layers), LayerScale ``gamma_1`` / ``gamma_2``, one relative-position table for every
               layer, BERT text embeddings; fusion route: early (all layers on [text; image]). Arch
               ``custom-ffn``.
``vl-merging`` ylsung/vl-merging (the merging paper's models): ``transformer.blocks.{i}.{attn,mlp,norm1,norm2}``
               each either one module or ``.{v,l,vl}`` experts; otherwise as VLMo. Fusion route: the
               paper's Fig. 2 (late: bottom layers per modality).
``beit3``      torchscale ``BEiT3``: every sublayer a multiway pair ``A`` (vision) / ``B`` (text), separate
               q/k/v/out projections with biases, Sub-LN, a final LayerNorm per modality, Fairseq positions
               (rows from 2); no VL expert (M = 0); fusion route: early. Arch ``msa``.
``flava``      transformers ``FlavaModel`` (or ``FlavaForPreTraining``'s ``flava.*``): the image and text
               encoders (pre-LN ViT layers, separate q/k/v) become the ``v`` / ``l`` experts of every layer,
               the multimodal encoder ``mm_depth`` shared fusion layers after them, with the two
               ``*_to_mm_projection`` and the multimodal [CLS] (fusion route ``encoder``). Arch ``msa``.
               Reads the source folder's ``config.json`` (heads, epsilon, activation) when there is one.
============== ======================================================================================

Exactness: each import reproduces the source's hidden states on every route (tested against torchscale
itself for BEiT-3 and against forwards written from the papers for VLMo / vl-merging). Rewrites that keep
the function but not the tensors: VLMo's k bias becomes an explicit zero bias (a k bias shifts every logit of
a query by the same amount, which softmax ignores, so export drops it); VLMo's own token-type row for text,
added after BERT's embedding LayerNorm, is folded into that LayerNorm's bias (export writes it back as zero);
FLAVA's multimodal [CLS] comes last on vlmerge's fusion route, not first (its encoder has no positions, so
every token's output is the same), and vlmerge's image type row, which FLAVA lacks, is exported folded into
the image positions.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .roles import MODULES, SHARED, block_param_name
from .vlmo import ARCHS, ModelConfig, VLMo, param_shapes, rel_pos_rows

Tensors = dict[str, torch.Tensor]


@dataclass
class Converted:
    """An imported checkpoint: ``config`` and ``state_dict`` build a :class:`VLMo`; ``kept`` holds every source
    tensor without a slot under its source name; ``notes`` says why each was kept (key -> reason)."""

    config: ModelConfig
    state_dict: Tensors
    kept: Tensors = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def report(self) -> dict[str, Any]:
        by_reason: dict[str, list[str]] = {}
        for k, why in sorted(self.notes.items()):
            by_reason.setdefault(why, []).append(k)
        return {"source": self.source, "arch": self.config.arch, "fusion": self.config.fusion,
                "depth": self.config.depth, "embed_dim": self.config.embed_dim,
                "num_vl_layers": self.config.num_vl_layers, "mapped_tensors": len(self.state_dict),
                "kept_aside": by_reason}


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: its name, a one-line description, and the two directions."""

    name: str
    description: str
    to_vlmerge: Callable[..., Converted]
    from_vlmerge: Callable[[Mapping[str, torch.Tensor], ModelConfig, Mapping[str, torch.Tensor], str], Tensors]
    reads_config: bool = False  # the importer takes ``source_config``: the source folder's HF config.json


class _Source:
    """A source state dict being consumed: ``take`` marks a key used; what is left at the end is kept aside."""

    def __init__(self, sd: Mapping[str, torch.Tensor], where: str) -> None:
        self.sd = dict(sd)
        self.where = where
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(f"{self.where}: missing key {key!r}")
        self.used.add(key)
        t = self.sd[key]
        if not t.is_floating_point():
            raise CheckpointError(f"{self.where}: {key!r} is {t.dtype}; expected floating-point weights")
        return t.detach().to(torch.float32)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.sd:
            raise CheckpointError(f"{self.where}: missing key {key!r}")
        return tuple(self.sd[key].shape)

    def rest(self, notes: Mapping[str, str]) -> tuple[Tensors, dict[str, str]]:
        kept = {k: v for k, v in self.sd.items() if k not in self.used}
        return kept, {k: notes.get(k, next((why for pat, why in notes.items() if re.fullmatch(pat, k)),
                                             "unknown to the importer")) for k in kept}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> Tensors:
    """Drop the first of ``prefixes`` that starts some key from every key that has it (others unchanged)."""
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
    return dict(sd)


def _assign(sd: Tensors, model_shapes: Mapping[str, tuple[int, ...]], name: str, value: torch.Tensor,
            where: str) -> None:
    if name not in model_shapes:
        raise CheckpointError(f"{where}: no slot {name!r} in the vlmerge model (an inconsistent source layout)")
    if tuple(value.shape) != model_shapes[name]:
        raise CheckpointError(f"{where}: {name} expects shape {list(model_shapes[name])}, the source gives "
                              f"{list(value.shape)}")
    sd[name] = value.contiguous()


def _finish(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], sd: Tensors, src: _Source,
            notes: Mapping[str, str], name: str) -> Converted:
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise CheckpointError(f"{src.where}: the import left {len(missing)} vlmerge tensors unset, e.g. "
                              f"{missing[:4]} (an importer bug or an unsupported variant)")
    kept, why = src.rest(notes)
    return Converted(config, sd, kept, why, name)


def _count(src: _Source, pattern: str) -> int:
    """1 + the largest layer index in keys matching ``pattern`` (a regex with one group for the index)."""
    found = [int(m.group(1)) for k in src.sd if (m := re.match(pattern, k))]
    if not found:
        return 0
    n = max(found) + 1
    if sorted(set(found)) != list(range(n)):
        raise CheckpointError(f"{src.where}: layer indices {sorted(set(found))} are not 0..{n - 1}")
    return n


# ----------------------------------------------------------------------------------------- VLMo family
_VLMO_HEADS = {  # VLMo / vl-merging pre-training head -> vlmerge head tensor
    "itc_image_proj.fc.weight": "heads.itc.image_proj.weight",
    "itc_text_proj.fc.weight": "heads.itc.text_proj.weight",
    "logit_scale": "heads.itc.logit_scale",
    "pooler.dense.weight": "heads.itm.pooler.dense.weight",
    "pooler.dense.bias": "heads.itm.pooler.dense.bias",
    "itm_score.fc.weight": "heads.itm.fc.weight",
    "itm_score.fc.bias": "heads.itm.fc.bias",
}
_VLMO_HEAD_ALIASES = {  # vl-merging names its contrastive heads after its loss, "ifm"
    "itc_image_proj.fc.weight": "ifm_image_proj.fc.weight", "itc_text_proj.fc.weight": "ifm_text_proj.fc.weight",
}
_VLMO_NOTES = {
    r"text_embeddings\.position_ids": "a buffer (0..L-1): rebuilt from the geometry",
    r"text_embeddings\.token_type_ids": "a buffer (zeros): rebuilt from the geometry",
    r"\w*relative_position_index|mask_for_combining_temporal": "a buffer: rebuilt from the geometry",
    r"temporal_relative_position_bias_table": "video frames' table: unused on images",
    r"transformer\.mask_token": "the [MASK] patch for masked image modelling: no slot",
    r"text_embeddings\.position_embeddings\.weight": "unused by the source's forward (relative positions)",
    r"text_embeddings\.token_type_embeddings\.weight": "BERT's type table: row 0 is in type_embed; the rest unused",
    r"(mlm_score|i[tf][cm]_vl_text_proj|i[tf][cm]_vl_image_proj|vqa_classifier|nlvr2_classifier)\..*|"
    r"logit_vl_scale": "a head without a vlmerge slot",
}
_VLMO_EXPERT = {"v": "imag", "l": "text", "vl": "vl"}


def _vlmo_block_keys(layout: str, i: int, module: str, expert: str) -> str:
    """Source prefix of (layer, module, expert); expert ``shared`` for a single module."""
    base = f"transformer.blocks.{i}."
    if layout == "vlmo":
        if module in ("norm2", "mlp") and expert != SHARED:
            return f"{base}{module}_{_VLMO_EXPERT[expert]}."
        # VLMo's norm1 / attn are one module; an expert of them names no key (it never matches)
        return f"{base}{module}." if expert == SHARED else f"{base}{module}:{expert}."
    return f"{base}{module}." + ("" if expert == SHARED else f"{expert}.")


def _vlmo_experts(src: _Source, layout: str, depth: int) -> tuple[str, int]:
    """(arch, M) from which modules of the source have per-modality experts and which layers have ``vl``."""
    specific = []
    vl_layers = set()
    for module in MODULES:
        probe = "weight" if module.startswith("norm") else ("qkv.weight" if module == "attn" else "fc1.weight")
        per = [all(src.has(_vlmo_block_keys(layout, i, module, e) + probe) for e in ("v", "l")) for i in range(depth)]
        if any(per) and not all(per):
            raise CheckpointError(f"{src.where}: {module} has modality experts in some layers only")
        if all(per):
            specific.append(module)
            vl_layers |= {i for i in range(depth) if src.has(_vlmo_block_keys(layout, i, module, "vl") + probe)}
        elif not all(src.has(_vlmo_block_keys(layout, i, module, SHARED) + probe) for i in range(depth)):
            raise CheckpointError(f"{src.where}: blocks' {module} is neither one module nor v/l experts "
                                  f"(no {_vlmo_block_keys(layout, 0, module, SHARED) + probe!r})")
    arch = next((a for a, mods in ARCHS.items() if set(mods) == set(specific)), None)
    if arch is None:
        raise CheckpointError(f"{src.where}: modality-specific modules {specific} match no vlmerge architecture "
                              f"({ {a: list(m) for a, m in ARCHS.items()} })")
    m = len(vl_layers)
    if vl_layers != set(range(depth - m, depth)):
        raise CheckpointError(f"{src.where}: VL experts in layers {sorted(vl_layers)}, expected the top ones")
    return arch, m


def _vlmo_to_vlmerge(layout: str) -> Callable[..., Converted]:
    def convert(state_dict: Mapping[str, torch.Tensor], where: str = "source", *, image_size: int | None = None,
                num_heads: int | None = None) -> Converted:
        src = _Source(strip_prefix(state_dict, ("module.", "model.")), where)
        depth = _count(src, r"transformer\.blocks\.(\d+)\.")
        if depth == 0:
            raise CheckpointError(f"{where}: no transformer.blocks.* keys; not a {layout} checkpoint")
        d = src.shape("transformer.cls_token")[-1]
        arch, m = _vlmo_experts(src, layout, depth)
        out_c, in_c, patch, _ = src.shape("transformer.patch_embed.proj.weight")
        table = src.shape("relative_position_bias_table")
        if table[1] % depth:
            raise CheckpointError(f"{where}: relative_position_bias_table has {table[1]} columns, not heads × "
                                  f"{depth} layers")
        heads = num_heads or table[1] // depth
        if heads * depth != table[1]:
            raise CheckpointError(f"--num-heads {heads}: the relative-position table has {table[1]} columns, "
                                  f"{depth} layers × {table[1] // depth} heads")
        if image_size is None and src.has("relative_position_index"):
            image_size = math.isqrt(src.shape("relative_position_index")[0] - 1) * patch
        image_size = image_size or 224
        w = image_size // patch
        r_v = (2 * w - 1) ** 2 + 3
        text_span, odd = divmod(table[0] - r_v - 2, 2)
        if odd or text_span < 1:
            raise CheckpointError(f"{where}: relative_position_bias_table has {table[0]} rows, which fits no text "
                                  f"span for {image_size}px images of {patch}px patches (--image-size?)")
        mlp_probe = _vlmo_block_keys(layout, 0, "mlp", "v" if "mlp" in ARCHS[arch] else SHARED) + "fc1.weight"
        vocab = src.shape("text_embeddings.word_embeddings.weight")[0]
        max_text = src.shape("text_embeddings.position_embeddings.weight")[0]
        types = src.shape("token_type_embeddings.weight")[0]
        heads_src = {k: (_VLMO_HEAD_ALIASES[k] if not src.has(k) and src.has(_VLMO_HEAD_ALIASES.get(k, ""))
                         else k) for k in _VLMO_HEADS}
        heads_present = tuple(h for h, key in (("itc", "itc_image_proj.fc.weight"), ("itm", "itm_score.fc.weight"))
                              if src.has(heads_src[key]))
        config = ModelConfig(
            arch=arch, image_size=image_size, patch_size=patch, in_chans=in_c, embed_dim=d, depth=depth,
            num_heads=heads, mlp_ratio=src.shape(mlp_probe)[0] / d, num_vl_layers=m, vocab_size=vocab,
            max_text_len=min(max_text, text_span), type_vocab_size=max(2, types), qkv_bias=True, ln_eps=1e-6,
            text_embed_norm=True, text_embed_norm_eps=1e-12, heads=heads_present,
            fusion="early" if layout == "vlmo" else "late", layer_scale=0.1, rel_pos_text_len=text_span,
        )
        if rel_pos_rows(config) != table[0]:
            raise CheckpointError(f"{where}: relative_position_bias_table rows {table[0]} != {rel_pos_rows(config)}")
        shapes = param_shapes(config)
        sd: Tensors = {}

        def put(name: str, value: torch.Tensor) -> None:
            _assign(sd, shapes, name, value, where)

        # Embeddings. BERT: LN(word + type_0) (no absolute positions: VLMo uses relative ones); then VLMo adds
        # its own type row 0 after that LayerNorm, which is the same as adding it to the LayerNorm's bias.
        vlmo_types = src.take("token_type_embeddings.weight")
        bert_types = src.take("text_embeddings.token_type_embeddings.weight")
        src.used.discard("text_embeddings.token_type_embeddings.weight")  # kept aside too: export restores it
        put("word_embed.weight", src.take("text_embeddings.word_embeddings.weight"))
        put("text_pos_embed.weight", torch.zeros(shapes["text_pos_embed.weight"]))
        put("text_embed_norm.weight", src.take("text_embeddings.LayerNorm.weight"))
        put("text_embed_norm.bias", src.take("text_embeddings.LayerNorm.bias") + vlmo_types[0])
        type_table = torch.zeros(shapes["type_embed.weight"])
        type_table[0] = bert_types[0]
        type_table[1:types] = vlmo_types[1:]
        put("type_embed.weight", type_table)
        put("patch_embed.proj.weight", src.take("transformer.patch_embed.proj.weight"))
        put("patch_embed.proj.bias", src.take("transformer.patch_embed.proj.bias"))
        put("cls_token", src.take("transformer.cls_token"))
        pos = (src.take("transformer.pos_embed") if src.has("transformer.pos_embed")
               else torch.zeros(shapes["image_pos_embed"]))
        put("image_pos_embed", pos)
        put("rel_pos_bias", src.take("relative_position_bias_table"))
        put("norm.weight", src.take("transformer.norm.weight"))
        put("norm.bias", src.take("transformer.norm.bias"))
        # Blocks: every expert of vlmerge's module from the source's expert (or its single module); the
        # block's LayerScale vectors go into each expert of attn / mlp.
        for i in range(depth):
            experts = config.experts(i)
            for module in MODULES:
                for e in experts[module]:
                    p = _vlmo_block_keys(layout, i, module, e)
                    if module.startswith("norm"):
                        parts = {"weight": f"{p}weight", "bias": f"{p}bias"}
                    elif module == "mlp":
                        parts = {f"{fc}.{t}": f"{p}{fc}.{t}" for fc in ("fc1", "fc2") for t in ("weight", "bias")}
                    else:
                        q_bias, v_bias = src.take(f"{p}q_bias"), src.take(f"{p}v_bias")
                        put(block_param_name(i, module, e, "qkv.bias"),
                            torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
                        parts = {"qkv.weight": f"{p}qkv.weight", "proj.weight": f"{p}proj.weight",
                                 "proj.bias": f"{p}proj.bias"}
                    for suffix, key in parts.items():
                        put(block_param_name(i, module, e, suffix), src.take(key))
                    if module in ("attn", "mlp"):
                        gamma = src.take(f"transformer.blocks.{i}.gamma_{1 if module == 'attn' else 2}")
                        put(block_param_name(i, module, e, "gamma"), gamma)
        for key, name in _VLMO_HEADS.items():
            if name in shapes:
                put(name, src.take(heads_src[key]))
        return _finish(config, shapes, sd, src, _VLMO_NOTES, layout)

    return convert


def _one_copy(sd: Mapping[str, torch.Tensor], names: list[str], what: str) -> torch.Tensor:
    """The one tensor several vlmerge names must share in a layout that has a single copy."""
    first = sd[names[0]]
    for n in names[1:]:
        if not torch.equal(sd[n], first):
            raise CheckpointError(f"{what}: {names[0]} and {n} differ, and the target layout has one tensor for "
                                  "both; merge the model first (vlmerge merge) or export to a layout with experts")
    return first


def _expert_for(config: ModelConfig, layer: int, module: str, modality: str) -> str:
    have = config.experts(layer)[module]
    return modality if modality in have else SHARED


def _vlmo_from_vlmerge(layout: str) -> Callable[..., Tensors]:
    def export(sd: Mapping[str, torch.Tensor], config: ModelConfig, kept: Mapping[str, torch.Tensor],
               source_arch: str) -> Tensors:
        c = config
        # The modules that have experts in the target layout: VLMo's are fixed; a vl-merging model's are
        # those of the architecture it was imported from (a merged model writes its one copy into each).
        specific = set(ARCHS["custom-ffn" if layout == "vlmo" else source_arch])
        if not c.rel_pos_text_len or c.layer_scale is None or not c.text_embed_norm:
            raise CheckpointError(f"this checkpoint is not {layout}-shaped (it needs a relative-position table, "
                                  "LayerScale and a text embedding norm: one imported with convert --from "
                                  f"{layout})")
        out: Tensors = dict(kept)
        if torch.count_nonzero(sd["text_pos_embed.weight"]):
            raise CheckpointError(f"text_pos_embed is not zero; {layout} has no absolute text positions")
        bert_types = out.get("text_embeddings.token_type_embeddings.weight",
                             torch.zeros(2, c.embed_dim)).clone()
        bert_types[0] = sd["type_embed.weight"][0]
        out["text_embeddings.token_type_embeddings.weight"] = bert_types
        vlmo_types = sd["type_embed.weight"].clone()
        vlmo_types[0] = 0.0  # folded into the text LayerNorm's bias on import
        out["token_type_embeddings.weight"] = vlmo_types
        out["text_embeddings.word_embeddings.weight"] = sd["word_embed.weight"]
        out.setdefault("text_embeddings.position_embeddings.weight", torch.zeros(c.max_text_len, c.embed_dim))
        out["text_embeddings.LayerNorm.weight"] = sd["text_embed_norm.weight"]
        out["text_embeddings.LayerNorm.bias"] = sd["text_embed_norm.bias"]
        out["transformer.patch_embed.proj.weight"] = sd["patch_embed.proj.weight"]
        out["transformer.patch_embed.proj.bias"] = sd["patch_embed.proj.bias"]
        out["transformer.cls_token"] = sd["cls_token"]
        if torch.count_nonzero(sd["image_pos_embed"]):
            out["transformer.pos_embed"] = sd["image_pos_embed"]
        out["relative_position_bias_table"] = sd["rel_pos_bias"]
        out["transformer.norm.weight"] = sd["norm.weight"]
        out["transformer.norm.bias"] = sd["norm.bias"]
        for i in range(c.depth):
            top = i >= c.depth - c.num_vl_layers
            gammas: dict[str, list[str]] = {"attn": [], "mlp": []}
            for module in MODULES:
                if module in specific:
                    targets = {m: [block_param_name(i, module, _expert_for(c, i, module, m), "")]
                               for m in (("v", "l", "vl") if top else ("v", "l"))}
                else:
                    targets = {SHARED: [block_param_name(i, module, e, "") for e in c.experts(i)[module]]}
                suffixes = (("weight", "bias") if module.startswith("norm") else
                            ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias") if module == "mlp" else
                            ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"))
                for modality, prefixes in targets.items():
                    p = _vlmo_block_keys(layout, i, module, modality)
                    for suffix in suffixes:
                        value = _one_copy(sd, [q + suffix for q in prefixes], f"layer {i} {module}")
                        if suffix == "qkv.bias":
                            q_b, _, v_b = value.chunk(3)
                            out[f"{p}q_bias"], out[f"{p}v_bias"] = q_b, v_b  # the k bias cannot change softmax
                        else:
                            out[p + suffix] = value
                    if module in gammas:
                        gammas[module] += [q + "gamma" for q in prefixes]
            for module, names in gammas.items():
                gamma = _one_copy(sd, names, f"layer {i} {module} LayerScale")
                out[f"transformer.blocks.{i}.gamma_{1 if module == 'attn' else 2}"] = gamma
        for key, name in _VLMO_HEADS.items():
            if name in sd:
                out[_VLMO_HEAD_ALIASES.get(key, key) if layout == "vl-merging" else key] = sd[name]
        return out

    return export


# --------------------------------------------------------------------------------------------- BEiT-3
_BEIT3_NOTES = {
    r"vision_embed\.mask_token": "BEiT-3's [MASK] patch for masked image modelling: no slot",
    r"encoder\.output_projection\.weight": "a head without a vlmerge slot",
    r"(language_head|vision_head|head|pooler|fc_norm)\..*": "a head without a vlmerge slot",
}
_BEIT3_RETRIEVAL = {"vision_head.weight": "heads.itc.image_proj.weight",
                    "language_head.weight": "heads.itc.text_proj.weight", "logit_scale": "heads.itc.logit_scale"}
_BEIT3_MODULES = {  # vlmerge (module, suffix) -> BEiT-3 layer key pattern ({w}: A / B)
    ("norm1", "weight"): "self_attn_layer_norm.{w}.weight", ("norm1", "bias"): "self_attn_layer_norm.{w}.bias",
    ("attn", "inner_norm.weight"): "self_attn.inner_attn_ln.{w}.weight",
    ("attn", "inner_norm.bias"): "self_attn.inner_attn_ln.{w}.bias",
    ("attn", "proj.weight"): "self_attn.out_proj.{w}.weight", ("attn", "proj.bias"): "self_attn.out_proj.{w}.bias",
    ("norm2", "weight"): "final_layer_norm.{w}.weight", ("norm2", "bias"): "final_layer_norm.{w}.bias",
    ("mlp", "fc1.weight"): "ffn.{w}.fc1.weight", ("mlp", "fc1.bias"): "ffn.{w}.fc1.bias",
    ("mlp", "ffn_norm.weight"): "ffn.{w}.ffn_layernorm.weight", ("mlp", "ffn_norm.bias"): "ffn.{w}.ffn_layernorm.bias",
    ("mlp", "fc2.weight"): "ffn.{w}.fc2.weight", ("mlp", "fc2.bias"): "ffn.{w}.fc2.bias",
}
_WAY = {"v": "A", "l": "B"}
_FAIRSEQ_OFFSET = 2  # torchscale's PositionalEmbedding reads rows 2.. (Fairseq's padding convention)


def _beit3_to_vlmerge(state_dict: Mapping[str, torch.Tensor], where: str = "source", *,
                      image_size: int | None = None, num_heads: int | None = None, ln_eps: float = 1e-5
                      ) -> Converted:
    src = _Source(strip_prefix(state_dict, ("module.", "model.", "beit3.")), where)
    if not src.has("encoder.layers.0.self_attn.q_proj.A.weight"):
        raise CheckpointError(f"{where}: no encoder.layers.0.self_attn.q_proj.A.weight; not a BEiT-3 (torchscale "
                              "multiway) checkpoint")
    if any(k.startswith("encoder.relative_position") for k in src.sd):
        raise CheckpointError(f"{where}: BEiT-3 with bucketed relative positions (rel_pos_buckets > 0) is not "
                              "supported")
    vocab, d = src.shape("text_embed.weight")
    _, in_c, patch, _ = src.shape("vision_embed.proj.weight")
    grid = math.isqrt(src.shape("encoder.embed_positions.A.weight")[0] - _FAIRSEQ_OFFSET - 1)
    if image_size is not None and image_size != grid * patch:
        raise CheckpointError(f"--image-size {image_size}: the checkpoint's position table is for {grid * patch}px")
    if num_heads is not None and d % num_heads:
        raise CheckpointError(f"--num-heads {num_heads}: does not divide the width {d} of {where}")
    heads = num_heads or (d // 64 if d % 64 == 0 else 0)
    if not heads:
        raise CheckpointError(f"{where}: cannot tell the number of attention heads for width {d}; pass --num-heads")
    depth = _count(src, r"encoder\.layers\.(\d+)\.")
    hidden = src.shape("encoder.layers.0.ffn.A.fc1.weight")[0]
    subln = src.has("encoder.layers.0.ffn.A.ffn_layernorm.weight")
    if subln != src.has("encoder.layers.0.self_attn.inner_attn_ln.A.weight"):
        raise CheckpointError(f"{where}: Sub-LN in one of attention / FFN only is not supported")
    final = src.has("encoder.layer_norm.A.weight")
    if not final:
        raise CheckpointError(f"{where}: no encoder.layer_norm.A.weight; BEiT-3 without normalize_output is not "
                              "supported")
    heads_present = ("itc",) if all(src.has(k) for k in _BEIT3_RETRIEVAL) else ()
    config = ModelConfig(
        arch="msa", image_size=grid * patch, patch_size=patch, in_chans=in_c, embed_dim=d, depth=depth,
        num_heads=heads, mlp_ratio=hidden / d, num_vl_layers=0, vocab_size=vocab,
        max_text_len=src.shape("encoder.embed_positions.B.weight")[0] - _FAIRSEQ_OFFSET, qkv_bias=True,
        ln_eps=ln_eps, heads=heads_present, fusion="early", subln=subln, modality_final_norm=True,
        proj_dim=src.shape("vision_head.weight")[0] if heads_present else None,
    )
    shapes = param_shapes(config)
    sd: Tensors = {}

    def put(name: str, value: torch.Tensor) -> None:
        _assign(sd, shapes, name, value, where)

    put("word_embed.weight", src.take("text_embed.weight"))
    put("patch_embed.proj.weight", src.take("vision_embed.proj.weight"))
    put("patch_embed.proj.bias", src.take("vision_embed.proj.bias"))
    put("cls_token", src.take("vision_embed.cls_token"))
    put("image_pos_embed", src.take("encoder.embed_positions.A.weight")[_FAIRSEQ_OFFSET:][None])
    put("text_pos_embed.weight", src.take("encoder.embed_positions.B.weight")[_FAIRSEQ_OFFSET:])
    put("type_embed.weight", torch.zeros(shapes["type_embed.weight"]))  # BEiT-3 has no modality-type embedding
    for m, w in _WAY.items():
        put(f"norm.{m}.weight", src.take(f"encoder.layer_norm.{w}.weight"))
        put(f"norm.{m}.bias", src.take(f"encoder.layer_norm.{w}.bias"))
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for m, w in _WAY.items():
            for t in ("weight", "bias"):
                qkv = torch.cat([src.take(f"{p}self_attn.{n}_proj.{w}.{t}") for n in ("q", "k", "v")])
                put(block_param_name(i, "attn", m, f"qkv.{t}"), qkv)
            for (module, suffix), pattern in _BEIT3_MODULES.items():
                if "_norm." in suffix and not subln:
                    continue
                put(block_param_name(i, module, m, suffix), src.take(p + pattern.format(w=w)))
    if heads_present:
        for key, name in _BEIT3_RETRIEVAL.items():
            put(name, src.take(key))
    return _finish(config, shapes, sd, src, _BEIT3_NOTES, "beit3")


def _beit3_from_vlmerge(sd: Mapping[str, torch.Tensor], config: ModelConfig, kept: Mapping[str, torch.Tensor],
                        source_arch: str = "msa") -> Tensors:
    c = config
    if c.num_vl_layers or c.fusion != "early" or not c.modality_final_norm or c.rel_pos_text_len:
        raise CheckpointError("this checkpoint is not BEiT-3-shaped (it needs early fusion, no VL experts, a final "
                              "norm per modality and no relative-position table: one imported with convert --from "
                              "beit3)")
    if torch.count_nonzero(sd["type_embed.weight"]):
        raise CheckpointError("type_embed is not zero; BEiT-3 has no modality-type embedding")
    out: Tensors = dict(kept)
    # torchscale's BEiT3 has a [MASK] patch (masked image modelling only); without the imported one: zeros,
    # its initial value there
    out.setdefault("vision_embed.mask_token", torch.zeros(1, 1, c.embed_dim))
    out["text_embed.weight"] = sd["word_embed.weight"]
    out["vision_embed.proj.weight"] = sd["patch_embed.proj.weight"]
    out["vision_embed.proj.bias"] = sd["patch_embed.proj.bias"]
    out["vision_embed.cls_token"] = sd["cls_token"]
    pad = torch.zeros(_FAIRSEQ_OFFSET, c.embed_dim)  # rows torchscale never reads without explicit positions
    out["encoder.embed_positions.A.weight"] = torch.cat([pad, sd["image_pos_embed"][0]])
    out["encoder.embed_positions.B.weight"] = torch.cat([pad, sd["text_pos_embed.weight"]])
    for m, w in _WAY.items():
        out[f"encoder.layer_norm.{w}.weight"] = sd[f"norm.{m}.weight"]
        out[f"encoder.layer_norm.{w}.bias"] = sd[f"norm.{m}.bias"]
    for i in range(c.depth):
        p = f"encoder.layers.{i}."
        for m, w in _WAY.items():
            for t in ("weight", "bias"):
                qkv = sd[block_param_name(i, "attn", _expert_for(c, i, "attn", m), f"qkv.{t}")]
                for n, part in zip(("q", "k", "v"), qkv.chunk(3), strict=True):
                    out[f"{p}self_attn.{n}_proj.{w}.{t}"] = part
            for (module, suffix), pattern in _BEIT3_MODULES.items():
                if "_norm." in suffix and not c.subln:
                    continue
                out[p + pattern.format(w=w)] = sd[block_param_name(i, module, _expert_for(c, i, module, m), suffix)]
        if c.layer_scale is not None:
            raise CheckpointError("BEiT-3 has no LayerScale; this checkpoint has some")
    for key, name in _BEIT3_RETRIEVAL.items():
        if name in sd:
            out[key] = sd[name]
    return out


# ---------------------------------------------------------------------------------------------- FLAVA
_FLAVA_TOWER = {"v": "image_model", "l": "text_model"}
_FLAVA_SUBCONFIG = {"v": "image_config", "l": "text_config", "mm": "multimodal_config"}
_FLAVA_LAYER = {  # vlmerge (module, suffix) -> FlavaLayer key (pre-LN ViT blocks in all three encoders)
    ("norm1", "weight"): "layernorm_before.weight", ("norm1", "bias"): "layernorm_before.bias",
    ("attn", "proj.weight"): "attention.output.dense.weight", ("attn", "proj.bias"): "attention.output.dense.bias",
    ("norm2", "weight"): "layernorm_after.weight", ("norm2", "bias"): "layernorm_after.bias",
    ("mlp", "fc1.weight"): "intermediate.dense.weight", ("mlp", "fc1.bias"): "intermediate.dense.bias",
    ("mlp", "fc2.weight"): "output.dense.weight", ("mlp", "fc2.bias"): "output.dense.bias",
}
_FLAVA_QKV = ("query", "key", "value")
_FLAVA_FIXED = {  # vlmerge tensor -> FlavaModel tensor, one to one
    "word_embed.weight": "text_model.embeddings.word_embeddings.weight",
    "text_pos_embed.weight": "text_model.embeddings.position_embeddings.weight",
    "text_embed_norm.weight": "text_model.embeddings.LayerNorm.weight",
    "text_embed_norm.bias": "text_model.embeddings.LayerNorm.bias",
    "cls_token": "image_model.embeddings.cls_token",
    "patch_embed.proj.weight": "image_model.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "image_model.embeddings.patch_embeddings.projection.bias",
    "norm.v.weight": "image_model.layernorm.weight", "norm.v.bias": "image_model.layernorm.bias",
    "norm.l.weight": "text_model.layernorm.weight", "norm.l.bias": "text_model.layernorm.bias",
    "mm_proj.v.weight": "image_to_mm_projection.weight", "mm_proj.v.bias": "image_to_mm_projection.bias",
    "mm_proj.l.weight": "text_to_mm_projection.weight", "mm_proj.l.bias": "text_to_mm_projection.bias",
    "mm_cls_token": "multimodal_model.cls_token",
    "mm_norm.weight": "multimodal_model.layernorm.weight", "mm_norm.bias": "multimodal_model.layernorm.bias",
}
_FLAVA_ITC = {"heads.itc.image_proj.weight": "image_projection.weight",
              "heads.itc.image_proj.bias": "image_projection.bias",
              "heads.itc.text_proj.weight": "text_projection.weight",
              "heads.itc.text_proj.bias": "text_projection.bias", "heads.itc.logit_scale": "logit_scale"}
_FLAVA_NOTES = {
    r"(image_model|text_model|multimodal_model)\.pooler\..*": "a pooler (tanh head) without a vlmerge slot",
    r"image_model\.embeddings\.mask_token": "FLAVA's [MASK] patch for masked image modelling: no slot",
    r"text_model\.embeddings\.token_type_embeddings\.weight": "BERT's type table: row 0 is in type_embed; "
                                                              "the rest unused by FLAVA's text route",
    r"(mim_head|mlm_head|itm_head|mmm_image_head|mmm_text_head)\..*": "a pre-training head without a vlmerge slot",
    r"image_codebook\..*": "FLAVA's image codebook (the MIM target tokenizer): not part of the model",
}


def _flava_layer(tower: str, i: int) -> str:
    return f"{tower}.encoder.layer.{i}."


def _flava_setting(source_config: Mapping[str, Any] | None, key: str, default: Any, where: str) -> Any:
    """One setting the three FLAVA encoders must share (vlmerge has one value), from an HF ``config.json``."""
    if not source_config:
        return default
    values = {}
    for part, sub in _FLAVA_SUBCONFIG.items():
        cfg = source_config.get(sub)
        if isinstance(cfg, Mapping) and key in cfg:
            values[part] = cfg[key]
    if len({repr(v) for v in values.values()}) > 1:
        raise CheckpointError(f"{where}: config.json {key} differs between FLAVA's encoders ({values}); vlmerge "
                              "needs one value for all three")
    return next(iter(values.values()), default)


def _flava_to_vlmerge(state_dict: Mapping[str, torch.Tensor], where: str = "source", *,
                      image_size: int | None = None, num_heads: int | None = None, ln_eps: float | None = None,
                      source_config: Mapping[str, Any] | None = None) -> Converted:
    src = _Source(strip_prefix(state_dict, ("module.", "model.", "flava.")), where)
    for key in ("image_model.encoder.layer.0.attention.attention.query.weight",
                "text_model.encoder.layer.0.attention.attention.query.weight",
                "multimodal_model.encoder.layer.0.attention.attention.query.weight"):
        if not src.has(key):
            raise CheckpointError(f"{where}: no {key}; not a FLAVA (transformers FlavaModel) checkpoint with image, "
                                  "text and multimodal encoders")
    if not src.has("multimodal_model.cls_token"):
        raise CheckpointError(f"{where}: FLAVA without a multimodal [CLS] (use_cls_token=false) is not supported")
    vocab, d = src.shape("text_model.embeddings.word_embeddings.weight")
    depth = {m: _count(src, rf"{t}\.encoder\.layer\.(\d+)\.") for m, t in _FLAVA_TOWER.items()}
    mm_depth = _count(src, r"multimodal_model\.encoder\.layer\.(\d+)\.")
    widths = {"image": src.shape("image_model.embeddings.cls_token")[-1], "text": d,
              "multimodal": src.shape("multimodal_model.cls_token")[-1]}
    hidden = {t: src.shape(_flava_layer(t, 0) + "intermediate.dense.weight")[0]
              for t in ("image_model", "text_model", "multimodal_model")}
    for what, found in (("widths", widths), ("FFN widths", hidden), ("depths", {"image": depth["v"],
                                                                               "text": depth["l"]})):
        if len(set(found.values())) > 1:
            raise CheckpointError(f"{where}: FLAVA encoders of different {what} {found} are not supported (vlmerge's "
                                  "experts share one shape)")
    bias = {t: src.has(_flava_layer(t, 0) + "attention.attention.query.bias")
            for t in ("image_model", "text_model", "multimodal_model")}
    if len(set(bias.values())) > 1:
        raise CheckpointError(f"{where}: q/k/v biases in some FLAVA encoders only ({bias}) are not supported")
    act = _flava_setting(source_config, "hidden_act", "gelu", where)
    if act != "gelu":
        raise CheckpointError(f"{where}: config.json hidden_act is {act!r}; vlmerge's blocks use exact GELU ('gelu')")
    heads = num_heads or _flava_setting(source_config, "num_attention_heads", None, where) or (
        d // 64 if d % 64 == 0 else 0)
    if not heads or d % heads:
        raise CheckpointError(f"{where}: cannot tell the number of attention heads for width {d}; pass --num-heads "
                              "(a divisor of the width)")
    eps = ln_eps or _flava_setting(source_config, "layer_norm_eps", 1e-12, where)
    _, in_c, patch, _ = src.shape("image_model.embeddings.patch_embeddings.projection.weight")
    grid = math.isqrt(src.shape("image_model.embeddings.position_embeddings")[1] - 1)
    if image_size is not None and image_size != grid * patch:
        raise CheckpointError(f"--image-size {image_size}: the checkpoint's position table is for {grid * patch}px")
    itc = all(src.has(k) for k in _FLAVA_ITC.values())
    config = ModelConfig(
        arch="msa", image_size=grid * patch, patch_size=patch, in_chans=in_c, embed_dim=d, depth=depth["v"],
        num_heads=heads, mlp_ratio=hidden["text_model"] / d, num_vl_layers=0, vocab_size=vocab,
        max_text_len=src.shape("text_model.embeddings.position_embeddings.weight")[0], qkv_bias=bias["text_model"],
        ln_eps=eps, text_embed_norm=True, heads=("itc",) if itc else (), fusion="encoder", mm_depth=mm_depth,
        modality_final_norm=True, itc_bias=itc, proj_dim=src.shape("image_projection.weight")[0] if itc else None,
    )
    shapes = param_shapes(config)
    sd: Tensors = {}

    def put(name: str, value: torch.Tensor) -> None:
        _assign(sd, shapes, name, value, where)

    for name, key in _FLAVA_FIXED.items():
        put(name, src.take(key))
    put("image_pos_embed", src.take("image_model.embeddings.position_embeddings"))
    # FLAVA's text route adds BERT's type row 0 (token_type_ids default to 0); its image route has no type
    # embedding, so vlmerge's image row is zero. The whole table is kept aside too: export restores it.
    types = src.take("text_model.embeddings.token_type_embeddings.weight")
    src.used.discard("text_model.embeddings.token_type_embeddings.weight")
    type_table = torch.zeros(shapes["type_embed.weight"])
    type_table[0] = types[0]
    put("type_embed.weight", type_table)
    layers = [(i, m, _flava_layer(t, i)) for m, t in _FLAVA_TOWER.items() for i in range(config.depth)]
    layers += [(config.depth + j, SHARED, _flava_layer("multimodal_model", j)) for j in range(mm_depth)]
    for i, expert, p in layers:
        suffixes = ("weight", "bias") if config.qkv_bias else ("weight",)
        for t in suffixes:
            qkv = torch.cat([src.take(f"{p}attention.attention.{n}.{t}") for n in _FLAVA_QKV])
            put(block_param_name(i, "attn", expert, f"qkv.{t}"), qkv)
        for (module, suffix), key in _FLAVA_LAYER.items():
            put(block_param_name(i, module, expert, suffix), src.take(p + key))
    if itc:
        for name, key in _FLAVA_ITC.items():
            put(name, src.take(key))
    return _finish(config, shapes, sd, src, _FLAVA_NOTES, "flava")


def _flava_from_vlmerge(sd: Mapping[str, torch.Tensor], config: ModelConfig, kept: Mapping[str, torch.Tensor],
                        source_arch: str = "msa") -> Tensors:
    c = config
    if (c.fusion != "encoder" or not c.modality_final_norm or not c.text_embed_norm or c.subln
            or c.layer_scale is not None):
        raise CheckpointError("this checkpoint is not FLAVA-shaped (it needs encoder fusion, a final norm per "
                              "modality, a text embedding norm, no Sub-LN and no LayerScale: one imported with "
                              "convert --from flava)")
    out: Tensors = dict(kept)
    for name, key in _FLAVA_FIXED.items():
        out[key] = sd[name]
    # vlmerge's image type row (zero on import) has no FLAVA slot: it is a constant added to every image
    # token, the same as adding it to every image position.
    out["image_model.embeddings.position_embeddings"] = sd["image_pos_embed"] + sd["type_embed.weight"][1]
    types = out.get("text_model.embeddings.token_type_embeddings.weight", torch.zeros(2, c.embed_dim)).clone()
    types[0] = sd["type_embed.weight"][0]
    out["text_model.embeddings.token_type_embeddings.weight"] = types
    layers = [(i, m, _flava_layer(t, i)) for m, t in _FLAVA_TOWER.items() for i in range(c.depth)]
    layers += [(c.depth + j, SHARED, _flava_layer("multimodal_model", j)) for j in range(c.mm_depth)]
    for i, modality, p in layers:
        for t in ("weight", "bias") if c.qkv_bias else ("weight",):
            qkv = sd[block_param_name(i, "attn", _expert_for(c, i, "attn", modality), f"qkv.{t}")]
            for n, part in zip(_FLAVA_QKV, qkv.chunk(3), strict=True):
                out[f"{p}attention.attention.{n}.{t}"] = part
        for (module, suffix), key in _FLAVA_LAYER.items():
            out[p + key] = sd[block_param_name(i, module, _expert_for(c, i, module, modality), suffix)]
    for name, key in _FLAVA_ITC.items():
        if name in sd:
            out[key] = sd[name]
        elif name.endswith("_proj.bias") and name.replace(".bias", ".weight") in sd:
            out[key] = torch.zeros(sd[name.replace(".bias", ".weight")].shape[0])  # a bias-free vlmerge ITC
    return out


LAYOUTS: dict[str, Layout] = {
    "vlmo": Layout("vlmo", "microsoft/unilm VLMo (MoME: shared attention, per-modality FFN)",
                   _vlmo_to_vlmerge("vlmo"), _vlmo_from_vlmerge("vlmo")),
    "vl-merging": Layout("vl-merging", "ylsung/vl-merging, the merging paper's modality-specific models",
                         _vlmo_to_vlmerge("vl-merging"), _vlmo_from_vlmerge("vl-merging")),
    "beit3": Layout("beit3", "torchscale BEiT-3 (multiway A = vision / B = text, Sub-LN)",
                    _beit3_to_vlmerge, _beit3_from_vlmerge),
    "flava": Layout("flava", "transformers FlavaModel (image / text encoders as v / l, the multimodal encoder as "
                             "fusion layers)", _flava_to_vlmerge, _flava_from_vlmerge, reads_config=True),
}
"""Checkpoint layout name -> its importer and exporter (``vlmerge convert --from / --to``)."""


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def import_state_dict(layout: str, state_dict: Mapping[str, torch.Tensor], where: str = "source",
                      **options: Any) -> Converted:
    """Convert a ``layout`` state dict into vlmerge's (see :data:`LAYOUTS`); ``options``: ``image_size``,
    ``num_heads`` (and ``ln_eps`` for BEiT-3) where the weights cannot tell."""
    return get_layout(layout).to_vlmerge(state_dict, where, **{k: v for k, v in options.items() if v is not None})


def export_state_dict(layout: str, model: VLMo | Mapping[str, torch.Tensor], config: ModelConfig | None = None,
                      kept: Mapping[str, torch.Tensor] | None = None, source_arch: str | None = None) -> Tensors:
    """A vlmerge model (or its state dict and config) in ``layout``'s names, for that codebase's
    ``load_state_dict``; ``kept``: the tensors an import kept aside, written back unchanged; ``source_arch``:
    the architecture the model was imported as (a merged model's own is ``maa``), default its own."""
    if isinstance(model, VLMo):
        config, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    else:
        sd = dict(model)
    if config is None:
        raise ValueError("export_state_dict: pass the model's config with a bare state dict")
    return get_layout(layout).from_vlmerge(sd, config, dict(kept or {}), source_arch or config.arch)


def read_source(path: str | os.PathLike[str]) -> Tensors:
    """Every tensor of a source checkpoint: a ``.safetensors`` file or folder, or a ``.pt`` / ``.pth`` / ``.ckpt``
    / ``.bin`` read with ``torch.load(weights_only=True)`` only (``state_dict`` / ``model`` / ``module``
    wrappers unwrapped); anything that would need full unpickling is refused naming the file."""
    from ..merge.io import _load_torch, open_weights

    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        return _load_torch(p)
    with open_weights(p) as reader:
        return reader.state_dict()


def _source_config(src: str | os.PathLike[str], layout: str) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` of a source folder (None without one); it must name ``layout``'s
    ``model_type``."""
    from .checkpoint import read_json

    path = Path(src) / "config.json"
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("model_type") != layout:
        found = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{path}: model_type is {found!r}; expected {layout!r} for convert --from {layout}")
    return cfg


# ------------------------------------------------------------------------------------------- files
KEPT_NAME = "source_extras.safetensors"  # source tensors without a slot, under their source names
RECORD_NAME = "convert.json"


def convert_from(layout: str, src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """``vlmerge convert --from LAYOUT SRC OUT_DIR``: write a vlmerge checkpoint (``config.json`` +
    ``model.safetensors``), the source tensors kept aside (:data:`KEPT_NAME`) and ``convert.json`` (what went
    where); built in a temp folder and renamed into place. Returns the report."""
    from ..files import guard_output_dir, staged_dir
    from .checkpoint import atomic_write_json, save_checkpoint, save_tensors

    spec = get_layout(layout)
    out = guard_output_dir(out_dir, [src], overwrite, flag="OUT_DIR", clean_stale=True)
    if spec.reads_config:
        options["source_config"] = _source_config(src, layout)
    conv = import_state_dict(layout, read_source(src), str(src), **options)
    record = {**conv.report(), "from": str(src), "layout": layout, "source_arch": conv.config.arch}
    with staged_dir(out, overwrite, "converting", "OUT_DIR") as tmp:
        save_checkpoint(tmp, conv.state_dict, {"model": conv.config.to_dict(), "converted": record})
        if conv.kept:
            save_tensors(tmp / KEPT_NAME, {k: v.contiguous() for k, v in conv.kept.items()})
        atomic_write_json(tmp / RECORD_NAME, record)
    return record


def convert_to(layout: str, ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               overwrite: bool = False, extras: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``vlmerge convert --to LAYOUT CKPT OUT_DIR``: the vlmerge checkpoint (merged or not) in ``layout``'s
    names as ``OUT_DIR/model.safetensors`` (load it with ``safetensors.torch.load_file`` and the source code's
    ``load_state_dict``), the tensors an import kept aside written back, and ``convert.json``. ``extras``: the
    import's :data:`KEPT_NAME` (default: the one in ``ckpt``, if any; a merge's output has none, so pass the
    imported folder's)."""
    from ..files import guard_output_dir, staged_dir
    from .checkpoint import (
        CheckpointReader,
        atomic_write_json,
        check_checkpoint,
        load_model_config,
        read_json,
        save_tensors,
    )

    get_layout(layout)
    out = guard_output_dir(out_dir, [ckpt, extras], overwrite, flag="OUT_DIR", clean_stale=True)
    config = load_model_config(ckpt)
    converted = read_json(Path(ckpt) / "config.json").get("converted") or {}
    source_arch = converted.get("source_arch") if isinstance(converted, dict) else None
    kept: Tensors = {}
    extras = extras if extras is not None else (Path(ckpt) / KEPT_NAME if (Path(ckpt) / KEPT_NAME).is_file()
                                                else None)
    if extras is not None:
        if not Path(extras).is_file():
            raise FileNotFoundError(f"--extras {extras}: no such file (expected an import's {KEPT_NAME})")
        with CheckpointReader(extras) as r:
            kept = r.state_dict()
    with CheckpointReader(ckpt) as r:
        check_checkpoint(r, config)
        sd = r.state_dict()
    tensors = export_state_dict(layout, sd, config, kept, source_arch)
    record = {"to": layout, "from": str(ckpt), "extras": None if extras is None else str(extras),
              "arch": config.arch, "tensors": len(tensors),
              "params": int(sum(t.numel() for t in tensors.values() if t.is_floating_point()))}
    with staged_dir(out, overwrite, "converting", "OUT_DIR") as tmp:
        save_tensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()})
        atomic_write_json(tmp / RECORD_NAME, record)
    return record
