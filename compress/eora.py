"""EoRA: a low-rank residual that compensates the error of a compressor, exported as a PEFT LoRA adapter.

For a layer with original weight ``W`` and compressed weight ``W_c`` (quantized, pruned, factorized, ...), EoRA
(Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation")
finds

.. math::

    \\min_{\\operatorname{rank}(BA) \\le r} \\| (\\Delta W - BA) X \\|_F, \\qquad \\Delta W = W - W_c,

exactly: with ``C = Σ x xᵀ = Q Λ Qᵀ`` (float64 ``eigh``) and the SVD ``ΔW Q Λ^{1/2} = U Σ Vᵀ``,

.. math::

    B = U_r Σ_r^{1/2} \\in \\mathbb{R}^{out \\times r}, \\qquad
    A = Σ_r^{1/2} V_r^\\top Λ^{-1/2} Q^\\top \\in \\mathbb{R}^{r \\times in},

where ``Λ^{-1/2}`` is a truncated pseudo-inverse (eigenvalues below ``max(λ_max · eps_fp32, 2 |λ_min|)`` dropped,
see :func:`compress.lowrank.eigenvalue_cutoff`; optional ridge ``C + ridge · mean(diag C) I``), so input channels that are never active
give finite (zero) columns of ``A``. The compensated layer computes ``W_c x + B (A x)``.

Baselines for comparison (``method=``): ``"svd"`` — plain truncated SVD of ``ΔW`` (LoRC), ``"asvd"`` — SVD of
``ΔW diag(mean|x|)^α``. The residual is exported as a standard PEFT LoRA adapter (``lora_A.weight = A``,
``lora_B.weight = B``, ``lora_alpha = r`` so the scaling is 1) that ``PeftModel.from_pretrained`` loads without
this package.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from compress import lowrank as lr
from compress.calibration import ActivationStats, CrossStats, LayerStats, accumulate_cross_stats, accumulate_stats
from compress.eora_peft import as_peft_init as _as_peft_init
from compress.export import EXPORT_DTYPES
from compress.safetensors_stream import write_safetensors
from compress.sequential_eora import (
    calibration_folds,
    drifted_output_error,
    merge_cross_stats,
    select_sequential_factors,
)
from compress.targets import (
    ANY_TYPES,
    TargetSpec,
    dense_weight,
    find_targets,
    layer_kind,
    replace_module,
    unwrap_compiled,
)
from tensornets import FactorizedConv2d, FactorizedLinear, get_format
from tensornets.devices import usable_device
from tensornets.shapes import check_tensor

#: attribute of a layer that :meth:`EoraAdapter.merge` folded residuals into: the set of those adapters' tokens
#: (merging one adapter twice would add its residual twice; another adapter, e.g. a second EoRA round, may merge)
_MERGED_MARK = "_eora_merged_adapters"

#: EoRA and its baselines -> the weighting of :mod:`compress.lowrank`
EORA_METHODS = {"eora": "whitened", "svd": "svd", "asvd": "asvd"}


@dataclass
class EoraLayerReport:
    """Relative output error on the calibration inputs before / after compensation, ``‖(W − Ŵ) X‖_F / ‖W X‖_F``."""

    name: str
    shape: tuple[int, int]
    rank: int
    error_before: float
    error_after: float
    #: sequential EoRA only: the candidate cross-validation chose (``"independent"`` or ``"ridge=<λ>"``)
    choice: str | None = None


def _storage_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating ``dtype`` to store factors in (a name such as ``"bfloat16"`` is accepted); ``None`` keeps theirs."""
    if isinstance(dtype, str):
        dtype = {**EXPORT_DTYPES, "float64": torch.float64}.get(dtype, dtype)
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
        return dtype
    raise TypeError(f"dtype={dtype!r} cannot store the factors: pass torch.bfloat16, torch.float16, torch.float32 "
                    "(or their names), or None to keep the computed dtype")


class CompensatedLayer(nn.Module):
    """``base_layer(x) + lora_B(lora_A(x))``: a layer plus its in-memory EoRA residual.

    ``lora_A`` / ``lora_B`` are ``nn.Linear(in, r)`` / ``nn.Linear(r, out)`` without bias, or for a convolution a
    ``kh × kw`` conv to ``r`` channels and a 1×1 conv — the modules PEFT's LoRA uses. Their weights are the factors
    themselves (views of ``A`` and ``B`` on the base layer's device, in the factors' dtype: applying an adapter
    holds no second copy of it), frozen (``requires_grad=False``; train from :meth:`EoraAdapter.as_peft_init`).
    The residual is computed in float32, or in the factors' dtype when wider, as PEFT computes a bfloat16 / float16
    adapter (``autocast_adapter_dtype``), so outputs match the exported adapter.
    """

    def __init__(self, base_layer: nn.Module, B: torch.Tensor, A: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        r = A.shape[0]
        ref = next(base_layer.parameters())
        if isinstance(base_layer, (nn.Conv2d, FactorizedConv2d)):
            self.lora_A = nn.Conv2d(base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride,
                                    base_layer.padding, base_layer.dilation, bias=False, device="meta")
            self.lora_B = nn.Conv2d(r, base_layer.out_channels, 1, bias=False, device="meta")
        else:
            self.lora_A = nn.Linear(A.shape[1], r, bias=False, device="meta")
            self.lora_B = nn.Linear(r, B.shape[0], bias=False, device="meta")
        device = _execution_device(base_layer, ref.device)
        # frozen: they are views of the adapter's factors, which a training step would change under every other
        # model the adapter was applied to (fine-tune with EoraAdapter.as_peft_init instead)
        self.lora_A.weight = nn.Parameter(A.detach().to(device).reshape(self.lora_A.weight.shape), requires_grad=False)
        self.lora_B.weight = nn.Parameter(B.detach().to(device).reshape(self.lora_B.weight.shape), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (without the residual), as PEFT's LoRA layers answer: models read a linear's
        ``.weight`` for its dtype or device (T5's feed-forward casts to ``wo.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dtype = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        A, B = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        if isinstance(self.lora_A, nn.Conv2d):
            h = F.conv2d(x.to(dtype), A, None, self.lora_A.stride, self.lora_A.padding, self.lora_A.dilation)
            residual = F.conv2d(h, B)
        else:
            residual = F.linear(F.linear(x.to(dtype), A), B)
        # added in the residual's precision and rounded once, as PEFT's LoRA does (y + residual promotes)
        return (y + residual).to(y.dtype)


def _execution_device(layer: nn.Module, device: torch.device) -> torch.device:
    """Where ``layer`` runs: ``device`` (its parameters'), or for a layer offloaded by accelerate (parameters on
    ``meta``, loaded by its hook at each call) the hook's execution device."""
    hook = getattr(layer, "_hf_hook", None)
    if device.type == "meta" and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return device


@dataclass
class EoraAdapter:
    """Residual factors per layer (``B: (out, r)``, ``A: (r, in)``, CPU; float32 as computed, the model's storage
    dtype once :func:`compress.compress_blocks` rounds them) and their report.

    Use :meth:`apply` (wrap layers in memory), :meth:`merge` (fold ``BA`` into dense or low-rank layers) or
    :meth:`save_pretrained` (a PEFT LoRA adapter directory).
    """

    #: a dict, or for a block-by-block result with offloaded blocks an :class:`compress.factor_store.OffloadedFactors`
    #: (each pair read from disk when looked up)
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    kinds: dict[str, str]
    rank: int
    method: str
    layers: list[EoraLayerReport]
    conv_kernels: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: identifies this adapter on the layers :meth:`merge` folded it into
    _token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False, repr=False, compare=False)

    def _check_model(self, model: nn.Module, peft_layers: bool = True) -> dict[str, nn.Module]:
        """The compensated layers of ``model``, checked; ``peft_layers=False`` also refuses layers a PEFT adapter
        wraps (:meth:`apply` and :meth:`merge`: ``PeftModel.from_pretrained(model, adapter)`` injects the saved
        residual into ``model`` itself, and adding it again would count it twice)."""
        if isinstance(model, PeftModel):
            raise TypeError("pass the compressed model itself, not a PeftModel (its layers sit under "
                            "base_model.model): peft_model.get_base_model(), or merge_and_unload() first; to train "
                            "the residual with PEFT, use as_peft_init")
        modules = {}
        for name, (B, A) in self.factors.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no layer {name!r}; pass the compressed model the adapter was computed for") from None
            if isinstance(module, CompensatedLayer):
                raise ValueError(f"layer {name!r} already carries an EoRA side branch (apply() was called on this "
                                 "model); pass the model as it was before apply()")
            if self._token in getattr(module, _MERGED_MARK, ()):
                raise ValueError(f"layer {name!r} already holds this adapter's residual (merge() was called on this "
                                 "model); merging again would add it twice: pass the model as it was before merge()")
            if isinstance(module, BaseTunerLayer) and not peft_layers:
                raise ValueError(f"layer {name!r} is wrapped by a PEFT adapter ({type(module).__name__}): "
                                 "PeftModel.from_pretrained(model, ...) injects the saved residual into model itself, "
                                 "so this would add it twice; use that PeftModel, or pass a model without the adapter")
            # a layer an earlier PEFT adapter wrapped is checked on its base layer (as_peft_init on a PeftModel)
            W = dense_weight(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)
            if tuple(W.shape) != (B.shape[0], A.shape[1]):
                raise ValueError(f"layer {name!r} has weight shape {tuple(W.shape)}, the residual is "
                                 f"({B.shape[0]}, {A.shape[1]}); pass the model the adapter was computed for")
            modules[name] = module
        return modules

    def apply(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """``model`` with every compensated layer wrapped in a :class:`CompensatedLayer` (a copy unless ``inplace``)."""
        work = model if inplace else copy.deepcopy(model)
        for name, module in self._check_model(work, peft_layers=False).items():
            B, A = self.factors[name]
            replace_module(work, name, CompensatedLayer(module, B, A))
        return work

    def merge(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """Fold the residual into the layers: dense ``W_c + BA``, or a low-rank ``[U B] [V; A]`` (rank ``r_c + r``;
        low-rank linears and convs; where ``r_c + r`` exceeds ``min(out, in)``, the exact rank-``min(out, in)`` SVD
        of that product instead).

        Merged dense weights leave the quantization grid / sparsity pattern of the compressor. Tensor-format layers
        other than low rank cannot absorb ``BA`` exactly: use :meth:`apply` for them. The merged layers remember this
        adapter: merging it into them again (which would add ``BA`` twice) raises ``ValueError``.
        """
        work = model if inplace else copy.deepcopy(model)
        for name, module in self._check_model(work, peft_layers=False).items():
            B, A = self.factors[name]
            kind = layer_kind(module)
            if kind in ("factorized_linear", "factorized_conv2d") and module.factorization.format_name == "lowrank":
                fact = module.factorization
                U = torch.cat([fact.U.detach(), B.to(fact.U)], 1)
                V = torch.cat([fact.V.detach(), A.to(fact.V)], 0)
                full = min(fact.out_features, fact.in_features)
                if U.shape[1] > full:
                    # UV has rank at most min(out, in): an SVD at that rank is exact (to float rounding), and the
                    # concatenation would store more parameters than the dense weight
                    u, sv, vh = torch.linalg.svd(U.double() @ V.double(), full_matrices=False)
                    U, V = (u[:, :full] * sv[:full]).to(U), vh[:full].to(V)
                new = get_format("lowrank").empty(fact.in_features, fact.out_features, in_modes=fact.in_modes,
                                                  out_modes=fact.out_modes, ranks=(U.shape[1],),
                                                  dtype=U.dtype, device=U.device)
                with torch.no_grad():
                    new.U.copy_(U)
                    new.V.copy_(V)
                if kind == "factorized_linear":
                    merged = FactorizedLinear(new, module.bias)
                else:  # A is (r, C_in kh kw), the layout of the conv's V
                    merged = FactorizedConv2d.from_factorization(new, module.kernel_size, stride=module.stride,
                                                                 padding=module.padding, dilation=module.dilation,
                                                                 bias=module.bias)
                replace_module(work, name, merged)
                setattr(merged, _MERGED_MARK, getattr(module, _MERGED_MARK, frozenset()) | {self._token})
            elif kind in ("linear", "conv1d", "conv2d"):
                W = dense_weight(module)
                with torch.no_grad():
                    delta = (B.double() @ A.double()).to(W)
                    if kind == "conv1d":
                        module.weight.add_(delta.T)
                    else:
                        module.weight.add_(delta.reshape(module.weight.shape))
                setattr(module, _MERGED_MARK, getattr(module, _MERGED_MARK, frozenset()) | {self._token})
            else:
                raise ValueError(f"layer {name!r} ({kind}, {getattr(getattr(module, 'factorization', None), 'format_name', '')}) "
                                 "cannot absorb a low-rank residual exactly; use apply() to add it as a side branch")
        return work

    def lora_config(self, base_model_name_or_path: str | None = None, task_type: str | None = None) -> LoraConfig:
        """The ``peft.LoraConfig`` of the exported adapter (``r = lora_alpha = rank``, no dropout, no bias)."""
        return LoraConfig(
            r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, bias="none", target_modules=sorted(self.factors),
            fan_in_fan_out=any(k == "conv1d" for k in self.kinds.values()), init_lora_weights=True,
            base_model_name_or_path=base_model_name_or_path, task_type=task_type,
        )

    def save_pretrained(self, path: str | Path, base_model_name_or_path: str | None = None,
                        dtype: torch.dtype | None = None, task_type: str | None = None) -> Path:
        """Write a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

        ``dtype``: storage dtype of the factors (default: as computed); pass the base model's storage dtype
        (e.g. ``torch.bfloat16`` beside a :func:`compress.export.save_hf_directory` checkpoint).
        ``base_model_name_or_path``: the model the residual compensates, i.e. the *compressed* checkpoint's directory
        (not the dense original); with it and ``task_type`` (e.g. ``"CAUSAL_LM"``), PEFT's
        ``AutoPeftModelForCausalLM.from_pretrained(path)`` loads base and adapter in one call.

        Tensors are ``base_model.model.<layer>.lora_A.weight = A`` ``(r, in)`` (``(r, C_in, kh, kw)`` for a conv) and
        ``...lora_B.weight = B`` ``(out, r)`` (``(out, r, 1, 1)``); load with
        ``PeftModel.from_pretrained(compressed_model, path)`` — no import of this package needed.

        PEFT's LoRA wraps ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` only: residuals of factorized layers cannot be
        exported (use :meth:`merge` for low-rank layers or :meth:`apply`).
        """
        self._check_lora_kinds()
        dtype = _storage_dtype(dtype)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # both files are written aside, then renamed into place: a failed write leaves an earlier adapter whole
        # (not a new rank's config beside the old weights)
        aside = Path(tempfile.mkdtemp(prefix=".eora-", dir=path))
        try:
            self.lora_config(base_model_name_or_path, task_type).save_pretrained(str(aside))
            # PEFT turns target_modules into a set, written in the hash seed's order: sorted, the file is the same
            # on every run
            config_file = aside / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["target_modules"] = sorted(config["target_modules"])
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
            # one layer's tensors at a time: factors kept on disk (OffloadedFactors) are never all in memory. The
            # header pass reads them once more: disk reads, no memory
            specs = {key: (t.dtype, tuple(t.shape)) for key, t in self._lora_tensors(dtype)}
            write_safetensors(aside / "adapter_model.safetensors", specs, self._lora_tensors(dtype),
                              metadata={"format": "pt"})
            for file in sorted(aside.iterdir(), key=lambda f: f.suffix != ".safetensors"):  # weights first
                os.replace(file, path / file.name)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        return path

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The PEFT LoRA tensors :meth:`save_pretrained` writes (keys ``base_model.model.<layer>.lora_A.weight``).

        Raises ``ValueError`` for layers PEFT's LoRA cannot wrap (factorized, dilated conv).
        """
        self._check_lora_kinds()
        return dict(self._lora_tensors(_storage_dtype(dtype)))

    def _check_lora_kinds(self) -> None:
        bad = {n: k for n, k in self.kinds.items() if k not in ("linear", "conv1d", "conv2d")}
        if bad:
            raise ValueError(f"layers {sorted(bad)[:4]} are {sorted(set(bad.values()))}: PEFT LoRA wraps dense "
                             "nn.Linear / Conv1D / Conv2d (undilated) only; use adapter.merge(model) or adapter.apply(model)")

    def _lora_tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """The PEFT LoRA tensors, one layer's pair at a time (each read from disk for offloaded factors)."""
        for name in self.factors:
            B, A = self.factors[name]
            if self.kinds[name] == "conv2d":
                kh_kw = self.conv_kernels[name]
                A = A.reshape(A.shape[0], -1, *kh_kw)
                B = B[:, :, None, None]
            if dtype is not None:
                A, B = A.to(dtype), B.to(dtype)
            yield f"base_model.model.{name}.lora_A.weight", A.contiguous()
            yield f"base_model.model.{name}.lora_B.weight", B.contiguous()

    def as_peft_init(self, model: nn.Module, adapter_name: str = "default") -> PeftModel:
        """A trainable PEFT LoRA on ``model`` starting at this residual: step 0 is the compensated model.

        See :func:`compress.eora_peft.as_peft_init` (``model`` is modified in place, as ``get_peft_model`` does).
        """
        return _as_peft_init(self, model, adapter_name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable report."""
        return {"method": self.method, "rank": self.rank, "layers": [asdict(r) for r in self.layers]}

    def table(self) -> str:
        """One row per layer: relative calibration output error before and after compensation."""
        head = ("layer", "shape", "rank", "rel out err before", "after")
        rows = [(r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.rank), f"{r.error_before:.4f}", f"{r.error_after:.4f}")
                for r in self.layers]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
                         for row in [head, tuple("-" * w for w in widths), *rows])

    def __str__(self) -> str:
        return f"EoRA ({self.method}, r={self.rank})\n{self.table()}"


def eora_factors(
    delta: torch.Tensor,
    stats: LayerStats | None,
    rank: int,
    *,
    method: str = "eora",
    alpha: float = 0.5,
    ridge: float = 0.0,
    eps: float | None = None,
    device: torch.device | str | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual factors ``B (out, r)``, ``A (r, in)`` (float64) for one layer's error ``ΔW = W − W_c``.

    Parameters
    ----------
    delta : torch.Tensor
        ``(out, in)`` compression error.
    stats : LayerStats or None
        Calibration statistics of the layer's input (not needed for ``method="svd"``).
    rank : int
        ``1 <= rank <= min(out, in)``.
    method : {"eora", "svd", "asvd"}
        EoRA (whitened, the exact optimum of ``‖(ΔW − BA) X‖_F``) or a baseline.
    alpha, ridge, eps : float
        ASVD exponent, whitening ridge, relative pseudo-inverse cutoff.
    device : torch.device or str, optional
        Where the float64 eigendecomposition and SVD run (default: ``delta``'s device).
    name : str
        The layer's name, for error messages.
    """
    device = None if device is None else usable_device(device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
    check_tensor(delta, "delta", ndim=2)
    _check_options(method, alpha, ridge, eps)
    lr.check_rank(rank, delta.shape[0], delta.shape[1], name, lr.EORA_RANK_FIX)
    return lr.lowrank_factors(delta, rank, EORA_METHODS[method], stats, alpha=alpha, ridge=ridge, eps=eps, device=device)


def eora_compensate_pairs(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | Sequence[tuple[torch.Tensor, torch.Tensor]],
    stats: Mapping[str, LayerStats] | Sequence[LayerStats] | None = None,
    *,
    rank: int = 32,
    method: str = "eora",
    alpha: float = 0.5,
    ridge: float = 0.0,
    eps: float | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> EoraAdapter:
    """Low-rank residuals ``BA ≈ W − W_c`` for weight pairs, without models (EoRA or a baseline).

    Parameters
    ----------
    pairs : mapping or sequence of ``(W, W_c)``
        ``(out, in)`` original and compressed weights, keyed by name (a sequence is keyed ``"0"``, ``"1"``, ...).
    stats : mapping or sequence of LayerStats, optional
        One per pair, in the same keys or order (not needed for ``method="svd"``).
    rank, method, alpha, ridge, eps, device, progress
        As in :func:`eora_compensate`.

    Returns
    -------
    EoraAdapter
        With every layer of kind ``"linear"``.
    """
    device = None if device is None else usable_device(device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
    _check_method_and_rank(method, rank)
    _check_options(method, alpha, ridge, eps)
    pairs = dict(pairs) if isinstance(pairs, Mapping) else {str(i): p for i, p in enumerate(pairs)}
    if not pairs:
        raise ValueError("pairs is empty: pass {name: (W, W_c)} for the layers to compensate")
    if stats is None:
        layer_stats = {n: None for n in pairs}
    elif isinstance(stats, Mapping):
        missing = [n for n in pairs if n not in stats]
        if missing:
            raise ValueError(f"stats has no entry for pairs {missing[:3]}; key stats like pairs (one LayerStats each)")
        layer_stats = {n: stats[n] for n in pairs}
    else:
        stats = list(stats)
        if len(stats) != len(pairs):
            raise ValueError(f"got {len(pairs)} (W, W_c) pairs but {len(stats)} statistics; pass one LayerStats per pair")
        layer_stats = dict(zip(pairs, stats))
    for n, (W, Wc) in pairs.items():
        if W.shape != Wc.shape or W.dim() != 2:
            raise ValueError(f"pair {n!r}: W {tuple(W.shape)} and W_c {tuple(Wc.shape)} must be equal (out, in) matrices")
        st = layer_stats[n]
        if st is not None and st.in_features != W.shape[1]:
            raise ValueError(f"pair {n!r}: its statistics are of {st.in_features} inputs but W has {W.shape[1]}; "
                             "pass the LayerStats of this layer")
    if method != "svd" and any(st is None for st in layer_stats.values()):
        raise ValueError(f"method={method!r} needs one LayerStats per pair (stats=...)")
    factors, reports = {}, []
    for name, (W, Wc) in _bar(pairs.items(), len(pairs), f"eora ({method})", progress):
        B, A, rep = _layer(name, W, Wc, layer_stats[name], rank, method, alpha, ridge, eps, device)
        factors[name] = (B, A)
        reports.append(rep)
    return EoraAdapter(factors, {n: "linear" for n in pairs}, rank, method, reports)


def _check_method_and_rank(method: str, rank: int) -> None:
    if method not in EORA_METHODS:
        raise ValueError(f"method={method!r} must be one of {tuple(EORA_METHODS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")


def _check_options(method: str, alpha: float, ridge: float, eps: float | None) -> None:
    """``method`` known, ``alpha`` / ``ridge`` finite and ``>= 0``, ``eps`` in ``[0, 1)``, and each set away from its
    default only where ``method`` reads it (ASVD reads ``alpha``, EoRA's whitening ``ridge``): a NaN or an option
    another method reads was ignored without a word."""
    if method not in EORA_METHODS:
        raise ValueError(f"method={method!r} must be one of {tuple(EORA_METHODS)}")
    for name, value in (("alpha", alpha), ("ridge", ridge)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < 1):
        raise ValueError(f"eps={eps!r} must be in [0, 1): an eigenvalue cutoff relative to the largest")
    scaling = EORA_METHODS[method]
    if alpha != 0.5 and scaling != "asvd":
        raise ValueError(f"method={method!r} does not read alpha={alpha} (method='asvd' does); drop it")
    if ridge != 0.0 and scaling != "whitened":
        raise ValueError(f"method={method!r} does not read ridge={ridge} (method='eora' does); drop it")


def _bar(it, total: int, desc: str, progress: bool | None):
    return tqdm(it, total=total, desc=desc, disable=None if progress is None else not progress)


def eora_compensate(
    original: nn.Module,
    compressed: nn.Module | None = None,
    stats: ActivationStats | Mapping[str, LayerStats] | None = None,
    *,
    rank: int = 32,
    method: str = "eora",
    alpha: float = 0.5,
    ridge: float = 0.0,
    eps: float | None = None,
    target_modules: TargetSpec = None,
    exclude_modules: TargetSpec = None,
    sequential: bool = False,
    calib_batches: Iterable[Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> EoraAdapter:
    """Low-rank residuals ``BA ≈ W − W_c`` for every compressed layer of a model (EoRA or a baseline).

    Parameters
    ----------
    original : nn.Module
        The uncompressed model. (Weight pairs without models: :func:`eora_compensate_pairs`.)
    compressed : nn.Module
        The compressed model (same module paths; dense, fake-quantized, pruned or factorized layers).
    stats : ActivationStats, optional
        Input statistics of the target layers, collected on ``original``. Not needed with ``sequential=True``
        (collected on the fly) or ``method="svd"`` (then no output errors are reported).
    rank : int
        Residual rank ``r`` of every layer (the adapter's ``r`` and ``lora_alpha``).
    method : {"eora", "svd", "asvd"}
        EoRA, or plain SVD / ASVD of ``ΔW`` for comparison.
    alpha, ridge, eps : float
        ASVD exponent; ridge ``C + ridge · mean(diag C) I``; relative eigenvalue cutoff of the pseudo-inverse.
    target_modules, exclude_modules : str or list of str, optional
        Layers to compensate (default: the layers in ``stats``, or ``"all-linear"`` without stats, whose weight the
        compressor changed).
    sequential : bool
        Sequential EoRA (``method="eora"`` only; :mod:`compress.sequential_eora`): layers are handled in execution
        order, the compressed model carrying the final residuals of all earlier layers, and every layer's residual
        minimizes the ridge-penalized ``‖W X − (W_c + BA) X̃‖_F² + λ' ‖BA − ΔW‖_F²`` (``X`` dense inputs, ``X̃``
        compensated-model inputs), so it also corrects the drift its inputs accumulated. ``λ``, or independent EoRA,
        is chosen per layer by 2-fold cross-validation over the calibration batches (even / odd), which guards
        against the drift fit's overfitting. The reported errors are then ``‖W X − Ŵ X̃‖ / ‖W X‖`` on all
        calibration data, and each row says which candidate was chosen. Costs one forward per layer and fold; for
        decoder models :func:`compress.compress_blocks` does the same block by block. Measured against independent
        EoRA: ``benchmarks/results/sequential_eora.md``.
    calib_batches : Iterable, optional
        Calibration batches for ``sequential=True`` (a list of at least 2 batches, run once per layer, up to that
        layer).
    device : torch.device or str, optional
        Where each layer is processed (default: the layer's device).
    progress : bool, optional
        tqdm bar over layers (default: only on a terminal).

    Returns
    -------
    EoraAdapter
        ``.factors[name] = (B, A)``; ``.apply(compressed)`` for in-memory outputs, ``.save_pretrained(dir)`` for PEFT.
        Neither model is modified.

    Examples
    --------
    >>> stats = collect_activation_stats(model, batches, target_modules=["q_proj", "v_proj"])
    >>> quant = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=64,
    ...                                                 target_modules=["q_proj", "v_proj"])).model
    >>> eora = eora_compensate(model, quant, stats, rank=32)
    >>> eora.save_pretrained("eora-adapter")  # PeftModel.from_pretrained(quant, "eora-adapter")
    """
    device = None if device is None else usable_device(device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
    if not isinstance(original, nn.Module):
        warnings.warn("eora_compensate(pairs, ...) is deprecated and will be removed in the next release; call "
                      "eora_compensate_pairs(pairs, stats, ...)", DeprecationWarning, stacklevel=2)
        if compressed is not None:
            raise ValueError("pass either two models (original, compressed) or (W, W_c) pairs with compressed=None")
        return eora_compensate_pairs(original, stats, rank=rank, method=method, alpha=alpha, ridge=ridge, eps=eps,
                                     device=device, progress=progress)
    _check_method_and_rank(method, rank)
    _check_options(method, alpha, ridge, eps)
    if compressed is None:
        raise ValueError("pass the compressed model: eora_compensate(original, compressed, stats, rank=...)")
    original, compressed = unwrap_compiled(original), unwrap_compiled(compressed)
    chosen = target_modules is not None
    if not chosen and stats is not None:
        target_modules = list(stats)
    targets = find_targets(compressed, target_modules, exclude_modules, types=ANY_TYPES)
    originals = {}
    for name in targets:
        try:
            originals[name] = original.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the original model has no layer {name!r}; pass the model {name!r} was compressed from") from None
    if not chosen:  # by default only layers the compressor changed
        targets = {n: m for n, m in targets.items() if not _same_weight(originals[n], m)}
        if not targets:
            raise ValueError("the compressed model's layers equal the original's; nothing to compensate")

    for name, module in targets.items():  # fail before any work is done
        lr.check_rank(rank, *dense_weight(module).shape, name, lr.EORA_RANK_FIX)
    if sequential:
        if method != "eora":
            raise ValueError(f"sequential=True fits the drifted inputs in EoRA's eigenspace; method={method!r} has no "
                             "sequential form: pass method='eora' or sequential=False")
        if calib_batches is None:
            raise ValueError("sequential=True collects statistics on the compensated model: pass calib_batches=")
        if not isinstance(calib_batches, Sequence):
            raise ValueError("sequential=True runs calib_batches several times per block and splits them into folds: "
                             "pass a list, not an iterator")
        calibration_folds(calib_batches)  # at least 2 batches, before any work
        layer_iter = _sequential_layers(original, compressed, targets, calib_batches, stats)
    else:
        if stats is None and method != "svd":
            raise ValueError(f"method={method!r} needs activation statistics: stats = collect_activation_stats(original, "
                             "calib_batches, target_modules=...), or pass sequential=True with calib_batches")
        layer_iter = ((n, stats.get(n) if stats is not None else None, None) for n in targets)

    factors, reports, kinds, conv_kernels = {}, [], {}, {}
    for name, layer_stats, on_done in _bar(layer_iter, len(targets), f"eora ({method})", progress):
        module = targets[name]
        W, Wc = dense_weight(originals[name]), dense_weight(module)
        if W.shape != Wc.shape:
            raise ValueError(f"layer {name!r}: original weight {tuple(W.shape)} and compressed {tuple(Wc.shape)} differ")
        if method != "svd" and layer_stats is None:
            raise ValueError(f"no activation statistics for layer {name!r}; collect them with target_modules covering it")
        if sequential:
            B, A, rep = fit_sequential_layer(name, W, Wc, layer_stats, rank, ridge, eps, device)
        else:
            B, A, rep = _layer(name, W, Wc, layer_stats, rank, method, alpha, ridge, eps, device)
        factors[name] = (B, A)
        reports.append(rep)
        kinds[name] = layer_kind(module)
        if isinstance(module, nn.Conv2d):
            if module.dilation != (1, 1):
                kinds[name] = "conv2d_dilated"
            conv_kernels[name] = tuple(module.kernel_size)
        if on_done is not None:
            on_done(name, B, A)
    return EoraAdapter(factors, kinds, rank, method + ("-sequential" if sequential else ""), reports, conv_kernels)


def _same_weight(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = dense_weight(a), dense_weight(b)
    return wa.shape == wb.shape and torch.equal(wa, wb.to(wa))


def _layer(name, W, Wc, layer_stats, rank, method, alpha, ridge, eps, device):
    """Factors of one layer (float32, CPU) and its report row."""
    dev = W.device if device is None else torch.device(device)
    W64, Wc64 = W.to(dev, torch.float64), Wc.to(dev, torch.float64)
    B, A = eora_factors(W64 - Wc64, layer_stats, rank, method=method, alpha=alpha, ridge=ridge, eps=eps, device=dev,
                        name=name)
    if layer_stats is not None:
        before = lr.relative_output_error(W64, Wc64, layer_stats)
        after = lr.relative_output_error(W64, Wc64 + B @ A, layer_stats)
    else:
        before = after = float("nan")
    rep = EoraLayerReport(name, tuple(W.shape), rank, before, after)
    return B.float().cpu(), A.float().cpu(), rep


def fit_sequential_layer(
    name: str,
    W: torch.Tensor,
    Wc: torch.Tensor,
    folds: Sequence[CrossStats],
    rank: int,
    ridge: float,
    eps: float | None,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor, EoraLayerReport]:
    """Cross-validated sequential factors of one layer (float32, CPU) and its report row: drifted output errors on
    all calibration data before / after, and the candidate chosen (:func:`select_sequential_factors`)."""
    dev = W.device if device is None else torch.device(device)
    fit = select_sequential_factors(W, Wc, folds, rank, independent_ridge=ridge, eps=eps, device=dev, name=name)
    W64, Wc64 = W.to(dev, torch.float64), Wc.to(dev, torch.float64)
    everything = merge_cross_stats(folds)
    rep = EoraLayerReport(name, tuple(W.shape), rank, drifted_output_error(W64, Wc64, everything),
                          drifted_output_error(W64, Wc64 + fit.B @ fit.A, everything), fit.choice)
    return fit.B.float().cpu(), fit.A.float().cpu(), rep


def _sequential_layers(
    original: nn.Module,
    compressed: nn.Module,
    targets: Mapping[str, nn.Module],
    calib_batches: Sequence[Any],
    stats: ActivationStats | None,
) -> Iterator[tuple[str, list[CrossStats], Any]]:
    """Yield ``(name, fold_cross_stats, on_done)`` layer by layer in execution order; ``on_done`` installs the
    layer's residual in a working copy before the next layer's statistics are collected.

    Each layer is fitted on the inputs it sees at inference, with the final residuals of every earlier layer in
    place. (Fitting several layers on one pass corrects the same drift twice: a later layer learns to undo drift
    that the earlier layers' residuals then remove.) One forward per layer and fold, stopped at the layer.
    """
    work = copy.deepcopy(compressed)
    parts = calibration_folds(calib_batches)
    if stats is not None:
        order = [n for n in stats.order if n in targets] + [n for n in targets if n not in stats]
    else:
        order = accumulate_stats(work, {n: work.get_submodule(n) for n in targets}, calib_batches[:1],
                                 progress=False).order
    on_done = lambda name, B, A: replace_module(work, name, CompensatedLayer(work.get_submodule(name), B, A))
    for name in order:
        folds = [accumulate_cross_stats(original, work, [name], part, progress=False,
                                        desc="sequential calibration")[name] for part in parts]
        yield name, folds, on_done
