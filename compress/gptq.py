"""GPTQ (Frantar et al. 2022): group-wise quantization with second-order error feedback.

Columns of ``W: (out, in)`` are rounded one at a time to the grid of :func:`compress.sources.quantization_grid`;
each rounding error is spread over the columns not yet rounded by the OBS update of :mod:`compress.obs`, which
minimises the output error ``‖(W − Ŵ) X‖_F`` on the calibration inputs (``H = 2 Σ x xᵀ``, damped by
``percdamp · mean(diag H)``, lazy updates in blocks of ``block_size`` columns).

Group grids, the two conventions of the reference implementation:

- ``act_order=False``: groups of ``group_size`` consecutive columns; a group's grid is computed when the sweep
  reaches its first column, from the group's columns as updated by every column before it: exact column-by-column
  GPTQ, independent of ``block_size``. The reference (IST-DASLab ``fasterquant``, and AutoGPTQ after it) reads the
  group's columns before the updates of the current lazy block reach them, so where ``group_size < block_size``
  its grids and codes differ from these (neither objective is consistently lower).
- ``act_order=True`` (``desc_act``): columns are swept in order of decreasing ``H_ii`` (the most active inputs
  first), with **static groups**: every group's grid is computed up front from the original weights, groups being
  consecutive *original* columns. The result is an ordinary group-wise :class:`~compress.quantized.QuantizedWeight`
  with no ``g_idx``: what compressed-tensors stores as ``actorder="weight"`` (alias ``"static"``, llm-compressor's
  default), readable by every kernel. The other convention (``actorder="group"``: groups of consecutive *swept*
  columns, needing a ``g_idx`` permutation at inference) is not offered.
"""

from __future__ import annotations

import torch

from compress.compressors import Compressor, LayerJob, LayerResult, register
from compress.obs import QuantGrid, check_sweep_options, inverse_hessian_factor, obs_sweep, prepare_hessian
from compress.quantized import QuantizedWeight
from compress.sources import (
    check_bits,
    check_group_fits,
    check_observer,
    check_quantizer_options,
    dense_parameters,
    quantization_grid,
    quantized_storage_bits,
    quantizer_label,
    resolve_group_size,
)


def gptq_quantize(
    W: torch.Tensor,
    gram: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    symmetric: bool = False,
    act_order: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
) -> QuantizedWeight:
    """Quantize one layer with GPTQ.

    Minimises, column by column, ``‖(W − Ŵ) X‖_F² = ½ tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = 2 C``: after
    rounding column ``j`` to ``ŵ_j = s (q_j − z)``, ``q_j = clamp(round(w_j / s) + z)``, the later columns absorb the
    error, ``W[:, j:] −= (w_j − ŵ_j) / U_jj · U_{j, j:}`` (``U``: upper Cholesky factor of the damped ``H^{-1}``).
    Computed in float64 on ``W``'s device.

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` weight.
    gram : torch.Tensor
        ``(in, in)`` calibration second moment ``C = Σ_t x_t x_tᵀ`` of the layer's inputs (``LayerStats.gram``).
        Inputs that were always zero (``C_ii = 0``) get a zero weight column.
    bits : int
        Bits per weight, 2..8.
    group_size : int or None
        Columns per group; must divide ``in``. ``None`` or ``>= in``: one group per row.
    symmetric : bool
        Symmetric grid (zero point 0).
    act_order : bool
        Sweep columns by decreasing ``H_ii`` with static groups (see the module docstring), as
        ``CompressionConfig(act_order=True)`` and llm-compressor do by default. ``False``: the original column order.
    percdamp : float
        Damping ``λ = percdamp · mean(diag H)`` added to the diagonal (reference: 0.01).
    block_size : int
        Columns per lazy-update block (reference: 128); does not change the result beyond rounding.
    scale_dtype : torch.dtype
        Dtype the scales are stored in (rounded to it before any code is chosen).
    observer : {"minmax", "mse"}
        How each group's range is chosen (:func:`compress.sources.quantization_grid`): its extremes, or the clipped
        range with the least rounding error (GPTQ's reference ``Quantizer(mse=True)``), here weighted by ``H_jj``
        (with act-order; without it each group's grid is found on the updated columns, unweighted).

    Returns
    -------
    QuantizedWeight
        Codes ``(out, in)`` int8 in the original column order, scales and zero points ``(out, in // group_size)``.

    Examples
    --------
    >>> qw = gptq_quantize(layer.weight, stats["model.layers.0.mlp.up_proj"].gram, bits=3, group_size=64)
    >>> layer.weight.data = qw.dequantize(layer.weight.dtype)
    """
    check_bits(bits)
    check_observer(observer)
    Wd, H = prepare_hessian(W, gram)
    out_f, in_f = Wd.shape
    g = resolve_group_size(group_size, in_f)
    grid = QuantGrid(bits, g, symmetric, scale_dtype, observer)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        energy = torch.diagonal(H).reshape(1, -1, g).expand(out_f, -1, -1).reshape(-1, g)
        scale, zero = quantization_grid(Wd.reshape(-1, g), bits, symmetric, scale_dtype, observer, energy)
        grid.scale, grid.zero = scale.reshape(out_f, -1), zero.reshape(out_f, -1)
        grid.group_of = perm // g
        Wd, H = Wd[:, perm], H[perm][:, perm]
    result = obs_sweep(Wd, inverse_hessian_factor(H, percdamp), grid=grid, block_size=block_size)
    codes = result.codes
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(
        codes=codes.to(torch.int8), scale=result.scale.to(scale_dtype), zero_point=result.zero.to(torch.int8),
        bits=bits, group_size=g, symmetric=symmetric,
    )


def _gptq_layer(job: LayerJob) -> LayerResult:
    c = job.config
    resolve_group_size(c.group_size, job.weight.shape[1], job.name)
    qw = gptq_quantize(job.weight, job.stats.gram, c.bits, c.group_size, symmetric=c.symmetric, act_order=c.act_order,
                       percdamp=c.percdamp, block_size=c.block_size, observer=c.observer, scale_dtype=c.scale_dtype)
    return LayerResult(description=f"{c.bits}-bit g{qw.group_size}{' act-order' if c.act_order else ''}"
                                   f"{' mse grid' if c.observer == 'mse' else ''}",
                       weight=qw.dequantize(job.weight.dtype), quantized=qw)


def _check_options(config) -> None:
    check_quantizer_options(config)
    check_sweep_options(config.percdamp, config.block_size)


register(Compressor(
    name="gptq", kind="dense", compress_layer=_gptq_layer, needs_stats=True, parameters=dense_parameters,
    storage_bits=lambda shape, n, c: quantized_storage_bits(shape, c.bits, c.group_size, c.symmetric),
    label=lambda c: quantizer_label(c, act_order=c.act_order), validate=_check_options,
    check_layer=check_group_fits,
    help="GPTQ: group-wise quantization with second-order error feedback",
    reads=frozenset({"bits", "group_size", "symmetric", "observer", "scale_dtype", "act_order", "percdamp",
                     "block_size"}),
))
