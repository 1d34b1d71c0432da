"""vlmerge.metrics: will a merge work? Distances between modality weights and their correlation with drops.

* :func:`l2`, :func:`cosine`, :func:`ssd`, :func:`tssd` -- on two tensors of any shape (merging paper §7);
* :func:`checkpoint_distances` -- W^v vs W^l of a modality-specific checkpoint, globally / per layer / module;
* :func:`pearson`, :func:`spearman`, :func:`correlate` -- against performance drops (Table 5).
"""

from .checkpoint import METRICS, checkpoint_distances
from .correlation import correlate, pearson, rankdata, spearman
from .distances import DistanceAccumulator, cosine, l2, ssd, truncate_smallest, tssd

__all__ = [
    "METRICS",
    "DistanceAccumulator",
    "checkpoint_distances",
    "correlate",
    "cosine",
    "l2",
    "pearson",
    "rankdata",
    "spearman",
    "ssd",
    "truncate_smallest",
    "tssd",
]
