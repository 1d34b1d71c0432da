"""The embedded, procedurally generated image-text world, its tokenizer, torch datasets and disk cache."""

from .cache import CachedWorld, cache_folder, open_cache, write_cache
from .datasets import (
    MEAN,
    STD,
    ClassificationDataset,
    Collate,
    ImageTextDataset,
    NLVR2Dataset,
    SegmentationDataset,
    VQADataset,
    normalize,
    to_tensor,
)
from .tokenizer import Tokenizer, default_tokenizer
from .world import (
    ANSWERS,
    COLORS,
    NUM_CLASSES,
    NUM_SEG_CLASSES,
    SHAPES,
    NLVR2Example,
    Scene,
    World,
    WorldConfig,
    answer_to_id,
)

__all__ = [
    "ANSWERS", "COLORS", "MEAN", "NUM_CLASSES", "NUM_SEG_CLASSES", "SHAPES", "STD", "CachedWorld",
    "ClassificationDataset", "Collate", "ImageTextDataset", "NLVR2Dataset", "NLVR2Example", "Scene",
    "SegmentationDataset", "Tokenizer", "VQADataset", "World", "WorldConfig", "answer_to_id",
    "cache_folder", "default_tokenizer", "normalize", "open_cache", "to_tensor", "write_cache",
]
