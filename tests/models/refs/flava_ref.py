"""Reference FLAVA (Hugging Face ``transformers``' ``FlavaModel``) for the importer's exactness tests.

Only tests use this module. It builds ``transformers``' own ``FlavaModel`` at a tiny size, re-draws every parameter
from a seeded generator (so that LayerNorms are not 1, biases not 0 and the image and text encoders differ), and
runs its three routes through the model's own ``forward``. ``transformers`` is a test extra (``scripts/_venv.sh
test``); FLAVA's modelling code needs neither torchvision nor timm.

Routes (``FlavaModel.forward`` with ``pixel_values``, ``input_ids`` and ``attention_mask``):

* ``image``: ``image_embeddings`` [B, 1 + P, D], the image encoder's states after its final LayerNorm.
* ``text``: ``text_embeddings`` [B, L, D], the same for the text encoder.
* ``fusion``: ``multimodal_embeddings`` [B, 1 + (1 + P) + L, D]: the multimodal [CLS] first, then the image and text
  encoders' last states *before* their final LayerNorms, each through its ``*_to_mm_projection``.
* ``image_feat`` / ``text_feat``: ``image_projection`` / ``text_projection`` of the [CLS] states, L2-normalised (the
  contrastive embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def transformers_flava_available() -> str | None:
    """None when ``transformers``' FLAVA imports, else why not (the skip reason)."""
    try:
        from transformers import FlavaConfig, FlavaModel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a skip reason
        return f"transformers' FlavaModel does not import: {type(e).__name__}: {e}"
    return None


def flava_config(dim: int = 32, layers: int = 2, mm_layers: int = 2, heads: int = 4, ffn: int = 64,
                 image_size: int = 16, patch_size: int = 8, vocab_size: int = 100, max_positions: int = 24,
                 proj_dim: int = 24, **changes: Any):
    """A tiny ``FlavaConfig``; ``changes`` go into every sub-config (e.g. ``hidden_act``)."""
    from transformers import FlavaConfig

    common = dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **changes)
    return FlavaConfig(
        image_config=dict(common, image_size=image_size, patch_size=patch_size),
        text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=max_positions),
        multimodal_config=dict(common, num_hidden_layers=mm_layers),
        hidden_size=dim, projection_dim=proj_dim,
    )


def build_flava(seed: int = 0, **sizes: Any):
    """``FlavaModel(flava_config(**sizes))`` in eval mode, every parameter drawn from N(0, 0.3²) (LayerNorm weights
    around 1, ``logit_scale`` kept at its initial value) from a generator seeded with ``seed``."""
    from transformers import FlavaModel

    torch.manual_seed(seed)
    model = FlavaModel(flava_config(**sizes)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if "layernorm" in name.lower() and name.endswith("weight") else noise)
    return model


def flava_routes(model, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's outputs (see the module docstring); ``mask`` [B, L] is 1 for a token, 0 for padding."""
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=image, attention_mask=mask)
        image_feat = F.normalize(model.image_projection(out.image_embeddings[:, 0]), dim=-1)
        text_feat = F.normalize(model.text_projection(out.text_embeddings[:, 0]), dim=-1)
    return {"image": out.image_embeddings, "text": out.text_embeddings, "fusion": out.multimodal_embeddings,
            "image_feat": image_feat, "text_feat": text_feat}
