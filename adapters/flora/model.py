"""FLoRA tuner: injects :class:`FloraLayer` into Linear, Embedding and Conv{1,2,3}d layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from adapters._delta import DeltaTuner
from adapters.flora.config import FloraConfig
from adapters.flora.layer import SUPPORTED_LAYERS, FloraLayer, delta_forward_for

__all__ = ["FloraModel"]


class FloraModel(DeltaTuner):
    """PEFT tuner for FLoRA (use through ``peft.get_peft_model(model, FloraConfig(...))``).

    Every adapted layer owns its core and factors (no shared state).

    Examples
    --------
    >>> import adapters  # registers FLoRA with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(cnn, adapters.FloraConfig(r=[16, 16, 2, 2], target_modules=["conv1"]))
    """

    prefix = "flr_"
    tuner_layer_cls = FloraLayer

    def _create_new_module(self, config: FloraConfig, adapter_name: str, target: nn.Module, current_key: str):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if delta_forward_for(base) is None:
            names = ", ".join(cls.__name__ for cls in SUPPORTED_LAYERS)
            raise TypeError(
                f"FLoRA adapts {names}; target {current_key!r} is {type(base).__name__}. "
                "Leave it out of target_modules"
            )
        return FloraLayer(target, adapter_name, config, current_key=current_key)
