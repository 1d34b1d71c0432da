"""The merge methods, one module each (mergekit's task-vector family: one module, :mod:`.task_vectors`);
importing this package registers them in :data:`~vlmerge.merge.base.METHODS`."""

from . import (
    average,
    dare,
    interpolation,
    karcher,
    modality_arithmetic,
    model_stock,
    multislerp,
    nuslerp,
    regmean,
    sce,
    slerp,
    task_vectors,
    ties,
)

__all__ = ["average", "dare", "interpolation", "karcher", "modality_arithmetic", "model_stock", "multislerp",
           "nuslerp", "regmean", "sce", "slerp", "task_vectors", "ties"]
