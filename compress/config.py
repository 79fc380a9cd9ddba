"""What to compress and how: :class:`CompressionConfig`, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tensornets.devices import usable_device

from compress.compressors import METHOD_OPTIONS, Compressor, available_compressors, get_compressor


#: what to use instead of an option the method does not read, where a built-in method does that job
_OPTION_HINTS = {"whiten": "; to whiten a low-rank factorization, method='whitened_svd'"}


@dataclass
class CompressionConfig:
    """Compression of the target layers of a model (see :func:`compress.compress_model`).

    ``method`` is any name of the compressor registry (:mod:`compress.compressors`; aliases are resolved to the
    canonical name). Exactly one of ``keep``, ``rank``, ``energy`` sets the size of each factorized layer; the
    methods that keep dense weights (``"rtn"``, ``"gptq"``, ``"2:4"``, ``"magnitude"``, ``"sparsegpt"``) take
    ``bits``/``group_size`` or ``sparsity``/``pattern`` instead.

    ``keep`` is always the **fraction of parameters kept** (``0.8`` keeps 80 % and removes 20 %), counted on the
    target layers' weight matrices (biases are untouched). A rank-``r`` factorization of an ``(m, n)`` weight keeps
    ``r (m + n) / (m n)``.
    """

    method: str = field(
        default="whitened_svd",
        metadata={"help": "svd | asvd | whitened_svd (SVD-LLM) | tucker | tt | mpo | btt | cp | rtn | gptq | 2:4 | magnitude | "
                  "sparsegpt, or any registered compressor (compress.compressors)"},
    )
    keep: float | None = field(
        default=None, metadata={"help": "fraction of the target weights' parameters kept, in (0, 1]"}
    )
    rank: int | None = field(default=None, metadata={"help": "rank of every factorized layer (max rank for tensor formats)"})
    energy: float | None = field(
        default=None, metadata={"help": "fraction of (weighted) spectral energy kept per layer, in (0, 1]"}
    )
    allocation: str = field(
        default="layer",
        metadata={
            "help": "'layer': every layer keeps `keep`; 'global': one budget of keep * total, ranks allocated greedily "
            "by (whitened) spectra, error reduction per parameter (svd/asvd/whitened_svd only)"
        },
    )
    min_rank: int = field(default=1, metadata={"help": "per-layer rank floor for allocation='global'"})
    min_keep: float = field(default=0.0, metadata={"help": "per-layer floor on the kept fraction for allocation='global'"})
    target_modules: str | list[str] | None = field(
        default="all-linear",
        metadata={"help": "PEFT-style: list of names (exact or suffix), a regex (full match), or 'all-linear'"},
    )
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "same syntax; removed from the targets"})
    alpha: float = field(default=0.5, metadata={"help": "ASVD exponent: channels scaled by mean|x|**alpha"})
    ridge: float = field(default=0.0, metadata={"help": "whitening ridge: C + ridge * mean(diag C) * I"})
    eps: float | None = field(
        default=None, metadata={"help": "relative eigenvalue cutoff of the pseudo-inverse (default eps_fp32; see lowrank.eigenvalue_cutoff)"}
    )
    whiten: bool = field(
        default=False,
        metadata={
            "help": "tensor formats: decompose the whitened weight W Q Λ^(1/2) and fold the inverse into the input "
            "factor; only 'tucker' with one input mode (Tucker-2) has a single input factor"
        },
    )
    num_cores: int | None = field(default=None, metadata={"help": "tensor formats: modes per side"})
    modes: tuple[Sequence[int], Sequence[int]] | None = field(
        default=None, metadata={"help": "tensor formats: explicit (out_modes, in_modes)"}
    )
    svd: str = field(default="full", metadata={"help": "tensor formats: 'full' or 'randomized' SVDs inside"})
    decompose_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "tensor formats: the format's own options of tensornets.decompose (tucker: algorithm='hooi'; "
                  "cp: init, n_iter_max, tol, e.g. {'n_iter_max': 20} to bound ALS on large layers)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of randomized SVDs"})
    bits: int = field(default=4, metadata={"help": "rtn, gptq: bits per weight, 2..8"})
    group_size: int | None = field(
        default=128,
        metadata={"help": "rtn, gptq, sparsegpt with sparse_bits: weights per group along the input; must divide the "
                  "layers' input width (None or >= it: one group per row)"},
    )
    symmetric: bool = field(default=False, metadata={"help": "rtn, gptq, sparsegpt: symmetric grid without zero point"})
    observer: str = field(
        default="minmax",
        metadata={"help": "rtn, gptq, sparsegpt: each group's range, 'minmax' (its extremes, llm-compressor's default) "
                  "or 'mse' (clipped to the least rounding error, GPTQ's reference mse=True)"},
    )
    scale_dtype: torch.dtype = field(
        default=torch.float32,
        metadata={"help": "rtn, gptq, sparsegpt with sparse_bits: dtype the group scales are rounded to before the codes "
                  "are chosen; pass the dtype the checkpoint stores them in (save_hf_directory's dtype, bfloat16 by "
                  "default) so that the exported weights are exactly the ones evaluated and compensated"},
    )
    act_order: bool = field(
        default=True,
        metadata={"help": "gptq: quantize columns by decreasing activation energy, with static groups (llm-compressor's "
                  "actorder='static' default; the stored format is ordinary groups, no g_idx)"},
    )
    percdamp: float = field(default=0.01, metadata={"help": "gptq, sparsegpt: Hessian damping, fraction of mean(diag H)"})
    block_size: int = field(default=128, metadata={"help": "gptq, sparsegpt: columns per lazy-update block"})
    sparsity: float = field(
        default=0.5, metadata={"help": "magnitude, sparsegpt (unstructured): fraction of weights zeroed per layer"}
    )
    pattern: str = field(
        default="unstructured",
        metadata={"help": "sparsegpt: 'unstructured' (uses sparsity) or 'N:M', keep N of every M weights ('2:4')"},
    )
    sparse_bits: int | None = field(
        default=None, metadata={"help": "sparsegpt: also quantize the kept weights to this many bits (None: keep them)"}
    )
    device: str | None = field(default=None, metadata={"help": "where each layer is processed (default: its own device)"})

    def __post_init__(self) -> None:
        self._check_scalar_types()
        if not isinstance(self.scale_dtype, torch.dtype) or not self.scale_dtype.is_floating_point:
            raise TypeError(f"scale_dtype={self.scale_dtype!r} must be a floating torch dtype (torch.bfloat16, "
                            "torch.float16 or torch.float32)")
        self.method = self.compressor.name
        if self.device is not None:
            usable_device(self.device, fix="pass None (each layer's own device), 'cpu' or 'cuda'")
        sizes = {k: v for k, v in (("keep", self.keep), ("rank", self.rank), ("energy", self.energy)) if v is not None}
        if self.compressor.kind == "dense":
            if sizes:
                raise ValueError(
                    f"method={self.method!r} keeps dense weights: drop {sorted(sizes)} and use bits/group_size "
                    "(rtn, gptq) or sparsity/pattern (magnitude, sparsegpt)"
                )
        elif len(sizes) != 1:
            raise ValueError(
                f"method={self.method!r} needs exactly one of keep=, rank=, energy= (got {sorted(sizes) or 'none'})"
            )
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep} must be in (0, 1]: it is the fraction of parameters kept (0.8 keeps 80 %)")
        if self.keep == 1.0:
            warnings.warn("keep=1.0 factorizes each layer at its dense parameter count, which is still lossy (low rank: "
                          "rank m n / (m + n) < min(m, n)); to leave layers dense, leave them out of target_modules",
                          stacklevel=3)
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy={self.energy} must be in (0, 1]")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive int")
        if self.allocation not in ("layer", "global"):
            raise ValueError(f"allocation={self.allocation!r} must be 'layer' or 'global'")
        if self.allocation == "global":
            if self.compressor.spectrum is None or self.keep is None:
                spectral = tuple(n for n in available_compressors() if get_compressor(n).spectrum is not None)
                raise ValueError(
                    "allocation='global' allocates a keep= budget across layers by their spectra: it needs "
                    f"keep= and method in {spectral} (got method={self.method!r}, keep={self.keep})"
                )
        if not 0.0 <= self.min_keep <= 1.0:
            raise ValueError(f"min_keep={self.min_keep} must be in [0, 1]")
        if self.min_rank < 1:
            raise ValueError(f"min_rank={self.min_rank} must be >= 1")
        if self.svd not in ("full", "randomized"):
            raise ValueError(f"svd={self.svd!r} must be 'full' or 'randomized'")
        for name in ("alpha", "ridge", "percdamp", "eps"):
            value = getattr(self, name)
            if name == "eps" and value is None:
                continue
            # NaN passed every comparison and surfaced later as a misleading statistics error
            if not 0 <= value < math.inf:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if self.eps is not None and self.eps >= 1:  # a cutoff at λ_max drops every direction: "C = 0" later
            raise ValueError(f"eps={self.eps} must be < 1: it is the eigenvalue cutoff relative to the largest "
                             "(default float32's resolution, 1.2e-7)")
        unused = self._unused_options()
        if unused:
            settings = ", ".join(f"{n}={getattr(self, n)!r}" for n in unused)
            them = "it" if len(unused) == 1 else "them"
            raise ValueError(f"method={self.method!r} does not use {settings} "
                             f"({'; '.join(map(self._why_unused, unused))}); drop {them}, or pick a method or setting that "
                             f"reads {them}")
        if self.compressor.validate is not None:
            self.compressor.validate(self)

    def _check_scalar_types(self) -> None:
        """Every ``bool`` / ``int`` / ``float`` field (``| None`` where declared) holds that type: a string
        ``'no'`` is truthy, ``True`` compares as 1 and ``2.5`` as a rank slices nothing, all far from here."""
        kinds = {"bool": (bool,), "int": (numbers.Integral,), "float": (numbers.Real,)}
        for f in dataclasses.fields(self):
            declared = [part.strip() for part in str(f.type).split("|")]
            kind = next((k for k in declared if k in kinds), None)
            value = getattr(self, f.name)
            if kind is None or (value is None and "None" in declared):
                continue
            if isinstance(value, kinds[kind]) and (kind == "bool") == isinstance(value, bool):
                if kind != "bool" and type(value) not in (int, float):  # numpy scalars: plain ones for JSON and checks
                    setattr(self, f.name, int(value) if kind == "int" else float(value))
                continue
            expected = {"bool": "True or False", "int": "an int", "float": "a number"}[kind]
            raise TypeError(f"{f.name}={value!r} must be {expected}" + (" or None" if "None" in declared else ""))

    def _unused_options(self) -> list[str]:
        """The options set away from their defaults that this config does not read: method options outside
        ``Compressor.reads`` (or in ``Compressor.reads_only_with`` while its condition is at its default), and the
        floors of ``allocation='global'`` with ``allocation='layer'``. ``scale_dtype`` is an export setting any
        method may be given."""
        unused = [] if self.allocation == "global" else [n for n in ("min_rank", "min_keep") if self._is_set(n)]
        compressor = self.compressor
        if compressor.reads is None:
            return unused
        conditions = compressor.reads_only_with
        read = {n for n in compressor.reads if n not in conditions or self._is_set(conditions[n])}
        return unused + [f.name for f in dataclasses.fields(self)
                         if f.name in METHOD_OPTIONS and f.name not in read and f.name != "scale_dtype"
                         and self._is_set(f.name)]

    def _why_unused(self, name: str) -> str:
        """Which settings read option ``name`` (for the error naming an unused option)."""
        if name in ("min_rank", "min_keep"):
            return f"{name}: read only with allocation='global'"
        conditions = self.compressor.reads_only_with
        if name in conditions:
            return f"{name}: read only with {conditions[name]} set (it is {getattr(self, conditions[name])!r})"
        readers = [m for m in available_compressors() if name in (get_compressor(m).reads or ())]
        return f"{name}: read by {', '.join(readers) or 'no built-in method'}{_OPTION_HINTS.get(name, '')}"

    def _is_set(self, name: str) -> bool:
        """Whether field ``name`` differs from its default."""
        return getattr(self, name) != self.__dataclass_fields__[name].default

    @property
    def compressor(self) -> Compressor:
        """The registry entry of ``method`` (:func:`compress.compressors.get_compressor`)."""
        return get_compressor(self.method)

    @property
    def needs_stats(self) -> bool:
        """Whether :func:`compress.compress_model` requires activation statistics for this config."""
        return self.compressor.needs_stats or self.whiten

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable: ``scale_dtype`` as its name, e.g. ``"bfloat16"``)."""
        return {**asdict(self), "scale_dtype": str(self.scale_dtype).removeprefix("torch.")}
