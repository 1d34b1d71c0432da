"""Shard cache (round trip, resume, safety) and the torch datasets + collate (keys, shapes, values)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlmerge.data import (
    ANSWERS,
    MEAN,
    STD,
    CachedWorld,
    ClassificationDataset,
    Collate,
    ImageTextDataset,
    NLVR2Dataset,
    SegmentationDataset,
    VQADataset,
    World,
    WorldConfig,
    cache_folder,
    default_tokenizer,
    normalize,
    write_cache,
)


def assert_same_scene(a, b) -> None:
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.objects, a.captions, a.questions) == (b.objects, b.captions, b.questions)
    assert (a.label, a.shift) == (b.label, b.shift)


def test_scene_cache_round_trip_equals_generation(tmp_path) -> None:
    w = World(WorldConfig(image_size=24), split="ood", seed=1)
    write_cache(w, 23, tmp_path / "c", shard_size=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "meta.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    c = CachedWorld(tmp_path / "c")
    assert (len(c), c.kind, c.split, c.seed, c.config) == (23, "scenes", "ood", 1, w.config)
    for i in range(23):
        assert_same_scene(w[i], c[i])
    # shards are plain .npz files that numpy reads without pickles; the text is JSON
    with np.load(tmp_path / "c" / "shard-00002.npz", allow_pickle=False) as z:
        assert z["images"].shape == (3, 1, 24, 24, 3) and z["masks"].shape == (3, 1, 24, 24)
        assert z["labels"].tolist() == [w[i].label for i in (20, 21, 22)]
        offsets = z["record_offsets"]
        record = json.loads(z["records"][offsets[0]:offsets[1]].tobytes())
        assert record["scenes"][0]["captions"] == w[20].captions
    with pytest.raises(IndexError):
        c[23]
    with pytest.raises(ValueError, match="caches 'scenes' examples, not 'nlvr2'"):
        c.nlvr2(0)
    assert_same_scene(pickle.loads(pickle.dumps(c))[12], w[12])  # picklable for DataLoader workers


def test_cache_of_a_scaled_world_round_trips_and_default_records_omit_the_scale(tmp_path) -> None:
    big = World(WorldConfig(image_size=16, size_scale=1.5), split="val")
    write_cache(big, 5, tmp_path / "big", progress=False)
    c = CachedWorld(tmp_path / "big")
    assert c.config == big.config and all(o.scale == 1.5 for i in range(5) for o in c[i].objects)
    for i in range(5):
        assert_same_scene(big[i], c[i])
    # the default world's meta.json and records read as before size_scale existed
    write_cache(World(WorldConfig(image_size=16), split="val"), 3, tmp_path / "std", progress=False)
    assert "size_scale" not in json.loads((tmp_path / "std" / "meta.json").read_text())["config"]
    with np.load(tmp_path / "std" / "shard-00000.npz", allow_pickle=False) as z:
        record = json.loads(z["records"][z["record_offsets"][0]:z["record_offsets"][1]].tobytes())
    assert all("scale" not in o for o in record["scenes"][0]["objects"])


def test_nlvr2_cache_round_trip(tmp_path) -> None:
    w = World(split="val", seed=2)
    c = CachedWorld(write_cache(w, 7, tmp_path, kind="nlvr2", shard_size=4, progress=False))
    for i in range(7):
        a, b = w.nlvr2(i), c.nlvr2(i)
        assert_same_scene(a.left, b.left)
        assert_same_scene(a.right, b.right)
        assert (a.statement, a.label) == (b.statement, b.label)


def test_cache_resumes_extends_and_refuses_other_worlds(tmp_path) -> None:
    w = World(split="test")
    out = tmp_path / "c"
    write_cache(w, 15, out, shard_size=10, progress=False)
    first = (out / "shard-00000.npz").stat().st_mtime_ns
    write_cache(w, 25, out, progress=False)  # extends: keeps shard 0, rewrites the short shard 1, adds 2
    c = CachedWorld(out)
    assert len(c) == 25 and (out / "shard-00000.npz").stat().st_mtime_ns == first
    assert_same_scene(c[24], w[24])
    assert_same_scene(c[14], w[14])
    write_cache(w, 5, out, progress=False)  # never shrinks
    assert len(CachedWorld(out)) == 25
    with pytest.raises(ValueError, match=r"different cache \(recorded \{'split': 'test'\}, requested "):
        write_cache(World(split="val"), 5, out, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_cache(w, 5, out, shard_size=7, progress=False)
    # an interrupted write leaves meta.json incomplete: readers refuse it, a re-run completes it
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "n": 30, "complete": False}))
    with pytest.raises(ValueError, match="not a complete cache"):
        CachedWorld(out)
    write_cache(w, 30, out, progress=False)
    assert_same_scene(CachedWorld(out)[29], w[29])
    (out / "shard-00001.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="shard-00001.npz: corrupt cache shard"):
        CachedWorld(out)[15]
    # a complete cache with a corrupt, truncated or deleted shard is repaired by the next write, not trusted
    good = (out / "shard-00000.npz").read_bytes()
    (out / "shard-00000.npz").write_bytes(good[: len(good) // 2])
    (out / "shard-00002.npz").unlink()
    kept = (out / "meta.json").read_bytes()
    write_cache(w, 5, out, progress=False)
    assert (out / "meta.json").read_bytes() == kept
    c = CachedWorld(out)
    for i in (0, 9, 15, 29):
        assert_same_scene(c[i], w[i])
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "shard-00000.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="has cache shards but no meta.json"):
        write_cache(w, 5, tmp_path / "orphan", progress=False)


def test_cache_folder_names_one_folder_per_layout(tmp_path) -> None:
    """Pre-training, fine-tuning and the study share one cache root: each split, size, seed, kind and world
    gets its own folder (the default world keeps the plain name), and two caches never share a folder."""
    plain = World(WorldConfig(image_size=16), "val", seed=3)
    assert cache_folder(tmp_path, plain) == tmp_path / "val-16px-seed3"
    assert cache_folder(tmp_path, plain, "nlvr2") == tmp_path / "val-16px-seed3-nlvr2"
    scaled = World(WorldConfig(image_size=16, size_scale=2.0), "val", seed=3)
    folders = {cache_folder(tmp_path, w, k) for w in (plain, scaled, World(WorldConfig(image_size=16,
               max_objects=1), "val", 3)) for k in ("scenes", "nlvr2")}
    assert len(folders) == 6
    assert cache_folder(tmp_path, World(WorldConfig(image_size=16, size_scale=2.0), "val", 3)) == \
        cache_folder(tmp_path, scaled)
    for w, k in ((plain, "scenes"), (scaled, "scenes"), (plain, "nlvr2")):  # each folder takes its own cache
        write_cache(w, 2, cache_folder(tmp_path, w, k), k, progress=False)
    with pytest.raises(ValueError, match="cache kind"):
        cache_folder(tmp_path, plain, "pairs")


def test_datasets_read_the_cache_like_the_world(tmp_path) -> None:
    w = World(split="train", seed=5)
    direct, cached = ClassificationDataset(w, 6), ClassificationDataset(w, 6, cache_dir=tmp_path / "scenes")
    assert isinstance(cached.source, CachedWorld) and (tmp_path / "scenes" / "meta.json").is_file()
    for i in range(6):
        torch.testing.assert_close(cached[i]["image"], direct[i]["image"])
        assert cached[i]["label"] == direct[i]["label"]
    a, b = VQADataset(w, 4, cache_dir=tmp_path / "scenes")[7], VQADataset(w, 4)[7]  # reuses the cache
    assert (a["text"], a["answer"], a["kind"]) == (b["text"], b["answer"], b["kind"])
    torch.testing.assert_close(a["image"], b["image"])
    pairs = NLVR2Dataset(w, 3, cache_dir=tmp_path / "pairs")
    assert pairs[2]["text"] == NLVR2Dataset(w, 3)[2]["text"]
    torch.testing.assert_close(pairs[2]["image_b"], NLVR2Dataset(w, 3)[2]["image_b"])
    with pytest.raises(ValueError, match="needs 3 'nlvr2' examples"):
        NLVR2Dataset(CachedWorld(tmp_path / "scenes"), 3)
    with pytest.raises(ValueError, match="needs 9 'scenes' examples"):
        ClassificationDataset(CachedWorld(tmp_path / "scenes"), 9)


def test_torch_datasets_and_collate() -> None:
    w = World(split="train")
    tok = default_tokenizer()
    cases = {
        ImageTextDataset(w, 6): {"image": (4, 3, 32, 32), "input_ids": (4, 20), "attention_mask": (4, 20),
                                 "image_id": (4,)},
        VQADataset(w, 6): {"answer_scores": (4, len(ANSWERS)), "answer": (4,), "input_ids": (4, 20)},
        NLVR2Dataset(w, 6): {"image": (4, 3, 32, 32), "image_b": (4, 3, 32, 32), "label": (4,),
                             "input_ids": (4, 20)},
        ClassificationDataset(w, 6): {"label": (4,)},
        SegmentationDataset(w, 6): {"mask": (4, 32, 32)},
    }
    for ds, shapes in cases.items():
        batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=Collate(tok, 20))))
        assert set(shapes) <= set(batch), type(ds).__name__
        for k, shape in shapes.items():
            assert tuple(batch[k].shape) == shape, (type(ds).__name__, k)
        assert batch["image"].dtype == torch.float32 and batch["image"].is_contiguous()
        assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    item = ImageTextDataset(w, 6)[7]
    assert item["image_id"] == 1 and item["text"] == w[1].captions[2]
    torch.testing.assert_close(item["image"], torch.from_numpy(w[1].image).permute(2, 0, 1).float() / 255)
    assert len(ImageTextDataset(w, 6)) == 30 and len(VQADataset(w, 6)) == 30 and len(NLVR2Dataset(w, 6)) == 6
    vqa = VQADataset(w, 6)[13]
    qa = w[2].questions[3]
    assert (vqa["text"], vqa["answer"], vqa["kind"]) == (qa.question, ANSWERS.index(qa.answer), qa.kind)
    assert vqa["answer_scores"].sum() == 1 and vqa["answer_scores"][vqa["answer"]] == 1
    seg = SegmentationDataset(w, 6)[4]["mask"]
    assert seg.dtype == torch.int64 and torch.equal(seg, torch.from_numpy(w[4].mask).long())
    nlvr2 = NLVR2Dataset(w, 6)[5]
    assert nlvr2["label"] == int(w.nlvr2(5).label) and nlvr2["text"] == w.nlvr2(5).statement.text
    with pytest.raises(IndexError):
        ClassificationDataset(w, 6)[6]
    with pytest.raises(ValueError, match="dataset size n=0 is invalid"):
        ClassificationDataset(w, 0)


def test_one_caption_per_image_is_a_seeded_choice() -> None:
    w = World(split="val")
    a, b = ImageTextDataset(w, 40, pairs=False), ImageTextDataset(w, 40, pairs=False, caption_seed=1)
    texts_a = [a[i]["text"] for i in range(40)]
    assert texts_a == [ImageTextDataset(w, 40, pairs=False)[i]["text"] for i in range(40)]
    assert texts_a != [b[i]["text"] for i in range(40)]
    choices = [w[i].captions.index(t) for i, t in enumerate(texts_a)]
    assert len(set(choices)) == 5  # all five captions get used


def test_normalize() -> None:
    image = torch.rand(2, 3, 8, 8)
    out = normalize(image)
    torch.testing.assert_close(out, (image - 0.5) / 0.5)
    assert MEAN == STD == (0.5, 0.5, 0.5) and out.min() >= -1 and out.max() <= 1
