"""The one way to read a config: YAML files, presets shipped as package data, ``--set key.sub=value``
overrides, and pydantic validation whose errors name the file and the key.

Every config of the project (pre-training, fine-tuning, studies, merges) goes through here::

    path = find_config("tiny", "study")              # a preset name, or a path to a YAML file
    data = apply_sets(read_yaml(path), ["steps=80"])  # --set pairs, values parsed as YAML
    cfg = validate(StudyConfig, data, source=path)    # ValueError: "{path}: steps: ... (got ...)"

Presets live in the package (``vlmerge/configs/{kind}/{name}.yaml``), so a wheel install finds them;
``$VLMERGE_CONFIGS`` points at another folder of the same layout.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

PRESET_ROOT = Path(__file__).resolve().parent / "configs"


def config_root() -> Path:
    """Where presets are: ``$VLMERGE_CONFIGS`` when set, else the package's ``configs/`` folder."""
    env = os.environ.get("VLMERGE_CONFIGS")
    return Path(env) if env else PRESET_ROOT


def preset_names(kind: str = "") -> list[str]:
    """The presets of one kind (``""``: pre-training, ``"study"``, ``"unival"``, ``"finetune"``)."""
    return sorted(p.stem for p in (config_root() / kind).glob("*.yaml"))


def find_config(name_or_path: str | os.PathLike[str], kind: str = "") -> Path:
    """A YAML file by path, or a preset by name (``tiny`` or ``tiny.yaml`` -> ``configs/{kind}/tiny.yaml``; a
    file of that name in the working directory wins over the preset)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        shipped = config_root() / kind / p.name
        if p.is_file():
            return p
        if len(p.parts) == 1 and shipped.is_file():  # a preset's file name, as presets name each other
            return shipped
        raise FileNotFoundError(f"{p}: no such config file")
    cand = config_root() / kind / f"{p.name}.yaml"
    if p.name == str(name_or_path) and cand.is_file():
        return cand
    raise FileNotFoundError(f"no preset {str(name_or_path)!r}; allowed values: {preset_names(kind)} or a path to a "
                            "YAML file")


#: Values a YAML document may expand to through anchors and aliases (a "billion laughs" file of a few hundred
#: bytes names 10⁹ of them: validating or printing it would take gigabytes and minutes).
MAX_YAML_VALUES = 1_000_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Scalars, sequences and mappings ``node`` stands for with every alias expanded (memoised: aliases share
    nodes, so this is linear in the file, not in the expansion)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[key]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one silently) and a
    document that expands to more than :data:`MAX_YAML_VALUES` values through aliases."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"anchors and aliases expand it to more than {MAX_YAML_VALUES:,} values", node.start_mark)
        return super().construct_document(node)  # type: ignore[no-untyped-call]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: larger numbers overflow in the math
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def check_float32_fields(model: Any) -> Any:
    """For a pydantic ``model_validator(mode="after")``: ``ValueError`` naming the first float field (or an
    entry of a tuple / list of floats) beyond float32's range, and a ``seed`` outside :data:`SEED_RANGE`."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and abs(v) > FLOAT32_MAX for v in items):
            raise ValueError(f"{name}={value!r}: beyond float32's range (|x| <= {FLOAT32_MAX:.3g})")
        if name.endswith("seed") and isinstance(value, int) and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ValueError(f"{name}={value}: expected an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    return model


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file is ``{}``); ``ValueError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def parse_value(raw: str, what: str) -> Any:
    """A ``--set`` / ``--param`` value parsed as YAML (``3``, ``1e-4``, ``true``, ``[0.9, 0.98]``, ``{a: 1}``);
    an empty string is ``None``."""
    if not raw.strip():
        return None
    try:
        return safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: {raw!r} is not a YAML value ({getattr(e, 'problem', None) or e})") from None


def apply_sets(data: Mapping[str, Any], pairs: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """``data`` (deep-copied) with ``section.key=value`` pairs applied; sections are created as needed."""
    out = _copy(data)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip() or not all(parts):
            raise ValueError(f"{flag} expects key=value (key: names joined by dots), got {pair!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{flag} {key.strip()}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(raw, f"{flag} {key.strip()}")
    return out


def _copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _section(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model of the section that holds the key at ``loc`` (None when it is not a model)."""
    cls = model
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part)) if cls is not None else None
        ann = field.annotation if field is not None else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return cls


def explain(e: ValidationError, source: Any, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line: ``{source}: {key}: {what} (got {value!r}); ...``. Unknown keys list the
    keys allowed in their section (from ``model``)."""
    parts = []
    for err in e.errors():
        loc = err["loc"]
        key = ".".join(str(x) for x in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if not key:  # a whole-model check: its message names the keys itself
            parts.append(msg)
            continue
        if err["type"] == "extra_forbidden":
            section = _section(model, loc)
            allowed = f"; allowed keys: {', '.join(section.model_fields)}" if section is not None else ""
            parts.append(f"{key}: unknown key{allowed}")
        elif err["type"] == "missing":
            parts.append(f"{key}: required")
        elif "input" in err and not isinstance(err["input"], Mapping):
            parts.append(f"{key}: {msg} (got {err['input']!r})")
        else:
            parts.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _numeric(annotation: Any) -> bool:
    """Whether a field annotation takes numbers but not booleans (``int``, ``float``, ``list[float]``, ...)."""
    args = typing.get_args(annotation)
    if annotation in (int, float):
        return True
    if annotation is bool or (args and bool in args):
        return False
    return bool(args) and any(_numeric(a) for a in args if a is not type(None))


def _check_values(model: type[BaseModel], data: Mapping[str, Any], loc: str, source: Any) -> None:
    """Refuse what pydantic's lax mode would coerce silently: ``true`` / ``false`` for a number (a bool is an
    int in Python), and NaN / Inf for any number (no config of the project means them)."""

    def walk(annotation: Any, value: Any, key: str) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if isinstance(value, Mapping):
                _check_values(annotation, value, key + ".", source)
            return
        if isinstance(value, bool):
            if _numeric(annotation):
                raise ValueError(f"{source}: {key}: expected a number, got {value!r} (true / false is not a number)")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source}: {key}: expected a finite number, got {value!r}")
        elif isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis] or [Any]
            for i, v in enumerate(value):
                walk(args[min(i, len(args) - 1)] if typing.get_origin(annotation) is tuple else args[0], v,
                     f"{key}[{i}]")
        elif isinstance(value, Mapping):
            args = typing.get_args(annotation)
            for k, v in value.items():
                walk(args[1] if len(args) == 2 else Any, v, f"{key}.{k}")

    hints = typing.get_type_hints(model)
    for name, value in data.items():
        if name in model.model_fields:
            walk(hints.get(name, Any), value, f"{loc}{name}")


def validate(model: type[ModelT], data: Any, source: Any) -> ModelT:
    """``model(**data)``, with pydantic's errors turned into one ``ValueError`` (:func:`explain`). Booleans
    where numbers are expected and non-finite numbers are refused first (:func:`_check_values`)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    _check_values(model, data, "", source)
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise ValueError(explain(e, source, model)) from None


def load(model: type[ModelT], name_or_path: str | os.PathLike[str] | None, kind: str = "",
         overrides: Iterable[str] = ()) -> ModelT:
    """Read a preset / YAML file (or start from ``{}``), apply ``--set`` overrides, validate as ``model``."""
    path = find_config(name_or_path, kind) if name_or_path is not None else None
    data = read_yaml(path) if path is not None else {}
    return validate(model, apply_sets(data, overrides), source=path or f"{model.__name__} defaults")
