"""Datasets: discovery (MVTec layout, folder layout, zip uploads), validation, loading and synthetic sample data.

    from engine.data import discover, load_split
    ds = discover("sample_data/brick")            # raises DataValidationError listing every problem
    train = load_split(ds, "train", image_size=256)  # ImageSet: images (N, 3, 256, 256) uint8
"""

from engine.data.archive import extract_zip
from engine.data.discover import Dataset, Sample, discover, find_categories
from engine.data.limits import DEFAULT_LIMITS, IMAGE_EXTENSIONS, Limits, cache_root
from engine.data.loader import load_split
from engine.data.synthetic import SAMPLE_CATEGORIES, make_sample_data, make_synthetic_dataset

__all__ = [
    "DEFAULT_LIMITS",
    "IMAGE_EXTENSIONS",
    "SAMPLE_CATEGORIES",
    "Dataset",
    "Limits",
    "Sample",
    "cache_root",
    "discover",
    "extract_zip",
    "find_categories",
    "load_split",
    "make_sample_data",
    "make_synthetic_dataset",
]
