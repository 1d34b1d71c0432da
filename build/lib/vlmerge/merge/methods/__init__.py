"""The merge methods, one module each; importing this package registers them in
:data:`~vlmerge.merge.base.METHODS`."""

from . import average, dare, interpolation, modality_arithmetic, regmean, ties

__all__ = ["average", "dare", "interpolation", "modality_arithmetic", "regmean", "ties"]
