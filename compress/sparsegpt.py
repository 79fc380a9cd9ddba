"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with second-order error feedback, optionally quantized.

The same OBS column sweep as GPTQ (:mod:`compress.obs`): columns of ``W: (out, in)`` are fixed left to right, and
the error of each (the pruned weights, and the rounding of the kept ones when quantizing) is spread over the
columns not yet fixed. Which weights to prune is decided on the fly, by the OBS saliency ``w² / [H^{-1}]_jj``
(``= w² / U_jj²``) of the weights *as updated so far*:

- unstructured (``pattern="unstructured"``): at the start of each block of ``block_size`` columns, the
  ``round(sparsity · out · block_size)`` entries of the block with the lowest saliency, over all rows of the block
  at once (the reference's "adaptive mask selection");
- ``N:M`` (``pattern="2:4"``): at every ``M``-th column, the ``M − N`` entries of each row with the lowest saliency
  among the next ``M`` columns, so every row keeps ``N`` of every ``M`` consecutive weights.

With ``bits`` set, kept weights are also rounded to the grid of :func:`compress.sources.quantization_grid` (grids
as GPTQ's without act-order: a group's grid is computed when the sweep reaches it); pruned weights are exact zeros
(0 is always on the grid).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch

from compress.compressors import Compressor, LayerJob, LayerResult, register
from compress.obs import QuantGrid, check_sweep_options, inverse_hessian_factor, obs_sweep, prepare_hessian
from compress.quantized import QuantizedWeight
from compress.sources import (
    check_bits,
    check_group_fits,
    check_group_size,
    check_observer,
    nonzero_parameters,
    quantized_storage_bits,
    resolve_group_size,
)


@dataclass(frozen=True)
class SparseWeight:
    """Result of :func:`sparsegpt_prune`.

    Attributes:
        weight: ``(out, in)`` dense weight in the input's dtype, exactly zero where pruned.
        mask: ``(out, in)`` bool, True where the weight is kept.
        quantized: the kept weights' codes when ``bits`` was given (pruned entries hold the zero point's code).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    quantized: QuantizedWeight | None


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"N:M"`` (keep ``N`` of every ``M``, ``0 < N < M``) -> ``(N, M)``."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except (AttributeError, ValueError):
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r} must be 'unstructured' or 'N:M' with 0 < N < M (keep N of every M), "
                         "e.g. '2:4'")
    return n, m


def sparsegpt_prune(
    W: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    bits: int | None = None,
    group_size: int | None = 128,
    symmetric: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
) -> SparseWeight:
    """Prune (and optionally quantize) one layer with SparseGPT.

    Minimises ``‖(W − Ŵ) X‖_F² = ½ tr((W − Ŵ) H (W − Ŵ)ᵀ)``, ``H = 2 C``, under the sparsity pattern: column
    ``j``'s pruned (and rounded) entries give the error ``e = w_j − ŵ_j``, and ``W[:, j:] −= e / U_jj · U_{j, j:}``
    (``U``: upper Cholesky factor of the damped ``H^{-1}``). Masks are chosen as in the module docstring. Float64.

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` weight.
    gram : torch.Tensor
        ``(in, in)`` calibration second moment ``C = Σ_t x_t x_tᵀ`` (``LayerStats.gram``).
    sparsity : float, optional
        Unstructured: fraction of weights pruned, in ``[0, 1)`` (default 0.5). An ``N:M`` pattern fixes it to
        ``1 − N/M``; passing another value raises.
    pattern : str
        ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``; ``in`` and ``block_size`` must be multiples of ``M``).
    bits : int, optional
        Also quantize the kept weights to ``bits`` (2..8); ``None`` keeps them in full precision.
    group_size, symmetric, scale_dtype, observer
        Quantization grid, as :func:`compress.gptq.gptq_quantize` (``group_size`` must divide ``in``).
    percdamp : float
        Damping ``λ = percdamp · mean(diag H)`` (reference: 0.01).
    block_size : int
        Columns per block: the unit of unstructured mask selection and of lazy updates (reference: 128).

    Returns
    -------
    SparseWeight
        Dense pruned weight, keep-mask and (with ``bits``) the :class:`~compress.quantized.QuantizedWeight`.
    """
    n_of_m = parse_pattern(pattern)
    if n_of_m is None:
        sparsity = 0.5 if sparsity is None else sparsity
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of weights set to zero")
    else:
        n, m = n_of_m
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-12:
            raise ValueError(f"sparsity={sparsity} contradicts pattern={pattern!r} (which prunes {1 - n / m:g}); "
                             "pass one of them")
        if W.shape[-1] % m or block_size % m:
            raise ValueError(f"pattern={pattern!r} needs in_features ({W.shape[-1]}) and block_size ({block_size}) "
                             f"to be multiples of {m}; exclude this layer or use pattern='unstructured'")
    grid = None
    if bits is not None:
        check_bits(bits)
        check_observer(observer)
        grid = QuantGrid(bits, resolve_group_size(group_size, W.shape[-1]), symmetric, scale_dtype, observer)
    Wd, H = prepare_hessian(W, gram)

    def block_mask(W1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        score = (W1.square() / d2).flatten()
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.argsort(score, stable=True)[:round(sparsity * score.numel())]] = True
        return mask.reshape(W1.shape)

    result = obs_sweep(
        Wd, inverse_hessian_factor(H, percdamp), grid=grid, block_size=block_size,
        block_mask=block_mask if n_of_m is None else None,
        n_of_m=None if n_of_m is None else (n_of_m[1] - n_of_m[0], n_of_m[1]),
    )
    quantized = None
    if grid is not None:
        quantized = QuantizedWeight(
            codes=result.codes.to(torch.int8), scale=result.scale.to(scale_dtype),
            zero_point=result.zero.to(torch.int8), bits=bits, group_size=grid.group_size, symmetric=symmetric,
        )
        weight = quantized.dequantize(W.dtype)
    else:
        weight = result.weight.to(W.dtype)
    return SparseWeight(weight=weight, mask=~result.pruned, quantized=quantized)


def _sparsegpt_layer(job: LayerJob) -> LayerResult:
    c = job.config
    if c.sparse_bits is not None:
        resolve_group_size(c.group_size, job.weight.shape[1], job.name)
    unstructured = c.pattern == "unstructured"
    res = sparsegpt_prune(job.weight, job.stats.gram, c.sparsity if unstructured else None, pattern=c.pattern,
                          bits=c.sparse_bits, group_size=c.group_size, symmetric=c.symmetric, percdamp=c.percdamp,
                          block_size=c.block_size, observer=c.observer, scale_dtype=c.scale_dtype)
    what = f"sparsity {c.sparsity}" if unstructured else c.pattern
    bits = "" if c.sparse_bits is None else f" + {c.sparse_bits}-bit g{res.quantized.group_size}"
    return LayerResult(description=what + bits, weight=res.weight, quantized=res.quantized)


def _sparsegpt_storage_bits(shape: tuple[int, int], kept: int, config) -> float:
    """Kept values (16-bit or quantized, with their group scales) plus the positions: an ``N:M`` index of
    ``ceil(log2 M)`` bits per kept weight, or a one-bit mask per weight when unstructured."""
    n_of_m = parse_pattern(config.pattern)
    where = kept * math.ceil(math.log2(n_of_m[1])) if n_of_m else shape[0] * shape[1]
    if config.sparse_bits is None:
        return kept * 16 + where
    dense = quantized_storage_bits(shape, config.sparse_bits, config.group_size, config.symmetric)
    return dense - shape[0] * shape[1] * config.sparse_bits + kept * config.sparse_bits + where


def _label(config) -> str:
    what = f"sparsity {config.sparsity}" if config.pattern == "unstructured" else config.pattern
    quant = "" if config.sparse_bits is None else (
        f" + {config.sparse_bits}-bit, group {config.group_size or 'per-row'}{', symmetric' if config.symmetric else ''}"
        f"{', mse grid' if config.observer == 'mse' else ''}")
    return f"sparsegpt {what}{quant}"


def _check_options(config) -> None:
    n_of_m = parse_pattern(config.pattern)
    if n_of_m is None and not 0.0 <= config.sparsity < 1.0:
        raise ValueError(f"sparsity={config.sparsity} must be in [0, 1): the fraction of weights set to zero")
    if n_of_m is not None:
        implied = 1 - n_of_m[0] / n_of_m[1]
        default = next(f.default for f in dataclasses.fields(config) if f.name == "sparsity")
        if config.sparsity not in (default, implied):
            raise ValueError(f"sparsity={config.sparsity} contradicts pattern={config.pattern!r} (which prunes "
                             f"{implied:g}); drop sparsity, or pass pattern='unstructured'")
        config.sparsity = implied  # what the report and the saved config then say was done
        if config.block_size % n_of_m[1]:
            # the lazy-update blocks must hold whole groups of m columns: checked here, not on the first layer
            fit = config.block_size - config.block_size % n_of_m[1]
            raise ValueError(f"pattern={config.pattern!r} needs block_size ({config.block_size}) to be a multiple of "
                             f"{n_of_m[1]}; pass block_size={fit}")
    if config.sparse_bits is not None:
        if (isinstance(config.sparse_bits, bool) or not isinstance(config.sparse_bits, int)
                or config.sparse_bits not in range(2, 9)):
            raise ValueError(f"sparse_bits={config.sparse_bits!r} must be an int in [2, 8], or None to keep the "
                             "kept weights in full precision")
        check_group_size(config.group_size)
        check_observer(config.observer)
    check_sweep_options(config.percdamp, config.block_size)


def _check_layer(name: str, module: torch.nn.Module, shape: tuple[int, int], config) -> None:
    n_of_m = parse_pattern(config.pattern)
    if n_of_m is not None and shape[1] % n_of_m[1]:
        raise ValueError(f"layer {name!r}: pattern={config.pattern!r} needs in_features ({shape[1]}) to be a multiple "
                         f"of {n_of_m[1]}; exclude this layer or use pattern='unstructured'")
    if config.sparse_bits is not None:
        check_group_fits(name, module, shape, config, bits=config.sparse_bits)


def _sparsegpt_parameters(module: torch.nn.Module, config) -> int:
    """Kept weights: the mask's count. With ``sparse_bits`` a kept weight may round to zero, so the nonzeros would
    under-count; the count then follows from the pattern (``N / M`` of every row) or, unstructured, from the
    ``round(sparsity · out · block)`` pruned per block of ``block_size`` columns."""
    if config.sparse_bits is None:
        return nonzero_parameters(module, config)
    out_f, in_f = module.weight.shape
    n_of_m = parse_pattern(config.pattern)
    if n_of_m is not None:
        return out_f * in_f // n_of_m[1] * n_of_m[0]
    blocks = [min(config.block_size, in_f - start) for start in range(0, in_f, config.block_size)]
    return sum(out_f * b - round(config.sparsity * out_f * b) for b in blocks)


register(Compressor(
    name="sparsegpt", kind="dense", compress_layer=_sparsegpt_layer, needs_stats=True, parameters=_sparsegpt_parameters,
    storage_bits=_sparsegpt_storage_bits, label=_label, validate=_check_options, check_layer=_check_layer,
    help="SparseGPT: pruning (unstructured or N:M) with second-order error feedback, optionally quantized",
    reads=frozenset({"sparsity", "pattern", "sparse_bits", "group_size", "symmetric", "observer", "scale_dtype",
                     "percdamp", "block_size"}),
    reads_only_with={"group_size": "sparse_bits", "symmetric": "sparse_bits", "observer": "sparse_bits"},
))
