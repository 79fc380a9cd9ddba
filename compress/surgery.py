"""Compress a model's target layers one by one, and report sizes, ranks and errors per layer.

Finding and replacing the layers is :mod:`compress.targets`; saving and reloading the result is
:mod:`compress.checkpoint`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress import lowrank as lr
from compress.budget import allocate_ranks
from compress.calibration import ActivationStats
from compress.compressors import LayerJob
from compress.config import CompressionConfig
from compress.quantized import QuantizedWeight
from compress.targets import (
    check_not_shared,
    check_weights_writable,
    drop_bypassed,
    dense_weight,
    find_targets,
    layer_kind,
    replace_module,
    set_dense_weight,
    unwrap_compiled,
)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One compressed layer: sizes, ranks and errors.

    ``rel_output_error`` is ``‖(W − Ŵ) X‖_F / ‖W X‖_F`` on the calibration inputs (bias excluded; ``None`` without
    statistics); ``keep`` = ``params_after / params_before`` (weights only).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    method: str
    params_before: int
    params_after: int
    ranks: str
    rel_weight_error: float
    rel_output_error: float | None

    @property
    def keep(self) -> float:
        """Fraction of the layer's weight parameters kept, ``params_after / params_before``."""
        return self.params_after / self.params_before


@dataclass
class CompressionReport:
    """Result of :func:`compress_model`: the compressed ``model``, one :class:`LayerReport` per layer and, for
    quantizing methods, each layer's integer form (``quantized``: name -> :class:`~compress.quantized.QuantizedWeight`,
    whose ``dequantize()`` is the weight the model holds), which exporters pack."""

    model: nn.Module
    layers: list[LayerReport]
    config: CompressionConfig
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        """Weight parameters of the target layers before compression (biases excluded)."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Weight parameters of the target layers after compression: the factors of a factorization, the nonzeros
        of a pruned weight, every weight of a quantized one (its storage: ``config.compressor.storage_bits``)."""
        return sum(r.params_after for r in self.layers)

    @property
    def keep(self) -> float:
        """Fraction of the target weights' parameters kept."""
        return self.params_after / self.params_before

    @property
    def pruned(self) -> bool:
        """Whether the method kept dense weights with fewer of them nonzero (magnitude, 2:4, sparsegpt): what the
        checkpoint writers store dense although :attr:`storage_bits` counts it sparse."""
        return self.config.compressor.kind == "dense" and self.keep < 1.0

    @property
    def storage_bits(self) -> float:
        """Bits to store the target layers' weights after compression, by the compressor's count: 16-bit values
        unless quantized, with 16-bit scales and packed zero points (what ``keep`` does not show for quantizers,
        which keep every parameter). Pruned weights are counted in a sparse layout (kept values and their
        positions), which is not what the checkpoint writers store: they write them dense."""
        return sum(self.config.compressor.storage_bits(r.shape, r.params_after, self.config) for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary: totals, config and the per-layer rows."""
        return {
            "method": self.config.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "keep": self.keep,
            "config": self.config.to_dict(),
            "layers": [{**asdict(r), "keep": r.keep} for r in self.layers],
        }

    def table(self) -> str:
        """Fixed-width table, one row per layer and a total (``keep`` = kept fraction, ``removed`` = 1 − keep)."""
        head = ("layer", "shape", "params before", "params after", "keep", "ranks", "rel W err", "rel out err")
        rows = [
            (r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.params_before), str(r.params_after), f"{r.keep:.3f}", r.ranks,
             f"{r.rel_weight_error:.4f}", "-" if r.rel_output_error is None else f"{r.rel_output_error:.4f}")
            for r in self.layers
        ]
        rows.append(("total", "", str(self.params_before), str(self.params_after), f"{self.keep:.3f}",
                     f"removed {1 - self.keep:.3f}", "", ""))
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    def __str__(self) -> str:
        layout = ("in a sparse layout (kept values and their positions; the checkpoint writers store pruned weights "
                  "dense)") if self.pruned else "with 16-bit values and scales"
        storage = (f"; {_fmt_bytes(self.storage_bits / 8)} stored {layout}, {self.storage_bits / self.params_before:.2f} "
                   f"bits per weight (dense 16-bit: {_fmt_bytes(2 * self.params_before)})")
        return (f"{self.config.method}: kept {self.keep:.3f} of {self.params_before} target parameters{storage}\n"
                f"{self.table()}")


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------- per-layer compression
def _global_ranks(
    targets: Mapping[str, nn.Module], config: CompressionConfig, stats: ActivationStats | None, device, progress
) -> dict[str, int]:
    """Ranks from one budget ``keep · Σ out·in`` allocated by the layers' weighted spectra (:mod:`compress.budget`)."""
    spectra, shapes, floors, caps = {}, {}, {}, {}
    for name, module in tqdm(targets.items(), desc="spectra", disable=None if progress is None else not progress,
                             leave=False):
        W = dense_weight(module).to(device or module.weight.device)
        out_f, in_f = W.shape
        job = LayerJob(name, module, W, config, None if stats is None else stats.get(name))
        spectra[name] = config.compressor.spectrum(job)
        shapes[name] = (out_f, in_f)
        caps[name] = max(1, lr.rank_for_keep(out_f, in_f, 1.0))
        floors[name] = min(caps[name], max(config.min_rank, lr.rank_for_keep(out_f, in_f, config.min_keep)
                                           if config.min_keep > 0 else 1))
    budget = int(config.keep * sum(o * i for o, i in shapes.values()))
    return allocate_ranks(spectra, shapes, budget, floors=floors, caps=caps)


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, or a ``ValueError`` saying why torch cannot make one and what to do instead."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:  # e.g. a pruned layer's .weight is a non-leaf tensor: torch refuses to copy it
        raise ValueError(
            f"compress_model could not copy the model to leave it unchanged ({err}); torch.nn.utils.prune and the old "
            "weight_norm keep non-leaf tensors that deepcopy refuses: make them permanent (prune.remove / "
            "remove_weight_norm), or compress in place with inplace=True"
        ) from None


def compress_model(
    model: nn.Module,
    config: CompressionConfig,
    stats: ActivationStats | None = None,
    *,
    inplace: bool = False,
    progress: bool | None = None,
) -> CompressionReport:
    """Compress the target layers of ``model`` layer by layer.

    Parameters
    ----------
    model : nn.Module
        The model; left bitwise unchanged unless ``inplace=True`` (a deep copy is compressed: peak memory is twice
        the model).
    config : CompressionConfig
        Method, size (``keep`` = fraction of parameters kept, ``rank`` or ``energy``), targets and options.
    stats : ActivationStats, optional
        From :func:`compress.collect_activation_stats` on the same targets. Required by ``asvd`` /
        ``whitened_svd`` / ``gptq`` / ``sparsegpt`` / ``whiten=True`` (``config.needs_stats``); with it every method
        also reports the relative output error on the calibration inputs.
    inplace : bool
        Modify ``model`` itself.
    progress : bool, optional
        tqdm bar over layers (default: only on a terminal).

    Returns
    -------
    CompressionReport
        ``report.model`` is the compressed model; ``print(report)`` shows the per-layer table,
        ``report.to_dict()`` the same data.

    Notes
    -----
    Each layer's weight (and its ``(n, n)`` statistics) is moved to ``config.device`` (default: the layer's device),
    processed in float64 and written back in the layer's dtype and device, so only one layer at a time occupies the
    processing device. The method's layer function comes from the compressor registry (:mod:`compress.compressors`):
    factorizing methods replace ``nn.Linear`` / ``Conv1D`` by :class:`tensornets.FactorizedLinear` and ``nn.Conv2d``
    by :class:`tensornets.FactorizedConv2d`; dense methods (``rtn``, ``gptq``, ``2:4``, ``magnitude``,
    ``sparsegpt``) overwrite the dense weights.
    """
    if not isinstance(inplace, bool):  # a string 'no' is truthy: the caller's model would be compressed
        raise TypeError(f"inplace={inplace!r} must be True or False")
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config={config!r} must be a CompressionConfig: compress_model(model, "
                        "CompressionConfig(method='rtn', bits=4))")
    if config.needs_stats and stats is None:
        raise ValueError(
            f"method={config.method!r}{' with whiten=True' if config.whiten else ''} needs activation statistics: "
            "stats = collect_activation_stats(model, calib_batches, target_modules=...)"
        )
    model = unwrap_compiled(model)
    targets = drop_bypassed(model, find_targets(model, config.target_modules, config.exclude_modules),
                            config.target_modules, config.compressor.kind, config.needs_stats)
    check_not_shared(model, targets)
    check_weights_writable(model, targets, config.compressor.kind)
    work = model if inplace else _copy(model)
    targets = {name: work.get_submodule(name) for name in targets}
    if stats is not None:
        missing = [n for n in targets if n not in stats]
        if missing and config.needs_stats:
            raise ValueError(
                f"no activation statistics for target layers {missing[:5]}; collect them with the same "
                "target_modules / exclude_modules as the config"
            )
    compressor = config.compressor
    for name, module in targets.items():  # before any work: quantizers would zero a NaN's whole group silently
        W = dense_weight(module)
        if W.is_meta:
            raise ValueError(
                f"target {name!r} has its weight on the meta device (no values: built under init_empty_weights or "
                "device='meta', or offloaded by accelerate); load the weights first, or use compress_blocks, which "
                "loads offloaded blocks one at a time"
            )
        if not torch.isfinite(W).all():
            raise ValueError(f"layer {name!r} has {int((~torch.isfinite(W)).sum())} NaN/inf weights; repair or "
                             "exclude it (exclude_modules=) before compressing")
        if compressor.check_layer is not None:  # shapes the method cannot take, before any layer is changed
            compressor.check_layer(name, module, tuple(W.shape), config)
    ranks = _global_ranks(targets, config, stats, config.device, progress) if config.allocation == "global" else {}
    layers, quantized = [], {}
    for name, module in tqdm(targets.items(), desc=f"compress ({config.method})",
                             disable=None if progress is None else not progress):
        device = config.device or module.weight.device
        layer_stats = stats.get(name) if stats is not None else None
        W = dense_weight(module).clone()  # dense methods overwrite the weight in place
        job = LayerJob(name, module, W.to(device), config,
                       None if layer_stats is None else layer_stats.to(device), ranks.get(name))
        try:
            result = compressor.compress_layer(job)
        except ValueError as err:  # name the layer when the method's message does not
            if repr(name) in str(err):
                raise
            raise ValueError(f"layer {name!r}: {err}") from err
        if result.weight is not None:
            set_dense_weight(module, result.weight)
            new = module
        else:
            new = result.module
            replace_module(work, name, new)
        if result.quantized is not None:
            quantized[name] = result.quantized
        W_hat = dense_weight(new)
        layers.append(LayerReport(
            name=name, kind=layer_kind(module), shape=tuple(W.shape), method=config.method,
            params_before=W.numel(), params_after=compressor.parameters(new, config), ranks=result.description,
            rel_weight_error=lr.relative_weight_error(W, W_hat.to(W.device)),
            rel_output_error=None if layer_stats is None else lr.relative_output_error(W, W_hat.to(W.device), layer_stats),
        ))
    _warn_grown(layers, config)
    return CompressionReport(work, layers, config, quantized)


def _warn_grown(layers: list[LayerReport], config: CompressionConfig) -> None:
    """Warn about layers that came out larger than dense (``rank=`` / ``energy=`` past the break-even rank): a
    factorization that costs more than the weight it replaces is almost never what was meant."""
    grown = [r for r in layers if r.params_after > r.params_before]
    if not grown:
        return
    size = ", ".join(f"{k}={getattr(config, k)}" for k in ("rank", "energy", "keep") if getattr(config, k) is not None)
    named = ", ".join(f"{r.name!r} keeps {r.keep:.2f}" for r in grown[:3]) + (", ..." if len(grown) > 3 else "")
    warnings.warn(f"{len(grown)} layer(s) hold more parameters factorized than dense ({named}): {size} asks for ranks "
                  "past the break-even rank (r (m + n) = m n for low rank); pass keep= (the fraction of parameters "
                  "kept, at most 1), a lower rank / energy, or exclude those layers", stacklevel=3)
