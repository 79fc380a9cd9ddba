"""Slow, plain references for GPTQ and SparseGPT: the OBS sweep written from the papers' formulas.

One column at a time, float64, no blocking and no Cholesky factor: the inverse Hessian ``H^{-1}`` of the
columns not yet fixed is kept explicitly and column ``j`` is eliminated from it after it is fixed,

    W[:, j:] -= (w_j - ŵ_j) / Hinv[j, j] * Hinv[j, j:]
    Hinv     -= Hinv[:, j] Hinv[j, :] / Hinv[j, j]

which is what the optimized code computes through the rows of a Cholesky factor. The quantization grid is also
written out here, independently of ``compress.sources``.
"""

from __future__ import annotations

import torch


def grid(cols: torch.Tensor, bits: int, symmetric: bool, observer: str = "minmax",
         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``cols`` (compressed-tensors' convention: 0 inside the range).

    ``observer="mse"``: row by row, the range ``[p lo, p hi]``, ``p = 1, 0.99, ..., 0.81``, whose rounding error
    ``Σ |ŵ − w|^2.4`` (``Σ c (ŵ − w)²`` with ``weights`` ``c`` of the row's columns) is least, the first on ties.
    """
    lo = torch.minimum(cols.min(1).values, torch.zeros(cols.shape[0], dtype=cols.dtype))
    hi = torch.maximum(cols.max(1).values, torch.zeros(cols.shape[0], dtype=cols.dtype))
    if observer == "mse":
        scale, zero = grid(cols, bits, symmetric)
        for r in range(cols.shape[0]):
            best = None
            for i in range(20):
                p = 1 - i / 100
                row = torch.stack([torch.tensor(0.0, dtype=cols.dtype), lo[r] * p, hi[r] * p])[None]
                s, z = grid(row, bits, symmetric)
                c = torch.clamp(torch.round(cols[r] / s) + z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                d = s * (c - z) - cols[r]
                err = (d.abs() ** 2.4).sum() if weights is None else (weights[r] * d * d).sum()
                if best is None or err < best:
                    best, scale[r], zero[r] = err, s[0], z[0]
        return scale, zero
    levels = 2**bits - 1
    if symmetric:
        scale = torch.maximum(-lo, hi) / (levels / 2)
    else:
        scale = (hi - lo) / levels
    scale = scale.float().double()  # scales are stored in float32
    scale[scale == 0] = 1.0
    zero = torch.zeros_like(scale) if symmetric else torch.round(-(2 ** (bits - 1)) - lo / scale)
    return scale, zero


def _column_d2(Hinv: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``Hinv[k, k]`` at the moment column ``k`` (``start <= k < stop``) is reached, by eliminating ahead on a copy."""
    T = Hinv.clone()
    out = []
    for k in range(start, stop):
        out.append(T[k, k].clone())
        T -= torch.outer(T[:, k], T[k, :]) / T[k, k]
    return torch.stack(out)


def reference_sweep(
    W: torch.Tensor,
    C: torch.Tensor,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    sparsity: float = 0.0,
    n_of_m: tuple[int, int] | None = None,
    mask_block: int = 128,
    percdamp: float = 0.01,
    observer: str = "minmax",
) -> dict[str, torch.Tensor]:
    """GPTQ (``bits``, no pruning) or SparseGPT (``sparsity`` or ``n_of_m`` = (kept, of)) the slow way.

    ``observer="mse"``: clipped grids (:func:`grid`), weighted by ``H_ii`` for act-order's static groups.

    Returns ``weight`` (float64, original column order), ``codes``, ``scale``, ``zero`` (when quantizing) and
    ``kept`` (bool mask).
    """
    W = W.double().clone()
    H = 2 * C.double()
    n = W.shape[1]
    for i in range(n):
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    g = n if group_size is None or group_size >= n else group_size
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    static = None
    if act_order:  # groups of original columns, grids from the original weights
        energy = torch.diagonal(H)
        static = [grid(W[:, s:s + g], bits, symmetric, observer, energy[s:s + g].expand(W.shape[0], -1))
                  for s in range(0, n, g)]
    Hd = H + percdamp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd[order][:, order])
    Wp = W[:, order].clone()
    codes = torch.zeros_like(Wp)
    scales = torch.ones(W.shape[0], n // g, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    pruned = torch.zeros_like(Wp, dtype=torch.bool)
    for j in range(n):
        if sparsity > 0 and j % mask_block == 0:
            stop = min(j + mask_block, n)
            score = Wp[:, j:stop] ** 2 / _column_d2(Hinv, j, stop)
            drop = torch.argsort(score.flatten(), stable=True)[:round(sparsity * score.numel())]
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[drop] = True
            pruned[:, j:stop] = block.reshape(score.shape)
        if n_of_m is not None and j % n_of_m[1] == 0:
            kept, m = n_of_m
            score = Wp[:, j:j + m] ** 2 / _column_d2(Hinv, j, j + m)
            drop = torch.topk(score, m - kept, dim=1, largest=False).indices
            pruned[:, j:j + m].scatter_(1, drop, True)
        w = Wp[:, j].clone()
        q = torch.where(pruned[:, j], 0.0, w)
        if bits is not None:
            if static is not None:
                grp = int(order[j]) // g
                s, z = static[grp]
            else:
                grp = j // g
                if j % g == 0:
                    scales[:, grp], zeros[:, grp] = grid(Wp[:, j:j + g], bits, symmetric, observer)
                s, z = scales[:, grp], zeros[:, grp]
            scales[:, grp], zeros[:, grp] = s, z
            c = torch.clamp(torch.round(q / s) + z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            codes[:, j] = c
            q = s * (c - z)
        e = (w - q) / Hinv[j, j]
        Wp[:, j:] -= torch.outer(e, Hinv[j, j:])
        Wp[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    inv = torch.argsort(order)
    return {"weight": Wp[:, inv], "codes": codes[:, inv], "scale": scales, "zero": zeros, "kept": ~pruned[:, inv]}


def correlated_layer(out_f=12, in_f=48, tokens=100, dead=()):
    """A weight and the Gram matrix of correlated calibration inputs (some input channels always zero)."""
    torch.manual_seed(0)
    W = torch.randn(out_f, in_f)
    X = torch.randn(tokens, in_f) @ torch.randn(in_f, in_f) + 0.5 * torch.randn(in_f)
    X[:, list(dead)] = 0.0
    return W, X.T @ X


def output_error(W, W_hat, C):
    """``‖(W − Ŵ) X‖_F`` from ``C = XᵀX``, in float64."""
    D = (W - W_hat).double()
    return float(torch.trace(D @ C.double() @ D.T)) ** 0.5
