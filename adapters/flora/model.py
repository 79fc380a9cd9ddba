"""FLoRA tuner: injects :class:`FloraLayer` into Linear, Embedding and Conv{1,2,3}d layers."""

from __future__ import annotations

from adapters._delta import DeltaTuner
from adapters.flora.layer import SUPPORTED_LAYERS, FloraLayer

__all__ = ["FloraModel"]


class FloraModel(DeltaTuner):
    """PEFT tuner for FLoRA (use through ``peft.get_peft_model(model, FloraConfig(...))``).

    Every adapted layer owns its core and factors (no shared state). Adapts the layer types of
    :data:`~adapters.flora.layer.SUPPORTED_LAYERS` (and their subclasses).

    Examples
    --------
    >>> import adapters  # registers FLoRA with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(cnn, adapters.FloraConfig(r=[16, 16, 2, 2], target_modules=["conv1"]))
    """

    prefix = "flr_"
    tuner_layer_cls = FloraLayer
    method_name = "FLoRA"
    supported_layers = tuple(SUPPORTED_LAYERS)
