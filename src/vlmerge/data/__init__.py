"""The embedded, procedurally generated image-text world, its tokenizer and torch datasets."""

from .cache import CachedWorld, write_cache
from .datasets import (
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
from .world import ANSWERS, NUM_CLASSES, NUM_SEG_CLASSES, SHAPES, World, WorldConfig

__all__ = [
    "ANSWERS", "NUM_CLASSES", "NUM_SEG_CLASSES", "SHAPES", "CachedWorld", "ClassificationDataset", "Collate",
    "ImageTextDataset", "NLVR2Dataset", "SegmentationDataset", "Tokenizer", "VQADataset", "World", "WorldConfig",
    "default_tokenizer", "normalize", "to_tensor", "write_cache",
]
