"""Low-rank approximation of one weight matrix under a weighted Frobenius objective.

Every method here solves

.. math::

    \\min_{\\operatorname{rank}(BA) \\le r} \\| (M - BA) S \\|_F, \\qquad M \\in \\mathbb{R}^{m \\times n},

for a right weighting ``S`` chosen by the method, by a truncated SVD of ``M S = U Σ Vᵀ``:
``B = U_r Σ_r^{1/2}`` ``(m, r)``, ``A = Σ_r^{1/2} V_rᵀ S⁺`` ``(r, n)``.

- ``"svd"`` (plain, LoRC): ``S = I``.
- ``"asvd"`` (ASVD, Yuan et al. 2023): ``S = diag(mean|x|)^α``.
- ``"whitened"`` (SVD-LLM, Wang et al. 2024; EoRA, Liu et al. 2024 on a residual): ``S = Q Λ^{1/2}`` from the
  eigendecomposition of the calibration second moment ``C = Σ x xᵀ = Q Λ Qᵀ``. Because
  ``‖M X‖_F² = tr(M C Mᵀ) = ‖M Q Λ^{1/2}‖_F²``, this is the exact optimum of the output error
  ``‖(M − BA) X‖_F`` on the calibration inputs ``X`` (the same optimum as SVD-LLM's Cholesky whitening).

``S⁺`` is a truncated pseudo-inverse: eigenvalues (or ASVD scales) at or below a cutoff (:func:`eigenvalue_cutoff`)
are treated as zero,
so input channels that were never active give zero columns in ``A`` instead of NaN or huge entries. The
eigendecomposition runs in float64 whatever the weight dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.calibration import LayerStats
from tensornets.decompositions import rank_for_keep as core_rank_for_keep
from tensornets.devices import usable_device
from tensornets.shapes import check_int, check_tensor

#: method names accepted by :func:`input_scaling`
SCALINGS = ("svd", "asvd", "whitened")


def rank_for_keep(out_features: int, in_features: int, keep: float) -> int:
    """Largest rank ``r`` with ``r (out + in) <= keep · out · in`` (``keep`` = fraction of parameters kept); 0 if none.

    A rank-``r`` factorization saves parameters only if ``r < out · in / (out + in)``; ``keep=1`` gives that
    break-even rank. The core's one rule (:func:`tensornets.decompositions.rank_for_keep`) with the low-rank count.
    """
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        check_int(value, name)
    return core_rank_for_keep(keep, out_features * in_features, lambda r: r * (out_features + in_features),
                              max_rank=min(out_features, in_features))


def rank_for_energy(sq_spectrum: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i<k} σ_i² >= energy · Σ_i σ_i²`` for a non-increasing ``sq_spectrum`` of ``σ²``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy} must be in (0, 1]: the fraction of (weighted) spectral energy kept")
    total = float(sq_spectrum.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq_spectrum.double(), 0)
    return min(int(torch.searchsorted(cum, energy * total * (1 - 1e-12)).item()) + 1, sq_spectrum.numel())


#: default relative cutoff: ``C`` is stored in float32, so it cannot resolve eigenvalues below ``λ_max · eps_fp32``
DEFAULT_EPS = torch.finfo(torch.float32).eps


def eigenvalue_cutoff(lam: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Eigenvalues ``<=`` this are treated as zero: ``max(eps · λ_max, 2 |min(λ_min, 0)|)``.

    The first term is the float32 resolution of ``C`` (``eps`` default :data:`DEFAULT_EPS`). The second is the
    noise floor measured on ``C`` itself: ``C = Σ x xᵀ`` is positive semi-definite, so negative eigenvalues are
    rounding noise, and that noise is symmetric about zero — directions with eigenvalues within twice the most
    negative one are noise too (a rank-deficient ``C``, e.g. fewer calibration rows than inputs).

    The cutoff ``λ_max · n · eps_fp32`` (a worst-case perturbation bound) drops real signal on LLM activations,
    whose spectra span 10⁵–10⁶ because of outlier channels: on SmolLM2's last ``down_proj`` it kept 37 of 1536
    directions and tripled the held-out error of whitened SVD (0.104 vs 0.035) and raised EoRA's (0.198 vs 0.167).
    """
    eps = DEFAULT_EPS if eps is None else eps
    if not 0 <= eps < 1:  # NaN too; eps >= 1 would cut every direction, and C would look all zero
        raise ValueError(f"eps={eps} must be in [0, 1): a cutoff relative to the largest eigenvalue")
    top = lam.max().clamp_min(0)
    return torch.maximum(top * eps, 2 * (-lam.min()).clamp_min(0))


@dataclass
class InputScaling:
    """A right weighting ``S`` and its truncated pseudo-inverse ``S⁺``.

    Either diagonal (``right`` and ``pinv`` are ``(n,)`` vectors) or a basis (``right: (n, k)`` = ``Q_k Λ_k^{1/2}``,
    ``pinv: (k, n)`` = ``Λ_k^{-1/2} Q_kᵀ``), float64.
    """

    right: torch.Tensor
    pinv: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.right.dim() == 1

    def scale(self, M: torch.Tensor) -> torch.Tensor:
        """``M S``: ``(m, n) -> (m, k)``."""
        return M * self.right if self.diagonal else M @ self.right

    def unscale(self, Vh: torch.Tensor) -> torch.Tensor:
        """``Vh S⁺``: ``(r, k) -> (r, n)``."""
        return Vh * self.pinv if self.diagonal else Vh @ self.pinv


def whitening(stats: LayerStats, *, ridge: float = 0.0, eps: float | None = None) -> InputScaling:
    """``S = Q_k Λ_k^{1/2}`` from ``C = Q Λ Qᵀ`` (float64 ``eigh``), dropping noise eigenvalues.

    Parameters
    ----------
    stats : LayerStats
        Supplies ``C: (n, n)``.
    ridge : float
        Adds ``ridge · mean(diag C) · I`` to ``C`` before the eigendecomposition (shrinks towards plain SVD).
    eps : float, optional
        Relative eigenvalue cutoff (see :func:`eigenvalue_cutoff`; default float32 epsilon).
    """
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be >= 0 (it adds ridge * mean(diag C) * I to C)")
    C = stats.gram.to(torch.float64)
    if not torch.isfinite(C).all():
        raise ValueError("the activation second moment C contains NaN or inf; recollect the statistics in float32")
    C = 0.5 * (C + C.T)
    n = C.shape[0]
    if ridge > 0:
        C = C + ridge * C.diagonal().mean() * torch.eye(n, dtype=C.dtype, device=C.device)
    lam, Q = torch.linalg.eigh(C)
    keep = lam > eigenvalue_cutoff(lam, eps)
    if not keep.any():
        raise ValueError("the calibration inputs of this layer are all zero (C = 0); nothing to whiten against")
    lam, Q = lam[keep], Q[:, keep]
    root = lam.sqrt()
    return InputScaling(Q * root, (Q / root).T)


def asvd_scaling(stats: LayerStats, *, alpha: float = 0.5, eps: float | None = None) -> InputScaling:
    """``S = diag(mean|x|)^α``; channels with scale ``<= max · eps`` get ``S⁺ = 0``."""
    if not 0 <= alpha < math.inf:  # NaN too; inf scaled every channel to 0 or inf: all-zero factors
        raise ValueError(f"alpha={alpha} must be a finite number >= 0 (ASVD scales channels by mean|x|**alpha; 0.5 is "
                         "usual)")
    s = stats.mean_abs.to(torch.float64).pow(alpha)
    if not torch.isfinite(s).all():
        raise ValueError("the mean absolute activations contain NaN or inf; recollect the statistics in float32")
    cutoff = s.max() * (DEFAULT_EPS if eps is None else eps)
    live = s > cutoff
    return InputScaling(torch.where(live, s, torch.zeros_like(s)),
                        torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s)))


def input_scaling(
    method: str,
    stats: LayerStats | None,
    *,
    alpha: float = 0.5,
    ridge: float = 0.0,
    eps: float | None = None,
    n: int | None = None,
    device: torch.device | str | None = None,
) -> InputScaling:
    """The weighting ``S`` of ``method`` in :data:`SCALINGS` (``"svd"`` needs no statistics, only ``n``)."""
    device = None if device is None else usable_device(device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
    if method == "svd":
        if n is None:
            raise ValueError("input_scaling('svd') needs n, the input size")
        ones = torch.ones(n, dtype=torch.float64, device=device)
        return InputScaling(ones, ones)
    if method not in SCALINGS:
        raise ValueError(f"method={method!r} is not one of {SCALINGS}")
    if stats is None:
        raise ValueError(f"method={method!r} needs activation statistics; run collect_activation_stats first")
    if not isinstance(stats, LayerStats):
        raise TypeError(f"stats must be a LayerStats (collect_activation_stats(...)[name]), got {type(stats).__name__}")
    if n is not None and stats.in_features != n:
        raise ValueError(f"stats are of {stats.in_features} inputs but the weight has {n}; pass this layer's LayerStats")
    stats = stats.to(device) if device is not None else stats
    if method == "asvd":
        return asvd_scaling(stats, alpha=alpha, eps=eps)
    return whitening(stats, ridge=ridge, eps=eps)


def scaled_svd(M: torch.Tensor, scaling: InputScaling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD of ``M S`` in float64: ``U (m, p)``, ``σ (p,)``, ``Vh (p, k)``."""
    return torch.linalg.svd(scaling.scale(M.to(torch.float64)), full_matrices=False)


def factors_from_svd(
    U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int, scaling: InputScaling
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r Σ_r^{1/2}`` ``(m, r)`` and ``A = Σ_r^{1/2} V_rᵀ S⁺`` ``(r, n)``, zero-padded to ``rank``.

    The padding happens only when ``S`` has fewer than ``rank`` live directions; the extra rank-one terms are
    zero (they could not lower the objective).
    """
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    B = U[:, :k] * root
    A = scaling.unscale(root[:, None] * Vh[:k])
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)
    return B, A


#: what :func:`check_rank` tells an EoRA caller to do (the factorizing methods' ``keep=`` / ``energy=`` are not EoRA's)
EORA_RANK_FIX = "pass a smaller rank (the residual's rank), or leave this layer out of target_modules"


def check_rank(rank: int, out_features: int, in_features: int, name: str,
               fix: str = "pass a smaller rank, or keep=/energy=") -> None:
    """Raise unless ``1 <= rank <= min(out, in)``; the message ends with ``fix``, what the caller can change."""
    full = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ValueError(
            f"rank={rank!r} for layer {name!r} of shape ({out_features}, {in_features}) must be an int in "
            f"[1, {full}] (min(out, in)); {fix}"
        )


def lowrank_factors(
    M: torch.Tensor,
    rank: int,
    method: str = "whitened",
    stats: LayerStats | None = None,
    *,
    alpha: float = 0.5,
    ridge: float = 0.0,
    eps: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``B (m, r)``, ``A (r, n)`` minimizing ``‖(M − BA) S‖_F`` for ``method``.

    Parameters
    ----------
    M : torch.Tensor
        ``(m, n)`` matrix (a weight, or a residual ``ΔW`` for EoRA).
    rank : int
        ``1 <= rank <= min(m, n)``.
    method : {"svd", "asvd", "whitened"}
        The weighting (see the module docstring).
    stats : LayerStats, optional
        Calibration statistics (needed by ``"asvd"`` and ``"whitened"``).
    alpha, ridge, eps : float
        ASVD exponent; whitening ridge; relative pseudo-inverse cutoff.
    device : torch.device or str, optional
        Where to compute (default: ``M``'s device).

    Returns
    -------
    (B, A) : tuple of torch.Tensor
        float64, on ``device``; ``B A`` is the approximation of ``M``.
    """
    device = None if device is None else usable_device(device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
    check_rank(rank, M.shape[0], M.shape[1], "M")
    check_tensor(M, "M", ndim=2)
    device = M.device if device is None else torch.device(device)
    scaling = input_scaling(method, stats, alpha=alpha, ridge=ridge, eps=eps, n=M.shape[1], device=device)
    U, s, Vh = scaled_svd(M.to(device), scaling)
    return factors_from_svd(U, s, Vh, rank, scaling)


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, stats: LayerStats) -> float:
    """``‖(W − Ŵ) X‖_F / ‖W X‖_F = sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`` on the calibration inputs (bias excluded)."""
    if W.shape != W_hat.shape or W.dim() != 2 or stats.in_features != W.shape[1]:
        raise ValueError(f"W {tuple(W.shape)} and W_hat {tuple(W_hat.shape)} must be equal (out, in) matrices of the "
                         f"{stats.in_features} inputs stats describe")
    C = stats.gram.to(W.device, torch.float64)
    W = W.to(torch.float64)
    D = W - W_hat.to(W.device, torch.float64)
    num = ((D @ C) * D).sum()
    den = ((W @ C) * W).sum()
    return float((num.clamp_min(0) / den).sqrt()) if den > 0 else float("nan")


def relative_weight_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F``."""
    W = W.to(torch.float64)
    return float(torch.linalg.norm(W - W_hat.to(W.device, torch.float64)) / torch.linalg.norm(W))
