"""MoS: Mixture of Shards, LoRA matrices assembled from shard pools shared across layers (Wang et al., 2024)."""

from adapters.mos.config import PEFT_TYPE, MoSConfig
from adapters.mos.layer import MoSLayer
from adapters.mos.model import MoSModel
from adapters.mos.pools import check_feasible, group_seed, index_tables, pool_size

__all__ = ["PEFT_TYPE", "MoSConfig", "MoSLayer", "MoSModel", "check_feasible", "group_seed", "index_tables", "pool_size"]
