"""MoS layer: a frozen ``nn.Linear`` plus ``s · B_l A_l`` assembled from shard pools shared across layers.

Index layout of a module type's pools (``n = v L c`` rows): rows ``[0, n_s)``, ``n_s = (v - p) L c``,
are shared by all ``L`` layers; layer ``l`` owns rows ``n_s + [l p c, (l + 1) p c)``. Layer ``l``'s
table for ``A`` is ``randperm(n_s)[:(r - p) c] ++ (its private rows)`` (length ``r c``), ``B``'s
the same with an independent permutation. Rank vector ``j`` of ``A_l`` is the concatenation of
the ``c`` shards ``P_A[idx_A[j c + i]]``, ``i < c``; columns of ``B_l`` likewise.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from adapters._delta import DeltaLayer
from adapters.mos.config import MoSConfig

if TYPE_CHECKING:
    from adapters.mos.model import MoSModel

__all__ = ["MoSLayer", "check_feasible", "group_seed", "index_tables", "pool_size"]


def pool_size(num_layers: int, v: int, c: int) -> int:
    """Rows ``n = v L c`` of each pool of a module type with ``L`` layers."""
    return v * num_layers * c


def check_feasible(config: MoSConfig, group: str, num_layers: int, shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless module type ``group`` (``L`` layers of ``(d_out, d_in)``) fits ``config``.

    Needs ``c | d_in``, ``c | d_out`` and ``(v - p) L >= r - p`` (each layer draws ``r - p``
    distinct shared rank vectors from the ``(v - p) L`` the shared range holds).
    """
    d_out, d_in = shape
    r, v, p, c = config.r, config.v, config.p, config.c
    if d_in % c or d_out % c:
        raise ValueError(
            f"c={c} must divide d_in={d_in} and d_out={d_out} of module type {group!r}; pass a c dividing both"
        )
    if (v - p) * num_layers < r - p:
        raise ValueError(
            f"MoS is infeasible for module type {group!r}: its {num_layers} layer(s) share (v - p) * L = "
            f"({v} - {p}) * {num_layers} = {(v - p) * num_layers} rank vectors but each layer draws r - p = {r - p} "
            "distinct ones; raise v, lower r, or adapt more layers of this type"
        )


def group_seed(seed: int, group: str) -> int:
    """Seed of one module type's tables: stable across processes (``zlib.crc32``, not ``hash``)."""
    return (seed * 0x9E3779B1 + zlib.crc32(group.encode())) % (2**63)


def index_tables(num_layers: int, config: MoSConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tables ``(idx_A, idx_B)``, each ``(L, r c)`` int64, of one module type.

    Row ``l``: ``(r - p) c`` distinct shared rows (a fresh permutation of ``[0, n_s)``; ``A``
    and ``B`` draw independently) followed by layer ``l``'s ``p c`` private rows.
    """
    r, v, p, c = config.r, config.v, config.p, config.c
    n_shared = (v - p) * num_layers * c
    tables_a, tables_b = [], []
    for layer in range(num_layers):
        private = n_shared + torch.arange(layer * p * c, (layer + 1) * p * c)
        for tables in (tables_a, tables_b):
            shared = torch.randperm(n_shared, generator=generator)[: (r - p) * c]
            tables.append(torch.cat([shared, private]))
    return torch.stack(tables_a), torch.stack(tables_b)


class MoSLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · (x A_lᵀ) B_lᵀ`` with ``A_l``, ``B_l`` gathered from shared pools.

    The pools live once on the tuner (``mos_A[adapter][group]: (n, d_in / c)``,
    ``mos_B[adapter][group]: (n, d_out / c)``); this layer keeps a reference to those
    containers and its index tables ``mos_index_A[adapter]``, ``mos_index_B[adapter]``
    (``(r c,)`` int64, non-persistent buffers: rebuilt from the seed, never saved). Forward
    cost: a gather of ``r (d_in + d_out)`` values plus ``O(N r (d_in + d_out))``; the gather's
    backward scatter-adds into the pools.
    """

    adapter_layer_names = ()
    other_param_names = ("delta_dropout", "mos_index_A", "mos_index_B", "mos_group", "mos_scale", "mos_rank")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: MoSConfig, *, current_key: str, tuner: MoSModel
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.mos_index_A = BufferDict(persistent=False)
        self.mos_index_B = BufferDict(persistent=False)
        self.mos_group: dict[str, str] = {}
        self.mos_scale: dict[str, float] = {}
        self.mos_rank: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        # A plain tuple: registering the tuner's containers here would save them once per layer.
        self._mos_shared = (tuner.mos_A, tuner.mos_B)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key, tuner=tuner)

    def update_layer(self, adapter_name: str, config: MoSConfig, *, current_key: str, tuner: MoSModel) -> None:
        """Add adapter ``adapter_name``: take this layer's group and index tables from the tuner's plan."""
        group, idx_a, idx_b = tuner.planned_layer(adapter_name, current_key)
        device = self.get_base_layer().weight.device
        self.mos_group[adapter_name] = group
        self.mos_index_A[adapter_name] = idx_a.to(device)
        self.mos_index_B[adapter_name] = idx_b.to(device)
        self.mos_scale[adapter_name] = config.alpha / config.r
        self.mos_rank[adapter_name] = config.r
        self._set_dropout(adapter_name, config.dropout)
        # A new adapter follows the mode of the layer it wraps (no dropout inside a model in eval mode).
        self.delta_dropout[adapter_name].train(self.get_base_layer().training)
        self.set_adapter(self.active_adapters)

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.mos_group

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
