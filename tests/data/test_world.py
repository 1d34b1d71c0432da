"""The procedural world: determinism, splits, answers, masks, NLVR2 balance and truth, OOD, cache, preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlmerge.data import (
    ANSWERS,
    NUM_CLASSES,
    CachedWorld,
    ClassificationDataset,
    Collate,
    ImageTextDataset,
    NLVR2Dataset,
    SegmentationDataset,
    VQADataset,
    World,
    WorldConfig,
    default_tokenizer,
    write_cache,
)
from vlmerge.data.world import COLORS, HELD_OUT, SHAPES, relation


def test_same_seed_same_data_other_split_or_seed_differs() -> None:
    a, b = World(split="train", seed=3), World(split="train", seed=3)
    for i in (0, 5, 17):
        sa, sb = a[i], b[i]
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.mask, sb.mask)
        assert sa.captions == sb.captions and sa.questions == sb.questions and sa.label == sb.label
    assert a.nlvr2(4)[2] == b.nlvr2(4)[2]
    others = [World(split=s, seed=3) for s in ("val", "test", "ood")] + [World(split="train", seed=4)]
    for w in others:
        assert not np.array_equal(w[0].image, a[0].image)


def test_splits_are_disjoint() -> None:
    def key(scene):
        return tuple((o.shape, o.color, round(o.x, 6), round(o.y, 6)) for o in scene.objects)

    keys = {s: {key(World(split=s)[i]) for i in range(200)} for s in ("train", "val", "test", "ood")}
    for s in keys:
        for t in keys:
            if s < t:
                assert not keys[s] & keys[t], (s, t)


def test_scene_contents_are_valid() -> None:
    w = World(split="train")
    kinds, n_objects = set(), set()
    for i in range(150):
        s = w[i]
        n_objects.add(len(s.objects))
        assert 1 <= len(s.objects) <= 4
        assert len(s.captions) == 5 and all(isinstance(c, str) and c for c in s.captions)
        assert len(s.questions) == 5
        for qa in s.questions:
            assert qa.answer in ANSWERS
            kinds.add(qa.kind)
            if qa.kind == "count" and qa.question == "how many objects are there?":
                assert qa.answer == str(len(s.objects))
            if qa.kind == "exists":
                c, sh = qa.question.removeprefix("is there a ").removesuffix("?").split()
                present = any(o.color == c and o.shape == sh for o in s.objects)
                assert qa.answer == ("yes" if present else "no")
            if qa.kind == "color":
                sh = qa.question.removeprefix("what color is the ").removesuffix("?")
                assert [o.color for o in s.objects if o.shape == sh] == [qa.answer]
            if qa.kind == "relation":
                a_, b_ = qa.question.removeprefix("where is the ").removesuffix("?").split(" relative to the ")
                oa = next(o for o in s.objects if o.shape == a_)
                ob = next(o for o in s.objects if o.shape == b_)
                assert relation(oa, ob) == qa.answer
        assert 0 <= s.label < NUM_CLASSES
        biggest = max(o.radius for o in s.objects)
        assert SHAPES[s.label] == next(o.shape for o in s.objects if o.radius == biggest)
        # The first caption names every object.
        for o in s.objects:
            assert o.color in s.captions[0]
    assert kinds == {"color", "shape", "count", "exists", "relation"}
    assert n_objects == {1, 2, 3, 4}
    assert len({(o.shape) for i in range(100) for o in w[i].objects}) == 8
    assert len({(o.color) for i in range(100) for o in w[i].objects}) >= 8
    assert {o.size for i in range(50) for o in w[i].objects} == {"small", "large"}


def test_masks_agree_with_rendered_pixels() -> None:
    clean = World(WorldConfig(noise=0.0), split="val")
    for i in range(30):
        s = clean[i]
        visible = {int(k) for k in np.unique(s.mask)} - {0}
        # Every visible object's pixels carry its colour exactly; every mask class belongs to an object.
        assert visible <= {SHAPES.index(o.shape) + 1 for o in s.objects}
        for k in visible:
            colors = {o.color for o in s.objects if SHAPES.index(o.shape) + 1 == k}
            pix = s.image[s.mask == k]
            assert all(any((p == COLORS[c]).all() for c in colors) for p in pix[:: max(1, len(pix) // 50)])
        # ... and the background (mask 0) is the background: the same scene without objects.
        assert s.mask.sum() > 0
    noisy = World(split="val")[0]
    for o in noisy.objects:  # with noise, object pixels stay within 5 sigma of the object's colour
        k = SHAPES.index(o.shape) + 1
        pix = noisy.image[noisy.mask == k].astype(float)
        if len(pix):
            assert np.abs(pix.mean(0) - np.array(COLORS[o.color])).max() < 5 * 6 or len(
                {ob.color for ob in noisy.objects if ob.shape == o.shape}) > 1


def test_ood_split_holds_out_combinations_and_shifts_rendering() -> None:
    for split in ("train", "val", "test"):
        w = World(split=split)
        for i in range(300):
            assert not any((o.color, o.shape) in HELD_OUT for o in w[i].objects)
    ood = World(split="ood")
    for i in range(100):
        assert any((o.color, o.shape) in HELD_OUT for o in ood[i].objects)
        assert ood[i].shift
    # The rendering shift: higher background contrast (stripes) than in distribution.
    def bg_std(w):
        return np.mean([w[i].image[w[i].mask == 0].std() for i in range(40)])
    assert bg_std(ood) > 1.5 * bg_std(World(split="test"))


def test_nlvr2_balanced_and_statements_true() -> None:
    w = World(split="train")
    labels = []
    for i in range(400):
        left, right, st, label = w.nlvr2(i)
        labels.append(label)
        lo, ro = left.objects, right.objects
        if st.kind == "total":  # independent check of a few statement kinds
            assert (len(lo) + len(ro) == st.args[0]) == label
        if st.kind == "both":
            assert (any(o.color == st.args[0] for o in lo) and any(o.color == st.args[0] for o in ro)) == label
        if st.kind == "more":
            assert (sum(o.shape == st.args[0] for o in lo) > sum(o.shape == st.args[0] for o in ro)) == label
    assert abs(np.mean(labels) - 0.5) < 0.06


@pytest.mark.parametrize("size", [16, 64, 224])
def test_resolutions(size: int) -> None:
    s = World(WorldConfig(image_size=size), split="test")[1]
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8 and s.mask.shape == (size, size)


@pytest.mark.parametrize("field,value", [("image_size", 8), ("max_objects", 5), ("noise", -1.0), ("min_objects", 0)])
def test_bad_config_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"world config: {field}="):
        WorldConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        World(split="dev")
    with pytest.raises(ValueError, match=r"unknown keys \['colours'\]"):
        WorldConfig.from_dict({"colours": 3})


def test_cache_round_trip_equals_generation(tmp_path) -> None:
    w = World(split="val", seed=1)
    write_cache(w, 23, tmp_path / "c", shard_size=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "meta.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    c = CachedWorld(tmp_path / "c")
    for i in (0, 9, 10, 22):
        a, b = w[i], c[i]
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert (a.objects, a.captions, a.questions, a.label) == (b.objects, b.captions, b.questions, b.label)
    with pytest.raises(IndexError):
        c[23]
    with pytest.raises(ValueError, match="holds a different cache"):
        write_cache(World(split="test"), 23, tmp_path / "c", shard_size=10, progress=False)
    (tmp_path / "c" / "shard-00001.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shard-00001.npz: corrupt cache shard"):
        CachedWorld(tmp_path / "c")[15]
    # Datasets read from the cache exactly as from the world.
    torch.testing.assert_close(ClassificationDataset(c, 5)[3]["image"], ClassificationDataset(w, 5)[3]["image"])


def test_torch_datasets_and_collate() -> None:
    w = World(split="train")
    tok = default_tokenizer()
    cases = {
        ImageTextDataset(w, 6): {"image": (4, 3, 32, 32), "input_ids": (4, 20), "image_id": (4,)},
        VQADataset(w, 6): {"answer_scores": (4, len(ANSWERS)), "answer": (4,), "input_ids": (4, 20)},
        NLVR2Dataset(w, 6): {"image_b": (4, 3, 32, 32), "label": (4,)},
        ClassificationDataset(w, 6): {"label": (4,)},
        SegmentationDataset(w, 6): {"mask": (4, 32, 32)},
    }
    for ds, shapes in cases.items():
        batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=Collate(tok, 20))))
        for k, shape in shapes.items():
            assert tuple(batch[k].shape) == shape, (type(ds).__name__, k)
        assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert len(ImageTextDataset(w, 6)) == 30 and len(ImageTextDataset(w, 6, pairs=False)) == 6
    item = ImageTextDataset(w, 6)[7]
    assert item["image_id"] == 1 and item["text"] == w[1].captions[2]
    with pytest.raises(IndexError):
        ClassificationDataset(w, 6)[6]
