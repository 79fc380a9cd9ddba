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
from adapters._delta import ADAPTER_DTYPE, DeltaLayer
from adapters.loretta.config import LoRETTAAdpConfig, LoRETTABaseConfig, LoRETTARepConfig

__all__ = [
    "LoRETTAAdpLayer",
    "LoRETTARepLayer",
    "NOT_MERGEABLE",
    "factor_modes",
    "factor_parameter_count",
    "paper_init_",
    "tt_factor",
]

#: The error every merge of a LoRETTA-adp adapter raises.
NOT_MERGEABLE = (
    "LoRETTA-adp adapters are not mergeable: the bottleneck f(h) = h + s·U(ReLU(D h)) is nonlinear in h, so there "
    "is no weight update ΔW to add to the base layer. Keep the adapter unmerged (unload() without merging works), "
    "or use LoRETTA-rep (LoRETTARepConfig), which merges exactly."
)


def _modes_of(size: int, config: LoRETTABaseConfig, num_modes: int, layer_name: str) -> tuple[int, ...]:
    explicit = (config.modes or {}).get(str(size))
    if explicit is not None:
        return tuple(explicit)
    try:
        return tensornets.factorize(size, num_modes)
    except ValueError as exc:
        raise ValueError(
            f"layer {layer_name!r}: size {size} cannot be split into num_modes={num_modes} modes ({exc}); pass "
            f"num_modes<={len(tensornets.prime_factors(size))} or explicit modes={{'{size}': [...]}}"
        ) from None


def factor_modes(d: int, k: int, config: LoRETTABaseConfig, layer_name: str = "?") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Modes ``(d_modes, k_modes)`` of the ``(d, k)`` factor: ``config.modes`` or balanced splits.

    ``d`` is split into ``config.num_modes`` modes by :func:`tensornets.factorize`, ``k`` stays
    one mode, unless ``config.modes`` lists the size. The train's modes are ``d_modes + k_modes``.

    Raises
    ------
    ValueError
        If a size not in ``config.modes`` has fewer prime factors than ``num_modes`` (a prime).
    """
    return _modes_of(d, config, config.num_modes, layer_name), _modes_of(k, config, 1, layer_name)


def _ranks(d_modes: tuple[int, ...], k_modes: tuple[int, ...], tt_rank: int) -> tuple[int, ...]:
    # Every bond min(tt_rank, full): a bond above its full rank adds parameters, never expressiveness.
    full = tensornets.TensorTrain.full_ranks(k_modes, d_modes)
    return tuple(min(tt_rank, f) for f in full)


def factor_parameter_count(d: int, k: int, config: LoRETTABaseConfig) -> int:
    """Parameters ``Σ_j R_{j-1} n_j R_j`` of the TT of a ``(d, k)`` factor (no module built).

    Examples
    --------
    >>> factor_parameter_count(768, 8, LoRETTARepConfig(modes={"768": [8, 8, 12]}))  # [8, 8, 12, 8], R = 5
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


def _factor_dtype(tt: tensornets.TensorTrain) -> torch.dtype:
    return tt.cores[0].dtype


class LoRETTARepLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · (x M_A) M_Bᵀ`` with tensor-train factors, for a frozen ``nn.Linear``.

    Holds ``loretta_rep_A[adapter]``, the TT of ``M_A: (d_in, r)``, and ``loretta_rep_B[adapter]``,
    the TT of ``M_B: (d_out, r)``. Forward cost of the update for ``N`` rows: contracting the two
    trains (independent of ``N``, ``O((d_in + d_out) r R)``-like) plus ``O(N r (d_in + d_out))``.
    """

    adapter_layer_names = ("loretta_rep_A", "loretta_rep_B")
    other_param_names = ("delta_dropout", "loretta_rep_scale")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoRETTARepConfig, *, current_key: str) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.loretta_rep_A = nn.ModuleDict()
        self.loretta_rep_B = nn.ModuleDict()
        self.loretta_rep_scale: dict[str, float] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
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
        else:
            tensornets.init_factorization_(tt_a, std=d_in**-0.5)
            tensornets.init_factorization_(tt_b, std=d_out**-0.5)
            with torch.no_grad():
                tt_b.cores[-1].zero_()
        self.loretta_rep_A[adapter_name] = tt_a
        self.loretta_rep_B[adapter_name] = tt_b
        self.loretta_rep_scale[adapter_name] = config.alpha / r
        self._set_dropout(adapter_name, config.dropout)
        # A new adapter follows the mode of the layer it wraps (no dropout inside a model in eval mode).
        self.delta_dropout[adapter_name].train(self.get_base_layer().training)
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_A, M_B)``, shapes ``(d_in, r)`` and ``(d_out, r)``, contracted from their trains."""
        return self.loretta_rep_A[adapter_name].to_dense(), self.loretta_rep_B[adapter_name].to_dense()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s · M_B M_Aᵀ``, shape ``(d_out, d_in)``."""
        m_a, m_b = self.factors(adapter_name)
        return self.loretta_rep_scale[adapter_name] * (m_b @ m_a.T)

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · (x M_A) M_Bᵀ`` for ``x: (..., d_in)``; cost ``O(N r (d_in + d_out))`` plus the contractions."""
        m_a, m_b = self.factors(adapter_name)
        return (x.to(m_a.dtype) @ m_a) @ (self.loretta_rep_scale[adapter_name] * m_b.T)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors of ``ΔW``: the contracted trains ``(M_Aᵀ, s · M_B)``, in float64.

        Shapes ``(r, d_in)`` and ``(d_out, r)``; their product is ``ΔW``, rank ``r``. The trains
        are contracted in the adapter's dtype, as the forward contracts them.
        """
        m_a, m_b = (t.detach().double() for t in self.factors(adapter_name))
        return m_a.T.contiguous(), self.loretta_rep_scale[adapter_name] * m_b

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

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoRETTAAdpConfig, *, current_key: str) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.loretta_adp_D = nn.ModuleDict()
        self.loretta_adp_U = nn.ModuleDict()
        self.loretta_adp_bias_D = nn.ParameterDict()
        self.loretta_adp_bias_U = nn.ParameterDict()
        # Only learned scales live here; fixed ones are plain floats (never trained, never saved as tensors).
        self.loretta_adp_scale = nn.ParameterDict()
        self.loretta_adp_fixed_scale: dict[str, float] = {}
        self.out_features = self.get_base_layer().out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key)

    def update_layer(self, adapter_name: str, config: LoRETTAAdpConfig, *, current_key: str, **_: Any) -> None:
        """Add adapter ``adapter_name`` as the identity: ``M_U``'s last core and ``b_U`` are zero.

        ``M_D`` is Gaussian as if i.i.d. with std ``d^{-1/2}`` (variance preserving for ``h``),
        ``M_U``'s other cores as if with std ``m^{-1/2}``.
        """
        d, m = self.out_features, config.bottleneck
        device = self.get_base_layer().weight.device
        tt_d = tt_factor(d, m, config, layer_name=current_key, device=device)
        tt_u = tt_factor(d, m, config, layer_name=current_key, device=device)
        tensornets.init_factorization_(tt_d, std=d**-0.5)
        tensornets.init_factorization_(tt_u, std=m**-0.5)
        with torch.no_grad():
            tt_u.cores[-1].zero_()
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
        # A new adapter follows the mode of the layer it wraps (no dropout inside a model in eval mode).
        self.delta_dropout[adapter_name].train(self.get_base_layer().training)
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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out = result
        for name in self.active_adapters:
            if self._has_adapter(name):
                out = out + self.adapter_branch(self.delta_dropout[name](result), name).to(result.dtype)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Always raises: see :data:`NOT_MERGEABLE`."""
        raise ValueError(NOT_MERGEABLE)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Always raises: a bottleneck adapter has no ``ΔW`` (see :data:`NOT_MERGEABLE`)."""
        raise ValueError(NOT_MERGEABLE)

    def __repr__(self) -> str:
        return "loretta_adp." + super().__repr__()
