"""Explicit registry of methods by family and name (DESIGN §3).

Every page, the CLI and the README table read this registry; nothing lists methods by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.api import ConfigError

# Families named as in the survey, in the order the survey presents them.
FAMILIES: dict[str, str] = {
    "teacher_student": "Teacher–student",
    "one_class": "One-class classification",
    "distribution": "Distribution map (normalizing flows)",
    "memory_bank": "Memory bank",
    "autoencoder": "Autoencoder / VAE",
    "gan": "GAN",
    "transformer": "Transformer",
    "weakly_supervised": "Weakly supervised",
}

# Modules that hold registered methods; importing them runs their @register decorators.
_METHOD_MODULES = [
    "engine.methods.memory_bank.patchcore",
    "engine.methods.memory_bank.padim",
    "engine.methods.memory_bank.spade",
    "engine.methods.teacher_student.stfpm",
    "engine.methods.teacher_student.reverse_distillation",
    "engine.methods.teacher_student.efficient_ad",
    "engine.methods.one_class.patch_svdd",
    "engine.methods.one_class.fcdd",
    "engine.methods.distribution.fastflow",
    "engine.methods.distribution.cflow",
    "engine.methods.autoencoder.autoencoder",
    "engine.methods.autoencoder.vae",
    "engine.methods.autoencoder.draem",
    "engine.methods.gan.ganomaly",
    "engine.methods.transformer.patch_transformer",
    "engine.methods.weakly_supervised.devnet",
    "engine.methods.weakly_supervised.mixed_supervision",
]


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method."""

    name: str
    family: str
    localises: bool
    supervision: str  # "none" | "weak"
    paper: str
    summary: str
    faithful: bool = True
    notes: str = ""
    trained: bool = False  # gradient-trained (uses train_loop): presets change its epochs
    uses_backbone: bool = True
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "fast" / "quality" -> params
    factory: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("factory", None)
        d["family_title"] = FAMILIES[self.family]
        return d


_REGISTRY: dict[str, MethodInfo] = {}
_LOADED = False


def register(
    *,
    family: str,
    name: str,
    localises: bool,
    supervision: str = "none",
    paper: str,
    summary: str,
    faithful: bool = True,
    notes: str = "",
    trained: bool = False,
    uses_backbone: bool = True,
    presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[type], type]:
    """Class decorator adding a Detector class to the registry under `name`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILIES)}")
    if supervision not in ("none", "weak"):
        raise ValueError("supervision must be 'none' or 'weak'")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].factory is not cls:
            raise ValueError(f"method name {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(
            name=name, family=family, localises=localises, supervision=supervision, paper=paper,
            summary=summary, faithful=faithful, notes=notes, trained=trained, uses_backbone=uses_backbone,
            presets=dict(presets or {}), factory=cls,
        )
        cls.method_name = name
        cls.family = family
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only a module that is not written yet may be missing; a broken import inside it must surface.
            if e.name != mod and not mod.startswith(str(e.name)):
                raise
    _LOADED = True


def available(family: str | None = None) -> list[MethodInfo]:
    """All registered methods (optionally of one family), ordered by family then name."""
    _load_all()
    order = list(FAMILIES)
    infos = [m for m in _REGISTRY.values() if family is None or m.family == family]
    return sorted(infos, key=lambda m: (order.index(m.family), m.name))


def info(name: str) -> MethodInfo:
    """The MethodInfo of one method; ConfigError when unknown."""
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(m.name for m in available())}")
    return _REGISTRY[name]


def create(name: str, *, preset: str | None = None, **params: Any) -> Any:
    """Build a method by name. A preset supplies defaults that explicit params override.

    "fast" (the default in the UI and CLI) and "quality" are for users; "test" is the smallest setting
    that still learns, used by the contract suite (methods without one fall back to "fast").
    """
    mi = info(name)
    merged: dict[str, Any] = {}
    if preset:
        if preset not in ("fast", "quality", "test"):
            raise ConfigError(f"unknown preset {preset!r}; use 'fast' or 'quality'")
        merged.update(mi.presets.get(preset) or (mi.presets.get("fast", {}) if preset == "test" else {}))
    merged.update(params)
    assert mi.factory is not None
    try:
        return mi.factory(**merged)
    except TypeError as e:
        raise ConfigError(f"bad parameters for {name}: {e}") from e
