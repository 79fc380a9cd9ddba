"""Tensor adapters for PEFT: LoTR, FLoRA, LoRETTA (rep, adp) and MoS.

Importing this package registers every method with PEFT (see :mod:`adapters._registry`), so
``peft.get_peft_model(model, LoTRConfig(...))``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work as for PEFT's own methods. :func:`to_lora` and
:func:`export_lora` turn a LoTR, LoRETTA-rep, MoS or FLoRA adapter into an exactly equivalent
plain LoRA, which vLLM, TGI and Diffusers serve without this package. The import name is
shared with the AdapterHub library: the two cannot be installed side by side.

Adding a method: a package ``adapters/<method>/`` (config, layer, model; the layer subclasses
:class:`adapters._delta.DeltaLayer`, the tuner :class:`adapters._delta.DeltaTuner` and names the
layer types it adapts; state shared across layers is planned by the tuner for all targets first and
reaches each layer as data, a :class:`adapters._delta.LayerPlan`, so ``layer.py`` never imports
``model.py``), one line in ``_METHODS`` below, and rows in ``tests/adapters/conformance.py``'s case
table. The packaged models (MiniLM, SmolLM2) load from :mod:`tensornets.models`. A method
whose update is ``ΔW = B A`` also gives its layer ``lora_factors`` and
``supports_lora_conversion`` (see :mod:`adapters.lora_export`).
"""

from adapters import _registry, flora, loretta, lotr, mos
from adapters._delta import UnsupportedLayerError
from adapters.flora import FloraConfig, FloraModel
from adapters.lora_export import export_lora, to_lora
from adapters.loretta import LoRETTAAdpConfig, LoRETTAAdpModel, LoRETTARepConfig, LoRETTARepModel
from adapters.lotr import LoTRConfig, LoTRModel
from adapters.lowrank_init import init_from_lowrank
from adapters.mos import MoSConfig, MoSModel

__all__ = [
    "FloraConfig",
    "FloraModel",
    "LoRETTAAdpConfig",
    "LoRETTAAdpModel",
    "LoRETTARepConfig",
    "LoRETTARepModel",
    "LoTRConfig",
    "LoTRModel",
    "MoSConfig",
    "MoSModel",
    "UnsupportedLayerError",
    "export_lora",
    "init_from_lowrank",
    "to_lora",
]

#: (peft type, config class, tuner class) of every method; the tuner carries the prefix.
_METHODS = (
    (lotr.PEFT_TYPE, LoTRConfig, LoTRModel),
    (flora.PEFT_TYPE, FloraConfig, FloraModel),
    (loretta.PEFT_TYPE_REP, LoRETTARepConfig, LoRETTARepModel),
    (loretta.PEFT_TYPE_ADP, LoRETTAAdpConfig, LoRETTAAdpModel),
    (mos.PEFT_TYPE, MoSConfig, MoSModel),
)

_registry.check_peft_version()
for _peft_type, _config_cls, _model_cls in _METHODS:
    _registry.register(_peft_type, prefix=_model_cls.prefix, config_cls=_config_cls, model_cls=_model_cls)
