"""The procedural world: determinism, splits, answers, masks vs pixels, NLVR2 balance and truth, OOD and
config validation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from vlmerge.data import ANSWERS, NUM_CLASSES, World, WorldConfig, answer_to_id
from vlmerge.data.world import (
    COLORS,
    HELD_OUT,
    NUMBER_WORDS,
    QUESTION_KINDS,
    SHAPES,
    Obj,
    Scene,
    render,
)

PLURAL_TO_SHAPE = {("crosses" if s == "cross" else s + "s"): s for s in SHAPES}


def test_same_seed_same_data_other_split_or_seed_differs() -> None:
    a, b = World(split="train", seed=3), World(split="train", seed=3)
    for i in (0, 5, 17):
        sa, sb = a[i], b[i]
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.mask, sb.mask)
        assert (sa.objects, sa.captions, sa.questions) == (sb.objects, sb.captions, sb.questions)
        assert sa.label == sb.label
    na, nb = a.nlvr2(4), b.nlvr2(4)
    assert np.array_equal(na.left.image, nb.left.image) and np.array_equal(na.right.image, nb.right.image)
    assert (na.statement, na.label) == (nb.statement, nb.label)
    for other in [World(split=s, seed=3) for s in ("val", "test", "ood")] + [World(split="train", seed=4)]:
        assert not np.array_equal(other[0].image, a[0].image)
        assert other[0].objects != a[0].objects


def test_scene_content_does_not_depend_on_rendering() -> None:
    """Objects and text come from their own generator: the same scene at any resolution or noise level."""
    small = World(WorldConfig(image_size=32))
    large = World(WorldConfig(image_size=96, noise=0.0, texture=False))
    for i in range(5):
        a, b = small[i], large[i]
        assert (a.objects, a.captions, a.questions, a.label) == (b.objects, b.captions, b.questions, b.label)


def test_splits_are_disjoint() -> None:
    def key(scene: Scene) -> tuple:
        return tuple((o.shape, o.color, round(o.x, 9), round(o.y, 9)) for o in scene.objects)

    keys = {s: {key(World(split=s)[i]) for i in range(200)} for s in ("train", "val", "test", "ood")}
    for s in keys:
        assert len(keys[s]) == 200
        for t in keys:
            if s < t:
                assert not keys[s] & keys[t], (s, t)


def check_answer(qa, objs: list[Obj]) -> None:
    """Recompute a question's answer from the scene's objects, parsing the question text."""
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    q = qa.question
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        assert [o.color for o in objs if o.shape == m[1]] == [qa.answer]
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        assert [o.shape for o in objs if o.color == m[1]] == [qa.answer]
    elif q == "how many objects are there?":
        assert qa.answer == str(len(objs))
    elif m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        assert qa.answer == str(colors.count(m[1]))
    elif m := re.fullmatch(r"how many (\w+) are there\?", q):
        assert qa.answer == str(shapes.count(PLURAL_TO_SHAPE[m[1]]))
    elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
        assert qa.answer == ("yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no")
    elif m := re.fullmatch(r"where is the (\w+) relative to the (\w+)\?", q):
        (a,), (b,) = [o for o in objs if o.shape == m[1]], [o for o in objs if o.shape == m[2]]
        dx, dy = a.x - b.x, a.y - b.y
        horizontal, vertical = ("left" if dx < 0 else "right"), ("above" if dy < 0 else "below")
        assert qa.answer == (horizontal if abs(dx) >= abs(dy) else vertical)
    else:
        raise AssertionError(f"unparsed question {q!r}")


def test_scene_contents_are_valid() -> None:
    w = World(split="train")
    kinds, n_objects, answers = set(), set(), set()
    for i in range(300):
        s = w[i]
        n_objects.add(len(s.objects))
        assert 1 <= len(s.objects) <= 4
        assert len(s.captions) == 5 and all(c and c == c.strip() for c in s.captions)
        assert len(s.questions) == 5 and len(set(s.questions)) >= 4
        for qa in s.questions:
            assert qa.answer in ANSWERS and ANSWERS[qa.answer_id] == qa.answer
            kinds.add(qa.kind)
            answers.add(qa.answer)
            check_answer(qa, s.objects)
        assert 0 <= s.label < NUM_CLASSES
        largest = [o for o in s.objects if o.radius == max(p.radius for p in s.objects)][0]
        assert s.label_name == largest.shape  # the documented rule: largest object, earliest drawn on ties
        for o in s.objects:  # the first caption names every object with its size and colour
            assert f"{o.size} {o.color}" in s.captions[0]
    assert kinds == set(QUESTION_KINDS)
    assert n_objects == {1, 2, 3, 4}
    assert {"yes", "no", "left", "right", "above", "below", "1", "2"} <= answers
    objs = [o for i in range(200) for o in w[i].objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == {"small", "large"}
    captions = " ".join(c for i in range(100) for c in w[i].captions)
    for phrase in ("to the left of", "to the right of", "above", "below", "disk", "box", "two", "there are"):
        assert phrase in captions


def test_answer_vocabulary() -> None:
    assert len(set(ANSWERS)) == len(ANSWERS)
    assert [answer_to_id(a) for a in ANSWERS] == list(range(len(ANSWERS)))
    with pytest.raises(ValueError, match=r"answer 'maybe' is not in the answer vocabulary"):
        answer_to_id("maybe")


def test_masks_agree_with_rendered_pixels() -> None:
    """Noise off: background pixels (mask 0) equal the background rendered alone, and every object pixel has
    the colour of the last-drawn object covering it, whose shape index + 1 is the mask value."""
    config = WorldConfig(noise=0.0, image_size=48)
    w = World(config, split="val")
    for i in range(40):
        s = w[i]
        background, empty = render([], config, w._rng(0, i, 0, 1))
        assert not empty.any()
        bg = s.mask == 0
        assert np.array_equal(s.image[bg], background[bg])
        assert (~bg).any()
        for k in np.unique(s.mask[~bg]):
            pix = s.image[s.mask == k]
            colours = {COLORS[o.color] for o in s.objects if SHAPES.index(o.shape) + 1 == k}
            assert colours, "mask class without an object of that shape"
            assert all(tuple(p) in colours for p in pix)
            assert not np.array_equal(pix, background[s.mask == k])  # objects are drawn, not background


def test_noise_is_bounded_around_the_clean_render() -> None:
    clean, noisy = World(WorldConfig(noise=0.0), "test"), World(WorldConfig(noise=6.0), "test")
    diffs = []
    for i in range(20):
        a, b = clean[i], noisy[i]
        assert np.array_equal(a.mask, b.mask)
        diff = b.image.astype(int) - a.image.astype(int)
        assert np.abs(diff).max() <= math.ceil(6.0 * math.sqrt(3)) + 1
        diffs.append(diff.ravel())
    assert 5.0 < np.concatenate(diffs).std() < 7.0


def test_shape_geometry_matches_analytic_shapes() -> None:
    """Unrotated shapes against closed-form inside tests at the pixel centres."""
    size, config = 64, WorldConfig(image_size=64, noise=0.0)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    for shape, inside in [
        ("circle", lambda dx, dy, r: dx**2 + dy**2 <= r**2),
        ("square", lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) <= 0.8 * r),
        ("ring", lambda dx, dy, r: (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.6 * r) ** 2)),
    ]:
        obj = Obj(shape, "red", "large", 0.45, 0.55, 0.0)
        _, mask = render([obj], config, np.random.default_rng(0))
        expected = inside(xx - obj.x, yy - obj.y, obj.radius)
        # float32 rounding may flip a pixel centre lying exactly on the boundary
        assert (mask.astype(bool) != expected).sum() <= 2
        assert set(np.unique(mask)) == {0, SHAPES.index(shape) + 1}


def test_later_objects_occlude_earlier_ones() -> None:
    config = WorldConfig(image_size=32, noise=0.0)
    below, above = Obj("square", "red", "large", 0.5, 0.5, 0.0), Obj("circle", "blue", "small", 0.5, 0.5, 0.0)
    image, mask = render([below, above], config, np.random.default_rng(0))
    assert mask[16, 16] == SHAPES.index("circle") + 1 and tuple(image[16, 16]) == COLORS["blue"]
    assert mask[16, 10] == SHAPES.index("square") + 1 and tuple(image[16, 10]) == COLORS["red"]


def test_ood_split_holds_out_combinations_and_shifts_rendering() -> None:
    for split in ("train", "val", "test"):
        w = World(split=split)
        for i in range(400):
            assert not any((o.color, o.shape) in HELD_OUT for o in w[i].objects)
        for i in range(100):
            left, right, _, _ = w.nlvr2(i)
            assert not any((o.color, o.shape) in HELD_OUT for o in left.objects + right.objects)
    ood = World(split="ood")
    seen = set()
    for i in range(150):
        s = ood[i]
        held = {(o.color, o.shape) for o in s.objects} & HELD_OUT
        assert held and s.shift
        seen |= held
    assert seen == HELD_OUT

    def background_std(w: World) -> float:  # the rendering shift: striped, high-contrast backgrounds
        return float(np.mean([w[i].image[w[i].mask == 0].std() for i in range(40)]))

    assert background_std(ood) > 1.5 * background_std(World(split="test"))


def statement_truth(text: str, left: list[Obj], right: list[Obj]) -> bool:
    """Evaluate an NLVR2 statement from its text alone."""
    def has(objs: list[Obj], color: str | None = None, shape: str | None = None) -> bool:
        return any((color in (None, o.color)) and (shape in (None, o.shape)) for o in objs)

    if m := re.fullmatch(r"the (left|right) image has more (\w+) than the (left|right) image", text):
        first, second = (left, right) if m[1] == "left" else (right, left)
        shape = PLURAL_TO_SHAPE[m[2]]
        return sum(o.shape == shape for o in first) > sum(o.shape == shape for o in second)
    if m := re.fullmatch(r"both images contain an? (\w+) object", text):
        return has(left, color=m[1]) and has(right, color=m[1])
    if m := re.fullmatch(r"exactly one image contains an? (\w+)", text):
        return has(left, shape=m[1]) != has(right, shape=m[1])
    if m := re.fullmatch(r"there are (\w+) objects in total in the two images", text):
        return len(left) + len(right) == NUMBER_WORDS.index(m[1])
    if m := re.fullmatch(r"neither image contains an? (\w+) (\w+)", text):
        return not has(left + right, color=m[1], shape=m[2])
    raise AssertionError(f"unparsed statement {text!r}")


def test_nlvr2_balanced_and_statements_true() -> None:
    w = World(split="train")
    labels, kinds = [], set()
    for i in range(400):
        left, right, statement, label = w.nlvr2(i)
        labels.append(label)
        kinds.add(statement.kind)
        assert statement_truth(statement.text, left.objects, right.objects) == label, statement.text
        assert not np.array_equal(left.image, right.image)
    assert abs(np.mean(labels) - 0.5) < 0.05
    assert kinds == {"more", "both", "exactly_one", "total", "neither"}


@pytest.mark.parametrize("size", [16, 64, 224, 384])
def test_resolutions(size: int) -> None:
    s = World(WorldConfig(image_size=size), split="test")[1]
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (size, size) and s.mask.any()


@pytest.mark.parametrize("field,value,allowed", [
    ("image_size", 8, r"an integer in \[16, 512\]"),
    ("image_size", 32.0, r"an integer in \[16, 512\]"),
    ("min_objects", 0, r"an integer in \[1, 4\]"),
    ("max_objects", 5, r"an integer in \[min_objects=1, 4\]"),
    ("rotation", "yes", "True or False"),
    ("noise", -1.0, r"a number in \[0, 64\]"),
    ("texture", 1, "True or False"),
    ("min_gap", 2, r"a number in \[0, 1.5\]"),
    ("size_scale", 2.5, r"a number in \[0.5, 2\]"),
])
def test_bad_config_names_the_field_and_allowed_values(field: str, value: object, allowed: str) -> None:
    message = rf"world config: {field}={value!r} is invalid; allowed values: {allowed}"
    with pytest.raises(ValueError, match=message):
        WorldConfig(**{field: value})


def test_bad_world_arguments() -> None:
    with pytest.raises(ValueError, match=r"world config: max_objects=2 is invalid.*min_objects=3"):
        WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match=r"unknown keys \['colours'\]; allowed keys: \['image_size'"):
        WorldConfig.from_dict({"colours": 3})
    assert WorldConfig.from_dict({"image_size": 64, "rotation": False}) == WorldConfig(64, rotation=False)
    with pytest.raises(ValueError, match=r"unknown split 'dev'; allowed values: \['train', 'val'"):
        World(split="dev")
    with pytest.raises(ValueError, match="world seed=-1 is invalid"):
        World(seed=-1)
    with pytest.raises(IndexError, match="world index must be an integer ≥ 0"):
        World()[-1]


def test_config_options_take_effect() -> None:
    w = World(WorldConfig(min_objects=2, max_objects=2, rotation=False), split="val")
    apart = 0
    for i in range(40):
        a, b = w[i].objects
        assert a.angle == b.angle == 0.0
        if a.size == b.size == "small":  # two small objects always fit min_gap=1 apart within 32 tries
            assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius
            apart += 1
    assert apart > 0


def test_size_scale_scales_every_radius_and_keeps_the_content() -> None:
    """size_scale 1 is the world as it is (same objects, text, pixels); 2 doubles each radius, keeps every
    object inside the image, and the label is still the shape of the largest object."""
    simple = {"max_objects": 1, "rotation": False, "texture": False, "noise": 0.0}
    base, same = World(WorldConfig(**simple), "test"), World(WorldConfig(**simple, size_scale=1.0), "test")
    big = World(WorldConfig(**simple, size_scale=2), "test")
    for i in range(20):
        a, b, c = base[i], same[i], big[i]
        assert np.array_equal(a.image, b.image) and a.objects == b.objects
        (o,), (p,) = a.objects, c.objects
        assert (p.shape, p.color, p.size) == (o.shape, o.color, o.size) and p.radius == 2 * o.radius
        assert p.radius <= min(p.x, p.y, 1 - p.x, 1 - p.y) + 1e-9 and c.label == a.label
        assert (c.mask > 0).sum() > 3 * (a.mask > 0).sum()
