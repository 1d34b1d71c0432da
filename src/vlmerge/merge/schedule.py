"""Coefficient schedules of the modality merges: interpolation's α and modality arithmetic's λ, per layer and module.

A coefficient is one number for the whole model, or a schedule over the transformer blocks::

    0.5                                           every slot
    [0.2, 0.4, 0.6, 0.8]                          one value per layer (a list of N values)
    {0: 0.2, 3: 0.8}                              {layer: value}, every merged layer named
    [{attn: 0.3, mlp: 0.7, norm1: 0.5, norm2: 0.5}, 0.5, ...]
                                                  per module of a layer (``norm1`` / ``attn`` / ``norm2`` / ``mlp``,
                                                  :data:`~vlmerge.models.roles.MODULES`); a layer's dict names
                                                  every module of it that has modality copies

Learned schedules (:mod:`vlmerge.merge.learned`) are written in this form. A method that takes a schedule names
the parameter in :attr:`~vlmerge.merge.base.MergeMethod.schedules`; :func:`check_schedule` refuses, before
anything is written, a schedule that misses a slot the merge has.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.roles import MODULES

Coefficient = float | dict[str, float]
Schedule = float | list[Coefficient] | dict[int, Coefficient]


def validate_schedule(value: Schedule, lo: float, hi: float | None) -> Schedule:
    """``value`` when every number lies in [lo, hi] (hi None: no upper bound) and every module name is known;
    ``ValueError`` naming the first bad entry (pydantic validators call this)."""
    if isinstance(value, (list, dict)) and not value:
        raise ValueError("a schedule needs at least one value")
    if isinstance(value, dict) and any(k < 0 for k in value):
        raise ValueError("schedule layers must be ≥ 0")
    entries = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for layer, c in [*entries] or [(None, value)]:
        where = "" if layer is None else f"layer {layer}: "
        for module, x in c.items() if isinstance(c, dict) else [(None, c)]:
            if module is not None and module not in MODULES:
                raise ValueError(f"{where}unknown module {module!r}; expected some of {', '.join(MODULES)}")
            if not (lo <= x and (hi is None or x <= hi)):
                span = f"[{lo:g}, {hi:g}]" if hi is not None else f"≥ {lo:g}"
                raise ValueError(f"{where}{'' if module is None else module + ': '}each value must be {span}, "
                                 f"got {x}")
        if isinstance(c, dict) and not c:
            raise ValueError(f"{where}a per-module entry needs at least one module")
    return value


def value_at(schedule: Schedule, layer: int | None, module: str | None = None, *, name: str = "tensor",
             param: str = "alpha") -> float:
    """The value of ``schedule`` for the slot of ``layer`` / ``module``; ``ValueError`` naming ``param`` and the
    slot when the schedule has none (``name``: the tensor, for the message)."""
    if isinstance(schedule, float | int):
        return float(schedule)
    if layer is None:
        raise ValueError(f"{param}: a schedule needs a layer, and {name!r} has none (a tensor outside the "
                         "blocks: use one value; merge_tensors: pass layer=)")
    if isinstance(schedule, list):
        if layer >= len(schedule):
            raise ValueError(f"{param}: the schedule has {len(schedule)} values; layer {layer} has none")
        c = schedule[layer]
    else:
        if layer not in schedule:
            raise ValueError(f"{param}: the schedule has no entry for layer {layer} (has {sorted(schedule)})")
        c = schedule[layer]
    if not isinstance(c, dict):
        return float(c)
    if module is None or module not in c:
        hint = "; merge_tensors: pass module=" if module is None else ""
        raise ValueError(f"{param}: layer {layer}'s entry has no value for module {module!r} of {name!r} (has "
                         f"{', '.join(sorted(c))}){hint}")
    return float(c[module])


def check_schedule(schedule: Schedule, slots: Sequence[tuple[int | None, str | None]], param: str) -> None:
    """Check that ``schedule`` has a value for every merged slot ``(layer, module)`` and, as a list, exactly one
    entry per layer of the model; ``ValueError`` naming ``param`` otherwise."""
    if isinstance(schedule, float | int):
        return
    if any(layer is None for layer, _ in slots):
        raise ValueError(f"{param}: a schedule applies to transformer-block layers; a tensor outside the blocks "
                         "has no layer (use one value)")
    layers = sorted({layer for layer, _ in slots if layer is not None})
    if isinstance(schedule, list) and layers and len(schedule) != layers[-1] + 1:
        raise ValueError(f"{param}: the schedule has {len(schedule)} values; the model has {layers[-1] + 1} "
                         "layers (give one per layer)")
    for layer, module in sorted(set(slots), key=str):
        value_at(schedule, layer, module, name=f"blocks.{layer}.{module}", param=param)


__all__ = ["Coefficient", "Schedule", "check_schedule", "validate_schedule", "value_at"]
