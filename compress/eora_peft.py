"""Fine-tune a compressed model from its EoRA residual: a trainable PEFT LoRA that starts at ``B``, ``A``.

EoRA (Liu et al. 2024) also proposes its residual as the initialization for fine-tuning the compressed model:
training then starts from the compensated model ``W_c + B A`` (RTN-3 SmolLM2: perplexity 16.7 instead of 38.4)
rather than from the bare compressed one, as a zero-initialized LoRA does. :func:`as_peft_init` builds that LoRA in
memory: ``get_peft_model(compressed, eora.lora_config())`` with ``lora_A.weight = A (r, in)``,
``lora_B.weight = B (out, r)`` and ``lora_alpha = r`` (scaling 1), exactly the adapter
:meth:`compress.eora.EoraAdapter.save_pretrained` writes, so at step 0 it computes what
``EoraAdapter.apply(compressed)`` and ``PeftModel.from_pretrained(compressed, saved_dir)`` compute, bitwise.

The same works on the checkpoint reloaded through transformers (``AutoModelForCausalLM.from_pretrained(out)``: the
layers are plain ``nn.Linear`` holding the dequantized weights). For our tensor adapters, ``adapters.init_from_lowrank``
starts FLoRA (and LoTR, at ranks that span a whole group) at the same residual; ``compress`` does not import
``adapters``, so that lives there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn

if TYPE_CHECKING:
    from compress.eora import EoraAdapter

__all__ = ["as_peft_init"]


def as_peft_init(eora: EoraAdapter, model: nn.Module, adapter_name: str = "default") -> PeftModel:
    """A trainable PEFT LoRA on ``model`` whose factors start at the EoRA residual (``model`` is modified in place).

    Every compensated layer ``l`` gets ``lora_A = A_l (r, in)``, ``lora_B = B_l (out, r)``, ``lora_alpha = r``, so
    the adapted layer computes ``W_c x + B_l (A_l x)``: the compensated model. Training then updates ``B_l`` and
    ``A_l`` (float32, PEFT's adapter dtype) while ``W_c`` stays frozen: the gradients are
    ``∂L/∂B_l = G_l (A_l x)ᵀ`` and ``∂L/∂A_l = B_lᵀ G_l xᵀ`` for the output gradient ``G_l``, both non-zero from
    step 0 (a zero-initialized LoRA, ``B = 0``, gives ``A`` no gradient at step 0).

    Parameters
    ----------
    eora : EoraAdapter
        From :func:`compress.eora_compensate` (or the block pipeline's ``result.eora``).
    model : nn.Module
        The compressed model the residual was computed for (same layer names and shapes), or a ``PeftModel`` of it,
        to which the LoRA is added as ``adapter_name`` and made the active adapter.
    adapter_name : str
        Name of the new adapter.

    Returns
    -------
    PeftModel
        With the LoRA active and trainable; base weights frozen (``requires_grad=False``), unchanged.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``model`` lacks a compensated layer or its shape differs, if ``adapter_name`` is already taken, or if a
        layer has no PEFT LoRA form (factorized layers: use ``eora.merge`` / ``eora.apply`` instead).

    Examples
    --------
    >>> eora = eora_compensate(model, quantized, stats, rank=64)  # doctest: +SKIP
    >>> tuned = eora.as_peft_init(quantized)  # step 0 == eora.apply(quantized); train as any PEFT LoRA  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; pass the compressed nn.Module the residual was computed for")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = eora.lora_state_dict()  # raises for layers PEFT's LoRA cannot wrap, before the model is touched
    eora._check_model(base)  # every layer exists with the residual's shape, before the model is touched
    config = eora.lora_config(getattr(base, "name_or_path", None) or None)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter_name={adapter_name!r} is already on this model ({sorted(model.peft_config)}); "
                             "pass another name")
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    lora_missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k]
    if result.unexpected_keys or lora_missing:  # a mismatch here is a bug in the key layout, never silent
        raise RuntimeError(f"EoRA LoRA state did not match the PEFT model: unexpected {result.unexpected_keys[:4]}, "
                           f"missing {lora_missing[:4]}")
    peft_model.set_adapter(adapter_name)
    return peft_model
