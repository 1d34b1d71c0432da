"""vlmerge.merge: merge the modality copies of a VLMo-style model (or N whole models) into one.

Methods (registered by name in :data:`METHODS`): ``interpolation``, ``modality_arithmetic``, ``regmean``
(merging paper §4.1), ``ties``, ``dare`` and ``average`` (UnIVAL §5 soups); and mergekit's ``task_arithmetic``,
``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``
(:mod:`.methods.task_vectors`), ``model_stock``, ``slerp``, ``nuslerp``, ``multislerp``, ``karcher`` and ``sce``,
sharing their math with mergekit configs (:mod:`.mergekit`). mergekit's ``linear`` is ``average`` here;
mergekit's ``ties`` and ``passthrough`` run from mergekit configs only (vlmerge's ``ties`` differs on purpose).

* :func:`merge_tensors` -- one slot, in memory;
* :func:`merge_checkpoint` -- one MSA checkpoint -> an MAA checkpoint, streaming;
* :func:`merge_models` -- N checkpoints with identical keys -> one, streaming;
* :func:`collect_grams` / :func:`save_grams` / :func:`load_grams` -- RegMean's Gram matrices;
* :func:`load_merge_config` / :func:`run_merge_config` -- YAML configs.
"""

from . import methods  # noqa: F401  (registers the methods)
from .base import (
    METHODS,
    MergeContext,
    MergeMethod,
    MergeParams,
    get_method,
    merge_tensors,
    register_method,
    tensor_seed,
)
from .config import MergeConfig, load_merge_config, run_merge_config
from .grams import (
    GRAM_DATA,
    GramCollector,
    Grams,
    collect_grams,
    load_grams,
    register_gram_data,
    run_vlmo,
    save_grams,
)
from .methods.dare import dare_keep_masks
from .methods.ties import trim_to_density
from .streaming import merge_checkpoint, merge_models

__all__ = [
    "GRAM_DATA",
    "METHODS",
    "GramCollector",
    "Grams",
    "MergeConfig",
    "MergeContext",
    "MergeMethod",
    "MergeParams",
    "collect_grams",
    "dare_keep_masks",
    "get_method",
    "load_grams",
    "load_merge_config",
    "merge_checkpoint",
    "merge_models",
    "merge_tensors",
    "register_gram_data",
    "register_method",
    "run_merge_config",
    "run_vlmo",
    "tensor_seed",
    "save_grams",
    "trim_to_density",
]
