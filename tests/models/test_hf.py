"""Our blocks against Hugging Face's: real MiniLM weights into the language route, a random ViT into vision."""

from __future__ import annotations

import pytest
import torch

from vlmerge.models import VLMo
from vlmerge.models.checkpoint import CheckpointError
from vlmerge.models.hf import (
    bert_model_config,
    from_hf_bert,
    load_bert_weights,
    load_vit_weights,
    minilm_dir,
    read_hf_dir,
    vit_model_config,
)

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")


@pytest.mark.parametrize("arch,experts", [("maa", ("l",)), ("msa", ("l",)), ("custom-ffn", ("l", "v", "vl"))])
def test_real_minilm_language_route_equals_hf_bert(arch: str, experts: tuple[str, ...]) -> None:
    path = minilm_dir()
    ours = from_hf_bert(path, arch=arch, experts=experts, num_vl_layers=2).eval()
    theirs = transformers.BertModel.from_pretrained(str(path)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 16), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours.forward_text(ids, mask)
    real = mask.bool()
    assert ref.abs().max() > 0.5  # real weights, non-trivial activations
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=0)


def _tiny_vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    return cfg, transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def _classic_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 in-memory ViT keys -> the classic layout saved hub checkpoints use."""
    ren = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
           ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
           ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
           ("mlp.fc2", "output.dense")]
    out = {}
    for k, v in sd.items():
        for a, b in ren:
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["as-is", "classic"])
@pytest.mark.parametrize("arch", ["maa", "msa", "custom-attn"])
def test_random_hf_vit_vision_route_equals_hf(arch: str, layout: str) -> None:
    cfg, vit = _tiny_vit()
    sd = vit.state_dict()
    if layout == "classic":
        sd = _classic_keys(sd) if "layers.0.mlp.fc1.weight" in sd else sd
    ours = VLMo(vit_model_config(cfg.to_dict(), arch=arch, num_vl_layers=1)).eval()
    load_vit_weights(ours, sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_image(x), vit(pixel_values=x).last_hidden_state, atol=1e-5, rtol=0)


def test_importer_errors() -> None:
    cfg, vit = _tiny_vit()
    ours = VLMo(vit_model_config(cfg.to_dict(), depth=2, num_vl_layers=0))
    sd = vit.state_dict()
    with pytest.raises(CheckpointError, match="missing key 'layernorm.weight'"):
        load_vit_weights(ours, {k: v for k, v in sd.items() if k != "layernorm.weight"}, source="vit.safetensors")
    wide = VLMo(vit_model_config({**cfg.to_dict(), "hidden_size": 32, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight expects shape \[32, 3, 8, 8\]"):
        load_vit_weights(wide, sd)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        bert_model_config({**read_hf_dir(minilm_dir())[0], "hidden_act": "relu"})
    with pytest.raises(ValueError, match="post-LN"):
        load_bert_weights(ours, {})
