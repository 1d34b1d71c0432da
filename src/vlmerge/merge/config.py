"""Merge configs: a YAML file validated by pydantic (``extra="forbid"``), run by :func:`run_merge_config`.

Modality merge of one MSA checkpoint (the paper)::

    method: interpolation
    params: {alpha: 0.75}
    input: runs/msa
    output: runs/merged

Whole-model soup (UnIVAL §5)::

    method: average
    inputs: [runs/vqa, runs/cap, runs/ve]
    weights: [0.5, 0.25, 0.25]
    output: runs/soup

Keys: ``method``, ``params`` (the method's, validated against it), ``input`` xor ``inputs``, ``base``,
``output``, ``weights`` (per modality ``{v: .., l: ..}`` for ``input``; a list for ``inputs``), RegMean's
``grams`` (a Gram file; a list, one per model, for ``inputs``) or ``data`` + ``batches`` (collect Grams
from a registered data source), ``save_grams``, ``overwrite``, ``hash_inputs``; a partial merge of ``input``:
``keep_specific`` (layers kept modality-specific) or ``budget`` (the riskiest fraction kept); ``learn``
(interpolation's α or modality arithmetic's λ learned per layer or module on the world's validation split:
:class:`LearnSchedule`). Relative paths are taken relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import read_yaml, validate
from .base import METHODS, check_numbers, get_method


class LearnSchedule(BaseModel):
    """``learn``: learn interpolation's α or modality arithmetic's λ per layer or module on data
    (:mod:`vlmerge.merge.learned`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    objective: Literal["supervised", "entropy"] = "supervised"
    granularity: Literal["layer", "module"] = "layer"
    split: Literal["train", "val", "test"] = "val"
    batches: int = Field(4, ge=1, le=10_000)
    batch_size: int = Field(32, ge=2, le=4096)
    steps: int = Field(30, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0)
    init: float = Field(0.5, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class MergeConfig(BaseModel):
    """One merge, as written in a YAML config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    input: Path | None = None
    inputs: list[Path] | None = None
    base: Path | None = None
    output: Path
    weights: dict[str, float] | list[float] | None = None
    grams: Path | list[Path] | None = None
    data: str | None = None
    batches: int | None = Field(None, ge=1, le=2**31 - 1)
    save_grams: Path | None = None
    overwrite: bool = False
    hash_inputs: bool = False
    keep_specific: list[int] | None = None
    budget: float | None = Field(None, ge=0, le=1)
    learn: LearnSchedule | None = None

    @model_validator(mode="before")
    @classmethod
    def _numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_numbers({k: data[k] for k in ("weights", "batches") if k in data}, "key")
            for k in ("overwrite", "hash_inputs"):
                if k in data and not isinstance(data[k], bool):
                    raise ValueError(f"key {k}={data[k]!r}: expected true or false")
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; allowed: {', '.join(sorted(METHODS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        m = get_method(self.method)
        m.parse_params(self.params)  # raises ValueError naming the param and allowed values
        if (self.input is None) == (self.inputs is None):
            raise ValueError(
                "give exactly one of 'input' (one modality-specific checkpoint) or 'inputs' (models)"
            )
        if self.inputs is not None and len(self.inputs) < 2:
            raise ValueError("'inputs' needs at least 2 model directories")
        if self.input is not None and isinstance(self.weights, list):
            raise ValueError(
                "'weights' for a modality merge ('input') maps modality to weight, e.g. {v: 0.75, l: 0.25}"
            )
        if self.inputs is not None and isinstance(self.weights, dict):
            raise ValueError("'weights' for 'inputs' is a list with one weight per model")
        if self.inputs is not None and self.data is not None:
            raise ValueError(
                "'data' collects Grams for a modality merge ('input'); for 'inputs' give 'grams'"
            )
        m.check_inputs(base=self.base is not None, weights=self.weights is not None,
                       grams=self.grams is not None or self.data is not None or self.save_grams is not None)
        if m.uses_grams:
            if (self.grams is None) == (self.data is None):
                raise ValueError("regmean needs exactly one of 'grams' (a Gram file) or 'data' (+ 'batches')")
            if self.data is not None and self.batches is None:
                raise ValueError("'data' needs 'batches' (how many batches to collect Grams over)")
            if self.input is not None and isinstance(self.grams, list):
                raise ValueError("'grams' for a modality merge ('input') is one file")
            if self.inputs is not None and self.grams is not None and not isinstance(self.grams, list):
                raise ValueError(f"'grams' for 'inputs' is a list with one Gram file per model ({len(self.inputs)}), "
                                 f"got one path {str(self.grams)!r}")
            if self.save_grams is not None and self.data is None:
                raise ValueError("'save_grams' saves the Grams collected with 'data'; with 'grams' they are "
                                 "already in a file (drop --save-grams)")
        if self.batches is not None and self.data is None:
            raise ValueError("'batches' goes with 'data'")
        if self.inputs is not None and (self.keep_specific is not None or self.budget is not None):
            raise ValueError("'keep_specific' / 'budget' choose layers of a modality merge ('input'), not of a "
                             "soup of models ('inputs')")
        if self.keep_specific is not None and self.budget is not None:
            raise ValueError("give 'keep_specific' or 'budget', not both")
        if self.learn is not None:
            from .learned import LEARNABLE

            if self.method not in LEARNABLE or self.inputs is not None:
                raise ValueError("'learn' (--alpha-schedule / --lam-schedule learned) learns the coefficients of a "
                                 f"modality merge: method {' or '.join(LEARNABLE)} with one input checkpoint")
            param = LEARNABLE[self.method]
            if param in self.params:
                raise ValueError(f"'learn' chooses {param}: drop params.{param} (on the command line: drop --{param})")
            if self.keep_specific is not None or self.budget is not None:
                raise ValueError("'learn' learns the coefficients of a full merge; drop 'keep_specific' / 'budget'")
        return self


def load_merge_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Read and validate a merge YAML; ``ValueError`` naming the file, the key and what is allowed otherwise."""
    data = read_yaml(path)
    from .mergekit import is_mergekit_config

    if is_mergekit_config(data):
        raise ValueError(f"{path}: a mergekit config (merge_method / models / slices); run it with vlmerge merge "
                         f"{path} OUT_DIR (vlmerge.merge.mergekit.run_mergekit)")
    return validate(MergeConfig, data, source=path)


def run_merge_config(cfg: MergeConfig, progress: bool = False, config_path: str | os.PathLike[str] | None = None
                     ) -> Path:
    """Run the merge a :class:`MergeConfig` describes; returns the output directory. ``config_path``, the YAML
    it came from, counts as an input: the output may not replace or hold it."""
    from ..files import guard_output_dir, guard_output_file
    from .grams import check_gram_data, collect_grams, gram_batches
    from .streaming import merge_checkpoint, merge_models

    gram_files = cfg.grams if isinstance(cfg.grams, list) else [cfg.grams]
    reads = [cfg.input, *(cfg.inputs or []), cfg.base, *gram_files, config_path]
    # Every output is checked before anything is read or computed (collecting Grams can take minutes).
    out = guard_output_dir(cfg.output, reads, cfg.overwrite, flag="output")
    if cfg.save_grams is not None:
        save = guard_output_file(cfg.save_grams, reads, cfg.overwrite, flag="save_grams")
        if out.resolve() in save.resolve().parents:
            raise ValueError(f"save_grams {save} lies inside the output {out}, which the merge replaces; "
                             "save the Grams elsewhere")

    if cfg.inputs is not None:
        return merge_models(
            cfg.method,
            cfg.inputs,
            cfg.output,
            base_dir=cfg.base,
            weights=cfg.weights,
            grams=cfg.grams,
            overwrite=cfg.overwrite,
            progress=progress,
            hash_inputs=cfg.hash_inputs,
            **cfg.params,
        )
    grams: Any = cfg.grams
    params, learned = dict(cfg.params), None
    if cfg.learn is not None:
        from ..models import CheckpointReader, load_model
        from .learned import learn_schedule, world_split_batches

        la = cfg.learn
        model = load_model(cfg.input)
        base = None
        if cfg.base is not None:
            with CheckpointReader(cfg.base) as r:
                base = r.state_dict()
        batches = world_split_batches(model, la.batches, la.seed, la.split, la.batch_size)
        learned = learn_schedule(model, batches, la.objective, method=cfg.method, granularity=la.granularity,
                                 base=base, steps=la.steps, lr=la.lr, init=la.init,
                                 vl_ratio=params.get("vl_ratio", 1 / 3), progress=progress)
        learned = {**la.model_dump(), "data": f"world/{la.split}", **{k: v for k, v in learned.items()
                                                                        if k != "history"}}
        params[learned["param"]] = learned["schedule"]
    if cfg.data is not None:
        from ..models import load_model

        check_gram_data(cfg.data)  # before loading anything
        model = load_model(cfg.input)
        assert cfg.batches is not None
        grams = collect_grams(
            model, gram_batches(cfg.data, model, cfg.batches), max_batches=cfg.batches, progress=progress
        )
        if cfg.save_grams is not None:
            grams.save(cfg.save_grams)
    return merge_checkpoint(
        cfg.method,
        cfg.input,
        cfg.output,
        base_dir=cfg.base,
        grams=grams,  # type: ignore[arg-type]
        weights=cfg.weights,
        overwrite=cfg.overwrite,
        progress=progress,
        hash_inputs=cfg.hash_inputs,
        keep_layers=cfg.keep_specific,
        budget=cfg.budget,
        learned=learned,
        **params,
    )
