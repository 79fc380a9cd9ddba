"""Formats: one module each, registered by name.

``get_format("mpo")`` returns the class; ``register_format`` adds a new one (one module in
this package plus one call).
"""

from __future__ import annotations

from .base import EinsumFactorization, Factorization
from .btt import BTT
from .cp import CP
from .lowrank import LowRank
from .mpo import MPO
from .tt import TensorTrain
from .tucker import Tucker

__all__ = [
    "Factorization",
    "EinsumFactorization",
    "LowRank",
    "Tucker",
    "TensorTrain",
    "MPO",
    "BTT",
    "CP",
    "register_format",
    "get_format",
    "available_formats",
]

_REGISTRY: dict[str, type[Factorization]] = {}


def register_format(cls: type[Factorization], *aliases: str) -> type[Factorization]:
    """Register ``cls`` under ``cls.format_name`` (and ``aliases``); returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Factorization)) or not cls.format_name:
        raise TypeError(f"{cls!r} must be a Factorization subclass with a format_name")
    for name in (cls.format_name, *aliases):
        if not isinstance(name, str) or not name:
            raise TypeError(f"format names and aliases must be non-empty strings, got {name!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"format name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
    return cls


def get_format(name: str) -> type[Factorization]:
    """The format class registered as ``name`` (``"lowrank"``, ``"tucker"``, ``"tt"``, ``"mpo"``/``"ttm"``, ``"btt"``, ``"cp"``)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; available: {sorted(_REGISTRY)}") from None


def available_formats() -> list[str]:
    """Canonical names of the registered formats (aliases omitted)."""
    return sorted({cls.format_name for cls in _REGISTRY.values()})


register_format(LowRank)
register_format(Tucker)
register_format(TensorTrain)
register_format(MPO, "ttm")
register_format(BTT)
register_format(CP)
