"""The Detector contract, the data containers it works on, and the project's errors.

Shapes used throughout:
    N images, 3 colour channels, H x W pixels (the working image size).
    ImageSet.images  (N, 3, H, W) uint8 RGB
    ImageSet.masks   (N, H, W) uint8 in {0, 1}
    Prediction.scores (N,) float32, higher = more anomalous
    Prediction.maps   (N, H, W) float32, finite, or None for methods without localisation
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

# The errors live in a torch-free module (the CLI's light commands import them); re-exported here.
from engine.errors import AdlabError as AdlabError
from engine.errors import ConfigError as ConfigError
from engine.errors import DataValidationError as DataValidationError
from engine.errors import MethodFailure as MethodFailure
from engine.errors import NotFittedError as NotFittedError
from engine.errors import Problem as Problem
from engine.errors import WeightsError as WeightsError

# A progress callback receives a stage name, a fraction in [0, 1] (or None when unknown)
# and free-form details such as {"epoch": 3, "loss": 0.12}.
Progress = Callable[[str, float | None, dict[str, Any]], None]


def no_progress(stage: str, fraction: float | None = None, info: dict[str, Any] | None = None) -> None:
    """A progress callback that ignores everything."""


class _Pixels:
    """The `images` field of ImageSet: a plain tensor, except that a set made with `reload` can `release()` it and
    reads it back from its files on the next access (so a long run need not hold pixels no stage reads)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> torch.Tensor:
        if obj is None:  # the class-level access dataclasses make: no default value
            raise AttributeError("images")
        px = obj.__dict__.get(self.slot)
        if px is None:
            px = _read_back(obj, None)
            obj.__dict__[self.slot] = px
        return px

    def __set__(self, obj: Any, value: torch.Tensor) -> None:
        obj.__dict__[self.slot] = value
        obj.__dict__["_shape"] = tuple(value.shape)


def _read_back(s: ImageSet, rows: range | None) -> torch.Tensor:
    """Released pixels of `s` (all rows, or `rows`) read again through its `reload`, their shape checked."""
    assert s.reload is not None
    px = s.reload(rows)
    want = s.shape if rows is None else (len(rows), *s.shape[1:])
    if tuple(px.shape) != tuple(want):
        raise RuntimeError(f"images read back with shape {tuple(px.shape)}, not {tuple(want)}: "
                           "the dataset's files changed during the run")
    return px


@dataclass
class ImageSet:
    """A batch of images at the working resolution, with labels and optional masks.

    images: (N, 3, H, W) uint8 RGB. labels: (N,) int64, 0 = normal, 1 = anomalous.
    masks: (N, H, W) uint8 {0,1} or None when the dataset has no masks at all.
    has_mask: (N,) bool, True where a real ground-truth mask exists for that image.
    digest: content digest; cache keys for features start from it.
    """

    images: torch.Tensor = _Pixels()  # type: ignore[assignment]  # required: the descriptor gives no default
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    paths: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    has_mask: torch.Tensor | None = None
    digest: str = ""
    # (digest of the full set, row indices) when this set is a subset: lets caches slice the full set's entries.
    origin: tuple[str, tuple[int, ...]] | None = None
    # (rows or None) -> those rows' (k, 3, H, W) uint8 pixels (None: all N), read again from their files;
    # None: the pixels cannot be released
    reload: Callable[[Sequence[int] | None], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels is None:
            self.labels = torch.zeros(n, dtype=torch.int64)
        if not self.paths:
            self.paths = [f"image_{i}" for i in range(n)]
        if not self.defect_types:
            self.defect_types = ["good" if int(v) == 0 else "anomaly" for v in self.labels]
        if self.has_mask is None:
            self.has_mask = torch.zeros(n, dtype=torch.bool) if self.masks is None else torch.ones(n, dtype=torch.bool)
        if not self.digest:
            self.digest = tensor_digest(self.images)

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, 3, H, W) of the images, without reading released pixels back."""
        return self.__dict__["_shape"]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.shape[2]), int(self.shape[3])

    def release(self) -> bool:
        """Drop the pixels when they can be read back (`reload`); the next `images` access reads them again.
        Returns whether they were dropped."""
        if self.reload is None:
            return False
        self.__dict__["_images"] = None
        return True

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """(k, 3, H, W) uint8 pixels of rows start..stop-1: a view of the held pixels, or, when they are released,
        only those rows read from their files (not kept), so a pass in batches never holds the whole set."""
        if self.held:
            return self.images[start:stop]
        return _read_back(self, range(start, min(stop, len(self))))

    @property
    def held(self) -> bool:
        """Whether the pixels are in memory now."""
        return self.__dict__.get("_images") is not None

    def float_images(self) -> torch.Tensor:
        """(N, 3, H, W) float32 in [0, 1]."""
        return to_float_images(self.images)

    def subset(self, idx: list[int] | torch.Tensor) -> ImageSet:
        """A new ImageSet with the given rows; its digest derives from this one's and the rows."""
        idx_t = torch.as_tensor(idx, dtype=torch.int64)
        rows = idx_t.tolist()
        assert self.labels is not None and self.has_mask is not None
        return ImageSet(
            images=self.images[idx_t],
            labels=self.labels[idx_t],
            masks=None if self.masks is None else self.masks[idx_t],
            paths=[self.paths[i] for i in rows],
            defect_types=[self.defect_types[i] for i in rows],
            has_mask=self.has_mask[idx_t],
            digest=hashlib.sha256(f"{self.digest}|{rows}".encode()).hexdigest()[:32],
            origin=(self.origin[0], tuple(self.origin[1][i] for i in rows)) if self.origin
            else (self.digest, tuple(rows)),
        )


def tensor_digest(t: torch.Tensor) -> str:
    """Content digest of a tensor (its dtype, shape and bytes)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float32 in [0,1]; float input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def as_imageset(images: ImageSet | torch.Tensor) -> ImageSet:
    """Accept an ImageSet or a (N,3,H,W) tensor (uint8, or float in [0,1])."""
    if isinstance(images, ImageSet):
        return images
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected ImageSet or Tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return ImageSet(images=images)


@dataclass
class Prediction:
    """scores: (N,) float32, higher = more anomalous; maps: (N, H, W) float32 or None."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


@runtime_checkable
class Detector(Protocol):
    """What every method offers. See engine.methods.base.BaseDetector for the shared implementation."""

    def fit(self, train: ImageSet, *, anomalies: ImageSet | None = None,
            progress: Progress | None = None) -> Detector: ...

    def predict(self, images: ImageSet | torch.Tensor) -> Prediction: ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> Detector: ...

    def get_params(self) -> dict[str, Any]: ...
