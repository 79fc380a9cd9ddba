"""LoRETTA layers: tensor-train LoRA factors (rep) and tensor-train bottleneck adapters (adp).

Every factor is a :class:`tensornets.TensorTrain` of a ``(d, k)`` matrix (``d`` a model
dimension, ``k`` the LoRA rank or the bottleneck width) with the modes of ``d`` first. The
forward contracts each train to its small ``(d, k)`` factor (cost ``O(Σ_j ∏_{i≤j} n_i R_j²)``,
at most ``O(d k R)``-like, independent of the batch) and then runs plain matmuls with it; no
``(d_out, d_in)`` matrix is ever built outside :meth:`LoRETTARepLayer.get_delta_weight`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

import tensornets
from adapters._delta import ADAPTER_DTYPE, DeltaLayer, LayerPlan, linear_dims
from adapters._step_match import REFERENCE_LORA_ALPHA, lora_input_std, output_factor_std
from adapters.loretta.config import LoRETTAAdpConfig, LoRETTABaseConfig, LoRETTARepConfig

__all__ = [
    "LoRETTAAdpLayer",
    "LoRETTARepLayer",
    "NOT_MERGEABLE",
    "adp_step_matched_init_",
    "factor_modes",
    "factor_parameter_count",
    "min_parameter_modes",
    "paper_init_",
    "step_matched_init_",
    "tt_factor",
]

#: The error every merge of a LoRETTA-adp adapter raises.
NOT_MERGEABLE = (
    "LoRETTA-adp adapters are not mergeable: the bottleneck f(h) = h + s·U(ReLU(D h)) is nonlinear in h, so there "
    "is no weight update ΔW to add to the base layer. Keep the adapter unmerged (unload() without merging works), "
    "or use LoRETTA-rep (LoRETTARepConfig), which merges exactly."
)


def _bond(prefix: int, total: int, tt_rank: int) -> int:
    # The TT bond after modes of product `prefix` (of `total`): min(tt_rank, full rank of that unfolding).
    return min(tt_rank, prefix, total // prefix)


def min_parameter_modes(d: int, k_modes: tuple[int, ...], tt_rank: int) -> tuple[int, ...]:
    """The split of ``d`` into modes that minimises the TT parameter count of a ``(d, k)`` factor.

    The train runs over ``d_modes + k_modes``; its bond after a prefix of modes of product
    ``P`` is ``min(tt_rank, P, d k / P)``, so its count ``Σ_j R_{j-1} n_j R_j`` depends only on
    the prefix products. A dynamic program over the divisors ``P`` of ``d`` (cost of reaching
    ``P`` = best over divisors ``Q | P`` of the cost of ``Q`` plus the core
    ``(R(Q), P / Q, R(P))``) finds the exact minimum over all ordered splits, in
    ``O(divisors(d)²)``. Ties go to fewer modes (fewer contractions), then the smaller tuple.
    The first core costs ``R n_1`` and inner ones ``R² n_j``, so the optimum puts a large mode
    first: ``384 -> (16, 2, 3, 4)`` at ``tt_rank=5`` (345 parameters with ``k = 8``, against 470
    for the balanced ``(6, 8, 8)``).

    Parameters
    ----------
    d : int
        The model dimension to split (``d >= 1``; ``d = 1`` gives ``(1,)``).
    k_modes : tuple of int
        Modes of the small side, after those of ``d``.
    tt_rank : int
        The bond cap ``R``.
    """
    if d == 1:
        return (1,)
    total = d * math.prod(k_modes)
    divisors = [p for p in range(1, d + 1) if d % p == 0]
    # best[P] = (parameters of the cores up to prefix product P, number of modes, modes)
    best: dict[int, tuple[int, int, tuple[int, ...]]] = {1: (0, 0, ())}
    for p in divisors[1:]:
        best[p] = min(
            (cost + _bond(q, total, tt_rank) * (p // q) * _bond(p, total, tt_rank), count + 1, modes + (p // q,))
            for q, (cost, count, modes) in best.items()
            if p % q == 0
        )
    return best[d][2]


def _modes_of(size: int, config: LoRETTABaseConfig, num_modes: int, layer_name: str) -> tuple[int, ...]:
    explicit = (config.modes or {}).get(str(size))
    if explicit is not None:
        return tuple(explicit)
    try:
        return tensornets.factorize(size, num_modes)
    except ValueError as exc:
        raise ValueError(
            f"layer {layer_name!r}: size {size} cannot be split into num_modes={num_modes} modes ({exc}); pass "
            f"num_modes<={len(tensornets.prime_factors(size))}, num_modes=None (the split with the fewest "
            f"parameters) or explicit modes={{'{size}': [...]}}"
        ) from None


def factor_modes(d: int, k: int, config: LoRETTABaseConfig, layer_name: str = "?") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Modes ``(d_modes, k_modes)`` of the ``(d, k)`` factor; the train's modes are ``d_modes + k_modes``.

    ``config.modes`` wins for a size it lists. Otherwise ``k`` stays one mode and ``d`` is split
    by :func:`min_parameter_modes` (``config.num_modes=None``, the default) or into
    ``config.num_modes`` balanced modes by :func:`tensornets.factorize` (the paper's split).

    Raises
    ------
    ValueError
        If ``num_modes`` is an int larger than the number of prime factors of a size it must split.
    """
    k_modes = _modes_of(k, config, 1, layer_name)
    if config.num_modes is None and str(d) not in (config.modes or {}):
        return min_parameter_modes(d, k_modes, config.tt_rank), k_modes
    return _modes_of(d, config, config.num_modes, layer_name), k_modes


def _ranks(d_modes: tuple[int, ...], k_modes: tuple[int, ...], tt_rank: int) -> tuple[int, ...]:
    # Every bond min(tt_rank, full): a bond above its full rank adds parameters, never expressiveness.
    full = tensornets.TensorTrain.full_ranks(k_modes, d_modes)
    return tuple(min(tt_rank, f) for f in full)


def factor_parameter_count(d: int, k: int, config: LoRETTABaseConfig) -> int:
    """Parameters ``Σ_j R_{j-1} n_j R_j`` of the TT of a ``(d, k)`` factor (no module built).

    Examples
    --------
    >>> factor_parameter_count(768, 8, LoRETTARepConfig(modes={"768": [8, 8, 12]}, tt_rank=5))  # [8, 8, 12, 8]
    580
    """
    d_modes, k_modes = factor_modes(d, k, config)
    return tensornets.TensorTrain.parameter_count(k_modes, d_modes, _ranks(d_modes, k_modes, config.tt_rank))


def tt_factor(
    d: int, k: int, config: LoRETTABaseConfig, *, layer_name: str, device: Optional[torch.device] = None
) -> tensornets.TensorTrain:
    """A zero :class:`tensornets.TensorTrain` representing a ``(d, k)`` matrix, in float32.

    Its cores ``(R_{j-1}, n_j, R_j)`` run over the modes of ``d`` then of ``k``
    (:func:`factor_modes`), bonds ``min(config.tt_rank, full)``; ``to_dense()`` is ``(d, k)``.
    """
    d_modes, k_modes = factor_modes(d, k, config, layer_name)
    return tensornets.TensorTrain.empty(
        k,
        d,
        in_modes=k_modes,
        out_modes=d_modes,
        ranks=_ranks(d_modes, k_modes, config.tt_rank),
        dtype=ADAPTER_DTYPE,
        device=device,
    )


@torch.no_grad()
def paper_init_(tt: tensornets.TensorTrain, sigma: float, generator: Optional[torch.Generator] = None) -> None:
    """The reference code's init: core ``k`` of ``K`` is ``N(0, 1) / sqrt(R_k) · sigma^{1/K}``.

    ``R_k`` is the core's right bond (1 for the last core).
    """
    num_cores = len(tt.cores)
    for core in tt.cores:
        values = torch.randn(core.shape, generator=generator, dtype=torch.float32)
        core.copy_(values * sigma ** (1.0 / num_cores) / math.sqrt(core.shape[2]))


def _chain_init_(
    cores: list[torch.Tensor], std: float, generator: Optional[torch.Generator], stored_std: Optional[float] = None
) -> float:
    # First core N(0, std²), core k > 1 N(0, 1 / R_{k-1}) (R_{k-1} its left bond): each later core keeps the
    # variance of the partial contraction, so the train's entries have std `std` and the first core alone sets it.
    # With `stored_std`, every core is stored at that std instead (the same draw, rescaled) and the product of the
    # per-core factors (its std over `stored_std`) is returned: the multiplier that restores the train's value.
    multiplier = 1.0
    for k, core in enumerate(cores):
        core_std = std if k == 0 else core.shape[0] ** -0.5
        values = torch.randn(core.shape, generator=generator, dtype=torch.float32)
        if stored_std is None:
            core.copy_((core_std * values).to(core))
        else:
            core.copy_((stored_std * values).to(core))
            multiplier *= core_std / stored_std
    return multiplier


def _scaled_train_dense(tt: tensornets.TensorTrain, multiplier: float) -> torch.Tensor:
    """``multiplier ·`` the dense ``(out_features, in_features)`` matrix of ``tt``, with no small intermediate.

    The train of ``M_B`` under ``init_weights="lora_rate"`` stores its ``K - 1`` cores before
    the last at LoRA's ``A`` std ``σ_A`` (~0.02-0.05), so the contraction of the stored cores
    has entries ~``σ_A^{K-1}`` (1e-7 at ``d = 576``, 1e-9 at 2048) and ``μ_B`` is ~1e5-1e8:
    under float16 autocast (or float16 factors) those entries are subnormal or zero (the
    forward lost the update, measured). So ``μ_B`` is applied before the contraction,
    ``μ_B^{1/(K-1)}`` on each of those cores (the last, trained from zero, is left as is):
    each scaled core has the geometric mean of the plain init's per-core stds, and every
    partial contraction the size it has under ``init_weights="zero"``.
    ``TensorTrain.dense_of`` contracts the scaled cores as ``to_dense`` contracts the stored ones.
    """
    if multiplier == 1.0:
        return tt.to_dense()
    return tt.dense_of(_scaled_cores(tt, multiplier))[: tt.out_features, : tt.in_features]


def _scaled_cores(tt: tensornets.TensorTrain, multiplier: float) -> list[torch.Tensor]:
    """``tt``'s cores with ``multiplier^{1/(K-1)}`` on each core before the last (:func:`_scaled_train_dense`)."""
    cores = list(tt.cores)
    if multiplier == 1.0:
        return cores
    per_core = multiplier ** (1.0 / (len(cores) - 1))  # μ_B != 1 only for a train with cores before its last
    return [per_core * core for core in cores[:-1]] + [cores[-1]]


def _train_halves(tt: tensornets.TensorTrain, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``multiplier · M = L R`` for the ``(d, k)`` matrix ``M`` of ``tt``: the cores of the ``d``
    modes contracted into ``L: (d, R_c)``, those of the ``k`` modes into ``R: (R_c, k)``, ``R_c`` the bond between
    them (``TensorTrain.halves_of`` at that bond)."""
    left, right = tt.halves_of(_scaled_cores(tt, multiplier), len(tt.out_modes))
    return left[: tt.out_features], right[:, : tt.in_features]


@torch.no_grad()
def step_matched_init_(
    tt_a: tensornets.TensorTrain,
    tt_b: tensornets.TensorTrain,
    d_in: int,
    r: int,
    generator: Optional[torch.Generator] = None,
    *,
    lora_rate: bool = False,
) -> float:
    """LoRETTA-rep's init: ``ΔW = 0``, first steps moving the output as LoRA's do.

    ``M_A`` (``tt_a``) has the singular values of LoRA's ``A`` (entries of std
    ``σ_A = (3 d_in)^{-1/2}``): its rank is at most its bond ``R`` at the ``d | k`` cut, so its
    entry std is ``σ_A sqrt(R / r)`` (with ``σ_A`` the ``R < r`` singular values would each be
    ``sqrt(r / R)`` times LoRA's and the update, measured, faster than LoRA's). ``M_B``'s
    (``tt_b``) last core ``C: (q, k_K)`` is zero; the contraction ``P: (d_out ⋯, q)`` of the
    cores before it has entries of std ``q^{-1/2}`` (:func:`adapters._step_match.output_factor_std`
    with ``r' = r``), so one Adam step moves ``s P ΔC`` by entries of ``s lr``, as LoRA's
    ``s ΔB``. In both trains the first core carries that std and every later core is
    ``N(0, 1 / R_{k-1})`` (norm preserving along the chain): Adam then changes ``M_A`` by
    ``lr / σ_A`` relative to its size per step through the first core, as it changes LoRA's
    ``A``; spreading the std evenly over ``K`` cores (``σ^{1/K}`` each) made that ``K`` times
    ``σ^{1 - 1/K}`` slower and the update fell behind LoRA's within a few steps.

    ``lora_rate=True`` (the default init, ``init_weights="lora_rate"``) also makes ``P`` *learn*
    at LoRA's rate. LoRA learns its output directions from zero in ``B``; here they are the
    columns of ``P``, and a core of std ``σ_k`` (``q^{-1/2}``, ``R^{-1/2}``: 0.5 at ``R = 4``)
    moves by ``lr / σ_k`` of its size per Adam step, ``σ_A / σ_k`` times LoRA's ``A``
    (1/17 at ``d = 384``): on MiniLM, most of ``ΔW`` still lay in ``P``'s random initial
    column space after 2 epochs, against a free ``B`` for LoRA. So every core of ``P`` is stored
    at entry std ``σ_A`` (the same draw, rescaled) and the train is multiplied by
    ``μ_B = Π_k σ_k / σ_A`` (the muP multiplier: the value of ``M_B``, hence the first step, is
    unchanged; each core of ``P`` now changes by ``lr / σ_A`` of its size per step, as LoRA's
    ``A``). ``C`` keeps its plain parametrization (``μ_B`` is the product over ``P``'s cores
    only, so ``s μ_B P_stored C = s P C``).

    Returns
    -------
    float
        The multiplier ``μ_B`` of ``M_B`` (``M_B = μ_B ·`` the contraction of ``tt_b``'s stored
        cores): 1 unless ``lora_rate``. ``M_A`` is stored as is.
    """
    input_std = lora_input_std(d_in)
    # M_A's rank is capped by its bond at the d | k cut: with the same Frobenius norm its singular values
    # would be sqrt(r / rank) times LoRA's A's; scale them back down to LoRA's.
    cut = len(tt_a.out_modes) - 1
    rank = min(r, tt_a.ranks[cut]) if tt_a.ranks else r
    _chain_init_(list(tt_a.cores), input_std * math.sqrt(rank / r), generator)
    bonds = tt_b.ranks
    multiplier_b = 1.0
    if bonds:  # a single-core train has no P: it is all C
        p_std = output_factor_std(bonds[-1], r, input_std, d_in, r)
        multiplier_b = _chain_init_(list(tt_b.cores[:-1]), p_std, generator, input_std if lora_rate else None)
    tt_b.cores[-1].zero_()
    return multiplier_b


@torch.no_grad()
def adp_step_matched_init_(
    tt_d: tensornets.TensorTrain,
    tt_u: tensornets.TensorTrain,
    d: int,
    m: int,
    scale: float,
    generator: Optional[torch.Generator] = None,
) -> None:
    """LoRETTA-adp's init: the identity at start, first steps moving like PEFT's default LoRA.

    The branch ``s · U(ReLU(D h + b_D))`` is LoRA-shaped: ``D`` plays LoRA's ``A`` and
    ``U = P C`` its ``B``, with ``C: (q, m)`` the zero last core of ``M_U`` (the only part of
    ``U`` with a gradient at step 0) and ``P: (d, q)`` the contraction of the cores before it.
    ``M_D`` gets LoRA's ``A`` std ``σ_A = (3 d)^{-1/2}``, so ``z = ReLU(D h)`` has ``~m / 2``
    active entries of LoRA's ``A h`` size and ``‖z‖_1 ≈ (m / 2) σ_A ‖h‖ sqrt(2 / π)``. One Adam
    step moves ``C`` by ``±lr`` per entry and the output by about
    ``s lr · sqrt(q) σ_P · ‖z‖_1`` per coordinate; LoRA's moves by ``alpha lr · σ_A ‖x‖ sqrt(2 / π)``
    (:mod:`adapters._step_match`). Equal at PEFT's default ``alpha = 8`` for equal input norms
    when ``σ_P = 2 · 8 / (s m sqrt(q))``. Both trains put that std in their first core, later
    cores ``N(0, 1 / R_{k-1})``, as :func:`step_matched_init_`.

    The earlier init (``M_D`` entries of std ``d^{-1/2}``, ``M_U`` of ``m^{-1/2}`` spread evenly
    over its cores) moved the branch several times faster than LoRA's update at the same lr
    (measured on MiniLM, a few Adam steps, branch outputs against LoRA's change of the
    query/value outputs): LoRA's lr was already past the lr at which LoRA itself diverges
    (issue 12's run), so the model fell to the majority class at both learning rates tried.
    """
    input_std = lora_input_std(d)
    _chain_init_(list(tt_d.cores), input_std, generator)
    bonds = tt_u.ranks
    if bonds:
        sigma_p = 2 * REFERENCE_LORA_ALPHA / (abs(scale) * m * math.sqrt(bonds[-1])) if scale else 1.0
        _chain_init_(list(tt_u.cores[:-1]), sigma_p, generator)
    tt_u.cores[-1].zero_()


def _factor_dtype(tt: tensornets.TensorTrain) -> torch.dtype:
    return tt.cores[0].dtype


class LoRETTARepLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · (x M_A) M_Bᵀ`` with tensor-train factors, for a frozen ``nn.Linear``.

    Holds ``loretta_rep_A[adapter]``, the TT of ``M_A: (d_in, r)``, and ``loretta_rep_B[adapter]``,
    the TT of ``M_B: (d_out, r)`` up to a fixed multiplier ``μ_B`` derived from the shapes
    (``loretta_rep_multiplier[adapter]``, 1 unless ``init_weights="lora_rate"``:
    :func:`step_matched_init_`). Forward cost of the update for ``N`` rows: contracting the two
    trains (independent of ``N``, ``O((d_in + d_out) r R)``-like) plus ``O(N r (d_in + d_out))``.
    """

    adapter_layer_names = ("loretta_rep_A", "loretta_rep_B")
    other_param_names = ("delta_dropout", "loretta_rep_scale", "loretta_rep_multiplier")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoRETTARepConfig,
        *,
        current_key: str,
        plan: Optional[LayerPlan] = None,
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.loretta_rep_A = nn.ModuleDict()
        self.loretta_rep_B = nn.ModuleDict()
        self.loretta_rep_scale: dict[str, float] = {}
        # μ_B: M_B = μ_B · the contraction of its stored cores (see step_matched_init_); derived from the
        # shapes and config.init_weights, so never saved.
        self.loretta_rep_multiplier: dict[str, float] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_dims(base)  # nn.Linear or GPT-2's Conv1D
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key)

    def update_layer(self, adapter_name: str, config: LoRETTARepConfig, *, current_key: str, **_: Any) -> None:
        """Add adapter ``adapter_name``: the two trains, initialized per ``config.init_weights``."""
        d_in, d_out, r = self.in_features, self.out_features, config.r
        device = self.get_base_layer().weight.device
        tt_a = tt_factor(d_in, r, config, layer_name=current_key, device=device)
        tt_b = tt_factor(d_out, r, config, layer_name=current_key, device=device)
        if config.init_weights == "paper":
            sigma = (d_in + d_out) ** -0.5
            paper_init_(tt_a, sigma)
            paper_init_(tt_b, sigma)
            multiplier = 1.0
        else:
            multiplier = step_matched_init_(tt_a, tt_b, d_in, r, lora_rate=config.init_weights == "lora_rate")
        self.loretta_rep_multiplier[adapter_name] = multiplier
        self.loretta_rep_A[adapter_name] = tt_a
        self.loretta_rep_B[adapter_name] = tt_b
        self.loretta_rep_scale[adapter_name] = config.alpha / r
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_A, μ_B M_B)``, shapes ``(d_in, r)`` and ``(d_out, r)``: the contracted trains, ``M_B`` times its multiplier."""
        multiplier = self.loretta_rep_multiplier[adapter_name]
        m_b = _scaled_train_dense(self.loretta_rep_B[adapter_name], multiplier)  # μ_B inside: no tiny intermediate
        return self.loretta_rep_A[adapter_name].to_dense(), m_b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s · M_B M_Aᵀ``, shape ``(d_out, d_in)``."""
        m_a, m_b = self.factors(adapter_name)
        return self.loretta_rep_scale[adapter_name] * (m_b @ m_a.T)

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · (x M_A) M_Bᵀ`` for ``x: (..., d_in)``; cost ``O(N r (d_in + d_out))`` plus the contractions."""
        m_a, m_b = self.factors(adapter_name)
        return (x.to(m_a.dtype) @ m_a) @ (self.loretta_rep_scale[adapter_name] * m_b.T)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors ``(A, B)`` of ``ΔW = B A`` at its structural rank ``ρ = min(r, R_A, R_B)``, in float64.

        Each train splits at the bond ``R`` between its ``d`` and its ``r`` modes, ``M = L K``
        (``L: (d, R)``, ``K: (R, r)``), so ``ΔW = s L_B (K_B K_Aᵀ) L_Aᵀ`` has rank at most
        ``min(r, R_A, R_B)`` (4 at the defaults ``r = 8``, ``tt_rank = 4``, where the contracted
        trains ``(M_Aᵀ, s M_B)`` would be a rank-8 LoRA of twice the size). The pair is
        ``(L_Aᵀ, s L_B K_B K_Aᵀ)`` when ``R_A`` is the smallest, ``(K_B K_Aᵀ L_Aᵀ, s L_B)`` when
        ``R_B`` is, else ``(M_Aᵀ, s M_B)``. Shapes ``(ρ, d_in)`` and ``(d_out, ρ)``. The halves
        are contracted in the adapter's dtype, as the forward contracts the trains, then
        multiplied in float64.
        """
        scale = self.loretta_rep_scale[adapter_name]
        left_a, right_a = (t.detach().double() for t in _train_halves(self.loretta_rep_A[adapter_name]))
        left_b, right_b = (t.detach().double() for t in _train_halves(
            self.loretta_rep_B[adapter_name], self.loretta_rep_multiplier[adapter_name]))
        bond_a, bond_b, r = left_a.shape[1], left_b.shape[1], right_a.shape[1]
        if r <= min(bond_a, bond_b):
            return (left_a @ right_a).T.contiguous(), scale * (left_b @ right_b)
        inner = right_b @ right_a.T  # (R_B, R_A)
        if bond_a <= bond_b:
            return left_a.T.contiguous(), scale * (left_b @ inner)
        return inner @ left_a.T, scale * left_b

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` contract: ``ΔW`` is an additive ``(d_out, d_in)`` update of a linear layer."""
        return True

    def __repr__(self) -> str:
        return "loretta_rep." + super().__repr__()


class LoRETTAAdpLayer(DeltaLayer):
    """``y = h + s · (U(ReLU(D h + b_D)) + b_U)`` on the output ``h`` of a frozen ``nn.Linear``.

    ``D: d → m`` is applied as ``h M_D`` and ``U: m → d`` as ``z M_Uᵀ``, where
    ``M_D, M_U: (d, m)`` are tensor trains (``loretta_adp_D[adapter]``,
    ``loretta_adp_U[adapter]``) contracted once per forward; ``d`` is the base layer's
    ``out_features``. With several active adapters each sees the base output and their
    branches add. Forward cost for ``N`` rows: ``O(N d m)`` plus the contractions.
    ``merge`` raises :data:`NOT_MERGEABLE`.
    """

    adapter_layer_names = ("loretta_adp_D", "loretta_adp_U", "loretta_adp_bias_D", "loretta_adp_bias_U", "loretta_adp_scale")
    other_param_names = ("delta_dropout", "loretta_adp_fixed_scale")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoRETTAAdpConfig,
        *,
        current_key: str,
        plan: Optional[LayerPlan] = None,
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.loretta_adp_D = nn.ModuleDict()
        self.loretta_adp_U = nn.ModuleDict()
        self.loretta_adp_bias_D = nn.ParameterDict()
        self.loretta_adp_bias_U = nn.ParameterDict()
        # Only learned scales live here; fixed ones are plain floats (never trained, never saved as tensors).
        self.loretta_adp_scale = nn.ParameterDict()
        self.loretta_adp_fixed_scale: dict[str, float] = {}
        self.out_features = linear_dims(self.get_base_layer())[1]
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key)

    def update_layer(self, adapter_name: str, config: LoRETTAAdpConfig, *, current_key: str, **_: Any) -> None:
        """Add adapter ``adapter_name`` as the identity (``M_U``'s last core and ``b_U`` zero), step-matched.

        See :func:`adp_step_matched_init_`.
        """
        d, m = self.out_features, config.bottleneck
        device = self.get_base_layer().weight.device
        tt_d = tt_factor(d, m, config, layer_name=current_key, device=device)
        tt_u = tt_factor(d, m, config, layer_name=current_key, device=device)
        adp_step_matched_init_(tt_d, tt_u, d, m, config.scale)
        self.loretta_adp_D[adapter_name] = tt_d
        self.loretta_adp_U[adapter_name] = tt_u
        self.loretta_adp_bias_D[adapter_name] = nn.Parameter(torch.zeros(m, dtype=ADAPTER_DTYPE, device=device))
        self.loretta_adp_bias_U[adapter_name] = nn.Parameter(torch.zeros(d, dtype=ADAPTER_DTYPE, device=device))
        if config.learn_scale:
            # Shape (1,), not 0-d: FSDP2's fully_shard rejects 0-d parameters.
            self.loretta_adp_scale[adapter_name] = nn.Parameter(
                torch.tensor([float(config.scale)], dtype=ADAPTER_DTYPE, device=device)
            )
        else:
            self.loretta_adp_fixed_scale[adapter_name] = float(config.scale)
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        # Checkpoints of 0.1.0 hold a learned scale as a 0-d tensor; reshape it to today's (1,).
        # Runs before the containers below load: they read from this same dict.
        for key in [k for k in state_dict if k.startswith(prefix + "loretta_adp_scale.")]:
            if state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _scale(self, adapter_name: str) -> torch.Tensor | float:
        if adapter_name in self.loretta_adp_scale:
            return self.loretta_adp_scale[adapter_name]
        return self.loretta_adp_fixed_scale[adapter_name]

    def adapter_branch(self, h: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · (U(ReLU(D h + b_D)) + b_U)`` for ``h: (..., d)``, in the adapter's dtype."""
        tt_d, tt_u = self.loretta_adp_D[adapter_name], self.loretta_adp_U[adapter_name]
        m_d, m_u = tt_d.to_dense(), tt_u.to_dense()
        z = torch.relu(h.to(m_d.dtype) @ m_d + self.loretta_adp_bias_D[adapter_name])
        return self._scale(adapter_name) * (z @ m_u.T + self.loretta_adp_bias_U[adapter_name])

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The bottleneck branch on the base output: ``adapter_branch(dropout(result))`` (``x`` is not read)."""
        return self.adapter_branch(self.delta_dropout[adapter_name](result), adapter_name).to(result.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Always raises: see :data:`NOT_MERGEABLE`."""
        raise ValueError(NOT_MERGEABLE)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Always raises: a bottleneck adapter has no ``ΔW`` (see :data:`NOT_MERGEABLE`)."""
        raise ValueError(NOT_MERGEABLE)

    def __repr__(self) -> str:
        return "loretta_adp." + super().__repr__()
