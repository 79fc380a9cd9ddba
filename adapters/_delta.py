"""Additive-update adapters: the PEFT layer and tuner machinery every method of ours shares.

Each method here adapts a frozen layer by an additive weight update,
``W = W0 + ΔW``, and computes ``ΔW x`` in factorized form. What differs between methods is
only how ``ΔW`` is parametrized; merging, unmerging, NaN-safe merging, enabling / disabling,
several named adapters, dtype handling, state shared across layers (kept on the tuner in
containers keyed by adapter name, PEFT's ``uses_shared_state`` convention) and the checkpoint
key layout (adapter name stripped on save, restored on load, at any depth) are written once
here.

A method subclasses :class:`DeltaLayer` (implementing ``update_layer``, ``get_delta_weight``
and ``delta_forward``) and :class:`DeltaTuner` (naming its layer class and the layer types it
adapts; a method with state shared across layers lists its containers in ``shared_state_names``
and implements :meth:`DeltaTuner._plan_shared_state`).

Injection is *plan, then inject*: the tuner lists every target of an adapter and checks its
type (once, here), creates the shared state for all of them, and only then creates the layers,
handing each its :class:`LayerPlan` as data. So a bad config raises with the model untouched,
and a layer module never needs its tuner (``layer.py`` never imports ``model.py``).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND, SEQ_CLS_HEAD_NAMES
from peft.utils.peft_types import TaskType
from peft.utils.integrations import init_empty_weights
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tensornets.bypassed import fused_weights, weight_read_directly, weight_recomputed

__all__ = [
    "ADAPTER_DTYPE",
    "LINEAR_LAYERS",
    "linear_dims",
    "weight_matrix",
    "DeltaConfig",
    "DeltaLayer",
    "DeltaTuner",
    "LayerPlan",
    "Target",
    "UnsupportedLayerError",
    "expected_checkpoint_keys",
    "legacy_checkpoint_keys",
]

#: Adapters are created in float32 (PEFT's ``autocast_adapter_dtype``), float64 on a float64 base.
ADAPTER_DTYPE = torch.float32

#: What a ``PeftModel`` puts before the base model's keys (and a checkpoint keeps).
_PEFT_PREFIX = "base_model.model."

#: Layers that compute ``x W^T (+ b)``: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's projections, which store
#: ``W`` transposed, ``(in, out)``). Every method adapts both; its factors are always those of the ``(out, in)`` ``W``.
LINEAR_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class UnsupportedLayerError(TypeError, ValueError):
    """A target layer of a type the method does not adapt. Both a ``TypeError`` (what it is) and a ``ValueError``
    (what PEFT's LoRA raises for an unsupported target), so code written for either catches it."""


def weight_matrix(base: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear layer: ``nn.Linear``'s own, ``Conv1D``'s ``(in, out)`` one transposed (a
    view); any other layer's weight as it is."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    out_features, in_features = weight_matrix(base).shape
    return in_features, out_features


class Target(NamedTuple):
    """One module an adapter adapts: its name in the model and its base layer (a tuner layer unwrapped)."""

    key: str
    layer: nn.Module


@dataclass(frozen=True)
class LayerPlan:
    """What a tuner's plan hands one layer for one adapter: its share of the state shared across layers.

    Attributes
    ----------
    group : str
        The group of layers sharing tensors that this layer belongs to (:mod:`adapters._groups`).
    containers : tuple of nn.ModuleDict
        The tuner's shared containers, in the order of its ``shared_state_names``, each keyed by adapter name
        and then by group. The layer keeps this tuple (a plain attribute, so the shared tensors are saved once,
        on the tuner) and looks its tensors up through it at call time, never keeping a parameter itself:
        FSDP's ``fully_shard`` and ``load_state_dict(assign=True)`` replace the parameter objects.
    tensors : mapping of str to Tensor
        Tensors planned for this layer alone (e.g. MoS's index tables).
    """

    group: str
    containers: tuple[nn.ModuleDict, ...]
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


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
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, str) and not (
                    isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(e, str) for e in spec)):
                raise TypeError(f"{name}={spec!r} must be a list of module names (['q_proj', 'v_proj']), a regex "
                                "string, 'all-linear' or None")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        for name in ("dropout", "alpha", "scale"):  # the scales each method has, checked before any layer is built
            if not hasattr(self, name) or (name == "scale" and self.scale is None):
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name}={value!r} must be a finite real number (int or float)")
            if name != "dropout" and value == 0:
                # the update, and every gradient of its factors, would be zero for good: training could not start
                # (a learned LoRETTA-adp scale too: its gradient is the branch's output, zero at init)
                raise ValueError(f"{name}={value!r} makes the update and all its gradients zero, so the adapter "
                                 f"never trains; pass a nonzero {name}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform; pass both or neither"
            )


def unmergeable_weight(base: nn.Module) -> Optional[str]:
    """Why adding ``ΔW`` to ``base.weight`` in place would be lost, or ``None``.

    A parametrized weight (weight_norm / spectral_norm / orthogonal, e.g. Wav2Vec2's positional conv) is recomputed
    on every access, and a pruned (or old-style weight-normed) one is recomputed by a forward pre-hook: the merged
    values would vanish and ``merge_and_unload`` would return the base model without the update.
    """
    recomputed = weight_recomputed(base)
    if recomputed == "parametrized":
        return ("its weight is parametrized (weight_norm / spectral_norm / orthogonal) and recomputed on every access, "
                "so a merged update would be lost; keep the adapter unmerged, or fold the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'))")
    if recomputed == "hook":
        return ("its weight is recomputed by a forward pre-hook (torch.nn.utils.prune or the old weight_norm), so a "
                "merged update would be overwritten; keep the adapter unmerged, or make the hook's weight permanent "
                "first (torch.nn.utils.prune.remove / remove_weight_norm)")
    return None


class DeltaLayer(nn.Module, BaseTunerLayer):
    """Base of a tuner layer computing ``y = base(x) + Σ_{a active} Δ_a(x)``.

    Subclasses set ``adapter_layer_names`` (containers of trainable per-adapter parameters)
    and implement :meth:`get_delta_weight` (``ΔW`` in the base weight's shape, for merging)
    and :meth:`delta_forward` (the factorized ``Δ(x)``, never building ``ΔW`` for a linear
    layer). Adapter parameters stay in their own dtype (float32 by default, float64 on a float64
    base); inputs are cast to it at the boundary and the update is cast back to the base output's
    dtype.
    """

    other_param_names: tuple[str, ...] = ("delta_dropout",)

    #: geometry the wrapped layer's owner may read off it (Whisper's encoder reads ``conv1.stride``): answered by the
    #: base layer. A fixed list, not every attribute: ``_hf_hook`` and the like must stay the base layer's own.
    _BASE_ATTRIBUTES = frozenset({"stride", "padding", "dilation", "groups", "kernel_size", "padding_mode",
                                  "in_channels", "out_channels", "num_embeddings", "embedding_dim", "padding_idx"})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in DeltaLayer._BASE_ATTRIBUTES or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    def _init_delta_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.delta_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def _set_dropout(self, adapter_name: str, p: float) -> None:
        # A new adapter follows the mode of the layer it wraps: no dropout inside a model in eval mode
        # (an adapter added to an eval model gives the same output on every call).
        dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.delta_dropout[adapter_name] = dropout.train(self.get_base_layer().training)

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
        reason = unmergeable_weight(base)
        if reason is not None and adapter_names:
            raise ValueError(f"cannot merge into this {type(base).__name__}: {reason}")
        for name in adapter_names:
            if not self._has_adapter(name):
                continue
            delta = self._delta_as_stored(base, name)
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

    def _delta_as_stored(self, base: nn.Module, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the layout and dtype of ``base.weight`` (transposed for a ``Conv1D``: it stores ``(in, out)``)."""
        delta = self.get_delta_weight(adapter_name)
        return (delta.T if isinstance(base, Conv1D) else delta).to(base.weight.dtype)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again (last merged first)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self._has_adapter(name):
                base.weight.data -= self._delta_as_stored(base, name)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """What adapter ``adapter_name`` adds to ``result = base(x)``: ``Δ(dropout(x))``, in ``result``'s dtype."""
        x_in = self.delta_dropout[adapter_name](x) if x.is_floating_point() else x
        return self.delta_forward(x_in, adapter_name).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[Sequence[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_{a active} Δ_a(x)``; with ``adapter_names`` (one name per row of ``x``, injected by
        :meth:`DeltaTuner._enable_peft_forward_hooks`), row ``i`` gets adapter ``adapter_names[i]`` only
        (``"__base__"``: none), PEFT's mixed-adapter batches."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out = result
        for name in self.active_adapters:
            if self._has_adapter(name):
                out = out + self.adapter_output(x, result, name)
        return out

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str],
                             **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of ``x`` through the base and adapter ``adapter_names[i]`` (each adapter runs once, on its
        rows)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} names for an input of {x.shape[0]} rows (shape "
                f"{tuple(x.shape)}): pass one adapter name (or '__base__') per row of the batch"
            )
        if self.merged:
            raise ValueError("adapter_names= cannot be used while adapters are merged: call unmerge_adapter() first")
        result = self.base_layer(x, *args, **kwargs)
        out = result
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or not self._has_adapter(name):
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            update = self.adapter_output(x.index_select(0, rows), result.index_select(0, rows), name)
            out = out.index_add(0, rows, update)
        return out

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

    Class attributes for subclasses: ``prefix``, ``tuner_layer_cls`` (constructed as
    ``tuner_layer_cls(target, adapter_name, config, current_key=..., plan=...)``), ``method_name``
    (for messages), ``supported_layers`` (the base layer types the method adapts, subclasses
    included; default :data:`LINEAR_LAYERS`, ``nn.Linear`` and transformers' ``Conv1D``) and
    ``shared_state_names`` (names of tuner attributes that are ``nn.ModuleDict`` keyed by adapter name,
    each entry a container of parameters shared by several layers; they are saved once, follow
    ``set_adapter`` / ``delete_adapter`` and the dtype policy like the layers' own parameters). A method with
    shared state implements :meth:`_plan_shared_state`.

    Injecting an adapter (:meth:`inject_adapter`): list the targets the config selects, as PEFT
    will (:meth:`_targets`), checking each one's type; plan the shared state for all of them;
    then let PEFT create the layers, each given its :class:`LayerPlan`.

    Checkpoint keys never contain the adapter name, however deep the adapter's parameters
    nest: the segment right after a container name (:meth:`adapter_container_names`) is
    the adapter name, and it is removed on save and put back on load (PEFT 0.21 on its own
    only removes it as the last or second-to-last segment of a key, so a tensor train's
    ``loretta_rep_A.<name>.cores.0`` kept it and loaded into the wrong adapter).
    """

    method_name: str = ""
    supported_layers: tuple[type[nn.Module], ...] = LINEAR_LAYERS
    shared_state_names: tuple[str, ...] = ()
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        for attr in self.shared_state_names:
            setattr(self, attr, nn.ModuleDict())

    def _supported_base(self, key: str, module: nn.Module) -> nn.Module:
        """The base layer of target ``key`` (a tuner layer unwrapped), if the method adapts its type.

        Raises
        ------
        UnsupportedLayerError
            If the base layer is not one of ``supported_layers`` (nor a subclass of one).
        """
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, self.supported_layers):
            names = ", ".join(
                f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__qualname__
                for cls in self.supported_layers
            )
            raise UnsupportedLayerError(
                f"{self.method_name} adapts {names} layers only; target {key!r} is {type(base).__name__}. "
                "Leave it out of target_modules"
            )
        if isinstance(getattr(base, "weight", None), nn.parameter.UninitializedParameter):
            raise ValueError(f"{self.method_name}: target {key!r} is a lazy module not materialized yet (its weight "
                             "has no shape); run one forward pass of the model before adding the adapter")
        return base

    def _targets(self, model: nn.Module, config: Any, state_dict: Optional[Mapping[str, Any]] = None) -> list[Target]:
        """Every module ``config`` selects in ``model``, in module order, as PEFT's ``inject_adapter`` matches them.

        With ``state_dict`` (PEFT's injection from a checkpoint's keys) the modules named by its keys; else
        ``config``'s ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` after PEFT's own
        preparation (architecture defaults, ``"all-linear"``). Modules inside existing tuner layers are skipped.

        Raises
        ------
        TypeError
            If a selected module's type is not one the method adapts (:meth:`_supported_base`).
        """
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _include_all_linear_layers(config, model)
        from_state_dict = None
        if state_dict is not None:
            from_state_dict = {k.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
        targets, tuner_layers, fast_path = [], [], []
        for path, module in model.named_modules():
            if not path or any(path.startswith(prefix) for prefix in tuner_layers):
                continue
            if isinstance(module, BaseTunerLayer):
                tuner_layers.append(path + ".")
            key = path
            if from_state_dict is not None:
                key = key.removeprefix("_orig_mod.")
                if key not in from_state_dict:
                    continue
            elif not self._check_target_module_exists(config, key):
                continue
            base = self._supported_base(key, module)
            bypass = weight_read_directly(model, path)
            if bypass is not None and bypass[1]:
                raise ValueError(f"{self.method_name}: target {key!r}: {bypass[0]}, so an adapter there would never "
                                 f"run; leave it out of target_modules (or exclude_modules=[{key!r}])")
            if bypass is not None:
                fast_path.append(key)
            targets.append(Target(key, base))
        if fast_path:
            warnings.warn(
                f"{self.method_name}: {len(fast_path)} target(s) such as {fast_path[0]!r} sit in an "
                "nn.TransformerEncoderLayer, whose fused fast path (eval mode, no autograd) reads linear1.weight / "
                "linear2.weight directly and skips adapters there: merge the adapter for inference (merge_and_unload) "
                "or turn the fast path off (torch.backends.mha.set_fastpath_enabled(False))",
                UserWarning, stacklevel=4,
            )
        return targets

    def _plan_shared_state(
        self, config: Any, adapter_name: str, targets: Sequence[Target]
    ) -> dict[str, Optional[LayerPlan]]:
        """Create the state ``adapter_name`` shares across layers; ``{target key: its layer's plan}``.

        Runs before any layer is created, with every target known: a method with shared state (listed in
        ``shared_state_names``) creates its containers' entries for ``adapter_name`` here, checks what needs
        all members at once (shapes, feasibility) and returns each target's :class:`LayerPlan`. The default,
        for methods without shared state, plans nothing (``None`` for every target).
        """
        return {target.key: None for target in targets}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Plan the shared state of ``adapter_name`` for all its targets, then inject its layers (PEFT's loop).

        If planning or injection fails, the adapter's shared state is removed again. Adding an adapter leaves the
        trainability of the adapters already there as it was, shared state included: PEFT restores the
        ``requires_grad`` of the parameters inside ``model`` only, while its closing ``set_adapter(...,
        inference_mode=new_config.inference_mode)`` would freeze the active adapter's shared state (e.g. on
        ``load_adapter(path, "other")``, which loads ``"other"`` for inference).
        """
        config = self.peft_config[adapter_name]
        targets = self._targets(model, config, state_dict)
        existing = [
            (param, param.requires_grad)
            for attr in self.shared_state_names
            for name, entry in getattr(self, attr).items() if name != adapter_name
            for param in _parameters_of(entry)
        ]
        try:
            with init_empty_weights() if low_cpu_mem_usage else nullcontext():
                self._layer_plans = self._plan_shared_state(config, adapter_name, targets)
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            for attr in self.shared_state_names:
                container = getattr(self, attr)
                if adapter_name in container:
                    del container[adapter_name]
            raise
        finally:
            self._layer_plans = {}
        for param, requires_grad in existing:
            param.requires_grad_(requires_grad)

    def _planned(self, current_key: str) -> Optional[LayerPlan]:
        if current_key not in self._layer_plans:
            raise ValueError(
                f"target {current_key!r} was not planned: {type(self).__name__}._targets and PEFT's inject_adapter "
                f"disagree on the targets (planned: {sorted(self._layer_plans)[:4]}...); report this with the config"
            )
        return self._layer_plans[current_key]

    def _create_new_module(
        self, config: Any, adapter_name: str, target: nn.Module, current_key: str, plan: Optional[LayerPlan]
    ) -> nn.Module:
        return self.tuner_layer_cls(target, adapter_name, config, current_key=current_key, plan=plan)

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
        plan = self._planned(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key=current_key, plan=plan)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, current_key, plan)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        for attr in self.shared_state_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if was_active:
            # PEFT's layers make the adapter that takes over trainable (as LoRA's are); its shared state must follow
            self._set_shared_requires_grad(self.active_adapters, True, others=False)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches, as PEFT's LoRA: ``model(x, adapter_names=[...])`` (and ``generate``) runs row ``i``
        with adapter ``adapter_names[i]`` (``"__base__"``: the base model alone), whatever adapters are active.

        Inference only (the model in eval mode) and unmerged. With ``num_beams > 1`` each name is repeated for its
        row's beams, except in an encoder-decoder model's encoder, which sees the rows unrepeated.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
        if self.training:
            raise ValueError("adapter_names= (mixed-adapter batches) is for inference: call model.eval() first")
        known = {name for module in self.model.modules() if isinstance(module, DeltaLayer)
                 for name in module._get_available_adapters()}
        unknown = sorted(set(adapter_names) - known - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown} on this model (it has {sorted(known)}); "
                             "'__base__' selects the base model")
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        beams = num_beams if isinstance(num_beams, int) and num_beams > 1 else 1
        handles = []

        def inject(layers: Iterator[nn.Module], row_names: list[str]) -> None:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return args, {**kwargs, "adapter_names": row_names}
            for module in layers:
                if isinstance(module, DeltaLayer):
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        inject(self.model.modules(), [n for n in names for _ in range(beams)])
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if beams > 1 and encoder is not None and encoder is not self.model:
            inject(encoder.modules(), names)  # registered later, so it runs last and wins for the encoder
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_merge_allowed(self) -> None:
        """PEFT's checks, then every adapted layer's weight (before any layer is merged: ``merge_and_unload`` would
        otherwise stop halfway, some layers merged and unloaded)."""
        super()._check_merge_allowed()
        for name, module in self.model.named_modules():
            if isinstance(module, self.tuner_layer_cls):
                reason = unmergeable_weight(module.get_base_layer())
                if reason is not None:
                    raise ValueError(f"{self.method_name}: cannot merge into {name!r}: {reason}")

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: PEFT's weighted combination is LoRA's (AdaLoRA and VeRA do not have it either).

        Export each adapter with :func:`adapters.export_lora` (exact for LoTR, LoRETTA-rep, MoS and FLoRA),
        load the LoRAs on one model and call LoRA's ``add_weighted_adapter`` there.
        """
        raise TypeError(
            f"{type(self).__name__} does not support add_weighted_adapter (PEFT's is LoRA's): export the adapters "
            "as LoRA with adapters.export_lora(peft_model, dir, adapter_name=...), load them with "
            "PeftModel.from_pretrained / load_adapter and combine the LoRAs"
        )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapters are created in float32, as PEFT's LoRA upcasts float16 / bfloat16 ones
        (``autocast_adapter_dtype=True``); on a float64 base they follow it (float64, as PEFT's LoRA), and with
        ``autocast_adapter_dtype=False`` they follow any base dtype."""
        base_dtype = None
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls) and module._has_adapter(adapter_name):
                dtype = module.get_base_layer().weight.dtype
                if autocast_adapter_dtype and dtype != torch.float64:
                    continue
                base_dtype = dtype
                for param in module.adapter_parameters(adapter_name):
                    param.data = param.data.to(base_dtype)
        if base_dtype is not None:
            for param in self.shared_parameters(adapter_name):
                param.data = param.data.to(base_dtype)

    # -- checkpoint keys: PEFT 0.21 calls these classmethods from get_peft_model_state_dict and
    # set_peft_model_state_dict (its tuner-level state-dict hooks, see adapters._registry).

    @classmethod
    def adapter_container_names(cls) -> frozenset[str]:
        """Attribute names of the containers keyed by adapter name: layers' and the tuner's.

        A model state-dict key of an adapter reads ``<module path>.<container>.<adapter>.<rest>``
        with ``<rest>`` of any depth (empty for a ``ParameterDict`` entry, ``weight`` for a
        module, ``cores.0`` for a tensor train).
        """
        layer = cls.tuner_layer_cls
        return frozenset((*layer.adapter_layer_names, *layer.other_param_names, *cls.shared_state_names))

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: ``<path>.<container>.<adapter>.<rest>`` -> ``<path>.<container>.<rest>``.

        E.g. ``layers.0.query.loretta_rep_A.default.cores.0`` -> ``layers.0.query.loretta_rep_A.cores.0``.
        The last container segment followed by ``adapter_name`` decides (a base module path
        comes before the adapter layer's own attributes). Keys without one (e.g.
        ``modules_to_save`` copies, already renamed by their wrapper) go through PEFT's rule.
        Loading inverts this mapping (PEFT builds the inverse from the model's keys), so save
        and load agree for every layout.
        """
        parts = key.split(".")
        containers = cls.adapter_container_names()
        for i in range(len(parts) - 1, 0, -1):
            if parts[i] == adapter_name and parts[i - 1] in containers:
                return ".".join(parts[:i] + parts[i + 1 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Checkpoint keys -> model keys (PEFT's inverse of :meth:`_remove_adapter_name_from_key`).

        Checkpoints written before the adapter name was stripped at every depth still load:
        a key that matches no expected checkpoint key, but does once the segment after one of
        its containers is dropped (``...loretta_rep_A.<saved name>.cores.0``, any saved name),
        is read as that key.
        """
        legacy = legacy_checkpoint_keys(cls, model, adapter_name, state_dict)
        if legacy:
            state_dict = {legacy.get(key, key): value for key, value in state_dict.items()}
        _check_shared_keys(cls, model, adapter_name, state_dict)
        _check_layer_tensors(cls, model, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _include_all_linear_layers(config: Any, model: nn.Module) -> Any:
    """PEFT's ``target_modules="all-linear"`` resolution, plus the linears other adapters already wrap.

    PEFT recognizes a wrapped linear by ``"Linear"`` in its layer's class name (``lora.Linear``); ours are
    named after their method (``LoTRLayer``, also for convs), so without this a second ``"all-linear"``
    adapter would skip every layer the first one adapted. Output embeddings and sequence-classification
    heads stay excluded, as PEFT excludes them.
    """
    target = getattr(config, "target_modules", None)
    all_linear = isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    config = _maybe_include_all_linear_layers(config, model)
    if not all_linear:
        return config
    heads = set()
    if isinstance(model, PreTrainedModel):
        heads.add(model.get_output_embeddings())
        if config.task_type == TaskType.SEQ_CLS:
            heads.update(getattr(model, name, None) for name in SEQ_CLS_HEAD_NAMES)
    wrapped, tuner_prefixes = set(), []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in tuner_prefixes):
            continue  # never an adapter inside an adapter's own modules
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
            if isinstance(module.get_base_layer(), (nn.Linear, Conv1D)) and module not in heads:
                wrapped.add(name)
    config.target_modules = set(config.target_modules) | wrapped
    # linears torch reads without calling (nn.MultiheadAttention.out_proj) are not "linear layers" an adapter can
    # wrap: left out by their full names (a suffix such as "out_proj" would also drop the model's other out_proj)
    never_called = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))
                    and (weight_read_directly(model, name) or ("", False))[1]]
    if never_called and not isinstance(config.exclude_modules, str):
        config.exclude_modules = set(config.exclude_modules or ()) | set(never_called)
        warnings.warn(f"target_modules='all-linear' leaves out {len(never_called)} layer(s) that torch never calls, "
                      f"such as {never_called[0]!r} (nn.MultiheadAttention reads out_proj.weight directly)",
                      UserWarning, stacklevel=5)
    fused = fused_weights(model)
    if fused:  # PEFT's LoRA reaches them through target_parameters; without a word the mixture's MLPs go unadapted
        kinds = "/".join(sorted({type(model.get_submodule(n)).__name__ for n in fused}))
        warnings.warn(f"target_modules='all-linear' leaves {sum(fused.values()):,} parameters unadapted: {len(fused)} "
                      f"{kinds} module(s) ({list(fused)[:2]}) hold a mixture's experts as fused 3-D tensors, not "
                      f"linear layers; {type(config).__name__} adapts linear layers only (PEFT's LoRA adapts such "
                      "tensors through target_parameters)", UserWarning, stacklevel=5)
    return config


def expected_checkpoint_keys(tuner_cls: type[DeltaTuner], model: nn.Module, adapter_name: str) -> set[str]:
    """Checkpoint keys the adapter ``adapter_name`` of ``model`` saves (and loads) its tensors under.

    Both spellings: with the ``base_model.model.`` prefix of a ``PeftModel`` and, for layers
    injected straight into a model (no such prefix in its keys), without it.
    """
    return set(_checkpoint_shapes(tuner_cls, model, adapter_name))


def _checkpoint_shapes(tuner_cls: type[DeltaTuner], model: nn.Module, adapter_name: str) -> dict[str, tuple]:
    """``{checkpoint key: shape}`` of the adapter ``adapter_name`` of ``model``, both spellings of each key (see
    :func:`expected_checkpoint_keys`)."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    shapes = {}
    for model_key, tensor in _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes).items():
        checkpoint_key = tuner_cls._remove_adapter_name_from_key(model_key, adapter_name)
        shapes[checkpoint_key] = tuple(tensor.shape)
        if not checkpoint_key.startswith(_PEFT_PREFIX):
            shapes[_PEFT_PREFIX + checkpoint_key] = tuple(tensor.shape)
    return shapes


def legacy_checkpoint_keys(
    tuner_cls: type[DeltaTuner], model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, str]:
    """``{old key: current key}`` for the checkpoint keys that still hold a saved adapter name.

    An old key is ``<path>.<container>.<saved name>.<rest>`` where the current layout expects
    ``<path>.<container>.<rest>`` (:func:`expected_checkpoint_keys`); keys already in the
    current layout map to nothing.

    Raises
    ------
    ValueError
        If an old key and a current key (or two old keys) name the same tensor.
    """
    expected = expected_checkpoint_keys(tuner_cls, model, adapter_name)
    containers = tuner_cls.adapter_container_names()
    renamed: dict[str, str] = {}
    for key in state_dict:
        if key in expected:
            continue
        parts = key.split(".")
        for i in range(len(parts) - 2, 0, -1):
            if parts[i - 1] in containers:
                candidate = ".".join(parts[:i] + parts[i + 1 :])
                if candidate in expected:
                    renamed[key] = candidate
                    break
    counts = Counter(renamed.get(key, key) for key in state_dict)
    clashes = sorted(key for key, count in counts.items() if count > 1)
    if clashes:
        raise ValueError(
            f"the checkpoint holds {clashes[:3]} both in the old layout (with the saved adapter name inside the key) "
            "and in the current one; keep one copy of each tensor in the adapter_model.safetensors"
        )
    return renamed


def _check_shared_keys(
    tuner_cls: type[DeltaTuner], model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Refuse a checkpoint whose shared (tuner-level) tensors name layer groups this model does not have.

    Shared tensors are keyed by group, and a group by module type and shape (``lotr_A.self_attn_q_proj_64x64``):
    on a base of other widths the saved groups match nothing. PEFT would only warn that keys are missing and keep
    the fresh shared tensors beside the loaded per-layer ones, an arbitrary update; LoRA fails on the shape instead.
    """
    shared = set(tuner_cls.shared_state_names)
    if not shared:
        return
    shapes = _checkpoint_shapes(tuner_cls, model, adapter_name)
    expected = set(shapes)

    def groups(keys) -> list[str]:
        found = set()
        for key in keys:
            parts = key.split(".")
            found.update(parts[i + 1] for i, part in enumerate(parts[:-1]) if part in shared)
        return sorted(found)

    stray = [k for k in state_dict if k not in expected and shared & set(k.split("."))]
    if stray:
        raise ValueError(
            f"the checkpoint's shared tensors are for layer groups {groups(stray)}, this model's are "
            f"{groups(expected)} (a group is a module type and shape): the adapter was saved on a base with other "
            "layer shapes; load it onto that base model"
        )
    # a group of the same name can still differ in size: a MoS pool holds v · L · c shards for L layers
    resized = [(k, tuple(v.shape), shapes[k]) for k, v in state_dict.items()
               if shared & set(k.split(".")) and k in shapes and tuple(v.shape) != shapes[k]]
    if resized:
        key, saved, here = resized[0]
        raise ValueError(
            f"the checkpoint's shared tensor {key} has shape {saved}, this model's has {here} ({len(resized)} such "
            "tensors): the adapter was saved on a base with other layer shapes or another number of adapted layers "
            "(MoS pools grow with it); load it onto that base model"
        )


def _check_layer_tensors(
    tuner_cls: type[DeltaTuner], model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Refuse adapter tensors this model's adapter has no place for, of another shape, or of values no adapter
    holds (integers where it stores floats, NaN / inf).

    PEFT drops unexpected keys without a word: an ``adapter_config.json`` whose ``target_modules`` was narrowed
    loaded the other layers' tensors nowhere, a different model. A wrong shape surfaced as ``load_state_dict``'s
    raw ``RuntimeError``, an integer tensor was cast, a NaN loaded. Keys outside the adapter's containers (e.g.
    ``modules_to_save`` copies) are PEFT's to check.
    """
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    here = {}
    for model_key, tensor in _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes).items():
        key = tuner_cls._remove_adapter_name_from_key(model_key, adapter_name)
        here[key] = tensor
        if not key.startswith(_PEFT_PREFIX):
            here[_PEFT_PREFIX + key] = tensor
    containers = tuner_cls.adapter_container_names()
    ours = {k: v for k, v in state_dict.items() if containers & set(k.split("."))}
    stray = sorted(k for k in ours if k not in here)
    if stray:
        raise ValueError(
            f"the checkpoint holds {len(stray)} adapter tensor(s) this model's adapter has no layer for (e.g. "
            f"{stray[:2]}): it was saved with other target_modules / layers_to_transform, or on a base with other layer "
            "shapes; load it with the adapter_config.json it was saved with, onto that base"
        )
    squeezed = lambda shape: tuple(n for n in shape if n != 1)  # noqa: E731 - 0.1.0 saved 1-element scales 0-d
    resized = [f"{k}: {tuple(v.shape)} here {tuple(here[k].shape)}" for k, v in ours.items()
               if squeezed(v.shape) != squeezed(here[k].shape)]
    if resized:
        raise ValueError(
            f"the checkpoint's adapter tensors have other shapes than this model's ({len(resized)}, e.g. {resized[:2]}): "
            "it was saved with another adapter_config.json (r, modes, ...) or on a base with other layer shapes; load "
            "it with its own config onto that base"
        )
    bad = sorted(k for k, v in ours.items() if here[k].is_floating_point()
                 and (not v.is_floating_point() or not bool(torch.isfinite(v).all())))
    if bad:
        raise ValueError(f"the checkpoint's adapter tensors {bad[:3]} hold integers or NaN / inf where the adapter "
                         "stores finite floats: the file was altered or corrupted; save the adapter again")
    # integer buffers (MoS's index tables) would be cast from floats without a word
    bad = sorted(k for k, v in ours.items() if not here[k].is_floating_point()
                 and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool))
    if bad:
        raise ValueError(f"the checkpoint's adapter tensors {bad[:3]} hold floats or bools where the adapter stores "
                         "integer indices: the file was altered or corrupted; save the adapter again")


def _parameters_of(entry: nn.Parameter | nn.Module) -> list[nn.Parameter]:
    """An adapter container entry is a single parameter or a module holding several."""
    return [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
