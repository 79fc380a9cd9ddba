"""LoRETTA: tensor-train adapters, as TT-factored LoRA (rep) or TT bottlenecks (adp) (Yang et al., 2024)."""

from adapters.loretta.config import (
    PEFT_TYPE_ADP,
    PEFT_TYPE_REP,
    LoRETTAAdpConfig,
    LoRETTABaseConfig,
    LoRETTARepConfig,
)
from adapters.loretta.layer import (
    NOT_MERGEABLE,
    adp_step_matched_init_,
    LoRETTAAdpLayer,
    LoRETTARepLayer,
    factor_modes,
    factor_parameter_count,
    min_parameter_modes,
    paper_init_,
    step_matched_init_,
    tt_factor,
)
from adapters.loretta.model import LoRETTAAdpModel, LoRETTARepModel, is_norm_layer, norm_layer_names
from adapters.loretta.placement import ADP_TARGET_MODULES, adp_default_targets, find_adp_placement

__all__ = [
    "ADP_TARGET_MODULES",
    "NOT_MERGEABLE",
    "PEFT_TYPE_ADP",
    "PEFT_TYPE_REP",
    "LoRETTAAdpConfig",
    "LoRETTAAdpLayer",
    "LoRETTAAdpModel",
    "LoRETTABaseConfig",
    "LoRETTARepConfig",
    "LoRETTARepLayer",
    "LoRETTARepModel",
    "adp_default_targets",
    "adp_step_matched_init_",
    "factor_modes",
    "factor_parameter_count",
    "find_adp_placement",
    "is_norm_layer",
    "min_parameter_modes",
    "norm_layer_names",
    "paper_init_",
    "step_matched_init_",
    "tt_factor",
]
