"""Save and load factorized modules: one safetensors file with a JSON manifest in its header.

The manifest records the module kind and its structure (:meth:`spec`); the tensors are the
module's ``state_dict``. Loading rebuilds the structure from the manifest and loads the tensors
with ``strict=True``: nothing is unpickled, and the round trip is bitwise exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .devices import usable_device
from .formats import Factorization, get_format
from .layers import FactorizedConv2d, FactorizedLinear

__all__ = ["save", "load", "build_from_spec", "module_spec"]

_MANIFEST_KEY = "tensornets"
_VERSION = 1


def module_spec(module: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., "spec": ...}`` describing a Factorization / FactorizedLinear / FactorizedConv2d."""
    for kind, cls in (("factorization", Factorization), ("linear", FactorizedLinear), ("conv2d", FactorizedConv2d)):
        if isinstance(module, cls):
            return {"kind": kind, "spec": module.spec()}
    raise TypeError(f"cannot save a {type(module).__name__}: pass a Factorization, FactorizedLinear or FactorizedConv2d")


def build_from_spec(manifest: dict[str, Any]) -> nn.Module:
    """An un-initialized module with the structure ``manifest`` (from :func:`module_spec`) describes."""
    kind, spec = manifest["kind"], dict(manifest["spec"])
    if kind == "factorization":
        fmt = get_format(spec.pop("format"))
        return fmt.empty(spec["in_features"], spec["out_features"], in_modes=spec["in_modes"], out_modes=spec["out_modes"], ranks=spec["ranks"])
    if kind == "linear":
        fact = build_from_spec({"kind": "factorization", "spec": spec["factorization"]})
        bias = torch.zeros(fact.out_features) if spec["bias"] else None
        return FactorizedLinear(fact, bias)
    if kind == "conv2d":
        return FactorizedConv2d(
            spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), rank=spec["rank"], format=spec["format"],
            stride=tuple(spec["stride"]), padding=spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]), bias=spec["bias"], padding_mode=spec.get("padding_mode", "zeros"),
        )
    raise ValueError(f"unknown module kind {kind!r} in the manifest")


def save(module: nn.Module, path: str | Path) -> None:
    """Write ``module`` (a factorized module) to ``path`` (``.safetensors``).

    Raises
    ------
    TypeError
        ``path`` is not a str or path.
    ValueError
        ``path`` is a directory or its parent directory does not exist; tensors on the meta device.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}: pass the .safetensors file to write, as a str or pathlib.Path")
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"path={str(target)!r} is a directory; pass a file path such as {str(target / 'layer.safetensors')!r}")
    if not target.parent.is_dir():
        raise ValueError(f"path={str(target)!r}: its directory {str(target.parent)!r} does not exist; create it first")
    module = getattr(module, "_orig_mod", module)  # a torch.compile wrapper saves the module it holds
    manifest = {"version": _VERSION, **module_spec(module)}
    state = module.state_dict()
    on_meta = [name for name, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"module has tensors on the meta device ({on_meta[:3]}), which hold no values; load or "
                         "initialize them before saving")
    tensors = {name: t.detach().contiguous() for name, t in state.items()}
    save_file(tensors, str(target), metadata={_MANIFEST_KEY: json.dumps(manifest)})


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or on CPU a copy in memory of its own, aligned as torch's allocator aligns it.

    A tensor safetensors reads can start anywhere in the file's buffer, and BLAS / einsum take other kernels on
    memory that is not 64-byte aligned: a Tucker or TT layer read that way gave outputs that differ in the last bit
    from the layer saved. Read tensors one at a time through this, so a load holds one extra tensor at most.
    """
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def load(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Read a module written by :func:`save`; parameters keep their saved dtype.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        Naming ``path``: not a readable safetensors file (corrupt, truncated), no or an unreadable manifest, or
        tensors that do not fit the structure the manifest describes. Naming ``device``: not a device, ``meta``, or
        not present on this machine.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} " + ("is a directory; pass the .safetensors file tensornets.save "
                                                         "wrote" if path.is_dir() else "does not exist"))
    device = usable_device(device, "device", fix="load on 'cpu' (or an accelerator: 'cuda', 'cuda:1')")
    redo = "; write it again with tensornets.save"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if _MANIFEST_KEY not in metadata:
                raise ValueError(f"{path} has no tensornets manifest; was it written by tensornets.save?")
            raw = metadata[_MANIFEST_KEY]
            tensors = {k: aligned(f.get_tensor(k)) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated{redo}") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise ValueError(f"{path}: its tensornets manifest is not valid JSON ({e}){redo}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: its tensornets manifest is not a JSON object{redo}")
    if manifest.get("version") != _VERSION:
        raise ValueError(f"{path} has manifest version {manifest.get('version')}; this tensornets reads version {_VERSION}")
    try:
        # on the meta device: the tensors are assigned below, and a manifest claiming huge ranks (a hostile or
        # damaged file) is refused by the shape check before anything of its size is allocated
        with torch.device("meta"):
            module = build_from_spec(manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its manifest describes no module this tensornets can build ({e!r}){redo}") from None
    not_float = sorted(name for name, t in tensors.items() if not t.is_floating_point())
    if not_float:
        raise ValueError(f"{path}: tensors {not_float[:3]} are not floating point ({tensors[not_float[0]].dtype}); "
                         f"a factorized module stores float cores{redo}")
    # assign: each parameter and buffer takes the saved tensor itself (read on ``device``), dtype included (a
    # float64 bias next to float32 cores comes back float64, not cast to the module's dtype)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())  # load_state_dict's message, on one line
        raise ValueError(f"{path}: its tensors do not fit the module its manifest describes ({why}){redo}") from None
    # one dtype for the cores (a forward contracts them together); a bias may differ, as save writes it
    core_dtypes = sorted({str(t.dtype) for name, t in tensors.items() if name.rsplit(".", 1)[-1] != "bias"})
    if len(core_dtypes) > 1:
        raise ValueError(f"{path}: its cores mix dtypes {core_dtypes}, which no forward can contract{redo}")
    return module
