"""The pre-training run config: a pydantic model read from YAML (``configs/*.yaml``) with dotted overrides.

Unknown keys and invalid values are errors that name the key and what is allowed, e.g.
``recipe.name: Input should be 'scratch', 'seed' or 'stagewise' (got 'sed')``. Every run saves its resolved
config as ``OUT/config.yaml``; resuming checks that the config has not changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import check_float32_fields, load, validate
from ..models.vlmo import ArchName, ModelConfig, PresetName, preset_config
from .augment import OPS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _in_range(self) -> Any:
        return check_float32_fields(self)


class ModelSection(_Section):
    """Which network: a size preset of ``vlmerge.models`` and an architecture; ``overrides`` edit preset
    fields (``arch``, ``heads`` and ``vocab_size`` are set by the recipe and the tokenizer)."""

    preset: PresetName = "micro"
    arch: ArchName = "msa"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        fixed = sorted({"arch", "heads", "vocab_size"} & set(self.overrides))
        if fixed:
            raise ValueError(f"model.overrides may not set {fixed}: use model.arch; heads and vocab_size are derived")
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"model.overrides: unknown keys {unknown}; allowed keys: {', '.join(sorted(known))}")
        preset_config(self.preset, self.arch, **self.overrides)  # raises naming the bad field
        return self


class RecipeSection(_Section):
    """How the K steps are spent (see :mod:`vlmerge.pretrain.recipes`)."""

    name: Literal["scratch", "seed", "stagewise"] = "scratch"
    seed_steps: int = Field(0, ge=0, description="K_seed: MAA steps before expansion (recipe 'seed')")
    image_steps: int = Field(0, ge=0, description="image-only MIM steps (recipe 'stagewise')")
    text_steps: int = Field(0, ge=0, description="text-only MLM steps (recipe 'stagewise')")

    @model_validator(mode="after")
    def _check(self) -> RecipeSection:
        used = {"scratch": (), "seed": ("seed_steps",), "stagewise": ("image_steps", "text_steps")}[self.name]
        for key in ("seed_steps", "image_steps", "text_steps"):
            if key in used and getattr(self, key) == 0:
                raise ValueError(f"recipe.{key} must be > 0 for recipe.name={self.name!r}")
            if key not in used and getattr(self, key):
                raise ValueError(f"recipe.{key} is only used by another recipe, not recipe.name={self.name!r}")
        return self


class DataSection(_Section):
    """The procedural image-text world of :mod:`vlmerge.data`: every image has 5 captions, each a training pair."""

    train_images: int = Field(4096, ge=1, description="images of the train split (5 pairs each)")
    eval_images: int = Field(200, ge=2, description="images of eval_split scored by zero-shot retrieval")
    eval_split: Literal["val", "test", "ood"] = "test"
    seed: int = 0
    tokenizer: Literal["world", "paper"] = Field("world", description="world WordPiece, or bert-base-uncased")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    cache_dir: str | None = Field(None, description="render scenes once into .npz shards under this directory "
                                  "(one sub-folder per split, size and seed), shared by every run that uses it")
    world: dict[str, Any] = Field(default_factory=dict, description="WorldConfig fields (max_objects, shapes, "
                                  "colors, size_scale, ...) other than image_size, which is the model's")

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        from ..data import WorldConfig

        if "image_size" in self.world:
            raise ValueError("data.world.image_size is the model's image_size; set model.overrides.image_size")
        WorldConfig.from_dict(self.world)  # raises naming the bad field
        return self


class OptimSection(_Section):
    """AdamW and the schedule (VLMo §4.1, supplementary B.1)."""

    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(2500, ge=0, description="per stage, capped at half the stage")
    schedule: Literal["linear", "cosine", "wsd"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: the last fraction of each stage's steps, which decays")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")


class LossSection(_Section):
    """Objective weights and masking (merging paper §5: MLM weight 0.25; VLMo §3.3: 15 % MLM masking)."""

    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    mlm: float = Field(0.25, ge=0)
    mlm_prob: float = Field(0.15, gt=0, lt=1)
    mim_mask_ratio: float = Field(0.4, gt=0, lt=1, description="fraction of patches masked in the image stage")
    hard_negatives: Literal["global", "local"] = "global"
    false_negatives: Literal["keep", "exclude"] = Field(
        "keep", description="exclude: a caption the corpus knows to be true of another image of the batch (the "
        "world's truthful relevance, e.g. 'two shapes') is neither ITC's negative for it nor its ITM negative")
    itm_fraction: float = Field(1.0, gt=0, le=1, description="share of each batch's pairs that ITM scores (each "
                                "with a hard-negative text and image): its 3·n fusion passes are most of a step")


class AugmentSection(_Section):
    """RandAugment on training images (VLMo §4.1); ``num_ops: 0`` turns it off. ``ops`` restricts the draw, e.g.
    to geometric operations when captions name colours."""

    num_ops: int = Field(2, ge=0)
    magnitude: float = Field(9.0, ge=0, le=10)
    ops: tuple[str, ...] = tuple(OPS)

    @model_validator(mode="after")
    def _check(self) -> AugmentSection:
        unknown = [o for o in self.ops if o not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"augment.ops: unknown or empty {unknown}; allowed: {', '.join(OPS)}")
        return self


class TrainSection(_Section):
    """Steps, batch, device and bookkeeping."""

    steps: int = Field(100, ge=1, description="K: optimizer steps over all stages")
    batch_size: int = Field(64, ge=1, description="global batch per optimizer step (all ranks, all micro-steps)")
    micro_batch_size: int | None = Field(None, ge=1, description="per-rank batch per forward; default: no accumulation")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = Field("bf16", description="autocast dtype on CUDA; CPU runs in fp32")
    compile: bool = Field(False, description="torch.compile each transformer block")
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_ckpts: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="zero-shot retrieval every n steps; 0 = only at the end")
    peak_tflops: float | None = Field(None, gt=0, description="accelerator peak for MFU; default from device name")


class PretrainConfig(_Section):
    """A whole pre-training run."""

    model: ModelSection = ModelSection()
    recipe: RecipeSection = RecipeSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    augment: AugmentSection = AugmentSection()
    train: TrainSection = TrainSection()

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        r = self.recipe
        if r.seed_steps + r.image_steps + r.text_steps >= self.train.steps:
            raise ValueError(f"recipe stages before VL pre-training ({r.seed_steps + r.image_steps + r.text_steps} "
                             f"steps) must be fewer than train.steps={self.train.steps}")
        return self

    def build_model_config(self, vocab_size: int, heads: tuple[str, ...], arch: str | None = None) -> ModelConfig:
        """The :class:`ModelConfig` of a stage (``arch`` defaults to ``model.arch``)."""
        return preset_config(self.model.preset, arch or self.model.arch, vocab_size=vocab_size, heads=heads,
                             **self.model.overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------------------ loading
def validate_config(data: dict[str, Any], source: Any = "pretrain config") -> PretrainConfig:
    """Build a :class:`PretrainConfig`; one ``ValueError`` naming each bad key (:func:`vlmerge.config.explain`)."""
    return validate(PretrainConfig, data, source)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a YAML config -- a path, or a preset name (``micro``, ``tiny``, ``small``, ``paper``) -- or start
    from the defaults when ``path`` is None, and apply ``overrides`` (``section.key=value``)."""
    return load(PretrainConfig, path, "", overrides)


def dump_config(config: PretrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

