"""Reference BEiT-3 (torchscale's ``BEiT3``) for the importer's exactness tests.

Only tests use this module. It builds torchscale's own model, the way microsoft/unilm's ``beit3/modeling_utils.py``
(``_get_base_config``) configures it, at a tiny size, with every parameter re-drawn from a seeded generator, and runs
its three routes through the model's own ``forward``.

Provenance: torchscale 0.3.0 from PyPI (unilm pins 0.2.0; the code on BEiT3's path -- ``model/BEiT3.py``,
``architecture/encoder.py``, ``component/{embedding,multiway_network,feedforward_network,multihead_attention}.py``,
``EncoderConfig`` -- is the same in both for this config, apart from options it leaves off: xpos, MoE, incremental
decoding). Installed with ``--no-deps`` by ``scripts/_venv.sh`` (extras "test"), together with ``fairscale==0.4.0``.

Config (``EncoderConfig``, as ``_get_base_config`` sets it): ``multiway=True``, ``layernorm_embedding=False``,
``normalize_output=True``, ``no_output_layer=True``, ``drop_path_rate=0``; everything else at torchscale's defaults,
notably ``subln=True`` (hence ``encoder_normalize_before=True``, ``deepnorm=False``), ``activation_fn="gelu"`` (exact
erf GELU), ``layernorm_eps=1e-5``, ``no_scale_embedding=True`` (embed_scale 1), ``rel_pos_buckets=0`` (no relative
position bias), ``xpos_rel_pos=False``, ``bert_init=False``, ``in_chans=3``, ``share_encoder_input_output_embed=False``.

State-dict keys (``build_beit3()``: D=32, F=64, P=(16/8)**2=4 patches, V=100, max_source_positions=24; ``{i}`` runs
over ``0 .. layers-1``; ``{w}`` is ``A`` (vision expert: image tokens, incl. cls) or ``B`` (language expert: text
tokens); no buffers, no output projection, no ``layernorm_embedding``, no ``relative_position``)::

    text_embed.weight                                   [V, D]       nn.Embedding, padding_idx None
    vision_embed.mask_token                             [1, 1, D]    used only with vision_masked_position
    vision_embed.cls_token                              [1, 1, D]
    vision_embed.proj.weight                            [D, 3, p, p] Conv2d, kernel = stride = patch_size
    vision_embed.proj.bias                              [D]
    encoder.embed_positions.A.weight                    [P + 1 + 2, D]             image positions (offset 2)
    encoder.embed_positions.B.weight                    [max_source_positions, D]  text positions (offset 2)
    encoder.layers.{i}.self_attn.k_proj.{w}.weight      [D, D]
    encoder.layers.{i}.self_attn.k_proj.{w}.bias        [D]
    encoder.layers.{i}.self_attn.v_proj.{w}.weight      [D, D]
    encoder.layers.{i}.self_attn.v_proj.{w}.bias        [D]
    encoder.layers.{i}.self_attn.q_proj.{w}.weight      [D, D]
    encoder.layers.{i}.self_attn.q_proj.{w}.bias        [D]
    encoder.layers.{i}.self_attn.out_proj.{w}.weight    [D, D]
    encoder.layers.{i}.self_attn.out_proj.{w}.bias      [D]
    encoder.layers.{i}.self_attn.inner_attn_ln.{w}.weight   [D]   subln: LN on the heads' concat, before out_proj
    encoder.layers.{i}.self_attn.inner_attn_ln.{w}.bias     [D]
    encoder.layers.{i}.self_attn_layer_norm.{w}.weight  [D]          pre-attention LN
    encoder.layers.{i}.self_attn_layer_norm.{w}.bias    [D]
    encoder.layers.{i}.ffn.{w}.fc1.weight               [F, D]
    encoder.layers.{i}.ffn.{w}.fc1.bias                 [F]
    encoder.layers.{i}.ffn.{w}.fc2.weight               [D, F]
    encoder.layers.{i}.ffn.{w}.fc2.bias                 [D]
    encoder.layers.{i}.ffn.{w}.ffn_layernorm.weight     [F]          subln: LN after GELU, before fc2
    encoder.layers.{i}.ffn.{w}.ffn_layernorm.bias       [F]
    encoder.layers.{i}.final_layer_norm.{w}.weight      [D]          pre-FFN LN
    encoder.layers.{i}.final_layer_norm.{w}.bias        [D]
    encoder.layer_norm.{w}.weight                       [D]          final LN (normalize_output)
    encoder.layer_norm.{w}.bias                         [D]

That is 7 + 40 * layers + 4 keys (51 for one layer, 131 for the default three), in ``state_dict()`` order once
``{w}`` is expanded: within each multiway module A's weight and bias come before B's (``k_proj.A.weight``,
``k_proj.A.bias``, ``k_proj.B.weight``, ``k_proj.B.bias``, ...), and ``ffn`` has all of
``ffn.A.{fc1,fc2,ffn_layernorm}`` before ``ffn.B.*``.
``vision_embed.mask_token`` and ``text_embed`` are not used by the image-only route.

Forward facts an importer has to match (read off torchscale's code):

* Positions start at 2 (fairseq's convention): with no ``positions`` argument, each expert's table is indexed with
  ``arange(2, n + 2)`` over *its own* part of the sequence. Image tokens (cls first, then patches row-major, as
  ``proj(x).flatten(2).transpose(1, 2)``) use rows ``2 .. P+2`` of ``embed_positions.A``; text tokens use rows
  ``2 .. L+1`` of ``embed_positions.B`` -- also when they follow the image in the "vl" route (so
  L <= max_source_positions - 2). Rows 0 and 1 of both tables are never read. Padding does not shift positions.
* After adding positions the encoder multiplies the embeddings by ``1 - padding_mask`` (padded tokens become 0 vectors)
  and masks padded keys with -inf in every layer. Outputs at padded positions are therefore defined (they are not
  masked as queries), but only an importer that zeroes padded inputs the same way will reproduce them; compare
  non-padded positions if yours does not. A row that is all padding gives NaN.
* Each layer (pre-LN, subln): ``x = x + out_proj(inner_attn_ln(attn(self_attn_layer_norm(x))))``, then
  ``x = x + fc2(ffn_layernorm(gelu(fc1(final_layer_norm(x)))))``; attention scales q (after its bias) by head_dim**-0.5;
  heads split D as [heads, head_dim]. Then ``encoder.layer_norm``. Every LN/Linear goes through the multiway split:
  A on tokens ``[:split]``, B on ``[split:]``, where split = -1 (all A) for image-only, 0 (all B) for text-only and
  1 + P for image+text.
* At build time torchscale multiplies fc1, fc2, out_proj and v_proj (weights and biases) by sqrt(log(2 * layers))
  (subln init). That is irrelevant here: ``build_beit3`` re-draws every parameter afterwards.
"""

from __future__ import annotations

import importlib
import math
import sys
import types

import torch
from torch import nn

__all__ = ["beit3_routes", "build_beit3", "torchscale_available"]


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
               scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth per sample: zero the whole residual branch of a sample with probability ``drop_prob`` (in
    training only), scaling kept samples by 1 / (1 - drop_prob) so the expectation is unchanged."""
    if not training or not drop_prob:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        mask = mask / keep
    return x * mask


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def _install_timm_stand_in() -> None:
    """torchscale's ``component/droppath.py`` does ``from timm.models.layers import drop_path``. Real timm imports
    torchvision, which does not import in this venv (and is not installed), so before torchscale is imported we put a
    stand-in ``timm.models.layers`` holding only ``drop_path`` / ``DropPath`` into ``sys.modules``. Our models never
    use drop path (``drop_path_rate=0``: torchscale builds no DropPath at all), and at eval it is the identity anyway.
    A module already registered under that name (real timm, or this stand-in) is left alone; real timm is never
    imported by this function."""
    if "timm.models.layers" in sys.modules:
        return
    layers = types.ModuleType("timm.models.layers")
    layers.__doc__ = "vlmerge test stand-in for timm.models.layers (drop_path / DropPath only)"
    layers.drop_path = _drop_path  # type: ignore[attr-defined]
    layers.DropPath = _DropPath  # type: ignore[attr-defined]
    timm = sys.modules.get("timm")
    if timm is None:
        timm = types.ModuleType("timm")
        timm.__path__ = []  # type: ignore[attr-defined]  # a package, so submodule imports resolve via sys.modules
        sys.modules["timm"] = timm
    models = sys.modules.get("timm.models")
    if models is None:
        models = types.ModuleType("timm.models")
        models.__path__ = []  # type: ignore[attr-defined]
        sys.modules["timm.models"] = models
        timm.models = models  # type: ignore[attr-defined]
    models.layers = layers  # type: ignore[attr-defined]
    sys.modules["timm.models.layers"] = layers


def torchscale_available() -> str | None:
    """None when torchscale's BEiT3 imports (with the timm stand-in), else why not (for ``pytest.skip``)."""
    _install_timm_stand_in()
    try:
        importlib.import_module("torchscale.model.BEiT3")
        importlib.import_module("torchscale.architecture.config")
    except Exception as e:  # ImportError, or anything a broken install raises at import
        return f"torchscale BEiT3 reference unavailable ({type(e).__name__}: {e}); " \
               "scripts/_venv.sh installs torchscale==0.3.0 fairscale==0.4.0 with extras 'test'"
    return None


def _redraw(model: nn.Module, gen: torch.Generator) -> None:
    """Every parameter re-drawn, in ``named_parameters`` order: LayerNorm weights 1 + N(0, 0.3), LayerNorm and Linear /
    Conv biases N(0, 0.1), Linear / Conv weights N(0, 1 / fan_in), embedding tables, cls and mask tokens N(0, 0.5).
    Independent draws, so every A copy differs from its B copy."""
    owner = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    with torch.no_grad():
        for name, p in model.named_parameters():
            mod, leaf = owner[name], name.rsplit(".", 1)[-1]
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if isinstance(mod, nn.LayerNorm):
                v = 1.0 + 0.3 * z if leaf == "weight" else 0.1 * z
            elif isinstance(mod, (nn.Linear, nn.Conv2d)):
                v = z / math.sqrt(p[0].numel()) if leaf == "weight" else 0.1 * z
            else:  # nn.Embedding tables (text_embed, embed_positions.A / .B), vision_embed.cls_token / .mask_token
                v = 0.5 * z
            p.copy_(v)


def build_beit3(*, embed_dim: int = 32, heads: int = 4, layers: int = 3, ffn_dim: int = 64, img_size: int = 16,
                patch_size: int = 8, vocab_size: int = 100, max_source_positions: int = 24,
                seed: int = 0) -> nn.Module:
    """torchscale ``BEiT3`` configured as unilm's ``_get_base_config`` does (see the module docstring), at this size,
    every parameter re-drawn from ``torch.Generator().manual_seed(seed)``; float32, eval mode. The caller's global RNG
    state is left as it was. Raises ImportError when ``torchscale_available()`` is not None."""
    reason = torchscale_available()
    if reason is not None:
        raise ImportError(reason)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    cfg = EncoderConfig(
        img_size=img_size, patch_size=patch_size, vocab_size=vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=True, no_output_layer=True, drop_path_rate=0.0,
        encoder_embed_dim=embed_dim, encoder_attention_heads=heads, encoder_ffn_embed_dim=ffn_dim,
        encoder_layers=layers, checkpoint_activations=False, max_source_positions=max_source_positions,
    )
    with torch.random.fork_rng(devices=[]):  # torchscale's own init draws from the global RNG; keep the caller's
        model = BEiT3(cfg)
    _redraw(model, torch.Generator().manual_seed(seed))
    return model.float().eval()


def beit3_routes(model: nn.Module, image: torch.Tensor, text_ids: torch.Tensor,
                 text_padding: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The three routes through ``model``'s own forward, each its ``encoder_out`` (after the final layer norm):

    * ``"vision"``: image only, [B, 1 + P, D] (cls, then patches);
    * ``"text"``: text only, [B, L, D], ``text_padding_position=text_padding``;
    * ``"vl"``: image and text together, [B, 1 + P + L, D], image tokens first (BEiT3's order).

    ``image`` is float [B, 3, img_size, img_size]; ``text_ids`` long [B, L]; ``text_padding`` bool [B, L], True =
    padding (or None: no padding). Autograd follows the caller's mode (wrap in ``torch.no_grad()`` if wanted)."""
    if text_padding is not None:
        text_padding = text_padding.to(torch.bool)
    vision = model(textual_tokens=None, visual_tokens=image)["encoder_out"]
    text = model(textual_tokens=text_ids, visual_tokens=None, text_padding_position=text_padding)["encoder_out"]
    vl = model(textual_tokens=text_ids, visual_tokens=image, text_padding_position=text_padding)["encoder_out"]
    return {"vision": vision, "text": text, "vl": vl}
