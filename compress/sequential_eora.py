"""Sequential EoRA: residuals fitted to the dense model's outputs from the compressed model's drifted inputs.

Independent EoRA (:mod:`compress.eora`) fits ``BA ≈ ΔW = W − W_c`` on the dense inputs ``X``. In the compressed
model a layer sees *drifted* inputs ``X̃`` (the layers before it are compressed too), and what the layers after it
need is its dense output ``W X``. Sequential EoRA minimises, per layer,

.. math::

    J_\\lambda(BA) = \\| W X - (W_c + BA) \\tilde X \\|_F^2 + \\lambda' \\| BA - \\Delta W \\|_F^2,
    \\qquad \\operatorname{rank}(BA) \\le r, \\qquad \\lambda' = \\lambda \\cdot \\operatorname{mean}(\\operatorname{diag} \\tilde C).

Why the ridge. With ``X = X̃ + D``, the first term is ``‖(ΔW − BA) X̃ + W D‖²``: ``BA`` must also *predict the drift*
``D`` from ``X̃`` by least squares. With ``N`` calibration tokens and ``n`` inputs, chance correlations alone fit
about ``n / N`` of the output energy in directions where ``X̃`` carries no signal, and that part of the fit does not
generalise: on SmolLM2 (4096 tokens, ``n`` up to 1536) the unregularised fit was worse on held-out text than no
compensation at all (``benchmarks/results/sequential_eora.md``). The penalty shrinks the drift correction towards
zero and the residual towards ``ΔW``, most strongly in the low-variance directions of ``X̃``, where the chance
correlations live. ``λ → ∞`` gives the plain SVD of ``ΔW``; ``λ = 0`` the exact sequential objective.

Exact optimum. With ``C̃ = X̃ X̃ᵀ``, ``K = Σ_t x̃_t x_tᵀ`` (:attr:`CrossStats.cross`) and
``C̃ + λ' I = Q (Λ + λ') Qᵀ``,

.. math::

    J_\\lambda = \\| (M_\\lambda - BA) S \\|_F^2 + \\text{const}, \\quad S = Q (\\Lambda + \\lambda')^{1/2}, \\quad
    M_\\lambda = (W K^\\top - W_c \\tilde C + \\lambda' \\Delta W) (\\tilde C + \\lambda' I)^{-1},

so ``M_λ S = (W Kᵀ − W_c C̃ + λ' ΔW) Q (Λ + λ')^{-1/2}``, and the truncated SVD ``M_λ S = U Σ Vᵀ`` gives
``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ (Λ + λ')^{-1/2} Qᵀ``. When the inputs did not drift (``X̃ = X``) and
``λ = 0`` this is EoRA.

Choosing λ (:func:`select_sequential_factors`). Each candidate (the ridges of ``ridges``, and independent EoRA
fitted on the dense inputs) is fitted on all calibration folds but one and scored by the drifted output error
``‖W X − (W_c + BA) X̃‖²`` on the fold left out; the candidate with the least total held-out error is refitted on
all folds. Independent EoRA is a candidate, so a layer only departs from it where a drift correction generalised
across folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

import torch

from compress import lowrank as lr
from compress.calibration import CrossStats

#: Ridges λ (relative to ``mean(diag C̃)``) tried by :func:`select_sequential_factors`.
DEFAULT_RIDGES: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)

#: Label of the independent-EoRA candidate in :class:`SequentialFit`.
INDEPENDENT = "independent"


@dataclass
class SequentialFit:
    """Residual of one layer chosen by cross-validation.

    Attributes
    ----------
    B, A : torch.Tensor
        ``(out, r)`` and ``(r, in)``, float64, refitted on all folds.
    choice : str
        ``"independent"`` or ``"ridge=<λ>"``.
    heldout_errors : dict[str, float]
        Relative held-out drifted output error of every candidate, ``sqrt(Σ_folds err² / Σ_folds ‖W X‖²)``.
    """

    B: torch.Tensor
    A: torch.Tensor
    choice: str
    heldout_errors: dict[str, float]


class _Eigen:
    """``C̃ = Q Λ Qᵀ`` of one statistics set, computed once and shifted for every ridge."""

    def __init__(self, cross: CrossStats, device: torch.device) -> None:
        C = cross.current.gram.to(device, torch.float64)
        if not torch.isfinite(C).all():
            raise ValueError("the compensated model's input second moment contains NaN or inf; recollect the "
                             "statistics in float32")
        self.C = 0.5 * (C + C.T)
        self.lam, self.Q = torch.linalg.eigh(self.C)

    def shift(self, ridge: float) -> float:
        """``λ' = λ · mean(diag C̃)``."""
        return ridge * float(self.C.diagonal().mean())

    def scaling(self, ridge: float, eps: float | None) -> lr.InputScaling:
        """``S = Q (Λ + λ')^{1/2}`` and ``S⁺`` (noise eigenvalues dropped as in :func:`compress.lowrank.whitening`)."""
        lam = self.lam + self.shift(ridge)
        keep = lam > lr.eigenvalue_cutoff(lam, eps)
        if not keep.any():
            raise ValueError("the compensated model's calibration inputs of this layer are all zero; nothing to fit")
        root = lam[keep].sqrt()
        Q = self.Q[:, keep]
        return lr.InputScaling(Q * root, (Q / root).T)


def _check_ridge(ridge: float) -> None:
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge!r} must be a finite number >= 0 (the penalty ridge * mean(diag C~) * "
                         "||BA - dW||^2); pass 0 for the exact sequential objective")


def _fit(W: torch.Tensor, Wc: torch.Tensor, cross: CrossStats, eigen: _Eigen, rank: int, ridge: float,
         eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    scaling = eigen.scaling(ridge, eps)
    K = cross.cross.to(W.device, torch.float64)
    target = W @ K.T - Wc @ eigen.C + eigen.shift(ridge) * (W - Wc)  # (W Kᵀ − W_c C̃ + λ' ΔW), (out, in)
    U, s, Vh = torch.linalg.svd(target @ scaling.pinv.T, full_matrices=False)
    return lr.factors_from_svd(U, s, Vh, rank, scaling)


def _as64(W: torch.Tensor, Wc: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    dev = W.device if device is None else torch.device(device)
    if W.shape != Wc.shape:
        raise ValueError(f"W {tuple(W.shape)} and W_c {tuple(Wc.shape)} must have the same (out, in) shape")
    return W.to(dev, torch.float64), Wc.to(dev, torch.float64), dev


def sequential_eora_factors(
    W: torch.Tensor,
    Wc: torch.Tensor,
    cross: CrossStats,
    rank: int,
    *,
    ridge: float = 0.0,
    eps: float | None = None,
    device: torch.device | str | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual factors ``B (out, r)``, ``A (r, in)`` (float64), the exact minimiser of ``J_λ`` (module docstring).

    Parameters
    ----------
    W, Wc : torch.Tensor
        ``(out, in)`` dense and compressed weights.
    cross : CrossStats
        ``X Xᵀ``, ``X̃ X̃ᵀ`` and ``Σ x̃ xᵀ`` of the layer's inputs in the dense (``X``) and compensated (``X̃``) model.
    rank : int
        ``1 <= rank <= min(out, in)``.
    ridge : float
        ``λ`` relative to ``mean(diag C̃)``; 0 is the exact objective ``‖W X − (W_c + BA) X̃‖``.
    eps : float, optional
        Relative eigenvalue cutoff of the pseudo-inverse (:func:`compress.lowrank.eigenvalue_cutoff`).
    device : torch.device or str, optional
        Where the float64 linear algebra runs (default: ``W``'s device).
    name : str
        The layer's name, for error messages.
    """
    lr.check_rank(rank, W.shape[0], W.shape[1], name, lr.EORA_RANK_FIX)
    _check_ridge(ridge)
    W64, Wc64, dev = _as64(W, Wc, device)
    return _fit(W64, Wc64, cross, _Eigen(cross, dev), rank, ridge, eps)


def drifted_squared_error(W: torch.Tensor, W_hat: torch.Tensor, cross: CrossStats) -> tuple[float, float]:
    """``(‖W X − Ŵ X̃‖_F², ‖W X‖_F²)`` from the three second moments of ``cross`` (float64)."""
    W = W.to(torch.float64)
    W_hat = W_hat.to(W.device, torch.float64)
    G = cross.reference.gram.to(W.device, torch.float64)
    Ct = cross.current.gram.to(W.device, torch.float64)
    K = cross.cross.to(W.device, torch.float64)
    ref = ((W @ G) * W).sum()
    err = ref - 2 * ((W_hat @ K) * W).sum() + ((W_hat @ Ct) * W_hat).sum()
    return float(err.clamp_min(0)), float(ref)


def drifted_output_error(W: torch.Tensor, W_hat: torch.Tensor, cross: CrossStats) -> float:
    """``‖W X − Ŵ X̃‖_F / ‖W X‖_F`` from the three second moments (see :class:`CrossStats`)."""
    err, ref = drifted_squared_error(W, W_hat, cross)
    return math.sqrt(err / ref) if ref > 0 else float("nan")


def _independent(W: torch.Tensor, Wc: torch.Tensor, cross: CrossStats, rank: int, ridge: float,
                 eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent EoRA on the dense inputs: ``min ‖(ΔW − BA) X‖`` (:func:`compress.eora.eora_factors`)."""
    return lr.lowrank_factors(W - Wc, rank, "whitened", cross.reference, ridge=ridge, eps=eps, device=W.device)


def select_sequential_factors(
    W: torch.Tensor,
    Wc: torch.Tensor,
    folds: Sequence[CrossStats],
    rank: int,
    *,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    independent_ridge: float = 0.0,
    eps: float | None = None,
    device: torch.device | str | None = None,
    name: str = "layer",
) -> SequentialFit:
    """Sequential EoRA with ``λ`` chosen by leave-one-fold-out cross-validation (module docstring).

    Cost: one ``eigh`` of ``C̃`` per fold plus one for all folds, and one SVD of ``(out, in)`` per candidate and
    fold; the statistics are the ones a single fit needs, split by fold.

    Parameters
    ----------
    W, Wc : torch.Tensor
        ``(out, in)`` dense and compressed weights.
    folds : sequence of CrossStats
        Statistics of disjoint parts of the calibration data (at least 2), e.g. even and odd batches.
    rank : int
        ``1 <= rank <= min(out, in)``.
    ridges : sequence of float
        Candidate ``λ`` of :func:`sequential_eora_factors`; independent EoRA is always a candidate too.
    independent_ridge : float
        Whitening ridge of the independent candidate (``C + ridge · mean(diag C) I``, as in ``eora_compensate``).
    eps : float, optional
        Relative eigenvalue cutoff of the pseudo-inverses.
    device : torch.device or str, optional
        Where the float64 fits run (default: ``W``'s device).
    name : str
        The layer's name, for error messages.
    """
    if len(folds) < 2:
        raise ValueError(f"folds has {len(folds)} statistics set(s); cross-validation needs at least 2 disjoint parts "
                         "of the calibration data (pass 2 or more calibration batches)")
    if not ridges:
        raise ValueError("ridges is empty; pass at least one ridge, e.g. compress.sequential_eora.DEFAULT_RIDGES")
    for ridge in ridges:
        _check_ridge(ridge)
    lr.check_rank(rank, W.shape[0], W.shape[1], name, lr.EORA_RANK_FIX)
    W64, Wc64, dev = _as64(W, Wc, device)
    labels = [INDEPENDENT] + [f"ridge={r:g}" for r in ridges]
    sq = dict.fromkeys(labels, 0.0)
    total_ref = 0.0
    for k, held in enumerate(folds):
        train = merge_cross_stats([f for i, f in enumerate(folds) if i != k])
        eigen = _Eigen(train, dev)
        candidates = {INDEPENDENT: _independent(W64, Wc64, train, rank, independent_ridge, eps)}
        candidates.update((label, _fit(W64, Wc64, train, eigen, rank, r, eps)) for label, r in zip(labels[1:], ridges))
        for label, (B, A) in candidates.items():
            err, ref = drifted_squared_error(W64, Wc64 + B @ A, held)
            sq[label] += err
        total_ref += ref
    choice = min(labels, key=lambda label: sq[label])
    everything = merge_cross_stats(folds)
    if choice == INDEPENDENT:
        B, A = _independent(W64, Wc64, everything, rank, independent_ridge, eps)
    else:
        B, A = _fit(W64, Wc64, everything, _Eigen(everything, dev), rank, ridges[labels.index(choice) - 1], eps)
    errors = {label: math.sqrt(v / total_ref) if total_ref > 0 else float("nan") for label, v in sq.items()}
    return SequentialFit(B, A, choice, errors)


def calibration_folds(calib_batches: Sequence[Any], folds: int = 2) -> list[list[Any]]:
    """Split calibration batches into ``folds`` disjoint parts, batch ``i`` into part ``i % folds``."""
    if len(calib_batches) < folds:
        raise ValueError(f"sequential EoRA chooses its ridge by cross-validation over {folds} disjoint parts of the "
                         f"calibration data, and got {len(calib_batches)} calibration batch(es); pass at least "
                         f"{folds} batches")
    return [list(calib_batches[k::folds]) for k in range(folds)]


def merge_cross_stats(parts: Sequence[CrossStats]) -> CrossStats:
    """Sum of the statistics of one layer over disjoint parts of the calibration data (e.g. all folds)."""
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return out
