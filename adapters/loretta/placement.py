"""Where LoRETTA-adp goes by default: a table per ``model_type``, else read off the module structure.

The adapter sits after each block's attention output projection and after its FFN output
projection (spec: BERT ``*.output.dense``, Llama ``o_proj`` / ``down_proj``). For a model type
the table :data:`ADP_TARGET_MODULES` does not list, :func:`find_adp_placement` finds the same
two projections structurally:

- **blocks**: the children of a ``ModuleList`` / ``Sequential`` whose children share one class
  (``model.layers.0``, ``encoder.layer.3`` ...), outermost lists first;
- **attention**: a block's outermost submodules whose attribute or class name says attention
  (``attn``, ``attention``, ``self_attn``, ``BertAttention``, ``T5LayerCrossAttention`` ...);
  its **output projection** is its last ``nn.Linear`` (registration order) mapping back to the
  width ``d`` its first linear reads (``o_proj``, ``attention.output.dense``, ``attn.Wo``);
  ``nn.MultiheadAttention`` has none (it never calls its ``out_proj``, whose weight it reads);
- **FFN output**: the block's last ``nn.Linear`` outside attention and outside nested lists of
  same-class modules (mixture-of-experts expert lists: one expert is not the FFN) that maps to
  ``d`` (``mlp.down_proj``, ``output.dense``, ``mlp.Wo``).

A block counts only when it has both. Layers already wrapped by a PEFT tuner layer count as
the linear they wrap, so a second adapter finds the same places.
"""

from __future__ import annotations

import re
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

__all__ = ["ADP_TARGET_MODULES", "adp_default_targets", "find_adp_placement"]

_BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2")
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2")

#: Default LoRETTA-adp placement per ``model_type``: the attention output projection and the FFN
#: output projection (BERT family: ``attention.output.dense`` and ``output.dense``, both matched
#: by the suffix ``output.dense``; Llama family: ``o_proj`` and ``down_proj``; GPT-2: both ``c_proj``). Other model
#: types: :func:`find_adp_placement`.
ADP_TARGET_MODULES: dict[str, list[str]] = {
    **{model_type: ["output.dense"] for model_type in _BERT_FAMILY},
    **{model_type: ["o_proj", "down_proj"] for model_type in _LLAMA_FAMILY},
    "distilbert": ["attention.out_lin", "ffn.lin2"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],  # transformers' Conv1D layers
}

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
# Path segments of copies PEFT keeps beside the module they stand for.
_WRAPPER_SEGMENTS = frozenset({"base_layer", "modules_to_save", "original_module"})


def _unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(relative name, linear)`` in registration order, a PEFT-wrapped linear as itself."""
    found = []
    for name, sub in module.named_modules():
        if _WRAPPER_SEGMENTS.intersection(name.split(".")):
            continue
        base = _unwrapped(sub)
        if isinstance(base, nn.Linear):
            found.append((name, base))
    return found


def _is_attention(name: str, module: nn.Module) -> bool:
    return bool(_ATTENTION_NAME.search(name.rsplit(".", 1)[-1]) or _ATTENTION_NAME.search(type(module).__name__))


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(children) > 0
        and len({type(child) for child in children}) == 1
    )


def _block_placement(block: nn.Module) -> Optional[list[str]]:
    """Relative names of one block's attention output projections and FFN output projection, or None."""
    attention: list[str] = []
    for name, sub in block.named_modules():
        if name and not _inside(name, attention) and _is_attention(name, sub):
            attention.append(name)
    outputs, width = [], None
    for outer in attention:
        module = block.get_submodule(outer)
        if isinstance(module, nn.MultiheadAttention):
            continue  # its forward reads out_proj.weight and never calls out_proj: an adapter there would not run
        linears = _linears(module)
        if not linears:
            continue  # e.g. "post_attention_layernorm"
        d = linears[0][1].in_features
        projections = [name for name, linear in linears if linear.out_features == d]
        if projections:
            outputs.append(f"{outer}.{projections[-1]}")
            width = width or d
    if not outputs:
        return None
    # Same-class lists inside a block are mixture-of-experts FFNs: one expert is no FFN output.
    expert_lists = [name for name, sub in block.named_modules() if name and _is_block_list(sub)]
    ffn = [
        name
        for name, linear in _linears(block)
        if linear.out_features == width and not _inside(name, attention) and not _inside(name, expert_lists)
    ]
    return outputs + [ffn[-1]] if ffn else None


def _inside(name: str, outers: list[str]) -> bool:
    return any(name == outer or name.startswith(outer + ".") for outer in outers)


def _placements(model: nn.Module) -> list[tuple[str, str]]:
    """``(full name, name relative to its block)`` of every module of the structural placement."""
    placements: list[tuple[str, str]] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if _WRAPPER_SEGMENTS.intersection(name.split(".")) or _inside(name, lists) or not _is_block_list(module):
            continue
        found = []
        for index, block in module.named_children():
            block_name = f"{name}.{index}" if name else index
            found.extend((f"{block_name}.{rel}", rel) for rel in _block_placement(block) or [])
        if found:
            lists.append(name)
            placements.extend(found)
    return placements


def find_adp_placement(model: nn.Module) -> list[str]:
    """Full names of the modules LoRETTA-adp adapts by default, read off ``model``'s structure.

    Every recognised block contributes its attention output projection(s) and its FFN output
    projection (rules in the module docstring); on a BERT or Llama model these are exactly the
    modules the table :data:`ADP_TARGET_MODULES` selects.

    Returns
    -------
    list of str
        Module names as in ``model.named_modules()``, in model order; empty when no block is
        recognised.
    """
    return [full for full, _ in _placements(model)]


def adp_default_targets(model: nn.Module, model_type: Optional[str]) -> list[str]:
    """Default ``target_modules`` of LoRETTA-adp: the table's entry, else the structural placement.

    The structural placement is given as block-relative suffixes (``self_attn.o_proj``,
    ``mlp.down_proj``, as the table does, so ``layers_to_transform`` works) when these select
    exactly its modules in ``model``, else as the full module names.

    Raises
    ------
    ValueError
        If ``model_type`` is not in the table and no block of ``model`` is recognised.
    """
    if model_type in ADP_TARGET_MODULES:
        return list(ADP_TARGET_MODULES[model_type])
    placements = _placements(model)
    if not placements:
        raise ValueError(
            f"LoRETTA-adp has no default placement for model_type={model_type!r}: it is not in ADP_TARGET_MODULES "
            "and no repeated blocks with an attention output projection and an FFN output projection (nn.Linear "
            "layers mapping back to the block width; mixture-of-experts FFNs count only through a shared expert "
            "that is an nn.Linear; nn.MultiheadAttention's out_proj does not count: it is never called) were "
            "recognised; pass target_modules= naming them, e.g. ['o_proj', 'down_proj']"
        )
    full_names = [full for full, _ in placements]
    suffixes = sorted({rel for _, rel in placements})
    selected = [
        name
        for name, _ in model.named_modules()
        if not _WRAPPER_SEGMENTS.intersection(name.split("."))
        and any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)
    ]
    return suffixes if sorted(selected) == sorted(full_names) else full_names
