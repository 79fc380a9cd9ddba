"""Compressors whose error EoRA compensates: round-to-nearest quantization and magnitude pruning.

All act on one weight matrix ``W: (out, in)`` (``in`` = the reduction axis: ``in_features``, or
``in_channels · kh · kw`` for a convolution) and return a dense matrix of the same shape and dtype: quantization is
*fake* (quantize then dequantize), pruning writes zeros. The compression error ``ΔW = W − W_c`` is what
:func:`compress.eora.eora_compensate` approximates with a low-rank residual.
"""

from __future__ import annotations

import torch


def _rtn_groups(W: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize each row of ``W: (rows, g)`` as one group (float32 math)."""
    levels = 2**bits - 1
    if symmetric:
        # levels 2^{b-1} - 1 on either side of 0, as GPTQ's symmetric quantizer (one code left unused)
        qmax = 2 ** (bits - 1) - 1
        scale = W.abs().amax(1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        deq = torch.clamp(torch.round(W / safe), -qmax - 1, qmax) * safe
    else:
        lo = W.amin(1, keepdim=True)
        hi = W.amax(1, keepdim=True)
        scale = (hi - lo) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe)
        deq = (torch.clamp(torch.round(W / safe) + zero, 0, levels) - zero) * safe
    # a constant group is represented exactly (zero range): keep it
    return torch.where(scale > 0, deq, W)


def rtn_quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = 128, *, symmetric: bool = False) -> torch.Tensor:
    """Group-wise round-to-nearest fake quantization.

    Each row of ``W`` is cut along ``in`` into groups of ``group_size`` consecutive weights; each group gets its
    own scale ``s`` (and zero point ``z`` when asymmetric):

    .. math::

        s = \\frac{\\max w - \\min w}{2^b - 1}, \\quad z = \\operatorname{round}(-\\min w / s), \\quad
        \\hat w = s \\, (\\operatorname{clamp}(\\operatorname{round}(w / s) + z, 0, 2^b - 1) - z).

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` weight.
    bits : int
        Bits per weight, 1..16.
    group_size : int or None
        Weights per group along ``in``; ``None`` = one group per row (per-channel). When ``in`` is not a multiple
        of ``group_size`` the **last group of each row is shorter** (``in mod group_size`` weights) and gets its
        own scale, as if stored with a ragged tail (e.g. SmolLM2's 576 with groups of 128: four groups of 128 and
        one of 64). Packed kernels that need whole groups should use a divisor (64 for 576).
    symmetric : bool
        Symmetric grid ``s = max|w| / (2^{b-1} − 1)`` without zero point.

    Returns
    -------
    torch.Tensor
        The dequantized ``(out, in)`` weight, same dtype and device as ``W``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} must be an int in [1, 16]")
    if symmetric and bits < 2:
        raise ValueError("symmetric RTN needs bits >= 2 (one bit is the sign); pass symmetric=False")
    if W.dim() != 2:
        raise ValueError(f"W must be a (out, in) matrix, got shape {tuple(W.shape)}")
    out_f, in_f = W.shape
    g = in_f if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int or None (per-channel)")
    g = min(g, in_f)
    Wf = W.float()
    full = (in_f // g) * g
    parts = []
    if full:
        parts.append(_rtn_groups(Wf[:, :full].reshape(-1, g), bits, symmetric).reshape(out_f, full))
    if full < in_f:
        parts.append(_rtn_groups(Wf[:, full:], bits, symmetric))
    return torch.cat(parts, 1).to(W.dtype)


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
    k = round(sparsity * W.numel())
    if k == 0:
        return W.clone()
    flat = W.abs().flatten()
    # ties at the threshold: prune exactly k weights by index, not by value
    drop = flat.topk(k, largest=False).indices
    out = W.clone().flatten()
    out[drop] = 0
    return out.reshape(W.shape)
