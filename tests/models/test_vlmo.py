"""The VLMo family: routes, expert routing, gradients, conversions, parameter counts."""

from __future__ import annotations

import pytest
import torch

from vlmerge.models import ARCHS, VLMo, count_params, maa_to_msa, merge_groups, parse_param_name, preset_config
from vlmerge.models.commands import PAPER_TABLE7_M
from vlmerge.models.roles import MODALITIES

HEADS = ("itc", "itm", "mlm", "vqa", "cls", "seg")


def micro(arch: str, **kw) -> VLMo:
    torch.manual_seed(0)
    cfg = preset_config("micro", arch, vocab_size=50, heads=HEADS, num_answers=7, num_classes=5,
                        num_seg_classes=4, **kw)
    return VLMo(cfg).eval()


def batch(b: int = 3, size: int = 16, length: int = 9):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(4, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 5:] = 0
    return image, ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_both_routes(arch: str) -> None:
    m = micro(arch)
    image, ids, mask = batch()
    d, p = m.config.embed_dim, m.config.num_patches
    fused = m.forward_fusion(image, ids, mask)
    assert fused.shape == (3, 9 + 1 + p, d)
    img, txt = m.encode_image(image), m.encode_text(ids, mask)
    assert img.shape == txt.shape == (3, d)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    for t in (fused, img, txt, m.heads["mlm"](fused[:, :9]), m.heads["vqa"](fused[:, 0])):
        assert torch.isfinite(t).all()
    # Padded text positions do not change the real tokens' outputs.
    short = m.forward_text(ids[1:2, :5], mask[1:2, :5])
    torch.testing.assert_close(short, m.forward_text(ids, mask)[1:2, :5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_text_gradients_never_reach_vision_weights(arch: str) -> None:
    m = micro(arch).train()
    _, ids, mask = batch()
    m.encode_text(ids, mask).sum().backward()
    vision_only = [
        n for n in dict(m.named_parameters())
        if parse_param_name(n).expert in ("v", "vl") or n.startswith(("patch_embed", "cls_token", "image_pos_embed"))
        or n.startswith("heads.itc.image_proj")
    ]
    assert vision_only  # the embeddings at least
    for n, p in m.named_parameters():
        if n in vision_only:
            assert p.grad is None or not p.grad.any(), n
    # ... while language weights do learn from it.
    assert m.word_embed.weight.grad is not None and m.word_embed.weight.grad.any()


@pytest.mark.parametrize("arch", ["msa", "custom-attn", "custom-ffn", "custom-ln"])
def test_msa_with_equal_copies_equals_its_maa(arch: str) -> None:
    maa = micro("maa")
    expanded = VLMo(maa.config.replace(arch=arch)).eval()
    expanded.load_state_dict(maa_to_msa(maa.state_dict(), expanded.config))
    image, ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(expanded(image, ids, mask), maa(image, ids, mask), atol=0, rtol=0)
        torch.testing.assert_close(expanded.encode_image(image), maa.encode_image(image), atol=0, rtol=0)
        torch.testing.assert_close(expanded.encode_text(ids, mask), maa.encode_text(ids, mask), atol=0, rtol=0)
    # ... and the copies really are separate tensors that can diverge.
    groups = merge_groups(expanded.state_dict())
    assert groups
    sd = expanded.state_dict()
    for g in groups:
        values = [sd[k] for k in g.sources.values()]
        assert all(torch.equal(values[0], v) for v in values[1:])
        assert len({v.data_ptr() for v in values}) == len(values)


def test_experts_per_layer_and_param_roles() -> None:
    m = micro("msa", depth=3)  # M = 1: only block 2 has vl experts
    names = list(dict(m.named_parameters()))
    for i in range(3):
        expected = {"v", "l", "vl"} if i == 2 else {"v", "l"}
        for module in ("norm1", "attn", "norm2", "mlp"):
            assert set(getattr(m.blocks[i], module).keys()) == expected
    roles = [parse_param_name(n) for n in names]
    block = [r for r in roles if r.kind == "block"]
    assert all(r.expert in MODALITIES and r.mergeable for r in block)
    # Addressable by (layer, module, modality): unique per suffix.
    assert len({(r.layer, r.module, r.expert, r.suffix) for r in block}) == len(block)
    assert not any(r.mergeable for r in roles if r.kind == "other")
    assert m.mergeable_parameters() == [r.name for r in block]
    groups = merge_groups(names)
    assert {g.modalities for g in groups} == {("v", "l"), ("v", "l", "vl")}
    assert all(g.target.split(".")[3] == "shared" for g in groups)


@pytest.mark.parametrize("arch,specific", [("custom-attn", {"norm1", "attn"}), ("custom-ffn", {"norm2", "mlp"}),
                                           ("custom-ln", {"norm1", "norm2"}), ("maa", set())])
def test_shared_variants_only_specific_modules_are_mergeable(arch: str, specific: set[str]) -> None:
    m = micro(arch)
    modules = {parse_param_name(n).module for n in m.mergeable_parameters()}
    assert modules == specific


# Sung et al. 2023 ("An Empirical Study of Multimodal Model Merging"), Appendix A, Table 7: "Number of
# parameters for each architecture based on BEiT_base when being applied on VQA", in millions.
TABLE7_M = {"msa": 217, "custom-attn": 151, "custom-ffn": 184, "custom-ln": 118, "maa": 118}


def test_vit_base_parameter_counts_match_paper_table7() -> None:
    assert PAPER_TABLE7_M == TABLE7_M  # the constant `vlmerge model info` prints beside its counts
    for arch, ref_m in TABLE7_M.items():
        total = count_params(preset_config("vit-base", arch, heads=("vqa",)))["total_params"]
        # ours are ~2M below each entry (215.1M, 149.0M, 182.0M, 115.9M, 115.9M)
        assert abs(total / 1e6 - ref_m) / ref_m < 0.025, (arch, total)
    counts = {a: count_params(preset_config("vit-base", a, heads=("vqa",)))["total_params"] for a in ARCHS}
    assert counts["msa"] > counts["custom-ffn"] > counts["custom-attn"] > counts["custom-ln"] > counts["maa"]


def test_param_table_parts_sum_to_total_and_match_real_model() -> None:
    cfg = preset_config("micro", "custom-ffn", vocab_size=50, heads=("itc", "itm"))
    table = count_params(cfg)
    assert sum(table["parts"].values()) == table["total_params"]
    assert table["total_params"] == sum(p.numel() for p in VLMo(cfg).parameters())


@pytest.mark.parametrize(
    "field,value,match",
    [("arch", "moe", "arch='moe'.*one of"), ("num_vl_layers", 5, "num_vl_layers"), ("patch_size", 5, "patch_size"),
     ("num_heads", 3, "num_heads"), ("heads", ("itc", "bogus"), "heads")],
)
def test_bad_config_values_name_the_field(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset_config("micro", **{field: value})


def test_wrong_image_size_and_long_text_are_refused() -> None:
    m = micro("maa")
    with pytest.raises(ValueError, match="image_size"):
        m.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="max_text_len"):
        m.encode_text(torch.zeros(1, 40, dtype=torch.long))


def test_tied_init_starts_modality_copies_equal() -> None:
    tied = micro("msa")
    sd = tied.state_dict()
    for g in merge_groups(sd):
        values = [sd[k] for k in g.sources.values()]
        assert all(torch.equal(values[0], v) for v in values[1:]), g.target
    untied = VLMo(tied.config.replace(tied_init=False)).state_dict()
    assert not torch.equal(untied["blocks.0.attn.v.qkv.weight"], untied["blocks.0.attn.l.qkv.weight"])


@pytest.mark.parametrize("arch", ["msa", "custom-ffn", "maa"])
def test_routes_keep_the_fusion_routes_inputs(arch: str) -> None:
    """Pre-training computes the bottom N−M layers once: ``routes`` equals the retrieval routes, and ``fuse`` on
    its (indexed) bottom states equals ``forward_fusion`` on the indexed inputs, padding included."""
    torch.manual_seed(0)
    m = VLMo(preset_config("micro", arch, vocab_size=50, num_vl_layers=1, depth=3, heads=("itc",))).eval()
    image = torch.randn(4, 3, 16, 16)
    ids = torch.randint(4, 50, (4, 7))
    att = torch.ones(4, 7, dtype=torch.long)
    att[1, 4:] = 0
    att[3, 2:] = 0
    st = m.routes(image, ids, att)
    assert torch.allclose(st["image"], m.forward_image(image), atol=1e-6)
    assert torch.allclose(st["text"], m.forward_text(ids, att), atol=1e-6)
    ti, ii = torch.tensor([0, 1, 3, 3]), torch.tensor([2, 0, 1, 3])
    fused = m.fuse(st["text_bottom"][ti], st["image_bottom"][ii], att[ti])
    assert torch.allclose(fused, m.forward_fusion(image[ii], ids[ti], att[ti]), atol=1e-5)
    assert set(m.routes(input_ids=ids, attention_mask=att, top=False)) == {"text_bottom"}


def test_meta_model_skips_the_random_init_and_keeps_every_shape() -> None:
    """``param_shapes`` / ``meta_model`` give the state dict of ``VLMo(config)`` built on the meta device the
    plain way (every arch, with heads), and in a fresh interpreter never import ``torch._dynamo`` (a meta-device
    ``normal_`` does: ~0.85 s on the first checkpoint validation of a process)."""
    import subprocess
    import sys

    from vlmerge.models.vlmo import meta_model, param_shapes

    for arch in ARCHS:
        cfg = preset_config("tiny", arch, heads=("vqa",))
        with torch.device("meta"):
            plain = {k: (tuple(v.shape), v.dtype) for k, v in VLMo(cfg).state_dict().items()}
        model = meta_model(cfg)
        assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == plain, arch
        assert all(v.is_meta for v in model.state_dict().values())
        assert param_shapes(cfg) == {k: s for k, (s, _) in plain.items()}
    code = ("import sys\nfrom vlmerge.models import preset_config\nfrom vlmerge.models.vlmo import param_shapes\n"
            "param_shapes(preset_config('tiny', 'msa'))\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
