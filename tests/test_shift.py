"""The check that the test set's normal images look like the training images (engine.data.shift)."""

from __future__ import annotations

import torch

from engine.api import ImageSet
from engine.data.shift import normal_shift


def _images(n: int, level: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = level + 6 * torch.randn(n, 1, 1, 1, generator=g)  # per-image exposure
    return (base + 20 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 255).to(torch.uint8)


def _test_set(normal_level: float) -> ImageSet:
    imgs = torch.cat([_images(12, normal_level, 1), _images(8, 180, 2)])
    return ImageSet(images=imgs, labels=torch.tensor([0] * 12 + [1] * 8))


def test_darker_test_normals_are_reported_with_the_numbers() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    msg = normal_shift(train, _test_set(150))
    assert msg is not None and "mean grey level lower" in msg and "100% of test normals" in msg


def test_normals_from_the_training_distribution_pass() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    assert normal_shift(train, _test_set(180)) is None


def test_too_few_normals_give_no_verdict() -> None:
    train = ImageSet(images=_images(40, 180, 0))
    test = ImageSet(images=_images(4, 120, 3), labels=torch.zeros(4, dtype=torch.int64))
    assert normal_shift(train, test) is None
