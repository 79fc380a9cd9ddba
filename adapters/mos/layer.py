"""MoS layer: a frozen ``nn.Linear`` plus ``s · B_l A_l`` assembled from shard pools shared across layers.

The pools and this layer's index tables come from the tuner's plan (:mod:`adapters.mos.pools`,
:meth:`adapters.mos.model.MoSModel._plan_shared_state`) and reach the layer as data, a
:class:`~adapters._delta.LayerPlan`.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from adapters._delta import DeltaLayer, LayerPlan, linear_dims
from adapters.mos.config import MoSConfig

__all__ = ["MoSLayer"]


class MoSLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · (x A_lᵀ) B_lᵀ`` with ``A_l``, ``B_l`` gathered from shared pools.

    The pools live once on the tuner (``mos_A[adapter][group]: (n, d_in / c)``,
    ``mos_B[adapter][group]: (n, d_out / c)``); this layer keeps a reference to those
    containers and its index tables ``mos_index_A[adapter]``, ``mos_index_B[adapter]``
    (``(r c,)`` int64 buffers, drawn from the seed and saved in the checkpoint, so a load never depends on the
    seed or on torch's random number generator staying the same across versions). Forward
    cost: a gather of ``r (d_in + d_out)`` values plus ``O(N r (d_in + d_out))``; the gather's
    backward scatter-adds into the pools.
    """

    adapter_layer_names = ()
    other_param_names = ("delta_dropout", "mos_index_A", "mos_index_B", "mos_group", "mos_scale", "mos_rank")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: MoSConfig, *, current_key: str, plan: LayerPlan
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.mos_index_A = BufferDict(persistent=True)
        self.mos_index_B = BufferDict(persistent=True)
        self._mos_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU copies of the index tables
        self.register_load_state_dict_post_hook(self._keep_loaded_tables)
        self.mos_group: dict[str, str] = {}
        self.mos_scale: dict[str, float] = {}
        self.mos_rank: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = linear_dims(base)  # nn.Linear or GPT-2's Conv1D
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key, plan=plan)

    def update_layer(self, adapter_name: str, config: MoSConfig, *, current_key: str, plan: LayerPlan) -> None:
        """Add adapter ``adapter_name``: its group and index tables ``plan.tensors["index_A" | "index_B"]``.

        ``plan.containers`` are the tuner's ``(mos_A, mos_B)``, already holding the group's pools.
        """
        # A plain tuple: registering the tuner's containers here would save them once per layer.
        self._mos_shared = plan.containers
        device = self.get_base_layer().weight.device
        self.mos_group[adapter_name] = plan.group
        # copies, not views of the buffers (on CPU .cpu() returns the same tensor): what a load writes into the
        # buffers reaches these only through _keep_loaded_tables, on any device
        self._mos_tables[adapter_name] = (plan.tensors["index_A"].cpu().clone(), plan.tensors["index_B"].cpu().clone())
        self.mos_index_A[adapter_name] = plan.tensors["index_A"].to(device)
        self.mos_index_B[adapter_name] = plan.tensors["index_B"].to(device)
        self.mos_scale[adapter_name] = config.alpha / config.r
        self.mos_rank[adapter_name] = config.r
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.to_empty``), then the index tables written again.

        A model built on the meta device and materialised with ``to_empty`` (FSDP's meta init) and then given only
        its base weights would otherwise route through uninitialised memory: the tables are not learned, so
        nothing else sets them.
        """
        super()._apply(fn, recurse)
        with torch.no_grad():
            for name, tables in self._mos_tables.items():
                for buffers, table in zip((self.mos_index_A, self.mos_index_B), tables):
                    if name in buffers and not buffers[name].is_meta:
                        buffers[name].copy_(table)
        return self

    @staticmethod
    def _keep_loaded_tables(module: "MoSLayer", incompatible_keys) -> None:
        """After a ``load_state_dict``: the CPU copies :meth:`_apply` writes back become the loaded tables.

        A post hook, as the tables live in child ``BufferDict`` modules that load after this module's own
        ``_load_from_state_dict``.
        """
        for name in module._mos_tables:
            tables = (module.mos_index_A[name], module.mos_index_B[name])
            if not any(table.is_meta for table in tables):
                module._mos_tables[name] = tuple(table.detach().cpu().clone() for table in tables)

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.mos_group

    def _get_available_adapters(self) -> set[str]:
        # PEFT reads adapter names from the per-layer parameter containers; a MoS layer holds none (its pools live on
        # the tuner), so without this get_layer_status / get_model_status would list no adapter for it.
        return set(self.mos_group)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_l, B_lᵀ)`` of one adapter, shapes ``(r, d_in)`` and ``(r, d_out)``, gathered from the pools."""
        group, r = self.mos_group[adapter_name], self.mos_rank[adapter_name]
        pool_a, pool_b = (shared[adapter_name][group] for shared in self._mos_shared)
        a = pool_a.index_select(0, self.mos_index_A[adapter_name]).reshape(r, self.in_features)
        b_t = pool_b.index_select(0, self.mos_index_B[adapter_name]).reshape(r, self.out_features)
        return a, b_t

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW_l = s · B_l A_l``, shape ``(d_out, d_in)``."""
        a, b_t = self.factors(adapter_name)
        return self.mos_scale[adapter_name] * (b_t.T @ a)

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · (x A_lᵀ) B_lᵀ`` for ``x: (..., d_in)``; cost ``O(N r (d_in + d_out))`` plus the gather."""
        a, b_t = self.factors(adapter_name)
        return (x.to(a.dtype) @ a.T) @ (self.mos_scale[adapter_name] * b_t)

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors of ``ΔW_l``: the assembled ``(A_l, s · B_l)``, in float64.

        Shapes ``(r, d_in)`` and ``(d_out, r)``; their product is ``ΔW_l``, rank ``r``.
        """
        a, b_t = (t.detach().double() for t in self.factors(adapter_name))
        return a, self.mos_scale[adapter_name] * b_t.T

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` contract: ``ΔW`` is an additive ``(d_out, d_in)`` update of a linear layer."""
        return True

    def __repr__(self) -> str:
        return "mos." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: group={g}" for name, g in self.mos_group.items())
