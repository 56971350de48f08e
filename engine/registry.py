"""Explicit registry of methods by family and name (DESIGN §3).

Every page, the CLI and the README table read this registry; nothing lists methods by hand.

The @register decorators on the method classes are the single source of truth. Importing every method module
costs seconds (torch, timm, ...), so `available()` reads `engine/_method_catalog.py`, a file generated from the
decorators (`python scripts/update_catalog.py`; a test checks it equals the live registry), and a method's
module is imported only when `info()`/`create()` needs its class.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.errors import ConfigError

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
    "engine.methods.one_class.deep_svdd",
    "engine.methods.one_class.patch_svdd",
    "engine.methods.one_class.fcdd",
    "engine.methods.distribution.fastflow",
    "engine.methods.distribution.cflow",
    "engine.methods.distribution.cs_flow",
    "engine.methods.autoencoder.autoencoder",
    "engine.methods.autoencoder.vae",
    "engine.methods.autoencoder.draem",
    "engine.methods.autoencoder.dfr",
    "engine.methods.autoencoder.memae",
    "engine.methods.autoencoder.skip_ae",
    "engine.methods.gan.ganomaly",
    "engine.methods.transformer.patch_transformer",
    "engine.methods.weakly_supervised.devnet",
    "engine.methods.weakly_supervised.mixed_supervision",
    "engine.methods.weakly_supervised.neural_batch_sampler",
    "engine.methods.weakly_supervised.cavga",
    "engine.methods.weakly_supervised.liac",
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
    # trains in bf16 mixed precision on CPUs with AMX (engine.device.cpu_bf16), where that was measured faster
    cpu_bf16: bool = False
    uses_backbone: bool = True
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "fast" / "quality" -> params
    # Presets that shrink the paper's configuration to fit a CPU (DESIGN §3): runs with them are marked "reduced".
    reduced_presets: tuple[str, ...] = ()
    factory: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    module: str = field(default="", compare=False, repr=False)  # where the class lives (imported on first use)
    class_name: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("factory", "module", "class_name"):
            d.pop(k, None)
        d["family_title"] = FAMILIES[self.family]
        return d

    def catalog_entry(self) -> dict[str, Any]:
        """What `engine/_method_catalog.py` stores of this method: everything but the class itself."""
        d = asdict(self)
        d.pop("factory", None)
        return d


_REGISTRY: dict[str, MethodInfo] = {}  # methods whose module has been imported (their decorators ran)
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
    reduced_presets: tuple[str, ...] = (),
    cpu_bf16: bool = False,
) -> Callable[[type], type]:
    """Class decorator adding a Detector class to the registry under `name`.

    reduced_presets: the presets (of "test", "fast", "quality") that shrink the paper's configuration; a run
    with one of them is marked `"reduced": true` in its record and shown as "reduced".
    cpu_bf16: the method's training runs in bf16 mixed precision on CPUs with AMX (engine.device.cpu_bf16); set
    only where its training was measured faster so, with image AUROCs within a draw's spread.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILIES)}")
    if supervision not in ("none", "weak"):
        raise ValueError("supervision must be 'none' or 'weak'")
    if cpu_bf16 and not trained:
        raise ValueError("cpu_bf16 applies to trained methods only (it sets the precision of train_loop)")
    if set(reduced_presets) - {"test", "fast", "quality"}:
        raise ValueError(f"reduced_presets must name presets (test, fast, quality), got {reduced_presets}")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].factory is not cls:
            raise ValueError(f"method name {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(
            name=name, family=family, localises=localises, supervision=supervision, paper=paper,
            summary=summary, faithful=faithful, notes=notes, trained=trained, uses_backbone=uses_backbone,
            presets=dict(presets or {}), reduced_presets=tuple(reduced_presets), cpu_bf16=cpu_bf16, factory=cls,
            module=cls.__module__, class_name=cls.__qualname__,
        )
        cls.method_name = name
        cls.family = family
        cls.cpu_bf16 = cpu_bf16
        return cls

    return deco


def _load_all() -> None:
    """Import every method module, so every decorator has run (the catalog generator and its test use this)."""
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


def live_catalog() -> list[dict[str, Any]]:
    """Catalog entries of every registered method, read from the decorators themselves (imports every module)."""
    _load_all()
    order = list(FAMILIES)
    infos = sorted(_REGISTRY.values(), key=lambda m: (order.index(m.family), m.name))
    return [m.catalog_entry() for m in infos if m.module in _METHOD_MODULES]


@functools.cache
def _catalog() -> dict[str, MethodInfo]:
    from engine._method_catalog import METHODS

    return {d["name"]: MethodInfo(**d) for d in METHODS}


def _catalog_covers_every_module() -> bool:
    """False when a method module was added to _METHOD_MODULES after the catalog was generated (e.g. a merge):
    then every module is imported, slow but complete, until `scripts/update_catalog.py` is run."""
    return set(_METHOD_MODULES) <= {m.module for m in _catalog().values()}


def available(family: str | None = None) -> list[MethodInfo]:
    """All registered methods (optionally of one family), ordered by family then name. Imports no method module:
    methods not imported yet come from the generated catalog (their `factory` is None; `info()` has it)."""
    if not _catalog_covers_every_module():
        _load_all()
    merged = {**_catalog(), **_REGISTRY}
    order = list(FAMILIES)
    infos = [m for m in merged.values() if family is None or m.family == family]
    return sorted(infos, key=lambda m: (order.index(m.family), m.name))


def info(name: str) -> MethodInfo:
    """The MethodInfo of one method, its class included (its module is imported now); ConfigError when unknown."""
    live = _REGISTRY.get(name)
    if live is not None and live.factory is not None:
        return live
    entry = _catalog().get(name)
    if entry is None and not _catalog_covers_every_module():
        _load_all()
        if name in _REGISTRY:
            return _REGISTRY[name]
    if entry is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(m.name for m in available())}")
    cls = getattr(importlib.import_module(entry.module), entry.class_name)
    live = _REGISTRY.get(name)
    return live if live is not None and live.factory is cls else replace(entry, factory=cls)


def is_reduced(name: str, preset: str | None) -> bool:
    """True when `preset` shrinks the paper's configuration of method `name` (its run is shown as "reduced")."""
    return bool(preset) and preset in info(name).reduced_presets


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
