"""Find target layers, swap them for compressed ones, report, and save / reload compressed models.

Supported layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 style, weight stored ``(in, out)``) and
``nn.Conv2d`` with ``groups=1`` (its kernel is handled as the matrix ``(C_out, C_in · kh · kw)``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from compress import lowrank as lr
from compress.budget import allocate_ranks
from compress.compressors import LayerJob
from compress.config import CompressionConfig
from tensornets import FactorizedConv2d, FactorizedLinear, Factorization, get_format
from tensornets.io import build_from_spec, module_spec

if TYPE_CHECKING:  # calibration imports this module for find_targets
    from compress.calibration import ActivationStats
    from compress.quantized import QuantizedWeight

TargetSpec = str | Sequence[str] | None

#: layer types that compression can target
DENSE_TYPES = (nn.Linear, Conv1D, nn.Conv2d)
#: layer types an EoRA residual can be computed for (compressed layers included)
ANY_TYPES = (*DENSE_TYPES, FactorizedLinear, FactorizedConv2d)

_MANIFEST_KEY = "tensornets.compress"
_MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------- target selection
def _output_layer_name(model: nn.Module) -> str | None:
    """Name of the output embedding (LM head), which ``"all-linear"`` leaves out as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _supported(module: nn.Module, types: tuple[type, ...]) -> bool:
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d in types and module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, types)


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec = None,
    *,
    types: tuple[type, ...] = DENSE_TYPES,
) -> dict[str, nn.Module]:
    """Target layers selected PEFT-style, in ``named_modules`` order.

    Parameters
    ----------
    model : nn.Module
        The model to search.
    target_modules : str or list of str
        ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output embedding (as PEFT); a list: modules
        whose name equals an entry or ends with ``"." + entry`` (``["q_proj", "mlp.up_proj"]``); any other string: a
        regular expression that must match the full name (``r".*\\.mlp\\..*"``). ``None`` means ``"all-linear"``.
    exclude_modules : str or list of str, optional
        Same syntax; matching modules are dropped.
    types : tuple of type
        Layer types that may be selected (``nn.Conv2d`` only with ``groups=1`` and zero padding).

    Returns
    -------
    dict[str, nn.Module]
        Name -> module.

    Raises
    ------
    ValueError
        If a list entry or the regex selects no supported layer (the message lists what it matched instead and a
        few available names), or nothing remains after exclusion.
    """
    if target_modules is None:
        target_modules = "all-linear"
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        head = _output_layer_name(model)
        found = {
            n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, FactorizedLinear)) and isinstance(m, types) and n != head
        }
    else:
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        found = {}
        for entry in entries:
            spec = entry if isinstance(target_modules, str) else [entry]
            hits = {n: m for n, m in model.named_modules() if n and _matches(n, spec)}
            good = {n: m for n, m in hits.items() if _supported(m, types)}
            if not good:
                available = [n for n, m in model.named_modules() if _supported(m, types)]
                what = (
                    f"it matched only unsupported modules {[f'{n} ({type(m).__name__})' for n, m in hits.items()][:4]}"
                    if hits else "it matched no module"
                )
                raise ValueError(
                    f"target_modules entry {entry!r}: {what}; supported layers are "
                    f"{', '.join(t.__name__ for t in types)} (Conv2d with groups=1), e.g. {available[:6]}"
                )
            found.update(good)
    if exclude_modules:
        found = {n: m for n, m in found.items() if not _matches(n, exclude_modules)}
    if not found:
        raise ValueError(
            f"no target layers left (target_modules={target_modules!r}, exclude_modules={exclude_modules!r}); "
            "loosen exclude_modules or name other layers"
        )
    return found


# ---------------------------------------------------------------------------------------------- layer access
def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"factorized_linear"`` or ``"factorized_conv2d"``."""
    for kind, cls in (
        ("conv1d", Conv1D), ("linear", nn.Linear), ("conv2d", nn.Conv2d),
        ("factorized_linear", FactorizedLinear), ("factorized_conv2d", FactorizedConv2d),
    ):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"{type(module).__name__} is not a supported layer ({', '.join(t.__name__ for t in ANY_TYPES)})")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``(out, in)`` matrix its inputs are multiplied by (detached).

    ``Conv1D.weight`` is stored ``(in, out)`` and is transposed; a conv kernel is reshaped to
    ``(C_out, C_in · kh · kw)``; factorized layers are rebuilt densely.
    """
    kind = layer_kind(module)
    with torch.no_grad():
        if kind == "linear":
            return module.weight.detach()
        if kind == "conv1d":
            return module.weight.detach().T
        if kind == "conv2d":
            return module.weight.detach().reshape(module.out_channels, -1)
        if kind == "factorized_linear":
            return module.factorization.to_dense().detach()
        return module.weight_dense().detach().reshape(module.out_channels, -1)


def set_dense_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write the ``(out, in)`` matrix ``W`` into a dense layer's weight (inverse of :func:`dense_weight`)."""
    kind = layer_kind(module)
    with torch.no_grad():
        target = module.weight
        if kind == "conv1d":
            W = W.T
        target.copy_(W.reshape(target.shape).to(target.dtype))


def weight_parameters(module: nn.Module) -> int:
    """Parameters of the layer's weight (bias excluded): the count ``keep`` refers to."""
    kind = layer_kind(module)
    if kind == "factorized_linear":
        return module.factorization.num_parameters
    if kind == "factorized_conv2d":
        return module.num_parameters - (0 if module.bias is None else module.out_channels)
    return module.weight.numel()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def lowrank_module(module: nn.Module, B: torch.Tensor, A: torch.Tensor) -> nn.Module:
    """Drop-in replacement of a dense layer by ``W ≈ B A`` (``B: (out, r)``, ``A: (r, in)``), bias kept.

    ``nn.Linear`` / ``Conv1D`` become a :class:`tensornets.FactorizedLinear` over a ``LowRank`` factorization
    (``U = B``, ``V = A``); ``nn.Conv2d`` becomes a low-rank :class:`tensornets.FactorizedConv2d` (a ``kh × kw`` conv
    to ``r`` channels, then a 1×1 conv).
    """
    ref = module.weight
    out_f, r = B.shape
    B = B.to(ref.device, ref.dtype)
    A = A.to(ref.device, ref.dtype)
    if isinstance(module, nn.Conv2d):
        new = FactorizedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, rank=r, format="lowrank",
            stride=module.stride, padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
        ).to(ref.device, ref.dtype)
        with torch.no_grad():
            new.factorization.V.copy_(A)
            new.factorization.U.copy_(B)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new
    fact = get_format("lowrank").empty(A.shape[1], out_f, in_modes=(A.shape[1],), out_modes=(out_f,), ranks=(r,),
                                       dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        fact.U.copy_(B)
        fact.V.copy_(A)
    return FactorizedLinear(fact, _bias(module))


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One compressed layer: sizes, ranks and errors.

    ``rel_output_error`` is ``‖(W − Ŵ) X‖_F / ‖W X‖_F`` on the calibration inputs (bias excluded; ``None`` without
    statistics); ``keep`` = ``params_after / params_before`` (weights only).
    """

    name: str
    kind: str
    shape: tuple[int, int]
    method: str
    params_before: int
    params_after: int
    ranks: str
    rel_weight_error: float
    rel_output_error: float | None

    @property
    def keep(self) -> float:
        return self.params_after / self.params_before


@dataclass
class CompressionReport:
    """Result of :func:`compress_model`: the compressed ``model``, one :class:`LayerReport` per layer and, for
    quantizing methods, each layer's integer form (``quantized``: name -> :class:`~compress.quantized.QuantizedWeight`,
    whose ``dequantize()`` is the weight the model holds), which exporters pack."""

    model: nn.Module
    layers: list[LayerReport]
    config: CompressionConfig
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def keep(self) -> float:
        """Fraction of the target weights' parameters kept."""
        return self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary: totals, config and the per-layer rows."""
        return {
            "method": self.config.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "keep": self.keep,
            "config": self.config.to_dict(),
            "layers": [{**asdict(r), "keep": r.keep} for r in self.layers],
        }

    def table(self) -> str:
        """Fixed-width table, one row per layer and a total (``keep`` = kept fraction, ``removed`` = 1 − keep)."""
        head = ("layer", "shape", "params before", "params after", "keep", "ranks", "rel W err", "rel out err")
        rows = [
            (r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.params_before), str(r.params_after), f"{r.keep:.3f}", r.ranks,
             f"{r.rel_weight_error:.4f}", "-" if r.rel_output_error is None else f"{r.rel_output_error:.4f}")
            for r in self.layers
        ]
        rows.append(("total", "", str(self.params_before), str(self.params_after), f"{self.keep:.3f}",
                     f"removed {1 - self.keep:.3f}", "", ""))
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])

    def __str__(self) -> str:
        return f"{self.config.method}: kept {self.keep:.3f} of {self.params_before} target parameters\n{self.table()}"


# ---------------------------------------------------------------------------------------------- per-layer compression
def _global_ranks(
    targets: Mapping[str, nn.Module], config: CompressionConfig, stats: ActivationStats | None, device, progress
) -> dict[str, int]:
    """Ranks from one budget ``keep · Σ out·in`` allocated by the layers' weighted spectra (:mod:`compress.budget`)."""
    spectra, shapes, floors, caps = {}, {}, {}, {}
    for name, module in tqdm(targets.items(), desc="spectra", disable=None if progress is None else not progress,
                             leave=False):
        W = dense_weight(module).to(device or module.weight.device)
        out_f, in_f = W.shape
        job = LayerJob(name, module, W, config, None if stats is None else stats.get(name))
        spectra[name] = config.compressor.spectrum(job)
        shapes[name] = (out_f, in_f)
        caps[name] = max(1, lr.rank_for_keep(out_f, in_f, 1.0))
        floors[name] = min(caps[name], max(config.min_rank, lr.rank_for_keep(out_f, in_f, config.min_keep)
                                           if config.min_keep > 0 else 1))
    budget = int(config.keep * sum(o * i for o, i in shapes.values()))
    return allocate_ranks(spectra, shapes, budget, floors=floors, caps=caps)


def compress_model(
    model: nn.Module,
    config: CompressionConfig,
    stats: ActivationStats | None = None,
    *,
    inplace: bool = False,
    progress: bool | None = None,
) -> CompressionReport:
    """Compress the target layers of ``model`` layer by layer.

    Parameters
    ----------
    model : nn.Module
        The model; left bitwise unchanged unless ``inplace=True`` (a deep copy is compressed: peak memory is twice
        the model).
    config : CompressionConfig
        Method, size (``keep`` = fraction of parameters kept, ``rank`` or ``energy``), targets and options.
    stats : ActivationStats, optional
        From :func:`compress.collect_activation_stats` on the same targets. Required by ``asvd`` /
        ``whitened_svd`` / ``whiten=True``; with it every method also reports the relative output error on the
        calibration inputs.
    inplace : bool
        Modify ``model`` itself.
    progress : bool, optional
        tqdm bar over layers (default: only on a terminal).

    Returns
    -------
    CompressionReport
        ``report.model`` is the compressed model; ``print(report)`` shows the per-layer table,
        ``report.to_dict()`` the same data.

    Notes
    -----
    Each layer's weight (and its ``(n, n)`` statistics) is moved to ``config.device`` (default: the layer's device),
    processed in float64 and written back in the layer's dtype and device, so only one layer at a time occupies the
    processing device. The method's layer function comes from the compressor registry (:mod:`compress.compressors`):
    factorizing methods replace ``nn.Linear`` / ``Conv1D`` by :class:`tensornets.FactorizedLinear` and ``nn.Conv2d``
    by :class:`tensornets.FactorizedConv2d`; dense methods (``rtn``, ``gptq``, ``2:4``, ``magnitude``,
    ``sparsegpt``) overwrite the dense weights.
    """
    if config.needs_stats and stats is None:
        raise ValueError(
            f"method={config.method!r}{' with whiten=True' if config.whiten else ''} needs activation statistics: "
            "stats = collect_activation_stats(model, calib_batches, target_modules=...)"
        )
    work = model if inplace else copy.deepcopy(model)
    targets = find_targets(work, config.target_modules, config.exclude_modules)
    if stats is not None:
        missing = [n for n in targets if n not in stats]
        if missing and config.needs_stats:
            raise ValueError(
                f"no activation statistics for target layers {missing[:5]}; collect them with the same "
                "target_modules / exclude_modules as the config"
            )
    compressor = config.compressor
    if config.rank is not None and compressor.spectrum is not None:
        for name, module in targets.items():  # low-rank methods: fail before any work is done
            lr.check_rank(config.rank, *dense_weight(module).shape, name)
    ranks = _global_ranks(targets, config, stats, config.device, progress) if config.allocation == "global" else {}
    layers, quantized = [], {}
    for name, module in tqdm(targets.items(), desc=f"compress ({config.method})",
                             disable=None if progress is None else not progress):
        device = config.device or module.weight.device
        layer_stats = stats.get(name) if stats is not None else None
        W = dense_weight(module).clone()  # dense methods overwrite the weight in place
        job = LayerJob(name, module, W.to(device), config,
                       None if layer_stats is None else layer_stats.to(device), ranks.get(name))
        result = compressor.compress_layer(job)
        if result.weight is not None:
            set_dense_weight(module, result.weight)
            new = module
        else:
            new = result.module
            replace_module(work, name, new)
        if result.quantized is not None:
            quantized[name] = result.quantized
        W_hat = dense_weight(new)
        layers.append(LayerReport(
            name=name, kind=layer_kind(module), shape=tuple(W.shape), method=config.method,
            params_before=W.numel(), params_after=compressor.parameters(new, config), ranks=result.description,
            rel_weight_error=lr.relative_weight_error(W, W_hat.to(W.device)),
            rel_output_error=None if layer_stats is None else lr.relative_output_error(W, W_hat.to(W.device), layer_stats),
        ))
    return CompressionReport(work, layers, config, quantized)


# ---------------------------------------------------------------------------------------------- save / load
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
