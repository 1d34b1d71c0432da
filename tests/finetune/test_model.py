"""Task-model building (strict except new heads, resolution change), scopes, optimizer groups, the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmerge.finetune.engine import layer_id, param_groups, steps_for, train
from vlmerge.finetune.model import (
    build_task_model,
    is_vision_encoder,
    resize_image_pos_embed,
    resolve_scope,
    trainable_names,
)
from vlmerge.models import CheckpointError, VLMo, parse_param_name, preset_config, save_model
from vlmerge.models.checkpoint import save_checkpoint


def micro(arch: str = "msa", **kw) -> VLMo:
    torch.manual_seed(0)
    return VLMo(preset_config("micro", arch, vocab_size=30, heads=("itc", "itm"), **kw))


def test_new_head_added_backbone_loaded_exactly(tmp_path: Path) -> None:
    base = micro()
    save_model(base, tmp_path / "pt")
    model = build_task_model(tmp_path / "pt", ("vqa",), num_answers=7)
    assert model.config.heads == ("itc", "itm", "vqa") and model.config.num_answers == 7
    sd, ref = model.state_dict(), base.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["heads.vqa.fc2.weight"].shape == (7, 2 * base.config.embed_dim)


def test_loading_rejects_anything_but_missing_new_heads(tmp_path: Path) -> None:
    sd = micro().state_dict()
    cfg = {"model": micro().config.to_dict()}
    broken = {k: v for k, v in sd.items() if k != "blocks.0.attn.v.qkv.weight"}
    save_checkpoint(tmp_path / "missing", broken, cfg)
    with pytest.raises(CheckpointError, match=r"missing non-head keys \(1\): blocks.0.attn.v.qkv.weight"):
        build_task_model(tmp_path / "missing", ("vqa",), num_answers=3)
    save_checkpoint(tmp_path / "extra", {**sd, "junk.weight": torch.zeros(2)}, cfg)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): junk.weight"):
        build_task_model(tmp_path / "extra", ("vqa",), num_answers=3)
    save_checkpoint(tmp_path / "shape", {**sd, "norm.weight": torch.ones(5)}, cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): norm.weight"):
        build_task_model(tmp_path / "shape", ("vqa",), num_answers=3)
    # A head the checkpoint has must keep its size: no silent re-initialisation.
    with_head = VLMo(micro().config.replace(heads=("itc", "cls"), num_classes=4))
    save_model(with_head, tmp_path / "cls4")
    with pytest.raises(CheckpointError, match=r"'cls' head has num_classes=4, the task data needs 9"):
        build_task_model(tmp_path / "cls4", ("cls",), num_classes=9)


def test_higher_resolution_resizes_the_position_table(tmp_path: Path) -> None:
    base = micro()  # 16 px, 8-px patches: a 2 x 2 grid
    model = build_task_model(base, ("cls",), image_size=32, num_classes=3)
    assert model.config.image_size == 32 and model.image_pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(model.image_pos_embed[:, 0], base.image_pos_embed[:, 0])  # [I_CLS] row kept
    model.heads["cls"](model.forward_image(torch.randn(2, 3, 32, 32))[:, 0])
    # A constant grid stays constant; the identity size is a no-op.
    const = torch.cat([torch.zeros(1, 1, 4), torch.ones(1, 4, 4)], dim=1)
    torch.testing.assert_close(resize_image_pos_embed(const, 16)[:, 1:], torch.ones(1, 16, 4))
    assert resize_image_pos_embed(const, 4) is const
    with pytest.raises(ValueError, match="square grids"):
        resize_image_pos_embed(const, 6)


@pytest.mark.parametrize("arch", ["msa", "custom-ffn", "maa"])
def test_scopes(arch: str) -> None:
    model = build_task_model(micro(arch), ("cls",), num_classes=3)
    assert resolve_scope("auto", True, model) == ("all" if arch == "maa" else "vision")
    assert resolve_scope("auto", False, model) == "all"
    vision = trainable_names(model, "vision", ("cls",))
    assert all(is_vision_encoder(n) or n.startswith("heads.cls.") for n in vision)
    assert not any(parse_param_name(n).expert in ("l", "vl") for n in vision)
    assert not any(n.startswith(("word_embed", "norm.", "type_embed", "heads.itc", "heads.itm")) for n in vision)
    everything = trainable_names(model, "all", ("cls",))
    assert vision < everything and not any(n.startswith("heads.itm") for n in everything)
    with pytest.raises(ValueError, match="allowed values"):
        trainable_names(model, "text", ("cls",))


def test_param_groups_layer_decay_head_mult_and_no_decay() -> None:
    model = build_task_model(micro(), ("cls",), num_classes=3)
    names = trainable_names(model, "all", ("cls",))
    groups = param_groups(model, names, weight_decay=0.05, head_lr_mult=10, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    depth = model.config.depth
    assert layer_id("patch_embed.proj.weight", depth) == 0 and layer_id("blocks.1.mlp.v.fc1.weight", depth) == 2
    assert scale["patch_embed.proj.weight"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.v.qkv.weight"] == 0.5**depth
    assert scale["heads.cls.1.weight"] == 10 and scale["norm.weight"] == 1
    assert wd["blocks.0.attn.v.qkv.weight"] == 0.05 and wd["blocks.0.attn.v.qkv.bias"] == 0.0
    assert wd["image_pos_embed"] == 0.0 and wd["word_embed.weight"] == 0.0 and wd["heads.cls.1.weight"] == 0.05
    assert sorted(scale) == sorted(names)


def test_loop_schedule_and_unreached_freezing() -> None:
    model = build_task_model(micro(), ("cls",), num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 0])}

    def loss_fn(m: VLMo, b: dict) -> dict:
        return {"loss": torch.nn.functional.cross_entropy(m.heads["cls"](m.forward_image(b["image"])[:, 0]),
                                                          b["label"])}

    res = train(model, loss_fn, [batch], trainable_names(model, "all", ("cls",)), steps=4, lr=1e-2, warmup=0.5,
                weight_decay=0.1, log_every=1)
    assert res.steps == 4 and [h["step"] for h in res.history] == [1, 2, 3, 4]
    assert res.history[0]["lr"] == pytest.approx(5e-3) and res.history[1]["lr"] == pytest.approx(1e-2)
    assert res.history[-1]["lr"] == pytest.approx(0.0)
    after = model.state_dict()
    # The language route and the VL experts are not reached by a vision loss: frozen, weight decay or not.
    for k in res.frozen_unreached:
        assert torch.equal(before[k], after[k]), k
    assert any(parse_param_name(k).expert == "l" for k in res.frozen_unreached)
    assert not torch.equal(before["heads.cls.1.weight"], after["heads.cls.1.weight"])
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert steps_for(2.5, 10, None) == 25 and steps_for(2.5, 10, 7) == 7
    with pytest.raises(ValueError, match="yields no batches"):
        train(model, loss_fn, [], trainable_names(model, "all", ("cls",)), steps=1, lr=1e-3)
