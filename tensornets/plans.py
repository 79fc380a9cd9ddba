"""Forward plans: every way a factorization can run ``x -> x W^T``, and the one rule that picks one.

A :class:`Plan` is a *candidate*: its FLOPs and memory traffic for the batch bucket it was made
for, and an :meth:`~Plan.apply` that runs it. Each format lists its candidates
(:meth:`Factorization._candidates <tensornets.Factorization._candidates>`):

- :class:`RebuildPlan` (every format): rebuild ``W`` from the cores, then one GEMM;
- :class:`EinsumPlan` (einsum formats: Tucker, TT, MPO, CP): one planned einsum over ``x`` and every core;
- :class:`ContractPlan` (hand-written contractions: low rank, BTT);
- :class:`~tensornets.formats.mpo.SplitPlan` (MPO): two GEMMs around a bond, one candidate per bond.

Which candidate runs is decided per (layer, batch bucket, device, dtype) by the *strategy*:

- ``"formula"`` (default): the minimum of ``flops + w * traffic`` (:func:`cheapest`, ``w`` =
  :func:`~tensornets.formats.base.traffic_weight` of the device): no measurement, no disk access.
- ``"measure"``: time every candidate once on the device (the forward, under ``torch.no_grad``,
  on random rows of the bucket's size) and keep the fastest, remembered in the on-disk wisdom
  (:mod:`tensornets.wisdom`) so later processes on the same machine reuse it.
  Where nothing has been measured yet and measuring is impossible (inside ``torch.compile``'s
  tracing), the formula decides.
- a candidate name (``"rebuild"``, ``"contract"``, ``"einsum"``, ``"split"``): force it (for
  benchmarks and experiments); a name the format does not have raises ``ValueError``.

Opt in globally with :func:`set_strategy` (``tensornets.set_strategy("measure")``) or per layer
with :meth:`Factorization.set_strategy <tensornets.Factorization.set_strategy>`; the per-layer
choice wins. :meth:`Factorization.tune <tensornets.Factorization.tune>` measures given batch sizes
ahead of time (e.g. before ``torch.compile``).

Under ``torch.compile`` the choice is made eagerly while dynamo traces the forward (once per
traced batch bucket) and only the chosen plan's tensor ops enter the graph, so layers compile
with ``fullgraph=True``. With a symbolic batch (``dynamic=True``, or dynamo's automatic dynamic
shapes after a second batch size) the batch is compared only with the buckets where the chosen
plan's ops change (:attr:`Plan.graph_key`): one graph per run of buckets that trace the same ops,
e.g. two for a layer that contracts up to 512 rows and rebuilds above, not one per power of two
(which dynamo's ``recompile_limit`` of 8 would cut off). Batches above 2^20 rows run the plan of
that bucket.

A new format gets the rebuild candidate for free and adds its contractions by implementing
``_contract`` / ``_contract_cost`` (one hand-written contraction) or ``_cores`` / ``_equations``
(an :class:`~tensornets.EinsumFactorization`); more candidates come from overriding
``_contract_candidates`` (as :class:`~tensornets.MPO` does for its splits).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .contraction import ContractionPlan

if TYPE_CHECKING:
    from .formats.base import Factorization

__all__ = [
    "Plan",
    "RebuildPlan",
    "ContractPlan",
    "EinsumPlan",
    "cheapest",
    "set_strategy",
    "get_strategy",
    "check_strategy",
    "STRATEGIES",
    "FORCEABLE",
    "Timer",
    "default_timer",
]

#: strategies that choose among the candidates (any other accepted value is a candidate name)
STRATEGIES = ("formula", "measure")
#: candidate names a strategy may force
FORCEABLE = ("rebuild", "contract", "einsum", "split")

#: ``timer(fn)`` -> seconds one call of ``fn`` takes (used by ``strategy="measure"``)
Timer = Callable[[Callable[[], object]], float]

_strategy = "formula"


@dataclass(frozen=True)
class Plan:
    """One way to run a factorization's forward on a batch: a candidate of the strategy choice.

    Attributes
    ----------
    name : str
        What :meth:`Factorization.strategy <tensornets.Factorization.strategy>` reports
        (``"rebuild"``, ``"contract"``, ``"einsum"``, ``"split"``).
    flops : int
        Floating-point operations (a multiply-add counts 2) for the batch the plan was made for.
    traffic : int
        Elements read and written by the plan's steps (its memory side).
    """

    name: str
    flops: int
    traffic: int

    @property
    def label(self) -> str:
        """A name unique among one layer's candidates (what the wisdom file stores)."""
        return self.name

    @property
    def graph_key(self) -> tuple:
        """What the ops this plan traces depend on (``torch.compile``): two plans with equal keys trace
        the same graph for any batch, so one compiled graph serves the buckets of both."""
        return (self.label,)

    def cost(self, weight: float) -> float:
        """``flops + weight * traffic``: the formula's cost in FLOP equivalents."""
        return self.flops + weight * self.traffic

    def apply(self, fact: "Factorization", x: torch.Tensor) -> torch.Tensor:
        """``(B, padded_in) -> (B, padded_out)``: run this plan on ``fact``'s cores."""
        raise NotImplementedError(f"{type(self).__name__} has no apply")


@dataclass(frozen=True)
class RebuildPlan(Plan):
    """``W = fact._dense()`` (``(padded_out, padded_in)``), then ``y = x W^T`` as one GEMM."""

    def apply(self, fact: "Factorization", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fact._dense())


@dataclass(frozen=True)
class ContractPlan(Plan):
    """The format's own hand-written contraction (``fact._contract``), e.g. two GEMMs for low rank."""

    def apply(self, fact: "Factorization", x: torch.Tensor) -> torch.Tensor:
        return fact._contract(x, self)


@dataclass(frozen=True)
class EinsumPlan(Plan):
    """One planned einsum over ``x.reshape(B, *in_modes)`` and every core (``contraction``)."""

    contraction: ContractionPlan | None = None

    @property
    def graph_key(self) -> tuple:
        # the pairwise path (which can change with the batch) decides the traced ops
        return (self.label, None if self.contraction is None else self.contraction.path)

    def apply(self, fact: "Factorization", x: torch.Tensor) -> torch.Tensor:
        y = self.contraction(x.reshape(x.shape[0], *fact.in_modes), *fact._cores())
        return y.reshape(x.shape[0], fact.padded_out)


P = TypeVar("P")


def cheapest(candidates: Sequence[P], weight: float, cost: Callable[[P], tuple[int, int]] | None = None) -> P:
    """The candidate of least ``flops + weight * traffic``; ties go to the earliest one.

    ``cost(c)`` gives ``(flops, traffic)`` (default: the candidate's ``flops`` and ``traffic``
    attributes). The one place the formula is written: strategy choice, MPO split choice and TT's
    rebuild sweep all call it. Candidate order encodes the tie rule: formats list rebuild + GEMM
    first (one large GEMM runs at the best rate there is), then their contractions.
    """
    if not candidates:
        raise ValueError("cheapest() needs at least one candidate")
    cost = cost or (lambda c: (c.flops, c.traffic))  # type: ignore[attr-defined]

    def total(c: P) -> float:
        flops, traffic = cost(c)
        return flops + weight * traffic

    return min(candidates, key=total)


def check_strategy(strategy: str | None, argument: str = "strategy") -> str | None:
    """Validate a strategy value (``None`` = inherit the global one); returns it unchanged."""
    if strategy is None or strategy in STRATEGIES or strategy in FORCEABLE:
        return strategy
    raise ValueError(
        f"{argument}={strategy!r} is not a strategy: pass 'formula' (cost model, the default), 'measure' "
        f"(time the candidates once, remember the fastest) or a candidate to force: {', '.join(FORCEABLE)}"
    )


def set_strategy(strategy: str) -> None:
    """Set the process-wide strategy: ``"formula"`` (default), ``"measure"`` or a candidate name.

    Layers that set their own (:meth:`Factorization.set_strategy <tensornets.Factorization.set_strategy>`)
    keep it. Takes effect at each layer's next forward (plans are cached per strategy).
    """
    global _strategy
    if check_strategy(strategy) is None:
        raise ValueError("strategy=None: pass 'formula', 'measure' or a candidate name")
    _strategy = strategy


def get_strategy() -> str:
    """The process-wide strategy (see :func:`set_strategy`)."""
    return _strategy


def default_timer(fn: Callable[[], object], repeats: int = 3, sample_s: float = 1e-3) -> float:
    """Median seconds per call of ``fn``: ``repeats`` samples, each looping ``fn`` for about ``sample_s``.

    One warm-up call first (it also sizes the loop, at most 100 calls per sample). On CUDA the
    device is synchronized around each sample (this runs only while measuring, never in a forward).
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - t0
        loops = max(1, min(100, math.ceil(sample_s / max(once, 1e-7))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times)
