"""LoTR layer: a frozen ``nn.Linear`` plus ``s · A G_m B`` with group-shared ``A``, ``B``.

The layer owns its core ``G_m``; ``A`` and ``B`` are created by the tuner's plan
(:meth:`adapters.lotr.model.LoTRModel._plan_shared_state`) and reach the layer as data, a
:class:`~adapters._delta.LayerPlan` naming its group and the tuner's containers.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters._delta import ADAPTER_DTYPE, DeltaLayer, LayerPlan, linear_dims
from adapters.lotr.config import LoTRConfig
from adapters.lotr.factors import shared_a_multiplier

__all__ = ["LoTRLayer"]


class LoTRLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · ((x Bᵀ) G_mᵀ) Aᵀ`` for a frozen ``nn.Linear``.

    The private core ``G_m`` lives here (``lotr_core[adapter]``); ``A`` and ``B`` live once on
    the tuner (``lotr_A[adapter][group]``, ``lotr_B[adapter][group]``) and this layer only
    keeps a reference to those containers. ``A`` is used as ``μ A_stored`` with the group's fixed
    multiplier ``μ`` (``lotr_multiplier[adapter]``, derived from the shape and
    ``config.init_weights``, never saved: :func:`~adapters.lotr.factors.shared_a_multiplier`).
    Forward cost of the update:
    ``O(N r (d_in + r + d_out))`` for ``N`` rows of ``x``; no ``(d_out, d_in)`` matrix is built.
    """

    adapter_layer_names = ("lotr_core",)
    other_param_names = ("delta_dropout", "lotr_group", "lotr_scale", "lotr_multiplier")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoTRConfig, *, current_key: str, plan: LayerPlan
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.lotr_core = nn.ParameterDict()
        self.lotr_group: dict[str, str] = {}
        self.lotr_scale: dict[str, float] = {}
        self.lotr_multiplier: dict[str, float] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_dims(base)  # nn.Linear or GPT-2's Conv1D
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key, plan=plan)

    def update_layer(self, adapter_name: str, config: LoTRConfig, *, current_key: str, plan: LayerPlan) -> None:
        """Add adapter ``adapter_name``: join the group its plan names and add a zero core ``(r, r)``.

        ``plan.containers`` are the tuner's ``(lotr_A, lotr_B)``, already holding the group's factors.
        """
        # A plain tuple: registering the tuner's containers here would save them once per layer.
        self._lotr_shared = plan.containers
        device = self.get_base_layer().weight.device
        self.lotr_group[adapter_name] = plan.group
        self.lotr_scale[adapter_name] = config.alpha / config.r
        self.lotr_multiplier[adapter_name] = shared_a_multiplier(self.in_features, config.r, config.init_weights)
        self.lotr_core[adapter_name] = nn.Parameter(
            torch.zeros(config.r, config.r, dtype=ADAPTER_DTYPE, device=device)
        )
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def shared_factors(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The group's stored parameters ``(A_stored, B)``, shapes ``(d_out, r)`` and ``(r, d_in)``; ``A = μ A_stored``."""
        group = self.lotr_group[adapter_name]
        shared_a, shared_b = self._lotr_shared
        return shared_a[adapter_name][group], shared_b[adapter_name][group]

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, G_m, B)`` of one adapter, ``A = μ A_stored``: shapes ``(d_out, r)``, ``(r, r)``, ``(r, d_in)``."""
        a_stored, b = self.shared_factors(adapter_name)
        multiplier = self.lotr_multiplier[adapter_name]
        return (a_stored if multiplier == 1.0 else multiplier * a_stored), self.lotr_core[adapter_name], b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW_m = s · A G_m B``, shape ``(d_out, d_in)``."""
        a, g, b = self.factors(adapter_name)
        return self.lotr_scale[adapter_name] * (a @ (g @ b))

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · ((x Bᵀ) G_mᵀ) Aᵀ`` for ``x: (..., d_in)``; cost ``O(N r (d_in + r + d_out))``."""
        a, g, b = self.factors(adapter_name)
        h = x.to(g.dtype) @ b.T
        return (h @ (self.lotr_scale[adapter_name] * g.T)) @ a.T

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors of ``ΔW_m``: ``(A_lora, B_lora) = (B, s · A G_m)``, in float64.

        Shapes ``(r, d_in)`` and ``(d_out, r)``; ``B_lora A_lora = s · A G_m B = ΔW_m``, rank ``r``.
        """
        a, g, b = (t.detach().double() for t in self.factors(adapter_name))
        return b.clone(), self.lotr_scale[adapter_name] * (a @ g)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` contract: ``ΔW`` is an additive ``(d_out, d_in)`` update of a linear layer."""
        return True

    def __repr__(self) -> str:
        return "lotr." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: group={g}" for name, g in self.lotr_group.items())
