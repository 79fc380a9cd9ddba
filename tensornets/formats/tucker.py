"""Tucker: the tensorized ``W: (o_1..o_m, i_1..i_n)`` as a core times one factor per mode."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..decompositions import hooi, hosvd
from .base import EinsumFactorization
from .symbols import letters

__all__ = ["Tucker"]


class Tucker(EinsumFactorization):
    """``W[o_1..o_m, i_1..i_n] = sum core[t, s] prod_k U_k[o_k, t_k] prod_k V_k[i_k, s_k]``.

    Cores: ``core: (R_o1..R_om, R_i1..R_in)``, ``out_factors[k]: (o_k, R_ok)``,
    ``in_factors[k]: (i_k, R_ik)``. Parameters ``prod(R) + sum_k o_k R_ok + sum_k i_k R_ik``.
    With one mode per side (the default) this is ``W = U_out core V_in^T``: a low-rank map with
    an ``R_o x R_i`` mixer. ``ranks`` lists the out-mode ranks, then the in-mode ranks.

    Decomposition: truncated HOSVD (default) or HOOI (``algorithm="hooi"``); with ``eps`` each
    of the ``m + n`` modes discards at most ``eps ||W|| / sqrt(m + n)`` (HOSVD bound).
    """

    format_name = "tucker"
    default_num_cores = 1

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        m = len(self.out_modes)
        if len(self.ranks) != m + len(self.in_modes):
            raise ValueError(f"tucker needs one rank per mode ({m + len(self.in_modes)}), got ranks={self.ranks}")
        self.core = nn.Parameter(torch.zeros(*self.ranks))
        self.out_factors = nn.ParameterList([nn.Parameter(torch.zeros(o, r)) for o, r in zip(self.out_modes, self.ranks[:m])])
        self.in_factors = nn.ParameterList([nn.Parameter(torch.zeros(i, r)) for i, r in zip(self.in_modes, self.ranks[m:])])

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        sizes = list(out_modes) + list(in_modes)
        return math.prod(ranks) + sum(n * r for n, r in zip(sizes, ranks))

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        sizes = list(out_modes) + list(in_modes)
        total = math.prod(sizes)
        return tuple(min(n, total // n) for n in sizes)

    @classmethod
    def _decompose(cls, weight, in_modes, out_modes, ranks, eps, svd, seed, algorithm: str = "hosvd", **options: Any):
        if options:
            raise TypeError(f"tucker.from_dense got unexpected options {sorted(options)}")
        tensor = weight.reshape(*out_modes, *in_modes)
        if algorithm == "hosvd":
            core, factors = hosvd(tensor, rank=list(ranks), eps=eps)
        elif algorithm == "hooi":
            if eps is not None:
                raise ValueError("algorithm='hooi' takes rank= or keep=, not eps=/energy= (use the default 'hosvd')")
            core, factors = hooi(tensor, rank=list(ranks))
        else:
            raise ValueError(f"algorithm={algorithm!r} must be 'hosvd' or 'hooi'")
        m = len(out_modes)
        tensors = {"core": core}
        tensors.update({f"out_factors.{k}": f for k, f in enumerate(factors[:m])})
        tensors.update({f"in_factors.{k}": f for k, f in enumerate(factors[m:])})
        return tensors

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return tuple(tensors["core"].shape)

    def _cores(self) -> list[torch.Tensor]:
        # list() first: torch 2.11's dynamo fails on `*` over a ParameterList in a list (InternalTorchDynamoError)
        return [self.core, *list(self.out_factors), *list(self.in_factors)]

    def _equations(self) -> tuple[str, str]:
        m, n = len(self.out_modes), len(self.in_modes)
        sym = iter(letters(1 + 2 * (m + n)))
        b = next(sym)
        O = [next(sym) for _ in range(m)]
        I = [next(sym) for _ in range(n)]
        T = [next(sym) for _ in range(m)]
        S = [next(sym) for _ in range(n)]
        cores = ["".join(T + S)] + [o + t for o, t in zip(O, T)] + [i + s for i, s in zip(I, S)]
        forward = f"{b}{''.join(I)},{','.join(cores)}->{b}{''.join(O)}"
        dense = f"{','.join(cores)}->{''.join(O + I)}"
        return forward, dense

    def init_chain(self):
        return self._cores(), math.prod(self.ranks)
