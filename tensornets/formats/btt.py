"""Block tensor train (BTT, Qiu et al. 2024): two batched matmuls."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..contraction import ContractionPlan
from ..decompositions import rank_for_tolerance
from ..extern_ops import bmm
from ..plans import ContractPlan, Plan
from .base import Factorization

__all__ = ["BTT", "BTTPlan"]

#: elements of one 64-byte cache line of float32: a step that reads runs shorter than this moves whole lines
_LINE = 16


@dataclass(frozen=True)
class BTTPlan(ContractPlan):
    """BTT's two batched products with the batch laid out as rows (``columns=False``) or columns (``columns=True``).

    - rows (label ``"contract"``): ``x`` rows times ``W1``, hidden ``(m1, B, n0 r)``, regrouped to
      ``(n0, B, m1 r)`` for the second product. The regroup gathers runs of ``r`` elements (``a1`` moves slowest
      in the hidden and fastest in the copy), which at ``r = 1`` on hundreds of rows costs more than both products.
    - columns (label ``"contract@cols"``): ``W1ᵀ`` times ``x`` columns, hidden ``(m1, n0 r, B)``, which the second
      product reads as a transposed operand; for ``r > 1`` the regroup copies runs of ``r B`` elements, for ``r = 1``
      there is none. Its first product is a GEMM with ``B`` output columns, which BLAS runs slowly on a handful of
      columns.

    Both, at 4096², r = 1, on 512 and on 4 rows: ``benchmarks/results/kernels.md`` (section 3).
    """

    columns: bool = False

    @property
    def label(self) -> str:
        return "contract@cols" if self.columns else "contract"


class BTT(Factorization):
    """``W[(o0, o1), (a1, a0)] = sum_alpha W1[a1, a0, o0, alpha] W2[o0, a1, alpha, o1]``.

    With ``in = m1 * m0`` (``in_modes = (m1, m0)``, ``a1`` the slow index) and
    ``out = n0 * n1`` (``out_modes = (n0, n1)``):
    ``W1: (m1, m0, n0 * r)`` and ``W2: (n0, m1 * r, n1)``. For every block ``(o0, a1)`` the
    ``(n1, m0)`` sub-matrix ``W[o0, :, a1, :]`` has rank ``<= r``, so the best BTT of a dense
    ``W`` is a batch of independent truncated SVDs of those blocks (exact at
    ``r = min(n1, m0)``). Parameters and forward FLOPs per row are both
    ``r m1 n0 (m0 + n1)`` (times 2 for FLOPs): BTT costs exactly its parameters.

    Forward: ``x.view(B, m1, m0)`` -> bmm over ``a1`` with ``W1`` -> regroup by ``o0`` -> bmm over ``o0`` with
    ``W2`` -> ``(B, n0 n1)``, with the batch as the rows or the columns of both products (:class:`BTTPlan`: two
    candidates, the columns for large batches). Both products go through :func:`tensornets.extern_ops.bmm`, so
    that at ``B = 1`` a compiled graph keeps them as BLAS calls.

    References: S. Qiu et al., "Compute Better Spent: Replacing Dense Layers with Structured
    Matrices", ICML 2024.
    """

    format_name = "btt"
    default_num_cores = 2

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        self._check_modes(self.in_modes, self.out_modes)
        (r,) = self.ranks
        m1, m0 = self.in_modes
        n0, n1 = self.out_modes
        self.W1 = nn.Parameter(torch.zeros(m1, m0, n0 * r))
        self.W2 = nn.Parameter(torch.zeros(n0, m1 * r, n1))

    @classmethod
    def _check_modes(cls, in_modes, out_modes) -> None:
        if len(in_modes) != 2 or len(out_modes) != 2:
            raise ValueError(
                f"btt splits each side into exactly 2 modes (num_cores=2), got out_modes={tuple(out_modes)}, "
                f"in_modes={tuple(in_modes)}"
            )

    @classmethod
    def parameter_count(cls, in_modes, out_modes, ranks) -> int:
        (m1, m0), (n0, n1) = in_modes, out_modes
        return ranks[0] * m1 * n0 * (m0 + n1)

    @classmethod
    def full_ranks(cls, in_modes, out_modes) -> tuple[int, ...]:
        return (min(out_modes[1], in_modes[1]),)

    @classmethod
    def _decompose(cls, weight, in_modes, out_modes, ranks, eps, svd, seed, **options: Any):
        if options:
            raise TypeError(f"btt.from_dense got unexpected options {sorted(options)}")
        (m1, m0), (n0, n1) = in_modes, out_modes
        # blocks[o0, a1] = W[o0, :, a1, :]: (n1, m0); one SVD per block, batched.
        blocks = weight.reshape(n0, n1, m1, m0).permute(0, 2, 1, 3)
        U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
        r = ranks[0]
        if eps is not None:
            # One rank for all blocks: the smallest whose summed discarded tails meet eps ||W||.
            tol = eps * math.sqrt(float(weight.double().pow(2).sum()))
            tails = S.double().pow(2).sum(dim=(0, 1))  # energy per singular index, summed over blocks
            r = min(r, rank_for_tolerance(tails.sqrt(), tol))
        root = S[..., :r].sqrt()
        w2 = (U[..., :r] * root[..., None, :]).permute(0, 1, 3, 2)  # (n0, m1, r, n1)
        w1 = (root[..., :, None] * Vh[..., :r, :]).permute(1, 3, 0, 2)  # (m1, m0, n0, r)
        return {"W1": w1.reshape(m1, m0, n0 * r), "W2": w2.reshape(n0, m1 * r, n1)}

    @classmethod
    def _ranks_of(cls, tensors, requested) -> tuple[int, ...]:
        m1 = tensors["W1"].shape[0]
        return (tensors["W2"].shape[1] // m1,)

    def _contract(self, x: torch.Tensor, plan: Plan | ContractionPlan | None) -> torch.Tensor:
        (m1, m0), (n0, n1), (r,) = self.in_modes, self.out_modes, self.ranks
        B = x.shape[0]
        if isinstance(plan, BTTPlan) and plan.columns:
            h = bmm(self.W1.transpose(1, 2), x.reshape(B, m1, m0).permute(1, 2, 0))  # (m1, n0 r, B)
            # (a1, o0, rho, b) -> (o0, (a1 rho), b): a copy of runs of r B elements for r > 1, a view for r = 1;
            # the second product reads it transposed, (o0, b, (a1 rho)).
            h = h.reshape(m1, n0, r, B).transpose(0, 1).reshape(n0, m1 * r, B).transpose(1, 2)
        else:
            h = bmm(x.reshape(B, m1, m0).transpose(0, 1), self.W1)  # (m1, B, n0 r)
            # contiguous(): at r = 1 the permuted reshape is a strided view, on which bmm takes a
            # slow generic path (benchmarks/results/kernels.md, section 3; the gap is widest with
            # several threads); for r > 1 reshape copies anyway.
            h = h.reshape(m1, B, n0, r).permute(2, 1, 0, 3).contiguous().reshape(n0, B, m1 * r)
        y = bmm(h, self.W2)  # (n0, B, n1)
        return y.transpose(0, 1).reshape(B, n0 * n1)

    def _contract_cost(self, batch: int, columns: bool = False) -> tuple[int, int]:
        """``(flops, traffic)`` of :meth:`_contract` in one layout, traffic counted in elements at cache-line
        granularity (runs shorter than a line move whole lines).

        Both layouts read ``x`` and the cores, write the hidden and read it back, and write and transpose the
        output. Rows: the regroup copies the hidden, reading runs of ``r``. Columns: the regroup copies runs of
        ``r B`` (none at ``r = 1``), and the first product, a GEMM with ``B`` output columns, is charged
        ``_LINE / B`` reads of ``W1`` below a line's worth of columns (the slowdown of thin GEMMs measured in
        ``benchmarks/results/kernels.md``, section 3b, as a cost the formula can rank).
        """
        (m1, m0), (n0, n1), (r,) = self.in_modes, self.out_modes, self.ranks
        hidden = batch * m1 * n0 * r
        common = batch * m1 * m0 + 2 * hidden + 3 * batch * n0 * n1 + self.num_parameters
        if columns:
            regroup = 0 if r == 1 else 2 * hidden * max(1, _LINE // (r * batch))
            thin = self.W1.numel() * (max(1, _LINE // batch) - 1)
            traffic = common + regroup + thin
        else:
            traffic = common + hidden * (max(1, _LINE // r) + 1)
        return 2 * batch * self.num_parameters, traffic

    def _contract_candidates(self, batch: int) -> list[Plan]:
        """Rows, then columns (ties go to the rows, the layout of small batches)."""
        return [BTTPlan("contract", *self._contract_cost(batch, columns), columns=columns) for columns in (False, True)]

    def _dense(self) -> torch.Tensor:
        (m1, m0), (n0, n1), (r,) = self.in_modes, self.out_modes, self.ranks
        w1 = self.W1.reshape(m1, m0, n0, r)
        w2 = self.W2.reshape(n0, m1, r, n1)
        return torch.einsum("xaor,oxrp->opxa", w1, w2).reshape(n0 * n1, m1 * m0)

    def _rebuild_cost(self) -> tuple[int, int]:
        """``(flops, traffic)`` of :meth:`_dense`: one ``bmm`` over the ``(o0, a1)`` blocks.

        Traffic: the cores are read; ``W1`` is first copied into the ``bmm``'s batch-major layout (read and write),
        and the ``(o0, a1, o1, a0)`` product is written, read back and written again as ``(o0, o1, a1, a0)``.
        Leaving out those two copies made the formula rebuild a 1024² r=32 BTT for 32 rows at 1.9x the contraction's
        time (``benchmarks/results/layers.md``).
        """
        (m1, m0), (n0, n1), (r,) = self.in_modes, self.out_modes, self.ranks
        dense = n0 * n1 * m1 * m0
        return 2 * dense * r, self.num_parameters + 2 * self.W1.numel() + 3 * dense

    def init_chain(self):
        return [self.W1, self.W2], self.ranks[0]

    def fan_in_out(self) -> dict[str, tuple[int, int]]:
        """``(fan_in, fan_out)`` of each core seen as a batch of matrices (for muP init and learning rates).

        ``W1[a1]`` maps ``m0 -> n0 r``; ``W2[o0]`` maps ``m1 r -> n1``.
        """
        (m1, m0), (n0, n1), (r,) = self.in_modes, self.out_modes, self.ranks
        return {"W1": (m0, n0 * r), "W2": (m1 * r, n1)}
