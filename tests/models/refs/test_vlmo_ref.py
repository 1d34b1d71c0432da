"""The VLMo / vl-merging reference itself: its key layout, determinism, route shapes, and oracles whose answers are
known independently (loop-built relative-position indices, a from-scratch single-modality forward on
``F.scaled_dot_product_attention``, and identities between routes)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from .vlmo_ref import (
    LAYOUTS,
    fusion_rel_index,
    image_rel_index,
    num_relative_distances,
    text_rel_index,
    vlmo_forward,
    vlmo_state_dict,
)

B, L, D, HEADS, DEPTH, VL, IMG, P, M, T = 2, 12, 32, 4, 4, 2, 16, 8, 16, 12
GEO = dict(heads=HEADS, depth=DEPTH, image_size=IMG, patch_size=P, max_text_len_of_initckpt=M)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, IMG, IMG, generator=g)
    ids = torch.randint(0, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 7:] = 0
    return image, ids, mask


def run(sd, layout, route, vl_layers=VL, **kw):
    image, ids, mask = inputs()
    return vlmo_forward(sd, layout, route, image=image, text_ids=ids, text_mask=mask, vl_layers=vl_layers, **GEO, **kw)


# ------------------------------------------------------------------------------------------------------ key layout
def _patterns(sd):
    return sorted({re.sub(r"blocks\.\d+\.", "blocks.{i}.", k) for k in sd})


def test_vlmo_keys_and_shapes():
    sd = vlmo_state_dict("vlmo")
    nrd, all_nrd = num_relative_distances(IMG, P, M)
    assert (nrd, all_nrd) == (12, 46)
    assert sd["relative_position_bias_table"].shape == (all_nrd, HEADS * DEPTH)
    assert sd["transformer.blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert "transformer.blocks.0.attn.qkv.bias" not in sd
    assert sd["transformer.patch_embed.proj.weight"].shape == (D, 3, P, P)
    assert sd["text_embeddings.position_ids"].tolist() == [list(range(T))]
    assert "text_embeddings.token_type_ids" not in sd
    assert "transformer.pos_embed" not in sd and "relative_position_index" not in sd
    for i in range(DEPTH):
        has_vl = i >= DEPTH - VL
        assert (f"transformer.blocks.{i}.mlp_vl.fc1.weight" in sd) == has_vl
        assert (f"transformer.blocks.{i}.norm2_vl.weight" in sd) == has_vl
        assert sd[f"transformer.blocks.{i}.mlp_text.fc1.weight"].shape == (4 * D, D)
    heads = {k for k in sd if not k.startswith(("transformer.", "text_embeddings.", "token_type"))}
    assert heads == {
        "relative_position_bias_table", "logit_scale", "logit_vl_scale", "pooler.dense.weight", "pooler.dense.bias",
        "mlm_score.bias", "mlm_score.transform.dense.weight", "mlm_score.transform.dense.bias",
        "mlm_score.transform.LayerNorm.weight", "mlm_score.transform.LayerNorm.bias", "mlm_score.decoder.weight",
        "itm_score.fc.weight", "itm_score.fc.bias", "itc_text_proj.fc.weight", "itc_image_proj.fc.weight",
        "itc_vl_text_proj.fc.weight", "itc_vl_image_proj.fc.weight",
    }
    # 3 top-level + cls/patch/norm 5 + 21 per block + 6 per VL block + 7 text/type embeddings + 14 head tensors
    assert len(sd) == 3 + 5 + DEPTH * 21 + VL * 6 + 7 + 14 == 125


def test_vl_merging_keys_and_buffers():
    sd = vlmo_state_dict("vl-merging")
    s = DEPTH - VL
    for i in range(DEPTH):
        experts = {"v", "l", "vl"} if i >= s else {"v", "l"}
        for mod in ("attn", "norm1", "mlp", "norm2"):
            found = {k.split(".")[4] for k in sd if k.startswith(f"transformer.blocks.{i}.{mod}.")}
            assert found == experts, (i, mod)
        assert sd[f"transformer.blocks.{i}.attn.v.qkv.weight"].shape == (3 * D, D)
        assert f"transformer.blocks.{i}.attn.v.qkv.bias" not in sd
    assert "ifm_vl_image_proj.fc.weight" in sd and "itc_text_proj.fc.weight" not in sd
    assert sd["transformer.mask_token"].shape == (1, 1, D)
    n_i = (IMG // P) ** 2 + 1
    assert sd["relative_position_index"].dtype == torch.long and sd["relative_position_index"].shape == (n_i, n_i)
    assert sd["text_imag_relative_position_index"].dtype == torch.float32
    assert sd["text_imag_relative_position_index"].shape == (T + n_i, T + n_i)
    assert sd["temporal_relative_position_bias_table"].shape == (2, HEADS * DEPTH)
    assert torch.equal(sd["text_imag_relative_position_index"].long(), fusion_rel_index(T, IMG, P, M))
    assert torch.equal(sd["text_relative_position_index"], text_rel_index(T, IMG, P, M))
    assert _patterns(sd) != _patterns(vlmo_state_dict("vlmo"))


def test_loop_built_indices_match():
    """VLMo's index definitions, written as plain loops over token pairs."""
    w = IMG // P
    nrd, all_nrd = num_relative_distances(IMG, P, M)
    im = image_rel_index(IMG, P)
    for i in range(w * w + 1):
        for j in range(w * w + 1):
            if i == 0 and j == 0:
                want = nrd - 1
            elif i == 0:
                want = nrd - 3
            elif j == 0:
                want = nrd - 2
            else:
                (hi, wi), (hj, wj) = divmod(i - 1, w), divmod(j - 1, w)
                want = (hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1)
            assert im[i, j] == want
    tx = text_rel_index(L, IMG, P, M)
    for i in range(L):
        for j in range(L):
            want = {(True, True): all_nrd - 1, (True, False): all_nrd - 3, (False, True): all_nrd - 2}.get(
                (i == 0, j == 0), (j - 1) - (i - 1) - (2 - M) + nrd + 2)
            assert tx[i, j] == want
    fu = fusion_rel_index(L, IMG, P, M)
    assert torch.equal(fu[:L, :L], tx) and torch.equal(fu[L:, L:], im)
    assert (fu[:L, L:] == nrd).all() and (fu[L:, :L] == nrd + 1).all()
    assert int(fu.max()) == all_nrd - 1 and int(tx[1:, 1:].max()) < all_nrd - 3


# ------------------------------------------------------------------------------------------- determinism / shapes
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_and_distinct(layout):
    a, b, c = vlmo_state_dict(layout), vlmo_state_dict(layout), vlmo_state_dict(layout, seed=1)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["relative_position_bias_table"], c["relative_position_bias_table"])
    e = ("mlp_text", "mlp_imag", "mlp_vl") if layout == "vlmo" else ("mlp.l", "mlp.v", "mlp.vl")
    w = [a[f"transformer.blocks.3.{x}.fc1.weight"] for x in e]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    ln = a["transformer.norm.weight"]
    assert (ln - 1).abs().max() < 0.6 and (ln != 1).all()
    assert (a["transformer.blocks.0.gamma_1"] - 0.1).abs().max() < 0.2
    assert (a["pooler.dense.bias"] != 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_route_shapes_finite(layout):
    sd = vlmo_state_dict(layout)
    n_i = (IMG // P) ** 2 + 1
    outs = {r: run(sd, layout, r) for r in ("image", "text", "fusion")}
    assert outs["image"].shape == (B, n_i, D)
    assert outs["text"].shape == (B, L, D)
    assert outs["fusion"].shape == (B, L + n_i, D)
    assert all(torch.isfinite(o).all() for o in outs.values())
    again = run(sd, layout, "fusion")
    assert torch.equal(again, outs["fusion"])
    assert (outs["fusion"][:, :L] - outs["text"]).abs().max() > 1e-3  # fusion is not the text route


# --------------------------------------------------------------------------------------------------------- oracles
def _manual_single(sd, route, layout, text_ids=None, mask=None, image=None):
    """A from-scratch single-modality forward: SDPA with an additive float mask, loop-built bias, combined qkv."""
    if route == "image":
        pw, pb = sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"]
        x = F.conv2d(image, pw, pb, stride=P).flatten(2).mT
        x = torch.cat([sd["transformer.cls_token"].expand(B, 1, D), x], 1) + sd["token_type_embeddings.weight"][1]
        idx, keep = image_rel_index(IMG, P), torch.ones(B, x.shape[1], dtype=torch.bool)
    else:
        te = "text_embeddings."
        e = sd[te + "word_embeddings.weight"][text_ids] + sd[te + "token_type_embeddings.weight"][0]
        e = F.layer_norm(e, (D,), sd["text_embeddings.LayerNorm.weight"], sd["text_embeddings.LayerNorm.bias"], 1e-12)
        x, idx, keep = e + sd["token_type_embeddings.weight"][0], text_rel_index(L, IMG, P, M), mask.bool()
    n = x.shape[1]
    for i in range(DEPTH):
        p = f"transformer.blocks.{i}."
        if layout == "vlmo":
            n1, at = p + "norm1", p + "attn"
            n2, ml = (p + "norm2_imag", p + "mlp_imag") if route == "image" else (p + "norm2_text", p + "mlp_text")
        else:
            ex = "v" if route == "image" else "l"
            n1, at, n2, ml = p + f"norm1.{ex}", p + f"attn.{ex}", p + f"norm2.{ex}", p + f"mlp.{ex}"
        bias = sd["relative_position_bias_table"][:, i * HEADS : (i + 1) * HEADS][idx].permute(2, 0, 1)
        add = bias.unsqueeze(0) + torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
        h = F.layer_norm(x, (D,), sd[n1 + ".weight"], sd[n1 + ".bias"], 1e-6)
        qkv_b = torch.cat([sd[at + ".q_bias"], torch.zeros(D), sd[at + ".v_bias"]])
        q, k, v = (F.linear(h, sd[at + ".qkv.weight"], qkv_b).view(B, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=add).transpose(1, 2).reshape(B, n, D)
        x = x + sd[p + "gamma_1"] * F.linear(a, sd[at + ".proj.weight"], sd[at + ".proj.bias"])
        h = F.layer_norm(x, (D,), sd[n2 + ".weight"], sd[n2 + ".bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[ml + ".fc1.weight"], sd[ml + ".fc1.bias"]))
        h = F.linear(h, sd[ml + ".fc2.weight"], sd[ml + ".fc2.bias"])
        x = x + sd[p + "gamma_2"] * h
    return F.layer_norm(x, (D,), sd["transformer.norm.weight"], sd["transformer.norm.bias"], 1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("route", ["image", "text"])
def test_single_routes_match_independent_forward(layout, route):
    sd = vlmo_state_dict(layout)
    image, ids, mask = inputs()
    want = _manual_single(sd, route, layout, text_ids=ids, mask=mask, image=image)
    torch.testing.assert_close(run(sd, layout, route), want, atol=2e-5, rtol=1e-5)


def test_fusion_image_part_is_image_route_when_text_masked():
    """VLMo: with every text key masked and mlp_vl / norm2_vl set to the image experts, image tokens never see text,
    so the image rows of the fusion route must equal the image route (the fusion bias's image block == image bias).
    (Not for vl-merging: its bottom layers run text self-attention alone, so an all-masked text is NaN there, as in
    the released code; its bottom-layer identity is checked with vl_layers=0 below.)"""
    layout = "vlmo"
    sd = vlmo_state_dict(layout)
    for i in range(DEPTH - VL, DEPTH):
        p = f"transformer.blocks.{i}."
        if layout == "vlmo":
            pairs = [("mlp_vl", "mlp_imag"), ("norm2_vl", "norm2_imag")]
        else:
            pairs = [(f"{m}.vl", f"{m}.v") for m in ("attn", "norm1", "mlp", "norm2")]
        for dst, src in pairs:
            for k in [k for k in sd if k.startswith(p + src + ".")]:
                sd[k.replace(p + src + ".", p + dst + ".")] = sd[k].clone()
    image, ids, _ = inputs()
    common = dict(image=image, text_ids=ids, vl_layers=VL, **GEO)
    fused = vlmo_forward(sd, layout, "fusion", text_mask=torch.zeros(B, L), **common)
    alone = vlmo_forward(sd, layout, "image", **common)
    torch.testing.assert_close(fused[:, L:], alone, atol=2e-5, rtol=1e-5)


def test_vl_merging_fusion_without_vl_layers_is_separate_routes():
    """With vl_layers=0 every layer is a bottom layer: Fig. 2's fusion is then exactly [text route; image route]."""
    sd = vlmo_state_dict("vl-merging", vl_layers=0)
    fused, text, image = (run(sd, "vl-merging", r, vl_layers=0) for r in ("fusion", "text", "image"))
    torch.testing.assert_close(fused[:, :L], text, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[:, L:], image, atol=1e-6, rtol=1e-6)
    # ...whereas VLMo's fusion shares attention over all tokens even below the VL layers
    sd = vlmo_state_dict("vlmo", vl_layers=0)
    assert (run(sd, "vlmo", "fusion", vl_layers=0)[:, L:] - run(sd, "vlmo", "image", vl_layers=0)).abs().max() > 1e-3


def test_bias_and_gamma_matter():
    sd = vlmo_state_dict("vlmo")
    base = run(sd, "vlmo", "fusion")
    for key in ("relative_position_bias_table", "token_type_embeddings.weight", "transformer.blocks.1.gamma_2",
                "transformer.blocks.3.mlp_vl.fc2.bias", "transformer.blocks.0.attn.v_bias"):
        sd2 = dict(sd)
        sd2[key] = sd[key] * 1.5
        assert (run(sd2, "vlmo", "fusion") - base).abs().max() > 1e-4, key
