"""LoTR: low tensor rank adaptation with factors shared across layers (Bershatsky et al., 2024)."""

from adapters._groups import group_key
from adapters.lotr.config import PEFT_TYPE, LoTRConfig
from adapters.lotr.factors import random_factors, shared_a_multiplier, step_matched_scales, tucker2_factors
from adapters.lotr.layer import LoTRLayer
from adapters.lotr.model import LoTRModel

__all__ = [
    "PEFT_TYPE",
    "LoTRConfig",
    "LoTRLayer",
    "LoTRModel",
    "group_key",
    "random_factors",
    "shared_a_multiplier",
    "step_matched_scales",
    "tucker2_factors",
]
