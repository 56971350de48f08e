"""Explicit registry of methods by family and name (DESIGN §3).

Every page, the CLI and the README table read this registry; nothing lists methods by hand.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
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
    "engine.methods.memory_bank.cfa",
    "engine.methods.memory_bank.gcpf",
    "engine.methods.teacher_student.stfpm",
    "engine.methods.teacher_student.reverse_distillation",
    "engine.methods.teacher_student.efficient_ad",
    "engine.methods.teacher_student.uninformed_students",
    "engine.methods.one_class.patch_svdd",
    "engine.methods.one_class.fcdd",
    "engine.methods.distribution.fastflow",
    "engine.methods.distribution.cflow",
    "engine.methods.distribution.cs_flow",
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
    merged = check_params(name, mi.factory, merged)
    try:
        return mi.factory(**merged)
    except TypeError as e:
        raise ConfigError(f"bad parameters for {name}: {e}") from e


def check_params(name: str, cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """Params checked against the annotations of `cls.__init__`; returns them coerced (int -> float, list -> tuple).

    An unknown name or a value of the wrong type is a ConfigError that names `method.param`, the expected
    type and the value, instead of a TypeError deep inside fit.
    """
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for key, value in params.items():
        if key not in sig.parameters:
            known = ", ".join(p for p in sig.parameters if p != "self")
            raise ConfigError(f"{name} has no parameter {key!r}; its parameters are: {known}")
        hint = hints.get(key, Any)
        try:
            out[key] = _coerce(value, hint)
        except TypeError:
            raise ConfigError(f"{name}.{key} expects {_type_name(hint)}, got {value!r} "
                              f"({type(value).__name__})") from None
    return out


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as an instance of the annotation `hint`; TypeError when it is not one."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True)) if args else tuple(value)
    return value


def _type_name(hint: Any) -> str:
    """'an integer or None', 'a tuple of str', ... for error messages."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "None"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return f"a comma-separated list of {args[0].__name__}" if args else "a list"
    return getattr(hint, "__name__", str(hint))
