"""CP (CANDECOMP / PARAFAC) of the tensorized matrix: a sum of ``R`` rank-one tensors."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..decompositions import cp_als, cp_rank_bound, cp_slices
from .base import EinsumFactorization
from .symbols import letters

__all__ = ["CP"]


class CP(EinsumFactorization):
    """``W[o_1..o_m, i_1..i_n] = sum_r prod_k A_k[o_k, r] prod_k B_k[i_k, r]``.

    Cores ``out_factors[k] = A_k: (o_k, R)``, ``in_factors[k] = B_k: (i_k, R)``; ``ranks = (R,)``.
    Parameters ``R (sum_k o_k + sum_k i_k)``: linear in the rank and in the mode sizes, the
    smallest of the tensor formats for a given rank (LoRTA-style adapters use it for that).

    The weights ``lambda_r`` of the textbook form ``sum_r lambda_r a_r^(1) o ... o a_r^(d)`` are
    folded into the factors, ``|lambda_r|^(1/d)`` into each (the sign into the first), so every
    factor has the same scale, as :class:`~tensornets.formats.LowRank` splits ``S^(1/2)``.
    :meth:`to_tensorly` exports unit weights; :meth:`from_tensorly` folds any weights back in.

    Forward: one planned einsum; its path contracts ``x`` with the in-mode factors (the first
    step costs ``2 B R in``, the later ones shrink the tensor by ``i_k``), then expands through
    the out-mode factors (the last step costs ``2 B R out``): ``O(B R (in + out))``, like low
    rank, with ``R`` the CP rank.

    Decomposition: ALS (:func:`~tensornets.decompositions.cp_als`, tensorly's ``parafac``, seeded,
    ``init="svd"`` by default); options ``init``, ``n_iter_max``, ``tol``. There is no SVD-style
    error bound: ``eps`` / ``energy`` search (bisection) for the smallest rank whose ALS fit
    measures ``||W - W_CP|| <= eps ||W||``. The full rank is ``prod(modes) / max(modes)``, where
    the decomposition is exact by construction (:func:`~tensornets.decompositions.cp_slices`),
    not by ALS. Below it, the error is what ALS reaches: it usually falls with the rank, with no
    guarantee of monotonicity.
    """

    format_name = "cp"
    seeded_decomposition = True
    default_num_cores = 2

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        if len(self.ranks) != 1:
            raise ValueError(f"cp has one rank (the number of rank-one terms), got ranks={self.ranks}")
        (r,) = self.ranks
        self.out_factors = nn.ParameterList([nn.Parameter(torch.zeros(o, r)) for o in self.out_modes])
        self.in_factors = nn.ParameterList([nn.Parameter(torch.zeros(i, r)) for i in self.in_modes])

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        return ranks[0] * (sum(out_modes) + sum(in_modes))

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        return (cp_rank_bound([*out_modes, *in_modes]),)

    @classmethod
    def _decompose(
        cls,
        weight,
        in_modes,
        out_modes,
        ranks,
        eps,
        svd,
        seed,
        init: str = "svd",
        n_iter_max: int = 200,
        tol: float = 1e-10,
        **options: Any,
    ):
        if options:
            raise TypeError(f"cp.from_dense got unexpected options {sorted(options)} (it takes init=, n_iter_max=, tol=)")
        tensor = weight.reshape(*out_modes, *in_modes)
        fit = lambda r, target=None: _balanced_fit(
            tensor, r, init=init, seed=seed, n_iter_max=n_iter_max, tol=tol, stop_below=target
        )
        if not tensor.any():
            # a zero weight (a zero-initialised projection) is exactly rank 1 with zero factors; ALS
            # would divide by its zero norm. eps= asks for the smallest rank, rank= keeps the rank asked.
            rank = 1 if eps is not None else ranks[0]
            factors = [tensor.new_zeros(n, rank) for n in tensor.shape]
        else:
            factors = fit(ranks[0]) if eps is None else _smallest_fit_within(tensor, eps, ranks[0], fit)
        m = len(out_modes)
        tensors = {f"out_factors.{k}": f for k, f in enumerate(factors[:m])}
        tensors.update({f"in_factors.{k}": f for k, f in enumerate(factors[m:])})
        return tensors

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return (tensors["out_factors.0"].shape[1],)

    def _cores(self) -> list[torch.Tensor]:
        # list() first: torch 2.11's dynamo fails on `*` over a ParameterList in a list (InternalTorchDynamoError)
        return [*list(self.out_factors), *list(self.in_factors)]

    def _equations(self) -> tuple[str, str]:
        m, n = len(self.out_modes), len(self.in_modes)
        sym = iter(letters(1 + m + n + 1))
        b = next(sym)
        O = [next(sym) for _ in range(m)]
        I = [next(sym) for _ in range(n)]
        r = next(sym)
        cores = [o + r for o in O] + [i + r for i in I]
        forward = f"{b}{''.join(I)},{','.join(cores)}->{b}{''.join(O)}"
        dense = f"{','.join(cores)}->{''.join(O + I)}"
        return forward, dense

    def init_chain(self):
        return self._cores(), self.ranks[0]


def _balanced_fit(tensor: torch.Tensor, rank: int, **als: Any) -> list[torch.Tensor]:
    """Factors ``(n_k, rank)`` of a rank-``rank`` CP of ``tensor`` with the weights folded in evenly.

    At the bound rank the exact slice decomposition is returned (ALS is neither needed nor exact there).
    """
    if rank >= cp_rank_bound(tensor.shape):
        return cp_slices(tensor)
    weights, factors = cp_als(tensor, rank, **als)
    return fold_weights(weights, factors)


def fold_weights(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fold ``weights: (R,)`` into ``factors[k]: (n_k, R)``: ``|w|^(1/d)`` into each, ``sign(w)`` into the first.

    ``sum_r w_r a_r^(1) o ... o a_r^(d)`` is unchanged; the factors come out with equal column scales.
    """
    root = weights.abs() ** (1.0 / len(factors))
    folded = [f * root for f in factors]
    folded[0] = folded[0] * torch.where(weights < 0, -1.0, 1.0).to(weights.dtype)
    return folded


def _smallest_fit_within(tensor: torch.Tensor, eps: float, cap: int, fit) -> list[torch.Tensor]:
    """The fit at the smallest rank ``<= cap`` whose measured relative error is ``<= eps`` (bisection).

    ALS errors are not guaranteed to fall with the rank, so bisection may miss a smaller rank that
    fits; whatever it returns has been measured to meet ``eps`` (or is the fit at ``cap`` when
    even that one does not: ``rank`` caps ``eps``, as in the other formats). A rank far above the
    tensor's own (a constant weight is rank 1) can make ALS singular or non-finite: such a fit
    counts as "lower the rank", since a smaller one then represents the tensor.
    """
    norm = float(torch.linalg.vector_norm(tensor.double()))
    rebuild = lambda fs: torch.einsum(_dense_equation(len(fs)), *fs)

    def error(fs: list[torch.Tensor]) -> float:
        return float(torch.linalg.vector_norm((rebuild(fs) - tensor).double())) / norm if norm > 0 else 0.0

    def attempt(rank: int) -> tuple[list[torch.Tensor] | None, bool]:
        """(the fit, whether it meets eps); a degenerate fit is (None, True): search lower."""
        try:
            candidate = fit(rank, target)
        except ValueError:  # singular ALS systems (cp_als says so)
            return None, True
        err = error(candidate)
        if not math.isfinite(err):
            return None, True
        return candidate, err <= eps

    # Each ALS run of the search stops as soon as it meets eps (a little below, as tensorly's
    # running error is computed through norms); the exact error is measured after.
    target = eps * (1 - 1e-6)
    best, fits = attempt(cap)
    if not fits:
        return best
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi) // 2
        candidate, fits = attempt(mid)
        if fits:
            hi = mid
            if candidate is not None:
                best = candidate
        else:
            lo = mid + 1
    # every fit that met eps was degenerate (ALS broke down at each of them): refit the rank found, so that its
    # error (cp_als names the fixes) reaches the user
    return fit(lo, target) if best is None else best


def _dense_equation(order: int) -> str:
    sym = letters(order + 1)
    return f"{','.join(c + sym[-1] for c in sym[:-1])}->{sym[:-1]}"
