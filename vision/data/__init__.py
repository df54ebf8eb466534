"""Datasets that need no download: the built-in shapes dataset in COCO layout."""
from vision.data.synth import CATEGORIES, write_synth

__all__ = ["CATEGORIES", "write_synth"]
