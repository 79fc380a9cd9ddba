"""The :class:`Factorization` interface every format implements.

A factorization stores an ``(out, in)`` matrix ``W`` as small cores (``nn.Parameter``) and applies
it to inputs ``(..., in) -> (..., out)`` through one of its candidate plans (:mod:`tensornets.plans`):
rebuild ``W`` and one GEMM, or a contraction through the cores, whichever the strategy picks for
the batch at hand (decided once per batch bucket, device and dtype).

Sizes that cannot be split into the asked number of modes can be zero-padded (``pad=True``):
the modes then multiply to ``padded_in >= in_features`` (``padded_out >= out_features``); inputs
are zero-padded and outputs sliced, so the padding never shows outside.
"""

from __future__ import annotations

import math
import operator
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import wisdom
from ..contraction import ContractionPlan, batch_bucket, plan_contraction
from ..decompositions import parameter_limit, rank_for_keep, resolve_eps, resolve_keep
from ..plans import (STRATEGIES, ContractPlan, EinsumPlan, Plan, RebuildPlan, Timer, cheapest, check_strategy,
                     default_timer, get_strategy, time_once)
from ..shapes import check_weight, factorize, padded_size, validate_modes

__all__ = ["Factorization", "EinsumFactorization", "RankSpec", "normalize_rank", "budget_limit", "traffic_weight", "TRAFFIC_WEIGHT"]

RankSpec = int | Sequence[int] | None


def normalize_rank(rank: int | Sequence[int], argument: str = "rank") -> int | tuple[int, ...]:
    """``rank`` as a Python int or a tuple of ints; integer-valued numpy / torch scalars are accepted.

    Raises ``TypeError`` naming ``argument`` for anything else (floats, strings, bools): a rank is
    never rounded, since ``3.7 -> 3`` would silently change the model.
    """
    def one(r: object) -> int:
        if isinstance(r, (bool, float, str, bytes)) or (isinstance(r, torch.Tensor) and r.is_floating_point()):
            raise TypeError(f"{argument}={rank!r}: ranks must be ints, got {type(r).__name__} {r!r}")
        try:
            return operator.index(r)
        except TypeError:
            raise TypeError(f"{argument}={rank!r}: ranks must be ints, got {type(r).__name__} {r!r}") from None

    if isinstance(rank, (str, bytes)) or not hasattr(rank, "__iter__") or getattr(rank, "ndim", None) == 0:  # 0-d arrays
        return one(rank)
    return tuple(one(r) for r in rank)


#: FLOPs that moving one element costs, per device type: the cost of a strategy is
#: ``flops + weight * traffic``. FLOPs alone pick the contraction for MPO 4096^2 (r = 16, 32) at
#: B = 512, which is slower than rebuild + GEMM on CPU: its intermediates (B x 64 x 64 x r
#: elements) outweigh W and every pairwise step permutes them. The CPU value is the GEMM FLOP
#: rate over the time per element moved measured on this project's CPUs (timings:
#: benchmarks/results/layers.md). The CUDA value is the middle of the weights that pick the
#: fastest forced plan on the most rows of an H200's plan tables (w in 33..41 gets 117 of 144
#: rows right, the earlier guess of 64 from peak specs 115: "Traffic weight fit" in
#: benchmarks/results/layers_cuda.md). There every plan took 0.1-0.5 ms, launch bound: the
#: number of kernels, which the two terms do not count, often decided.
#: Where the formula is wrong for a machine, ``strategy="measure"`` (:mod:`tensornets.plans`)
#: times the candidates instead.
TRAFFIC_WEIGHT = {"cpu": 384, "cuda": 37}

#: ``strategy="measure"`` times only the candidates whose formula cost is within this factor of the cheapest one's.
#: The measured winner's cost was within 1.9x (forward) and 2.1x (training step) of the cheapest on every size, rank,
#: batch and format of benchmarks/results/layers.md; on a large bucket a plan that far behind takes seconds and
#: gigabytes per call. Plans the formula underrates are cut short by :data:`PROBE_FACTOR` instead.
MEASURE_CUTOFF = 4.0
#: while measuring, a candidate whose second call takes over this factor times the fastest candidate timed so far is
#: recorded at that call and not sampled further
PROBE_FACTOR = 2.0


def traffic_weight(device_type: str) -> int:
    """FLOP-equivalent cost of one element of memory traffic on ``device_type`` (default: the CUDA value)."""
    return TRAFFIC_WEIGHT.get(device_type, TRAFFIC_WEIGHT["cuda"])


def _autocast_takes(x: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``x``'s device and casts ``x`` (a floating dtype other than float64,
    as autocast's own eligibility rule): the products then run in the autocast dtype whatever the cores' dtype."""
    device = x.device.type
    return (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and x.is_floating_point() and x.dtype != torch.float64)


def _warn_strategy_not_a_plan(strategy: str, format_name: str, names: list[str]) -> None:
    # the same text for every layer of a format: Python's warning registry shows it once
    warnings.warn(f"tensornets.set_strategy({strategy!r}): {format_name} has no such plan (its plans are "
                  f"{list(names)}), so its layers choose by the formula; force a plan per layer with "
                  "layer.factorization.set_strategy(...)", UserWarning, stacklevel=4)


def _check_batch(batch: int) -> None:
    """A batch size an int >= 1 (the planning methods' argument; the forward reads it from ``x``)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an int >= 1 (rows of x)")


def budget_limit(keep: float, in_features: int, out_features: int) -> int:
    """The parameter budget of ``keep`` (a fraction of ``in * out``), rounded down (:func:`~tensornets.decompositions.parameter_limit`)."""
    return parameter_limit(keep, in_features * out_features)


class Factorization(nn.Module, ABC):
    """An ``(out, in)`` matrix stored as cores, applied as ``x -> x W^T``.

    Subclasses define the cores, their parameter count, the contraction and the decomposition.

    Every format's constructor takes the attributes below, ``(in_features, out_features, *, in_modes, out_modes,
    ranks)``, exactly (checked: the modes multiply to at least the features and fit the format, one positive rank per
    bond or mode) and allocates zero cores. Build one with :meth:`from_dense` (a decomposition), :meth:`empty` + an init
    (:func:`tensornets.init_factorization_`), or :meth:`resolve_structure` to get the modes and ranks of a budget.

    Attributes
    ----------
    in_features, out_features : int
        The shape of the represented matrix ``W: (out_features, in_features)``.
    in_modes, out_modes : tuple of int
        Mode sizes; ``prod(in_modes) >= in_features`` (equal unless padded).
    ranks : tuple of int
        The format's ranks (bond dimensions, Tucker ranks, or the one low-rank rank).
    """

    format_name: ClassVar[str] = ""
    #: whether ``from_dense(svd="randomized")`` changes anything (its SVDs are large enough)
    supports_randomized_svd: ClassVar[bool] = False
    #: whether ``from_dense`` draws from ``seed`` whatever ``svd`` is (CP's ALS initialisation)
    seeded_decomposition: ClassVar[bool] = False
    #: number of modes per side when ``num_cores`` and ``modes`` are both omitted
    default_num_cores: ClassVar[int] = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if self.in_features < 1 or self.out_features < 1:  # modes of any product would "cover" a size <= 0
            raise ValueError(f"in_features={self.in_features} and out_features={self.out_features} must be >= 1")
        self.in_modes = validate_modes(in_modes, self.in_features, "in_modes")
        self.out_modes = validate_modes(out_modes, self.out_features, "out_modes")
        self._check_modes(self.in_modes, self.out_modes)
        full = self.full_ranks(self.in_modes, self.out_modes)
        if len(ranks) != len(full) or any(isinstance(r, bool) or int(r) != r or r < 1 for r in ranks):
            raise ValueError(f"ranks={tuple(ranks)} must be {len(full)} positive int(s) for {self.format_name} with "
                             f"out_modes={self.out_modes}, in_modes={self.in_modes} (full ranks {full}); "
                             "resolve_structure gives valid ones")
        self._ranks = tuple(int(r) for r in ranks)
        #: this layer's strategy (None: the process-wide one, :func:`tensornets.set_strategy`)
        self.plan_strategy: str | None = None
        # (bucket, device, dtype, strategy, traced) -> the chosen plan
        self._plans: dict[tuple[int, str, str, str, bool], Plan] = {}

    # ------------------------------------------------------------------ format hooks
    @classmethod
    @abstractmethod
    def parameter_count(cls, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
        """Number of parameters of this format for the given modes and ranks (the one formula)."""

    @classmethod
    @abstractmethod
    def full_ranks(cls, in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
        """The smallest ranks that represent every matrix of these modes exactly."""

    @classmethod
    @abstractmethod
    def _decompose(
        cls,
        weight: torch.Tensor,
        in_modes: tuple[int, ...],
        out_modes: tuple[int, ...],
        ranks: tuple[int, ...],
        eps: float | None,
        svd: str,
        seed: int,
        **options: Any,
    ) -> dict[str, torch.Tensor]:
        """Cores of ``weight: (prod(out_modes), prod(in_modes))`` keyed by parameter name."""

    @abstractmethod
    def _contract(self, x: torch.Tensor, plan: Plan | ContractionPlan | None) -> torch.Tensor:
        """``(B, padded_in) -> (B, padded_out)`` through the factors (``plan``: a contraction candidate, or None)."""

    @abstractmethod
    def _contract_cost(self, batch: int) -> tuple[int, int]:
        """``(flops, traffic)`` of :meth:`_contract` for ``batch`` rows (traffic in elements moved)."""

    @abstractmethod
    def _dense(self) -> torch.Tensor:
        """The padded matrix ``(padded_out, padded_in)``."""

    @abstractmethod
    def _rebuild_cost(self) -> tuple[int, int]:
        """``(flops, traffic)`` of :meth:`_dense`."""

    @abstractmethod
    def init_chain(self) -> tuple[list[nn.Parameter], int]:
        """Factors multiplied into each dense entry, and how many rank terms are summed per entry.

        Used by :func:`tensornets.init.init_factorization_`: an entry of ``W`` is a sum of
        ``num_terms`` products of one entry from each factor.
        """

    def _contract_candidates(self, batch: int) -> list[Plan]:
        """The contractions through the cores for ``batch`` rows (default: the format's one ``_contract``, whose
        backward :class:`~tensornets.plans.Plan` estimates as twice its forward)."""
        flops, traffic = self._contract_cost(batch)
        return [ContractPlan("contract", flops, traffic)]

    def _rebuild_backward_cost(self) -> tuple[int, int]:
        """``(flops, traffic)`` of the backward of :meth:`_dense` (``∂W`` to the cores); default twice the forward."""
        flops, traffic = self._rebuild_cost()
        return 2 * flops, 2 * traffic

    # ------------------------------------------------------------------ derived quantities
    @property
    def ranks(self) -> tuple[int, ...]:
        """The bond / mode ranks, in the format's order (see each format's docstring)."""
        return self._ranks

    @property
    def modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(out_modes, in_modes)``."""
        return self.out_modes, self.in_modes

    @property
    def padded_in(self) -> int:
        """``prod(in_modes)``: ``in_features`` plus the zero padding of ``pad=True`` (inputs are padded to it)."""
        return math.prod(self.in_modes)

    @property
    def padded_out(self) -> int:
        """``prod(out_modes)``: ``out_features`` plus the zero padding of ``pad=True`` (outputs are cut back)."""
        return math.prod(self.out_modes)

    @property
    def num_parameters(self) -> int:
        """Parameters of the cores (what is stored and trained)."""
        return self.parameter_count(self.in_modes, self.out_modes, self.ranks)

    # ------------------------------------------------------------------ plans
    def _rebuild_candidate(self, batch: int) -> RebuildPlan:
        """Rebuild ``W`` (:meth:`_dense`), then one GEMM of ``batch`` rows."""
        flops, traffic = self._rebuild_cost()
        back_flops, back_traffic = self._rebuild_backward_cost()
        dense = self.padded_in * self.padded_out
        n_in, n_out = batch * self.padded_in, batch * self.padded_out
        # backward of the GEMM: ∂x = ∂y W and ∂W = ∂yᵀ x (∂y, W, x read; ∂x, ∂W written), then ∂W to the cores
        return RebuildPlan("rebuild", flops + 2 * batch * dense, traffic + dense + n_in + n_out,
                           backward_flops=back_flops + 4 * batch * dense,
                           backward_traffic=back_traffic + n_out + 2 * n_in + 2 * dense)

    def _candidates(self, batch: int) -> list[Plan]:
        """Every plan that can run ``forward`` on ``batch`` rows; rebuild first (ties go to it)."""
        return [self._rebuild_candidate(batch), *self._contract_candidates(batch)]

    def _contract_plan(self, bucket: int) -> Plan:
        """The contraction candidate the formula prefers for ``bucket`` rows."""
        return cheapest(self._contract_candidates(bucket), traffic_weight(self._device_type()))

    def _strategy_costs(self, batch: int) -> dict[str, tuple[int, int]]:
        """``(flops, traffic)`` of rebuild + GEMM and of the formula's best contraction, for ``batch`` rows."""
        rebuild, *contract = self._candidates(batch)
        best = cheapest(contract, traffic_weight(self._device_type()))
        return {"contract": (best.flops, best.traffic), "rebuild": (rebuild.flops, rebuild.traffic)}

    def flops(self, batch: int, grad: bool = False) -> int:
        """FLOPs of ``forward`` on ``batch`` rows, for the plan it uses (see :meth:`strategy`).

        ``grad=True``: forward + backward FLOPs (gradients of the input and every core) of the plan a
        forward that autograd records uses, i.e. the model's cost of one training step of the layer.
        """
        _check_batch(batch)
        label = self._plan(batch_bucket(batch), grad=grad).label
        plan = next(c for c in self._candidates(batch) if c.label == label)
        return plan.flops + plan.backward_flops if grad else plan.flops

    def uses_rebuild(self, batch: int) -> bool:
        """Whether ``forward`` on ``batch`` rows rebuilds ``W`` and runs one GEMM."""
        return self._plan(batch_bucket(batch)).name == "rebuild"

    def strategy(self, batch: int, grad: bool = False) -> str:
        """How ``forward`` runs on ``batch`` rows: ``"rebuild"`` (``W``, then one GEMM), ``"einsum"``
        (one planned einsum over the cores), ``"split"`` (MPO: two GEMMs around a bond) or
        ``"contract"`` (the format's hand-written contraction: low rank, BTT).

        ``grad=True``: the plan of a forward that autograd records (training), chosen on the cost of
        forward + backward; without it, of a forward under ``torch.no_grad`` or of frozen cores and input.
        """
        _check_batch(batch)
        return self._plan(batch_bucket(batch), grad=grad).name

    def set_strategy(self, strategy: str | None) -> "Factorization":
        """Choose how this layer picks its plan: ``"formula"``, ``"measure"``, a candidate name, or
        ``None`` to follow :func:`tensornets.set_strategy`. Returns ``self``. See :mod:`tensornets.plans`."""
        strategy = check_strategy(strategy)
        if strategy is not None and strategy not in STRATEGIES:
            names = sorted({c.name for c in self._candidates(1)})
            if strategy not in names:
                raise ValueError(f"strategy={strategy!r} is not a plan of {self.format_name}; its plans are {names}, "
                                 "or 'formula' / 'measure'")
        self.plan_strategy = strategy
        return self

    def tune(self, batches: Sequence[int], timer: Timer | None = None, grad: bool = False) -> dict[int, str]:
        """Measure every candidate plan for the buckets of ``batches`` now, record the winners in the
        wisdom file (:mod:`tensornets.wisdom`), and switch this layer to ``strategy="measure"``.

        Use it before ``torch.compile`` (tracing cannot measure) or to refresh old wisdom.
        ``timer(fn)`` returns seconds per call of ``fn`` (default :func:`tensornets.plans.default_timer`).
        ``grad=True`` measures the plans of training (forward + backward of the input and every core),
        which a forward autograd records uses; without it, those of inference.
        Returns ``{bucket: winning plan label}``.
        """
        self.set_strategy("measure")
        device, dtype = self._planning_target()
        chosen = {}
        for batch in batches:
            bucket = batch_bucket(int(batch))
            plan = self._measure(bucket, device, dtype, timer or default_timer, grad)
            self._plans[(bucket, str(device), str(dtype), "measure", False, grad)] = plan
            chosen[bucket] = plan.label
        _forget_traced_plans()  # the next trace reads the new wisdom
        return chosen

    def _plan_structure(self) -> tuple:
        """What a plan choice depends on: format class, sizes, modes, ranks, device, dtype and strategy."""
        ref = next(self.parameters())
        return (type(self), self.in_features, self.out_features, self.in_modes, self.out_modes, self.ranks,
                ref.device, ref.dtype, self.plan_strategy or get_strategy())

    def _planning_target(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype plans are chosen for: the cores', or those a shape-only stand-in plans for."""
        ref = next(self.parameters())
        return getattr(self, "_planning_device", ref.device), ref.dtype

    def _plan(self, bucket: int, traced: bool = False, grad: bool = False) -> Plan:
        """The plan ``forward`` runs on ``bucket`` rows (chosen once, then cached); ``grad``: of a forward
        autograd records, chosen on forward + backward."""
        device, dtype = self._planning_target()
        strategy = self.plan_strategy or get_strategy()
        key = (bucket, str(device), str(dtype), strategy, traced, grad)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._choose(bucket, device, dtype, strategy, not traced, grad)
        return plan

    def _choose(self, bucket: int, device: torch.device, dtype: torch.dtype, strategy: str, can_measure: bool,
                grad: bool) -> Plan:
        weight = traffic_weight(device.type)
        if strategy == "formula":
            return cheapest(self._candidates(bucket), weight, grad=grad)
        if strategy == "measure":
            known = self._known(bucket, device, dtype, grad)
            if known is not None:
                return known
            if not can_measure or device.type == "meta":
                return cheapest(self._candidates(bucket), weight, grad=grad)
            return self._measure(bucket, device, dtype, default_timer, grad)
        forced = [c for c in self._candidates(bucket) if c.name == strategy]
        if not forced:
            names = sorted({c.name for c in self._candidates(bucket)})
            if self.plan_strategy is None:  # the process-wide choice: it forces the formats that have that plan
                _warn_strategy_not_a_plan(strategy, self.format_name, names)
                return cheapest(self._candidates(bucket), weight, grad=grad)
            raise ValueError(f"strategy={strategy!r} is not a plan of {self.format_name}; its plans are {names}")
        return cheapest(forced, weight, grad=grad)

    def _wisdom_key(self, bucket: int, device: torch.device, dtype: torch.dtype, grad: bool = False) -> str:
        return wisdom.entry_key(self.format_name, self.out_modes, self.in_modes, self.ranks, bucket, device, dtype,
                                grad=grad)

    def _known(self, bucket: int, device: torch.device, dtype: torch.dtype, grad: bool = False) -> Plan | None:
        """The candidate the wisdom file names for this layer and bucket, if any."""
        entry = wisdom.lookup(self._wisdom_key(bucket, device, dtype, grad))
        if entry is None:
            return None
        return next((c for c in self._candidates(bucket) if c.label == entry["plan"]), None)

    def _measure(self, bucket: int, device: torch.device, dtype: torch.dtype, timer: Timer, grad: bool = False) -> Plan:
        """Time the candidates on ``bucket`` random rows, record the fastest, return it.

        ``grad``: time forward + backward (gradients of the input and of the cores that require grad). Candidates whose formula
        cost is over :data:`MEASURE_CUTOFF` times the cheapest one's are not timed (on a large bucket such a plan
        takes seconds and its intermediates gigabytes, and the formula's ranking is never that far off); the others
        are timed cheapest first, and one whose second call is over :data:`PROBE_FACTOR` times slower than the
        fastest so far keeps that call's time.
        """
        weight = traffic_weight(device.type)
        candidates = self._candidates(bucket)
        least = min(c.cost(weight, grad) for c in candidates)
        candidates = [c for c in candidates if c.cost(weight, grad) <= MEASURE_CUTOFF * least]
        # a private generator: measuring inside a forward must not move the caller's random stream
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(bucket, self.padded_in, device=device, dtype=dtype, generator=gen)
        if grad:
            x.requires_grad_(True)
            wrt = (x, *(p for p in self.parameters() if p.requires_grad))  # frozen cores have no gradient
            dy = torch.randn(bucket, self.padded_out, device=device, dtype=dtype, generator=gen)

            def run(c: Plan) -> object:
                with torch.enable_grad():  # timers run the call under no_grad
                    return torch.autograd.grad(c.apply(self, x), wrt, dy, allow_unused=True)
        else:
            def run(c: Plan) -> object:
                return c.apply(self, x)
        seconds: dict[str, float] = {}
        fastest = math.inf
        for c in sorted(candidates, key=lambda c: c.cost(weight, grad)):  # the likely winner first
            if seconds:
                # a plan already PROBE_FACTOR x slower than the fastest so far on its second call is not sampled
                # further (the first call pays for fresh memory, several times a later call's time on a large MPO split)
                time_once(lambda c=c: run(c))
                once = time_once(lambda c=c: run(c))
                if once > PROBE_FACTOR * fastest:
                    seconds[c.label] = once
                    continue
            seconds[c.label] = float(timer(lambda c=c: run(c)))
            fastest = min(fastest, seconds[c.label])
        best = min(candidates, key=lambda c: seconds[c.label])  # ties: the earliest (rebuild first)
        wisdom.record(self._wisdom_key(bucket, device, dtype, grad), best.label, seconds)
        return best

    def _device_type(self) -> str:
        return self._planning_target()[0].type

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this module's structure (see :mod:`tensornets.io`)."""
        return {
            "format": self.format_name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "ranks": list(self.ranks),
        }

    def to_tensorly(self) -> Any:
        """This factorization as tensorly's ``TuckerTensor``, ``TTTensor``, ``TTMatrix`` or ``CPTensor``
        (detached tensors sharing storage); see :mod:`tensornets.tensorly_interop`."""
        from ..tensorly_interop import to_tensorly  # tensorly loads only when interop is used

        return to_tensorly(self)

    @classmethod
    def from_tensorly(cls, obj: Any, **kwargs: Any) -> "Factorization":
        """A factorization copied from a tensorly factorized tensor; ``Factorization.from_tensorly`` picks
        the format from ``type(obj)``, a subclass reads its own. ``kwargs``: ``num_out_modes``,
        ``in_features``, ``out_features`` (see :func:`tensornets.tensorly_interop.from_tensorly`)."""
        from ..tensorly_interop import from_tensorly

        return from_tensorly(obj, None if cls is Factorization else cls, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"out_modes={self.out_modes}, in_modes={self.in_modes}, ranks={self.ranks}, "
            f"params={self.num_parameters}"
        )

    # ------------------------------------------------------------------ apply
    def to_dense(self) -> torch.Tensor:
        """The represented matrix ``W: (out_features, in_features)``."""
        return self._dense()[: self.out_features, : self.in_features]

    def __prepare_scriptable__(self) -> "Factorization":
        """Refuse ``torch.jit.script`` with the fix (TorchScript's own error pointed at a list comprehension)."""
        raise TypeError(f"torch.jit.script cannot compile a tensornets {type(self).__name__}: it picks its contraction "
                        "plan in Python at run time; use torch.compile, torch.export or torch.jit.trace, which record "
                        "the plan's ops")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T``: ``(..., in_features) -> (..., out_features)``."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        # no rows: the one-row plan still runs, so that y keeps its graph and backward gives zero
        # gradients, as nn.Linear does
        # (int(): torch.jit.trace records sizes as tensors; its graph is fixed to this batch's plan anyway)
        batch = max(int(x2.shape[0]), 1) if torch.jit.is_tracing() else max(x2.shape[0], 1)
        # a forward autograd records (training) runs the plan of least forward + backward cost. torch.jit.trace
        # (a tool for deploying inference) records the inference plan, with or without grad: its check traces
        # again under no_grad and must find the same graph
        grad = (torch.is_grad_enabled() and not torch.jit.is_tracing()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        if torch.compiler.is_dynamo_compiling():
            # Choosing a plan searches einsum paths (opt_einsum), which dynamo cannot trace: it runs
            # eagerly at trace time, and the graph holds only the chosen plan's ops. The batch is
            # compared only with the buckets where the traced ops change (each comparison of a
            # symbolic batch is a guard, i.e. one more graph), not with every power of two.
            # Plans are chosen for the layer's structure, not the layer: dynamo then guards on sizes, modes,
            # ranks, device, dtype and strategy, so every layer of one structure shares the compiled code
            # (compiling the blocks of a model one by one would otherwise recompile per layer).
            structure = self._plan_structure()
            bucket = next((b for b in _traced_change_points(structure, grad) if batch <= b), TRACED_MAX_BUCKET)
            plan = getattr(_TRACED_PLANS, _traced_plan_key(structure, bucket, grad))
        elif torch.compiler.is_compiling():
            # Traced without dynamo (non-strict torch.export): Python runs as in eager mode, on fake tensors, so
            # the layer plans for itself (a meta stand-in cannot be built inside such a trace); nothing is timed,
            # and the batch is compared only with the change points, as under dynamo.
            bucket = next((b for b in _change_points(self, grad) if batch <= b), TRACED_MAX_BUCKET)
            plan = self._plan(bucket, traced=True, grad=grad)
        else:
            plan = self._plan(batch_bucket(batch), grad=grad)
        y = plan.apply(self, x2)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; convert it with torch.as_tensor(x)")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; its last dimension must be in_features={self.in_features}"
            )
        ref = next(self.parameters())
        # under torch.autocast the products run in the autocast dtype whatever the cores' and x's dtypes, as for
        # nn.Linear: a float32 activation (from a norm autocast keeps in float32) reaches a bfloat16 layer
        if x.dtype != ref.dtype and not _autocast_takes(x):
            raise TypeError(f"x has dtype {x.dtype} but the {self.format_name} cores are {ref.dtype}; cast x or .to() the module")
        if x.device != ref.device:
            raise ValueError(f"x is on {x.device} but the {self.format_name} cores are on {ref.device}; move one of them")

    # ------------------------------------------------------------------ construction
    @classmethod
    def resolve_modes(
        cls,
        in_features: int,
        out_features: int,
        num_cores: int | None = None,
        modes: tuple[Sequence[int], Sequence[int]] | None = None,
        pad: bool = False,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in_modes, out_modes)`` from explicit ``modes=(out_modes, in_modes)`` or ``num_cores``.

        ``num_cores`` is the number of modes each side is split into (an MPO's core count).
        """
        if not isinstance(pad, bool):  # a string "no" is truthy
            raise TypeError(f"pad={pad!r} must be True or False")
        if modes is not None:
            if num_cores is not None:
                raise ValueError("pass num_cores= or modes=, not both")
            if len(modes) != 2:
                raise ValueError(f"modes must be (out_modes, in_modes), got {modes!r}")
            out_modes = validate_modes(modes[0], out_features, "modes[0] (out_modes)")
            in_modes = validate_modes(modes[1], in_features, "modes[1] (in_modes)")
        else:
            k = cls.default_num_cores if num_cores is None else num_cores
            if isinstance(k, bool) or not hasattr(type(k), "__index__"):
                raise TypeError(f"num_cores={num_cores!r} must be an int (the modes each side is split into)")
            k = operator.index(k)
            if k < 1:
                raise ValueError(f"num_cores={num_cores!r} must be >= 1 (the modes each side is split into)")
            sizes = []
            for n, name in ((in_features, "in_features"), (out_features, "out_features")):
                m = padded_size(n, k) if pad else n
                try:
                    sizes.append(factorize(m, k))
                except ValueError as exc:
                    raise ValueError(f"{name}={n}: {exc}") from None
            in_modes, out_modes = sizes
        cls._check_modes(in_modes, out_modes)
        return tuple(in_modes), tuple(out_modes)

    @classmethod
    def _check_modes(cls, in_modes: tuple[int, ...], out_modes: tuple[int, ...]) -> None:
        """Format-specific constraints on the modes (e.g. MPO needs as many on each side)."""

    @classmethod
    def resolve_ranks(cls, rank: RankSpec, in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
        """Turn ``rank`` (an int for all, or one per rank slot) into explicit ranks.

        An int larger than every full rank does not fit and raises; otherwise each slot is
        ``min(rank, full)``, which is lossless (the full rank already represents any matrix).
        An explicit list must fit slot by slot.
        """
        full = cls.full_ranks(in_modes, out_modes)
        rank = normalize_rank(rank)
        if isinstance(rank, int):
            if rank < 1 or rank > max(full):
                raise ValueError(
                    f"rank={rank} does not fit the {cls.format_name} format with out_modes={tuple(out_modes)}, "
                    f"in_modes={tuple(in_modes)}: pass 1 <= rank <= {max(full)} (full ranks {full}) or eps=/keep="
                )
            return tuple(min(rank, f) for f in full)
        ranks = rank
        if len(ranks) != len(full):
            raise ValueError(f"rank={ranks} needs {len(full)} entries for {cls.format_name} (full ranks {full})")
        bad = [i for i, (r, f) in enumerate(zip(ranks, full)) if not 1 <= r <= f]
        if bad:
            raise ValueError(f"rank={ranks} exceeds the full ranks {full} at positions {bad}; lower those entries")
        return ranks

    @classmethod
    def rank_for_keep(
        cls, keep: float, in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int]
    ) -> int:
        """Largest uniform rank whose parameter count is ``<= keep * in_features * out_features``
        (:func:`tensornets.decompositions.rank_for_keep` with this format's count)."""
        count = lambda r: cls.parameter_count(in_modes, out_modes, cls.resolve_ranks(r, in_modes, out_modes))
        rank = rank_for_keep(keep, in_features * out_features, count, max(cls.full_ranks(in_modes, out_modes)))
        if rank == 0:
            raise ValueError(
                f"keep={keep} keeps {budget_limit(keep, in_features, out_features)} parameters but {cls.format_name} "
                f"at rank 1 needs {count(1)}; raise keep or use fewer/other modes"
            )
        return rank

    @classmethod
    def rank_for_budget(
        cls, budget: float, in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int]
    ) -> int:
        """Deprecated name of :meth:`rank_for_keep` (removed in the next release)."""
        keep = resolve_keep(None, budget, f"{cls.__name__}.rank_for_budget")
        return cls.rank_for_keep(keep, in_features, out_features, in_modes, out_modes)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "Factorization":
        """A module of the given structure with zero cores (fill it with init or load_state_dict).

        Built under accelerate's ``init_empty_weights`` (PEFT's ``low_cpu_mem_usage=True``) its cores
        stay on the meta device whatever ``device`` says: there is nothing to copy, the loader assigns
        the real tensors.
        """
        module = cls(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        if any(p.is_meta for p in module.parameters()):
            device = "meta"
        return module.to(dtype=dtype or torch.get_default_dtype(), device=device)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        rank: RankSpec = None,
        eps: float | None = None,
        energy: float | None = None,
        keep: float | None = None,
        num_cores: int | None = None,
        modes: tuple[Sequence[int], Sequence[int]] | None = None,
        svd: str = "full",
        seed: int = 0,
        pad: bool = False,
        budget: float | None = None,
        **options: Any,
    ) -> "Factorization":
        """Decompose ``weight: (out, in)`` into this format.

        Parameters
        ----------
        weight : Tensor, shape (out, in)
            A finite floating matrix (e.g. ``nn.Linear.weight``). float16 / bfloat16 weights are
            decomposed in float32 and the cores cast back (the same cores as decomposing
            ``weight.float()`` and casting); cores beyond float16's range raise ``ValueError``.
        rank : int or sequence of int, optional
            Maximum ranks (see :meth:`resolve_ranks`).
        eps, energy : float, optional
            Relative Frobenius error target (``energy`` = fraction of ``||W||^2`` kept,
            ``eps = sqrt(1 - energy)``); combined with ``rank``, the smaller rank wins.
        keep : float, optional
            Fraction of the dense parameter count kept: the largest uniform rank that fits
            (:meth:`rank_for_keep`).
        num_cores : int, optional
            Modes per side (balanced, :func:`tensornets.factorize`).
        modes : (sequence of int, sequence of int), optional
            ``(out_modes, in_modes)`` explicitly, instead of ``num_cores``; their products are the
            (padded) sizes.
        svd : {"full", "randomized"}
            SVD used inside the decomposition (randomized: lowrank, TT and MPO only).
        seed : int
            Seed of the randomized SVD and of CP's ALS initialisation (decompositions are deterministic).
        pad : bool
            Zero-pad sizes that cannot be split (primes) to the next size that can.
        budget : float, optional
            Deprecated name of ``keep`` (DeprecationWarning; removed in the next release).
        **options
            Format-specific options (Tucker: ``algorithm="hosvd" | "hooi"``; CP: ``init``,
            ``n_iter_max``, ``tol``).
        """
        check_weight(weight, "weight")
        if svd not in ("full", "randomized"):
            raise ValueError(f"svd={svd!r} must be 'full' or 'randomized'")
        if svd == "randomized" and not cls.supports_randomized_svd:
            raise ValueError(
                f"svd='randomized' does not apply to {cls.format_name}: only lowrank, tt and mpo run large SVDs that a "
                f"randomized one speeds up; use svd='full'"
            )
        out_features, in_features = weight.shape
        keep = resolve_keep(keep, budget, f"{cls.format_name}.from_dense")
        in_modes, out_modes, ranks = cls.resolve_structure(
            in_features, out_features, rank=rank, eps=eps, energy=energy, keep=keep, num_cores=num_cores, modes=modes,
            pad=pad,
        )
        eps = resolve_eps(eps, energy)
        # Half precision SVDs are unsupported/inaccurate: decompose in fp32 (fp64 stays fp64).
        work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        padded = F.pad(work, (0, math.prod(in_modes) - in_features, 0, math.prod(out_modes) - out_features))
        tensors = cls._decompose(padded, in_modes, out_modes, ranks, eps, svd, seed, **options)
        module = cls(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=cls._ranks_of(tensors, ranks))
        module.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, tensor in tensors.items():
                module.get_parameter(name).copy_(tensor)
        if work.dtype != weight.dtype:
            cls._check_cast(tensors, module, weight.dtype)
        return module

    @classmethod
    def _check_cast(cls, tensors: dict[str, torch.Tensor], module: "Factorization", dtype: torch.dtype) -> None:
        """Refuse cores that overflow the weight's half-precision dtype: some formats put the whole norm of ``W`` in
        one core (Tucker's core, TT's last core), so a weight whose largest singular value exceeds float16's range
        gives inf cores although every entry of ``W`` fits."""
        bad = [name for name in tensors if not bool(torch.isfinite(module.get_parameter(name)).all())]
        if bad:
            largest = max(float(tensors[name].abs().max()) for name in bad)
            raise ValueError(
                f"{cls.format_name}: decomposed in float32, the cores {bad} have entries up to {largest:.3g}, beyond "
                f"{dtype}'s range ({torch.finfo(dtype).max:.3g}); decompose a float32 copy of the weight "
                "(weight.float()) and keep the layer in float32 or bfloat16, or scale the weight down"
            )

    @classmethod
    def resolve_structure(
        cls,
        in_features: int,
        out_features: int,
        *,
        rank: RankSpec = None,
        eps: float | None = None,
        energy: float | None = None,
        keep: float | None = None,
        num_cores: int | None = None,
        modes: tuple[Sequence[int], Sequence[int]] | None = None,
        pad: bool = False,
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(in_modes, out_modes, ranks)`` that :meth:`from_dense` would use for an ``(out, in)`` weight.

        No weight is read, so it costs nothing: it checks a size request (the arguments of
        :meth:`from_dense`) before any decomposition, e.g. on every layer of a model before the first
        is replaced, and raises the same ``ValueError`` as :meth:`from_dense`. ``ranks`` are the
        maximum ranks; an ``eps`` / ``energy`` target may truncate below them.
        """
        in_modes, out_modes = cls.resolve_modes(in_features, out_features, num_cores, modes, pad)
        eps = resolve_eps(eps, energy)
        if keep is not None:
            if rank is not None:
                raise ValueError(f"pass rank={rank} or keep={keep}, not both")
            rank = cls.rank_for_keep(keep, in_features, out_features, in_modes, out_modes)
        if rank is None and eps is None:
            raise ValueError(f"{cls.format_name}.from_dense needs rank=, eps=, energy= or keep=")
        ranks = cls.resolve_ranks(rank if rank is not None else max(cls.full_ranks(in_modes, out_modes)), in_modes, out_modes)
        return in_modes, out_modes, ranks

    @classmethod
    def _ranks_of(cls, tensors: dict[str, torch.Tensor], requested: tuple[int, ...]) -> tuple[int, ...]:
        """Ranks actually produced by :meth:`_decompose` (eps may truncate below ``requested``)."""
        return requested


#: the largest batch bucket distinguished under ``torch.compile``; larger batches run its plan
TRACED_MAX_BUCKET = 1 << 20


class _PlanTable:
    """Plans chosen while tracing: attributes ``plan_<n>``, one per (structure, bucket, grad) (:func:`_traced_plan_key`).

    Attributes, not a dict: dynamo copies a dict once per trace, so a plan added by a later layer of the same
    trace (another structure) would be missing from its copy; an attribute is read from the object each time.
    """


_TRACED_PLANS = _PlanTable()
#: (structure, bucket, grad) -> the name of its plan in ``_TRACED_PLANS``
_TRACED_NAMES: dict[tuple, str] = {}
#: one shape-only stand-in (meta cores) per structure, that plans for the structure's device and dtype
_STAND_INS: dict[tuple, Factorization] = {}


def _stand_in(structure: tuple) -> Factorization:
    """A meta-device module of ``structure`` (format class, sizes, modes, ranks, device, dtype, strategy) that
    chooses plans as a layer of that structure would, without holding any layer."""
    module = _STAND_INS.get(structure)
    if module is None:
        cls, in_features, out_features, in_modes, out_modes, ranks, device, dtype, strategy = structure
        module = cls.empty(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks,
                           dtype=dtype, device="meta")
        module._planning_device = device
        module.plan_strategy = strategy
        _STAND_INS[structure] = module
    return module


def _forget_traced_plans() -> None:
    """Drop the plans chosen while tracing (after new measurements); compiled graphs keep theirs."""
    _TRACED_PLANS.__dict__.clear()
    _TRACED_NAMES.clear()
    _STAND_INS.clear()


@torch.compiler.assume_constant_result
def _traced_change_points(structure: tuple, grad: bool) -> tuple[int, ...]:
    """The buckets ``b`` (powers of two up to :data:`TRACED_MAX_BUCKET`, ascending) after which the
    plan's traced ops change (:attr:`Plan.graph_key <tensornets.plans.Plan.graph_key>` of bucket
    ``b`` differs from bucket ``2b``'s), then ``TRACED_MAX_BUCKET``.

    Under ``torch.compile`` a batch is placed by comparing it with these alone, so a layer whose plan
    is the same from 2 rows to a million compiles one graph for a dynamic batch, not one per power of
    two (dynamo's ``recompile_limit``, 8 by default, would stop it at the 9th).
    """
    return _change_points(_stand_in(structure), grad)


def _change_points(planner: Factorization, grad: bool) -> tuple[int, ...]:
    """The buckets after which ``planner``'s traced plan changes, then ``TRACED_MAX_BUCKET``
    (see :func:`_traced_change_points`)."""
    buckets = [1 << k for k in range(TRACED_MAX_BUCKET.bit_length())]
    keys = [planner._plan(b, traced=True, grad=grad).graph_key for b in buckets]
    return (*(b for b, k, nxt in zip(buckets, keys, keys[1:]) if k != nxt), TRACED_MAX_BUCKET)


@torch.compiler.assume_constant_result
def _traced_plan_key(structure: tuple, bucket: int, grad: bool) -> str:
    """Choose the plan of layers of ``structure`` for ``bucket`` rows while ``torch.compile`` traces a forward.

    Dynamo calls this eagerly at trace time (``assume_constant_result``) and bakes the returned name
    into the graph; the plan itself is then read as that attribute of ``_TRACED_PLANS``. Its inputs are
    the layer's structure, not the layer, so dynamo guards on the structure and layers alike share
    compiled code. Wisdom is used when ``strategy="measure"``, but nothing is timed while tracing
    (the formula decides where nothing was measured: call :meth:`Factorization.tune` before
    compiling). Changing the strategy after compiling takes a recompile (``torch._dynamo.reset()``).
    """
    name = _TRACED_NAMES.get((structure, bucket, grad))
    if name is None:
        name = _TRACED_NAMES[(structure, bucket, grad)] = f"plan_{len(_TRACED_NAMES)}"
        setattr(_TRACED_PLANS, name, _stand_in(structure)._plan(bucket, traced=True, grad=grad))
    return name


class EinsumFactorization(Factorization):
    """A format whose forward and rebuild are single planned einsums over its cores."""

    @abstractmethod
    def _cores(self) -> list[torch.Tensor]:
        """The cores in the order of :meth:`_equations`."""

    @abstractmethod
    def _equations(self) -> tuple[str, str]:
        """``(forward, dense)`` equations: the forward's first operand is ``x: (B, *in_modes)``."""

    def _core_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(c.shape) for c in self._cores()]

    def _einsum_plan(self, batch: int) -> ContractionPlan:
        """The planned forward einsum over ``x: (batch, *in_modes)`` and every core."""
        return plan_contraction(self._equations()[0], [(batch, *self.in_modes), *self._core_shapes()])

    def _contract_candidates(self, batch: int) -> list[Plan]:
        plan = self._einsum_plan(batch)
        return [EinsumPlan("einsum", plan.flops, plan.traffic, plan, backward_flops=2 * plan.flops,
                           backward_traffic=plan.backward_traffic)]

    def _dense_plan(self) -> ContractionPlan:
        return plan_contraction(self._equations()[1], self._core_shapes())

    def _contract(self, x: torch.Tensor, plan: Plan | ContractionPlan | None) -> torch.Tensor:
        if plan is None:
            plan = self._contract_plan(batch_bucket(x.shape[0]))
        elif isinstance(plan, ContractionPlan):
            plan = EinsumPlan("einsum", plan.flops, plan.traffic, plan)
        return plan.apply(self, x)

    def _contract_cost(self, batch: int) -> tuple[int, int]:
        plan = self._einsum_plan(batch)
        return plan.flops, plan.traffic

    def _dense(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # The path search cannot be traced; torch.einsum runs the same search once, at trace time.
            return torch.einsum(self._equations()[1], *self._cores()).reshape(self.padded_out, self.padded_in)
        return self._dense_plan()(*self._cores()).reshape(self.padded_out, self.padded_in)

    def _rebuild_cost(self) -> tuple[int, int]:
        plan = self._dense_plan()
        return plan.flops, plan.traffic

    def _rebuild_backward_cost(self) -> tuple[int, int]:
        plan = self._dense_plan()
        return 2 * plan.flops, plan.backward_traffic
