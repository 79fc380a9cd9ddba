"""Save a compressed model as a directory, and reload it from that directory alone.

:func:`save_compressed` writes ``DIR``:

==================================  ===========================================================================
file                                content
==================================  ===========================================================================
``compressed_model.safetensors``    every tensor of the model's ``state_dict``; a tensor shared by several names
                                    (tied embeddings) is stored once; the weight of a quantized layer (``quantized=``)
                                    as ``<layer>.weight_packed`` / ``weight_scale`` / ``weight_zero_point``, its
                                    codes bit-packed as in compressed-tensors' ``pack-quantized`` format
``compressed_manifest.json``        ``format``, ``version``, ``architecture`` (the model's class), ``dtype``,
                                    ``save_id`` (also in the weights' header), ``config_sha256`` (of config.json),
                                    ``layers``: module path -> structure of each factorized layer (kind, format,
                                    ``in/out_features``, modes, ranks, bias; :func:`tensornets.io.module_spec`),
                                    ``shared``: dropped name -> the stored name it is an alias of,
                                    ``quantized`` (version 3): layer path -> bits, group size, kind, weight shape
                                    and dtypes of each packed weight
``config.json`` (+ generation)      transformers models only: the architecture's config
tokenizer files                     when a tokenizer is given
``README.md``                       how to load the directory
==================================  ===========================================================================

:func:`load_compressed_directory` needs nothing else: it builds the architecture from ``config.json`` on the meta
device (``accelerate.init_empty_weights``, so no dense weight is ever allocated), puts factorized modules of the
manifest's structure at the manifest's paths, and assigns the tensors read with safetensors (no pickle, no copy
into a dense model). Peak memory is the size of the compressed weights. :func:`load_compressed` instead re-applies
the surgery to a model the caller built (any ``nn.Module``, e.g. one that is not a transformers model).

Both loaders check the whole checkpoint before they change or return a model, and refuse with a ``ValueError``
naming the file and the entry: the manifest's structure and types (``quantized`` entries: int ``bits``,
``group_size`` and ``shape``, floating ``dtype`` / ``storage_dtype``); that the file holds exactly the model's
tensors, in their shapes and the recorded dtype; that every ``shared`` alias names a tensor the file does not store
and a stored target of the alias's shape; that every packed layer's scales are finite and positive and its zero
points lie in its bit width's code range (:func:`compress.quantized.check_values`). :func:`save_compressed` refuses
a ``dtype`` that would turn finite values into inf.

Saves to one directory run one at a time (a lock on the directory), and each file is written aside and renamed
into place: a failed save leaves the earlier checkpoint whole. A save stopped between its renames leaves files of
two saves, which the loaders say: weights and manifest of different ``save_id`` are refused, and a ``config.json``
whose digest is not the manifest's ``config_sha256`` gets a warning (it may also be the user's own edit).

Why the weights are not in ``model.safetensors``: transformers cannot build factorized layers from a config. Under
that name ``AutoModelForCausalLM.from_pretrained(DIR)`` would load the dense architecture, drop the factorized
tensors as unexpected and leave those layers at random init with only a warning. With another name it refuses
the directory (no ``model.safetensors``), and ``AutoConfig`` / ``AutoTokenizer`` still read it.

Directories written by 0.1.0 (``model.safetensors`` with the manifest in its header, no config) still load with
:func:`load_compressed`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from compress.quantized import PackedQuantizedWeight, QuantizedWeight, check_values
from compress.targets import dense_weight, layer_kind, replace_module, unwrap_compiled
from tensornets import FactorizedConv2d, FactorizedLinear, Factorization
from tensornets.cache_dir import exclusive_lock
from tensornets.io import aligned, build_from_spec, module_spec
from tensornets.devices import usable_device

__all__ = ["MANIFEST_FILE", "WEIGHTS_FILE", "load_compressed", "load_compressed_directory", "save_compressed"]

#: the weights of a compressed-model directory
WEIGHTS_FILE = "compressed_model.safetensors"
#: its manifest (JSON)
MANIFEST_FILE = "compressed_manifest.json"

_FORMAT = "tensornets.compress"
_VERSION = 2
_PACKED_VERSION = 3  # written when quantized layers are stored packed: a reader of version 2 would miss their weights
#: the tensors that replace a packed layer's ``weight`` (compressed-tensors' names)
_PACKED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point")
_V1_FILE = "model.safetensors"  # 0.1.0: the manifest sat in this file's safetensors header
_V1_HEADER_KEY = "tensornets.compress"

_README = """# Compressed model (tensornets)

Factorized layers (low rank / tensor formats) that transformers cannot build from `config.json` alone.
Load with the `torch-tensornets` package:

```python
from compress import load_compressed_directory
model = load_compressed_directory("{path}")
```

`{manifest}` lists every factorized layer (format, shapes, ranks); `{weights}` holds the tensors.
"""


# ---------------------------------------------------------------------------------------------- save
def _factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Path -> :func:`module_spec` of the outermost factorized modules (a Factorization inside a
    FactorizedLinear is rebuilt by its parent)."""
    factorized = (FactorizedLinear, FactorizedConv2d, Factorization)
    layers = {n: module_spec(m) for n, m in model.named_modules() if n and isinstance(m, factorized)}
    return {n: s for n, s in layers.items() if not any(n.startswith(p + ".") for p in layers)}


def _stored_tensors(model: nn.Module, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (CPU, contiguous, floating ones cast to ``dtype``) and the aliases left out.

    Names whose tensors share one storage with the same shape (tied embeddings) are stored once under the first
    name in ``state_dict`` order; the others are returned as ``alias -> stored name``. A cast that turns finite
    entries into inf (beyond float16's range) is refused, naming the tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    overflow: dict[str, float] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.is_meta:
            raise ValueError(f"model tensor {name!r} is on the meta device (offloaded or never loaded), so it has no "
                             "values to save; load the model's weights (e.g. remove accelerate's offload hooks) first")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in first:
            shared[name] = first[key]
            continue
        first[key] = name
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            cast = tensor.to(dtype)
            if not bool(torch.isfinite(cast).all()) and bool((torch.isfinite(tensor) & ~torch.isfinite(cast)).any()):
                overflow[name] = float(tensor[torch.isfinite(tensor)].abs().max())
            tensor = cast
        tensors[name] = tensor.to("cpu").contiguous()
    if overflow:
        found = ", ".join(f"{k!r} (entries up to {v:.3g})" for k, v in list(overflow.items())[:5])
        raise ValueError(f"save_compressed: dtype={dtype} turns finite entries of {found} into inf, beyond its range "
                         f"({torch.finfo(dtype).max:.3g}); pass dtype=torch.bfloat16 or torch.float32")
    return tensors, shared


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], shared: Mapping[str, str],
                    quantized: Mapping[str, QuantizedWeight | PackedQuantizedWeight],
                    dtype: torch.dtype | None) -> dict[str, dict[str, Any]]:
    """Replace each quantized layer's ``weight`` in ``tensors`` by its packed codes, scales and zero points (in
    place); returns the manifest's ``quantized`` table. Each layer's weight must be exactly ``q.dequantize()``, so
    that the reloaded weight is the saved one bit for bit."""
    entries: dict[str, dict[str, Any]] = {}
    for name, q in quantized.items():
        if not isinstance(q, (QuantizedWeight, PackedQuantizedWeight)):
            raise TypeError(f"quantized[{name!r}] is a {type(q).__name__}; pass CompressionReport.quantized (name -> "
                            "QuantizedWeight)")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized names layer {name!r}, which the model does not have; pass the report of this "
                             "model") from None
        try:
            kind = layer_kind(module)
        except TypeError:
            kind = None
        key = f"{name}.weight"
        if kind not in ("linear", "conv1d", "conv2d") or key not in tensors:
            tied = ", its weight tied to another" if key in shared else ""
            raise ValueError(f"quantized layer {name!r} has no dense weight of its own to pack (a "
                             f"{type(module).__name__}{tied}); leave it out of quantized")
        if key in shared.values():
            aliases = sorted(a for a, k in shared.items() if k == key)
            raise ValueError(f"quantized layer {name!r} shares its weight with {aliases}; leave it out of quantized "
                             "(the tied tensor is stored dense)")
        if isinstance(q, PackedQuantizedWeight) and q.offloaded:
            raise ValueError(f"quantized[{name!r}] was written beside an offloaded block (its tensors are on meta); "
                             "export that model with save_hf_directory, which reads them from disk")
        W = dense_weight(module)
        if tuple(q.shape) != tuple(W.shape) or not torch.equal(q.dequantize(W.dtype).to(W.device), W):
            raise ValueError(f"layer {name!r}'s weight is not the one quantized[{name!r}] dequantizes to (changed "
                             "after compression, e.g. an adapter merged into it); pass the report of this very model, "
                             "or leave the layer out of quantized to store it dense")
        packed = q if isinstance(q, PackedQuantizedWeight) else q.pack()
        del tensors[key]
        for suffix, tensor in zip(_PACKED_KEYS, (packed.packed, packed.scale, packed.zero_point)):
            tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu").contiguous()  # scales as chosen: no re-rounding
        entries[name] = {"bits": packed.bits, "group_size": packed.group_size, "symmetric": packed.symmetric,
                         "kind": kind, "shape": list(module.weight.shape), "dtype": _dtype_name(W.dtype),
                         "storage_dtype": _dtype_name(dtype or W.dtype)}
    return entries


def _transformers_class(model: nn.Module) -> str | None:
    """The model's class name when transformers exports it (so that the loader can look it up), else ``None``."""
    import transformers

    name = type(model).__name__
    return name if getattr(transformers, name, None) is type(model) and hasattr(model, "config") else None


def refuse_side_branches(model: nn.Module, caller: str) -> None:
    """Refuse a model with EoRA side branches (:meth:`compress.EoraAdapter.apply`) or PEFT adapter layers: a checkpoint
    of it would name ``<layer>.base_layer`` and ``lora_A`` / ``lora_B`` tensors that no plain model has."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from compress.eora import CompensatedLayer

    wrapped = [n for n, m in model.named_modules() if isinstance(m, (CompensatedLayer, BaseTunerLayer))]
    if wrapped:
        raise ValueError(f"{caller}: layers {wrapped[:3]} carry an adapter side branch (EoraAdapter.apply or PEFT); "
                         "save the model without it and the adapter beside it (EoraAdapter.save_pretrained, "
                         "PeftModel.save_pretrained), or fold it in first (EoraAdapter.merge, merge_and_unload)")


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    quantized: Mapping[str, QuantizedWeight | PackedQuantizedWeight] | None = None,
) -> Path:
    """Write a compressed model as a directory that :func:`load_compressed_directory` reloads alone.

    Parameters
    ----------
    model : nn.Module
        Typically ``compress_model(...).model``: factorized layers (:class:`tensornets.FactorizedLinear` /
        :class:`tensornets.FactorizedConv2d`) among ordinary ones. Any ``nn.Module`` is accepted; a transformers
        model also gets its ``config.json`` (and ``generation_config.json``), which the directory-only loader needs.
    path : str or path-like
        Directory to write (created; the files of the table in :mod:`compress.checkpoint` are replaced).
    tokenizer : optional
        Saved beside the weights (``tokenizer.save_pretrained(path)``).
    dtype : torch.dtype, optional
        Storage dtype of every floating tensor (``torch.bfloat16`` halves the file); default: as in memory, so the
        round trip is bitwise exact.
    quantized : mapping, optional
        ``CompressionReport.quantized`` of a quantizing method (rtn, gptq, quantized sparsegpt): these layers' weights
        are stored as bit-packed integer codes with their group scales and zero points (a 4-bit layer takes about an
        eighth of its float32 bytes) and dequantized on load, bitwise to the weight saved. For any ``nn.Module``;
        transformers models also export to a checkpoint transformers and vLLM load themselves
        (:func:`compress.export.save_hf_directory`).

    Returns
    -------
    Path
        The directory. Nothing in it is pickled.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r} must be a floating torch dtype (e.g. torch.bfloat16) or None")
    if quantized is not None and not isinstance(quantized, Mapping):
        raise TypeError(f"quantized must map layer names to QuantizedWeight (CompressionReport.quantized), got "
                        f"{type(quantized).__name__}")
    model = unwrap_compiled(model)
    refuse_side_branches(model, "save_compressed")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path={str(out)!r} is a file; save_compressed writes a directory: pass a new or empty "
                         "directory's path")
    refuse_other_checkpoint(out, transformers_weights(out), "save_compressed")
    tensors, shared = _stored_tensors(model, dtype)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    packed = _pack_quantized(model, tensors, shared, quantized or {}, dtype)
    out.mkdir(parents=True, exist_ok=True)
    architecture = _transformers_class(model)
    manifest = {
        "format": _FORMAT,
        "version": _PACKED_VERSION if packed else _VERSION,
        "architecture": architecture,
        "module_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": _dtype_name(floating.pop()) if len(floating) == 1 else None,
        "layers": _factorized_layers(model),
        "shared": shared,
        **({"quantized": packed} if packed else {}),
    }
    # One writer at a time (every rank of a distributed job saving to one path): the temporary files below have
    # fixed names, and the files of two saves must not interleave.
    with exclusive_lock(out):
        staged = out / ".config.tmp"  # config.json / generation_config.json, renamed into place last
        shutil.rmtree(staged, ignore_errors=True)
        weights_tmp, manifest_tmp = out / f".{WEIGHTS_FILE}.tmp", out / f".{MANIFEST_FILE}.tmp"
        try:
            if architecture is not None:
                config = copy.deepcopy(model.config)
                config.architectures = [architecture]
                if manifest["dtype"] is not None:
                    config.dtype = manifest["dtype"]
                if hasattr(config, "quantization_config"):  # e.g. a GGUF-loaded model's: not these weights'
                    del config.quantization_config
                config.save_pretrained(staged)
                generation = getattr(model, "generation_config", None)
                if generation is not None and model.can_generate():
                    generation.save_pretrained(staged)
                # a save stopped between the manifest and config.json leaves a config.json the manifest does not
                # name, which the loader says
                manifest["config_sha256"] = _sha256(staged / "config.json")
            # one save id in the weights and the manifest: files of two different saves are refused on load
            manifest["save_id"] = uuid.uuid4().hex
            # written aside, then renamed into place: a failed write leaves an earlier checkpoint whole
            save_file(tensors, str(weights_tmp), metadata={"format": "pt", "save_id": manifest["save_id"]})
            manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(weights_tmp, out / WEIGHTS_FILE)
            os.replace(manifest_tmp, out / MANIFEST_FILE)
            if architecture is not None:
                for file in sorted(staged.iterdir()):
                    os.replace(file, out / file.name)
                (out / "README.md").write_text(_README.format(path=out, manifest=MANIFEST_FILE, weights=WEIGHTS_FILE))
        finally:
            weights_tmp.unlink(missing_ok=True)
            manifest_tmp.unlink(missing_ok=True)
            shutil.rmtree(staged, ignore_errors=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return out


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def transformers_weights(directory: Path) -> list[Path]:
    """The transformers weight files in ``directory`` (single file, shards, index, pickled ``.bin``)."""
    if not directory.is_dir():
        return []
    patterns = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")
    return sorted({f for pattern in patterns for f in directory.glob(pattern)})


def refuse_other_checkpoint(directory: Path, found: list[Path], writer: str) -> None:
    """Raise ``ValueError`` when ``directory`` already holds the other kind of checkpoint (``found``).

    A directory holding both kinds loads as whichever the loader looks for: transformers would build the dense
    architecture from the new ``config.json`` around stale weights (random layers, only a warning).
    """
    if found:
        names = ", ".join(f.name for f in found[:3]) + (" ..." if len(found) > 3 else "")
        raise ValueError(f"path={str(directory)!r} already holds {names} from another checkpoint; {writer} would "
                         "leave them beside its own files and loaders would mix the two: write to an empty directory "
                         "or remove them first")


# ---------------------------------------------------------------------------------------------- read
@dataclass(frozen=True)
class _Checkpoint:
    weights: Path
    manifest_file: Path  # where the manifest was read (the weights file itself for 0.1.0 directories)
    manifest: dict[str, Any]


def _read_checkpoint(path: str | os.PathLike) -> _Checkpoint:
    """Locate the weights and read and validate the manifest; every failure names the file."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        manifest_file = path / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested very deep
            raise ValueError(f"{manifest_file} is not valid JSON ({e}); rewrite the directory with "
                             "compress.save_compressed") from None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError(f"{manifest_file} is not a compressed-model manifest (format {_FORMAT!r} expected)")
        if manifest.get("version") not in (_VERSION, _PACKED_VERSION):
            raise ValueError(f"{manifest_file} has version {manifest.get('version')!r}; this version reads "
                             f"{_VERSION} and {_PACKED_VERSION}")
        if not isinstance(manifest.get("layers"), dict) or not isinstance(manifest.get("shared"), dict):
            raise ValueError(f"{manifest_file} lacks its 'layers' / 'shared' tables; rewrite the directory with "
                             "compress.save_compressed")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has {MANIFEST_FILE} but no {WEIGHTS_FILE}")
        saved_with = _header(weights)[0].get("save_id")
        if "save_id" in manifest and saved_with != manifest["save_id"]:  # checkpoints written before: no id
            raise ValueError(f"{weights} and {manifest_file} come from different saves (save ids {saved_with!r} and "
                             f"{manifest['save_id']!r}): a save was stopped half way, or the files were copied from "
                             "two checkpoints; save the model again")
        return _Checkpoint(weights, manifest_file, manifest)
    weights = path / _V1_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"path={str(path)!r} holds no {MANIFEST_FILE}; write it with "
                                "compress.save_compressed")
    meta, _ = _header(weights)
    if _V1_HEADER_KEY not in meta:
        raise ValueError(f"{weights} has no compression manifest; was it written by compress.save_compressed?")
    try:
        manifest = json.loads(meta[_V1_HEADER_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{weights}: its compression manifest is not valid JSON ({e}); write it again with "
                         "compress.save_compressed") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        raise ValueError(f"{weights}: its compression manifest lacks its 'layers' table; write it again with "
                         "compress.save_compressed")
    if manifest.get("version") != 1:
        raise ValueError(f"{weights} has manifest version {manifest.get('version')}; this version reads 1, "
                         f"{_VERSION} and {_PACKED_VERSION}")
    return _Checkpoint(weights, weights, manifest)


def _header(file: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Metadata and tensor shapes from the header of ``file``; a ValueError naming the file if it is not valid
    safetensors (safetensors checks that the header's offsets fit the file size, so a truncated file fails here)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it is corrupt or truncated: write it "
                         "again with compress.save_compressed") from None


def _read_tensors(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    device = usable_device(device, "device", fix="load to 'cpu' or a GPU (build a model on meta with "
                           "accelerate.init_empty_weights and load_compressed to fill it)")
    # safetensors names devices its own way: "cpu" (not "cpu:0"), "cuda:<index>"
    name = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    try:
        with safe_open(str(file), framework="pt", device=name) as f:
            return {key: aligned(f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it is corrupt or truncated: write it "
                         "again with compress.save_compressed") from None


def _packed_table(ckpt: _Checkpoint) -> dict[str, dict[str, Any]]:
    """The manifest's ``quantized`` table, each entry checked (a ValueError naming the file otherwise)."""
    table = ckpt.manifest.get("quantized", {})
    fields = {"bits", "group_size", "symmetric", "kind", "shape", "dtype", "storage_dtype"}

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def problem(entry: Any) -> str | None:
        if not isinstance(entry, dict) or not fields <= set(entry):
            return f"needs {sorted(fields)}"
        if entry["kind"] not in ("linear", "conv1d", "conv2d"):
            return f"kind={entry['kind']!r} is not linear / conv1d / conv2d"
        wrong = [f"{k}={entry[k]!r}" for k in ("bits", "group_size") if not is_int(entry[k])]
        if not (isinstance(entry["shape"], list) and all(is_int(n) for n in entry["shape"])):
            wrong.append(f"shape={entry['shape']!r}")
        if wrong:
            return f"bits, group_size and shape must be ints, got {', '.join(wrong)}"
        if not isinstance(entry["symmetric"], bool):
            return f"symmetric={entry['symmetric']!r} must be true or false"
        for d in ("dtype", "storage_dtype"):
            dtype = getattr(torch, str(entry[d]), None)
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                return f"{d}={entry[d]!r} is not a floating torch dtype"
        return None

    bad = {n: why for n, e in table.items() if (why := problem(e))} if isinstance(table, dict) else {
        "(not a table)": "quantized must map layer paths to entries"}
    if bad:
        why = "; ".join(f"{n!r}: {w}" for n, w in list(bad.items())[:5])
        raise ValueError(f"{ckpt.manifest_file}: quantized layers {list(bad)[:5]} lack a valid bits / group size / "
                         f"symmetric / kind / shape / dtype ({why}); rewrite the directory with "
                         "compress.save_compressed")
    return table


def _unpacked_shapes(ckpt: _Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The file's tensor shapes with each packed layer's three tensors replaced by its ``weight``'s shape."""
    shapes = dict(shapes)
    for name, entry in _packed_table(ckpt).items():
        missing = [k for k in _PACKED_KEYS if f"{name}.{k}" not in shapes]
        if missing:
            raise ValueError(f"{ckpt.weights} lacks {[f'{name}.{k}' for k in missing]} of the packed layer {name!r} "
                             f"its manifest lists; the manifest and the weights must come from the same "
                             "compress.save_compressed call")
        for k in _PACKED_KEYS:
            del shapes[f"{name}.{k}"]
        shapes[f"{name}.weight"] = tuple(entry["shape"])
    return shapes


def _unpacked(ckpt: _Checkpoint, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each packed layer's codes, scales and zero points dequantized into its ``weight`` (in its
    recorded dtype, then its storage dtype: the tensor the model held, or its cast to ``save_compressed``'s dtype)."""
    for name, entry in _packed_table(ckpt).items():
        packed, scale, zero_point = (tensors.pop(f"{name}.{k}") for k in _PACKED_KEYS)
        shape = tuple(entry["shape"])
        out_in = (shape[1], shape[0]) if entry["kind"] == "conv1d" else (shape[0], math.prod(shape[1:]))
        try:
            q = PackedQuantizedWeight(packed, scale, zero_point, entry["bits"], entry["group_size"],
                                      entry["symmetric"], out_in)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{ckpt.weights}: the packed tensors of layer {name!r} do not fit its manifest entry "
                             f"({e}); rewrite the directory with compress.save_compressed") from None
        try:
            check_values(q)
        except ValueError as e:
            raise ValueError(f"{ckpt.weights}: packed layer {name!r} is not a valid quantization ({e}): the file was "
                             "altered or corrupted; rewrite the directory with compress.save_compressed") from None
        W = q.dequantize(getattr(torch, entry["dtype"])).to(getattr(torch, entry["storage_dtype"]))
        tensors[f"{name}.weight"] = (W.T if entry["kind"] == "conv1d" else W).reshape(shape).contiguous()
    return tensors


#: what a layer's callers see of it: a rebuilt layer must have the values of the one it replaces
_INTERFACE = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
              "dilation", "groups")


def _build_layers(model: nn.Module, ckpt: _Checkpoint, *, like_replaced: bool) -> dict[str, nn.Module]:
    """A module of each manifest entry's structure on the meta device, by path. ``model`` is not changed.

    Nothing is allocated, so a manifest claiming huge ranks is refused by the shape check before it costs memory;
    :func:`_materialize` (or an assigning load) gives the modules storage once the checkpoint is checked.
    ``like_replaced``: in the dtype of the module each replaces.
    """
    built = {}
    for name, spec in ckpt.manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{ckpt.manifest_file} lists layer {name!r}, which the model does not have; it does "
                             "not belong to this architecture") from None
        try:
            with torch.device("meta"):
                new = build_from_spec(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ckpt.manifest_file}: layer {name!r} has an invalid structure {spec!r} ({e})") from None
        differ = [f"{a} {getattr(old, a)} (model) vs {getattr(new, a)} (file)" for a in _INTERFACE
                  if hasattr(old, a) and hasattr(new, a) and getattr(old, a) != getattr(new, a)]
        if differ:
            raise ValueError(f"{ckpt.manifest_file}: layer {name!r} was saved with {', '.join(differ)}; build the "
                             "model of the checkpoint's configuration (e.g. its number of classes)")
        if like_replaced:
            ref = next(old.parameters(), None)
            if ref is not None:
                new = new.to(ref.dtype)
        built[name] = new
    return built


def _materialize(model: nn.Module, built: Mapping[str, nn.Module]) -> None:
    """Allocate each meta-built module of :func:`_build_layers` on the device of the module it replaces in
    ``model`` (left on meta where that one is: a base built with ``accelerate.init_empty_weights``)."""
    for name, module in built.items():
        ref = next(model.get_submodule(name).parameters(), None)
        if ref is not None and not ref.is_meta:
            module.to_empty(device=ref.device)


def _state_after(model: nn.Module, built: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``model``'s state dict as it will be once the ``built`` modules replace theirs (the model is not changed)."""
    state = {k: t for k, t in model.state_dict().items() if not any(k.startswith(n + ".") for n in built)}
    for name, module in built.items():
        state.update({f"{name}.{k}": t for k, t in module.state_dict().items()})
    return state


def _check_fit(state: Mapping[str, torch.Tensor], ckpt: _Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The file holds exactly the model's tensors (aliases excepted), each of the model's shape; every alias names
    a tensor of the model that the file does not store, and a stored one of the same shape in the model (so that
    tying the two changes no tensor's shape and replaces no stored tensor)."""
    expected = {k: tuple(v.shape) for k, v in state.items()}
    shared = ckpt.manifest.get("shared", {})
    missing = sorted(k for k in expected if k not in shapes and k not in shared)
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = sorted(f"{k}: file {shapes[k]}, model {expected[k]}" for k in shapes
                   if k in expected and shapes[k] != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{ckpt.weights} does not fit the model built from {ckpt.manifest_file}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}; the manifest and the weights must come "
            "from the same compress.save_compressed call"
        )
    bad = sorted(f"{alias} -> {stored}" for alias, stored in shared.items()
                 if not (isinstance(alias, str) and isinstance(stored, str) and alias in expected and stored in shapes))
    if bad:
        raise ValueError(f"{ckpt.manifest_file}: shared tensors {bad[:5]} name a tensor the model or "
                         f"{ckpt.weights.name} does not have; rewrite the directory with compress.save_compressed")
    stored_too = sorted(f"{alias} -> {stored}" for alias, stored in shared.items() if alias in shapes)
    if stored_too:
        raise ValueError(f"{ckpt.manifest_file}: shared tensors {stored_too[:5]} are aliases of tensors that "
                         f"{ckpt.weights.name} stores under their own names too (tying would replace them); remove "
                         "them from 'shared' or rewrite the directory with compress.save_compressed")
    reshaped = sorted(f"{alias} {expected[alias]} -> {stored} {expected[stored]}" for alias, stored in shared.items()
                      if expected[alias] != expected[stored])
    if reshaped:
        raise ValueError(f"{ckpt.manifest_file}: shared tensors {reshaped[:5]} tie tensors of different shapes in the "
                         "model; an alias must name a tensor of its target's shape: rewrite the directory with "
                         "compress.save_compressed")


def _check_dtypes(state: Mapping[str, torch.Tensor], ckpt: _Checkpoint, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every stored tensor is floating where the model's is (and only there), in the manifest's dtype if it
    records one."""
    recorded = ckpt.manifest.get("dtype")
    wrong = sorted(f"{k}: {t.dtype}" for k, t in tensors.items() if k in state and (
        t.is_floating_point() != state[k].is_floating_point()
        or (recorded is not None and t.is_floating_point() and str(t.dtype) != f"torch.{recorded}")))
    if wrong:
        want = f"{recorded} (the manifest's dtype)" if recorded is not None else "the model's kind"
        raise ValueError(f"{ckpt.weights} holds tensors of another dtype than {want}: {wrong[:5]}; the manifest and "
                         "the weights must come from the same compress.save_compressed call")


def _check_finite_factors(ckpt: _Checkpoint, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, Any]) -> None:
    """Every tensor of a factorized layer is finite: a NaN core is never a valid factor (other tensors, e.g. an
    attention mask buffer of -inf, may legitimately hold inf, and packed layers are checked by ``check_values``)."""
    prefixes = tuple(f"{name}." for name in layers)
    bad = sorted(k for k, t in tensors.items() if k.startswith(prefixes) and t.is_floating_point()
                 and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"{ckpt.weights}: factorized layer tensors {bad[:5]} hold NaN or inf: the file was altered "
                         "or corrupted; rewrite the directory with compress.save_compressed")


def _aliases(state: Mapping[str, torch.Tensor], stored: Mapping[str, Any]) -> dict[str, str]:
    """``alias -> stored name`` for the state-dict names absent from ``stored`` whose tensor is shared with one
    present in it."""
    # meta tensors (layers not yet allocated) hold no storage to share: every one has data_ptr 0
    by_tensor = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): k
                 for k, t in state.items() if k in stored and not t.is_meta}
    return {k: by_tensor[key] for k, t in state.items() if k not in stored and not t.is_meta
            and (key := (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))) in by_tensor}


def _tie(model: nn.Module, shared: Mapping[str, str]) -> None:
    """Point every alias at the tensor stored under its target name (restores tied embeddings)."""
    for alias, stored in shared.items():
        module_name, _, local = alias.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        stored_module, _, stored_local = stored.rpartition(".")
        target = getattr(model.get_submodule(stored_module) if stored_module else model, stored_local)
        setattr(module, local, target)


# ---------------------------------------------------------------------------------------------- load
def _refuse_meta_left(model: nn.Module, message: str) -> None:
    """Raise ``ValueError(message.format(names))`` if a parameter or buffer of ``model`` is still on meta."""
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(message.format(left[:5]))


def load_compressed(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Re-apply the surgery recorded by :func:`save_compressed` to ``base_model`` (in place) and load the weights.

    Parameters
    ----------
    base_model : nn.Module
        The uncompressed architecture (any ``nn.Module``); its recorded modules are replaced and every tensor is
        overwritten from the file (missing or unexpected keys raise).
    path : str or path-like
        Directory written by :func:`save_compressed` (or by 0.1.0: its directory or ``model.safetensors``).

    Returns
    -------
    nn.Module
        ``base_model``, now bitwise equal to the saved compressed model. Nothing is unpickled.
        :func:`load_compressed_directory` needs no base model.
    """
    wrapper, base_model = base_model, unwrap_compiled(base_model)  # a torch.compile wrapper: load into its module
    ckpt = _read_checkpoint(path)
    shapes = _unpacked_shapes(ckpt, _header(ckpt.weights)[1])
    # everything is checked before base_model is touched: a bad checkpoint leaves it as it was
    built = _build_layers(base_model, ckpt, like_replaced=True)
    state = _state_after(base_model, built)
    if "shared" not in ckpt.manifest:  # 0.1.0 did not record the names it left out as shared: find them
        ckpt = _Checkpoint(ckpt.weights, ckpt.manifest_file, {**ckpt.manifest, "shared": _aliases(state, shapes)})
    _check_fit(state, ckpt, shapes)
    tensors = _unpacked(ckpt, _read_tensors(ckpt.weights, "cpu"))
    _check_dtypes(state, ckpt, tensors)
    _check_finite_factors(ckpt, tensors, built)
    _materialize(base_model, built)
    for name, module in built.items():
        replace_module(base_model, name, module)
    # a base built on meta (accelerate.init_empty_weights) takes the loaded tensors as they are; a real one keeps
    # its parameters and copies into them
    state = base_model.state_dict()
    on_meta = any(t.is_meta for t in state.values())
    cast = sorted({f"{t.dtype} -> {state[k].dtype}" for k, t in tensors.items()
                   if not on_meta and k in state and t.dtype != state[k].dtype})
    if cast:
        warnings.warn(f"load_compressed copies {ckpt.weights}'s tensors into base_model's dtypes ({', '.join(cast)}); "
                      "build the base in the file's dtype (or use load_compressed_directory) for a bitwise copy",
                      UserWarning, stacklevel=2)
    base_model.load_state_dict(tensors, strict=False, assign=on_meta)
    _tie(base_model, ckpt.manifest["shared"])
    _refuse_meta_left(base_model, f"base_model keeps {{}} on the meta device: {ckpt.weights} does not hold them "
                      "(build the model with accelerate.init_empty_weights(), whose buffers are real, or load it with "
                      "its weights)")
    return wrapper


@contextmanager
def _empty_weights() -> Iterator[None]:
    """Parameters created inside go to the meta device (buffers stay real: non-persistent ones such as rotary
    frequencies are computed at construction and are not in the file)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def load_compressed_directory(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed transformers model from the directory :func:`save_compressed` wrote, alone.

    The architecture named in the manifest is built from ``config.json`` with every parameter on the meta device
    (no memory); each layer the manifest lists is replaced by an empty factorized module of the recorded
    structure; then the tensors of ``compressed_model.safetensors`` are assigned in place of the meta ones
    (``load_state_dict(assign=True)``). Peak memory is the compressed weights plus the model's non-persistent
    buffers: the dense model is never materialized.

    Parameters
    ----------
    path : str or path-like
        The directory (``compressed_manifest.json``, ``compressed_model.safetensors``, ``config.json``).
    device : str or torch.device
        Where the tensors are loaded (default ``"cpu"``).

    Returns
    -------
    nn.Module
        The compressed model in eval mode, bitwise equal to the one saved (in the storage dtype the file holds).

    Raises
    ------
    ValueError
        Naming the file: a corrupt or truncated safetensors file, an unreadable or mismatching manifest (a layer
        the architecture lacks, shapes or keys that differ from the weights), a model that is not a transformers
        model (rebuild it and use :func:`load_compressed`).
    FileNotFoundError
        If ``path`` holds no manifest, weights or ``config.json``.
    """
    import transformers

    ckpt = _read_checkpoint(path)
    directory = ckpt.manifest_file.parent
    architecture = ckpt.manifest.get("architecture")
    if ckpt.manifest_file == ckpt.weights or architecture is None:
        raise ValueError(
            f"{ckpt.manifest_file} records no transformers architecture (saved from "
            f"{ckpt.manifest.get('module_class', 'a 0.1.0 checkpoint')}): build that model and use "
            f"compress.load_compressed(model, {str(directory)!r})"
        )
    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{ckpt.manifest_file} names architecture {architecture!r}, which this transformers "
                         f"{transformers.__version__} does not have; install the version the model was saved with")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; write the directory with "
                                "compress.save_compressed(model, path) from a transformers model")
    shapes = _unpacked_shapes(ckpt, _header(ckpt.weights)[1])
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'} is not a transformers config it can read ({e}); write the "
                         "directory again with compress.save_compressed") from None
    recorded = ckpt.manifest.get("config_sha256")
    if recorded is not None and recorded != _sha256(directory / "config.json"):
        warnings.warn(f"{directory / 'config.json'} is not the config.json saved with these weights (its digest "
                      f"differs from {ckpt.manifest_file.name}'s): if you did not edit it, a save was stopped half way "
                      "and the model built from it may not be the one saved; save the model again", UserWarning,
                      stacklevel=2)
    if not isinstance(config, cls.config_class):
        raise ValueError(f"{ckpt.manifest_file} names architecture {architecture!r}, whose config is a "
                         f"{cls.config_class.__name__}, but config.json holds a {type(config).__name__}; the two "
                         "files come from different models: write the directory again with compress.save_compressed")
    with _empty_weights():
        model = cls(config)
        built = _build_layers(model, ckpt, like_replaced=False)
        for name, module in built.items():
            replace_module(model, name, module)
    _check_fit(model.state_dict(), ckpt, shapes)
    tensors = _unpacked(ckpt, _read_tensors(ckpt.weights, device))
    _check_dtypes(model.state_dict(), ckpt, tensors)
    _check_finite_factors(ckpt, tensors, built)
    model.load_state_dict(tensors, strict=False, assign=True)
    _tie(model, ckpt.manifest["shared"])
    model.to(device)  # the buffers built at construction
    _refuse_meta_left(model, f"{ckpt.weights} leaves {{}} without values; rewrite the directory with "
                      "compress.save_compressed")
    return model.eval()
