"""Write a compressed model as a Hugging Face model directory that transformers and vLLM load without this package.

:func:`save_hf_directory` writes ``config.json``, ``generation_config.json``, the tokenizer files and the weights
(``model.safetensors``, or shards with an index). Quantized linears (:class:`compress.quantized.QuantizedWeight`)
are stored in the **compressed-tensors** ``pack-quantized`` format -- the layout llm-compressor writes -- with a
``quantization_config`` in ``config.json``. Per quantized ``nn.Linear`` ``name``, with ``b`` bits, ``G = in / g``
groups:

================================  ====================================  =========================================
tensor                            shape, dtype                          content
================================  ====================================  =========================================
``name.weight_packed``            ``(out, ceil(in b / 32))`` int32      codes ``q + 2^{b-1}``, ``b`` bits each, packed
                                                                        densely along ``in`` (``pack_to_int32``)
``name.weight_scale``             ``(out, G)`` storage dtype            per-group scale ``s``
``name.weight_zero_point``        ``(ceil(out b / 32), G)`` int32       zero points packed along ``out``
                                                                        (asymmetric only)
``name.weight_shape``             ``(2,)`` int64                        ``(out, in)``
================================  ====================================  =========================================

and the loader rebuilds ``Ŵ = s (q − z)`` (compressed-tensors ``dequantize``), the same formula as
:meth:`QuantizedWeight.dequantize`: the codes are bit-packed, never re-rounded. Bytes per weight are
``b / 8 + (scale bytes + b / 8) / g``: 3-bit g64 with 16-bit scales is 0.206 of the 16-bit weight.

Everything else (embeddings, norms, the LM head, dense layers) is stored in the storage ``dtype`` (default
bfloat16, as llm-compressor's outputs of bf16 models); tied embeddings are stored once and stay tied.

Decisions where the formats leave a choice:

- ``quantization_config["dequantize"] = true`` is written by default: transformers then unpacks the weights while
  loading instead of on the first forward pass (the memory after the first forward is the same). Two reasons: PEFT
  cannot wrap still-packed linears (``'Linear' object has no attribute 'weight'``), and with the installed
  compressed-tensors 0.20.1 + transformers 5 the packed-load path builds the asymmetric zero point unpacked on the
  meta device and rejects the checkpoint's packed one (size mismatch). vLLM reads the packed tensors and ignores
  the key. ``dequantize_on_load=False`` leaves it out.
- Layers quantized with several ``(bits, group_size, symmetric)`` schemes: transformers 5's load-time
  dequantization applies the first config group's scheme to every layer. Layers differing only in group size are
  therefore regrouped to the gcd of the group sizes (scales and zero points repeated: exact, a few more bytes),
  unless every layer is quantized per row: those share compressed-tensors' ``"channel"`` strategy at any width.
  Other mixes get one config group each, are written without the key (loaded packed) and must be symmetric.
- Sparse weights (2:4, magnitude pruning) are stored dense: compressed-tensors 0.20 has no sparse compressor any
  more (``sparse-24-bitmask`` / ``sparse-bitmask`` survive only as legacy config names; ``ModelCompressor`` writes
  ``sparsity_config: {}``).
- Models that transformers converts on load (Mixture-of-Experts checkpoints stored per expert, fused into 3-D
  ``experts.gate_up_proj`` / ``down_proj`` parameters in memory; q/k/v split from a fused tensor) are written in
  their in-memory layout when they have packed layers (``save_pretrained(..., save_original_format=False)``):
  beside a ``quantization_config``, transformers 5's loader does not run those conversions (the per-expert layout
  fails with "Concatenate on tensors destined for ...experts.gate_up_proj. Ckpt contains: 0"), while the in-memory
  names load as they are. Without packed layers the original layout is kept.
- A model that accelerate offloads (a :func:`compress.compress_blocks` result with ``offload_folder=``) is written
  without loading its blocks back: transformers' ``save_pretrained`` loads each offloaded tensor, and the codes
  ``compress_blocks`` wrote beside each offloaded layer, one shard at a time (``max_shard_size`` bounds what is in
  memory); offloaded tensors are written as stored, so ``dtype`` must be their dtype.
- Factorized layers (low rank, tensor formats) are not a transformers layer type: use
  :func:`compress.save_compressed` for them (config, tokenizer, weights and a manifest;
  :func:`compress.load_compressed_directory` reloads that directory alone).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    refuse_other_checkpoint,
    refuse_side_branches,
    transformers_weights,
)
from compress.quantized import PackedQuantizedWeight, QuantizedWeight
from compress.targets import unwrap_compiled

#: a quantized layer as the exporter takes it: int8 codes, or codes already packed (the block pipeline keeps them so)
Quantized = QuantizedWeight | PackedQuantizedWeight

__all__ = ["EXPORT_DTYPES", "ExportReport", "PackedLayer", "pack_quantized_weight", "quantization_config", "regroup",
           "save_hf_directory"]

#: storage dtypes :func:`save_hf_directory` writes, by the name the CLI's ``--export-dtype`` takes
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class PackedLayer:
    """Bytes of one quantized layer on disk (codes, scales, zero points and shape) and of its 16-bit weight."""

    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    packed_bytes: int

    @property
    def bf16_bytes(self) -> int:
        """``2 · out · in``: the layer's weight at 16 bits."""
        return 2 * self.shape[0] * self.shape[1]

    @property
    def ratio(self) -> float:
        """``packed_bytes / bf16_bytes``; at most ``(bits + 1) / 16`` for groups of 32 or more."""
        return self.packed_bytes / self.bf16_bytes


@dataclass
class ExportReport:
    """What :func:`save_hf_directory` wrote.

    Attributes:
        path: the model directory.
        dtype: storage dtype of the non-quantized tensors and of the scales.
        packed: one :class:`PackedLayer` per quantized linear, in module order.
        files: name -> bytes of every file written into ``path``.
        not_packed: quantized layers stored dense, with the reason (compressed-tensors packs ``nn.Linear`` only).
    """

    path: Path
    dtype: torch.dtype
    packed: list[PackedLayer] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    not_packed: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole directory (weights, config, tokenizer)."""
        return sum(self.files.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the ``*.safetensors`` files."""
        return sum(b for n, b in self.files.items() if n.endswith(".safetensors"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary (bytes per file, per packed layer, totals)."""
        return {
            "path": str(self.path), "dtype": str(self.dtype).removeprefix("torch."),
            "total_bytes": self.total_bytes, "weight_bytes": self.weight_bytes, "files": dict(self.files),
            "packed_layers": len(self.packed),
            "packed_bytes": sum(p.packed_bytes for p in self.packed),
            "packed_bf16_bytes": sum(p.bf16_bytes for p in self.packed),
            "not_packed": dict(self.not_packed),
        }


def pack_quantized_weight(qw: Quantized, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one quantized linear (local names).

    Codes ``q ∈ [−2^{b−1}, 2^{b−1} − 1]`` ``(out, in)`` are packed by compressed-tensors' ``pack_to_int32`` into
    ``(out, ceil(in b / 32))`` int32 words, ``b`` bits per code with no padding between codes; zero points
    ``(out, G)`` likewise along ``out`` into ``(ceil(out b / 32), G)`` (asymmetric only, as compressed-tensors);
    scales ``(out, G)`` are cast to ``scale_dtype``. A :class:`PackedQuantizedWeight` already holds the packed codes:
    they are written as they are.

    Returns:
        ``{"weight_packed", "weight_scale", ["weight_zero_point",] "weight_shape"}``.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if not isinstance(qw, (QuantizedWeight, PackedQuantizedWeight)):
        raise TypeError(f"qw must be a compress.quantized.QuantizedWeight or PackedQuantizedWeight, got "
                        f"{type(qw).__name__}")
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise TypeError(f"scale_dtype={scale_dtype!r} must be a floating torch dtype, e.g. torch.bfloat16")
    if isinstance(qw, PackedQuantizedWeight) and qw.offloaded:
        return _offloaded_placeholders(qw)
    tensors = {
        "weight_packed": (qw.packed.cpu().contiguous() if isinstance(qw, PackedQuantizedWeight)
                          else pack_to_int32(qw.codes.cpu(), qw.bits)),
        "weight_scale": qw.scale.detach().cpu().to(scale_dtype).contiguous(),
    }
    if not qw.symmetric:
        tensors["weight_zero_point"] = pack_to_int32(qw.zero_point.cpu(), qw.bits, packed_dim=0)
    tensors["weight_shape"] = torch.tensor(tuple(qw.shape), dtype=torch.int64)
    return tensors


def _offloaded_placeholders(qw: PackedQuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors of an offloaded quantized layer as ``meta`` placeholders (their values, as
    :func:`pack_quantized_weight` gave them at the scales' own dtype, lie beside the offloaded layer; transformers'
    ``save_pretrained`` loads them one shard at a time), ``weight_shape`` in memory."""
    out_f, in_f = qw.unpacked_shape
    groups = qw.scale.shape[1]
    tensors = {"weight_packed": torch.empty(qw.packed.shape, dtype=torch.int32, device="meta"),
               "weight_scale": torch.empty(qw.scale.shape, dtype=qw.scale.dtype, device="meta")}
    if not qw.symmetric:
        tensors["weight_zero_point"] = torch.empty((-(-out_f * qw.bits // 32), groups), dtype=torch.int32,
                                                   device="meta")
    tensors["weight_shape"] = torch.tensor((out_f, in_f), dtype=torch.int64)
    return tensors


#: linears that vLLM fuses into one (Llama, Mistral, Qwen, ...: ``qkv_proj``, ``gate_up_proj``); its
#: compressed-tensors loader refuses a fused layer whose shards have different schemes (or are partly dense)
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def vllm_fused_conflicts(quantized: Mapping[str, Quantized], linear_names: list[str]) -> list[str]:
    """Sibling shards of one vLLM-fused linear (:data:`VLLM_FUSED`) that are not all quantized with one scheme or
    all left dense, as ``"model.layers.0.self_attn.{q_proj,k_proj,v_proj}"``."""
    names, conflicts = set(linear_names), []
    for shards in VLLM_FUSED:
        parents = sorted({n.rpartition(".")[0] for n in names if n.rpartition(".")[2] in shards})
        for parent in parents:
            present = [f"{parent}.{s}" for s in shards if f"{parent}.{s}" in names]
            if len({_scheme_key(quantized[n]) if n in quantized else None for n in present}) > 1:
                conflicts.append(f"{parent}.{{{','.join(shards)}}}")
    return conflicts


def _per_row(qw: Quantized) -> bool:
    """One group per output row (``group_size == in``): compressed-tensors' ``"channel"`` strategy."""
    return qw.group_size == qw.shape[1]


def _scheme_key(qw: Quantized, channel: bool = False) -> tuple[int, int | None, bool]:
    """``(bits, group_size, symmetric)``; ``group_size`` is ``None`` for a per-row layer when ``channel`` (layers
    of any width then share one ``"channel"`` scheme)."""
    return qw.bits, None if channel and _per_row(qw) else qw.group_size, qw.symmetric


def quantization_config(quantized: Mapping[str, Quantized], linear_names: list[str]):
    """The compressed-tensors ``QuantizationConfig`` describing ``quantized`` among the model's linears.

    One config group per distinct ``(bits, group_size, symmetric)``. When a single scheme covers the layers, the
    group targets the class ``"Linear"`` and ``ignore`` lists every other linear (the LM head, layers left dense),
    as llm-compressor writes it; with several schemes each group lists its layers by exact name. When every layer
    is quantized per row (one group of its whole width), the scheme is ``strategy="channel"``: one scheme for
    layers of every width, each with ``(out, 1)`` scales.

    Parameters:
        quantized: layer name -> its quantized weight (``nn.Linear`` layers only).
        linear_names: names of every ``nn.Linear`` of the model.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if not quantized:
        raise ValueError("quantized is empty: there is no quantized layer to describe")
    channel = all(_per_row(qw) for qw in quantized.values())
    groups: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, qw in quantized.items():
        groups.setdefault(_scheme_key(qw, channel), []).append(name)
    single = len(groups) == 1
    config_groups = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(groups.items()):
        args = (QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
                if group_size is None else
                QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                                 group_size=group_size))
        config_groups[f"group_{i}"] = QuantizationScheme(targets=["Linear"] if single else sorted(names), weights=args)
    ignore = sorted(n for n in linear_names if n not in quantized) if single else []
    return QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                              ignore=ignore)


def regroup(qw: Quantized, group_size: int) -> Quantized:
    """The same weight with groups of ``group_size``, a divisor of ``qw.group_size``: every scale and zero point
    repeated ``qw.group_size / group_size`` times along ``in``. Codes (packed or not) and ``s (q − z)`` are
    unchanged."""
    if group_size < 1 or qw.group_size % group_size:
        raise ValueError(f"group_size={group_size} must divide the weight's group size {qw.group_size}")
    if isinstance(qw, PackedQuantizedWeight) and qw.offloaded:
        raise ValueError(f"a layer quantized with groups of {qw.group_size} would be regrouped to {group_size} (layers "
                         "of one checkpoint share one group size), but its codes were written to disk in their own "
                         "groups (compress_blocks regroups them to the run's common group size when it writes them; "
                         "this layer comes from elsewhere): export the layers of one compress_blocks run together")
    k = qw.group_size // group_size
    scale, zero_point = qw.scale.repeat_interleave(k, dim=1), qw.zero_point.repeat_interleave(k, dim=1)
    if isinstance(qw, PackedQuantizedWeight):
        return PackedQuantizedWeight(qw.packed, scale, zero_point, qw.bits, group_size, qw.symmetric,
                                     qw.unpacked_shape)
    return QuantizedWeight(qw.codes, scale, zero_point, qw.bits, group_size, qw.symmetric)


def _common_group_size(quantized: dict[str, Quantized]) -> dict[str, Quantized]:
    """Layers that share bits and symmetry but not the group size, regrouped to the gcd of their group sizes.

    A quantizer shortens groups on narrow layers (groups of 64 become 32 on a 32-wide layer); transformers 5
    dequantizes every layer with one scheme, so one group size for all keeps the checkpoint loadable, exactly.
    Layers that are all per row are left as they are: they share the ``"channel"`` scheme whatever their widths
    (regrouping per-row layers 576 and 1536 wide to their gcd, 192, would store 3 and 8 scales per row instead
    of one).
    """
    if len({(q.bits, q.symmetric) for q in quantized.values()}) != 1:
        return quantized
    if all(_per_row(q) for q in quantized.values()):
        return quantized
    g = math.gcd(*(q.group_size for q in quantized.values()))
    return {n: q if q.group_size == g else regroup(q, g) for n, q in quantized.items()}


def _check_quantized(model: nn.Module, quantized: Mapping[str, Quantized]) -> dict[str, str]:
    """Validate names and shapes; return the layers that cannot be packed (not ``nn.Linear``) with the reason."""
    not_packed = {}
    for name, qw in quantized.items():
        if not isinstance(qw, (QuantizedWeight, PackedQuantizedWeight)):
            raise TypeError(f"quantized[{name!r}] must be a QuantizedWeight or PackedQuantizedWeight, got "
                            f"{type(qw).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized names layer {name!r}, which the model does not have; pass the model the "
                             "weights were quantized from") from None
        if not isinstance(module, nn.Linear):  # subclasses (Falcon's FalconLinear) too: compressed-tensors matches
            # its "Linear" target along the class hierarchy
            not_packed[name] = (f"{type(module).__name__} is not an nn.Linear (compressed-tensors packs linears only); "
                                "stored dense")
            continue
        if tuple(module.weight.shape) != tuple(qw.shape):
            raise ValueError(f"quantized[{name!r}] has shape {tuple(qw.shape)}, the layer's weight is "
                             f"{tuple(module.weight.shape)}; pass the model the weights were quantized from")
        _check_still_quantized(name, module.weight, qw)
    return not_packed


#: largest relative Frobenius distance between a layer's weight and its codes' dequantization that still counts as the
#: same weight: storage-dtype rounding (bf16: ~2e-3 per entry, far less over a matrix); a merged residual moves it more
_SAME_WEIGHT_TOL = 1e-3


def _check_still_quantized(name: str, weight: torch.Tensor, qw: Quantized) -> None:
    """Refuse to pack codes that no longer describe the layer's weight: the checkpoint would silently drop what was
    merged into it since quantization (an EoRA residual, a fine-tuned LoRA). An offloaded (meta) weight is not read,
    nor codes written to disk: the export never loads what it does not write."""
    if weight.is_meta or (isinstance(qw, PackedQuantizedWeight) and qw.offloaded):
        return
    dequantized = qw.dequantize(weight.dtype).to(weight.device, torch.float32)
    err = float((weight.detach().to(torch.float32) - dequantized).norm() / dequantized.norm().clamp_min(1e-30))
    if err > _SAME_WEIGHT_TOL:
        raise ValueError(f"layer {name!r}: its weight differs from its quantized codes by {err:.2e} (relative); a "
                         "residual or adapter was merged into it after quantization, and packing the codes would drop "
                         "it. Save the codes from the compressed model and the adapter beside them "
                         "(EoraAdapter.save_pretrained / PeftModel.save_pretrained), or quantize the merged model "
                         "again")


def _storage_state_dict(model: nn.Module, quantized: Mapping[str, Quantized], dtype: torch.dtype,
                        ) -> tuple[dict[str, torch.Tensor], list[PackedLayer]]:
    """The checkpoint tensors: packed tensors for ``quantized``, every other float tensor cast to ``dtype``.

    Tensors shared in memory (tied embeddings) stay shared, so that ``save_pretrained`` stores them once.
    """
    cast: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    packed = []
    for key, tensor in model.state_dict().items():
        module_name, _, local = key.rpartition(".")
        if local == "weight" and module_name in quantized:
            qw = quantized[module_name]
            tensors = pack_quantized_weight(qw, dtype)
            state.update({f"{module_name}.{k}": v for k, v in tensors.items()})
            packed.append(PackedLayer(module_name, tuple(qw.shape), qw.bits, qw.group_size, qw.symmetric,
                                      sum(t.numel() * t.element_size() for t in tensors.values())))
            continue
        if tensor.is_meta:  # offloaded (checked by _check_offloaded): save_pretrained loads it with its shard
            state[key] = tensor
            continue
        if tensor.is_floating_point():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in cast or cast[ptr].shape != tensor.shape:
                cast[ptr] = tensor.detach().to("cpu", dtype)
            tensor = cast[ptr]
        state[key] = tensor
    return state, packed


def _check_offloaded(model: nn.Module, packable: Mapping[str, Quantized], dtype: torch.dtype) -> None:
    """Refuse tensors on the meta device that ``save_pretrained`` cannot load shard by shard.

    A model that accelerate offloads (loaded with a ``device_map`` holding ``"disk"`` or ``"cpu"``, or compressed by
    :func:`compress.compress_blocks` with ``offload_folder=``) keeps those tensors on ``meta`` and their values in its
    hooks' weights maps; transformers' ``save_pretrained`` loads them one shard at a time, so exporting it never holds
    more than one shard (``max_shard_size``) of them. They are written as stored: their dtype must be ``dtype``. The
    weights of packed layers are never read (their codes are written).
    """
    offloaded = [(k, t) for k, t in model.state_dict().items()
                 if t.is_meta and not (k.endswith(".weight") and k[:-len(".weight")] in packable)]
    # codes written beside their offloaded layer: read from there, in the dtype they were written in
    offloaded += [(f"{name}.weight_scale", qw.scale) for name, qw in packable.items()
                  if isinstance(qw, PackedQuantizedWeight) and qw.offloaded]
    if not offloaded:
        return
    device_map = getattr(model, "hf_device_map", None) or {}
    unloadable = [k for k, _ in offloaded if not _offload_holds(model, k)]
    if unloadable or not {"disk", "cpu"} & set(device_map.values()):
        name = unloadable[0] if unloadable else offloaded[0][0]
        raise ValueError(f"model tensor {name!r} ({len(unloadable or offloaded)} in all) is on the meta device "
                         "and no accelerate offload hook of a model loaded with a device_map holds its value "
                         "(never loaded), so it has no values to save; load the model's weights first")
    other = sorted({str(t.dtype).removeprefix("torch.") for _, t in offloaded if t.is_floating_point()
                    and t.dtype != dtype})
    if other:
        raise ValueError(f"dtype={dtype!r}, but the model's offloaded tensors are stored in {', '.join(other)} and are "
                         "written as stored (loaded one shard at a time); pass dtype=torch."
                         f"{other[0]}, or load the model in {str(dtype).removeprefix('torch.')}")


@contextmanager
def _known_to(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the context, the ``meta`` placeholders of ``state`` that are no tensor of ``model`` (the codes of
    offloaded quantized layers) are non-persistent buffers of their module: ``save_pretrained`` looks every offloaded
    tensor up in the model (to find tied ones) before it loads its value through the module's hook."""
    added = []
    for key, tensor in state.items():
        if not tensor.is_meta:
            continue
        module_name, _, local = key.rpartition(".")
        module = model.get_submodule(module_name)
        if local not in module._parameters and local not in module._buffers:
            module.register_buffer(local, tensor, persistent=False)
            added.append((module, local))
    try:
        yield
    finally:
        for module, local in added:
            del module._buffers[local]


def _offload_holds(model: nn.Module, key: str) -> bool:
    """Whether the accelerate hook of the innermost module above state-dict ``key`` (where transformers'
    ``save_pretrained`` looks for an offloaded tensor's value) holds a value for it."""
    parts = key.split(".")
    for end in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:end])), "_hf_hook", None)
        if hook is None:
            continue
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            return False
        # accelerate's PrefixedDataset over an OffloadedWeightsLoader: look the key up without loading the tensor
        keys = getattr(getattr(weights, "dataset", weights), "all_keys", None)
        return keys is None or getattr(weights, "prefix", "") + ".".join(parts[end:]) in keys
    return False


def _identity(file: Path) -> tuple[int, int, int]:
    """``(inode, size, mtime)``: what tells a file from the one written over it."""
    st = file.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _has_weight_converters(model: nn.Module) -> bool:
    """Whether transformers converts some of ``model``'s tensors between checkpoint and memory by more than a
    renaming (splits, concatenations: MoE experts, fused q/k/v), which it cannot do beside packed layers on load."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # a transformers without load-time conversions writes what it loads
        return False
    # what save_pretrained reverts: the conversions of the load, or the architecture's own
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    return any(isinstance(c, WeightConverter) for c in conversions or ())


def save_hf_directory(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    quantized: Mapping[str, Quantized] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    dequantize_on_load: bool = True,
    max_shard_size: int | str = "5GB",
) -> ExportReport:
    """Write ``model`` as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` loads alone.

    Parameters:
        model: a transformers ``PreTrainedModel`` whose quantized linears hold their dequantized weights
            ``s (q − z)`` (what :func:`compress.compress_model` returns).
        path: directory to write (created; existing weight files in it are replaced).
        tokenizer: saved beside the model when given (``tokenizer.save_pretrained``).
        quantized: layer name -> :class:`QuantizedWeight` or :class:`PackedQuantizedWeight`; these ``nn.Linear``
            layers are written packed
            (compressed-tensors ``pack-quantized``), any other quantized layer type dense (listed in
            ``ExportReport.not_packed``).
        dtype: storage dtype of every floating tensor that is not packed, and of the scales (bfloat16, float16 or
            float32); ``config.json`` records it, so ``from_pretrained`` loads in it by default.
        dequantize_on_load: write ``"dequantize": true`` into ``quantization_config`` (see the module docstring;
            ignored when the layers mix several schemes).
        max_shard_size: larger checkpoints are split into shards with an index (``save_pretrained``'s rule).

    Returns:
        An :class:`ExportReport` (bytes per file and per packed layer).

    Example::

        report = save_hf_directory(compressed, "out", tokenizer=tok, quantized=qweights)
        # in any Python with transformers + compressed-tensors, without this package:
        model = AutoModelForCausalLM.from_pretrained("out")
    """
    from transformers import PreTrainedModel

    from tensornets import Factorization, FactorizedConv2d, FactorizedLinear

    model = unwrap_compiled(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (it needs a config to write), got "
                        f"{type(model).__name__}; save other modules with compress.save_compressed")
    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"dtype={dtype!r} is not a storage dtype; pass one of "
                         f"{', '.join('torch.' + k for k in EXPORT_DTYPES)}")
    refuse_side_branches(model, "save_hf_directory")
    factorized = [n for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d,
                                                                        Factorization))]
    if factorized:
        raise ValueError(f"model has factorized layers ({factorized[:3]}), which transformers cannot build from a "
                         "config; save it with compress.save_compressed (compress.load_compressed_directory reloads "
                         "it)")
    quantized = dict(quantized or {})
    not_packed = _check_quantized(model, quantized)
    if not_packed:
        # the quantized values still load (stored dense, on their grid), but the file is not smaller for them
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in not_packed})
        warnings.warn(f"{len(not_packed)} quantized layer(s) ({', '.join(kinds)}: {sorted(not_packed)[:3]}) are not "
                      "nn.Linear and are stored dense: compressed-tensors packs linears only, so they take their full "
                      "size on disk (ExportReport.not_packed lists them)", UserWarning, stacklevel=2)
    packable = {n: q for n, q in quantized.items() if n not in not_packed}
    rounded = [n for n, q in packable.items() if not q.scale.is_meta and q.scale.dtype != dtype
               and not torch.equal(q.scale.detach().to(dtype).to(q.scale.dtype), q.scale.detach())]
    if rounded:
        # the codes were chosen for the unrounded scales: the file then holds other weights than those evaluated
        warnings.warn(f"{len(rounded)} quantized layer(s) ({sorted(rounded)[:3]}) have "
                      f"{packable[rounded[0]].scale.dtype} scales that {dtype} cannot hold: the file stores them "
                      "rounded, so its weights differ from the evaluated ones; quantize with "
                      f"CompressionConfig(scale_dtype={dtype}) (as tensornets compress does), or export with dtype= "
                      "the scales' dtype", UserWarning, stacklevel=2)
    packable = _common_group_size(packable)
    channel = bool(packable) and all(_per_row(q) for q in packable.values())
    schemes = {_scheme_key(q, channel) for q in packable.values()}
    if len(schemes) > 1:
        # transformers 5 dequantizes every layer with the first group's scheme, and its packed path cannot take
        # asymmetric zero points (see the module docstring): only symmetric mixes load, packed.
        if any(not symmetric for _, _, symmetric in schemes):
            raise ValueError(f"quantized mixes {len(schemes)} (bits, group_size, symmetric) schemes "
                             f"{sorted(schemes)} with asymmetric ones, which transformers cannot load; quantize "
                             "every layer with one scheme, or use symmetric schemes only")
        dequantize_on_load = False

    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    conflicts = vllm_fused_conflicts(packable, linear_names)
    if conflicts:  # transformers loads it: a warning, not an error
        warnings.warn(f"vLLM fuses {', '.join(conflicts[:3])}{' ...' if len(conflicts) > 3 else ''} into one layer "
                      f"and refuses shards quantized differently ({len(conflicts)} such groups); to serve this "
                      "directory with vLLM, quantize q/k/v (and gate/up) alike", UserWarning, stacklevel=2)

    _check_offloaded(model, packable, dtype)
    out = Path(path)
    refuse_other_checkpoint(out, [f for f in (out / MANIFEST_FILE, out / WEIGHTS_FILE) if f.is_file()],
                            "save_hf_directory")
    out.mkdir(parents=True, exist_ok=True)
    state, packed = _storage_state_dict(model, packable, dtype)
    # save_pretrained removes stale shards of its own naming but not a single model.safetensors (nor an index)
    # left by an earlier save: beside new shards, transformers would load the old weights. They are removed once
    # the new weights are written (a failed save leaves the earlier checkpoint whole): every file of the earlier
    # save that this one did not replace (safetensors writes a new file and renames it over the old one).
    earlier = {f: _identity(f) for f in transformers_weights(out)}
    # save_pretrained records the in-memory dtype and fills in `architectures` on the model's own config:
    # give it a copy so the caller's model is left as it was.
    original_config = model.config
    model.config = copy.deepcopy(original_config)
    try:
        if hasattr(model.config, "quantization_config"):  # e.g. a GGUF-loaded model's: not what is written here
            del model.config.quantization_config
        # (a transformers without load-time conversions has no save_original_format either)
        layout = {"save_original_format": False} if packed and _has_weight_converters(model) else {}
        with warnings.catch_warnings(), _known_to(model, state):
            # about its own 50GB default shard size: offloaded tensors are loaded one shard (max_shard_size) at a time
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(out, state_dict=state, max_shard_size=max_shard_size, safe_serialization=True,
                                  **layout)
    finally:
        model.config = original_config
    for stale, identity in earlier.items():
        if stale.exists() and _identity(stale) == identity:
            stale.unlink()
    _write_config(out, dtype, packable, linear_names, dequantize_on_load)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return ExportReport(out, dtype, packed, files, not_packed)


def _write_config(out: Path, dtype: torch.dtype, packable: Mapping[str, Quantized], linear_names: list[str],
                  dequantize_on_load: bool) -> None:
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not packable:
        return
    from compressed_tensors.compressors import ModelCompressor

    # ModelCompressor.update_config writes the block exactly as llm-compressor does (format, version, groups)
    ModelCompressor(quantization_config=quantization_config(packable, linear_names)).update_config(str(out))
    if dequantize_on_load:
        config = json.loads(config_file.read_text())
        config["quantization_config"]["dequantize"] = True
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
