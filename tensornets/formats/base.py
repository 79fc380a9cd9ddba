"""The :class:`Factorization` interface every format implements.

A factorization stores an ``(out, in)`` matrix ``W`` as small cores (``nn.Parameter``) and applies
it to inputs ``(..., in) -> (..., out)`` without building ``W``, unless rebuilding ``W`` and one GEMM
is cheaper for the batch at hand (the FLOP crossover, decided once per batch bucket).

Sizes that cannot be split into the asked number of modes can be zero-padded (``pad=True``):
the modes then multiply to ``padded_in >= in_features`` (``padded_out >= out_features``); inputs
are zero-padded and outputs sliced, so the padding never shows outside.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..contraction import ContractionPlan, batch_bucket, plan_contraction
from ..decompositions import resolve_eps
from ..shapes import check_weight, factorize, padded_size, validate_modes

__all__ = ["Factorization", "EinsumFactorization", "RankSpec", "budget_limit", "traffic_weight", "TRAFFIC_WEIGHT"]

RankSpec = int | Sequence[int] | None


#: FLOPs that moving one element costs, per device type: the cost of a strategy is
#: ``flops + weight * traffic``. FLOPs alone pick the contraction for MPO 4096^2 (r = 16, 32) at
#: B = 512, which measured 1.2-2.7x slower than rebuild + GEMM on CPU: its intermediates
#: (B x 64 x 64 x r elements) outweigh W and every pairwise step permutes them. The CPU value
#: fits the spec's quiet-machine table (GEMM at ~160 GFLOP/s, 1.8-3.3 ns per element moved, so
#: 300-530 FLOPs per element) and benchmarks/bench_layers.py; the CUDA value is the ratio of
#: fp32 FLOP rate to memory bandwidth of current data-centre GPUs, not yet measured here.
TRAFFIC_WEIGHT = {"cpu": 384, "cuda": 64}


def traffic_weight(device_type: str) -> int:
    """FLOP-equivalent cost of one element of memory traffic on ``device_type`` (default: the CUDA value)."""
    return TRAFFIC_WEIGHT.get(device_type, TRAFFIC_WEIGHT["cuda"])


def budget_limit(budget: float, in_features: int, out_features: int) -> int:
    """Parameters allowed by ``budget`` (a fraction of ``in * out``), rounded down.

    The tiny slack keeps ``0.3 * 48 * 60`` (863.99... in floating point) at 864.
    """
    return math.floor(budget * in_features * out_features * (1 + 1e-12))


class Factorization(nn.Module, ABC):
    """An ``(out, in)`` matrix stored as cores, applied as ``x -> x W^T``.

    Subclasses define the cores, their parameter count, the contraction and the decomposition.

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
        self.in_modes = validate_modes(in_modes, self.in_features, "in_modes")
        self.out_modes = validate_modes(out_modes, self.out_features, "out_modes")
        self._ranks = tuple(int(r) for r in ranks)
        self._strategies: dict[tuple[int, str], tuple[bool, ContractionPlan | None]] = {}

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
    def _contract(self, x: torch.Tensor, plan: ContractionPlan | None) -> torch.Tensor:
        """``(B, padded_in) -> (B, padded_out)`` through the factors."""

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

    def _contract_plan(self, bucket: int) -> ContractionPlan | None:
        """The planned einsum for ``bucket`` rows, for formats that contract by einsum."""
        return None

    # ------------------------------------------------------------------ derived quantities
    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    @property
    def modes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(out_modes, in_modes)``."""
        return self.out_modes, self.in_modes

    @property
    def padded_in(self) -> int:
        return math.prod(self.in_modes)

    @property
    def padded_out(self) -> int:
        return math.prod(self.out_modes)

    @property
    def num_parameters(self) -> int:
        return self.parameter_count(self.in_modes, self.out_modes, self.ranks)

    def _strategy_costs(self, batch: int) -> dict[str, tuple[int, int]]:
        """``(flops, traffic)`` of both strategies for ``batch`` rows."""
        flops, traffic = self._rebuild_cost()
        dense = self.padded_in * self.padded_out
        rebuild = (flops + 2 * batch * dense, traffic + dense + batch * (self.padded_in + self.padded_out))
        return {"contract": self._contract_cost(batch), "rebuild": rebuild}

    def flops(self, batch: int) -> int:
        """FLOPs of ``forward`` on ``batch`` rows, for the strategy it uses (see :meth:`uses_rebuild`)."""
        costs = self._strategy_costs(batch)
        return costs["rebuild" if self._pick_rebuild(costs) else "contract"][0]

    def uses_rebuild(self, batch: int) -> bool:
        """Whether ``forward`` on ``batch`` rows rebuilds ``W`` and runs one GEMM."""
        return self._strategy(batch_bucket(batch))[0]

    def strategy(self, batch: int) -> str:
        """How ``forward`` runs on ``batch`` rows: ``"rebuild"`` (``W``, then one GEMM) or the format's
        contraction (``"contract"``; an MPO says ``"einsum"`` or ``"split"``, see :class:`~tensornets.MPO`)."""
        use_rebuild, plan = self._strategy(batch_bucket(batch))
        return "rebuild" if use_rebuild else self._contraction_name(plan)

    def _contraction_name(self, plan: Any) -> str:
        return "contract"

    def _pick_rebuild(self, costs: dict[str, tuple[int, int]]) -> bool:
        weight = traffic_weight(self._device_type())
        contract, rebuild = (costs[k][0] + weight * costs[k][1] for k in ("contract", "rebuild"))
        # Ties go to the rebuild: F.linear runs one large GEMM at the best rate there is.
        return rebuild <= contract

    def _device_type(self) -> str:
        return next(self.parameters()).device.type

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
    def _strategy(self, bucket: int) -> tuple[bool, ContractionPlan | None]:
        key = (bucket, self._device_type())
        cached = self._strategies.get(key)
        if cached is None:
            use_rebuild = self._pick_rebuild(self._strategy_costs(bucket))
            cached = (use_rebuild, None if use_rebuild else self._contract_plan(bucket))
            self._strategies[key] = cached
        return cached

    def to_dense(self) -> torch.Tensor:
        """The represented matrix ``W: (out_features, in_features)``."""
        return self._dense()[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T``: ``(..., in_features) -> (..., out_features)``."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        batch = x2.shape[0]
        if batch == 0:
            return x.new_zeros(*lead, self.out_features)
        use_rebuild, plan = self._strategy(batch_bucket(batch))
        y = F.linear(x2, self._dense()) if use_rebuild else self._contract(x2, plan)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"x has shape {tuple(x.shape)}; its last dimension must be in_features={self.in_features}"
            )
        ref = next(self.parameters())
        if x.dtype != ref.dtype:
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
        if modes is not None:
            if num_cores is not None:
                raise ValueError("pass num_cores= or modes=, not both")
            if len(modes) != 2:
                raise ValueError(f"modes must be (out_modes, in_modes), got {modes!r}")
            out_modes = validate_modes(modes[0], out_features, "modes[0] (out_modes)")
            in_modes = validate_modes(modes[1], in_features, "modes[1] (in_modes)")
        else:
            k = cls.default_num_cores if num_cores is None else num_cores
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
        if isinstance(rank, bool):
            raise TypeError(f"rank must be an int or a sequence of ints, got {rank!r}")
        if isinstance(rank, int):
            if rank < 1 or rank > max(full):
                raise ValueError(
                    f"rank={rank} does not fit the {cls.format_name} format with out_modes={tuple(out_modes)}, "
                    f"in_modes={tuple(in_modes)}: pass 1 <= rank <= {max(full)} (full ranks {full}) or eps=/budget="
                )
            return tuple(min(rank, f) for f in full)
        ranks = tuple(int(r) for r in rank)
        if len(ranks) != len(full):
            raise ValueError(f"rank={ranks} needs {len(full)} entries for {cls.format_name} (full ranks {full})")
        bad = [i for i, (r, f) in enumerate(zip(ranks, full)) if not 1 <= r <= f]
        if bad:
            raise ValueError(f"rank={ranks} exceeds the full ranks {full} at positions {bad}; lower those entries")
        return ranks

    @classmethod
    def rank_for_budget(
        cls, budget: float, in_features: int, out_features: int, in_modes: Sequence[int], out_modes: Sequence[int]
    ) -> int:
        """Largest uniform rank whose parameter count is ``<= budget * in_features * out_features``."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget={budget} must be in (0, 1]: the fraction of the dense parameter count kept")
        limit = budget_limit(budget, in_features, out_features)
        count = lambda r: cls.parameter_count(in_modes, out_modes, cls.resolve_ranks(r, in_modes, out_modes))
        lo, hi = 1, max(cls.full_ranks(in_modes, out_modes))
        if count(lo) > limit:
            raise ValueError(
                f"budget={budget} keeps {int(limit)} parameters but {cls.format_name} at rank 1 needs "
                f"{count(lo)}; raise budget or use fewer/other modes"
            )
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

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
        """A module of the given structure with zero cores (fill it with init or load_state_dict)."""
        module = cls(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        return module.to(dtype=dtype or torch.get_default_dtype(), device=device)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        rank: RankSpec = None,
        eps: float | None = None,
        energy: float | None = None,
        budget: float | None = None,
        num_cores: int | None = None,
        modes: tuple[Sequence[int], Sequence[int]] | None = None,
        svd: str = "full",
        seed: int = 0,
        pad: bool = False,
        **options: Any,
    ) -> "Factorization":
        """Decompose ``weight: (out, in)`` into this format.

        Parameters
        ----------
        weight : Tensor, shape (out, in)
            A finite floating matrix (e.g. ``nn.Linear.weight``).
        rank : int or sequence of int, optional
            Maximum ranks (see :meth:`resolve_ranks`).
        eps, energy : float, optional
            Relative Frobenius error target (``energy`` = fraction of ``||W||^2`` kept,
            ``eps = sqrt(1 - energy)``); combined with ``rank``, the smaller rank wins.
        budget : float, optional
            Fraction of the dense parameter count kept: the largest uniform rank that fits.
        num_cores : int, optional
            Modes per side (balanced, :func:`tensornets.factorize`); ``modes`` gives them explicitly
            as ``(out_modes, in_modes)``.
        svd : {"full", "randomized"}
            SVD used inside the decomposition; randomized is seeded by ``seed``.
        pad : bool
            Zero-pad sizes that cannot be split (primes) to the next size that can.
        **options
            Format-specific options (Tucker: ``algorithm="hosvd" | "hooi"``).
        """
        check_weight(weight, "weight")
        if svd not in ("full", "randomized"):
            raise ValueError(f"svd={svd!r} must be 'full' or 'randomized'")
        if svd == "randomized" and not cls.supports_randomized_svd:
            raise ValueError(
                f"svd='randomized' does not apply to {cls.format_name}: its SVDs are small, exact ones; "
                f"use svd='full' (randomized helps lowrank, tt and mpo)"
            )
        out_features, in_features = weight.shape
        in_modes, out_modes = cls.resolve_modes(in_features, out_features, num_cores, modes, pad)
        eps = resolve_eps(eps, energy)
        if budget is not None:
            if rank is not None:
                raise ValueError(f"pass rank={rank} or budget={budget}, not both")
            rank = cls.rank_for_budget(budget, in_features, out_features, in_modes, out_modes)
        if rank is None and eps is None:
            raise ValueError(f"{cls.format_name}.from_dense needs rank=, eps=, energy= or budget=")
        ranks = cls.resolve_ranks(rank if rank is not None else max(cls.full_ranks(in_modes, out_modes)), in_modes, out_modes)
        # Half precision SVDs are unsupported/inaccurate: decompose in fp32 (fp64 stays fp64).
        work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
        padded = F.pad(work, (0, math.prod(in_modes) - in_features, 0, math.prod(out_modes) - out_features))
        tensors = cls._decompose(padded, in_modes, out_modes, ranks, eps, svd, seed, **options)
        module = cls(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=cls._ranks_of(tensors, ranks))
        module.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, tensor in tensors.items():
                module.get_parameter(name).copy_(tensor)
        return module

    @classmethod
    def _ranks_of(cls, tensors: dict[str, torch.Tensor], requested: tuple[int, ...]) -> tuple[int, ...]:
        """Ranks actually produced by :meth:`_decompose` (eps may truncate below ``requested``)."""
        return requested


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

    def _contract_plan(self, bucket: int) -> ContractionPlan:
        return plan_contraction(self._equations()[0], [(bucket, *self.in_modes), *self._core_shapes()])

    def _dense_plan(self) -> ContractionPlan:
        return plan_contraction(self._equations()[1], self._core_shapes())

    def _contract(self, x: torch.Tensor, plan: ContractionPlan | None) -> torch.Tensor:
        plan = plan or self._contract_plan(batch_bucket(x.shape[0]))
        y = plan(x.reshape(x.shape[0], *self.in_modes), *self._cores())
        return y.reshape(x.shape[0], self.padded_out)

    def _contract_cost(self, batch: int) -> tuple[int, int]:
        plan = plan_contraction(self._equations()[0], [(batch, *self.in_modes), *self._core_shapes()])
        return plan.flops, plan.traffic

    def _dense(self) -> torch.Tensor:
        return self._dense_plan()(*self._cores()).reshape(self.padded_out, self.padded_in)

    def _rebuild_cost(self) -> tuple[int, int]:
        plan = self._dense_plan()
        return plan.flops, plan.traffic
