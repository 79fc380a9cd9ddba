"""Start one of our adapters at a given low-rank update ``ΔW = B A`` (e.g. an EoRA residual), exactly.

A compressed model plus an EoRA residual (:func:`compress.eora_compensate`) is the best start for fine-tuning the
compressed model: training begins at the compensated model instead of the bare compressed one. A PEFT LoRA takes
the residual's ``B``, ``A`` directly (``EoraAdapter.as_peft_init``). This module does the same for our methods where
the method's parametrization holds every rank-``k`` update exactly, and refuses where it does not:

============  =====================================================================================================
method        exact projection of per-layer ``B_l (d_out, k)``, ``A_l (k, d_in)``
============  =====================================================================================================
FLoRA linear  yes when ``r_out, r_in >= k``: ``U_out`` an orthonormal basis of ``col(B_l)`` (completed to ``r_out``
              columns), ``U_in`` of ``row(A_l)``, core ``G = U_outᵀ B_l A_l U_in / s``; then
              ``s U_out G U_inᵀ = P_out B_l A_l P_in = B_l A_l`` (the projectors fix the update's own spaces).
LoTR          only when the group's shared factors can span every member: ``r >= rank [B_1 ... B_M]`` and
              ``r >= rank [A_1ᵀ ... A_Mᵀ]``. ``A``, ``B`` are shared by the ``M`` layers of a group, while EoRA
              residuals of different layers have unrelated column / row spaces, so this needs ``r`` up to ``M k``
              (capped at ``d``): on SmolLM2 (30 layers, k=64) that is ``r = d``, more parameters than the LoRA it
              replaces. At a smaller ``r`` the best fit (the Tucker-2 of the stacked residuals) is not exact, and
              this function raises rather than start training from a different model than the compensated one.
LoRETTA-rep   no: ``M_B``, ``M_A`` are tensor trains of TT rank ``R``; a generic ``(d, k)`` factor needs the full
              TT rank, so only a rank-``R`` TT-SVD approximation exists.
MoS           no: every layer's factors are concatenations of shards drawn from pools shared by all layers with
              a fixed random index table, so the layers' factors are not free to take arbitrary values.
LoRETTA-adp   no: a nonlinear bottleneck on the layer's output, it adds no weight update at all.
============  =====================================================================================================

The completion columns (``r > k``) are the adapter's own initial factors, orthogonalized against the update's
basis; their core entries start at zero, so they take gradient from step 0 like the update's own directions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import tensornets
from adapters._delta import LINEAR_LAYERS, weight_matrix
from adapters import _registry, flora, loretta, lotr, mos
from adapters.flora.layer import FloraLayer
from adapters.lotr.layer import LoTRLayer

__all__ = ["init_from_lowrank"]

_PEFT_PREFIX = "base_model.model."

#: Why a method of ours has no exact projection of a low-rank update, by peft type.
_NOT_EXACT = {
    loretta.PEFT_TYPE_REP: "its factors M_B, M_A are tensor trains of TT rank R, and a generic (d, k) factor needs "
    "the full TT rank: only an approximation exists",
    mos.PEFT_TYPE: "its layers' factors are concatenations of shards from pools shared across layers through a "
    "fixed random index table, so they cannot take arbitrary values",
    loretta.PEFT_TYPE_ADP: "it is a nonlinear bottleneck on the layer's output and adds no weight update",
}


@torch.no_grad()
def init_from_lowrank(
    peft_model: PeftModel,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    adapter_name: str = "default",
) -> PeftModel:
    """Set a FLoRA or LoTR adapter so that each listed layer's update equals ``B A`` exactly (in place).

    Parameters
    ----------
    peft_model : PeftModel
        A model carrying a FLoRA or LoTR adapter ``adapter_name`` (``get_peft_model(base, FloraConfig(...))``),
        before training.
    factors : mapping of str to (B, A)
        Per layer name of the base model (``"model.layers.0.mlp.down_proj"``, the keys of
        ``EoraAdapter.factors``): ``B: (d_out, k)``, ``A: (k, d_in)``. Every named layer must be adapted; adapted
        layers not named keep their initial ``ΔW`` (zero).
    adapter_name : str
        The adapter to set.

    Returns
    -------
    PeftModel
        ``peft_model``, whose adapted layers now add ``ΔW_l = B_l A_l`` (float32 rounding of the float64 solution:
        relative error ~1e-7).

    Raises
    ------
    TypeError
        If ``peft_model`` is not a ``PeftModel``.
    ValueError
        For an unknown adapter, a method without an exact projection (LoRETTA, MoS; see the module docstring for
        why), a rank too small to hold the update (FLoRA ``r < k``, LoTR ``r`` below the rank of a group's
        stacked factors), a named layer the adapter does not adapt, or mismatched shapes.

    Examples
    --------
    >>> eora = eora_compensate(model, quantized, stats, rank=16)  # doctest: +SKIP
    >>> tuned = get_peft_model(quantized, FloraConfig(r=16, target_modules=sorted(eora.factors)))  # doctest: +SKIP
    >>> init_from_lowrank(tuned, eora.factors)  # step 0 computes the compensated model  # doctest: +SKIP
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model is a {type(peft_model).__name__}; pass the PeftModel get_peft_model returned")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this model; its adapters are "
                         f"{sorted(peft_model.peft_config)}")
    peft_type = _registry.peft_type_name(peft_model.peft_config[adapter_name].peft_type)
    if peft_type in _NOT_EXACT:
        raise ValueError(f"adapter {adapter_name!r} is {peft_type}, which cannot start exactly at a low-rank update: "
                         f"{_NOT_EXACT[peft_type]}. Start a LoRA (EoraAdapter.as_peft_init), FLoRA or LoTR from it")
    if peft_type not in (flora.PEFT_TYPE, lotr.PEFT_TYPE):
        raise ValueError(f"adapter {adapter_name!r} has peft_type={peft_type!r}; init_from_lowrank sets FLoRA or "
                         "LoTR adapters (a PEFT LoRA: EoraAdapter.as_peft_init)")
    layers = {key.removeprefix(_PEFT_PREFIX): m for key, m in peft_model.named_modules()
              if isinstance(m, BaseTunerLayer) and m._has_adapter(adapter_name)}
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise ValueError(f"layers {missing[:4]} have factors but adapter {adapter_name!r} does not adapt them; add "
                         "them to target_modules")
    pairs = {}
    for name, (B, A) in factors.items():
        base = layers[name].get_base_layer()
        if not isinstance(base, LINEAR_LAYERS):
            raise ValueError(f"layer {name!r} is a {type(base).__name__}: the projection covers nn.Linear (and "
                             "Conv1D) layers (a conv residual's rank lives in another unfolding than FLoRA's Tucker "
                             "modes)")
        shape = tuple(weight_matrix(base).shape)
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != shape:
            raise ValueError(f"layer {name!r}: B {tuple(B.shape)} and A {tuple(A.shape)} must be (d_out, k) and "
                             f"(k, d_in) with (d_out, d_in) = {shape}")
        pairs[name] = (B.detach().double(), A.detach().double())
    if peft_type == flora.PEFT_TYPE:
        for name, (B, A) in pairs.items():
            _set_flora(layers[name], adapter_name, B, A, name)
    else:
        _set_lotr(peft_model, layers, adapter_name, pairs)
    return peft_model


def _spanning_basis(columns: torch.Tensor, own: torch.Tensor, what: str) -> torch.Tensor:
    """``(d, r)`` orthonormal columns whose span contains ``columns: (d, n)``; ``own: (d, r)`` fills the rest.

    The rank ``k`` of ``columns`` is counted above float32 rounding (the factors' storage precision); ``k > r`` has
    no exact basis and raises.
    """
    d, r = own.shape
    U, s, _ = tensornets.truncated_svd(columns, rank=min(columns.shape))
    tol = s[0] * max(columns.shape) * torch.finfo(torch.float32).eps
    k = int((s > tol).sum())
    if k > r:
        raise ValueError(f"{what} has rank {k}, above the adapter's rank {r}: no rank-{r} factor spans it, so the "
                         f"projection would not be exact; pass r>={k}")
    return torch.linalg.qr(torch.cat([U[:, :k], own.double()], 1)).Q[:, :r]


def _set_flora(layer: FloraLayer, adapter_name: str, B: torch.Tensor, A: torch.Tensor, name: str) -> None:
    scale = layer.flr_scale[adapter_name]
    if scale == 0:
        raise ValueError(f"layer {name!r}: FLoRA scale is 0, so no core gives a non-zero update; pass scale != 0")
    u_out, u_in = layer.flr_factors[adapter_name]
    new_out = _spanning_basis(B, u_out, f"layer {name!r}: the column space of B")
    new_in = _spanning_basis(A.T, u_in, f"layer {name!r}: the row space of A")
    core = (new_out.T @ B) @ (A @ new_in) / scale
    u_out.copy_(new_out / layer.flr_multiplier[adapter_name])  # stored: U_out = μ · the stored factor
    u_in.copy_(new_in)
    layer.flr_core[adapter_name].copy_(core)


def _set_lotr(peft_model: PeftModel, layers: Mapping[str, nn.Module], adapter_name: str,
              pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    groups: dict[str, list[str]] = {}
    for name, layer in layers.items():
        if isinstance(layer, LoTRLayer):
            groups.setdefault(layer.lotr_group[adapter_name], []).append(name)
    for group, members in groups.items():
        named = [n for n in members if n in pairs]
        if not named:
            continue
        shared_a, shared_b = layers[named[0]].shared_factors(adapter_name)  # stored: A = μ · shared_a
        if any(layers[n].lotr_scale[adapter_name] == 0 for n in members):
            raise ValueError(f"LoTR group {group!r}: scale alpha / r is 0, so no core gives a non-zero update; "
                             "pass alpha != 0")
        what = f"LoTR group {group!r} ({len(members)} layers sharing A, B)"
        new_a = _spanning_basis(torch.cat([pairs[n][0] for n in named], 1), shared_a,
                                f"{what}: the stacked column spaces [B_1 ... B_M]")
        new_b = _spanning_basis(torch.cat([pairs[n][1].T for n in named], 1), shared_b.T,
                                f"{what}: the stacked row spaces [A_1ᵀ ... A_Mᵀ]").T
        shared_a.copy_(new_a / layers[named[0]].lotr_multiplier[adapter_name])
        shared_b.copy_(new_b)
        for name in members:
            layer = layers[name]
            if name in pairs:
                B, A = pairs[name]
                layer.lotr_core[adapter_name].copy_((new_a.T @ B) @ (A @ new_b.T) / layer.lotr_scale[adapter_name])
            else:
                # A member without factors starts at ΔW = 0, as a fresh adapter does (its old core was for the old A, B).
                layer.lotr_core[adapter_name].zero_()
