"""Layers whose weight does not reach the model the plain way: read by the parent without calling the layer, or
recomputed from other tensors on every access or forward.

A module that replaces or wraps a layer read directly (a factorized layer, an adapter) is never run there: the parent
passes the layer's ``.weight`` straight to a functional kernel. A weight written into a recomputed one is lost.
``compress`` and ``adapters`` refuse (or warn about) both, naming the fix. A mixture's experts held as fused 3-D
tensors (transformers 5) are no layers at all: the model multiplies by them directly (:func:`fused_weights`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["fused_weights", "weight_read_directly", "weight_recomputed"]


def weight_recomputed(module: nn.Module) -> Literal["parametrized", "hook"] | None:
    """How ``module.weight`` is recomputed rather than stored, or ``None`` for a plain parameter.

    ``"parametrized"``: ``torch.nn.utils.parametrize`` (weight_norm / spectral_norm / orthogonal) computes it on every
    access. ``"hook"``: a forward pre-hook (``torch.nn.utils.prune``, the old ``torch.nn.utils.weight_norm``) sets it
    from other tensors, so between forwards it may be stale, and a value written into it is overwritten.
    """
    if parametrize.is_parametrized(module, "weight"):
        return "parametrized"
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        return "hook"
    return None


def weight_read_directly(model: nn.Module, name: str) -> tuple[str, bool] | None:
    """Why ``model``'s forward may read layer ``name``'s weight without calling the layer, or ``None``.

    Returns ``(reason, always)``: ``always`` is ``True`` where the layer is never called
    (``nn.MultiheadAttention.out_proj``: its forward passes ``out_proj.weight`` to
    ``F.multi_head_attention_forward``), ``False`` where only a fast path skips it
    (``nn.TransformerEncoderLayer.linear1`` / ``linear2`` with ``batch_first=True``: the fused inference kernel reads
    their weights when autograd is off and the layer is in eval mode; ``torch.backends.mha.set_fastpath_enabled(False)``
    turns it off).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return "nn.MultiheadAttention passes out_proj.weight to its functional forward and never calls out_proj", True
    # the fast path is taken only by batch_first layers (torch checks self_attn.batch_first before the weights)
    fused = isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn.batch_first
    if fused and child in ("linear1", "linear2"):
        return (f"nn.TransformerEncoderLayer's fused fast path (eval mode, no autograd) reads {child}.weight "
                f"directly, skipping {child}"), False
    return None


def fused_weights(model: nn.Module) -> dict[str, int]:
    """Modules holding weights that no layer-wrapping method can target, name -> their parameter count.

    These are parameters of three or more dimensions owned by a mixture's experts module (its class name says
    ``Expert``): transformers 5 keeps the experts as such tensors (``MixtralExperts.gate_up_proj``,
    ``(experts, 2 · inter, hidden)``), not as ``nn.Linear`` layers. Other 3-D parameters (a ViT's ``cls_token`` and
    position embeddings) are not weights of a linear map. Target selection (``compress``, ``adapters``' ``all-linear``)
    leaves them out; callers say so.
    """
    from .layers import FactorizedConv2d, FactorizedLinear  # layers imports this module

    found = {}
    factorized = [n + "." for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d))]
    for name, module in model.named_modules():
        # convolution kernels are 4-D; a factorized layer's cores are targeted through the layer (their
        # containers, and an adapter's, are parameter lists / dicts)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.ParameterList, nn.ParameterDict)) or any(
                name.startswith(prefix) for prefix in factorized) or "expert" not in type(module).__name__.lower():
            continue
        count = sum(p.numel() for p in module.parameters(recurse=False)
                    if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 3)
        if count:
            found[name] = count
    return found
