"""MoS shard pools of a module type: their size, the feasibility check and the seeded index tables.

Index layout of a module type's pools (``n = v L c`` rows): rows ``[0, n_s)``, ``n_s = (v - p) L c``,
are shared by all ``L`` layers; layer ``l`` owns rows ``n_s + [l p c, (l + 1) p c)``. Layer ``l``'s
table for ``A`` is ``randperm(n_s)[:(r - p) c] ++ (its private rows)`` (length ``r c``), ``B``'s
the same with an independent permutation. Rank vector ``j`` of ``A_l`` is the concatenation of
the ``c`` shards ``P_A[idx_A[j c + i]]``, ``i < c``; columns of ``B_l`` likewise.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from adapters.mos.config import MoSConfig

__all__ = ["check_feasible", "group_seed", "index_tables", "pool_size"]


def pool_size(num_layers: int, v: int, c: int) -> int:
    """Rows ``n = v L c`` of each pool of a module type with ``L`` layers."""
    return v * num_layers * c


def check_feasible(config: MoSConfig, group: str, num_layers: int, shape: tuple[int, int],
                   names: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` unless module type ``group`` (``L`` layers of ``(d_out, d_in)``) fits ``config``.

    Needs ``c | d_in``, ``c | d_out`` and ``(v - p) L >= r - p`` (each layer draws ``r - p``
    distinct shared rank vectors from the ``(v - p) L`` the shared range holds). ``names``: the
    group's module names, for the message.
    """
    d_out, d_in = shape
    r, v, p, c = config.r, config.v, config.p, config.c
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    which = f"module type {group!r}" + (f" ({listed})" if names else "")
    if d_in % c or d_out % c:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names}) or "[...]"
        raise ValueError(f"c={c} must divide d_in={d_in} and d_out={d_out} of {which}; pass a c dividing both, or "
                         f"leave these layers out (exclude_modules={suffixes})")
    if (v - p) * num_layers < r - p:
        need_v = p + -(-(r - p) // num_layers)
        raise ValueError(
            f"MoS is infeasible for {which}: its {num_layers} layer(s) share (v - p) * L = "
            f"({v} - {p}) * {num_layers} = {(v - p) * num_layers} rank vectors but each layer draws r - p = {r - p} "
            f"distinct ones; pass v >= {need_v}, or r <= {p + (v - p) * num_layers}, or leave these layers out "
            "(exclude_modules) or adapt more layers of this type"
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
