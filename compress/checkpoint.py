"""Save a compressed model and reload it.

:func:`save_compressed` writes ``model.safetensors`` with a manifest of the factorized layers in its header;
:func:`load_compressed` re-applies that surgery to a fresh base model and loads the weights (nothing is unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from compress.targets import replace_module
from tensornets import FactorizedConv2d, FactorizedLinear, Factorization
from tensornets.io import build_from_spec, module_spec

_MANIFEST_KEY = "tensornets.compress"
_MANIFEST_VERSION = 1


def save_compressed(model: nn.Module, path: str | Path) -> Path:
    """Save a compressed model: ``path/model.safetensors`` with a manifest in its header.

    The manifest lists every factorized module path with its structure (:func:`tensornets.io.module_spec`); the
    tensors are the whole ``state_dict`` (shared tensors such as tied embeddings stored once). Reload with
    :func:`load_compressed` on a fresh copy of the base model.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    factorized = (FactorizedLinear, FactorizedConv2d, Factorization)
    layers = {n: module_spec(m) for n, m in model.named_modules() if isinstance(m, factorized)}
    # a Factorization inside a FactorizedLinear is rebuilt by its parent: keep only the outermost modules
    layers = {n: s for n, s in layers.items() if not any(n.startswith(p + ".") for p in layers)}
    file = path / "model.safetensors"
    save_model(model, str(file), metadata={_MANIFEST_KEY: json.dumps({"version": _MANIFEST_VERSION, "layers": layers})})
    return file


def load_compressed(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Re-apply the surgery recorded by :func:`save_compressed` to ``base_model`` (in place) and load the weights.

    Parameters
    ----------
    base_model : nn.Module
        The uncompressed architecture (e.g. a fresh ``from_pretrained``); its recorded modules are replaced and
        every tensor is overwritten from the file (``strict``: missing or unexpected keys raise).
    path : str or Path
        Directory written by :func:`save_compressed` (or the ``.safetensors`` file itself).

    Returns
    -------
    nn.Module
        ``base_model``, now bitwise equal to the saved compressed model. Nothing is unpickled.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"path={str(path)!r} holds no model.safetensors; write it with save_compressed")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if _MANIFEST_KEY not in meta:
        raise ValueError(f"{file} has no compression manifest; was it written by compress.save_compressed?")
    manifest = json.loads(meta[_MANIFEST_KEY])
    if manifest.get("version") != _MANIFEST_VERSION:
        raise ValueError(f"{file} has manifest version {manifest.get('version')}; this version reads {_MANIFEST_VERSION}")
    for name, spec in manifest["layers"].items():
        try:
            old = base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved model replaced {name!r}, which base_model does not have; pass the same "
                             "architecture the compressed model was made from") from None
        ref = next(old.parameters())
        replace_module(base_model, name, build_from_spec(spec).to(ref.device, ref.dtype))
    missing, unexpected = load_model(base_model, str(file), strict=False)
    if missing or unexpected:
        raise ValueError(f"{file} does not fit base_model: missing keys {sorted(missing)[:5]}, unexpected keys "
                         f"{sorted(unexpected)[:5]}; pass the architecture the compressed model was made from")
    return base_model
