"""The one base class: parameter handling, shared checks, seeding, device, save/load (DESIGN §2).

Subclasses implement:
    _fit(train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None
    _predict(images: ImageSet) -> Prediction   (maps may be at any resolution; resized here)
    _state() -> dict[str, Tensor]               (learned tensors to save)
    _set_state(tensors: dict[str, Tensor], extra: dict) -> None
    _extra() -> dict                            (optional JSON-able learned values, e.g. a quantile)
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
from engine.device import resolve_device, seed_everything


class BaseDetector:
    """Shared behaviour of every detector. `__init__` of subclasses stores parameters only."""

    method_name: ClassVar[str] = "base"
    family: ClassVar[str] = ""
    requires_anomalies: ClassVar[bool] = False

    # Set by the runner / user; not a parameter (does not change results beyond float rounding).
    device: str = "auto"

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
        self._fit(train, anomalies, progress or no_progress)
        self.image_size_ = train.size
        self.fitted_ = True
        return self

    def predict(self, images: ImageSet | torch.Tensor) -> Prediction:
        if not self.is_fitted:
            raise NotFittedError(f"{self.method_name}: call fit() before predict()")
        imgs = as_imageset(images)
        if not hasattr(self, "device_"):
            self.device_ = resolve_device(self.device)
        with torch.inference_mode():
            pred = self._predict(imgs)
        scores = pred.scores.detach().float().cpu().reshape(-1)
        if scores.shape[0] != len(imgs):
            raise MethodFailure(f"{self.method_name} returned {scores.shape[0]} scores for {len(imgs)} images")
        if not torch.isfinite(scores).all():
            raise MethodFailure(f"{self.method_name} produced non-finite scores (NaN/inf): training diverged?")
        maps = pred.maps
        if maps is not None:
            maps = maps.detach().float().cpu()
            if maps.ndim == 4:
                maps = maps[:, 0]
            if tuple(maps.shape[-2:]) != imgs.size:
                maps = F.interpolate(maps[:, None], size=imgs.size, mode="bilinear", align_corners=False)[:, 0]
            if not torch.isfinite(maps).all():
                raise MethodFailure(f"{self.method_name} produced non-finite anomaly maps")
        return Prediction(scores=scores, maps=maps)

    def save(self, directory: str | Path) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{self.method_name}: nothing to save before fit()")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.method_name, "engine_version": ENGINE_VERSION, "params": self.get_params(),
                "image_size": list(self.image_size_), "extra": self._extra()}
        save_tensors(self._state(), d / "state.safetensors")
        (d / "params.json").write_text(json.dumps(meta, default=str))

    def load(self, directory: str | Path) -> BaseDetector:
        d = Path(directory)
        meta = json.loads((d / "params.json").read_text())
        if meta.get("method") != self.method_name:
            raise ConfigError(f"{d} holds a {meta.get('method')!r} model, not {self.method_name!r}")
        self.set_params(**{k: (tuple(v) if isinstance(getattr(self, k, None), tuple) else v)
                           for k, v in meta["params"].items()})
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
