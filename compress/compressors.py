"""Compressors: one table from method name to what compresses a layer and how it is counted.

``get_compressor("gptq")`` returns the :class:`Compressor` (layer function, statistics needed, parameter count,
storage bits, label); ``register`` adds one. Adding a compressor is one module that defines its layer function and
calls ``register`` (the built-in ones: :mod:`compress.factorizing`, :mod:`compress.sources`, :mod:`compress.gptq`,
:mod:`compress.sparsegpt`, all imported by the package ``compress``). :class:`compress.CompressionConfig`,
:func:`compress.compress_model` and ``tensornets compress`` look methods up here and branch on no method name
(options a method reads only with another, such as sparsegpt's ``group_size`` with ``sparse_bits``, are declared in
its entry, ``reads_only_with``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:  # config and calibration import this module
    from compress.calibration import LayerStats
    from compress.config import CompressionConfig
    from compress.quantized import QuantizedWeight


@dataclass(frozen=True)
class LayerJob:
    """One layer to compress.

    Attributes:
        name: module path (for error messages).
        module: the original layer (``nn.Linear``, ``Conv1D`` or ``nn.Conv2d``), not to be modified.
        weight: its ``(out, in)`` weight matrix (:func:`compress.targets.dense_weight`) on the processing device.
        config: the whole :class:`~compress.config.CompressionConfig`.
        stats: the layer's calibration statistics (``None`` when none were collected).
        rank: a rank fixed beforehand (``allocation="global"``), else ``None``.
    """

    name: str
    module: nn.Module
    weight: torch.Tensor
    config: CompressionConfig
    stats: LayerStats | None
    rank: int | None = None


@dataclass(frozen=True)
class LayerResult:
    """What a layer function returns: exactly one of ``weight`` (the new ``(out, in)`` matrix of a dense layer,
    which is overwritten in place) or ``module`` (a replacement layer), a short ``description`` for the report
    (ranks, bits, pattern) and, for quantizers, the integer form ``quantized`` that exporters pack."""

    description: str
    weight: torch.Tensor | None = None
    module: nn.Module | None = None
    quantized: QuantizedWeight | None = None

    def __post_init__(self) -> None:
        if (self.weight is None) == (self.module is None):
            raise ValueError("a LayerResult holds exactly one of weight= (dense methods) and module= (replacements)")


@dataclass(frozen=True)
class Compressor:
    """A registered compression method.

    Attributes:
        name: the method name (``CompressionConfig(method=name)``).
        kind: ``"dense"``: the layer keeps a dense weight, quantized and / or pruned (sized by ``bits`` /
            ``sparsity``; its EoRA residual exports as a PEFT LoRA adapter); ``"factorized"``: the layer is replaced
            by a factorized one (sized by exactly one of ``keep`` / ``rank`` / ``energy``).
        compress_layer: the layer function, ``LayerJob -> LayerResult``.
        needs_stats: whether it reads calibration statistics (``LayerStats``).
        parameters: parameter count of a compressed layer's weight, ``(layer, config) -> int`` (the layer after
            compression: the original one with its new weight, or the replacement).
        storage_bits: bits to store a compressed layer's weight, ``(shape, parameters, config) -> float``
            (values at 16 bits unless quantized; 16-bit scales, packed zero points and sparsity metadata
            included).
        label: human description of the setting, ``config -> str`` (``"gptq 3-bit, group 64, act-order"``).
        spectrum: for global rank allocation (``allocation="global"``), the squared weighted singular values of a
            layer, ``LayerJob -> (k,) tensor``; ``None`` when the method has no rank to allocate.
        validate: checks of the method's own options, ``config -> None`` raising ``ValueError`` (run when the
            config is built, before any work).
        check_layer: checks that one layer can take the method, ``(name, layer, (out, in), config) -> None`` raising
            ``ValueError`` naming the layer (a group size that does not divide its width, a pattern, a layer type);
            :func:`compress.compress_model` runs it on every target before it changes any.
        aliases: other names accepted for it (``"prune24"`` for ``"2:4"``).
        reads: the :data:`METHOD_OPTIONS` fields of :class:`CompressionConfig` the method uses (``bits``,
            ``sparsity``, ``whiten``, ...); ``CompressionConfig`` and the CLI refuse the others set away from their
            defaults instead of ignoring them. ``None``: unknown (every option accepted), the default for
            compressors registered without it.
        reads_only_with: options of ``reads`` that the method reads only when another option is set away from its
            default, ``{option: condition}`` (sparsegpt's ``group_size`` only with ``sparse_bits``, TT's ``seed``
            only with ``svd='randomized'``); refused like the unread ones while the condition is at its default.
        help: one line for ``--help``.
    """

    name: str
    kind: Literal["dense", "factorized"]
    compress_layer: Callable[[LayerJob], LayerResult]
    needs_stats: bool
    parameters: Callable[[nn.Module, CompressionConfig], int]
    storage_bits: Callable[[tuple[int, int], int, CompressionConfig], float]
    label: Callable[[CompressionConfig], str]
    spectrum: Callable[[LayerJob], torch.Tensor] | None = None
    validate: Callable[[CompressionConfig], None] | None = None
    check_layer: Callable[[str, nn.Module, tuple[int, int], CompressionConfig], None] | None = None
    aliases: tuple[str, ...] = field(default=())
    help: str = ""
    reads: frozenset[str] | None = None
    reads_only_with: Mapping[str, str] = field(default_factory=dict)


#: the options of :class:`CompressionConfig` that only some compressors read (``Compressor.reads``): quantization,
#: pruning, the input scalings of the low-rank methods, and the structure and SVDs of the tensor formats
METHOD_OPTIONS = frozenset({"bits", "group_size", "symmetric", "observer", "scale_dtype", "act_order", "percdamp",
                            "block_size", "sparsity", "pattern", "sparse_bits", "whiten", "alpha", "ridge", "eps",
                            "num_cores", "modes", "svd", "seed", "decompose_options"})

_REGISTRY: dict[str, Compressor] = {}
_ALIASES: dict[str, str] = {}


def register(compressor: Compressor) -> Compressor:
    """Add ``compressor`` under its name and aliases; returns it.

    Registering under a name already registered replaces that compressor (so a module can be reloaded); a name or
    alias that belongs to another compressor raises ``ValueError``.
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(f"register takes a Compressor, got {type(compressor).__name__}")
    if compressor.kind not in ("dense", "factorized"):
        raise ValueError(f"Compressor {compressor.name!r}: kind={compressor.kind!r} must be 'dense' or 'factorized'")
    if compressor.reads is not None and not compressor.reads <= METHOD_OPTIONS:
        raise ValueError(f"Compressor {compressor.name!r}: reads={sorted(compressor.reads)} names fields outside "
                         f"{sorted(METHOD_OPTIONS)}")
    conditional = set(compressor.reads_only_with) | set(compressor.reads_only_with.values())
    if conditional and (compressor.reads is None or not conditional <= compressor.reads):
        raise ValueError(f"Compressor {compressor.name!r}: reads_only_with={dict(compressor.reads_only_with)} names "
                         f"options outside reads={sorted(compressor.reads or ())}")
    for name in (compressor.name, *compressor.aliases):
        owner = _ALIASES.get(name)
        if owner is not None and owner != compressor.name:
            raise ValueError(f"compressor name {name!r} is already registered to {owner!r}")
    _REGISTRY[compressor.name] = compressor
    for name in (compressor.name, *compressor.aliases):
        _ALIASES[name] = compressor.name
    return compressor


def get_compressor(name: str) -> Compressor:
    """The compressor registered as ``name`` or one of its aliases; unknown names raise ``ValueError`` listing all."""
    try:
        return _REGISTRY[_ALIASES[name]]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r} is not one of the registered compressors {available_compressors()} "
                         "(aliases: prune24); add one with compress.compressors.register") from None


def available_compressors() -> list[str]:
    """Canonical names, in registration order (aliases omitted)."""
    return list(_REGISTRY)


def aliases() -> dict[str, str]:
    """Every accepted name (aliases included) -> canonical name."""
    return dict(_ALIASES)
