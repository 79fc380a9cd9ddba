"""MoS tuner: plans the shard pools and index tables per module type, then injects :class:`MoSLayer`."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from peft.config import PeftConfig
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
    the pools; so a bad config raises with the model untouched. The tables are saved with the
    pools (checkpoint keys ``base_model.model.<layer>.mos_index_A``) and loading restores them,
    so the loaded model is the saved one whatever the seed in ``adapter_config.json``.

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

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The shared checks and key mapping, then the index tables: each in its layer's pool range, all or none.

        A checkpoint saved before the tables were stored holds none: its layers keep the tables drawn from the
        config's seed, with a warning, as that is what such a checkpoint was loaded with then.

        Raises
        ------
        ValueError
            If the checkpoint holds the tables of some layers only, or a table points outside its pools.
        """
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = {name: module for name, module in model.named_modules()
                  if isinstance(module, MoSLayer) and module._has_adapter(adapter_name)}
        keys = {f"{name}.mos_index_{ab}.{adapter_name}": (module, ab)
                for name, module in layers.items() for ab in "AB"}
        saved = [key for key in keys if key in state_dict]
        if not saved:
            if keys:  # stacklevel 5: the caller of PeftModel.from_pretrained
                warnings.warn(f"the MoS checkpoint holds no index tables (saved before they were stored): its "
                              f"{len(layers)} layer(s) keep the tables drawn from seed={config.seed} of "
                              "adapter_config.json, the saved model only if that seed and torch's random draws are the "
                              "ones it was trained with; save the adapter again to store them", UserWarning,
                              stacklevel=5)
                state_dict = {**state_dict, **{key: module._mos_tables[adapter_name]["AB".index(ab)].clone()
                                               for key, (module, ab) in keys.items()}}
            return state_dict
        in_file = lambda key: cls._remove_adapter_name_from_key(key, adapter_name)  # noqa: E731 - the key as saved
        missing = [in_file(key) for key in keys if key not in state_dict]
        if missing:
            raise ValueError(f"the checkpoint holds the MoS index tables of some layers but not of {len(missing)} "
                             f"others (e.g. {missing[:2]}): the file was altered or corrupted; save the adapter again")
        for key in saved:
            module, ab = keys[key]
            rows = module._mos_shared["AB".index(ab)][adapter_name][module.mos_group[adapter_name]].shape[0]
            table = state_dict[key]
            if table.numel() and (int(table.min()) < 0 or int(table.max()) >= rows):
                raise ValueError(f"the checkpoint's MoS index table {in_file(key)} points at rows [{int(table.min())}, "
                                 f"{int(table.max())}] of a pool of {rows} rows: the file was altered or corrupted, or "
                                 "saved with another adapter_config.json (v, c) or number of layers; save the adapter "
                                 "again")
        return state_dict
