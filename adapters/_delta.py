"""Additive-update adapters: the PEFT layer and tuner machinery every method of ours shares.

Each method here adapts a frozen layer by an additive weight update,
``W = W0 + ΔW``, and computes ``ΔW x`` in factorized form. What differs between methods is
only how ``ΔW`` is parametrized; merging, unmerging, NaN-safe merging, enabling / disabling,
several named adapters, dtype handling and state shared across layers (kept on the tuner in
containers keyed by adapter name, PEFT's ``uses_shared_state`` convention) are written once
here.

A method subclasses :class:`DeltaLayer` (implementing ``update_layer``, ``get_delta_weight``
and ``delta_forward``) and :class:`DeltaTuner` (implementing ``_create_new_module``, and
listing its shared containers in ``shared_state_names``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

__all__ = ["ADAPTER_DTYPE", "DeltaConfig", "DeltaLayer", "DeltaTuner"]

#: Adapters are created in float32 whatever the base dtype (PEFT's ``autocast_adapter_dtype``).
ADAPTER_DTYPE = torch.float32


@dataclass
class DeltaConfig(PeftConfig):
    """Fields every additive-update method shares (module selection as in PEFT's LoRA, dropout)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or a regex of the modules to adapt, or 'all-linear'. "
            "Default: PEFT's LoRA defaults for the model architecture (e.g. query/value for BERT)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability on the input of the update (training mode only)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted ones to train fully and save, e.g. a classifier head."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (with list target_modules)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer ModuleList for layers_to_transform, e.g. 'layers'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform; pass both or neither"
            )


class DeltaLayer(nn.Module, BaseTunerLayer):
    """Base of a tuner layer computing ``y = base(x) + Σ_{a active} Δ_a(x)``.

    Subclasses set ``adapter_layer_names`` (containers of trainable per-adapter parameters)
    and implement :meth:`get_delta_weight` (``ΔW`` in the base weight's shape, for merging)
    and :meth:`delta_forward` (the factorized ``Δ(x)``, never building ``ΔW`` for a linear
    layer). Adapter parameters stay in their own dtype (float32 by default); inputs are cast
    to it at the boundary and the update is cast back to the base output's dtype.
    """

    other_param_names: tuple[str, ...] = ("delta_dropout",)

    def _init_delta_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.delta_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def _set_dropout(self, adapter_name: str, p: float) -> None:
        self.delta_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` of one adapter, same shape as the base weight, in the adapter's dtype."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The update ``Δ(x)`` of one adapter, in the adapter's dtype (``x`` is the raw input)."""
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters this layer holds for one adapter (shared ones live on the tuner)."""
        params = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                params.extend(_parameters_of(container[adapter_name]))
        return params

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``ΔW`` of the given (default: active) adapters into the base weight.

        Parameters
        ----------
        safe_merge : bool
            Compute the merged weight in a copy first and raise ``ValueError`` if it holds a NaN
            or inf (the base weight is then left untouched).
        adapter_names : list of str, optional
            Adapters to merge; default the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if not self._has_adapter(name):
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"safe_merge: merging adapter {name!r} into {type(base).__name__} gives non-finite "
                        "weights (NaN or inf); the adapter is broken, the base weight was left unchanged"
                    )
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again (last merged first)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._has_adapter(name):
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if self._has_adapter(name):
                x_in = self.delta_dropout[name](x) if x.is_floating_point() else x
                result = result + self.delta_forward(x_in, name).to(result.dtype)
        return result

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # PEFT's version also casts to the base dtype (and relies on a later upcast); ours keep
        # their own dtype so float32 initial values are never rounded through bfloat16.
        if device is None:
            device = self.get_base_layer().weight.device
        for param in self.adapter_parameters(adapter_name):
            if param.device != torch.device("meta"):
                param.data = param.data.to(device)


class DeltaTuner(BaseTuner):
    """Base tuner for :class:`DeltaLayer` methods.

    Class attributes for subclasses: ``prefix``, ``tuner_layer_cls``, ``shared_state_names``
    (names of tuner attributes that are ``nn.ModuleDict`` keyed by adapter name, each entry a
    container of parameters shared by several layers; they are saved once, follow
    ``set_adapter`` / ``delete_adapter`` and the dtype policy like the layers' own
    parameters). Subclasses implement :meth:`_create_new_module` and may override
    :meth:`_init_shared_state` (called after all layers of an adapter are created).
    """

    shared_state_names: tuple[str, ...] = ()
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        for attr in self.shared_state_names:
            setattr(self, attr, nn.ModuleDict())

    def _init_shared_state(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Hook run once all layers of ``adapter_name`` exist (e.g. data-dependent init)."""

    def _create_new_module(self, config: Any, adapter_name: str, target: nn.Module, current_key: str) -> nn.Module:
        raise NotImplementedError

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key=current_key, tuner=self)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Not in _post_injection_hook: add_adapter injects without calling that hook.
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._init_shared_state(model, self.peft_config[adapter_name], adapter_name)

    def shared_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The tuner-level (shared) parameters of one adapter."""
        params = []
        for attr in self.shared_state_names:
            container = getattr(self, attr)
            if adapter_name in container:
                params.extend(_parameters_of(container[adapter_name]))
        return params

    def _set_shared_requires_grad(
        self, adapter_names: Sequence[str], requires_grad: bool, others: Optional[bool]
    ) -> None:
        for attr in self.shared_state_names:
            for name, entry in getattr(self, attr).items():
                if name in adapter_names:
                    entry.requires_grad_(requires_grad)
                elif others is not None:
                    entry.requires_grad_(others)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._set_shared_requires_grad(names, not inference_mode, others=False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._set_shared_requires_grad(names, requires_grad, others=None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for attr in self.shared_state_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapters are created in float32; with ``autocast_adapter_dtype=False`` they follow the base dtype."""
        if autocast_adapter_dtype:
            return
        base_dtype = None
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls) and module._has_adapter(adapter_name):
                base_dtype = module.get_base_layer().weight.dtype
                for param in module.adapter_parameters(adapter_name):
                    param.data = param.data.to(base_dtype)
        if base_dtype is not None:
            for param in self.shared_parameters(adapter_name):
                param.data = param.data.to(base_dtype)


def _parameters_of(entry: nn.Parameter | nn.Module) -> list[nn.Parameter]:
    """An adapter container entry is a single parameter or a module holding several."""
    return [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
