"""MPO (TT-matrix): one core per (out mode, in mode) pair."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..decompositions import tt_svd
from .base import EinsumFactorization
from .symbols import letters

__all__ = ["MPO"]


class MPO(EinsumFactorization):
    """Matrix product operator: ``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] ... G_d[:, o_d, i_d, :]``.

    Cores ``G_k: (r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``; ``ranks`` are the ``d - 1`` internal
    bonds. Parameters ``sum_k r_{k-1} o_k i_k r_k``. Also called TT-matrix (alias ``"ttm"``);
    tltorch calls it BlockTT, which is *not* the block tensor train (:class:`~tensornets.formats.BTT`).

    Decomposition: TT-SVD of the interleaved reshape ``(o_1 i_1, ..., o_d i_d)``; with ``eps``,
    ``||W - W_MPO||_F <= eps ||W||_F``. Full bonds ``r_k = min(prod_{j<=k} o_j i_j, prod_{j>k} o_j i_j)``.
    """

    format_name = "mpo"
    supports_randomized_svd = True
    default_num_cores = 3

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        self._check_modes(self.in_modes, self.out_modes)
        d = len(self.out_modes)
        if len(self.ranks) != d - 1:
            raise ValueError(f"mpo with {d} cores needs {d - 1} internal ranks, got ranks={self.ranks}")
        bonds = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.zeros(bonds[k], o, i, bonds[k + 1])) for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes))]
        )

    @classmethod
    def _check_modes(cls, in_modes, out_modes) -> None:
        if len(in_modes) != len(out_modes):
            raise ValueError(
                f"mpo needs as many out modes as in modes (one core per pair), got out_modes={tuple(out_modes)}, "
                f"in_modes={tuple(in_modes)}; pass modes of equal length (a mode of size 1 is allowed)"
            )

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        bonds = (1, *ranks, 1)
        return sum(bonds[k] * o * i * bonds[k + 1] for k, (o, i) in enumerate(zip(out_modes, in_modes)))

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        pairs = [o * i for o, i in zip(out_modes, in_modes)]
        return tuple(min(math.prod(pairs[: k + 1]), math.prod(pairs[k + 1 :])) for k in range(len(pairs) - 1))

    @classmethod
    def _decompose(cls, weight, in_modes, out_modes, ranks, eps, svd, seed, **options: Any):
        if options:
            raise TypeError(f"mpo.from_dense got unexpected options {sorted(options)}")
        d = len(out_modes)
        interleave = [p for k in range(d) for p in (k, d + k)]
        tensor = weight.reshape(*out_modes, *in_modes).permute(*interleave)
        tensor = tensor.reshape(*[o * i for o, i in zip(out_modes, in_modes)])
        cores = tt_svd(tensor, rank=list(ranks), eps=eps, method=svd, seed=seed)
        return {f"cores.{k}": c.reshape(c.shape[0], o, i, c.shape[-1]) for k, (c, o, i) in enumerate(zip(cores, out_modes, in_modes))}

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return tuple(tensors[f"cores.{k}"].shape[3] for k in range(len(tensors) - 1))

    def _cores(self) -> list[torch.Tensor]:
        return list(self.cores)

    def _equations(self) -> tuple[str, str]:
        d = len(self.out_modes)
        sym = iter(letters(1 + 3 * d + 1))
        b = next(sym)
        O = [next(sym) for _ in range(d)]
        I = [next(sym) for _ in range(d)]
        A = [next(sym) for _ in range(d + 1)]
        cores = [A[k] + O[k] + I[k] + A[k + 1] for k in range(d)]
        forward = f"{b}{''.join(I)},{','.join(cores)}->{b}{''.join(O)}"
        dense = f"{','.join(cores)}->{''.join(O + I)}"
        return forward, dense

    def init_chain(self):
        return self._cores(), math.prod(self.ranks)
