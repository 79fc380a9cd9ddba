"""Exact export of our adapters as plain PEFT LoRA adapters, which any LoRA loader serves.

vLLM, TGI, Diffusers and llama.cpp load LoRA adapters only. LoTR, LoRETTA-rep, MoS and FLoRA
all add a weight update ``ΔW`` of rank at most their own rank ``r``, and their factors already
give it as a product ``ΔW = B A``, so the export is exact and needs no SVD:

============  =============================  ===============================  ==============
method        ``lora_B``                     ``lora_A``                       rank
============  =============================  ===============================  ==============
LoTR          ``s · A_group G_m``            ``B_group``                      ``r``
LoRETTA-rep   ``s · L_B K_B K_Aᵀ``           ``L_Aᵀ`` (TTs split at d | r)    ``min(r, R)``
MoS           ``s · B_l`` (assembled)        ``A_l`` (assembled)              ``r``
FLoRA linear  ``U_out``                      ``sG U_inᵀ``                     ``min(r_out, r_in)``
FLoRA conv    ``U_out`` (a 1x1 conv)         ``sG ×_2 U_in ×_3 U_k1 ...``     ``r_out`` (×groups)
============  =============================  ===============================  ==============

(each layer's ``lora_factors`` gives its pair; FLoRA swaps the roles when the in-side rank is
the smaller one; LoRETTA-rep splits each train at the bond ``R`` between its ``d`` and ``r`` modes,
``M = L K``, which caps the rank of ``ΔW``: see ``LoRETTARepLayer.lora_factors``). The scale ``s``
is folded into ``lora_B`` and every LoRA layer gets ``lora_alpha = rank``, so PEFT's
``scaling = lora_alpha / r`` is 1 everywhere, also for a loader that reads one global
``lora_alpha / r`` and ignores ``alpha_pattern`` (vLLM). Layers whose rank differs from the most
common one go in ``rank_pattern`` / ``alpha_pattern``.

PEFT's own bridge, ``peft.tuners.lora.conversion.convert_to_lora(model, rank=r)``, also works
on our linear layers (each declares ``supports_lora_conversion``); it takes an SVD of every
``ΔW`` instead and handles linear layers only.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters import _registry, loretta

__all__ = ["export_lora", "to_lora"]

#: Prefix of every module name inside a ``PeftModel`` (PEFT's LoRA checkpoint keys keep it).
_PEFT_PREFIX = "base_model.model."

#: Why a method of ours has no LoRA form, by peft type.
_NO_LORA_FORM = {
    loretta.PEFT_TYPE_ADP: (
        "LoRETTA-adp is a bottleneck adapter f(h) = h + s·U(ReLU(D h)) on the layer's output: it is nonlinear "
        "in h, so it adds no weight update ΔW and no LoRA of any rank computes it. Train LoRETTA-rep "
        "(LoRETTARepConfig) for an adapter that exports exactly"
    ),
}

LoraEntries = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], int]]


def _linear_entries(key: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, int]:
    # PEFT's Linear LoRA: ΔW = lora_B.weight @ lora_A.weight, (out, R) @ (R, in).
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, a.shape[0]


def _embedding_entries(key: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, int]:
    # PEFT's Embedding LoRA: ΔW = (lora_embedding_B @ lora_embedding_A)ᵀ, with A: (R, num_embeddings),
    # B: (embedding_dim, R); ours is ΔW = b @ a with b: (num_embeddings, R), a: (R, embedding_dim).
    return {f"{key}.lora_embedding_A": b.T, f"{key}.lora_embedding_B": a.T}, a.shape[0]


def _conv_entries(key: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, int]:
    """PEFT's conv LoRA: ``lora_A`` a conv ``C_in -> R`` with the base's kernel, stride and padding,
    ``lora_B`` a 1x1 conv ``R -> C_out`` with the base's groups.

    Ungrouped: ``lora_A.weight = a: (R, C_in, k...)``, ``lora_B.weight = b: (C_out, R, 1...)``. With
    ``g`` groups ``ΔW`` is block diagonal over the groups, block ``j`` being ``ΔW_j = b_j a`` of shape
    ``(C_out / g, C_in / g · k)`` and rank ``r_g = min(R, C_out / g, C_in / g · k)`` (1 for a depthwise
    conv). ``lora_A`` is ungrouped in PEFT, so it gets ``g r_g`` output channels, block ``j`` holding
    group ``j``'s ``A_j`` on its input channels and zeros elsewhere, and the grouped ``lora_B`` sends
    block ``j`` through ``B_j`` to group ``j``'s outputs, with ``B_j A_j = ΔW_j`` exactly: ``(b_j, a)``,
    ``(I, b_j a)`` or ``(b_j a, I)``, whichever is narrowest.
    """
    name = key.removeprefix(_PEFT_PREFIX)
    ones = (1,) * (base.weight.dim() - 2)
    if base.padding_mode != "zeros" or tuple(base.dilation) != ones:
        raise ValueError(
            f"layer {name!r} is a {type(base).__name__} with padding_mode={base.padding_mode!r}, "
            f"dilation={tuple(base.dilation)}: PEFT's conv LoRA runs lora_A with zero padding and no dilation, "
            "so no LoRA reproduces its update; leave this layer out of target_modules to export"
        )
    groups, rank = base.groups, a.shape[0]
    if groups == 1:
        return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b.reshape(*b.shape, *ones)}, rank
    out_g, in_g = base.out_channels // groups, base.in_channels // groups
    flat = a.reshape(rank, -1)  # (R, C_in / g · k)
    width = flat.shape[1]
    r = min(rank, out_g, width)
    blocks = a.new_zeros(groups * r, base.in_channels, *a.shape[2:])
    b_out = b.new_zeros(base.out_channels, r)
    for j in range(groups):
        b_j = b[j * out_g : (j + 1) * out_g]
        if r == rank:
            a_j = flat
        elif r == out_g:
            a_j, b_j = b_j @ flat, torch.eye(out_g, dtype=b.dtype, device=b.device)
        else:
            a_j, b_j = torch.eye(width, dtype=a.dtype, device=a.device), b_j @ flat
        blocks[j * r : (j + 1) * r, j * in_g : (j + 1) * in_g] = a_j.reshape(r, in_g, *a.shape[2:])
        b_out[j * out_g : (j + 1) * out_g] = b_j
    warnings.warn(
        f"layer {name!r} is a grouped {type(base).__name__} (groups={groups}): PEFT's conv LoRA keeps lora_A "
        f"ungrouped, so the export holds a dense ({groups * r}, {base.in_channels}, ...) lora_A, mostly zeros "
        f"({blocks.numel():,} values against {a.numel() + b.numel():,} in the adapter), and PEFT cannot merge it "
        "(merge_and_unload raises); leave grouped convs out of target_modules for a compact, mergeable LoRA",
        UserWarning, stacklevel=4,
    )
    return {f"{key}.lora_A.weight": blocks, f"{key}.lora_B.weight": b_out.reshape(*b_out.shape, *ones)}, groups * r


#: PEFT LoRA layout per base layer type (looked up along the type's MRO).
_LORA_LAYOUT: dict[type[nn.Module], LoraEntries] = {
    nn.Linear: _linear_entries,
    Conv1D: _linear_entries,  # PEFT's LoRA on GPT-2's Conv1D: the same (R, in) / (out, R) factors, fan_in_fan_out
    nn.Embedding: _embedding_entries,
    nn.Conv1d: _conv_entries,
    nn.Conv2d: _conv_entries,
    nn.Conv3d: _conv_entries,
}


def _layout_for(base: nn.Module) -> Optional[LoraEntries]:
    return next((_LORA_LAYOUT[cls] for cls in type(base).__mro__ if cls in _LORA_LAYOUT), None)


def _check_exportable(peft_model: nn.Module, adapter_name: str) -> str:
    """The adapter's peft type, after checking that it is one of our exportable methods."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"peft_model is a {type(peft_model).__name__}; pass the PeftModel that get_peft_model or "
            "PeftModel.from_pretrained returned"
        )
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not on this model; its adapters are {sorted(peft_model.peft_config)}"
        )
    peft_type = _registry.peft_type_name(peft_model.peft_config[adapter_name].peft_type)
    ours = _registry.registered_methods()
    if peft_type not in ours:
        raise ValueError(
            f"adapter {adapter_name!r} has peft_type={peft_type!r}, not one of ours ({sorted(ours)}); "
            "to_lora exports our tensor adapters (a LoRA is already saved by save_pretrained)"
        )
    if peft_type in _NO_LORA_FORM:
        raise ValueError(
            f"adapter {adapter_name!r} ({peft_type}) cannot be exported as a LoRA: {_NO_LORA_FORM[peft_type]}"
        )
    return peft_type


def to_lora(
    peft_model: PeftModel, adapter_name: str = "default", *, dtype: torch.dtype = torch.float32
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Exact PEFT LoRA equivalent of one of our adapters, built from its factors (no SVD).

    Every adapted layer's update ``ΔW`` becomes ``lora_B @ lora_A`` at the method's own rank
    (see the module docstring for each method's factors; convs in PEFT's conv layout). The
    factors are formed in float64 and rounded once to ``dtype``, so the LoRA's output differs
    from the adapter's by that rounding only (relative ~1e-7 in float32).

    Parameters
    ----------
    peft_model : PeftModel
        A model carrying one of our adapters (LoTR, LoRETTA-rep, MoS, FLoRA).
    adapter_name : str
        The adapter to export.
    dtype : torch.dtype
        Floating dtype of the LoRA tensors (e.g. ``torch.bfloat16`` for serving).

    Returns
    -------
    config : LoraConfig
        ``target_modules`` the exact names of the adapted modules; ``r`` the most common rank
        with ``lora_alpha = r``, other ranks in ``rank_pattern`` with ``alpha_pattern`` equal to
        them (``scaling = 1``: the scale is folded into ``lora_B``); ``lora_dropout``,
        ``modules_to_save``, ``task_type``, ``base_model_name_or_path`` and ``revision`` copied
        from the adapter's config.
    state_dict : dict of str to Tensor
        On CPU, in PEFT's LoRA checkpoint layout, e.g. ``base_model.model.<module>.lora_A.weight: (R, d_in)``,
        ``...lora_B.weight: (d_out, R)``, ``...lora_embedding_A: (R, num_embeddings)``, and the
        trained copies of ``modules_to_save`` under ``base_model.model.<module>.<param>``. Load
        with ``set_peft_model_state_dict(lora, state_dict)`` on ``lora = get_peft_model(base, config)``
        (``.eval()`` it for inference: ``get_peft_model`` leaves the copied ``lora_dropout`` in training
        mode), or write with :func:`export_lora` and load with ``PeftModel.from_pretrained``.

    Raises
    ------
    TypeError
        If ``peft_model`` is not a ``PeftModel`` or ``dtype`` not a floating dtype.
    ValueError
        For an unknown adapter, a method without a LoRA form (LoRETTA-adp), or a layer PEFT's
        LoRA cannot express (a conv with non-zero padding mode or dilation).

    Examples
    --------
    >>> config, state = adapters.to_lora(model)  # model = get_peft_model(base, LoTRConfig(r=8, ...))
    >>> lora = get_peft_model(fresh_base, config).eval()  # eval: no lora_dropout at inference
    >>> set_peft_model_state_dict(lora, state)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is not a floating torch dtype; pass e.g. torch.float32")
    peft_type = _check_exportable(peft_model, adapter_name)
    source = peft_model.peft_config[adapter_name]
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d: list[str] = []  # PEFT's fan_in_fan_out holds for these layers only
    for key, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not module._has_adapter(adapter_name):
            continue
        base = module.get_base_layer()
        layout = _layout_for(base)
        if layout is None:
            raise ValueError(
                f"layer {key.removeprefix(_PEFT_PREFIX)!r} is a {type(base).__name__}, which PEFT's LoRA does not "
                f"adapt ({', '.join(cls.__name__ for cls in _LORA_LAYOUT)}); leave it out of target_modules to export"
            )
        a, b = module.lora_factors(adapter_name)
        entries, rank = layout(key, base, a, b)
        state_dict.update({name: tensor.to("cpu", dtype).contiguous().clone() for name, tensor in entries.items()})
        ranks[key.removeprefix(_PEFT_PREFIX)] = rank
        if isinstance(base, Conv1D):
            conv1d.append(key.removeprefix(_PEFT_PREFIX))
    if not ranks:
        raise ValueError(f"adapter {adapter_name!r} ({peft_type}) adapts no layer of this model; nothing to export")
    for key, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for name, param in module.modules_to_save[adapter_name].named_parameters():
                state_dict[f"{key}.{name}"] = param.detach().to("cpu", dtype).contiguous().clone()
    # PEFT's fan_in_fan_out is one flag for the whole LoRA (True: weights stored (in, out), as Conv1D's): it cannot
    # describe Conv1D and other layers together, and PEFT resets it, with a warning, for the layers it does not fit
    if conv1d and len(conv1d) != len(ranks):
        others = sorted(set(ranks) - set(conv1d))
        raise ValueError(f"adapter {adapter_name!r} adapts Conv1D layers ({conv1d[:2]}) and others ({others[:2]}): "
                         "a PEFT LoRA has one fan_in_fan_out for all its layers; export them as two adapters (one "
                         "adapter of ours per layer kind)")
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=set(ranks),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=getattr(source, "dropout", 0.0),
        fan_in_fan_out=bool(conv1d),
        modules_to_save=list(source.modules_to_save) if source.modules_to_save else None,
        task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
        revision=source.revision,
    )
    return config, state_dict


def export_lora(
    peft_model: PeftModel,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write :func:`to_lora`'s adapter as a plain PEFT LoRA directory that needs no package of ours.

    The directory holds ``adapter_config.json`` (``peft_type: "LORA"``) and
    ``adapter_model.safetensors``: what ``PeftModel.from_pretrained(base, path)``,
    ``vllm serve <base> --enable-lora --lora-modules name=path``, TGI and Diffusers load.
    vLLM's own limits apply: it adapts linear layers, refuses ``modules_to_save`` (a trained
    head, LoRETTA's ``train_norms``), and needs ``--max-lora-rank`` at least the exported
    ``r`` (every ``lora_alpha / r`` here is 1, so its single global scaling is right even where
    ``rank_pattern`` gives some layers another rank).

    Parameters
    ----------
    peft_model : PeftModel
        A model carrying one of our adapters.
    path : str or PathLike
        Directory to write (created if missing; existing files of those two names are replaced).
    adapter_name : str
        The adapter to export.
    dtype : torch.dtype
        Floating dtype of the stored tensors.
    base_model_name_or_path : str, optional
        Written to the config; default the adapter config's own (the base model's hub id or
        directory, which ``get_peft_model`` records from ``model.name_or_path``).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path={str(path)!r} is a file; export_lora writes a directory (adapter_config.json and "
                         f"{SAFETENSORS_WEIGHTS_NAME}): pass a directory path")
    config, state_dict = to_lora(peft_model, adapter_name, dtype=dtype)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    path.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(path))
    # PEFT writes target_modules from a set, in the hash seed's order: sorted, an export is the same file every run
    config_file = path / "adapter_config.json"
    written = json.loads(config_file.read_text())
    written["target_modules"] = sorted(written["target_modules"])
    config_file.write_text(json.dumps(written, indent=2, sort_keys=True))
    return path
