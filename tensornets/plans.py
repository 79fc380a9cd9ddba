"""Forward plans: every way a factorization can run ``x -> x W^T``, and the one rule that picks one.

A :class:`Plan` is a *candidate*: its FLOPs and memory traffic for the batch bucket it was made
for, and an :meth:`~Plan.apply` that runs it. Each format lists its candidates
(:meth:`Factorization._candidates <tensornets.Factorization._candidates>`):

- :class:`RebuildPlan` (every format): rebuild ``W`` from the cores, then one GEMM;
- :class:`EinsumPlan` (einsum formats: Tucker, TT, MPO, CP): one planned einsum over ``x`` and every core;
- :class:`ContractPlan` (hand-written contractions: low rank; BTT's two layouts,
  :class:`~tensornets.formats.btt.BTTPlan`);
- :class:`~tensornets.formats.mpo.SplitPlan` (MPO): two GEMMs around a bond, one candidate per bond.

Which candidate runs is decided per (layer, batch bucket, device, dtype, training or not) by the *strategy*:

- ``"formula"`` (default): the minimum of ``flops + w * traffic`` (:func:`cheapest`, ``w`` =
  :func:`~tensornets.formats.base.traffic_weight` of the device): no measurement, no disk access.
- ``"measure"``: time the candidates once on the device (on random rows of the bucket's size) and
  keep the fastest, remembered in the on-disk wisdom (:mod:`tensornets.wisdom`) so later processes
  on the same machine reuse it. Candidates the formula puts over
  :data:`~tensornets.formats.base.MEASURE_CUTOFF` times behind the cheapest are not timed.

A forward that autograd records (grad mode on, and the input or a core requires grad: training)
has plans of its own, chosen on forward + backward: the formula adds each candidate's
``backward_flops`` and ``backward_traffic``, the measurement times the forward and the gradients
of the input and of the cores that require grad. A plan can be right for inference and wrong for training: on MPO
4096², 4 cores, r = 16, 512 rows, the split into two GEMMs, the formula's forward plan, runs the
forward about as fast as rebuild + GEMM but the training step slower, and it keeps the B x 64 x 64 x r hidden
product for backward, twice the rebuilt W (benchmarks/results/layers.md, plan tables).
  Where nothing has been measured yet and measuring is impossible (inside ``torch.compile``'s
  tracing), the formula decides.
- a candidate name (``"rebuild"``, ``"contract"``, ``"einsum"``, ``"split"``): force it (for
  benchmarks and experiments; where a format has several candidates of that name, such as MPO's
  splits or BTT's layouts, the formula picks among them); a name the format does not have raises
  ``ValueError``.

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
import time
from dataclasses import dataclass, field
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
    "time_once",
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
    backward_flops, backward_traffic : int
        The same for the backward of the plan's steps (gradients of the input and of every core),
        what a training step adds: the formula ranks plans on forward + backward when autograd
        records the forward (:meth:`cost` with ``grad=True``). Not given: twice the forward's
        (each product has two of its size in the backward).
    """

    name: str
    flops: int
    traffic: int
    backward_flops: int | None = field(default=None, kw_only=True)
    backward_traffic: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.backward_flops is None:
            object.__setattr__(self, "backward_flops", 2 * self.flops)
        if self.backward_traffic is None:
            object.__setattr__(self, "backward_traffic", 2 * self.traffic)

    @property
    def label(self) -> str:
        """A name unique among one layer's candidates (what the wisdom file stores)."""
        return self.name

    @property
    def graph_key(self) -> tuple:
        """What the ops this plan traces depend on (``torch.compile``): two plans with equal keys trace
        the same graph for any batch, so one compiled graph serves the buckets of both."""
        return (self.label,)

    def cost(self, weight: float, grad: bool = False) -> float:
        """``flops + weight * traffic``: the formula's cost in FLOP equivalents; with ``grad``, of forward + backward."""
        forward = self.flops + weight * self.traffic
        return forward + self.backward_flops + weight * self.backward_traffic if grad else forward

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


def cheapest(candidates: Sequence[P], weight: float, cost: Callable[[P], tuple[int, int]] | None = None,
             grad: bool = False) -> P:
    """The candidate of least ``flops + weight * traffic``; ties go to the earliest one.

    ``cost(c)`` gives ``(flops, traffic)`` (default: the candidate's ``flops`` and ``traffic``
    attributes, plus its ``backward_flops`` and ``backward_traffic`` with ``grad``). The one place
    the formula is written: strategy choice, MPO split choice and TT's rebuild sweep all call it.
    Candidate order encodes the tie rule: formats list rebuild + GEMM first (one large GEMM runs at
    the best rate there is), then their contractions.
    """
    if not candidates:
        raise ValueError("cheapest() needs at least one candidate")
    if cost is None:
        if grad:
            cost = lambda c: (c.flops + c.backward_flops, c.traffic + c.backward_traffic)  # type: ignore[attr-defined]  # noqa: E731
        else:
            cost = lambda c: (c.flops, c.traffic)  # type: ignore[attr-defined]  # noqa: E731

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
    keep it. A candidate name forces that plan in the layers whose format has it; the layers of other formats
    choose by the formula, with a warning naming the format. Takes effect at each layer's next forward (plans are
    cached per strategy).
    """
    global _strategy
    if check_strategy(strategy) is None:
        raise ValueError("strategy=None: pass 'formula', 'measure' or a candidate name")
    _strategy = strategy


def get_strategy() -> str:
    """The process-wide strategy (see :func:`set_strategy`)."""
    return _strategy


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (first call included: allocations, caches), device synchronized."""
    with torch.no_grad():
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t0


def default_timer(fn: Callable[[], object], repeats: int = 3, sample_s: float = 1e-3, long_s: float = 0.1) -> float:
    """Seconds per call of ``fn``: the fastest of ``repeats`` samples, each looping ``fn`` for about ``sample_s``.

    The fastest sample, not the median: other jobs on the machine only ever add time, and one disturbed sample of
    two near-equal candidates would otherwise decide between them. One warm-up call first (it also sizes the loop,
    at most 100 calls per sample); a call that took over ``long_s`` is sampled twice (its noise is small next to
    its length, and each sample costs that long). On CUDA the device is synchronized around each sample (this runs
    only while measuring, never in a forward).
    """
    once = time_once(fn)
    if once > long_s:
        repeats = min(repeats, 2)
    with torch.no_grad():
        loops = max(1, min(100, math.ceil(sample_s / max(once, 1e-7))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            _sync()
            times.append((time.perf_counter() - t0) / loops)
    return min(times)
