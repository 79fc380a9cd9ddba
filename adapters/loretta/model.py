"""LoRETTA tuners: inject :class:`LoRETTARepLayer` or :class:`LoRETTAAdpLayer` into ``nn.Linear`` targets."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from adapters._delta import DeltaTuner, LayerPlan, Target, linear_dims
from adapters.loretta.config import LoRETTABaseConfig
from adapters.loretta.layer import NOT_MERGEABLE, LoRETTAAdpLayer, LoRETTARepLayer
from adapters.loretta.placement import ADP_TARGET_MODULES, adp_default_targets

__all__ = ["LoRETTAAdpModel", "LoRETTARepModel", "is_norm_layer", "norm_layer_names"]


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``LlamaRMSNorm`` ...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)):
        return True
    return type(module).__name__.endswith("Norm")


def norm_layer_names(model: nn.Module) -> list[str]:
    """Names of the normalization layers of ``model``, counting those already in a ``modules_to_save`` wrapper."""
    names = []
    for name, module in model.named_modules():
        if any(part in ("modules_to_save", "original_module") for part in name.split(".")):
            continue  # the copies inside a wrapper: the wrapper itself stands for them
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        if is_norm_layer(original):
            names.append(name)
    return names


class _LoRETTATuner(DeltaTuner):
    """What both variants share: ``train_norms`` and the parameter report (``nn.Linear`` targets, DeltaTuner's default)."""

    def _prepare_model(self, peft_config: LoRETTABaseConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        if not peft_config.train_norms:
            return
        norms = norm_layer_names(model)
        saved = list(peft_config.modules_to_save or [])
        peft_config.modules_to_save = saved + [name for name in norms if name not in saved]

    def _plan_shared_state(self, config: LoRETTABaseConfig, adapter_name: str, targets: Sequence[Target]
                           ) -> dict[str, Optional[LayerPlan]]:
        """No shared state; warns for ``modes`` entries no target has a size for (a typo falls back to the default
        split without it)."""
        sizes = {str(n) for t in targets for n in linear_dims(t.layer)}
        sizes.add(str(getattr(config, "bottleneck", "")))
        unused = sorted(set(config.modes or {}) - sizes, key=lambda k: (len(k), k))
        if unused:
            warnings.warn(f"{self.method_name}: modes has entries for sizes {unused} that no target layer has "
                          f"(their sizes are {sorted(sizes - {''}, key=int)}): they are not used", UserWarning,
                          stacklevel=5)
        return super()._plan_shared_state(config, adapter_name, targets)

    def parameter_counts(self, adapter_name: str = "default") -> dict[str, int]:
        """Trainable parameters of one adapter, by kind.

        Returns
        -------
        dict
            ``"adapter"``: the TT cores (and biases, scales) of the adapter layers;
            ``"norms"``: normalization layers trained through ``train_norms`` (their
            ``modules_to_save`` copies); ``"other_modules"``: every other ``modules_to_save``
            copy, e.g. a sequence-classification head.
        """
        counts = {"adapter": 0, "norms": 0, "other_modules": 0}
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls) and module._has_adapter(adapter_name):
                counts["adapter"] += sum(p.numel() for p in module.adapter_parameters(adapter_name))
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                copy = module.modules_to_save[adapter_name]
                kind = "norms" if is_norm_layer(copy) else "other_modules"
                counts[kind] += sum(p.numel() for p in copy.parameters())
        return counts


class LoRETTARepModel(_LoRETTATuner):
    """PEFT tuner for LoRETTA_rep (use through ``peft.get_peft_model(model, LoRETTARepConfig(...))``).

    Every adapted ``nn.Linear`` owns its two trains (no shared state). Default targets: PEFT's
    LoRA targets per architecture.

    Examples
    --------
    >>> import adapters  # registers LoRETTA with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(bert, adapters.LoRETTARepConfig(r=8, tt_rank=5, target_modules=["query", "value"]))
    >>> model.base_model.parameter_counts()
    {'adapter': ..., 'norms': 0, 'other_modules': 0}
    """

    prefix = "loretta_rep_"
    tuner_layer_cls = LoRETTARepLayer
    method_name = "LoRETTA-rep"


class LoRETTAAdpModel(_LoRETTATuner):
    """PEFT tuner for LoRETTA_adp (use through ``peft.get_peft_model(model, LoRETTAAdpConfig(...))``).

    Wraps each target ``nn.Linear`` (an output projection) with a bottleneck on its output.
    Default targets: :data:`ADP_TARGET_MODULES` for the model types it lists, else the attention
    and FFN output projections of the blocks found in the model
    (:func:`~adapters.loretta.placement.find_adp_placement`). Merging raises
    (:data:`~adapters.loretta.layer.NOT_MERGEABLE`); ``unload()`` works.

    Examples
    --------
    >>> model = get_peft_model(bert, adapters.LoRETTAAdpConfig(bottleneck=64, train_norms=True))
    """

    prefix = "loretta_adp_"
    tuner_layer_cls = LoRETTAAdpLayer
    method_name = "LoRETTA-adp"
    target_module_mapping = ADP_TARGET_MODULES

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        # The table for the model types it lists, else the blocks read off the model (placement.py).
        if peft_config.target_modules is None:
            peft_config.target_modules = set(adp_default_targets(self.model, model_config.get("model_type")))
        return super()._prepare_adapter_config(peft_config, model_config)
