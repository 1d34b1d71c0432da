"""The VLMo model family, read top to bottom: config, presets, architectures, the model, conversions.

Five architectures (merging paper §5, Fig. 2 and Table 7) differ only in which block modules are
modality-specific (one expert per modality) and which are shared:

========== ===================================================
``msa``    norm1, attn, norm2, mlp all modality-specific
``custom-attn``  norm1 + attn modality-specific (FFN shared)
``custom-ffn``   norm2 + mlp modality-specific (VLMo's MoME)
``custom-ln``    norm1 + norm2 modality-specific
``maa``    nothing modality-specific: one transformer
========== ===================================================

Modality-specific modules have ``v`` and ``l`` experts in every layer and a ``vl`` expert in the top ``M``
layers (``num_vl_layers``). Two routes (Fig. 2):

* **retrieval** (dual encoder): image tokens through all N layers as ``v``, text through all N as ``l``;
  [CLS] -> final norm -> ITC projection -> L2-normalised embedding.
* **fusion**: the first N−M layers per modality, then text and image tokens concatenated
  (``[T_CLS] text [T_SEP] [I_CLS] patches``) through the top M layers as ``vl``.

Imported families add fusion layouts (:data:`FUSIONS`): ``early`` (VLMo / BEiT-3: the concatenation
through all N layers) and ``encoder`` (FLAVA: both full routes, then a separate multimodal encoder of
``mm_depth`` shared layers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HEADS
from .layers import Block, PatchEmbed
from .roles import MODULES, SHARED, merge_groups, parse_param_name

ARCHS: dict[str, tuple[str, ...]] = {
    "msa": ("norm1", "attn", "norm2", "mlp"),
    "custom-attn": ("norm1", "attn"),
    "custom-ffn": ("norm2", "mlp"),
    "custom-ln": ("norm1", "norm2"),
    "maa": (),
}
"""Architecture name -> the block modules that are modality-specific."""

FUSIONS: dict[str, str] = {
    "late": "the bottom N−M layers per modality, then the top M on [text; image] (the merging paper, Fig. 2)",
    "early": "[text; image] through all N layers; below the VL layers each token uses its own modality's "
             "experts and attends to every token (VLMo's and BEiT-3's fusion route)",
    "encoder": "text and image through all N layers each; their last states, projected per modality, and a "
               "fusion [CLS] through ``mm_depth`` further shared layers (FLAVA's multimodal encoder)",
}
"""Fusion-route layouts (``ModelConfig.fusion``)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model; stored in a checkpoint's ``config.json`` under ``"model"``."""

    arch: str = "msa"  # one of ARCHS
    image_size: int = 32  # square input images, pixels
    patch_size: int = 8
    in_chans: int = 3
    embed_dim: int = 128  # width D
    depth: int = 6  # N transformer blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0  # FFN hidden = mlp_ratio * D
    num_vl_layers: int = 2  # M: top layers with vision-language experts (fusion route)
    vocab_size: int = 30522  # set from the tokenizer
    max_text_len: int = 40  # text positions
    type_vocab_size: int = 2  # modality-type embedding rows: 0 text, 1 image
    qkv_bias: bool = True
    prenorm: bool = True  # pre-LN (ViT/VLMo); False = post-LN (BERT import)
    ln_eps: float = 1e-6
    text_embed_norm: bool = False  # LayerNorm after the text embeddings (BERT import)
    proj_dim: int | None = None  # ITC projection width; None = embed_dim
    heads: tuple[str, ...] = ("itc",)  # task heads, names from heads.HEADS
    num_answers: int = 3129  # VQA answer vocabulary (the paper's 3,129)
    num_classes: int = 0  # image classification classes ("cls" head)
    num_seg_classes: int = 0  # segmentation classes incl. background ("seg" head)
    init_std: float = 0.02
    tied_init: bool = True  # modality experts of a slot start equal (VLMo initialises every expert from BEiT)
    # Options for imported architectures (VLMo, BEiT-3); the defaults are vlmerge's own models.
    fusion: str = "late"  # one of FUSIONS: where text and image tokens meet on the fusion route
    layer_scale: float | None = None  # LayerScale init (VLMo: 0.1); None = no layer scale
    subln: bool = False  # Sub-LN (BEiT-3): LayerNorms before attention's proj and before fc2
    rel_pos_text_len: int = 0  # > 0: VLMo's shared relative-position-bias table (text span); 0: none
    modality_final_norm: bool = False  # one final LayerNorm per modality (BEiT-3's multiway layer_norm)
    text_embed_norm_eps: float | None = None  # the text embedding norm's epsilon (VLMo's BERT: 1e-12); None = ln_eps
    mm_depth: int = 0  # fusion "encoder": layers of the multimodal encoder after the N unimodal ones (FLAVA: 6)
    itc_bias: bool = False  # biases in the ITC projections (FLAVA's image_projection / text_projection)
    merged_layers: tuple[int, ...] = ()  # a partial merge's merged layers: every module shared there, arch elsewhere

    def __post_init__(self) -> None:
        for name in ("heads", "merged_layers"):
            if isinstance(getattr(self, name), list):  # a list from Python code: stored as the tuple the field is
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_model_config({f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))

    @property
    def fusion_start(self) -> int:
        """First layer of the fusion route that sees text and image tokens together: N−M for ``late``
        fusion (the paper's Fig. 2), 0 for ``early`` (VLMo / BEiT-3)."""
        return {"early": 0, "encoder": self.depth}.get(self.fusion, self.depth - self.num_vl_layers)

    @property
    def num_blocks(self) -> int:
        """Blocks in ``VLMo.blocks``: the N layers of both routes, then the ``mm_depth`` multimodal-encoder
        layers of an ``encoder`` fusion (used by the fusion route only)."""
        return self.depth + self.mm_depth

    def experts(self, layer: int) -> dict[str, tuple[str, ...]]:
        """Experts of each module of block ``layer`` (0-based); a multimodal-encoder layer (``layer ≥ depth``)
        is one shared transformer, and so is a layer a partial merge merged (``merged_layers``)."""
        if layer >= self.depth or layer in self.merged_layers:
            return {m: (SHARED,) for m in MODULES}
        modalities = ("v", "l", "vl") if layer >= self.depth - self.num_vl_layers else ("v", "l")
        specific = ARCHS[self.arch]
        return {m: (modalities if m in specific else (SHARED,)) for m in MODULES}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["merged_layers"] = list(self.merged_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model config") -> ModelConfig:
        """The config a checkpoint's ``config.json`` ``"model"`` entry describes; missing keys take the defaults.

        ``ValueError`` naming ``source``, the key and what it must be for an unknown key or any value of the
        wrong type or out of range (see :func:`check_model_config`).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected an object of model config keys, got {type(d).__name__} "
                             f"{_short_repr(d)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(repr(k) if not isinstance(k, str) else k for k in d if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed keys are {sorted(known)}")
        values = {f.name: d.get(f.name, f.default) for f in fields(cls)}
        check_model_config(values, source)
        for name in ("heads", "merged_layers"):
            if isinstance(values[name], list):
                values[name] = tuple(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


_EXPECTED_TYPE: dict[str, str] = {
    "str": "a string",
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "int | None": "an integer or null",
    "float | None": "a finite number or null",
    "tuple[str, ...]": "a list of strings",
    "tuple[int, ...]": "a list of integers",
}
"""ModelConfig field annotation -> what the error message says a value must be."""

_GEOMETRY = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "max_text_len",
             "type_vocab_size")
_ENCODER_FUSION = "encoder"
_MAX_DIM = 1 << 16  # widths, depth, positions, pixels
_MAX_HIDDEN = 1 << 20  # FFN hidden width
_MAX_ROWS = 1 << 24  # vocabulary and label-set sizes


def _short_repr(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _type_ok(annotation: str, value: Any) -> bool:
    """Whether ``value`` has the type the ``annotation`` string names (bool is not a number; an int is a float)."""
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "int | None":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "float | None":
        return value is None or _type_ok("float", value)
    if annotation == "tuple[str, ...]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if annotation == "tuple[int, ...]":
        return isinstance(value, (list, tuple)) and all(_type_ok("int", v) for v in value)
    raise AssertionError(f"ModelConfig: no type check for annotation {annotation!r}")  # a new field's type


def check_model_config(values: Mapping[str, Any], source: str = "model config") -> None:
    """Check every :class:`ModelConfig` field value against its type, then the values against each other.

    ``values`` holds every field. Raises ``ValueError``: ``"{source}: {name}={value!r} is invalid; expected
    {what}"`` for the first bad field.
    """

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"{source}: {name}={_short_repr(values[name])} is invalid; expected {expected}")

    for f in fields(ModelConfig):
        annotation = str(f.type)
        if not _type_ok(annotation, values[f.name]):
            raise bad(f.name, _EXPECTED_TYPE[annotation])
    if values["arch"] not in ARCHS:
        raise bad("arch", f"one of {sorted(ARCHS)}")
    if values["fusion"] not in FUSIONS:
        raise bad("fusion", f"one of {sorted(FUSIONS)}")
    # Upper bounds keep every tensor's size computable (an absurd width would overflow torch's size arithmetic).
    for name, most in (*((n, _MAX_DIM) for n in _GEOMETRY), ("vocab_size", _MAX_ROWS)):
        if not 1 <= values[name] <= most:
            raise bad(name, f"a positive integer ≤ {most}")
    depth = values["depth"]
    if not 0 <= values["num_vl_layers"] <= depth:
        raise bad("num_vl_layers", f"an integer in [0, depth={depth}]")
    if values["image_size"] % values["patch_size"]:
        raise bad("patch_size", f"a divisor of image_size={values['image_size']}")
    if values["embed_dim"] % values["num_heads"]:
        raise bad("num_heads", f"a divisor of embed_dim={values['embed_dim']}")
    hidden = values["embed_dim"] * values["mlp_ratio"]
    if values["mlp_ratio"] <= 0 or not math.isfinite(hidden) or not 1 <= round(hidden) <= _MAX_HIDDEN:
        raise bad("mlp_ratio", f"a positive number with 1 ≤ embed_dim={values['embed_dim']} * mlp_ratio ≤ "
                               f"{_MAX_HIDDEN}")
    if values["proj_dim"] is not None and not 1 <= values["proj_dim"] <= _MAX_DIM:
        raise bad("proj_dim", f"a positive integer ≤ {_MAX_DIM} or null (null = embed_dim)")
    for name in ("ln_eps", "init_std", "text_embed_norm_eps"):
        if values[name] is not None and values[name] <= 0:
            raise bad(name, "a positive finite number")
    if values["rel_pos_text_len"] and not values["max_text_len"] <= values["rel_pos_text_len"] <= _MAX_DIM:
        raise bad("rel_pos_text_len", f"0 (no relative position bias) or an integer in [max_text_len="
                                      f"{values['max_text_len']}, {_MAX_DIM}]")
    if not 0 <= values["mm_depth"] <= _MAX_DIM:
        raise bad("mm_depth", f"an integer in [0, {_MAX_DIM}]")
    if (values["fusion"] == _ENCODER_FUSION) != (values["mm_depth"] > 0):
        raise bad("mm_depth", "≥ 1 with fusion='encoder' (its multimodal encoder) and 0 otherwise")
    if values["fusion"] == _ENCODER_FUSION:
        for name in ("num_vl_layers", "rel_pos_text_len"):
            if values[name]:
                raise bad(name, "0 with fusion='encoder' (the fusion layers are the multimodal encoder's)")
        if not values["prenorm"]:
            raise bad("prenorm", "true with fusion='encoder'")
    merged = list(values["merged_layers"])
    if merged != sorted(set(merged)) or any(not 0 <= i < depth for i in merged):
        raise bad("merged_layers", f"distinct layer indices in [0, depth={depth}), ascending")
    if values["modality_final_norm"] and not values["prenorm"]:
        raise bad("modality_final_norm", "false for a post-LN model (prenorm=false has no final norm)")
    heads = values["heads"]
    if any(h not in HEADS for h in heads):
        raise bad("heads", f"names from {sorted(HEADS)}")
    if len(set(heads)) != len(heads):
        raise bad("heads", "each head name once")
    for name in ("num_answers", "num_classes", "num_seg_classes"):
        if not 0 <= values[name] <= _MAX_ROWS:
            raise bad(name, f"a non-negative integer ≤ {_MAX_ROWS}")
    if "vqa" in heads and values["num_answers"] < 1:
        raise bad("num_answers", "≥ 1 when the 'vqa' head is present")
    if "cls" in heads and values["num_classes"] < 1:
        raise bad("num_classes", "≥ 1 when the 'cls' head is present")
    if "seg" in heads and values["num_seg_classes"] < 2:
        raise bad("num_seg_classes", "≥ 2 when the 'seg' head is present")


# ------------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests and the study's smoke runs: seconds on a CPU.
    "micro": dict(image_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_vl_layers=1,
                  max_text_len=24),
    # The CPU study: minutes on 2 cores.
    "tiny": dict(image_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4, num_vl_layers=1,
                 max_text_len=24),
    # The paper's ViT-Tiny/16 and ViT-B/16 (N=12, M=2).
    "vit-tiny": dict(image_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_vl_layers=2),
    "vit-base": dict(image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_vl_layers=2),
}

# The registries as types: pydantic configs that name an architecture or a preset validate against these,
# so a new entry in ARCHS / PRESETS is known everywhere at once.
ArchName = Literal[tuple(ARCHS)]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


def preset_config(preset: str, arch: str = "msa", **overrides: Any) -> ModelConfig:
    """The named preset's config for architecture ``arch``, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], "arch": arch, **overrides})


# ------------------------------------------------------------------------------ relative position bias
def _image_rel_rows(config: ModelConfig) -> int:
    w = config.image_size // config.patch_size
    return (2 * w - 1) ** 2 + 3


def rel_pos_rows(config: ModelConfig) -> int:
    """Rows of VLMo's relative-position-bias table: (2W−1)² image offsets + 3 image [CLS] specials, 2T text
    offsets (T = ``rel_pos_text_len``) + 3 text [CLS] specials ... laid out as VLMo's
    ``relative_position_bias_table`` (W = image_size / patch_size)."""
    return _image_rel_rows(config) + 2 * config.rel_pos_text_len + 2


@functools.lru_cache(maxsize=64)
def rel_pos_index(config: ModelConfig, kind: str, text_len: int = 0) -> torch.Tensor:
    """Row of the relative-position table for every (query, key) pair of one route, int64 [L, L].

    ``kind`` ``v``: the 1 + P image tokens ([I_CLS] first): patches i, j at grid cells (r, c) use row
    (r_i − r_j + W − 1)(2W − 1) + (c_i − c_j + W − 1); [I_CLS] as query, as key, and to itself use the rows
    R_v − 3, R_v − 2, R_v − 1 (R_v = (2W−1)² + 3). ``l``: text tokens ([T_CLS] first): tokens i, j ≥ 1 use
    R_v + T + (j − i) (T = ``rel_pos_text_len``), [T_CLS] the last three rows. ``vl``: [text; image] with
    the two blocks above on the diagonal, text→image pairs row R_v and image→text pairs row R_v + 1.
    """
    w = config.image_size // config.patch_size
    r_v = _image_rel_rows(config)
    total = rel_pos_rows(config)
    if kind == "v":
        rows, cols = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
        cells = torch.stack([rows.flatten(), cols.flatten()])  # [2, P]
        offset = cells[:, :, None] - cells[:, None, :] + (w - 1)  # [2, P, P], each in [0, 2W − 2]
        index = torch.zeros(w * w + 1, w * w + 1, dtype=torch.long)
        index[1:, 1:] = offset[0] * (2 * w - 1) + offset[1]
        specials = r_v
    elif kind == "l":
        if not 1 <= text_len <= config.rel_pos_text_len:
            raise ValueError(f"text has {text_len} tokens; the relative position table covers "
                             f"rel_pos_text_len={config.rel_pos_text_len}")
        pos = torch.arange(text_len - 1)
        index = torch.zeros(text_len, text_len, dtype=torch.long)
        index[1:, 1:] = r_v + config.rel_pos_text_len + (pos[None, :] - pos[:, None])
        specials = total
    elif kind == "vl":
        txt, img = rel_pos_index(config, "l", text_len), rel_pos_index(config, "v")
        top = torch.cat([txt, torch.full((text_len, img.shape[0]), r_v)], dim=1)
        bottom = torch.cat([torch.full((img.shape[0], text_len), r_v + 1), img], dim=1)
        return torch.cat([top, bottom], dim=0)
    else:
        raise ValueError(f"kind must be 'v', 'l' or 'vl', got {kind!r}")
    index[0, :] = specials - 3
    index[:, 0] = specials - 2
    index[0, 0] = specials - 1
    return index


# --------------------------------------------------------------------------------------------------- model
class VLMo(nn.Module):
    """A VLMo-family vision-language transformer built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        # Vision embeddings: patches + [I_CLS] + positions.
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.image_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, d))
        # Text embeddings: words + positions; modality-type embedding shared by both.
        self.word_embed = nn.Embedding(c.vocab_size, d)
        self.text_pos_embed = nn.Embedding(c.max_text_len, d)
        self.type_embed = nn.Embedding(c.type_vocab_size, d)
        text_eps = c.ln_eps if c.text_embed_norm_eps is None else c.text_embed_norm_eps
        self.text_embed_norm = nn.LayerNorm(d, eps=text_eps) if c.text_embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(d, c.num_heads, c.mlp_hidden, c.experts(i), c.qkv_bias, c.prenorm, c.ln_eps, c.subln,
                  c.layer_scale)
            for i in range(c.num_blocks)
        )
        if c.modality_final_norm:
            self.norm: nn.Module = nn.ModuleDict({m: nn.LayerNorm(d, eps=c.ln_eps) for m in ("v", "l")})
        else:
            self.norm = nn.LayerNorm(d, eps=c.ln_eps) if c.prenorm else nn.Identity()
        if c.rel_pos_text_len:
            # One table for every layer (VLMo): rows are relative distances (image 2-D offsets, [CLS] specials,
            # text offsets, the two cross-modal constants), columns layer-major heads.
            self.rel_pos_bias = nn.Parameter(torch.zeros(rel_pos_rows(c), c.num_heads * c.depth))
        if c.mm_depth:
            # FLAVA's connector: each modality's last states projected into the multimodal encoder, a fusion
            # [CLS] (the encoder has no positions), and the encoder's own final LayerNorm.
            self.mm_proj = nn.ModuleDict({m: nn.Linear(d, d) for m in ("v", "l")})
            self.mm_cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.mm_norm = nn.LayerNorm(d, eps=c.ln_eps)
        self.heads = nn.ModuleDict({name: HEADS[name](c) for name in c.heads})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(std) linears/embeddings, zero biases, unit LayerNorms (BEiT/VLMo init)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.image_pos_embed, *([self.mm_cls_token] if self.config.mm_depth else [])):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        with torch.no_grad():
            for m in self.modules():
                if getattr(m, "gamma", None) is not None:
                    m.gamma.fill_(self.config.layer_scale)
            if self.config.rel_pos_text_len:
                self.rel_pos_bias.zero_()
        if self.config.tied_init:
            params = dict(self.named_parameters())
            with torch.no_grad():
                for group in merge_groups(params):
                    first = params[group.sources[group.modalities[0]]]
                    for key in list(group.sources.values())[1:]:
                        params[key].copy_(first)

    # -- embeddings ------------------------------------------------------------------------------------
    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, C, S, S] -> tokens [B, 1 + P, D] ([I_CLS] first)."""
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.image_pos_embed + self.type_embed.weight[1]

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> tokens [B, L, D] ([T_CLS] first, as the tokenizer writes it)."""
        n = input_ids.shape[1]
        if n > self.config.max_text_len:
            raise ValueError(f"text has {n} tokens; model config max_text_len is {self.config.max_text_len}")
        pos = torch.arange(n, device=input_ids.device)
        x = self.word_embed(input_ids) + self.text_pos_embed(pos) + self.type_embed.weight[0]
        return self.text_embed_norm(x)

    @staticmethod
    def _attn_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, L] (1 = token) -> [B, 1, 1, L] bool for SDPA, or None when nothing is padded."""
        if attention_mask is None:
            return None
        return attention_mask.bool()[:, None, None, :]

    def _rel_bias(self, kind: str, text_len: int = 0) -> torch.Tensor | None:
        """Every layer's relative position bias for one route, [H*N, L, L] (layer i: heads [iH, (i+1)H)),
        or None without a table. ``kind``: ``v`` (image tokens), ``l`` (``text_len`` text tokens) or
        ``vl`` ([text; image])."""
        if not self.config.rel_pos_text_len:
            return None
        index = rel_pos_index(self.config, kind, text_len).to(self.rel_pos_bias.device)
        return self.rel_pos_bias[index].permute(2, 0, 1)

    def _run(self, x: torch.Tensor, modality: str, layers: range, mask: torch.Tensor | None,
             bias: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
        h = self.config.num_heads
        for i in layers:
            x = self.blocks[i](x, modality, mask, None if bias is None else bias[i * h:(i + 1) * h], split)
        return x

    def final_norm(self, x: torch.Tensor, modality: str, split: int | None = None) -> torch.Tensor:
        """The LayerNorm after the last block: shared, or per modality (``modality_final_norm``), then on a
        ``vl`` sequence text tokens ``x[:, :split]`` by the text one and image tokens by the image one."""
        if not self.config.modality_final_norm:
            return self.norm(x)
        norms = self.norm
        if modality != "vl":
            return norms[modality](x)
        return torch.cat([norms["l"](x[:, :split]), norms["v"](x[:, split:])], dim=1)

    # -- routes ----------------------------------------------------------------------------------------
    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """Vision route, all N layers: image [B, C, S, S] -> normed hidden states [B, 1 + P, D]."""
        x = self._run(self.embed_image(image), "v", range(self.config.depth), None, self._rel_bias("v"))
        return self.final_norm(x, "v")

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Language route, all N layers: ids [B, L] -> normed hidden states [B, L, D]."""
        mask = self._attn_mask(attention_mask)
        bias = self._rel_bias("l", input_ids.shape[1])
        return self.final_norm(self._run(self.embed_text(input_ids), "l", range(self.config.depth), mask, bias), "l")

    def forward_fusion(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fusion route: bottom layers per modality, then the rest on ``[text; image]`` (:attr:`fusion`).

        Late fusion: the bottom N−M layers per modality, the top M on the concatenation; early fusion: all N
        on the concatenation; encoder fusion: all N per modality, then the multimodal encoder. Returns normed
        hidden states [B, L + 1 + P, D] (encoder fusion: one more, the fusion [CLS], last); index 0 is
        [T_CLS], index L is [I_CLS].
        """
        bottom = range(self.config.fusion_start)
        x_img = self._run(self.embed_image(image), "v", bottom, None, self._rel_bias("v"))
        x_txt = self._run(self.embed_text(input_ids), "l", bottom, self._attn_mask(attention_mask),
                          self._rel_bias("l", input_ids.shape[1]))
        return self.fuse(x_txt, x_img, attention_mask)

    def fuse(self, x_txt: torch.Tensor, x_img: torch.Tensor, attention_mask: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The fusion layers on bottom-layer states: x_txt [B, L, D] and x_img [B, 1 + P, D] after the first
        :attr:`ModelConfig.fusion_start` layers (``*_bottom`` of :meth:`routes`) -> normed states
        [B, L + 1 + P, D], or [B, L + 1 + P + 1, D] for ``encoder`` fusion, whose last token is the fusion
        [CLS] (FLAVA's multimodal [CLS], which FLAVA puts first: the encoder has no positions, so the order
        changes no output)."""
        c = self.config
        n_txt = x_txt.shape[1]
        extra = []
        if c.fusion == _ENCODER_FUSION:
            x_txt, x_img = self.mm_proj["l"](x_txt), self.mm_proj["v"](x_img)
            extra = [self.mm_cls_token.expand(x_txt.shape[0], -1, -1)]
        x = torch.cat([x_txt, x_img, *extra], dim=1)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], x.shape[1] - n_txt)
            mask = self._attn_mask(torch.cat([attention_mask, ones], dim=1))
        if c.fusion == _ENCODER_FUSION:
            return self.mm_norm(self._run(x, "vl", range(c.depth, c.num_blocks), mask))
        split = n_txt if c.fusion == "early" else None
        x = self._run(x, "vl", range(c.fusion_start, c.depth), mask, self._rel_bias("vl", n_txt), split)
        return self.final_norm(x, "vl", n_txt)

    def routes(self, image: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, top: bool = True) -> dict[str, torch.Tensor]:
        """The retrieval routes, keeping the states after the bottom layers for :meth:`fuse`.

        Returns ``image`` / ``text``: normed states of all N layers (as :meth:`forward_image` /
        :meth:`forward_text`) and ``image_bottom`` / ``text_bottom``: the states after the first
        :attr:`ModelConfig.fusion_start` layers, which are exactly the fusion route's inputs to its fusion
        layers (the bottom layers are the same experts), so one pass serves ITC, ITM and MLM (pre-training
        computes each once instead of per objective). ``top=False`` stops after the bottom layers (only the
        ``*_bottom`` entries).
        """
        c = self.config
        cut = c.fusion_start
        out: dict[str, torch.Tensor] = {}
        for name, x, modality, mask in (
                ("image", None if image is None else self.embed_image(image), "v", None),
                ("text", None if input_ids is None else self.embed_text(input_ids), "l",
                 self._attn_mask(attention_mask))):
            if x is None:
                continue
            bias = self._rel_bias(modality, x.shape[1])
            out[f"{name}_bottom"] = x = self._run(x, modality, range(cut), mask, bias)
            if top:
                out[name] = self.final_norm(self._run(x, modality, range(cut, c.depth), mask, bias), modality)
        return out

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding: [I_CLS] -> ITC projection -> L2 normalised, [B, proj_dim]."""
        return F.normalize(self.heads["itc"].image_proj(self.forward_image(image)[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Retrieval embedding: [T_CLS] -> ITC projection -> L2 normalised, [B, proj_dim]."""
        h = self.forward_text(input_ids, attention_mask)[:, 0]
        return F.normalize(self.heads["itc"].text_proj(h), dim=-1)

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The fusion route (see :meth:`forward_fusion`)."""
        return self.forward_fusion(image, input_ids, attention_mask)

    # -- introspection ---------------------------------------------------------------------------------
    def mergeable_parameters(self) -> list[str]:
        """Names of the modality-specific block weights (the ones a merge combines)."""
        return [n for n, _ in self.named_parameters() if parse_param_name(n).mergeable]

    def param_table(self) -> dict[str, Any]:
        """Parameter counts per part: embeddings, blocks by expert, final norm, each head; mergeable; total."""
        parts: dict[str, int] = {}
        for name, p in self.named_parameters():
            role = parse_param_name(name)
            if role.kind == "block":
                part = f"blocks.{role.expert}"
            elif role.kind == "head":
                part = f"heads.{role.head}"
            elif name.startswith("mm_"):
                part = "fusion_encoder"  # FLAVA's connector: projections, fusion [CLS], final norm
            elif role.kind == "embed":
                shared = "embed.rel_pos" if name.startswith("rel_pos_bias") else "embed.type"
                part = {"v": "embed.vision", "l": "embed.text", SHARED: shared}[role.expert or SHARED]
            else:
                part = name.split(".")[0]
            parts[part] = parts.get(part, 0) + p.numel()
        groups = merge_groups(n for n, _ in self.named_parameters())
        return {
            "arch": self.config.arch,
            "parts": dict(sorted(parts.items())),
            "mergeable_params": sum(p.numel() for n, p in self.named_parameters() if parse_param_name(n).mergeable),
            "merge_groups": len(groups),
            "total_params": sum(p.numel() for p in self.parameters()),
        }


# ------------------------------------------------------------------------------------------- conversions
def maa_to_msa(state_dict: Mapping[str, torch.Tensor], msa_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Expand an MAA (or any less-specific) state dict into ``msa_config``'s architecture.

    Every modality expert of a slot starts as a copy of the source's ``shared`` weight (the seed recipe,
    paper §4.2). Keys that exist in both pass through. Returns a state dict loadable into
    ``VLMo(msa_config)``.
    """
    target_names = param_shapes(msa_config)
    out: dict[str, torch.Tensor] = {}
    for name in target_names:
        if name in state_dict:
            out[name] = state_dict[name].clone()
            continue
        role = parse_param_name(name)
        if role.kind == "block" and role.merged_name in state_dict:
            out[name] = state_dict[role.merged_name].clone()
        else:
            raise KeyError(f"cannot build {name!r}: source has neither it nor {role.merged_name!r}")
    return out


def merged_to_maa(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a merged state dict has no modality-specific block weights left (an MAA state dict)."""
    left = [k for k in state_dict if parse_param_name(k).mergeable]
    if left:
        raise ValueError(f"not a merged (MAA) state dict: modality-specific weights remain, e.g. {left[:3]}")
    return dict(state_dict)


class _SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Skips the in-place random initialisation of meta tensors (they hold no values): on the meta device
    torch's ``normal_`` / ``uniform_`` run Python references whose first call imports ``torch._dynamo``, 0.85 s
    of a fresh process's first :func:`param_shapes` (AMD EPYC)."""

    SKIPPED = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # torch.nn.init's initialisers (in place, returning their tensor) dispatch here as themselves
        if func in self.SKIPPED or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(config: ModelConfig) -> VLMo:
    """``VLMo(config)`` on the meta device, uninitialised: its shapes and structure, no memory (load weights
    into it with ``load_state_dict(..., assign=True)`` or call it functionally)."""
    with torch.device("meta"), _SkipRandomInit():
        return VLMo(config)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``VLMo(config)``'s state dict, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}


def count_params(config: ModelConfig) -> dict[str, Any]:
    """:meth:`VLMo.param_table` for ``config`` without allocating weights."""
    return meta_model(config).param_table()

