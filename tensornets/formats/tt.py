"""Tensor train (TT) of the tensorized matrix, over the modes ``(o_1..o_m, i_1..i_n)`` in order."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..decompositions import tt_svd
from ..plans import cheapest
from .base import EinsumFactorization, traffic_weight
from .symbols import letters

__all__ = ["TensorTrain", "balance_core_norms"]


def balance_core_norms(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same train with every core at one Frobenius norm, ``(Π_k ||G_k||)^{1/d}``: each core scaled, the
    scales multiplying to 1, so the represented tensor is unchanged up to rounding.

    TT-SVD leaves the cores left-orthonormal and the whole norm of ``W`` in the last one. A forward that
    contracts that core first (TT's input modes) then carries ``||W||`` through every intermediate, where a
    float16 layer overflows although ``x W^T`` itself fits (a 512² weight of entries ~200: inf); spread evenly,
    each intermediate is at most ``||W||^{k/d}`` of its part, as LowRank's ``S^{1/2}`` split does for two cores.
    A zero train is returned as it is.
    """
    norms = [float(c.detach().double().norm()) for c in cores]
    if min(norms) == 0.0:
        return list(cores)
    target = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (target / n) for c, n in zip(cores, norms)]


class TensorTrain(EinsumFactorization):
    """Plain TT: ``W[o_1..o_m, i_1..i_n] = G_1[:, o_1, :] ... G_{m+n}[:, i_n, :]``.

    Cores ``G_k: (R_{k-1}, n_k, R_k)``, ``R_0 = R_{m+n} = 1``, over the out modes then the in
    modes (so the bond between ``o_m`` and ``i_1`` is the matrix rank of ``W``). Parameters
    ``sum_k R_{k-1} n_k R_k``; ``ranks`` are the ``m + n - 1`` internal bonds. Not to be confused
    with :class:`~tensornets.formats.MPO` (the TT-matrix, one core per (out, in) mode pair).

    Decomposition: TT-SVD; with ``eps``, ``||W - W_TT||_F <= eps ||W||_F``.
    """

    format_name = "tt"
    supports_randomized_svd = True
    default_num_cores = 2

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        sizes = self.out_modes + self.in_modes
        if len(self.ranks) != len(sizes) - 1:
            raise ValueError(f"tt needs {len(sizes) - 1} internal ranks, got ranks={self.ranks}")
        bonds = (1, *self.ranks, 1)
        self.cores = nn.ParameterList([nn.Parameter(torch.zeros(bonds[k], n, bonds[k + 1])) for k, n in enumerate(sizes)])

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        sizes = list(out_modes) + list(in_modes)
        bonds = (1, *ranks, 1)
        return sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(sizes))

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        sizes = list(out_modes) + list(in_modes)
        return tuple(min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1))

    @classmethod
    def _decompose(cls, weight, in_modes, out_modes, ranks, eps, svd, seed, **options: Any):
        if options:
            raise TypeError(f"tt.from_dense got unexpected options {sorted(options)}")
        cores = tt_svd(weight.reshape(*out_modes, *in_modes), rank=list(ranks), eps=eps, method=svd, seed=seed)
        return {f"cores.{k}": c for k, c in enumerate(balance_core_norms(cores))}

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return tuple(tensors[f"cores.{k}"].shape[2] for k in range(len(tensors) - 1))

    def _cores(self) -> list[torch.Tensor]:
        return list(self.cores)

    def _equations(self) -> tuple[str, str]:
        m, n = len(self.out_modes), len(self.in_modes)
        d = m + n
        sym = iter(letters(1 + d + d + 1))
        b = next(sym)
        N = [next(sym) for _ in range(d)]
        A = [next(sym) for _ in range(d + 1)]
        cores = [A[k] + N[k] + A[k + 1] for k in range(d)]
        forward = f"{b}{''.join(N[m:])},{','.join(cores)}->{b}{''.join(N[:m])}"
        dense = f"{','.join(cores)}->{''.join(N)}"
        return forward, dense

    # Rebuild: sweep cores 1..s left to right into L: (n_1..n_s, R_s) and cores s+1..d right to left
    # into R: (R_s, n_{s+1}..n_d), then W = L R, at the bond s with the lowest cost. Every step is a
    # matmul of reshaped views (no permutes): faster than the planned einsum over all cores,
    # forward and backward, on LoRETTA's 576 x 8 factors (benchmarks/results/kernels.md), at the
    # FLOPs of the einsum's optimal path for these chains.
    def _dense(self) -> torch.Tensor:
        return self.dense_of(self._cores())

    def dense_of(self, cores: Sequence[torch.Tensor], split: int | None = None) -> torch.Tensor:
        """The padded ``(padded_out, padded_in)`` matrix of this train's shapes with ``cores`` in place of its own
        (same shapes; e.g. rescaled cores), contracted at bond ``split`` (default: the cheapest, as :meth:`to_dense`
        does)."""
        split = self._rebuild_split() if split is None else split
        left, right = self.halves_of(cores, split)
        return (left @ right).reshape(self.padded_out, self.padded_in)

    @staticmethod
    def halves_of(cores: Sequence[torch.Tensor], split: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with ``L R`` the train's matrix of modes ``(n_1..n_s) x (n_{s+1}..n_d)``: cores ``1..s`` swept
        left to right into ``L: (n_1..n_s, R_s)``, the others right to left into ``R: (R_s, n_{s+1}..n_d)``."""
        left = cores[0].reshape(-1, cores[0].shape[-1])
        for core in cores[1:split]:
            left = (left @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        right = cores[-1].reshape(cores[-1].shape[0], -1)
        for core in reversed(cores[split:-1]):
            right = (core.reshape(-1, core.shape[-1]) @ right).reshape(core.shape[0], -1)
        return left, right

    def _sweep_cost(self, split: int) -> tuple[int, int]:
        """``(flops, traffic)`` of the rebuild that meets at bond ``split`` (1 <= split < number of cores)."""
        return _sweep_cost(self.out_modes + self.in_modes, self.ranks, split)

    def _rebuild_split(self) -> int:
        return _cheapest_bond(self.out_modes + self.in_modes, self.ranks, self._device_type())

    def _rebuild_cost(self) -> tuple[int, int]:
        return self._sweep_cost(self._rebuild_split())

    def _rebuild_backward_cost(self) -> tuple[int, int]:
        flops, traffic = self._rebuild_cost()  # the sweep's GEMMs, not the einsum over all cores
        return 2 * flops, 2 * traffic

    def init_chain(self):
        return self._cores(), math.prod(self.ranks)


def _sweep_cost(sizes: tuple[int, ...], ranks: tuple[int, ...], split: int) -> tuple[int, int]:
    """``(flops, traffic)`` of rebuilding a train of mode ``sizes`` and bond ``ranks`` that meets at bond ``split``."""
    bonds = (1, *ranks, 1)
    flops = traffic = 0
    rows = sizes[0]  # left sweep: (rows, R_{k-1}) @ (R_{k-1}, n_k R_k)
    for k in range(1, split):
        flops += 2 * rows * bonds[k] * sizes[k] * bonds[k + 1]
        traffic += rows * bonds[k] + bonds[k] * sizes[k] * bonds[k + 1] + rows * sizes[k] * bonds[k + 1]
        rows *= sizes[k]
    cols = sizes[-1]  # right sweep: (R_k n_k, R_{k+1}) @ (R_{k+1}, cols)
    for k in range(len(sizes) - 2, split - 1, -1):
        flops += 2 * bonds[k] * sizes[k] * bonds[k + 1] * cols
        traffic += bonds[k] * sizes[k] * bonds[k + 1] + bonds[k + 1] * cols + bonds[k] * sizes[k] * cols
        cols *= sizes[k]
    flops += 2 * rows * bonds[split] * cols
    traffic += rows * bonds[split] + bonds[split] * cols + rows * cols
    return flops, traffic


@torch.compiler.assume_constant_result  # under torch.compile: a constant of the graph, chosen at trace time
def _cheapest_bond(sizes: tuple[int, ...], ranks: tuple[int, ...], device_type: str) -> int:
    """The bond where the rebuild of a train of these shapes costs least on ``device_type``."""
    return _cheapest_bond_cached(sizes, ranks, device_type)


@functools.lru_cache(maxsize=None)
def _cheapest_bond_cached(sizes: tuple[int, ...], ranks: tuple[int, ...], device_type: str) -> int:
    splits = range(1, len(ranks) + 1)
    return cheapest(splits, traffic_weight(device_type), cost=lambda split: _sweep_cost(sizes, ranks, split))
