"""Reference state dicts and a pure-functional forward for VLMo and the vl-merging "all-MoE" model.

Neither microsoft/unilm ``vlmo/`` nor ylsung/vl-merging is a pip package, so this module re-derives, from the two
papers (Bao et al. 2022, VLMo; Sung et al. 2023, multimodal model merging, Fig. 2) and from reading the released code,
(a) the exact key names / shapes of the state dict the released Lightning modules save and (b) the forward those
modules compute. Nothing here imports vlmerge: tests use it to prove that an importer is exact.

Sources (paths inside the two repositories):

* VLMo: ``vlmo/vlmo/modules/vlmo_module.py`` (class ``VLMo``), ``vlmo/vlmo/modules/multiway_transformer.py``
  (``MultiWayTransformer``, ``Block``, ``Attention``, ``Mlp``, ``PatchEmbed``), ``vlmo/vlmo/modules/heads.py``,
  ``vlmo/vlmo/config.py`` (default ``loss_names`` = itm + itc + mlm, ``vlmo_base_patch16``: qkv_bias=True,
  layer-scale 0.1, ``use_abs_pos_emb=False``, ``need_relative_position_embed=True``), requirements
  ``transformers==4.8.1``.
* vl-merging: ``src/vilt/modules/vilt_module.py`` (class ``ViLTransformerSS``),
  ``src/vilt/modules/vision_transformer.py`` (``VisionTransformer``, ``Block.moe_forward``, ``Block.apply_ln``),
  ``src/vilt/moe/config.py`` and
  ``src/vilt/custom_ln/config.py`` (tasks_for_shallow_layers = [v, l], tasks_for_deep_layers = [v, l, vl]),
  ``src/vilt/config.py`` (named config ``all_moe``: use_moe, in_attn, in_ffn, use_custom_ln_attn, use_custom_ln_ffn,
  ``self_attn_for_single_mode=True``; defaults ``loss_names`` = itm + ifm + mlm, ``num_frames=1``,
  ``max_vl_text_len=None``).

Notation: ``D`` = dim, ``H`` = heads, ``F`` = int(D * mlp_ratio), ``V`` = vocab_size, ``T`` = max_text_len,
``M`` = max_text_len_of_initckpt, ``w`` = image_size // patch_size, ``I`` = w*w + 1 image tokens (CLS + patches),
``s`` = depth - vl_layers (= VLMo's ``vlffn_start_layer_index``; vl-merging's config key of the same name),
``nrd`` = (2w-1)^2 + 3, ``all_nrd`` = nrd + 2M + 2.

Layout "vlmo" (``VLMo.state_dict()``, in the order ``nn.Module.state_dict`` emits it: a module's own parameters, then
its own persistent buffers, then its children in registration order)::

    relative_position_bias_table                [all_nrd, H*depth]  VLMo.build_relative_position_embed (one table,
                                                                    columns l*H:(l+1)*H belong to layer l)
    logit_scale, logit_vl_scale                 []                  VLMo.__init__ (itc > 0)
    transformer.cls_token                       [1, 1, D]           MultiWayTransformer (pos_embed is None)
    transformer.patch_embed.proj.{weight,bias}  [D, 3, p, p], [D]   PatchEmbed (conv with bias)
    transformer.blocks.{i}.gamma_1 / gamma_2    [D]                 Block (layer scale)
    transformer.blocks.{i}.norm1.{weight,bias}  [D]
    transformer.blocks.{i}.attn.q_bias / v_bias [D]                 Attention (qkv_bias=True)
    transformer.blocks.{i}.attn.qkv.weight      [3D, D]             (no qkv.bias; k has no bias)
    transformer.blocks.{i}.attn.proj.{weight,bias} [D, D], [D]
    transformer.blocks.{i}.norm2_text / norm2_imag .{weight,bias}   [D]
    transformer.blocks.{i}.mlp_text / mlp_imag .fc1.{weight,bias}   [F, D], [F]; .fc2.{weight,bias} [D, F], [D]
    transformer.blocks.{i}.mlp_vl.fc{1,2}.*, norm2_vl.*             only for i >= s (Block(with_vlffn=i >= s))
    transformer.norm.{weight,bias}              [D]
    text_embeddings.position_ids                [1, T] int64        BertEmbeddings buffer (persistent in 4.8.1)
    text_embeddings.word_embeddings.weight      [V, D]
    text_embeddings.position_embeddings.weight  [T, D]              present but unused (position_embedding_type
                                                                    "rel_pos" != "absolute")
    text_embeddings.token_type_embeddings.weight [2, D]             BERT's own type embedding (type_vocab_size 2)
    text_embeddings.LayerNorm.{weight,bias}     [D]                 eps 1e-12
    token_type_embeddings.weight                [2, D]              VLMo's modality embedding (0 text, 1 image)
    pooler.dense.{weight,bias}                  [D, D], [D]         heads.Pooler
    mlm_score.bias                              [V]                 heads.MLMHead (own parameter, saved first)
    mlm_score.transform.dense.{weight,bias}     [D, D], [D]         BertPredictionHeadTransform
    mlm_score.transform.LayerNorm.{weight,bias} [D]
    mlm_score.decoder.weight                    [V, D]              (no bias, not tied: MLMHead(weight=None))
    itm_score.fc.{weight,bias}                  [2, D], [2]         heads.ITMHead
    itc_text_proj.fc.weight, itc_image_proj.fc.weight,
    itc_vl_text_proj.fc.weight, itc_vl_image_proj.fc.weight  [D, D] heads.ITCHead (no bias)

  VLMo keeps ``relative_position_index`` / ``text_relative_position_index`` / ``text_imag_relative_position_index`` as
  plain tensor attributes (not ``register_buffer``), so they are NOT in its state dict.

Layout "vl-merging" (``ViLTransformerSS.state_dict()`` built with the ``all_moe`` config)::

    logit_scale, logit_vl_scale                 []                  (ifm > 0)
    relative_position_bias_table                [all_nrd, H*depth]  same construction as VLMo
    temporal_relative_position_bias_table       [2*num_frames, H*depth] = [2, H*depth]  (num_frames=1 >= 1)
    relative_position_index                     [I, I] int64        register_buffer (persistent)
    text_relative_position_index                [T, T] int64
    text_imag_relative_position_index           [T+I, T+I] float32  (torch.cat of int64 with float32 ``ones*c``)
    video_relative_position_index               [I, I] int64        (num_frames=1: == relative_position_index)
    text_video_relative_position_index          [T+I, T+I] float32  (num_frames=1: == text_imag index)
    temporal_relative_position_index            [I, I] int64        (num_frames=1: all zeros)
    mask_for_combining_temporal                 [1, I, I] float32   (num_frames=1: all ones)
    text_embeddings.*                           as for "vlmo" (position_ids, word/position/token_type, LayerNorm)
    token_type_embeddings.weight                [2, D]
    transformer.cls_token, transformer.mask_token [1, 1, D]         VisionTransformer (mask_token always created)
    transformer.patch_embed.proj.{weight,bias}
    transformer.blocks.{i}.gamma_1 / gamma_2    [D]
    transformer.blocks.{i}.attn.{e}.q_bias / v_bias / qkv.weight / proj.{weight,bias}
    transformer.blocks.{i}.norm1.{e}.{weight,bias}
    transformer.blocks.{i}.mlp.{e}.fc1.* / fc2.*
    transformer.blocks.{i}.norm2.{e}.{weight,bias}
        with e in (v, l) for i < s and (v, l, vl) for i >= s (ModuleDicts in that key order)
    transformer.norm.{weight,bias}
    pooler.dense.*, mlm_score.* (as VLMo), itm_score.fc.*
    ifm_text_proj.fc.weight, ifm_image_proj.fc.weight, ifm_vl_text_proj.fc.weight, ifm_vl_image_proj.fc.weight
        (heads.IFMHead: vl-merging calls VLMo's ITC heads "ifm"; loss key "ifm")

  ``vl_text_imag_relative_position_index`` / ``vl_text_video_relative_position_index`` exist only when
  ``max_vl_text_len`` is set (the ``*_vl`` pre-training named configs); the default (None) is assumed here.

Relative-position index (both codebases, reproduced by ``image_rel_index`` / ``text_rel_index`` /
``fusion_rel_index``; the bias of layer l is ``table[index][..., l*H:(l+1)*H].permute(2, 0, 1)``):

* image [I, I]: patches (h_i, w_i), (h_j, w_j) -> (h_i - h_j + w - 1) * (2w - 1) + (w_i - w_j + w - 1);
  row 0 (CLS query) = nrd - 3, column 0 (CLS key) = nrd - 2, [0, 0] = nrd - 1.
* text [L, L]: tokens i, j >= 1 -> nrd + M + (j - i) (from ``(ids[j] - ids[i]) - (2 - M) + nrd + 2``);
  row 0 = all_nrd - 3, column 0 = all_nrd - 2, [0, 0] = all_nrd - 1. Needs L <= M.
* fusion [L+I, L+I] = [[text, nrd], [nrd + 1, image]] (text->image constant nrd, image->text constant nrd + 1).

Text embedding (transformers 4.8.1 ``BertEmbeddings``): word_embeddings(ids) + token_type_embeddings(0), absolute
position embeddings added only when ``position_embedding_type == "absolute"`` (both modules pass "rel_pos", so none),
LayerNorm eps 1e-12 (dropout is identity at eval), then the module's own ``token_type_embeddings`` row 0. Image:
conv patch embedding, flatten, prepend ``cls_token``, no absolute position embedding, + ``token_type_embeddings`` row 1.
Assumed about 4.8.1: ``position_ids`` is a persistent buffer and ``token_type_ids`` is registered with
``persistent=False`` (so it is NOT in the state dict).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LAYOUTS = ("vlmo", "vl-merging")
ROUTES = ("image", "text", "fusion")


# --------------------------------------------------------------------------------------------- relative positions
def num_relative_distances(image_size: int, patch_size: int, max_text_len_of_initckpt: int) -> tuple[int, int]:
    """(nrd, all_nrd): VLMo's ``num_relative_distance`` and ``all_num_relative_distance``."""
    w = image_size // patch_size
    nrd = (2 * w - 1) ** 2 + 3
    return nrd, nrd + 2 * max_text_len_of_initckpt + 2


def image_rel_index(image_size: int, patch_size: int) -> torch.Tensor:
    """[I, I] int64 image index (CLS first), as VLMo's / BEiT's window index."""
    w = image_size // patch_size
    nrd, _ = num_relative_distances(image_size, patch_size, 0)
    pos = torch.arange(w * w)
    hh, ww = pos // w, pos % w
    dh = hh[:, None] - hh[None, :] + (w - 1)
    dw = ww[:, None] - ww[None, :] + (w - 1)
    idx = torch.empty(w * w + 1, w * w + 1, dtype=torch.long)
    idx[1:, 1:] = dh * (2 * w - 1) + dw
    idx[0, :] = nrd - 3
    idx[:, 0] = nrd - 2
    idx[0, 0] = nrd - 1
    return idx


def text_rel_index(text_len: int, image_size: int, patch_size: int, max_text_len_of_initckpt: int) -> torch.Tensor:
    """[L, L] int64 text index (CLS first)."""
    m = max_text_len_of_initckpt
    if text_len > m:
        raise ValueError(f"text length {text_len} > max_text_len_of_initckpt {m}: indices would leave the table")
    nrd, all_nrd = num_relative_distances(image_size, patch_size, m)
    pos = torch.arange(text_len)
    idx = nrd + m + (pos[None, :] - pos[:, None])
    idx[0, :] = all_nrd - 3
    idx[:, 0] = all_nrd - 2
    idx[0, 0] = all_nrd - 1
    return idx


def fusion_rel_index(text_len: int, image_size: int, patch_size: int, max_text_len_of_initckpt: int) -> torch.Tensor:
    """[L+I, L+I] int64 index of the concatenation [text; image]."""
    nrd, _ = num_relative_distances(image_size, patch_size, max_text_len_of_initckpt)
    t = text_rel_index(text_len, image_size, patch_size, max_text_len_of_initckpt)
    im = image_rel_index(image_size, patch_size)
    n_i = im.shape[0]
    top = torch.cat([t, torch.full((text_len, n_i), nrd, dtype=torch.long)], dim=1)
    bottom = torch.cat([torch.full((n_i, text_len), nrd + 1, dtype=torch.long), im], dim=1)
    return torch.cat([top, bottom], dim=0)


def layer_bias(table: torch.Tensor, index: torch.Tensor, layer: int, heads: int) -> torch.Tensor:
    """[H, N, N] bias of one layer: its own slice of heads of the shared table."""
    return table[index][..., layer * heads : (layer + 1) * heads].permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------- state dict
def _entries(
    layout: str, *, dim: int, depth: int, heads: int, hidden: int, vl_layers: int, patch_size: int, vocab_size: int,
    max_text_len: int, all_nrd: int,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) in state-dict order; ``kind`` picks the random draw (or a buffer rule)."""
    d, f, s = dim, hidden, depth - vl_layers
    out: list[tuple[str, tuple[int, ...], str]] = []

    def lin(p: str, o: int, i: int, bias: bool = True) -> None:
        out.append((f"{p}.weight", (o, i), f"w{i}"))
        if bias:
            out.append((f"{p}.bias", (o,), "b"))

    def ln(p: str) -> None:
        out.append((f"{p}.weight", (d,), "ln_w"))
        out.append((f"{p}.bias", (d,), "ln_b"))

    def attn(p: str) -> None:
        out.append((f"{p}.q_bias", (d,), "b"))
        out.append((f"{p}.v_bias", (d,), "b"))
        lin(f"{p}.qkv", 3 * d, d, bias=False)
        lin(f"{p}.proj", d, d)

    def mlp(p: str) -> None:
        lin(f"{p}.fc1", f, d)
        lin(f"{p}.fc2", d, f)

    table = ("relative_position_bias_table", (all_nrd, heads * depth), "table")
    scales = [("logit_scale", (), "scale"), ("logit_vl_scale", (), "scale")]
    if layout == "vlmo":
        out += [table, *scales]
    else:
        out += [*scales, table, ("temporal_relative_position_bias_table", (2, heads * depth), "table")]
        out += [(k, (), "buffer") for k in (
            "relative_position_index", "text_relative_position_index", "text_imag_relative_position_index",
            "video_relative_position_index", "text_video_relative_position_index",
            "temporal_relative_position_index", "mask_for_combining_temporal",
        )]
    # text embeddings (vl-merging registers them before the transformer; VLMo after; state-dict order follows)
    text = [("text_embeddings.position_ids", (1, max_text_len), "buffer"),
            ("text_embeddings.word_embeddings.weight", (vocab_size, d), "emb"),
            ("text_embeddings.position_embeddings.weight", (max_text_len, d), "emb"),
            ("text_embeddings.token_type_embeddings.weight", (2, d), "emb")]
    text_ln: list[tuple[str, tuple[int, ...], str]] = [
        ("text_embeddings.LayerNorm.weight", (d,), "ln_w"), ("text_embeddings.LayerNorm.bias", (d,), "ln_b"),
        ("token_type_embeddings.weight", (2, d), "emb"),
    ]
    trans: list[tuple[str, tuple[int, ...], str]] = [("transformer.cls_token", (1, 1, d), "emb")]
    if layout == "vl-merging":
        trans.append(("transformer.mask_token", (1, 1, d), "emb"))
    trans += [("transformer.patch_embed.proj.weight", (d, 3, patch_size, patch_size), f"w{3 * patch_size**2}"),
              ("transformer.patch_embed.proj.bias", (d,), "b")]
    if layout == "vl-merging":
        out += text + text_ln
    out += trans
    for i in range(depth):
        p = f"transformer.blocks.{i}"
        out += [(f"{p}.gamma_1", (d,), "gamma"), (f"{p}.gamma_2", (d,), "gamma")]
        if layout == "vlmo":
            ln(f"{p}.norm1")
            attn(f"{p}.attn")
            ln(f"{p}.norm2_text")
            ln(f"{p}.norm2_imag")
            mlp(f"{p}.mlp_text")
            mlp(f"{p}.mlp_imag")
            if i >= s:
                mlp(f"{p}.mlp_vl")
                ln(f"{p}.norm2_vl")
        else:
            experts = ("v", "l", "vl") if i >= s else ("v", "l")
            for e in experts:
                attn(f"{p}.attn.{e}")
            for e in experts:
                ln(f"{p}.norm1.{e}")
            for e in experts:
                mlp(f"{p}.mlp.{e}")
            for e in experts:
                ln(f"{p}.norm2.{e}")
    ln("transformer.norm")
    if layout == "vlmo":
        out += text + text_ln
    lin("pooler.dense", d, d)
    out.append(("mlm_score.bias", (vocab_size,), "b"))
    lin("mlm_score.transform.dense", d, d)
    ln("mlm_score.transform.LayerNorm")
    lin("mlm_score.decoder", vocab_size, d, bias=False)
    lin("itm_score.fc", 2, d)
    c = "itc" if layout == "vlmo" else "ifm"
    for name in ("text_proj", "image_proj", "vl_text_proj", "vl_image_proj"):
        lin(f"{c}_{name}.fc", d, d, bias=False)
    return out


def _buffers(layout: str, *, image_size: int, patch_size: int, max_text_len: int, m: int) -> dict[str, torch.Tensor]:
    out = {"text_embeddings.position_ids": torch.arange(max_text_len).unsqueeze(0)}
    if layout == "vl-merging":
        im = image_rel_index(image_size, patch_size)
        ti = fusion_rel_index(max_text_len, image_size, patch_size, m).float()
        out.update(
            relative_position_index=im,
            text_relative_position_index=text_rel_index(max_text_len, image_size, patch_size, m),
            text_imag_relative_position_index=ti,
            video_relative_position_index=im.clone(),
            text_video_relative_position_index=ti.clone(),
            temporal_relative_position_index=torch.zeros_like(im),
            mask_for_combining_temporal=torch.ones(1, *im.shape),
        )
    return out


def vlmo_state_dict(
    layout: str, *, dim: int = 32, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, vl_layers: int = 2,
    image_size: int = 16, patch_size: int = 8, vocab_size: int = 100, max_text_len: int = 12,
    max_text_len_of_initckpt: int = 16, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys / shapes / dtypes of the released module (see module docstring).

    Linear / conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2) (non-zero), LayerNorm weights 1 + N(0, 0.1^2),
    LayerNorm biases N(0, 0.1^2), gammas 0.1 + N(0, 0.03^2), embeddings and cls/mask tokens N(0, 1), the relative
    position tables N(0, 0.5^2), logit scales log(1/0.07) + N(0, 0.1^2); every expert is its own draw. Buffers hold
    the values the modules compute. Deterministic per ``seed``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= vl_layers <= depth:
        raise ValueError("need 0 <= vl_layers <= depth")
    if dim % heads:
        raise ValueError("dim must be divisible by heads")
    _, all_nrd = num_relative_distances(image_size, patch_size, max_text_len_of_initckpt)
    entries = _entries(
        layout, dim=dim, depth=depth, heads=heads, hidden=int(dim * mlp_ratio), vl_layers=vl_layers,
        patch_size=patch_size, vocab_size=vocab_size, max_text_len=max_text_len, all_nrd=all_nrd,
    )
    buffers = _buffers(layout, image_size=image_size, patch_size=patch_size, max_text_len=max_text_len,
                       m=max_text_len_of_initckpt)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape, kind in entries:
        if kind == "buffer":
            sd[key] = buffers[key]
            continue
        z = torch.randn(shape, generator=g)
        if kind.startswith("w"):
            z = z / math.sqrt(int(kind[1:]))
        elif kind in ("b", "ln_b"):
            z = 0.1 * z
        elif kind == "ln_w":
            z = 1.0 + 0.1 * z
        elif kind == "gamma":
            z = 0.1 + 0.03 * z
        elif kind == "table":
            z = 0.5 * z
        elif kind == "scale":
            z = math.log(1 / 0.07) + 0.1 * z
        elif kind != "emb":
            raise AssertionError(kind)
        sd[key] = z
    return sd


# -------------------------------------------------------------------------------------------------------- forward
def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _attention(
    x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, heads: int, bias: torch.Tensor, key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """q = x Wq + q_bias, k = x Wk, v = x Wv + v_bias; softmax(q k^T * hd^-0.5 + bias, masked keys -inf) v; proj."""
    b, n, d = x.shape
    hd = d // heads
    wq, wk, wv = sd[f"{p}.qkv.weight"].split(d, dim=0)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, heads, hd).transpose(1, 2)

    q = split(F.linear(x, wq, sd[f"{p}.q_bias"])) * hd**-0.5
    k = split(F.linear(x, wk))
    v = split(F.linear(x, wv, sd[f"{p}.v_bias"]))
    scores = q @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, sd[f"{p}.proj.weight"], sd[f"{p}.proj.bias"])


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    h = F.gelu(F.linear(x, sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"]))
    return F.linear(h, sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])


def _layer(
    x: torch.Tensor, sd: dict[str, torch.Tensor], blk: str, *, attn_parts: list[tuple[slice, str, str]],
    ffn_parts: list[tuple[slice, str, str]], heads: int, bias: torch.Tensor, key_mask: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """One pre-LN layer. ``attn_parts`` / ``ffn_parts``: (token slice, norm prefix, expert prefix). Several attention
    parts attend only within their own slice (bias and key mask sliced accordingly)."""
    a = torch.empty_like(x)
    for sl, norm, expert in attn_parts:
        m = None if key_mask is None else key_mask[:, sl]
        a[:, sl] = _attention(_ln(x[:, sl], sd, norm, eps), sd, expert, heads, bias[:, sl, sl], m)
    x = x + sd[f"{blk}.gamma_1"] * a
    h = torch.empty_like(x)
    for sl, norm, expert in ffn_parts:
        h[:, sl] = _mlp(_ln(x[:, sl], sd, norm, eps), sd, expert)
    return x + sd[f"{blk}.gamma_2"] * h


def text_embed(sd: dict[str, torch.Tensor], text_ids: torch.Tensor, bert_ln_eps: float = 1e-12) -> torch.Tensor:
    """BertEmbeddings (rel_pos: no absolute positions) + the module's token type row 0."""
    e = sd["text_embeddings.word_embeddings.weight"][text_ids] + sd["text_embeddings.token_type_embeddings.weight"][0]
    e = _ln(e, sd, "text_embeddings.LayerNorm", bert_ln_eps)
    return e + sd["token_type_embeddings.weight"][0]


def image_embed(sd: dict[str, torch.Tensor], image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Conv patches, CLS prepended, no absolute positions, + token type row 1."""
    w = sd["transformer.patch_embed.proj.weight"]
    x = F.conv2d(image.to(w.dtype), w, sd["transformer.patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["transformer.cls_token"].expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + sd["token_type_embeddings.weight"][1]


def vlmo_forward(
    sd: dict[str, torch.Tensor], layout: str, route: str, *, image: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, heads: int, depth: int,
    vl_layers: int, image_size: int, patch_size: int, max_text_len_of_initckpt: int, ln_eps: float = 1e-6,
    bert_ln_eps: float = 1e-12,
) -> torch.Tensor:
    """Hidden states after ``transformer.norm`` for route "image" [B, I, D], "text" [B, L, D] or "fusion" [B, L+I, D].

    * "image": every layer with the image expert (VLMo ``infer_image``'s vffn route: norm2_imag/mlp_imag; vl-merging
      ``infer_image``: norm1.v/attn.v/norm2.v/mlp.v), image relative bias, no mask.
    * "text": every layer with the text expert (``infer_text``'s lffn route), text relative bias, key mask
      ``text_mask`` (1 = token, 0 = padding; None = all tokens).
    * "fusion": [text; image] (the text length L is the split point, i.e. the caller pads to VLMo's max_text_len).
      - "vlmo" (``VLMo.infer``, Block modality_type "vl"): every layer attends over all tokens with the fusion bias and
        key mask [text_mask; 1]; layers i < s apply norm2_text/mlp_text to text tokens and norm2_imag/mlp_imag to image
        tokens, layers i >= s apply norm2_vl/mlp_vl to all.
      - "vl-merging" (merging paper Fig. 2; ``ViLTransformerSS.infer`` with type_id 2 under ``all_moe``, whose
        ``self_attn_for_single_mode=True``): layers i < s run each modality separately (text through the l experts
        with the text block of the bias and the text mask, image through the v experts with the image block), layers
        i >= s run the vl experts on the concatenation with the fusion bias. NOTE: with ``self_attn_for_single_mode``
        False (the MOEConfig / config.py default, used e.g. by plain ``use_moe``) the code instead runs attn.l and
        attn.v over ALL tokens and keeps the text rows of the first and the image rows of the second, i.e. text and
        image attend across modalities already in the bottom layers; that pattern is not implemented here.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    s = depth - vl_layers
    table = sd["relative_position_bias_table"]
    if table.shape[1] != heads * depth:
        raise ValueError(f"table has {table.shape[1]} columns, expected heads*depth = {heads * depth}")
    geo = dict(image_size=image_size, patch_size=patch_size, max_text_len_of_initckpt=max_text_len_of_initckpt)
    dtype = table.dtype
    full = slice(None)

    if route == "image":
        if image is None:
            raise ValueError("route 'image' needs image")
        x = image_embed(sd, image, patch_size)
        index, key_mask, n_text = image_rel_index(image_size, patch_size), None, 0
    else:
        if text_ids is None:
            raise ValueError(f"route {route!r} needs text_ids")
        t = text_embed(sd, text_ids, bert_ln_eps).to(dtype)
        n_text = t.shape[1]
        tmask = torch.ones(t.shape[:2], dtype=torch.bool) if text_mask is None else text_mask.bool()
        if route == "text":
            x, key_mask, index = t, tmask, text_rel_index(n_text, **geo)
        else:
            if image is None:
                raise ValueError("route 'fusion' needs image")
            im = image_embed(sd, image, patch_size)
            x = torch.cat([t, im], dim=1)
            key_mask = torch.cat([tmask, torch.ones(im.shape[:2], dtype=torch.bool)], dim=1)
            index = fusion_rel_index(n_text, **geo)
    txt, img = slice(0, n_text), slice(n_text, None)

    for i in range(depth):
        blk = f"transformer.blocks.{i}"
        if layout == "vlmo":
            attn_parts = [(full, f"{blk}.norm1", f"{blk}.attn")]
            if route == "image":
                ffn_parts = [(full, f"{blk}.norm2_imag", f"{blk}.mlp_imag")]
            elif route == "text":
                ffn_parts = [(full, f"{blk}.norm2_text", f"{blk}.mlp_text")]
            elif i < s:
                ffn_parts = [
                    (txt, f"{blk}.norm2_text", f"{blk}.mlp_text"),
                    (img, f"{blk}.norm2_imag", f"{blk}.mlp_imag"),
                ]
            else:
                ffn_parts = [(full, f"{blk}.norm2_vl", f"{blk}.mlp_vl")]
        else:
            if route == "fusion" and i < s:
                parts = [(txt, "l"), (img, "v")]
            else:
                e = {"image": "v", "text": "l", "fusion": "vl"}[route]
                parts = [(full, e)]
            attn_parts = [(sl, f"{blk}.norm1.{e}", f"{blk}.attn.{e}") for sl, e in parts]
            ffn_parts = [(sl, f"{blk}.norm2.{e}", f"{blk}.mlp.{e}") for sl, e in parts]
        x = _layer(x, sd, blk, attn_parts=attn_parts, ffn_parts=ffn_parts, heads=heads,
                   bias=layer_bias(table, index, i, heads), key_mask=key_mask, eps=ln_eps)
    return _ln(x, sd, "transformer.norm", ln_eps)
