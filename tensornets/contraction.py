"""Contraction plans: find an einsum path once, execute it many times.

``torch.einsum`` with three or more operands asks opt_einsum for a path on *every* call, which
costs more than a whole small-batch MPO forward. A :class:`ContractionPlan` holds the path found
once for an equation and operand shapes, and runs it as one call into ATen's C++ einsum with that
path (no Python loop of pairwise contractions, which is slower too). Timings of all three:
``benchmarks/results/kernels.md`` (``benchmarks/bench_kernels.py``). Plans are cached
process-wide by ``(equation, shapes)``.

Formats whose forward depends on the batch size plan per *batch bucket* (the next power of
two), see :func:`batch_bucket`, so a stream of ragged batch sizes reuses a handful of plans.

Under ``torch.compile`` the planned path is used too (through ``torch.ops.aten.einsum``, which
dynamo can trace); plan *search* never runs inside a traced region (see
:meth:`tensornets.Factorization.forward`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import opt_einsum
import torch

__all__ = ["ContractionPlan", "plan_contraction", "batch_bucket", "plan_cache_info", "clear_plan_cache"]

# opt_einsum's exhaustive "optimal" search is exact and cheap up to ~7 operands; past that its
# dynamic-programming search finds the same optimum for tree-shaped networks in far less time.
_OPTIMAL_MAX_OPERANDS = 7


@dataclass(frozen=True)
class ContractionPlan:
    """A planned einsum: the equation, the pairwise path, and its FLOP count.

    Attributes
    ----------
    equation : str
        Explicit einsum equation (``"ab,bc->ac"``).
    shapes : tuple of tuple of int
        Operand shapes the path was planned for (the batch bucket, for batch-dependent plans).
    path : tuple of int
        The pairwise path flattened as ATen's einsum expects it (``((0, 1), (0, 1)) -> (0, 1, 0, 1)``).
    flops : int
        opt_einsum's cost of the path (multiply-adds counted as 2), for ``shapes``.
    traffic : int
        Elements read and written by the pairwise steps (each step's two inputs and its output):
        the memory side of the cost, which dominates when intermediates are large.
    backward_traffic : int
        Elements the backward of the steps moves: per step ``(A, B) -> C``, ``∂C`` and both inputs
        read, ``∂A`` and ``∂B`` written (``|C| + 2 |A| + 2 |B|``). Its FLOPs are twice :attr:`flops`
        (two products of the step's size per step).
    """

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    path: tuple[int, ...]
    flops: int
    traffic: int
    backward_traffic: int

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        """Contract ``operands`` along the planned path (one C++ call, no path search)."""
        if len(operands) <= 2:
            return torch.einsum(self.equation, *operands)
        if torch.compiler.is_compiling():
            # torch.compile cannot trace the C++ entry point below; the ATen op takes the same path
            # (in eager it adds dispatcher overhead, benchmarks/results/kernels.md; traced, none).
            return torch.ops.aten.einsum(self.equation, list(operands), path=list(self.path))
        # torch.einsum would search a path again; its C++ entry point takes ours directly.
        return torch._VF.einsum(self.equation, operands, path=list(self.path))  # type: ignore[attr-defined]


@lru_cache(maxsize=2048)
def _plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> ContractionPlan:
    optimize = "optimal" if len(shapes) <= _OPTIMAL_MAX_OPERANDS else "dp"
    path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    flat = tuple(i for pair in _pairwise(path, len(shapes)) for i in pair)
    sizes = {c: d for term, shape in zip(equation.split("->")[0].split(","), shapes) for c, d in zip(term, shape)}
    traffic = backward = 0
    for step in info.contraction_list:
        inputs, output = step[2].split("->")
        read = sum(math.prod(sizes[c] for c in term) for term in inputs.split(","))
        written = math.prod(sizes[c] for c in output)
        traffic += read + written
        backward += written + 2 * read
    return ContractionPlan(equation=equation, shapes=shapes, path=flat, flops=int(info.opt_cost), traffic=traffic,
                           backward_traffic=backward)


def _pairwise(path: Sequence[tuple[int, ...]], n_operands: int) -> list[tuple[int, int]]:
    """opt_einsum's path as pairs only, which is all ATen's einsum takes.

    opt_einsum's "dp" search may emit single-operand steps ``(i,)`` (summing out an index only
    that operand has, e.g. a TT end core's bond of size 1); ATen sums such indices itself inside
    the next pairwise step. Both move each step's result to the end of the operand list, so a
    single step becomes a relabelling: the operand keeps its position in ATen's list, and the later
    steps are renumbered to find it there.
    """
    ssa = list(range(n_operands))  # opt_einsum's operand list, as ids
    aten = list(range(n_operands))  # ATen's operand list, as ids
    alias: dict[int, int] = {}  # id a single step produced -> the id of the operand it stands for
    next_id, pairs = n_operands, []
    for step in path:
        ids = [ssa[i] for i in step]
        for i in sorted(step, reverse=True):
            del ssa[i]
        ssa.append(next_id)
        if len(step) == 1:
            alias[next_id] = alias.get(ids[0], ids[0])
        else:
            a, b = sorted(aten.index(alias.get(i, i)) for i in ids)
            pairs.append((a, b))
            del aten[b], aten[a]
            aten.append(next_id)
        next_id += 1
    return pairs


def plan_contraction(equation: str, shapes: Sequence[Sequence[int]]) -> ContractionPlan:
    """Return the cached :class:`ContractionPlan` for ``equation`` on operands of ``shapes``.

    The first call for a given ``(equation, shapes)`` runs opt_einsum's path search; every later
    call is a dictionary hit (see :func:`plan_cache_info`).
    """
    try:  # operator.index: ints and the 0-d int tensors torch.jit.trace records sizes as; 3.7 is not truncated
        dims = tuple(tuple(operator.index(d) for d in s) for s in shapes)
    except TypeError:
        raise ValueError(f"shapes={shapes!r} must hold ints") from None
    return _plan(equation, dims)


def batch_bucket(batch: int) -> int:
    """The power of two ``>= batch`` that batch-dependent plans are made for."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if torch.compiler.is_compiling():
        # Under torch.compile the batch may be symbolic: each comparison becomes a guard, so the
        # compiled graph is reused for every batch in (bucket / 2, bucket] and retraced outside it.
        bucket = 1
        while bucket < batch:
            bucket *= 2
        return bucket
    return 1 << (batch - 1).bit_length()


def plan_cache_info():
    """``functools`` cache statistics of the plan cache (``hits``, ``misses``, ``currsize``)."""
    return _plan.cache_info()


def clear_plan_cache() -> None:
    """Drop every cached contraction path: the next :func:`plan_contraction` of each equation and shapes searches
    again with opt_einsum. Each layer keeps the strategy it chose per batch bucket (set a layer's strategy with
    :meth:`Factorization.set_strategy <tensornets.formats.base.Factorization.set_strategy>`)."""
    _plan.cache_clear()
