"""FLoRA: Tucker-format updates of Linear, Embedding and Conv weights (Si et al., 2024)."""

from adapters.flora.config import PEFT_TYPE, FloraConfig
from adapters.flora.layer import FloraLayer, resolve_ranks, step_matched_stds
from adapters.flora.model import FloraModel

__all__ = [
    "PEFT_TYPE",
    "FloraConfig",
    "FloraLayer",
    "FloraModel",
    "resolve_ranks",
    "step_matched_stds",
]
