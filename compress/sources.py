"""Compressors whose error EoRA compensates: round-to-nearest quantization and magnitude pruning.

All act on one weight matrix ``W: (out, in)`` (``in`` = the reduction axis: ``in_features``, or
``in_channels · kh · kw`` for a convolution). Quantizers return a :class:`~compress.quantized.QuantizedWeight`
(integer codes, per-group scales and zero points, what exporters pack) and a dense form of it (fake quantization);
pruning writes zeros. The compression error ``ΔW = W − W_c`` is what :func:`compress.eora.eora_compensate`
approximates with a low-rank residual.

The quantization grid is the one of compressed-tensors (llm-compressor's writer) and of GPTQ's reference
quantizer, shared by RTN, GPTQ and SparseGPT (:func:`quantization_grid`): per group, with ``[lo, hi]`` the range of
its weights **widened to contain 0** (so 0 is exactly representable and the zero point fits the code range),

- asymmetric: ``s = (hi − lo) / (2^b − 1)``, ``z = round(−2^{b−1} − lo / s)``;
- symmetric: ``s = max(|lo|, |hi|) / ((2^b − 1) / 2)``, ``z = 0`` (all ``2^b`` codes used; the largest positive
  weight clips to ``(2^{b−1} − 1) s``);

codes ``q = clamp(round(w / s) + z, −2^{b−1}, 2^{b−1} − 1)`` and ``ŵ = s (q − z)``.

That range comes from the group's extremes (``observer="minmax"``, compressed-tensors' default) or, with
``observer="mse"``, from a search over shrunk ranges ``[p lo, p hi]``, ``p = 1, 0.99, ..., 0.81``, keeping per group
the one with the least ``Σ |ŵ − w|^2.4``: the clipping search of GPTQ's reference quantizer (``Quantizer(mse=True)``,
norm 2.4, grid 100) with llm-compressor's ``memoryless_mse`` observer's range (``maxshrink=0.2``), searched
exhaustively (no early stop). Clipping the few extreme weights of a group buys a finer step for all the others.
GPTQ weights that search by its Hessian, ``Σ_j H_jj (ŵ_j − w_j)²`` (the diagonal part of the output error
``½ tr(ΔW H ΔWᵀ)``), so the inputs that carry the most energy decide the clip.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.compressors import Compressor, LayerJob, LayerResult, register
from compress.quantized import QuantizedWeight

if TYPE_CHECKING:  # config imports the registry, which the compressors fill
    from compress.config import CompressionConfig


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in ``[2, 8]`` (the codes are int8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in [2, 8] (codes are stored as int8); pass e.g. bits=4")


def check_finite_weight(W: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``W`` holds NaN or inf: a quantizer would give its whole group a NaN range and zero
    it, or (GPTQ, SparseGPT) spread it through the error feedback, without a word."""
    if not W.is_meta and not torch.isfinite(W).all():
        raise ValueError(f"W of shape {tuple(W.shape)} contains NaN or inf; fix the weights (or leave the layer out) "
                         "before quantizing or pruning it")


def check_group_size(group_size: int | None) -> None:
    """Raise ``ValueError`` unless ``group_size`` is a positive int or ``None`` (one group per row)."""
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a positive int or None (one group per row)")


def resolve_group_size(group_size: int | None, in_features: int, name: str = "") -> int:
    """Columns per group for a weight with ``in_features`` columns.

    ``None`` (or any ``group_size >= in_features``) is one group per row (per-channel); otherwise ``group_size``
    must divide ``in_features``, since packed formats (compressed-tensors) store whole groups only.
    """
    check_group_size(group_size)
    if group_size is None or group_size >= in_features:
        return in_features
    if in_features % group_size:
        divisors = [d for d in range(min(group_size, in_features), 0, -1) if in_features % d == 0][:3]
        layer = f" of layer {name!r}" if name else ""
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}{layer}: packed formats store whole "
            f"groups only; pass a divisor (e.g. {divisors}) or group_size=None (one group per row)"
        )
    return group_size


#: grid observers: how a group's range ``[lo, hi]`` is chosen (see the module docstring)
OBSERVERS = ("minmax", "mse")
#: the ``"mse"`` search: shrink factors ``1 − i / MSE_GRID`` for ``i < MSE_MAXSHRINK · MSE_GRID``, error norm
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.2, 2.4


def check_observer(observer: str) -> None:
    """Raise ``ValueError`` unless ``observer`` is one of :data:`OBSERVERS`."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer={observer!r} must be one of {OBSERVERS} ('minmax': the group's extremes, "
                         "'mse': the clipped range with the least rounding error)")


def quantization_grid(
    W: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``W: (rows, g)``, the row being one group (see the module docstring).

    Parameters
    ----------
    W : torch.Tensor
        ``(rows, g)`` floating point; the grid is computed in its dtype.
    bits : int
        Bits per code, 2..8.
    symmetric : bool
        Symmetric grid (``z = 0``).
    scale_dtype : torch.dtype
        The scale is rounded to this dtype (the one it is stored in) before the zero point and the codes are
        derived from it, so that storing it re-rounds nothing.
    observer : {"minmax", "mse"}
        ``"minmax"``: the range ``[min(w, 0), max(w, 0)]`` of the group; ``"mse"``: that range shrunk by the factor
        ``p ∈ {1, 0.99, ..., 0.81}`` whose grid rounds the group with the least ``Σ_j |ŵ_j − w_j|^{2.4}`` (ties: the
        widest range), so its error never exceeds ``"minmax"``'s in that norm.
    weights : torch.Tensor, optional
        ``(rows, g)`` (or broadcastable) nonnegative weights ``c_j`` of the ``"mse"`` search, which then minimises
        ``Σ_j c_j (ŵ_j − w_j)²`` (GPTQ passes its Hessian diagonal ``H_jj``). Ignored by ``"minmax"``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``scale (rows,)`` ``> 0`` and ``zero (rows,)`` integer-valued, both in ``W``'s dtype. An all-zero row gets
        scale 1 (any positive scale represents it exactly).
    """
    check_observer(observer)
    if weights is not None and weights.dim() != 2:
        raise ValueError(f"weights of shape {tuple(weights.shape)} must be 2-D, broadcastable to W's {tuple(W.shape)}")
    lo = W.amin(1).clamp(max=0)
    hi = W.amax(1).clamp(min=0)
    scale, zero = _range_grid(lo, hi, bits, symmetric, scale_dtype)
    if observer == "minmax":
        return scale, zero
    # one (rows, g) buffer for every candidate: fresh temporaries of W's size per candidate cost more in page faults
    # than in arithmetic where large allocations are mmapped (under the CLI's 128 KiB threshold a whole GPTQ mse run
    # spent 181 s in the kernel instead of 80: benchmarks/results/pipeline_memory.md)
    buffer = torch.empty_like(W)
    best = _rounding_error(W, scale, zero, bits, weights, buffer)
    for i in range(1, int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s, z = _range_grid(lo * p, hi * p, bits, symmetric, scale_dtype)
        err = _rounding_error(W, s, z, bits, weights, buffer)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _check_representable(scale: torch.Tensor, stored: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """Refuse scales that ``scale_dtype`` turns into inf (overflow) or 0 (underflow): the groups would quantize to NaN
    or to all zeros, silently."""
    lost = ~torch.isfinite(stored) | ((stored == 0) & (scale > 0))
    if bool(lost.any()):
        bad = scale[lost]
        raise ValueError(
            f"{int(lost.sum())} quantization scale(s) (from {float(bad.min()):.3g} to {float(bad.max()):.3g}) do not "
            f"fit scale_dtype={scale_dtype} (finite, nonzero range {torch.finfo(scale_dtype).smallest_normal:.3g} to "
            f"{torch.finfo(scale_dtype).max:.3g}, subnormals below): the weights are too large or too small for it; "
            "pass scale_dtype=torch.bfloat16 or torch.float32"
        )
    subnormal = (stored > 0) & (stored < torch.finfo(scale_dtype).smallest_normal)
    if bool(subnormal.any()):  # kept, but with fewer significant bits (e.g. float16 at 5e-7 weights): more error
        warnings.warn(
            f"{int(subnormal.sum())} quantization scale(s) (from {float(scale[subnormal].min()):.3g}) are subnormal in "
            f"scale_dtype={scale_dtype} (below {torch.finfo(scale_dtype).smallest_normal:.3g}) and keep fewer "
            "significant bits, so those groups quantize less precisely; pass scale_dtype=torch.bfloat16 or "
            "torch.float32", UserWarning, stacklevel=2)


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(rows,)`` of the grids spanning ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2) if symmetric else (hi - lo) / (qmax - qmin)
    stored = scale.to(scale_dtype).to(lo.dtype)
    if scale_dtype != lo.dtype:
        _check_representable(scale, stored, scale_dtype)
    scale = torch.where(stored > 0, stored, torch.ones_like(stored))
    if symmetric:
        return scale, torch.zeros_like(scale)
    return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)


def _rounding_error(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    weights: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """Per row of ``W: (rows, g)`` on the given grids: ``Σ_j |ŵ_j − w_j|^{MSE_NORM}``, or ``Σ_j c_j (ŵ_j − w_j)²``
    with ``weights`` ``c``; computed in ``buffer`` (``W``'s shape), by the operations of :func:`quantize_to_grid`
    in its order."""
    s, z = scale[:, None], zero[:, None]
    delta = torch.div(W, s, out=buffer).round_().add_(z).clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    delta.sub_(z).mul_(s).sub_(W)
    if weights is None:
        return delta.abs_().pow_(MSE_NORM).sum(1)
    return delta.square_().mul_(weights).sum(1)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued codes ``clamp(round(w / s) + z, −2^{b−1}, 2^{b−1} − 1)`` (broadcasting, ``w``'s dtype)."""
    return torch.clamp(torch.round(w / scale) + zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def rtn_quantize_weight(
    W: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
) -> QuantizedWeight:
    """Group-wise round-to-nearest quantization to integer codes.

    Each row of ``W`` is cut along ``in`` into groups of ``group_size`` consecutive weights; each group gets its
    own scale ``s`` and zero point ``z`` (:func:`quantization_grid`) and every weight its nearest code
    ``q = clamp(round(w / s) + z)``, so ``Ŵ = s (q − z)``. Computed in float32.

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` weight.
    bits : int
        Bits per weight, 2..8.
    group_size : int or None
        Weights per group along ``in``; must divide ``in``. ``None`` or ``>= in``: one group per row
        (per-channel).
    symmetric : bool
        Symmetric grid without zero point.
    scale_dtype : torch.dtype
        Dtype the scales are stored in (they are rounded to it before the codes are chosen).
    observer : {"minmax", "mse"}
        How each group's range is chosen (:func:`quantization_grid`).

    Returns
    -------
    QuantizedWeight
        Codes ``(out, in)`` int8, scales and zero points ``(out, in // group_size)``.
    """
    check_bits(bits)
    if W.dim() != 2:
        raise ValueError(f"W must be a (out, in) matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point() or W.numel() == 0:  # complex parts were dropped with only torch's warning
        raise TypeError(f"W must be a non-empty real floating matrix, got {W.dtype} of shape {tuple(W.shape)}")
    check_finite_weight(W)
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise TypeError(f"scale_dtype={scale_dtype!r} must be a floating torch dtype (torch.bfloat16, torch.float16 or "
                        "torch.float32)")
    out_f, in_f = W.shape
    g = resolve_group_size(group_size, in_f)
    groups = W.float().reshape(-1, g)
    scale, zero = quantization_grid(groups, bits, symmetric, scale_dtype, observer)
    codes = quantize_to_grid(groups, scale[:, None], zero[:, None], bits)
    return QuantizedWeight(
        codes=codes.reshape(out_f, in_f).to(torch.int8), scale=scale.reshape(out_f, -1).to(scale_dtype),
        zero_point=zero.reshape(out_f, -1).to(torch.int8), bits=bits, group_size=g, symmetric=symmetric,
    )


def rtn_quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, symmetric: bool = False) -> torch.Tensor:
    """Group-wise round-to-nearest fake quantization: :func:`rtn_quantize_weight` dequantized.

    .. math::

        \\hat W[o, j] = s\\,(\\operatorname{clamp}(\\operatorname{round}(W[o, j] / s) + z) - z)

    per group (grid: :func:`quantization_grid`). Arguments as :func:`rtn_quantize_weight`.

    Returns
    -------
    torch.Tensor
        The dequantized ``(out, in)`` weight, same dtype and device as ``W``.
    """
    return rtn_quantize_weight(W, bits, group_size, symmetric=symmetric).dequantize(W.dtype)


def prune_2_4(W: torch.Tensor) -> torch.Tensor:
    """2:4 semi-structured magnitude pruning: in every 4 consecutive weights of a row keep the 2 largest ``|w|``.

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` with ``in`` a multiple of 4.

    Returns
    -------
    torch.Tensor
        ``(out, in)`` with exactly half of each group of four set to zero.
    """
    if W.dim() != 2 or W.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning needs a (out, in) weight with in divisible by 4, got shape {tuple(W.shape)}; "
            "exclude this layer or use method='magnitude'"
        )
    check_finite_weight(W)  # a NaN sorts anywhere: it would be kept or dropped at random
    groups = W.reshape(W.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(W.shape)


def prune_magnitude(W: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Unstructured magnitude pruning of one layer: zero the ``round(sparsity · numel)`` smallest ``|w|``.

    Parameters
    ----------
    W : torch.Tensor
        Any shape.
    sparsity : float
        Fraction of weights set to zero, in ``[0, 1)``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): the fraction of weights set to zero")
    check_finite_weight(W)
    k = round(sparsity * W.numel())
    if k == 0:
        return W.clone()
    flat = W.abs().flatten()
    # ties at the threshold: prune exactly k weights by index, not by value
    drop = flat.topk(k, largest=False).indices
    out = W.clone().flatten()
    out[drop] = 0
    return out.reshape(W.shape)


# ---------------------------------------------------------------------------------------------- registry entries
def quantized_storage_bits(shape: tuple[int, int], bits: int, group_size: int | None, symmetric: bool) -> float:
    """Bits of a packed group-quantized ``(out, in)`` weight as :func:`compress.export.save_hf_directory` writes it
    in a 16-bit dtype (compressed-tensors' ``pack-quantized`` layout): each row's ``bits``-bit codes in whole int32
    words, a 16-bit scale per group and, when asymmetric, the zero points packed at ``bits`` bits along ``out``,
    in whole words per group column."""
    out_f, in_f = shape
    groups = math.ceil(in_f / min(group_size or in_f, in_f))
    codes = out_f * 32 * math.ceil(in_f * bits / 32)
    zero_points = 0 if symmetric else groups * 32 * math.ceil(out_f * bits / 32)
    return codes + out_f * groups * 16 + zero_points


def check_quantizer_options(config: CompressionConfig) -> None:
    """``bits`` in 2..8, ``group_size`` a positive int or ``None`` and ``observer`` known (named in the error)."""
    check_bits(config.bits)
    check_group_size(config.group_size)
    check_observer(config.observer)


def quantizer_label(config: CompressionConfig, act_order: bool = False) -> str:
    """``"rtn 3-bit, group 64"`` (``, symmetric`` / ``, act-order`` (GPTQ's, passed by it) / ``, mse grid`` when
    set)."""
    extra = ((", symmetric" if config.symmetric else "")
             + (", act-order" if act_order else "")
             + (", mse grid" if config.observer == "mse" else ""))
    return f"{config.method} {config.bits}-bit, group {config.group_size or 'per-row'}{extra}"


def dense_parameters(module: nn.Module, config: CompressionConfig) -> int:
    """Weights a quantized layer stores: all of them."""
    return module.weight.numel()


def nonzero_parameters(module: nn.Module, config: CompressionConfig) -> int:
    """Weights a pruned layer stores: the nonzero ones."""
    return int(torch.count_nonzero(module.weight))


def _rtn_layer(job: LayerJob) -> LayerResult:
    c = job.config  # the group size was checked against every target first (check_group_fits)
    qw = rtn_quantize_weight(job.weight, c.bits, c.group_size, symmetric=c.symmetric, observer=c.observer,
                             scale_dtype=c.scale_dtype)
    return LayerResult(description=f"{c.bits}-bit g{qw.group_size}", weight=qw.dequantize(job.weight.dtype),
                       quantized=qw)


def check_group_fits(name: str, module: nn.Module, shape: tuple[int, int], config: CompressionConfig,
                     bits: int | None = None) -> None:
    """``Compressor.check_layer`` of the group-wise quantizers: the group size divides the layer's width, and a
    float16 ``scale_dtype`` holds the layer's min-max scales at ``bits`` (default ``config.bits``; GPTQ's updated
    weights are checked again as it goes)."""
    from compress.targets import dense_weight

    g = resolve_group_size(config.group_size, shape[1], name)
    # float16 only: bfloat16 has float32's exponent range, so its scales cannot overflow, and checking every layer of
    # the CLI's default (bfloat16 scales) would cost a float32 pass over the whole model for nothing; an underflow
    # below 1e-38 is still caught when the layer is quantized
    W = dense_weight(module) if config.scale_dtype == torch.float16 else None
    if W is not None and not W.is_meta:
        try:
            quantization_grid(W.reshape(-1, g).float(), config.bits if bits is None else bits, config.symmetric,
                              config.scale_dtype)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None


def _check_2_4_fits(name: str, module: nn.Module, shape: tuple[int, int], config: CompressionConfig) -> None:
    if shape[1] % 4:
        raise ValueError(f"layer {name!r}: 2:4 pruning needs in_features divisible by 4, got {shape[1]}; exclude "
                         "this layer or use method='magnitude'")


def _check_sparsity(config: CompressionConfig) -> None:
    if not 0.0 <= config.sparsity < 1.0:
        raise ValueError(f"sparsity={config.sparsity} must be in [0, 1): the fraction of weights set to zero")


register(Compressor(
    name="rtn", kind="dense", compress_layer=_rtn_layer, needs_stats=False, parameters=dense_parameters,
    storage_bits=lambda shape, n, c: quantized_storage_bits(shape, c.bits, c.group_size, c.symmetric),
    label=quantizer_label, validate=check_quantizer_options, check_layer=check_group_fits,
    help="round-to-nearest group-wise quantization",
    reads=frozenset({"bits", "group_size", "symmetric", "observer", "scale_dtype"}),
))
register(Compressor(
    name="2:4", kind="dense", compress_layer=lambda job: LayerResult("2:4", weight=prune_2_4(job.weight)),
    needs_stats=False, parameters=nonzero_parameters,
    storage_bits=lambda shape, n, c: n * (16 + 2),  # 16-bit values + the 2-bit position of each kept weight in its 4
    label=lambda c: "2:4 pruning", aliases=("prune24",), help="2:4 semi-structured magnitude pruning", reads=frozenset(),
    check_layer=_check_2_4_fits,
))
register(Compressor(
    name="magnitude", kind="dense",
    compress_layer=lambda job: LayerResult(f"sparsity {job.config.sparsity}",
                                           weight=prune_magnitude(job.weight, job.config.sparsity)),
    needs_stats=False, parameters=nonzero_parameters,
    storage_bits=lambda shape, n, c: n * 16 + shape[0] * shape[1],  # 16-bit values + a one-bit mask
    label=lambda c: f"magnitude pruning, sparsity {c.sparsity}", validate=_check_sparsity,
    help="unstructured magnitude pruning", reads=frozenset({"sparsity"}),
))
