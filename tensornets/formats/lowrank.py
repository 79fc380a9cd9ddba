"""Low rank: ``W = U V`` with ``U: (out, r)``, ``V: (r, in)``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..contraction import ContractionPlan
from ..decompositions import truncated_svd
from .base import Factorization

__all__ = ["LowRank"]


class LowRank(Factorization):
    """``W = U V``, ``U: (out, r)``, ``V: (r, in)``; forward ``y = (x V^T) U^T``.

    Parameters: ``r (in + out)``. Forward FLOPs: ``2 B r (in + out)`` (two GEMMs); the optimal
    rank-r approximation in Frobenius norm is the truncated SVD (Eckart-Young), split as
    ``U = U_r S_r^{1/2}``, ``V = S_r^{1/2} Vh_r`` so both factors have the same scale.
    """

    format_name = "lowrank"
    supports_randomized_svd = True

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        if len(self.in_modes) != 1 or len(self.out_modes) != 1:
            raise ValueError(f"lowrank has one mode per side, got out_modes={self.out_modes}, in_modes={self.in_modes}")
        (r,) = self.ranks
        self.U = nn.Parameter(torch.zeros(self.padded_out, r))
        self.V = nn.Parameter(torch.zeros(r, self.padded_in))

    @classmethod
    def _check_modes(cls, in_modes, out_modes) -> None:
        if len(in_modes) != 1 or len(out_modes) != 1:
            raise ValueError(f"lowrank takes num_cores=1 (one mode per side), got {len(out_modes)} and {len(in_modes)}")

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        return ranks[0] * (in_modes[0] + out_modes[0])

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        return (min(in_modes[0], out_modes[0]),)

    @classmethod
    def _decompose(cls, weight, in_modes, out_modes, ranks, eps, svd, seed, **options: Any) -> dict[str, torch.Tensor]:
        if options:
            raise TypeError(f"lowrank.from_dense got unexpected options {sorted(options)}")
        U, S, Vh = truncated_svd(weight, rank=ranks[0], eps=eps, method=svd, seed=seed)
        root = S.sqrt()
        return {"U": U * root, "V": root[:, None] * Vh}

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return (tensors["U"].shape[1],)

    def _contract(self, x: torch.Tensor, plan: ContractionPlan | None) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U)

    def _contract_cost(self, batch: int) -> tuple[int, int]:
        r, n_in, n_out = self.ranks[0], self.padded_in, self.padded_out
        return 2 * batch * r * (n_in + n_out), batch * (n_in + 2 * r + n_out) + r * (n_in + n_out)

    def _dense(self) -> torch.Tensor:
        return self.U @ self.V

    def _rebuild_cost(self) -> tuple[int, int]:
        r, n_in, n_out = self.ranks[0], self.padded_in, self.padded_out
        return 2 * n_out * r * n_in, r * (n_in + n_out) + n_in * n_out

    def init_chain(self):
        return [self.U, self.V], self.ranks[0]
