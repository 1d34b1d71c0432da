"""Imports of VLMo / vl-merging / BEiT-3 / FLAVA checkpoints are exact, exports load back into the source's code.

Oracles, never vlmerge's own modules: for VLMo and vl-merging, a forward written in the test from the papers'
equations and the released code (``refs/vlmo_ref.py``, checked there against the released modules); for
BEiT-3, torchscale's own ``BEiT3`` (``refs/beit3_ref.py``); for FLAVA, ``transformers``' own ``FlavaModel``
(``refs/flava_ref.py``). The last two skip with the reason when their package is not installed
(``scripts/test.sh`` installs both).
"""

from __future__ import annotations

import json

import pytest
import torch
from refs.beit3_ref import beit3_routes, build_beit3, torchscale_available
from refs.flava_ref import build_flava, flava_routes, transformers_flava_available
from refs.vlmo_ref import vlmo_forward, vlmo_state_dict

from vlmerge.merge import merge_checkpoint
from vlmerge.models import VLMo, load_model, save_model
from vlmerge.models.convert import LAYOUTS, export_state_dict, import_state_dict

B, L, IMG, P, SPAN, DEPTH, HEADS = 2, 12, 16, 8, 16, 4, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed: int = 1, vocab: int = 100, length: int = L):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, IMG, IMG, generator=g)
    ids = torch.randint(0, vocab, (B, length), generator=g)
    mask = torch.ones(B, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # the second caption is padded
    return image, ids, mask


def _valid(x: torch.Tensor, mask: torch.Tensor, text_first: bool = True) -> torch.Tensor:
    """The hidden states of non-padded tokens only (a padded token's own state is not part of any result)."""
    n_txt = mask.shape[1]
    keep = torch.cat([mask.bool(), torch.ones(mask.shape[0], x.shape[1] - n_txt, dtype=torch.bool)], dim=1) \
        if text_first else torch.cat([torch.ones(mask.shape[0], x.shape[1] - n_txt, dtype=torch.bool),
                                      mask.bool()], dim=1)
    return x[keep]


def _same(route: str, ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal to 1e-5 on every token (image route) or on every non-padded one (text and fusion routes)."""
    assert ours.shape == ref.shape
    if route == "image":
        torch.testing.assert_close(ours, ref, **TOL)
    else:
        torch.testing.assert_close(_valid(ours, mask), _valid(ref, mask), **TOL)


def _vlmo_model(layout: str, seed: int = 0, vl_layers: int = 2):
    sd = vlmo_state_dict(layout, dim=32, depth=DEPTH, heads=HEADS, vl_layers=vl_layers, image_size=IMG,
                         patch_size=P, max_text_len=L, max_text_len_of_initckpt=SPAN, seed=seed)
    conv = import_state_dict(layout, sd, "ref", image_size=IMG)
    model = VLMo(conv.config).eval()
    model.load_state_dict(conv.state_dict)
    return sd, conv, model


def _merged(model: VLMo, tmp_path) -> VLMo:
    """``vlmerge merge --method average`` on the imported model, through the checkpoint files."""
    save_model(model, tmp_path / "in")
    merge_checkpoint("average", tmp_path / "in", tmp_path / "out")
    merged = load_model(tmp_path / "out").eval()
    assert merged.config.arch == "maa" and merged.config.fusion == model.config.fusion
    return merged


def _vlmo_ref(sd, layout, route, image, ids, mask, vl_layers=2):
    return vlmo_forward(sd, layout, route, image=image, text_ids=ids, text_mask=mask, heads=HEADS, depth=DEPTH,
                        vl_layers=vl_layers, image_size=IMG, patch_size=P, max_text_len_of_initckpt=SPAN)


def _vlmo_routes(model: VLMo, image, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"image": model.forward_image(image), "text": model.forward_text(ids, mask),
                "fusion": model.forward_fusion(image, ids, mask)}


@pytest.mark.parametrize("layout", ["vlmo", "vl-merging"])
@pytest.mark.parametrize("seed", [0, 3])
def test_vlmo_family_import_is_exact_on_every_route(layout: str, seed: int) -> None:
    sd, conv, model = _vlmo_model(layout, seed)
    assert conv.config.arch == ("custom-ffn" if layout == "vlmo" else "msa")
    assert conv.config.fusion == ("early" if layout == "vlmo" else "late")
    image, ids, mask = _inputs(seed + 1)
    ours = _vlmo_routes(model, image, ids, mask)
    for route in ("image", "text", "fusion"):
        _same(route, ours[route], _vlmo_ref(sd, layout, route, image, ids, mask), mask)


def test_vlmo_import_keeps_every_key_and_lists_what_has_no_slot() -> None:
    sd, conv, _ = _vlmo_model("vl-merging")
    used = set(sd) - set(conv.kept)
    assert len(used) > 100 and set(conv.kept) == set(conv.notes)
    report = conv.report()["kept_aside"]
    heads = report["a head without a vlmerge slot"]
    assert any(k.startswith("mlm_score.") for k in heads) and "logit_vl_scale" in heads
    assert "transformer.mask_token" in conv.notes and "text_embeddings.position_ids" in conv.notes
    # the ITC head is mapped (vl-merging calls it ifm_*), so it is not kept aside
    assert "ifm_image_proj.fc.weight" not in conv.kept
    # an unknown key is kept and said to be unknown, never dropped
    extra = dict(sd, **{"my_adapter.weight": torch.ones(3)})
    conv2 = import_state_dict("vl-merging", extra, "ref", image_size=IMG)
    assert conv2.notes["my_adapter.weight"] == "unknown to the importer"
    assert torch.equal(conv2.kept["my_adapter.weight"], torch.ones(3))


@pytest.mark.parametrize("layout", ["vlmo", "vl-merging"])
def test_vlmo_family_export_round_trips_and_a_merged_model_loads_in_the_source_layout(layout: str, tmp_path) -> None:
    sd, conv, model = _vlmo_model(layout, seed=5)
    image, ids, mask = _inputs(7)
    back = export_state_dict(layout, model, kept=conv.kept)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
    for route in ("image", "text", "fusion"):  # the exported file is the same function as the source
        _same(route, _vlmo_ref(back, layout, route, image, ids, mask), _vlmo_ref(sd, layout, route, image, ids, mask),
              mask)
    # merge (average the experts), export: the source's code runs the merged model and agrees with ours
    merged = _merged(model, tmp_path)
    out = export_state_dict(layout, merged, kept=conv.kept, source_arch=conv.config.arch)
    assert set(out) == set(sd)
    ours = _vlmo_routes(merged, image, ids, mask)
    for route in ("image", "text", "fusion"):
        _same(route, ours[route], _vlmo_ref(out, layout, route, image, ids, mask), mask)
    if layout == "vlmo":  # one FFN for every modality: the expert copies are equal
        assert torch.equal(out["transformer.blocks.0.mlp_text.fc1.weight"],
                           out["transformer.blocks.0.mlp_imag.fc1.weight"])


def test_export_refuses_experts_the_target_layout_cannot_hold() -> None:
    _, conv, model = _vlmo_model("vl-merging")
    with pytest.raises(ValueError, match="differ, and the target layout has one tensor"):
        export_state_dict("vlmo", model, kept=conv.kept)  # VLMo shares attention; this model's is per modality


def test_unknown_layout_and_wrong_source_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        import_state_dict("clip", {})
    with pytest.raises(ValueError, match="not a BEiT-3"):
        import_state_dict("beit3", vlmo_state_dict("vlmo"))
    assert sorted(LAYOUTS) == ["beit3", "flava", "vl-merging", "vlmo"]


# ---------------------------------------------------------------------------------------------------- BEiT-3
needs_torchscale = pytest.mark.skipif(torchscale_available() is not None,
                                      reason=f"BEiT-3 reference: {torchscale_available()}")


def _beit3(seed: int = 0, layers: int = 3):
    ref = build_beit3(embed_dim=32, heads=HEADS, layers=layers, ffn_dim=64, img_size=IMG, patch_size=P,
                      vocab_size=100, max_source_positions=24, seed=seed)
    conv = import_state_dict("beit3", ref.state_dict(), "beit3", num_heads=HEADS)
    model = VLMo(conv.config).eval()
    model.load_state_dict(conv.state_dict)
    return ref, conv, model


def _beit3_check(ref, model, seed: int) -> None:
    image, ids, mask = _inputs(seed)
    want = beit3_routes(ref, image, ids, ~mask.bool())
    ours = _vlmo_routes(model, image, ids, mask)
    torch.testing.assert_close(ours["image"], want["vision"], **TOL)
    torch.testing.assert_close(_valid(ours["text"], mask), _valid(want["text"], mask), **TOL)
    n_img = want["vision"].shape[1]  # BEiT-3 orders [image; text], vlmerge [text; image]
    fused = torch.cat([ours["fusion"][:, L:], ours["fusion"][:, :L]], dim=1)
    assert fused.shape[1] == n_img + L
    torch.testing.assert_close(_valid(fused, mask, text_first=False), _valid(want["vl"], mask, text_first=False),
                               **TOL)


@needs_torchscale
@pytest.mark.parametrize("seed", [0, 2])
def test_beit3_import_matches_torchscale_on_every_route(seed: int) -> None:
    ref, conv, model = _beit3(seed)
    assert (conv.config.arch, conv.config.fusion, conv.config.num_vl_layers) == ("msa", "early", 0)
    assert conv.config.subln and conv.config.modality_final_norm
    assert "vision_embed.mask_token" in conv.kept
    _beit3_check(ref, model, seed + 10)


@needs_torchscale
def test_beit3_merged_export_loads_into_torchscale_with_a_equal_to_b(tmp_path) -> None:
    ref, conv, model = _beit3(seed=4)
    back = export_state_dict("beit3", model, kept=conv.kept)
    ref.load_state_dict(back, strict=True)  # unmerged round trip: torchscale loads it unchanged
    merged = _merged(model, tmp_path)
    out = export_state_dict("beit3", merged, kept=conv.kept)
    target = build_beit3(embed_dim=32, heads=HEADS, layers=3, ffn_dim=64, img_size=IMG, patch_size=P,
                         vocab_size=100, max_source_positions=24, seed=99)
    target.load_state_dict(out, strict=True)
    for k in out:
        if ".A." in k:
            assert torch.equal(out[k], out[k.replace(".A.", ".B.")]) or k.startswith(("encoder.embed_positions",
                                                                                     "encoder.layer_norm")), k
    _beit3_check(target, merged, seed=11)


# ------------------------------------------------------------------------------------------------------- CLI
@needs_torchscale
def test_cli_beit3_in_distance_merge_and_out(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    from vlmerge.cli import main

    ref = build_beit3(embed_dim=32, heads=HEADS, layers=3, ffn_dim=64, img_size=IMG, patch_size=P, vocab_size=100,
                      max_source_positions=24, seed=6)
    src = tmp_path / "beit3.pt"
    torch.save({"model": ref.state_dict()}, src)  # unilm's checkpoints wrap the weights in "model"
    before = src.read_bytes()
    assert main(["convert", "--from", "beit3", str(src), str(tmp_path / "vlm"), "--num-heads", str(HEADS)]) == 0
    out = capsys.readouterr().out
    assert "arch msa" in out and "vision_embed.mask_token" in out
    assert (tmp_path / "vlm" / "source_extras.safetensors").is_file()
    assert main(["distance", str(tmp_path / "vlm"), "--json"]) == 0
    assert main(["merge", str(tmp_path / "vlm"), str(tmp_path / "merged"), "--method", "interpolation",
                 "--alpha", "0.5"]) == 0
    assert main(["convert", "--to", "beit3", str(tmp_path / "merged"), str(tmp_path / "back"),
                 "--extras", str(tmp_path / "vlm" / "source_extras.safetensors")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert torch.equal(back["vision_embed.mask_token"], ref.state_dict()["vision_embed.mask_token"])
    target = build_beit3(embed_dim=32, heads=HEADS, layers=3, ffn_dim=64, img_size=IMG, patch_size=P,
                         vocab_size=100, max_source_positions=24, seed=1)
    target.load_state_dict(back, strict=True)
    _beit3_check(target, load_model(tmp_path / "merged").eval(), seed=3)
    capsys.readouterr()
    # an existing output is refused before anything is read or written; the input is never touched
    assert main(["convert", "--from", "beit3", str(src), str(tmp_path / "vlm"), "--num-heads", str(HEADS)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_cli_refuses_a_pickle_that_needs_full_unpickling(tmp_path, capsys) -> None:
    import pickle

    from vlmerge.cli import main

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    bad = tmp_path / "vlmo.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    assert main(["convert", "--from", "vlmo", str(bad), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "ran code" not in captured.out
    assert not (tmp_path / "out").exists()


def test_cli_vlmo_lightning_checkpoint(tmp_path, capsys) -> None:
    from vlmerge.cli import main

    sd = vlmo_state_dict("vlmo", dim=32, depth=DEPTH, heads=HEADS, vl_layers=2, image_size=IMG, patch_size=P,
                         max_text_len=L, max_text_len_of_initckpt=SPAN, seed=2)
    torch.save({"epoch": 3, "global_step": 100, "state_dict": sd}, tmp_path / "vlmo.ckpt")
    assert main(["convert", "--from", "vlmo", str(tmp_path / "vlmo.ckpt"), str(tmp_path / "vlm"),
                 "--image-size", str(IMG)]) == 0
    model = load_model(tmp_path / "vlm").eval()
    image, ids, mask = _inputs(4)
    _same("fusion", _vlmo_routes(model, image, ids, mask)["fusion"],
          _vlmo_ref(sd, "vlmo", "fusion", image, ids, mask), mask)


def test_readme_beit3_example_runs_and_prints_what_the_readme_says(tmp_path, monkeypatch, capsys) -> None:
    import os
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- readme-example: beit3 -->\n```python\n(.*?)```", readme, re.S).group(1)
    claimed = re.findall(r"`(beit3-(?:vlm|merged): [\d,]+ parameters,\s+[\d,]+ in modality experts)`", readme)
    assert len(claimed) == 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the vlmerge CLI
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    for line in claimed:
        assert " ".join(line.split()) in printed
    if torchscale_available() is None:
        from safetensors.torch import load_file

        out = load_file(tmp_path / "beit3-merged-bt3" / "model.safetensors")
        ref = build_beit3(embed_dim=64, heads=4, layers=4, ffn_dim=256, img_size=32, patch_size=8, vocab_size=1000,
                          max_source_positions=34, seed=0)
        ref.load_state_dict(out, strict=True)
        assert torch.equal(out["encoder.layers.0.ffn.A.fc1.weight"], out["encoder.layers.0.ffn.B.fc1.weight"])


@needs_torchscale
def test_beit3_num_heads_that_do_not_divide_the_width_are_named() -> None:
    ref = build_beit3(embed_dim=32, heads=HEADS, layers=1, ffn_dim=64, img_size=IMG, patch_size=P, vocab_size=100,
                      max_source_positions=24, seed=0)
    with pytest.raises(ValueError, match="--num-heads 5: does not divide the width 32"):
        import_state_dict("beit3", ref.state_dict(), num_heads=5)
    with pytest.raises(ValueError, match="cannot tell the number of attention heads for width 32; pass --num-heads"):
        import_state_dict("beit3", ref.state_dict())


# ----------------------------------------------------------------------------------------------------- FLAVA
needs_flava = pytest.mark.skipif(transformers_flava_available() is not None,
                                 reason=f"FLAVA reference: {transformers_flava_available()}")
FLAVA_TOWERS = ("image_model.encoder.layer.", "text_model.encoder.layer.")


def _flava(seed: int = 0, **sizes):
    ref = build_flava(seed, heads=HEADS, image_size=IMG, patch_size=P, **sizes)
    conv = import_state_dict("flava", ref.state_dict(), "flava", num_heads=HEADS)
    model = VLMo(conv.config).eval()
    model.load_state_dict(conv.state_dict)
    return ref, conv, model


def _flava_check(ref, model: VLMo, seed: int) -> None:
    """vlmerge's image / text / fusion routes and contrastive embeddings equal ``FlavaModel``'s."""
    image, ids, mask = _inputs(seed)
    want = flava_routes(ref, image, ids, mask)
    ours = _vlmo_routes(model, image, ids, mask)
    torch.testing.assert_close(ours["image"], want["image"], **TOL)
    torch.testing.assert_close(_valid(ours["text"], mask), _valid(want["text"], mask), **TOL)
    # FLAVA orders [M_CLS; image; text], vlmerge [text; image; M_CLS]
    fused = torch.cat([ours["fusion"][:, -1:], ours["fusion"][:, L:-1], ours["fusion"][:, :L]], dim=1)
    assert fused.shape == want["fusion"].shape
    torch.testing.assert_close(_valid(fused, mask, text_first=False), _valid(want["fusion"], mask, text_first=False),
                               **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), want["image_feat"], **TOL)
        torch.testing.assert_close(model.encode_text(ids, mask), want["text_feat"], **TOL)


@needs_flava
@pytest.mark.parametrize("seed", [0, 2])
def test_flava_import_matches_transformers_on_every_route(seed: int) -> None:
    ref, conv, model = _flava(seed, layers=3, mm_layers=2)
    c = conv.config
    assert (c.arch, c.fusion, c.depth, c.mm_depth, c.num_vl_layers) == ("msa", "encoder", 3, 2, 0)
    assert c.ln_eps == 1e-12 and c.itc_bias and c.heads == ("itc",)
    assert "image_model.embeddings.mask_token" in conv.kept and "text_model.pooler.dense.weight" in conv.kept
    # the encoders' layers are the v / l experts; the multimodal encoder's are shared fusion layers
    assert torch.equal(conv.state_dict["blocks.1.mlp.v.fc1.weight"],
                       ref.state_dict()["image_model.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(conv.state_dict["blocks.4.mlp.shared.fc1.weight"],
                       ref.state_dict()["multimodal_model.encoder.layer.1.intermediate.dense.weight"])
    _flava_check(ref, model, seed + 10)


@needs_flava
def test_flava_merged_export_loads_into_transformers_with_one_encoder_copy(tmp_path) -> None:
    ref, conv, model = _flava(seed=4)
    source = {k: v.clone() for k, v in ref.state_dict().items()}
    back = export_state_dict("flava", model, kept=conv.kept)
    assert set(back) == set(source) and all(torch.equal(back[k], source[k]) for k in source)  # exact round trip
    merged = _merged(model, tmp_path)
    out = export_state_dict("flava", merged, kept=conv.kept)
    target = build_flava(99, heads=HEADS, image_size=IMG, patch_size=P)
    target.load_state_dict(out, strict=True)
    layer_keys = [k for k in out if k.startswith(FLAVA_TOWERS[0])]
    assert layer_keys
    for k in layer_keys:  # average: both encoders hold (W_image + W_text) / 2, written from the source tensors
        text_key = k.replace(*FLAVA_TOWERS)
        assert torch.equal(out[k], out[text_key]), k
        torch.testing.assert_close(out[k], (source[k] + source[text_key]) / 2, rtol=0, atol=1e-6)
    for k in ("multimodal_model.encoder.layer.1.attention.attention.query.weight", "image_to_mm_projection.weight",
              "image_model.layernorm.weight", "text_model.layernorm.weight"):
        assert torch.equal(out[k], source[k]), k  # the multimodal encoder, connectors and final norms stay
    _flava_check(target, merged, seed=11)


@needs_flava
def test_cli_flava_folder_through_distance_merge_eval_finetune_and_out(tmp_path, capsys) -> None:
    """A ``save_pretrained`` folder (its config.json gives the 4 heads a width of 32 cannot tell) through the
    CLI: convert, distance, merge, eval, and back to FLAVA."""
    from safetensors.torch import load_file

    from vlmerge.cli import main
    from vlmerge.data import default_tokenizer

    vocab = default_tokenizer().vocab_size
    ref = build_flava(6, heads=HEADS, image_size=32, patch_size=P, vocab_size=vocab, max_positions=40)
    ref.save_pretrained(tmp_path / "flava")
    with pytest.raises(ValueError, match="cannot tell the number of attention heads"):
        import_state_dict("flava", ref.state_dict())  # the bare weights cannot tell; the folder's config can
    assert main(["convert", "--from", "flava", str(tmp_path / "flava"), str(tmp_path / "vlm")]) == 0
    assert "fusion encoder" in capsys.readouterr().out
    assert load_model(tmp_path / "vlm").config.num_heads == HEADS
    assert main(["distance", str(tmp_path / "vlm"), "--json"]) == 0
    assert main(["merge", str(tmp_path / "vlm"), str(tmp_path / "merged"), "--method", "interpolation",
                 "--alpha", "0.5"]) == 0
    merged = load_model(tmp_path / "merged").eval()
    assert main(["eval", "retrieval", str(tmp_path / "merged"), "--set", "data.max_eval=40", "--json"]) == 0
    assert main(["convert", "--to", "flava", str(tmp_path / "merged"), str(tmp_path / "back"),
                 "--extras", str(tmp_path / "vlm" / "source_extras.safetensors")]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    target = build_flava(1, heads=HEADS, image_size=32, patch_size=P, vocab_size=vocab, max_positions=40)
    target.load_state_dict(back, strict=True)
    assert torch.equal(back["text_model.pooler.dense.weight"], ref.state_dict()["text_model.pooler.dense.weight"])
    image, ids, mask = _inputs(5, vocab=vocab)
    image = torch.nn.functional.interpolate(image, size=32)
    want = flava_routes(target, image, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(merged.forward_image(image), want["image"], **TOL)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_merge_method_runs_on_every_imported_layout(layout: str, tmp_path) -> None:
    """Every registered method on an imported checkpoint (a base W0 with equal copies where the method takes one,
    Grams from the real collector for RegMean); each merged model exports back to the layout, and loads strictly
    into the reference (BEiT-3, FLAVA) or runs through the reference forward (VLMo, vl-merging)."""
    from vlmerge.merge import METHODS, collect_grams, merge_checkpoint, save_grams
    from vlmerge.models.roles import parse_param_name

    if layout == "beit3" and torchscale_available() is not None:
        pytest.skip(f"BEiT-3 reference: {torchscale_available()}")
    if layout == "flava" and transformers_flava_available() is not None:
        pytest.skip(f"FLAVA reference: {transformers_flava_available()}")
    if layout == "flava":
        _, conv, model = _flava(seed=7)
        target = build_flava(98, heads=HEADS, image_size=IMG, patch_size=P)
    elif layout == "beit3":
        _, conv, model = _beit3(seed=7)
        target = build_beit3(embed_dim=32, heads=HEADS, layers=3, ffn_dim=64, img_size=IMG, patch_size=P,
                             vocab_size=100, max_source_positions=24, seed=98)
    else:
        _, conv, model = _vlmo_model(layout, seed=7)
        target = None
    save_model(model, tmp_path / "in")
    base = VLMo(conv.config)
    base.load_state_dict({k: (conv.state_dict[k.replace(f".{parse_param_name(k).expert}.", ".v.")]
                              if parse_param_name(k).expert in ("l", "vl") else v) for k, v in conv.state_dict.items()})
    save_model(base, tmp_path / "base")
    g = torch.Generator().manual_seed(8)  # 16 images × 5 tokens and 16 captions: full-rank Grams for width 32
    batch = (torch.randn(16, 3, IMG, IMG, generator=g), torch.randint(0, 100, (16, L), generator=g),
             torch.ones(16, L, dtype=torch.long))
    save_grams(collect_grams(model, [batch]), tmp_path / "grams.safetensors")
    params = {"slerp": {"t": 0.5}}
    image, ids, mask = _inputs(9)
    for name, method in sorted(METHODS.items()):
        out = tmp_path / name
        merge_checkpoint(name, tmp_path / "in", out, base_dir=tmp_path / "base" if method.base != "unused" else None,
                         grams=tmp_path / "grams.safetensors" if method.uses_grams else None,
                         **params.get(name, {}))
        merged = load_model(out)
        assert merged.config.arch == "maa" and merged.config.fusion == model.config.fusion, name
        exported = export_state_dict(layout, merged, kept=conv.kept, source_arch=conv.config.arch)
        assert all(torch.isfinite(t).all() for t in exported.values() if t.is_floating_point()), name
        if target is not None:
            target.load_state_dict(exported, strict=True)
        else:
            fused = _vlmo_ref(exported, layout, "fusion", image, ids, mask)
            _same("fusion", _vlmo_routes(merged.eval(), image, ids, mask)["fusion"], fused, mask)


@needs_flava
def test_flava_pretraining_prefix_and_variants_vlmerge_cannot_hold() -> None:
    ref = build_flava(0, heads=HEADS, image_size=IMG, patch_size=P)
    sd = {f"flava.{k}": v for k, v in ref.state_dict().items()}  # FlavaForPreTraining's layout
    sd["mlm_head.decoder.weight"] = torch.randn(100, 32)
    conv = import_state_dict("flava", sd, "pt", num_heads=HEADS)
    assert conv.notes["mlm_head.decoder.weight"] == "a pre-training head without a vlmerge slot"
    wider = dict(ref.state_dict())
    wider["multimodal_model.cls_token"] = torch.zeros(1, 1, 48)
    with pytest.raises(ValueError, match="different widths"):
        import_state_dict("flava", wider, num_heads=HEADS)
    with pytest.raises(ValueError, match="not a FLAVA"):
        import_state_dict("flava", {k: v for k, v in ref.state_dict().items() if "multimodal" not in k})
    cfg = ref.config.to_dict()
    cfg["text_config"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="hidden_act differs"):
        import_state_dict("flava", ref.state_dict(), source_config=cfg)
    for sub in ("image_config", "text_config", "multimodal_config"):
        cfg[sub]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="exact GELU"):
        import_state_dict("flava", ref.state_dict(), source_config=cfg)


@needs_flava
def test_cli_flava_folder_of_another_model_type_is_refused(tmp_path, capsys) -> None:
    import json

    from vlmerge.cli import main

    ref = build_flava(0, heads=HEADS, image_size=IMG, patch_size=P)
    ref.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "model_type": "clip"}))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", "--from", "flava", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json: model_type is 'clip'; expected 'flava'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- the study's evaluations on imports
def _source_at_study_size(layout: str, vocab: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A random ``layout`` checkpoint for 32 px images and the world's vocabulary, and the import options."""
    if layout in ("vlmo", "vl-merging"):
        return vlmo_state_dict(layout, dim=32, depth=DEPTH, heads=HEADS, vl_layers=2, image_size=32, patch_size=P,
                               vocab_size=vocab, max_text_len=40, max_text_len_of_initckpt=40, seed=5), \
            {"image_size": 32}
    if layout == "beit3":  # unilm's BEiT3ForRetrieval: the encoder under beit3.*, its contrastive heads beside
        ref = build_beit3(embed_dim=32, heads=HEADS, layers=2, ffn_dim=64, img_size=32, patch_size=P,
                          vocab_size=vocab, max_source_positions=42, seed=5)
        g = torch.Generator().manual_seed(5)
        heads = {"vision_head.weight": torch.randn(24, 32, generator=g),
                 "language_head.weight": torch.randn(24, 32, generator=g), "logit_scale": torch.tensor(2.0)}
        return {**{f"beit3.{k}": v for k, v in ref.state_dict().items()}, **heads}, {"num_heads": HEADS}
    ref = build_flava(5, heads=HEADS, image_size=32, patch_size=P, vocab_size=vocab, max_positions=40)
    return ref.state_dict(), {"num_heads": HEADS}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_study_evaluations_run_on_every_imported_layout(layout: str, tmp_path) -> None:
    """Imported, then predicted and merged: ``vlmerge predict``'s report (with activation drift), the study's
    zero-shot retrieval scoring (its evaluation set, per-query ranks, bootstrap over images) and a VQA fine-tune
    with its evaluation, on the real computation."""
    if layout == "beit3" and torchscale_available() is not None:
        pytest.skip(f"BEiT-3 reference: {torchscale_available()}")
    if layout == "flava" and transformers_flava_available() is not None:
        pytest.skip(f"FLAVA reference: {transformers_flava_available()}")
    from vlmerge.data import default_tokenizer
    from vlmerge.finetune import finetune
    from vlmerge.finetune.data import embedded_dataset
    from vlmerge.pretrain import evaluate_retrieval
    from vlmerge.study.stats import retrieval_scores

    sd, options = _source_at_study_size(layout, default_tokenizer().vocab_size)
    conv = import_state_dict(layout, sd, layout, **options)
    assert conv.config.heads[:1] == ("itc",)
    model = VLMo(conv.config).eval()
    model.load_state_dict(conv.state_dict)
    merged = _merged(model, tmp_path)
    # vlmerge predict before the merge: weights and activation features; equal copies nowhere, so every layer has
    # a positive risk
    from vlmerge.merge.gram_data import world_batches
    from vlmerge.metrics.predict import layer_report

    rep = layer_report(tmp_path / "in", batches=list(world_batches(model, 1, 0, batch_size=4)))
    assert sorted(rep["ranked"]) == list(range(conv.config.depth))
    assert all(r["risk"] > 0 for r in rep["per_layer"]) and rep["global"]["out_drift"] > 0
    data = embedded_dataset("retrieval", "test", 12, 0, 32)
    for net in (model, merged):
        r = evaluate_retrieval(net, data, default_tokenizer(), ranks=True)
        scores = retrieval_scores(r["ranks"], r["images"], "retrieval/test")
        assert r["images"] == 12 and r["texts"] == 60
        assert 0 <= scores["r_mean"] <= 100 and len(scores.boot["r_mean"]) >= 100
    out = finetune("vqa", tmp_path / "out", tmp_path / "ft", {"max_steps": 2, "data": {"max_train": 32,
                                                                                   "max_eval": 16}})
    assert "vqa" in load_model(out).config.heads
    assert 0 <= json.loads((out / "metrics.json").read_text())["vqa_score"] <= 100
    headless = VLMo(conv.config.replace(heads=()))
    with pytest.raises(ValueError, match="the model has no 'itc' head"):
        evaluate_retrieval(headless, data)
