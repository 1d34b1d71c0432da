"""The role map names every parameter of every architecture, and the policies built on it (stage freezing,
weight decay, fine-tuning scopes, lr layer ids) are the ones the papers specify, written here as explicit
name lists (the oracle), independent of the role map."""

from __future__ import annotations

import pytest
import torch

from vlmerge.finetune.engine import layer_id
from vlmerge.finetune.model import is_vision_encoder
from vlmerge.models import ARCHS, VLMo, preset_config
from vlmerge.models.roles import parse_param_name
from vlmerge.pretrain.optim import decays
from vlmerge.pretrain.recipes import is_trainable

HEADS = ("itc", "itm", "mlm", "mim", "vqa", "cls", "seg")
VISION = ("patch_embed.", "cls_token", "image_pos_embed")
TEXT = ("word_embed.", "text_pos_embed.", "text_embed_norm.")


def model(arch: str) -> VLMo:
    with torch.device("meta"):
        return VLMo(preset_config("micro", arch, heads=HEADS, num_classes=3, num_seg_classes=4,
                                  text_embed_norm=True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_parameter_has_a_role(arch: str) -> None:
    for name, _ in model(arch).named_parameters():
        role = parse_param_name(name)
        assert role.kind in ("block", "embed", "final_norm", "head"), name
        if role.kind == "head":
            assert name.startswith(f"heads.{role.head}.") and role.head in HEADS
        if role.kind == "embed":
            want = "v" if name.startswith(VISION) else "l" if name.startswith(TEXT) else "shared"
            assert role.expert == want, name


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_policies_match_their_specification(arch: str) -> None:
    m = model(arch)
    depth = m.config.depth
    for name, p in m.named_parameters():
        role = parse_param_name(name)
        block = role.kind == "block"
        # VLMo §3.4 stagewise: image stage trains the vision route (+ final norm, type table, MIM head)
        image = (role.expert in ("v", "shared")) if block else name.startswith(
            (*VISION, "type_embed.", "norm.", "heads.mim."))
        text = (role.expert == "l" and role.module in ("norm2", "mlp")) if block else name.startswith(
            (*TEXT, "heads.mlm."))
        assert is_trainable("image", name) == image, name
        assert is_trainable("text", name) == text, name
        assert is_trainable("vl", name) == (not name.startswith("heads.mim.")), name
        # BEiT's no_weight_decay: embedding tables, positions and [CLS]; ≥ 2-D weights otherwise decay
        no_decay = name.startswith(("word_embed", "text_pos_embed", "type_embed", "image_pos_embed", "cls_token"))
        assert decays(name, p) == (p.ndim >= 2 and not no_decay and not name.endswith("logit_scale")), name
        # fine-tuning's vision scope: vision embeddings and v / shared block experts, not the final norm
        assert is_vision_encoder(name) == (name.startswith(VISION) or (block and role.expert in ("v", "shared")))
        embed = name.startswith((*VISION, *TEXT, "type_embed"))
        assert layer_id(name, depth) == (role.layer + 1 if block else 0 if embed else depth + 1), name
