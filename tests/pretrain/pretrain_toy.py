"""A toy image-text corpus for the engine's mechanics tests: coloured shapes on the left or right, 16 px.

Independent of :mod:`vlmerge.data` so that checkpointing, resuming and freezing are tested in isolation.
"""

from __future__ import annotations

import torch

from vlmerge.pretrain import PretrainData

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0), "yellow": (1.0, 1.0, 0.1)}
SHAPES = ("square", "bar", "dot")
SIDES = ("left", "right")
WORDS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "on", "the", *COLORS, *SHAPES, *SIDES)


class ToyTokenizer:
    pad_id, cls_id, sep_id, mask_id = 0, 1, 2, 3
    vocab_size = len(WORDS)

    def encode(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [1, *(WORDS.index(w) for w in text.split())][: max_len - 1] + [2]
            ids[i, : len(toks)] = torch.tensor(toks)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def to_config(self) -> dict[str, list[str]]:
        return {"words": list(WORDS)}


class ToyPairs:
    """``n`` pairs ``{"image": [3, 16, 16] in [0, 1], "text": "a red dot on the left"}``."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            color, shape, side = (int(torch.randint(k, (1,), generator=g)) for k in (4, 3, 2))
            image = torch.rand(3, 16, 16, generator=g) * 0.2
            x0 = 8 * side
            rgb = torch.tensor(list(COLORS.values())[color]).view(3, 1, 1)
            if shape == 0:
                image[:, 4:12, x0 + 1:x0 + 7] = rgb
            elif shape == 1:
                image[:, 2:14, x0 + 3:x0 + 5] = rgb
            else:
                image[:, 6:10, x0 + 2:x0 + 6] = rgb
            text = f"a {list(COLORS)[color]} {SHAPES[shape]} on the {SIDES[side]}"
            self.items.append({"image": image, "text": text})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def toy_data(train: int = 256, eval: int = 48) -> PretrainData:
    return PretrainData(ToyPairs(train, 0), ToyPairs(eval, 1), ToyTokenizer())
