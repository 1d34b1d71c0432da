"""A procedurally generated image-text world: scenes of coloured shapes with captions, questions and masks.

Every example is a pure function of ``(seed, split, index, config)``: its random generator is
``numpy.random.default_rng([seed, SPLITS[split], index])``, so any example is random-access, the same seed
always gives the same data, and splits draw from disjoint streams.

* A **scene** holds 1–4 objects, each a shape (:data:`SHAPES`), colour (:data:`COLORS`) and size
  (:data:`SIZES`) at a continuous position with an optional rotation, drawn in order over a textured,
  noisy background (later objects occlude earlier ones).
* Per scene: the image [H, W, 3] uint8; a mask [H, W] (0 = background, ``k`` = shape index + 1 of the
  visible object); 5 captions; VQA questions of five kinds with answers in :data:`ANSWERS`; a class label
  (the shape of the largest object, earliest drawn on ties; :data:`NUM_CLASSES` classes).
* **NLVR2-style** examples: two scenes and a statement that is true or false (balanced by construction).
* **Splits**: ``train`` / ``val`` / ``test`` never contain the (colour, shape) pairs in :data:`HELD_OUT`;
  ``ood`` contains at least one held-out pair per scene and renders with a shifted background texture,
  contrast and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 135, 25), "cyan": (40, 205, 215), "white": (245, 245, 245),
    "pink": (245, 125, 185), "brown": (125, 75, 35),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}  # radius as a fraction of the image side
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "ood": 3}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
    ("purple", "hexagon"), ("orange", "cross"), ("cyan", "diamond"), ("white", "ring"),
})
"""(colour, shape) pairs never seen in train/val/test; every ``ood`` scene has at least one."""

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
ANSWERS: tuple[str, ...] = ("yes", "no", "0", "1", "2", "3", "4", *COLOR_NAMES, *SHAPES, *RELATIONS)
"""The one fixed VQA answer vocabulary."""
ANSWER_TO_ID: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
NUM_CLASSES = len(SHAPES)
NUM_SEG_CLASSES = len(SHAPES) + 1  # + background
QUESTION_KINDS = ("color", "shape", "count", "exists", "relation")

# Words a caption may use for each shape (the first is the canonical name used in questions and answers).
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign"), "star": ("star",),
    "ring": ("ring", "donut"), "hexagon": ("hexagon",),
}
_PLURAL = {"box": "boxes", "cross": "crosses", "rhombus": "rhombuses", "plus sign": "plus signs"}
_PICTURE = ("image", "picture", "photo", "scene")
_SHOWS = ("shows", "contains", "has", "depicts")


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are generated and rendered. Defaults are the CPU setting (32 px)."""

    image_size: int = 32  # square images, pixels; 16 .. 512
    min_objects: int = 1
    max_objects: int = 4
    rotation: bool = True  # rotate shapes by a random angle
    noise: float = 6.0  # std of per-pixel Gaussian noise, in 0..255 units
    texture: bool = True  # low-frequency background texture
    min_gap: float = 1.0  # objects' centres at least min_gap * (r1 + r2) apart (re-drawn up to 30 times)

    def __post_init__(self) -> None:
        checks = {
            "image_size": (16 <= self.image_size <= 512, "an integer in [16, 512]"),
            "min_objects": (1 <= self.min_objects <= 4, "an integer in [1, 4]"),
            "max_objects": (self.min_objects <= self.max_objects <= 4, "an integer in [min_objects, 4]"),
            "noise": (0 <= self.noise <= 64, "a number in [0, 64]"),
            "min_gap": (0 <= self.min_gap <= 1.5, "a number in [0, 1.5]"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"world config: {name}={getattr(self, name)!r} is invalid; expected {expected}")

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"world config: unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of width (0 = left)
    y: float  # centre, fraction of height (0 = top)
    angle: float  # radians

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS

    @property
    def answer_id(self) -> int:
        return ANSWER_TO_ID[self.answer]


@dataclass
class Scene:
    """One generated example. ``image`` [H, W, 3] uint8, ``mask`` [H, W] uint8."""

    objects: list[Obj]
    image: np.ndarray
    mask: np.ndarray
    captions: list[str]
    questions: list[QA]
    label: int
    shift: bool = False  # rendered with the OOD rendering shift

    @property
    def label_name(self) -> str:
        return SHAPES[self.label]


@dataclass(frozen=True)
class Statement:
    """An NLVR2-style statement about a (left, right) pair of scenes: ``kind`` and its arguments."""

    kind: str  # more | both | exactly_one | total
    args: tuple = field(default_factory=tuple)

    @property
    def text(self) -> str:
        k, a = self.kind, self.args
        if k == "more":
            return f"the left image has more {_plural(a[0])} than the right image"
        if k == "both":
            return f"both images contain a {a[0]} object"
        if k == "exactly_one":
            return f"exactly one image contains a {a[0]}"
        return f"there are {NUMBER_WORDS[a[0]] if a[0] < 5 else a[0]} objects in total in the two images"


# ---------------------------------------------------------------------------------------------- rendering
def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of ``shape`` on coordinates (u, v) normalised by the object's radius (|u|, |v| ≲ 1)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":  # apex up (image y grows downwards)
        return (v <= 0.6) & (au <= (v + 0.95) * 0.55)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "star":
        rho, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)
        return rho <= 0.7 + 0.3 * np.cos(5 * theta)
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.36)
    if shape == "hexagon":
        return np.maximum(av, 0.866 * au + 0.5 * av) <= 0.87
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: list[Obj], config: WorldConfig, rng: np.random.Generator, shift: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``objects`` in order: image [S, S, 3] uint8 and mask [S, S] uint8 (0 = background)."""
    s = config.image_size
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s
    xx, yy = coords[None, :], coords[:, None]
    # Background: a base tone, a low-frequency texture, (OOD) stripes and inverted contrast.
    base = rng.uniform(70, 130, size=3).astype(np.float32)
    img = np.broadcast_to(base, (s, s, 3)).copy()
    if config.texture:
        fx, fy, ph = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        img += (18 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph))[..., None]
    if shift:
        period = rng.uniform(0.1, 0.2)
        img += (35 * np.sign(np.sin(2 * np.pi * (xx + yy) / period)))[..., None]
        img = 255 - img  # darker or lighter backgrounds than in-distribution
    mask = np.zeros((s, s), dtype=np.uint8)
    for obj in objects:
        c, si = np.cos(obj.angle), np.sin(obj.angle)
        dx, dy = (xx - obj.x) / obj.radius, (yy - obj.y) / obj.radius
        inside = shape_mask(obj.shape, c * dx + si * dy, -si * dx + c * dy)
        img[inside] = COLORS[obj.color]
        mask[inside] = SHAPES.index(obj.shape) + 1
    noise = config.noise * (2.0 if shift else 1.0)
    if noise > 0:
        img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), mask


# ------------------------------------------------------------------------------------------------- scenes
def sample_objects(rng: np.random.Generator, config: WorldConfig, ood: bool = False) -> list[Obj]:
    """1–4 objects; in-distribution scenes avoid :data:`HELD_OUT` pairs, OOD scenes contain at least one."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    held = sorted(HELD_OUT)
    forced = int(rng.integers(n)) if ood else -1
    objs: list[Obj] = []
    for i in range(n):
        if i == forced:
            color, shape = held[int(rng.integers(len(held)))]
        else:
            while True:
                color, shape = COLOR_NAMES[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
                if (color, shape) not in HELD_OUT:
                    break
        size = ("small", "large")[int(rng.integers(2))]
        r = SIZES[size]
        for _ in range(30):
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(np.hypot(x - o.x, y - o.y) >= config.min_gap * (r + o.radius) for o in objs):
                break
        angle = float(rng.uniform(0, 2 * np.pi)) if config.rotation else 0.0
        objs.append(Obj(shape, color, size, float(x), float(y), angle))
    return objs


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


def _count_phrase(n: int, word: str) -> str:
    return f"{NUMBER_WORDS[n]} {word if n == 1 else _plural(word)}"


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b`` along the dominant axis, or None when they are too close to say."""
    dx, dy = a.x - b.x, a.y - b.y
    if max(abs(dx), abs(dy)) < 0.15:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _relation_phrase(rel: str) -> str:
    return {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[rel]


def _describe(o: Obj, rng: np.random.Generator, with_size: bool) -> str:
    noun = SHAPE_SYNONYMS[o.shape][int(rng.integers(len(SHAPE_SYNONYMS[o.shape])))]
    return f"a {o.size + ' ' if with_size else ''}{o.color} {noun}"


def make_captions(objs: list[Obj], rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` captions from a small grammar: listings, counts, relations, varied word order and synonyms.

    The first caption always names every object (colour and shape), so each scene has a faithful caption.
    """
    def listing(with_size: bool) -> str:
        order = rng.permutation(len(objs))
        parts = [_describe(objs[i], rng, with_size) for i in order]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def templates() -> list[str]:
        pic, shows = _PICTURE[int(rng.integers(4))], _SHOWS[int(rng.integers(4))]
        count = f"{NUMBER_WORDS[len(objs)]} {'object' if len(objs) == 1 else 'objects'}"
        out = [f"{listing(True)}", f"the {pic} {shows} {listing(False)}", f"{count}: {listing(bool(rng.integers(2)))}",
               f"there {'is' if len(objs) == 1 else 'are'} {count} in the {pic}"]
        shapes = sorted({o.shape for o in objs})
        counts = [_count_phrase(sum(o.shape == s for o in objs), s) for s in shapes]
        out.append(f"a {pic} with " + " and ".join(counts))
        pairs = [(a, b) for a in objs for b in objs if a is not b and relation(a, b)]
        if pairs:
            a, b = pairs[int(rng.integers(len(pairs)))]
            rel = _relation_phrase(relation(a, b))  # type: ignore[arg-type]
            out.append(f"{_describe(a, rng, False)} {rel} {_describe(b, rng, False)}")
            out.append(f"{_describe(a, rng, True)} is {rel} {_describe(b, rng, True)}".replace(" a ", " the ", 1))
        else:
            o = objs[0]
            side = ("on the left" if o.x < 0.4 else "on the right" if o.x > 0.6 else "in the middle")
            out.append(f"{side} there is {_describe(o, rng, True)}")
        return out

    first = f"{listing(True)}"
    pool = templates()
    rest = [pool[i] for i in rng.permutation(len(pool))[: n - 1]]
    while len(rest) < n - 1:
        rest.append(templates()[int(rng.integers(len(pool)))])
    return [first, *rest]


def make_questions(objs: list[Obj], rng: np.random.Generator) -> list[QA]:
    """One question of each kind in :data:`QUESTION_KINDS` (an existence question replaces an impossible one)."""
    qs: list[QA] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]

    def exists() -> QA:
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            c, s = o.color, o.shape
        else:
            c, s = COLOR_NAMES[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        present = any(o.color == c and o.shape == s for o in objs)
        return QA(f"is there a {c} {s}?", "yes" if present else "no", "exists")

    unique_shapes = [s for s in shapes if shapes.count(s) == 1]
    if unique_shapes:
        s = unique_shapes[int(rng.integers(len(unique_shapes)))]
        qs.append(QA(f"what color is the {s}?", objs[shapes.index(s)].color, "color"))
    else:
        qs.append(exists())
    unique_colors = [c for c in colors if colors.count(c) == 1]
    if unique_colors:
        c = unique_colors[int(rng.integers(len(unique_colors)))]
        qs.append(QA(f"what shape is the {c} object?", objs[colors.index(c)].shape, "shape"))
    else:
        qs.append(exists())
    if rng.random() < 0.4:
        qs.append(QA("how many objects are there?", str(len(objs)), "count"))
    else:
        s = SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.3 else shapes[int(rng.integers(len(objs)))]
        qs.append(QA(f"how many {_plural(s)} are there?", str(shapes.count(s)), "count"))
    qs.append(exists())
    pairs = [(a, b) for a in objs for b in objs
             if a is not b and relation(a, b) and shapes.count(a.shape) == 1 and shapes.count(b.shape) == 1]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        qs.append(QA(f"where is the {a.shape} relative to the {b.shape}?", relation(a, b), "relation"))  # type: ignore[arg-type]
    else:
        qs.append(exists())
    return qs


def statement_truth(st: Statement, left: list[Obj], right: list[Obj]) -> bool:
    """Whether an NLVR2 statement holds for the (left, right) scenes."""
    if st.kind == "more":
        return sum(o.shape == st.args[0] for o in left) > sum(o.shape == st.args[0] for o in right)
    if st.kind == "both":
        return any(o.color == st.args[0] for o in left) and any(o.color == st.args[0] for o in right)
    if st.kind == "exactly_one":
        return any(o.shape == st.args[0] for o in left) != any(o.shape == st.args[0] for o in right)
    if st.kind == "total":
        return len(left) + len(right) == st.args[0]
    raise ValueError(f"unknown statement kind {st.kind!r}")


def _random_statement(rng: np.random.Generator, left: list[Obj], right: list[Obj]) -> Statement:
    kind = ("more", "both", "exactly_one", "total")[int(rng.integers(4))]
    everyone = left + right
    if kind == "more":
        return Statement(kind, (everyone[int(rng.integers(len(everyone)))].shape,))
    if kind == "both":
        return Statement(kind, (everyone[int(rng.integers(len(everyone)))].color,))
    if kind == "exactly_one":
        return Statement(kind, (everyone[int(rng.integers(len(everyone)))].shape,))
    return Statement(kind, (len(everyone) + int(rng.integers(-1, 2)),))


# -------------------------------------------------------------------------------------------------- world
class World:
    """Random access to one split: ``world[i]`` is a :class:`Scene`, ``world.nlvr2(i)`` an NLVR2 example."""

    def __init__(self, config: WorldConfig | None = None, split: str = "train", seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.config = config or WorldConfig()
        self.split, self.seed = split, seed

    @cached_property
    def ood(self) -> bool:
        return self.split == "ood"

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"index must be ≥ 0, got {index}")
        return np.random.default_rng([self.seed, SPLITS[self.split], stream, index])

    def scene(self, rng: np.random.Generator) -> Scene:
        objs = sample_objects(rng, self.config, self.ood)
        image, mask = render(objs, self.config, rng, shift=self.ood)
        largest = max(range(len(objs)), key=lambda i: (objs[i].radius, -i))
        return Scene(objs, image, mask, make_captions(objs, rng), make_questions(objs, rng),
                     SHAPES.index(objs[largest].shape), self.ood)

    def __getitem__(self, index: int) -> Scene:
        return self.scene(self.rng(index))

    def nlvr2(self, index: int) -> tuple[Scene, Scene, Statement, bool]:
        """(left, right, statement, label): the label is drawn first (50/50), then a statement matching it."""
        rng = self.rng(index, stream=1)
        label = bool(rng.random() < 0.5)
        left, right = self.scene(rng), self.scene(rng)
        for _ in range(200):
            st = _random_statement(rng, left.objects, right.objects)
            if statement_truth(st, left.objects, right.objects) == label:
                return left, right, st, label
        st = Statement("total", (len(left.objects) + len(right.objects) + (0 if label else 1),))
        return left, right, st, label

    def texts(self, n: int) -> list[str]:
        """Captions, questions and statements of the first ``n`` examples (tokenizer training corpus)."""
        out: list[str] = []
        for i in range(n):
            s = self[i]
            out += s.captions + [q.question for q in s.questions]
            out.append(self.nlvr2(i)[2].text)
        return out
