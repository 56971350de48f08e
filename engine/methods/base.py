"""The one base class: parameter handling, shared checks, seeding, device, save/load (DESIGN §2).

Subclasses implement:
    _fit(train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None
    _predict(images: ImageSet) -> Prediction   (maps may be at any resolution; resized here)
    _state() -> dict[str, Tensor]               (learned tensors to save)
    _set_state(tensors: dict[str, Tensor], extra: dict) -> None
    _extra() -> dict                            (optional JSON-able learned values, e.g. a quantile)

Tiling (issue 17) happens here, once for every method: with `set_tiling(tile)` (the runner's --tile), or for a
method with `square_input` (it resizes its input to a fixed square) given non-square images, fit and predict
see overlapping square tiles (engine.components.tiling); predict stitches the tiles' maps back to the input's
shape (overlaps averaged) and scores each image by the max over its tiles.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from engine.api import (
    ConfigError,
    ImageSet,
    MethodFailure,
    NotFittedError,
    Prediction,
    Progress,
    as_imageset,
    no_progress,
)
from engine.cache import ENGINE_VERSION, load_tensors, save_tensors
from engine.components.tiling import TileGrid, make_grid, max_per_image, stitch_maps, tile_images
from engine.data.geometry import DEFAULT_OVERLAP, check_tile
from engine.device import cpu_bf16_allowed, resolve_device, seed_everything


class BaseDetector:
    """Shared behaviour of every detector. `__init__` of subclasses stores parameters only."""

    method_name: ClassVar[str] = "base"
    family: ClassVar[str] = ""
    cpu_bf16: ClassVar[bool] = False  # set by the registry: trains in bf16 on CPUs with AMX (engine.device.cpu_bf16)
    requires_anomalies: ClassVar[bool] = False

    # Set by the runner / user; not a parameter (does not change results beyond float rounding).
    device: str = "auto"
    # The method resizes whatever it gets to one fixed square (`size`): non-square images reach it as square tiles
    # of their short side instead of being squashed.
    square_input: ClassVar[bool] = False
    # predict reads the shared test features in one extract_features call and drops them before it builds the
    # maps: the runner may then hand the features over (features.hand_over) so they are freed as the method
    # lets go of them, not after predict (PaDiM on mt: the 440 MB of test features beside the 171 MB of maps).
    reads_test_features_once: ClassVar[bool] = False
    # Tiling of every image (set_tiling); not a constructor parameter (it is the same for every method), but it
    # changes results: the runner puts it in the run's cache key and save() stores it.
    tile: int | None = None
    tile_overlap: float = DEFAULT_OVERLAP

    # --- parameters ---------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> BaseDetector:
        names = set(self._param_names())
        for k, v in params.items():
            if k not in names:
                raise ConfigError(f"{self.method_name} has no parameter {k!r}; it has {sorted(names)}")
            setattr(self, k, v)
        return self

    def feature_layers(self) -> tuple[str, ...]:
        """Backbone stages this method reads from the shared feature cache (empty: none)."""
        layers = getattr(self, "layers", ())
        return tuple(layers) if getattr(self, "backbone", None) else ()

    def to(self, device: str) -> BaseDetector:
        self.device = device
        return self

    def set_tiling(self, tile: int | None, overlap: float = DEFAULT_OVERLAP) -> BaseDetector:
        """Work on overlapping `tile` x `tile` tiles of every image (None: whole images). ConfigError if invalid."""
        try:
            check_tile(tile, overlap)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.tile, self.tile_overlap = tile, float(overlap)
        return self

    def tile_grid(self, shape: tuple[int, int]) -> TileGrid | None:
        """The tiles images of `shape` (H, W) are cut into, or None when the method sees them whole."""
        if self.tile is not None:
            grid = make_grid(shape, self.tile, self.tile_overlap)
        elif self.square_input and shape[0] != shape[1]:
            grid = make_grid(shape, min(shape), self.tile_overlap)
        else:
            return None
        return None if grid.n == 1 and (grid.tile, grid.tile) == tuple(shape) else grid

    def working_images(self, images: ImageSet) -> ImageSet:
        """What _fit / _predict receive for `images`: their tiles (N*T, 3, t, t), or the images themselves."""
        grid = self.tile_grid(images.size)
        return images if grid is None else tile_images(images, grid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # --- public contract ------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "fitted_", False))

    def fit(self, train: ImageSet | torch.Tensor, *, anomalies: ImageSet | None = None,
            progress: Progress | None = None) -> BaseDetector:
        train = as_imageset(train)
        if len(train) == 0:
            raise ConfigError("no training images")
        if self.requires_anomalies and (anomalies is None or len(anomalies) == 0):
            raise ConfigError(
                f"{self.method_name} is weakly supervised: it needs labelled anomalous images "
                "(set labelled anomalies K ≥ 1)"
            )
        self.device_ = resolve_device(self.device)
        self.generator_ = seed_everything(int(getattr(self, "seed", 0)))
        with cpu_bf16_allowed(self.cpu_bf16):
            self._fit(self.working_images(train), None if anomalies is None else self.working_images(anomalies),
                      progress or no_progress)
        self.image_size_ = train.size
        self.fitted_ = True
        return self

    def predict(self, images: ImageSet | torch.Tensor) -> Prediction:
        if not self.is_fitted:
            raise NotFittedError(f"{self.method_name}: call fit() before predict()")
        imgs = as_imageset(images)
        if not hasattr(self, "device_"):
            self.device_ = resolve_device(self.device)
        grid = self.tile_grid(imgs.size)
        work = imgs if grid is None else tile_images(imgs, grid)
        with torch.inference_mode():
            pred = self._predict(work)
        scores = pred.scores.detach().float().cpu().reshape(-1)
        if scores.shape[0] != len(work):
            raise MethodFailure(f"{self.method_name} returned {scores.shape[0]} scores for {len(work)} images")
        if not torch.isfinite(scores).all():
            raise MethodFailure(f"{self.method_name} produced non-finite scores (NaN/inf): training diverged?")
        maps = pred.maps
        if maps is not None:
            maps = maps.detach().float().cpu()
            if maps.ndim == 4:
                maps = maps[:, 0]
            if tuple(maps.shape[-2:]) != work.size:
                maps = F.interpolate(maps[:, None], size=work.size, mode="bilinear", align_corners=False)[:, 0]
            if not torch.isfinite(maps).all():
                raise MethodFailure(f"{self.method_name} produced non-finite anomaly maps")
            if grid is not None:
                maps = stitch_maps(maps, grid)
        if grid is not None:
            scores = max_per_image(scores, grid)
        return Prediction(scores=scores, maps=maps)

    def save(self, directory: str | Path) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.method_name}: nothing to save before fit()")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.method_name, "engine_version": ENGINE_VERSION, "params": self.get_params(),
                "image_size": list(self.image_size_), "extra": self._extra(),
                "tiling": {"tile": self.tile, "overlap": self.tile_overlap}}
        save_tensors(self._state(), d / "state.safetensors")
        (d / "params.json").write_text(json.dumps(meta, default=str))

    def load(self, directory: str | Path) -> BaseDetector:
        d = Path(directory)
        meta = json.loads((d / "params.json").read_text())
        if meta.get("method") != self.method_name:
            raise ConfigError(f"{d} holds a {meta.get('method')!r} model, not {self.method_name!r}")
        self.set_params(**{k: (tuple(v) if isinstance(getattr(self, k, None), tuple) else v)
                           for k, v in meta["params"].items()})
        tiling = meta.get("tiling") or {}  # absent in models saved before tiling existed
        self.set_tiling(tiling.get("tile"), tiling.get("overlap", DEFAULT_OVERLAP))
        self.device_ = resolve_device(self.device)
        self._set_state(load_tensors(d / "state.safetensors"), meta.get("extra", {}))
        self.image_size_ = tuple(meta["image_size"])
        self.fitted_ = True
        return self

    # --- to implement -----------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        raise NotImplementedError

    def _predict(self, images: ImageSet) -> Prediction:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def _extra(self) -> dict[str, Any]:
        return {}


def module_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state_dict with keys prefixed, for _state()."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_state(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of module_state (strict)."""
    p = prefix + "."
    module.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, strict=True)
