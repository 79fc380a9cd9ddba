"""The Optimal Brain Surgeon column sweep shared by GPTQ and SparseGPT.

Both compress ``W: (out, in)`` one input column at a time, in a fixed order, minimising the layer's output error
on the calibration inputs ``X``,

.. math::

    \\| (W - \\hat W) X \\|_F^2 = \\tfrac12 \\operatorname{tr}\\big((W - \\hat W) H (W - \\hat W)^\\top\\big),
    \\qquad H = 2 C = 2 \\sum_t x_t x_t^\\top,

and after fixing column ``j`` to ``ŵ_j`` (rounded to a grid and / or set to zero) move every later column by the
OBS update ``W[:, j:] -= (w_j − ŵ_j) / [H_j^{-1}]_{jj} · [H_j^{-1}]_{j, j:}``, ``H_j^{-1}`` being the inverse
Hessian of the columns not yet fixed. Those rows are the rows of the upper Cholesky factor ``U`` of
``(H + λ I)^{-1}`` (Frantar et al. 2022, GPTQ, "Cholesky reformulation"): ``[H_j^{-1}]_{j, j:} / [H_j^{-1}]_{jj}
= U_{j, j:} / U_{jj}``, so one factorization serves all columns. Updates inside a block of ``block_size`` columns
are applied eagerly and to the rest of the matrix once per block ("lazy batch updates"): the result is the same as
the column-by-column sweep up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.sources import check_finite_weight, quantization_grid


def prepare_hessian(W: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, H)`` in float64 with ``H = 2 C`` and dead inputs handled as GPTQ's reference does.

    An input channel that was exactly zero on all calibration tokens (``H_ii = 0``) carries no information: its
    weight column is set to zero (it never contributed to the outputs) and ``H_ii`` to 1 so ``H`` stays invertible.

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` weight (copied).
    gram : torch.Tensor
        ``(in, in)`` calibration second moment ``C = Σ_t x_t x_tᵀ`` (:class:`compress.calibration.LayerStats`).
    """
    if W.dim() != 2 or tuple(gram.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"gram of shape {tuple(gram.shape)} does not match W of shape {tuple(W.shape)}: it must be (in, in) = "
            f"({W.shape[-1]}, {W.shape[-1]}), the statistics of this layer's inputs"
        )
    if not torch.isfinite(gram).all():
        raise ValueError("gram contains NaN or inf; recollect the calibration statistics (float32 model inputs)")
    check_finite_weight(W)
    W = W.detach().to(torch.float64).clone()
    H = 2 * gram.detach().to(W.device, torch.float64)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def check_sweep_options(percdamp: float, block_size: int) -> None:
    """Raise ``ValueError`` naming ``percdamp`` (must be ``>= 0``) or ``block_size`` (must be ``>= 1``)."""
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0.0 <= percdamp < math.inf:
        raise ValueError(f"percdamp={percdamp!r} must be a finite number >= 0 (fraction of mean(diag H) added to the "
                         "diagonal, e.g. 0.01)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int (128 is the reference)")


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper triangular ``U`` with ``Uᵀ U = (H + λ I)^{-1}`` (its Cholesky factor) with damping ``λ = percdamp · mean(diag H)``, float64.

    Raises ``ValueError`` naming ``percdamp`` when the damped ``H`` is not positive definite.
    """
    check_sweep_options(percdamp, 1)
    H = H.to(torch.float64).clone()
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    # One Cholesky factorization instead of the reference's three steps (Cholesky, inverse, Cholesky): with J the
    # reversal permutation and J H J = M Mᵀ, H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J), and J M⁻¹ J is upper triangular.
    M, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (percdamp={percdamp}); raise percdamp (e.g. 0.1) or "
            "collect more calibration tokens"
        )
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1)


@dataclass
class QuantGrid:
    """How the sweep rounds each column: ``bits``-bit codes on per-(row, group) grids.

    ``static`` grids are given up front as ``scale, zero: (out, n_groups)`` with ``group_of[j]`` the group of the
    ``j``-th swept column (GPTQ with act-order: groups of the original columns, computed from the original
    weights). Otherwise the grid of a group is computed when the sweep reaches its first column, from the group's
    columns as updated so far (GPTQ's reference), groups being ``group_size`` consecutive swept columns, with
    ``observer`` (:func:`compress.sources.quantization_grid`).
    """

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float32
    observer: str = "minmax"
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_of: torch.Tensor | None = None

    @property
    def static(self) -> bool:
        return self.scale is not None


@dataclass
class SweepResult:
    """``weight``: ``(out, in)`` float64 result in swept order; ``codes`` (integer-valued float64) and the grids
    ``scale, zero: (out, n_groups)`` when quantizing; ``pruned``: ``(out, in)`` bool, True where set to zero."""

    weight: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    pruned: torch.Tensor


#: chooses the pruned entries of a block ``W1: (out, b)`` given the squared OBS denominators ``d2: (b,)``
BlockMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    grid: QuantGrid | None = None,
    block_mask: BlockMask | None = None,
    n_of_m: tuple[int, int] | None = None,
    block_size: int = 128,
) -> SweepResult:
    """Fix the columns of ``W`` left to right with OBS error feedback (see the module docstring).

    Parameters
    ----------
    W : torch.Tensor
        ``(out, in)`` float64, columns already in sweep order (e.g. permuted by act-order).
    U : torch.Tensor
        ``(in, in)`` upper Cholesky factor of the damped inverse Hessian, same order (:func:`inverse_hessian_factor`).
    grid : QuantGrid, optional
        Round the kept weights to this grid.
    block_mask : callable, optional
        Unstructured pruning: at the start of each block, ``block_mask(W1, d2)`` returns the ``(out, b)`` bool mask
        of entries to prune, from the block's current weights ``W1`` and ``d2 = diag(U)²`` of its columns
        (SparseGPT's adaptive mask selection scores ``w² / d²``).
    n_of_m : (n, m), optional
        Semi-structured pruning: at every ``m``-th column, prune the ``n`` entries of each row with the lowest
        ``w² / d²`` among the next ``m`` columns (``(2, 4)`` is 2:4).
    block_size : int
        Columns per lazy-update block.
    """
    check_sweep_options(0.0, block_size)
    out_f, n = W.shape
    # Work on Wᵀ: a column of W is then a contiguous row, and the per-column rank-1 updates run on contiguous
    # memory (faster than on strided column slices at SmolLM2's sizes).
    Wt = W.T.contiguous()
    d2_all = torch.diagonal(U).square()
    pruned_t = torch.zeros(n, out_f, dtype=torch.bool, device=W.device)
    codes_t = torch.zeros_like(Wt) if grid is not None else None
    scale = zero = None
    if grid is not None:
        if grid.static:
            scale, zero = grid.scale, grid.zero
        else:
            groups = n // grid.group_size
            scale, zero = W.new_ones(out_f, groups), W.new_zeros(out_f, groups)
    qmin, qmax = (-(2 ** (grid.bits - 1)), 2 ** (grid.bits - 1) - 1) if grid is not None else (0, 0)
    group_of = grid.group_of.tolist() if grid is not None and grid.static else None
    prunes = block_mask is not None or n_of_m is not None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2].clone()  # (b, out): row i is column i1 + i of W
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1).tolist()
        Err1 = torch.zeros_like(W1)
        mask1 = (block_mask(W1.T, d2_all[i1:i2]).T.contiguous() if block_mask is not None
                 else torch.zeros_like(W1, dtype=torch.bool))
        for i in range(i2 - i1):
            j = i1 + i
            if n_of_m is not None and i % n_of_m[1] == 0:
                score = W1[i:i + n_of_m[1]].square() / d2_all[j:j + n_of_m[1], None]
                drop = torch.topk(score, n_of_m[0], dim=0, largest=False).indices
                mask1[i:i + n_of_m[1]].scatter_(0, drop, True)
            w = W1[i].clone()
            q = w.masked_fill(mask1[i], 0.0) if prunes else w
            if grid is not None:
                if group_of is not None:
                    g = group_of[j]
                    s, z = scale[:, g], zero[:, g]
                elif j % grid.group_size == 0:
                    g = j // grid.group_size
                    scale[:, g], zero[:, g] = quantization_grid(
                        _current_columns(Wt, W1, Err1, U, i1, i, j + grid.group_size).T, grid.bits, grid.symmetric,
                        grid.scale_dtype, grid.observer)
                    s, z = scale[:, g], zero[:, g]
                c = torch.round(q / s).add_(z).clamp_(qmin, qmax)
                codes_t[j] = c
                q = (c - z).mul_(s)
            err = (w - q).div_(d1[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            W1[i] = q
            Err1[i] = err
        Wt[i1:i2] = W1
        pruned_t[i1:i2] = mask1
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
    return SweepResult(Wt.T, None if codes_t is None else codes_t.T, scale, zero, pruned_t.T)


def _current_columns(Wt, W1, Err1, U, i1: int, i: int, stop: int) -> torch.Tensor:
    """Rows ``i1 + i .. stop`` of ``Wᵀ`` as updated by every column fixed so far, this block's pending updates
    included: ``(stop − i1 − i, out)``."""
    i2 = i1 + W1.shape[0]
    inside = W1[i:min(stop, i2) - i1]
    if stop <= i2:
        return inside
    beyond = Wt[i2:stop] - U[i1:i1 + i, i2:stop].T @ Err1[:i]
    return torch.cat([inside, beyond], 0)
