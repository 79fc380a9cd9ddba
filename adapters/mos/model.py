"""MoS tuner: plans the shard pools and index tables per module type, then injects :class:`MoSLayer`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from adapters._delta import ADAPTER_DTYPE, DeltaTuner, LayerPlan, Target, weight_matrix
from adapters._groups import group_targets
from adapters.mos.config import MoSConfig
from adapters.mos.layer import MoSLayer
from adapters.mos.pools import check_feasible, group_seed, index_tables, pool_size

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
    method_name = "MoS"
    uses_shared_state = True
    shared_state_names = ("mos_A", "mos_B")

    def _plan_shared_state(
        self, config: MoSConfig, adapter_name: str, targets: Sequence[Target]
    ) -> dict[str, LayerPlan]:
        """Group the targets, check them, draw the index tables and create the pools of ``adapter_name``.

        Each target's plan carries its index tables as ``tensors["index_A"]``, ``tensors["index_B"]``
        (``(r c,)`` int64).

        Raises
        ------
        ValueError
            If a module type is infeasible or ``c`` does not divide its dimensions (:func:`check_feasible`).
        """
        groups = group_targets(targets, "suffix")
        for group, members in groups.items():
            check_feasible(config, group, len(members), tuple(weight_matrix(members[0].layer).shape),
                           [member.key for member in members])
        plan, pools_a, pools_b = {}, nn.ParameterDict(), nn.ParameterDict()
        containers = (self.mos_A, self.mos_B)
        for group, members in groups.items():
            weight = weight_matrix(members[0].layer)
            (d_out, d_in), num_layers = weight.shape, len(members)
            generator = torch.Generator().manual_seed(group_seed(config.seed, group))
            tables_a, tables_b = index_tables(num_layers, config, generator)
            for layer, member in enumerate(members):
                plan[member.key] = LayerPlan(group, containers, {"index_A": tables_a[layer], "index_B": tables_b[layer]})
            n, c, device = pool_size(num_layers, config.v, config.c), config.c, weight.device
            bound = d_in**-0.5  # LoRA's Kaiming-uniform A (a = sqrt(5)): U(±1/sqrt(fan_in)), fan_in = d_in
            pool_a = torch.empty(n, d_in // c, dtype=ADAPTER_DTYPE, device=device).uniform_(-bound, bound)
            pools_a[group] = nn.Parameter(pool_a)
            pools_b[group] = nn.Parameter(torch.zeros(n, d_out // c, dtype=ADAPTER_DTYPE, device=device))
        self.mos_A[adapter_name] = pools_a
        self.mos_B[adapter_name] = pools_b
        return plan

    def index_tables(self, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (idx_A, idx_B)}`` of one adapter, each ``(r c,)`` int64."""
        return {
            name: (module.mos_index_A[adapter_name], module.mos_index_B[adapter_name])
            for name, module in self.model.named_modules()
            if isinstance(module, MoSLayer) and module._has_adapter(adapter_name)
        }
