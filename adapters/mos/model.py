"""MoS tuner: plans the shard pools and index tables per module type, then injects :class:`MoSLayer`."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from torch import nn

from adapters._delta import ADAPTER_DTYPE, DeltaTuner
from adapters.lotr.layer import group_key
from adapters.mos.config import MoSConfig
from adapters.mos.layer import MoSLayer, check_feasible, group_seed, index_tables, pool_size

__all__ = ["MoSModel"]


class MoSModel(DeltaTuner):
    """PEFT tuner for MoS (use through ``peft.get_peft_model(model, MoSConfig(...))``).

    Shared state: ``mos_A[adapter][group]: (n, d_in / c)`` and ``mos_B[adapter][group]: (n, d_out / c)``
    live here once (checkpoint keys ``base_model.mos_A.<group>``); a group is a module type, named
    like LoTR's ``share="suffix"`` groups (``q_proj_4096x4096``). Before any layer is created the
    tuner lists every target per group (in module order, which fixes each layer's index ``l``),
    checks feasibility and divisibility, draws the index tables from ``config.seed`` and creates
    the pools; so a bad config raises with the model untouched, and the same seed on the same
    model rebuilds the same tables when a checkpoint is loaded.

    Examples
    --------
    >>> import adapters  # registers MoS with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(llama, adapters.MoSConfig(r=16, v=4, p=2, c=4, target_modules=["q_proj", "v_proj"]))
    """

    prefix = "mos_"
    tuner_layer_cls = MoSLayer
    uses_shared_state = True
    shared_state_names = ("mos_A", "mos_B")

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self._mos_plan: dict[str, dict[str, tuple[str, torch.Tensor, torch.Tensor]]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._plan(model, self.peft_config[adapter_name], adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            for attr in self.shared_state_names:
                getattr(self, attr).pop(adapter_name, None)
            raise
        finally:
            self._mos_plan.pop(adapter_name, None)

    def _targets(self, model: nn.Module, config: MoSConfig) -> list[tuple[str, nn.Linear]]:
        """``(name, base linear)`` of every module this config targets, in module order."""
        config = _maybe_include_all_linear_layers(self._prepare_adapter_config(config, self.get_model_config(model)), model)
        targets, tuner_layers = [], []
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in tuner_layers):
                continue
            if isinstance(module, BaseTunerLayer):
                tuner_layers.append(key + ".")
            if not self._check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, nn.Linear):
                raise TypeError(
                    f"MoS adapts nn.Linear layers only; target {key!r} is {type(base).__name__}. "
                    "Leave it out of target_modules"
                )
            targets.append((key, base))
        return targets

    def _plan(self, model: nn.Module, config: MoSConfig, adapter_name: str) -> None:
        """Group the targets, check them, draw the index tables and create the pools of ``adapter_name``."""
        groups: dict[str, list[tuple[str, nn.Linear]]] = {}
        for key, base in self._targets(model, config):
            groups.setdefault(group_key(key, (base.out_features, base.in_features), "suffix"), []).append((key, base))
        for group, members in groups.items():
            base = members[0][1]
            check_feasible(config, group, len(members), (base.out_features, base.in_features))
        plan, pools_a, pools_b = {}, nn.ParameterDict(), nn.ParameterDict()
        for group, members in groups.items():
            base = members[0][1]
            d_out, d_in, num_layers = base.out_features, base.in_features, len(members)
            generator = torch.Generator().manual_seed(group_seed(config.seed, group))
            tables_a, tables_b = index_tables(num_layers, config, generator)
            for layer, (key, _) in enumerate(members):
                plan[key] = (group, tables_a[layer], tables_b[layer])
            n, c, device = pool_size(num_layers, config.v, config.c), config.c, base.weight.device
            bound = d_in**-0.5  # LoRA's Kaiming-uniform A (a = sqrt(5)): U(±1/sqrt(fan_in)), fan_in = d_in
            pool_a = torch.empty(n, d_in // c, dtype=ADAPTER_DTYPE, device=device).uniform_(-bound, bound)
            pools_a[group] = nn.Parameter(pool_a)
            pools_b[group] = nn.Parameter(torch.zeros(n, d_out // c, dtype=ADAPTER_DTYPE, device=device))
        self._mos_plan[adapter_name] = plan
        self.mos_A[adapter_name] = pools_a
        self.mos_B[adapter_name] = pools_b

    def planned_layer(self, adapter_name: str, key: str) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``(group, idx_A, idx_B)`` planned for the target ``key`` (only during injection)."""
        return self._mos_plan[adapter_name][key]

    def _create_new_module(self, config: MoSConfig, adapter_name: str, target: nn.Module, current_key: str):
        return MoSLayer(target, adapter_name, config, current_key=current_key, tuner=self)

    def index_tables(self, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (idx_A, idx_B)}`` of one adapter, each ``(r c,)`` int64."""
        return {
            name: (module.mos_index_A[adapter_name], module.mos_index_B[adapter_name])
            for name, module in self.model.named_modules()
            if isinstance(module, MoSLayer) and module._has_adapter(adapter_name)
        }
