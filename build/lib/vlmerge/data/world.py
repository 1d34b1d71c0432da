"""A procedurally generated image-text world: scenes of coloured shapes with captions, questions and masks.

Every example is a pure function of ``(seed, split, index, config)``. Its random generators are
``numpy.random.default_rng([seed, SPLITS[split], stream, index, part, purpose])``, so any example is
random-access, the same seed always gives the same data, and splits draw from disjoint streams. A scene's
*content* (objects, captions, questions, label) and its *pixels* use separate generators (``purpose`` 0 and
1): the same scene rendered at 32 or 384 px, with or without noise, has the same objects and text.

* A **scene** holds 1–4 objects, each a shape (:data:`SHAPES`), colour (:data:`COLORS`) and size
  (:data:`SIZES`) at a continuous position with an optional rotation, drawn in order over a textured,
  noisy background (later objects occlude earlier ones).
* Per scene (:class:`Scene`): the image [H, W, 3] uint8; a mask [H, W] uint8 (0 = background, ``k`` = shape
  index + 1 of the object visible at that pixel); 5 captions, each with its :class:`Meaning` (so retrieval
  can count every image a caption truthfully describes, :func:`caption_relevance`); 5 VQA questions, one of each kind in
  :data:`QUESTION_KINDS` where the scene allows it (else an existence question), answered from the one
  vocabulary :data:`ANSWERS`; a class **label**: the shape index of the largest object, the earliest drawn
  one on ties (:data:`NUM_CLASSES` classes).
* **NLVR2-style** examples (:meth:`World.nlvr2`): two scenes and a statement about them that is true or false,
  the label drawn first with probability 1/2 and a statement then sampled until its truth matches.
* **Splits**: ``train`` / ``val`` / ``test`` never contain the (colour, shape) pairs in :data:`HELD_OUT`;
  ``ood`` scenes contain at least one of them and are rendered with a shift: striped background texture,
  inverted background tone and twice the noise.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from numbers import Real
from typing import NamedTuple, TypeVar

import numpy as np

_T = TypeVar("_T")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 135, 25), "cyan": (40, 205, 215), "white": (245, 245, 245),
    "pink": (245, 125, 185), "brown": (125, 75, 35),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}
"""Object radius as a fraction of the image side."""
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "ood": 3}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
    ("purple", "hexagon"), ("orange", "cross"), ("cyan", "diamond"), ("white", "ring"),
})
"""(colour, shape) pairs never seen in train/val/test; every ``ood`` scene has at least one."""
IN_DISTRIBUTION: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)
_HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(sorted(HELD_OUT))

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left", "right", "above", "below")
ANSWERS: tuple[str, ...] = ("yes", "no", "0", "1", "2", "3", "4", *COLOR_NAMES, *SHAPES, *RELATIONS)
"""The one fixed VQA answer vocabulary (every question's answer is in it)."""
ANSWER_TO_ID: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
NUM_CLASSES = len(SHAPES)
NUM_SEG_CLASSES = len(SHAPES) + 1  # + background
QUESTION_KINDS = ("color", "shape", "count", "exists", "relation")
STATEMENT_KINDS = ("more", "both", "exactly_one", "total", "neither")

# Nouns a caption may use for each shape (questions, answers and statements use the canonical name).
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"), "star": ("star",),
    "ring": ("ring", "donut"), "hexagon": ("hexagon",),
}
_PLURAL = {"box": "boxes", "cross": "crosses", "rhombus": "rhombuses", "plus sign": "plus signs"}
_PICTURE = ("image", "picture", "photo", "scene")
_SHOWS = ("shows", "contains", "has", "depicts")
_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_CONVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_EXTENT = 1.15  # every shape lies within this many radii of its centre, whatever its rotation
_SCRATCH = threading.local()


def answer_to_id(answer: str) -> int:
    """Index of ``answer`` in :data:`ANSWERS`; ``ValueError`` for an answer outside the vocabulary."""
    if answer not in ANSWER_TO_ID:
        raise ValueError(f"answer {answer!r} is not in the answer vocabulary; allowed values: "
                         f"{list(ANSWERS)}")
    return ANSWER_TO_ID[answer]


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are generated and rendered; the defaults are the CPU setting.

    Attributes:
        image_size: side of the square images in pixels, an integer in [16, 512] (default 32; 224 and 384
            are the paper's resolutions).
        min_objects: fewest objects per scene, an integer in [1, 4] (default 1).
        max_objects: most objects per scene, an integer in [min_objects, 4] (default 4).
        rotation: rotate each shape by a uniform random angle (default True).
        noise: standard deviation of the per-pixel, per-channel uniform noise in 0..255 units, in [0, 64]
            (default 6; the ``ood`` split doubles it). Uniform noise is bounded: a pixel moves by at most
            ``noise * sqrt(3)`` before clipping to [0, 255].
        texture: add a low-frequency sinusoidal texture to the background (default True).
        min_gap: objects' centres are at least ``min_gap * (r1 + r2)`` apart when 32 random placements
            allow it, else the placement farthest from the others is kept; in [0, 1.5] (default 1.0).
        size_scale: every object's radius is its :data:`SIZES` entry times this, in [0.5, 2] (default 1,
            the world's own sizes). At 32 px with 8-px patches a small object spans about one patch; 2 makes
            shapes span several, which a tiny ViT learns to tell apart in a few hundred steps.
        shapes: the shapes scenes draw from, a non-empty subset of :data:`SHAPES` (default: all 8), kept in
            :data:`SHAPES` order. A smaller vocabulary is what a CPU-sized model learns in minutes; the answer
            vocabulary, class and segmentation label sets stay the full ones (unused entries never occur).
        colors: the colours scenes draw from, a non-empty subset of :data:`COLOR_NAMES` (default: all 10).
            With either subset, the ``ood`` split needs at least one :data:`HELD_OUT` pair inside it.
    """

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 4
    rotation: bool = True
    noise: float = 6.0
    texture: bool = True
    min_gap: float = 1.0
    size_scale: float = 1.0
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLOR_NAMES

    def __post_init__(self) -> None:
        def integer(v: object, lo: int, hi: int) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi

        def number(v: object, lo: float, hi: float) -> bool:
            return isinstance(v, Real) and not isinstance(v, bool) and lo <= v <= hi

        checks = {
            "image_size": (integer(self.image_size, 16, 512), "an integer in [16, 512]"),
            "min_objects": (integer(self.min_objects, 1, 4), "an integer in [1, 4]"),
            "max_objects": (integer(self.max_objects, 1, 4) and self.max_objects >= self.min_objects,
                            f"an integer in [min_objects={self.min_objects}, 4]"),
            "rotation": (isinstance(self.rotation, bool), "True or False"),
            "noise": (number(self.noise, 0, 64), "a number in [0, 64]"),
            "texture": (isinstance(self.texture, bool), "True or False"),
            "min_gap": (number(self.min_gap, 0, 1.5), "a number in [0, 1.5]"),
            "size_scale": (number(self.size_scale, 0.5, 2), "a number in [0.5, 2]"),
            "shapes": (_subset(self.shapes, SHAPES), f"a non-empty list of distinct names from {list(SHAPES)}"),
            "colors": (_subset(self.colors, COLOR_NAMES),
                       f"a non-empty list of distinct names from {list(COLOR_NAMES)}"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"world config: {name}={getattr(self, name)!r} is invalid; "
                                 f"allowed values: {allowed}")
        # canonical order, so a subset names one world however it is listed (and caches match)
        object.__setattr__(self, "shapes", tuple(x for x in SHAPES if x in self.shapes))
        object.__setattr__(self, "colors", tuple(x for x in COLOR_NAMES if x in self.colors))
        if not self.in_distribution:
            raise ValueError(f"world config: colors={list(self.colors)} and shapes={list(self.shapes)} leave no "
                             f"(colour, shape) pair outside the held-out ones {sorted(HELD_OUT)}")

    @property
    def in_distribution(self) -> tuple[tuple[str, str], ...]:
        """(colour, shape) pairs of train/val/test scenes: the vocabulary's pairs outside :data:`HELD_OUT`."""
        return tuple((c, s) for c in self.colors for s in self.shapes if (c, s) not in HELD_OUT)

    @property
    def held_out(self) -> tuple[tuple[str, str], ...]:
        """The :data:`HELD_OUT` pairs inside the vocabulary, sorted: what ``ood`` scenes force one object to."""
        return tuple(p for p in _HELD_OUT_PAIRS if p[0] in self.colors and p[1] in self.shapes)

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        """Build from a plain dict (e.g. a YAML section); unknown keys raise ``ValueError`` naming the known
        ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"world config: unknown keys {unknown}; allowed keys: {known}")
        d = {k: tuple(v) if k in ("shapes", "colors") and isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def _subset(values: object, vocabulary: tuple[str, ...]) -> bool:
    return (isinstance(values, tuple) and len(values) > 0 and len(set(values)) == len(values)
            and all(isinstance(v, str) and v in vocabulary for v in values))


@dataclass(frozen=True)
class Obj:
    """One object; its centre ``(x, y)`` is in fractions of the image side (0 = left / top); its radius is
    ``SIZES[size] * scale`` (``scale``: the world's ``size_scale``)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    angle: float  # radians
    scale: float = 1.0

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale


@dataclass(frozen=True)
class QA:
    """A VQA question, its answer (in :data:`ANSWERS`) and its kind (in :data:`QUESTION_KINDS`)."""

    question: str
    answer: str
    kind: str

    @property
    def answer_id(self) -> int:
        return ANSWER_TO_ID[self.answer]


@dataclass
class Scene:
    """One generated example. ``image`` [H, W, 3] uint8, ``mask`` [H, W] uint8 (0 = background, k = shape
    index + 1); ``label`` is the shape index of the largest object; ``shift`` marks the OOD rendering."""

    objects: list[Obj]
    image: np.ndarray
    mask: np.ndarray
    captions: list[str]
    questions: list[QA]
    label: int
    shift: bool = False
    meanings: list[Meaning] | None = None  # what each caption asserts (None: read from an old cache)

    @property
    def label_name(self) -> str:
        return SHAPES[self.label]


@dataclass(frozen=True)
class Statement:
    """An NLVR2-style statement about a (left, right) pair of scenes: ``kind`` (:data:`STATEMENT_KINDS`)
    and its arguments: more (side, shape) | both (colour,) | exactly_one (shape,) | total (n,) |
    neither (colour, shape)."""

    kind: str
    args: tuple

    @property
    def text(self) -> str:
        k, a = self.kind, self.args
        if k == "more":
            other = "right" if a[0] == "left" else "left"
            return f"the {a[0]} image has more {_plural(a[1])} than the {other} image"
        if k == "both":
            return f"both images contain {_article(a[0])} {a[0]} object"
        if k == "exactly_one":
            return f"exactly one image contains a {a[0]}"
        if k == "total":
            return f"there are {NUMBER_WORDS[a[0]]} objects in total in the two images"
        return f"neither image contains {_article(a[0])} {a[0]} {a[1]}"

    def holds(self, left: list[Obj], right: list[Obj]) -> bool:
        """Whether the statement is true of the (left, right) scenes' objects."""
        k, a = self.kind, self.args
        if k == "more":
            first, second = (left, right) if a[0] == "left" else (right, left)
            return sum(o.shape == a[1] for o in first) > sum(o.shape == a[1] for o in second)
        if k == "both":
            return any(o.color == a[0] for o in left) and any(o.color == a[0] for o in right)
        if k == "exactly_one":
            return any(o.shape == a[0] for o in left) != any(o.shape == a[0] for o in right)
        if k == "total":
            return len(left) + len(right) == a[0]
        return not any(o.color == a[0] and o.shape == a[1] for o in left + right)


class NLVR2Example(NamedTuple):
    """Two scenes (their ``.image`` is what the model sees), a statement and whether it is true."""

    left: Scene
    right: Scene
    statement: Statement
    label: bool


# ---------------------------------------------------------------------------------------------- rendering
def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of ``shape`` at coordinates (u, v) in units of the object's radius, centred on it,
    v pointing down (every shape lies within |(u, v)| ≤ 1.15). Returns a bool array of u's shape."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":  # apex up
        return (v <= 0.6) & (au <= (v + 0.95) * 0.55)
    if shape == "diamond":  # a rhombus 0.6 times as wide as tall, so no rotation turns it into a square
        return au / 0.6 + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "star":
        return np.sqrt(u * u + v * v) <= 0.7 + 0.3 * np.cos(5 * np.arctan2(v, u))
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.36)
    if shape == "hexagon":
        return np.maximum(av, 0.866 * au + 0.5 * av) <= 0.87
    raise ValueError(f"unknown shape {shape!r}; allowed values: {list(SHAPES)}")


def object_footprint(obj: Obj, size: int) -> tuple[slice, slice, np.ndarray]:
    """The pixels ``obj`` covers in a ``size``-pixel image: (row slice, column slice, inside [h, w] bool),
    computed on the object's bounding box only."""
    reach = _EXTENT * obj.radius
    r0, r1 = max(0, int((obj.y - reach) * size)), min(size, int(np.ceil((obj.y + reach) * size)))
    c0, c1 = max(0, int((obj.x - reach) * size)), min(size, int(np.ceil((obj.x + reach) * size)))
    ys = ((np.arange(r0, r1, dtype=np.float32) + 0.5) / size - obj.y)[:, None] / obj.radius
    xs = ((np.arange(c0, c1, dtype=np.float32) + 0.5) / size - obj.x)[None, :] / obj.radius
    c, s = np.float32(np.cos(obj.angle)), np.float32(np.sin(obj.angle))
    return slice(r0, r1), slice(c0, c1), shape_mask(obj.shape, c * xs + s * ys, c * ys - s * xs)


def _scratch(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 buffers of ``shape``, reused by this thread's renders: fresh large allocations are
    page-faulted in on every call, which otherwise dominates rendering time at 224 px and above."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].shape != shape:
        bufs = _SCRATCH.bufs = (np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32))
    return bufs


def paint_background(canvas: np.ndarray, config: WorldConfig, rng: np.random.Generator,
                     shift: bool = False) -> None:
    """Fill ``canvas`` [3, S, S] float32 (channel-first, 0..255 units) with the background: a random tone
    plus (``texture``) a low-frequency sinusoid; under the OOD ``shift``, plus square-wave stripes, with the
    tone inverted."""
    s = config.image_size
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s
    xx, yy = coords[None, :], coords[:, None]
    tone = rng.uniform(70, 130, size=3).astype(np.float32)
    pattern = np.zeros((s, s), dtype=np.float32)
    if config.texture:
        fx, fy, phase = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        pattern += 18 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    if shift:
        pattern += 35 * np.sign(np.sin(2 * np.pi * (xx + yy) / rng.uniform(0.1, 0.2)))
        tone, pattern = 255 - tone, -pattern
    np.add(tone[:, None, None], pattern[None], out=canvas)


def render(objects: list[Obj], config: WorldConfig, rng: np.random.Generator, shift: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``objects`` in order over :func:`paint_background`, then add uniform noise of standard
    deviation ``config.noise`` (doubled under ``shift``). Returns the image [S, S, 3] uint8 (a view of
    channel-first memory, so ``image.transpose(2, 0, 1)`` is contiguous) and the mask [S, S] uint8."""
    s = config.image_size
    canvas, noise = _scratch((3, s, s))
    paint_background(canvas, config, rng, shift)
    mask = np.zeros((s, s), dtype=np.uint8)
    for obj in objects:
        rows, cols, inside = object_footprint(obj, s)
        for channel, value in zip(canvas, COLORS[obj.color], strict=True):
            channel[rows, cols][inside] = value
        mask[rows, cols][inside] = SHAPES.index(obj.shape) + 1
    sigma = config.noise * (2.0 if shift else 1.0)
    if sigma > 0:  # uniform on [-sigma * sqrt(3), sigma * sqrt(3)): standard deviation sigma
        rng.random(dtype=np.float32, out=noise)
        noise -= 0.5
        noise *= np.float32(sigma * math.sqrt(12))
        canvas += noise
    np.clip(canvas, 0, 255, out=canvas)
    np.rint(canvas, out=canvas)
    return canvas.astype(np.uint8).transpose(1, 2, 0), mask


# ------------------------------------------------------------------------------------------------- scenes
def sample_objects(rng: np.random.Generator, config: WorldConfig, ood: bool = False) -> list[Obj]:
    """``min_objects``–``max_objects`` objects; in-distribution scenes draw (colour, shape) pairs from
    ``config.in_distribution``, OOD scenes force one random object to a pair of ``config.held_out``."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    allowed, held_out = config.in_distribution, config.held_out
    pairs = [allowed[k] for k in rng.integers(len(allowed), size=n)]
    if ood:
        pairs[int(rng.integers(n))] = held_out[int(rng.integers(len(held_out)))]
    sizes = rng.integers(2, size=n).tolist()
    angles = rng.uniform(0, 2 * np.pi, size=n).tolist() if config.rotation else [0.0] * n
    objs: list[Obj] = []
    for (color, shape), size_k, angle in zip(pairs, sizes, angles, strict=True):
        size = ("small", "large")[size_k]
        r = SIZES[size] * config.size_scale
        best, best_slack = (0.5, 0.5), -math.inf
        for x, y in rng.uniform(r, 1 - r, size=(32, 2)).tolist():
            # The first placement far enough from every placed object, else the one farthest from them.
            slack = min((math.hypot(x - o.x, y - o.y) - config.min_gap * (r + o.radius) for o in objs),
                        default=0.0)
            if slack > best_slack:
                best, best_slack = (x, y), slack
            if slack >= 0:
                break
        objs.append(Obj(shape, color, size, best[0], best[1], angle, config.size_scale))
    return objs


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b`` along the dominant axis (``left``/``right``/``above``/``below``), or
    None when their centres are within 0.15 of the image side on both axes."""
    dx, dy = a.x - b.x, a.y - b.y
    if max(abs(dx), abs(dy)) < 0.15:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class Draws:
    """Cheap random choices for the text grammar: uniform floats drawn from a generator in blocks (one
    numpy call per 64 choices instead of one per choice)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng, self._buf = rng, []

    def random(self) -> float:
        """A uniform float in [0, 1)."""
        if not self._buf:
            self._buf = self._rng.random(64).tolist()[::-1]
        return self._buf.pop()

    def index(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        return int(self.random() * n)

    def pick(self, options: Sequence[_T]) -> _T:
        return options[self.index(len(options))]

    def flip(self) -> bool:
        return self.random() < 0.5

    def shuffled(self, items: Sequence[_T]) -> list[_T]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
            j = self.index(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


def _phrase(o: Obj, draws: Draws, with_size: bool, det: str = "a") -> str:
    """``a large red disk`` / ``the red circle`` (a synonym of the shape, optionally its size)."""
    words = f"{o.size + ' ' if with_size else ''}{o.color} {draws.pick(SHAPE_SYNONYMS[o.shape])}"
    return f"{_article(words) if det == 'a' else det} {words}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _number(n: int, singular: str, plural: str) -> str:
    return f"{NUMBER_WORDS[n]} {singular if n == 1 else plural}"


class Meaning(NamedTuple):
    """What a caption asserts about a scene, testable on any scene's objects (:meth:`holds`).

    An object descriptor is ``(size, colour, shape)`` with ``size == ""`` for any size. Kinds and ``args``:

    * ``objects`` ``(descriptors...)``, sorted: the scene's objects are exactly these (a listing);
    * ``count`` ``(n,)``: the scene has n objects;
    * ``shape_counts`` ``((shape, n)...)``: exactly these shapes occur, each n times;
    * ``colors`` ``(colours...)``: exactly these colours occur;
    * ``has`` ``(descriptor,)``: some object fits the descriptor;
    * ``relation`` ``(descriptor a, rel, descriptor b)``: two objects fit a and b with ``relation(a, b) == rel``;
    * ``position`` ``(descriptor, where)``: an object fits it with its centre ``left`` (x < 0.4), ``right``
      (x > 0.6) or ``middle``.
    """

    kind: str
    args: tuple

    def holds(self, objs: Sequence[Obj]) -> bool:
        """Whether the caption is true of a scene with ``objs``."""
        k, a = self.kind, self.args
        if k == "objects":
            return len(a) == len(objs) and a == _descriptors(objs, bool(a) and a[0][0] != "")
        if k == "count":
            return len(objs) == a[0]
        if k == "shape_counts":
            return a == _shape_counts(objs)
        if k == "colors":
            return a == _colors(objs)
        if k == "has":
            return any(_fits(o, a[0]) for o in objs)
        if k == "relation":
            return any(_fits(x, a[0]) and _fits(y, a[2]) and relation(x, y) == a[1]
                       for x in objs for y in objs if x is not y)
        if k == "position":
            return any(_fits(o, a[0]) and _where(o) == a[1] for o in objs)
        raise ValueError(f"unknown caption meaning {k!r}")


def _descriptor(o: Obj, with_size: bool) -> tuple[str, str, str]:
    return (o.size if with_size else "", o.color, o.shape)


def _descriptors(objs: Sequence[Obj], with_size: bool) -> tuple[tuple[str, str, str], ...]:
    return tuple(sorted(_descriptor(o, with_size) for o in objs))


def _shape_counts(objs: Sequence[Obj]) -> tuple[tuple[str, int], ...]:
    return tuple((s, sum(o.shape == s for o in objs)) for s in SHAPES if any(o.shape == s for o in objs))


def _colors(objs: Sequence[Obj]) -> tuple[str, ...]:
    return tuple(c for c in COLOR_NAMES if any(o.color == c for o in objs))


def _fits(o: Obj, d: tuple[str, str, str]) -> bool:
    return o.color == d[1] and o.shape == d[2] and d[0] in ("", o.size)


def _where(o: Obj) -> str:
    return "left" if o.x < 0.4 else "right" if o.x > 0.6 else "middle"


_WHERE_PHRASE = {"left": "on the left", "right": "on the right", "middle": "in the middle"}


def make_captions(objs: list[Obj], draws: Draws) -> list[tuple[str, Meaning]]:
    """5 captions from a small grammar with synonyms and varied word order, each with its :class:`Meaning`.
    The first lists every object with its size and colour (so each scene has a complete caption); the other
    4 are drawn without replacement from six templates: listing, count, per-shape counts, colours, one
    object's size, and a spatial relation (or, with no clear relation, the position of one object). Each
    template has 2–4 phrasings; only the drawn one is built."""
    pic, shows = draws.pick(_PICTURE), draws.pick(_SHOWS)
    be = "is" if len(objs) == 1 else "are"

    def listing(with_size: bool) -> tuple[str, Meaning]:
        text = _join([_phrase(o, draws, with_size) for o in draws.shuffled(objs)])
        return text, Meaning("objects", _descriptors(objs, with_size))

    def listing_caption() -> tuple[str, Meaning]:
        k = draws.index(3)
        if k == 0:
            text, meaning = listing(False)
            return f"the {pic} {shows} {text}", meaning
        if k == 1:
            text, meaning = listing(False)
            return f"{text} in the {pic}", meaning
        text, meaning = listing(draws.flip())
        return f"in the {pic} there {be} {text}", meaning

    def count_caption() -> tuple[str, Meaning]:
        n = _number(len(objs), *draws.pick((("object", "objects"), ("shape", "shapes"))))
        k = draws.index(3)
        if k == 0:
            return f"there {be} {n} in the {pic}", Meaning("count", (len(objs),))
        if k == 1:
            text, meaning = listing(draws.flip())
            return f"{n}: {text}", meaning
        return f"the {pic} {shows} {n}", Meaning("count", (len(objs),))

    def shape_count_caption() -> tuple[str, Meaning]:
        shapes = draws.shuffled([s for s in SHAPES if any(o.shape == s for o in objs)])
        counts = _join([_number(sum(o.shape == s for o in objs), s, _plural(s)) for s in shapes])
        meaning = Meaning("shape_counts", _shape_counts(objs))
        return (f"{_article(pic)} {pic} with {counts}" if draws.flip() else counts), meaning

    def color_caption() -> tuple[str, Meaning]:
        colors = _join(draws.shuffled([c for c in COLOR_NAMES if any(o.color == c for o in objs)]))
        noun = "object" if len(objs) == 1 else "objects"
        meaning = Meaning("colors", _colors(objs))
        if draws.flip():
            return f"{colors} {noun} in {_article(pic)} {pic}", meaning
        return f"the {pic} {shows} {colors} {noun}", meaning

    def size_caption() -> tuple[str, Meaning]:
        o = draws.pick(objs)
        meaning = Meaning("has", (_descriptor(o, True),))
        if draws.flip():
            return f"{_phrase(o, draws, False, 'the')} is {o.size}", meaning
        return f"there is {_phrase(o, draws, True)}", meaning

    def relation_caption() -> tuple[str, Meaning]:
        pairs = [(a, b) for a in objs for b in objs if a is not b and relation(a, b)]
        if not pairs:
            o = objs[0]
            where = _where(o)
            meaning = Meaning("position", (_descriptor(o, True), where))
            if draws.flip():
                return f"{_phrase(o, draws, True)} {_WHERE_PHRASE[where]}", meaning
            return f"{_WHERE_PHRASE[where]} there is {_phrase(o, draws, True)}", meaning
        a, b = draws.pick(pairs)
        rel = relation(a, b)
        phrase, converse = _RELATION_PHRASE[rel], _RELATION_PHRASE[_CONVERSE[rel]]
        k = draws.index(4)
        sized = k == 1
        meaning = Meaning("relation", (_descriptor(a, sized), rel, _descriptor(b, sized)))
        if k == 0:
            return f"{_phrase(a, draws, False)} {phrase} {_phrase(b, draws, False)}", meaning
        if k == 1:
            return f"{_phrase(a, draws, True, 'the')} is {phrase} {_phrase(b, draws, True, 'the')}", meaning
        if k == 2:
            return f"{phrase} {_phrase(b, draws, False)} there is {_phrase(a, draws, False)}", meaning
        # "the b is <converse> the a": relation(b, a) is the converse of relation(a, b), so a's meaning holds
        return f"{_phrase(b, draws, False, 'the')} is {converse} {_phrase(a, draws, False, 'the')}", meaning

    templates = (listing_caption, count_caption, shape_count_caption, color_caption, size_caption,
                 relation_caption)
    return [listing(True), *(template() for template in draws.shuffled(templates)[:4])]


def caption_relevance(meanings: Sequence[Meaning], scenes: Sequence[Sequence[Obj]]) -> np.ndarray:
    """``relevant`` [T, I] bool: caption t (its meaning) is true of scene i (its objects).

    Equal to ``[[m.holds(objs) for objs in scenes] for m in meanings]``, computed fast: exact kinds
    (``objects``, ``count``, ``shape_counts``, ``colors``) by looking up each scene's signature; the rest by
    :meth:`Meaning.holds` on the scenes that hold every object the caption names.
    """
    out = np.zeros((len(meanings), len(scenes)), dtype=bool)
    signatures: dict[tuple, list[int]] = {}
    having: dict[tuple[str, str], set[int]] = {}
    for i, objs in enumerate(scenes):
        for sig in (("objects", _descriptors(objs, True)), ("objects", _descriptors(objs, False)),
                    ("count", (len(objs),)), ("shape_counts", _shape_counts(objs)), ("colors", _colors(objs))):
            signatures.setdefault(sig, []).append(i)
        for o in objs:
            having.setdefault((o.color, o.shape), set()).add(i)
    unique: dict[Meaning, list[int]] = {}
    for t, m in enumerate(meanings):
        unique.setdefault(Meaning(m.kind, m.args), []).append(t)
    for m, rows in unique.items():
        if m.kind in ("objects", "count", "shape_counts", "colors"):
            cols = signatures.get((m.kind, m.args), [])
        else:
            named = [m.args[0], m.args[2]] if m.kind == "relation" else [m.args[0]]
            candidates = set.intersection(*(having.get((d[1], d[2]), set()) for d in named))
            cols = [i for i in sorted(candidates) if m.holds(scenes[i])]
        if cols:
            out[np.ix_(rows, cols)] = True
    return out


def make_questions(objs: list[Obj], draws: Draws, config: WorldConfig | None = None) -> list[QA]:
    """One question of each kind in :data:`QUESTION_KINDS`; a kind the scene cannot support (colour needs a
    shape that occurs once, shape a colour that occurs once, relation two such shapes clearly apart) is
    replaced by an existence question. Existence questions ask about a present object half of the time and
    avoid repeating an earlier question of the scene where 10 tries allow. Absent objects and shapes are
    drawn from ``config``'s vocabulary (default: the full one)."""
    config = config or WorldConfig()
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    qs: list[QA] = []

    def exists() -> QA:
        for _ in range(10):
            o = draws.pick(objs)
            c, s = (o.color, o.shape) if draws.flip() else (draws.pick(config.colors), draws.pick(config.shapes))
            present = any(ob.color == c and ob.shape == s for ob in objs)
            qa = QA(f"is there {_article(c)} {c} {s}?", "yes" if present else "no", "exists")
            if qa not in qs:
                break
        return qa

    unique_shapes = [s for s in shapes if shapes.count(s) == 1]
    if unique_shapes:
        s = draws.pick(unique_shapes)
        qs.append(QA(f"what color is the {s}?", colors[shapes.index(s)], "color"))
    else:
        qs.append(exists())
    unique_colors = [c for c in colors if colors.count(c) == 1]
    if unique_colors:
        c = draws.pick(unique_colors)
        qs.append(QA(f"what shape is the {c} object?", shapes[colors.index(c)], "shape"))
    else:
        qs.append(exists())
    u = draws.random()
    if u < 0.4:
        qs.append(QA("how many objects are there?", str(len(objs)), "count"))
    elif u < 0.7:
        c = draws.pick(colors)
        qs.append(QA(f"how many {c} objects are there?", str(colors.count(c)), "count"))
    else:
        s = draws.pick(config.shapes) if draws.random() < 0.3 else draws.pick(shapes)
        qs.append(QA(f"how many {_plural(s)} are there?", str(shapes.count(s)), "count"))
    qs.append(exists())
    pairs = [(a, b) for a in objs for b in objs
             if a is not b and relation(a, b) and shapes.count(a.shape) == 1 and shapes.count(b.shape) == 1]
    if pairs:
        a, b = draws.pick(pairs)
        qs.append(QA(f"where is the {a.shape} relative to the {b.shape}?", relation(a, b), "relation"))
    else:
        qs.append(exists())
    return qs


def _random_statement(draws: Draws, left: list[Obj], right: list[Obj], colors: Sequence[str]) -> Statement:
    kind, o = draws.pick(STATEMENT_KINDS), draws.pick(left + right)
    if kind == "more":
        return Statement(kind, (draws.pick(("left", "right")), o.shape))
    if kind == "both":
        return Statement(kind, (o.color,))
    if kind == "exactly_one":
        return Statement(kind, (o.shape,))
    if kind == "total":
        return Statement(kind, (len(left) + len(right) + draws.pick((-1, 0, 1)),))
    return Statement(kind, (o.color if draws.flip() else draws.pick(colors), o.shape))


# -------------------------------------------------------------------------------------------------- world
class World:
    """Random access to one split of the world: ``world[i]`` is a :class:`Scene`, ``world.nlvr2(i)`` an
    :class:`NLVR2Example`; both are pure functions of ``(config, split, seed, i)``."""

    def __init__(self, config: WorldConfig | None = None, split: str = "train", seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed values: {list(SPLITS)}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"world seed={seed!r} is invalid; allowed values: an integer ≥ 0")
        self.config = config or WorldConfig()
        self.split, self.seed = split, int(seed)
        self.ood = split == "ood"
        if self.ood and not self.config.held_out:
            raise ValueError(f"world config: the ood split needs a held-out (colour, shape) pair inside colors="
                             f"{list(self.config.colors)} and shapes={list(self.config.shapes)}; held-out pairs: "
                             f"{sorted(HELD_OUT)}")

    def __repr__(self) -> str:
        return f"World({self.config}, split={self.split!r}, seed={self.seed})"

    def _rng(self, stream: int, index: int, part: int, purpose: int) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"world index must be an integer ≥ 0, got {index!r}")
        return np.random.default_rng([self.seed, SPLITS[self.split], stream, int(index), part, purpose])

    def _content(self, stream: int, index: int, part: int
                 ) -> tuple[list[Obj], list[tuple[str, Meaning]], list[QA], int]:
        rng = self._rng(stream, index, part, 0)
        objs = sample_objects(rng, self.config, self.ood)
        draws = Draws(rng)
        largest = max(range(len(objs)), key=lambda k: (objs[k].radius, -k))
        label = SHAPES.index(objs[largest].shape)
        return objs, make_captions(objs, draws), make_questions(objs, draws, self.config), label

    def _scene(self, stream: int, index: int, part: int) -> Scene:
        objs, captions, questions, label = self._content(stream, index, part)
        image, mask = render(objs, self.config, self._rng(stream, index, part, 1), shift=self.ood)
        return Scene(objs, image, mask, [c for c, _ in captions], questions, label, self.ood,
                     [m for _, m in captions])

    def __getitem__(self, index: int) -> Scene:
        return self._scene(0, index, 0)

    def content(self, index: int) -> Scene:
        """Scene ``index`` without its pixels (``image`` and ``mask`` are empty [0, 0] arrays): objects,
        captions with their meanings, questions and label, at a fraction of a render's cost."""
        objs, captions, questions, label = self._content(0, index, 0)
        empty = np.zeros((0, 0), dtype=np.uint8)
        return Scene(objs, empty, empty, [c for c, _ in captions], questions, label, self.ood,
                     [m for _, m in captions])

    def nlvr2(self, index: int) -> NLVR2Example:
        """NLVR2-style example ``index``: two scenes and a statement, true with probability 1/2."""
        left, right = self._scene(1, index, 0), self._scene(1, index, 1)
        return NLVR2Example(left, right, *self._statement(index, left.objects, right.objects))

    def _statement(self, index: int, left: list[Obj], right: list[Obj]) -> tuple[Statement, bool]:
        """The label is drawn first, then random statements until one's truth equals it (up to 200 tries;
        else a ``total`` statement made to fit)."""
        draws = Draws(self._rng(1, index, 2, 0))
        label = draws.flip()
        for _ in range(200):
            st = _random_statement(draws, left, right, self.config.colors)
            if st.holds(left, right) == label:
                return st, label
        total = len(left) + len(right)
        return Statement("total", (total if label else total + 1,)), label

    def texts(self, n: int) -> list[str]:
        """Captions, questions and NLVR2 statements of the first ``n`` examples (no pixels are rendered);
        the corpus the default tokenizer is trained on."""
        out: list[str] = []
        for i in range(n):
            _, captions, questions, _ = self._content(0, i, 0)
            out += [c for c, _ in captions] + [q.question for q in questions]
            left, right = self._content(1, i, 0)[0], self._content(1, i, 1)[0]
            out.append(self._statement(i, left, right)[0].text)
        return out
