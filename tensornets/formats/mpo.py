"""MPO (TT-matrix): one core per (out mode, in mode) pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..contraction import ContractionPlan, plan_contraction
from ..decompositions import tt_svd
from ..plans import Plan
from .base import EinsumFactorization
from .symbols import letters
from .tt import balance_core_norms

__all__ = ["MPO", "SplitPlan"]


@dataclass(frozen=True)
class SplitPlan(Plan):
    """The MPO applied as two GEMMs around bond ``m = split`` (see :meth:`MPO._split_contract`).

    ``left`` contracts cores ``1..m`` to ``L: (o_L, i_L, r_m)``, ``right`` contracts cores ``m+1..d``
    to ``R: (i_R, r_m, o_R)``; ``flops`` and ``traffic`` cover both rebuilds and both GEMMs for
    the batch the plan was made for (any batch runs on it). One candidate per bond.
    """

    split: int = 0
    left: ContractionPlan | None = None
    right: ContractionPlan | None = None

    @property
    def label(self) -> str:
        return f"split@{self.split}"

    def apply(self, fact: "MPO", x: torch.Tensor) -> torch.Tensor:
        return fact._split_contract(x, self)


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
        cores = balance_core_norms(tt_svd(tensor, rank=list(ranks), eps=eps, method=svd, seed=seed))
        return {f"cores.{k}": c.reshape(c.shape[0], o, i, c.shape[-1]) for k, (c, o, i) in enumerate(zip(cores, out_modes, in_modes))}

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        return tuple(tensors[f"cores.{k}"].shape[3] for k in range(len(tensors) - 1))

    def _cores(self) -> list[torch.Tensor]:
        return list(self.cores)

    def _indices(self) -> tuple[str, list[str], list[str], list[str], list[str]]:
        """Einsum letters: batch ``b``, out modes ``O``, in modes ``I``, bonds ``A`` and each core's term."""
        d = len(self.out_modes)
        sym = iter(letters(1 + 3 * d + 1))
        b = next(sym)
        O = [next(sym) for _ in range(d)]
        I = [next(sym) for _ in range(d)]
        A = [next(sym) for _ in range(d + 1)]
        return b, O, I, A, [A[k] + O[k] + I[k] + A[k + 1] for k in range(d)]

    def _equations(self) -> tuple[str, str]:
        b, O, I, _, cores = self._indices()
        forward = f"{b}{''.join(I)},{','.join(cores)}->{b}{''.join(O)}"
        dense = f"{','.join(cores)}->{''.join(O + I)}"
        return forward, dense

    # ------------------------------------------------------------------ contraction
    # Two ways to apply the cores to x: one planned einsum over x and every core (opt_einsum's
    # path), or the split: contract the cores left and right of a bond m into L and R, then
    #     T = x.reshape(B i_L, i_R) @ R.reshape(i_R, r_m o_R)        (B i_L, r_m o_R)
    #     y = L.reshape(o_L, i_L r_m) @ T.reshape(B, i_L r_m, o_R)   (B, o_L, o_R)
    # opt_einsum often finds the same pairing for small B, but ATen's einsum then permutes every
    # intermediate; the split's layouts make both products plain GEMMs with no copy in between.
    # Measured on 4096^2, modes 8^4, r = 16: the split beats the einsum at B = 1 and B = 512 and
    # rebuild + GEMM at B = 512 (benchmarks/results/layers.md). Which plan runs is the strategy's
    # choice among the candidates (each split, the einsum, rebuild + GEMM; tensornets.plans).
    def _split_equations(self, m: int) -> tuple[str, str]:
        _, O, I, A, cores = self._indices()
        left = f"{','.join(cores[:m])}->{''.join(O[:m])}{''.join(I[:m])}{A[m]}"
        right = f"{','.join(cores[m:])}->{''.join(I[m:])}{A[m]}{''.join(O[m:])}"
        return left, right

    def _split_plan(self, m: int, batch: int) -> SplitPlan:
        shapes = self._core_shapes()
        eq_left, eq_right = self._split_equations(m)
        left, right = plan_contraction(eq_left, shapes[:m]), plan_contraction(eq_right, shapes[m:])
        o_l, i_l = math.prod(self.out_modes[:m]), math.prod(self.in_modes[:m])
        o_r, i_r = math.prod(self.out_modes[m:]), math.prod(self.in_modes[m:])
        r = self.ranks[m - 1]
        hidden = batch * i_l * r * o_r
        flops = left.flops + right.flops + 2 * hidden * (i_r + o_l)
        # x, R, L and y move once; the hidden product once too: the second GEMM streams it in its
        # own layout, whereas the einsum plan's traffic stands for intermediates that ATen
        # permutes between steps (the cost the traffic weight was fitted to). Counting it once
        # matches the measured order of split / einsum / rebuild on 1024^2 and 4096^2, r = 8-32,
        # but for 1024^2 r = 8 at B = 512, where the formula picks rebuild and the split is faster
        # (benchmarks/results/layers.md; strategy="measure" picks the split there).
        traffic = left.traffic + right.traffic + batch * i_l * i_r + i_r * r * o_r + hidden + o_l * i_l * r + batch * o_l * o_r
        # backward: each GEMM's two gradient products (∂output and both inputs read, their gradients written), a
        # transposed copy of the hidden product for the second GEMM's ∂L (torch folds L @ hidden into one GEMM over
        # hiddenᵀ), and ∂L, ∂R to the cores. On MPO 1024² and 4096² (r = 8-32) it ranks the plans of a training step
        # close to the fastest at B >= 32 (further off at B = 1, where every plan is fast), where the forward's
        # ranking picked a split slower than rebuild + GEMM (4096², r = 16, B = 512): benchmarks/results/layers.md,
        # "Plans", forward + backward.
        x_size, y_size, l_size, r_size = batch * i_l * i_r, batch * o_l * o_r, o_l * i_l * r, i_r * r * o_r
        back_traffic = (hidden + 2 * (x_size + r_size)) + (y_size + 2 * (l_size + hidden) + 2 * hidden) \
            + left.backward_traffic + right.backward_traffic
        return SplitPlan("split", flops, traffic, split=m, left=left, right=right, backward_flops=2 * flops,
                         backward_traffic=back_traffic)

    def _contract_candidates(self, batch: int) -> list[Plan]:
        """The split at each bond, then the einsum over every core (ties go to a split: the same
        pairing without ATen's permute copies)."""
        return [*(self._split_plan(m, batch) for m in range(1, len(self.out_modes))), *super()._contract_candidates(batch)]

    def _split_contract(self, x: torch.Tensor, plan: SplitPlan) -> torch.Tensor:
        m, cores, B = plan.split, self._cores(), x.shape[0]
        o_l, i_l = math.prod(self.out_modes[:m]), math.prod(self.in_modes[:m])
        o_r, i_r = math.prod(self.out_modes[m:]), math.prod(self.in_modes[m:])
        r = self.ranks[m - 1]
        left = plan.left(*cores[:m]).reshape(o_l, i_l * r)
        right = plan.right(*cores[m:]).reshape(i_r, r * o_r)
        hidden = (x.reshape(B * i_l, i_r) @ right).reshape(B, i_l * r, o_r)
        return torch.matmul(left, hidden).reshape(B, o_l * o_r)

    def init_chain(self):
        return self._cores(), math.prod(self.ranks)
