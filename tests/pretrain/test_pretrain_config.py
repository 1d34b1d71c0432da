"""Run configs: presets load, errors name the key and the allowed values, overrides, the paper's numbers;
recipes' stage plans; retrieval metrics on hand-made embeddings."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from vlmerge.models import ARCHS, PRESETS
from vlmerge.pretrain import load_config, plan_stages
from vlmerge.pretrain.config import ModelSection

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["micro", "tiny", "small", "paper"])
def test_presets_load_and_build_a_model_config(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    mc = cfg.build_model_config(vocab_size=100, heads=("itc", "itm", "mlm"))
    assert mc.arch == cfg.model.arch and mc.vocab_size == 100
    stages = plan_stages(cfg.recipe.name, cfg.model.arch, cfg.train.steps, cfg.recipe.seed_steps,
                         cfg.recipe.image_steps, cfg.recipe.text_steps)
    assert sum(s.steps for s in stages) == cfg.train.steps and stages[-1].kind == "vl"


def test_config_choices_follow_the_model_registry() -> None:
    fields = ModelSection.model_fields
    assert set(typing.get_args(fields["preset"].annotation)) == set(PRESETS)
    assert set(typing.get_args(fields["arch"].annotation)) == set(ARCHS)


def test_paper_preset_matches_the_papers() -> None:
    cfg = load_config(CONFIGS / "paper.yaml")
    mc = cfg.build_model_config(vocab_size=30522, heads=("itc",))
    assert (mc.image_size, mc.patch_size, mc.embed_dim, mc.depth, mc.num_vl_layers, mc.max_text_len) == (
        224, 16, 768, 12, 2, 40)
    o, t = cfg.optim, cfg.train
    assert (t.batch_size, t.steps, o.lr, o.warmup_steps, o.betas, o.weight_decay) == (
        1024, 200_000, 2e-4, 2500, (0.9, 0.98), 0.01)
    assert (cfg.loss.mlm, cfg.loss.mlm_prob, cfg.loss.hard_negatives) == (0.25, 0.15, "global")
    assert (cfg.recipe.name, cfg.recipe.seed_steps) == ("seed", 100_000)  # K_seed = K_VL = 100k (§6.1)


@pytest.mark.parametrize("overrides, message", [
    (["recipe.name=sed"], "recipe.name: Input should be 'scratch', 'seed' or 'stagewise' (got 'sed')"),
    (["train.stepz=3"], "train.stepz: unknown key; allowed keys: steps, batch_size"),
    (["model.arch=mlp"], "model.arch: Input should be 'msa', 'custom-attn'"),
    (["model.overrides.depthh=3"], "unknown keys ['depthh']; allowed keys: arch, depth"),
    (["model.overrides.depth=0"], "depth=0 is invalid; expected a positive integer"),
    (["recipe.name=seed"], "recipe.seed_steps must be > 0 for recipe.name='seed'"),
    (["recipe.image_steps=3"], "recipe.image_steps is only used by another recipe"),
    (["recipe.name=seed", "recipe.seed_steps=100", "train.steps=100"], "must be fewer than train.steps=100"),
    (["loss.hard_negatives=all"], "loss.hard_negatives: Input should be 'global' or 'local'"),
    (["train.steps"], "--set expects key=value"),
])
def test_errors_name_the_key_and_what_is_allowed(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n")
    cfg = load_config(path, ["optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "train.compile=true",
                             "model.overrides.depth=3"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.betas, cfg.train.compile) == (7, 1e-3, (0.8, 0.9), True)
    assert cfg.build_model_config(10, ()).depth == 3
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_recipes_plan_k_steps_in_total() -> None:
    assert [(s.name, s.arch, s.steps, s.init) for s in plan_stages("seed", "msa", 10, seed_steps=4)] == [
        ("seed", "maa", 4, "scratch"), ("vl", "msa", 6, "expand")]
    assert [(s.kind, s.steps) for s in plan_stages("stagewise", "custom-ffn", 10, image_steps=2, text_steps=3)] == [
        ("image", 2), ("text", 3), ("vl", 5)]
    assert [(s.kind, s.steps, s.init) for s in plan_stages("scratch", "maa", 10)] == [("vl", 10, "scratch")]
