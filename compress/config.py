"""What to compress and how: :class:`CompressionConfig`, validated on construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: low-rank methods: a truncated SVD of the weight under a right weighting (see :mod:`compress.lowrank`)
LOWRANK_METHODS = {"svd": "svd", "asvd": "asvd", "whitened_svd": "whitened"}
#: tensor formats of :func:`tensornets.decompose`
TENSOR_METHODS = ("tucker", "tt", "mpo", "btt")
#: compressors that keep a dense weight (EoRA compensates their error)
DENSE_METHODS = ("rtn", "2:4", "magnitude")
METHODS = (*LOWRANK_METHODS, *TENSOR_METHODS, *DENSE_METHODS)
#: methods that read activation statistics
NEEDS_STATS = ("asvd", "whitened_svd")


@dataclass
class CompressionConfig:
    """Compression of the target layers of a model (see :func:`compress.compress_model`).

    Exactly one of ``keep``, ``rank``, ``energy`` sets the size of each factorized layer; ``"rtn"``, ``"2:4"`` and
    ``"magnitude"`` take ``bits``/``group_size`` or ``sparsity`` instead.

    ``keep`` is always the **fraction of parameters kept** (``0.8`` keeps 80 % and removes 20 %), counted on the
    target layers' weight matrices (biases are untouched). A rank-``r`` factorization of an ``(m, n)`` weight keeps
    ``r (m + n) / (m n)``.
    """

    method: str = field(
        default="whitened_svd",
        metadata={"help": "svd | asvd | whitened_svd (SVD-LLM) | tucker | tt | mpo | btt | rtn | 2:4 | magnitude"},
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
    seed: int = field(default=0, metadata={"help": "seed of randomized SVDs"})
    bits: int = field(default=4, metadata={"help": "rtn: bits per weight"})
    group_size: int | None = field(
        default=128,
        metadata={"help": "rtn: weights per group along the input; a shorter last group when it does not divide"},
    )
    symmetric: bool = field(default=False, metadata={"help": "rtn: symmetric grid without zero point"})
    sparsity: float = field(default=0.5, metadata={"help": "magnitude: fraction of weights zeroed per layer"})
    device: str | None = field(default=None, metadata={"help": "where each layer is processed (default: its own device)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        sizes = {k: v for k, v in (("keep", self.keep), ("rank", self.rank), ("energy", self.energy)) if v is not None}
        if self.method in DENSE_METHODS:
            if sizes:
                raise ValueError(
                    f"method={self.method!r} keeps dense weights: drop {sorted(sizes)} and use bits/group_size "
                    "(rtn) or sparsity (magnitude)"
                )
        elif len(sizes) != 1:
            raise ValueError(
                f"method={self.method!r} needs exactly one of keep=, rank=, energy= (got {sorted(sizes) or 'none'})"
            )
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep} must be in (0, 1]: it is the fraction of parameters kept (0.8 keeps 80 %)")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy={self.energy} must be in (0, 1]")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive int")
        if self.allocation not in ("layer", "global"):
            raise ValueError(f"allocation={self.allocation!r} must be 'layer' or 'global'")
        if self.allocation == "global":
            if self.method not in LOWRANK_METHODS or self.keep is None:
                raise ValueError(
                    "allocation='global' allocates a keep= budget across layers by their spectra: it needs "
                    f"keep= and method in {tuple(LOWRANK_METHODS)} (got method={self.method!r}, keep={self.keep})"
                )
        if not 0.0 <= self.min_keep <= 1.0:
            raise ValueError(f"min_keep={self.min_keep} must be in [0, 1]")
        if self.min_rank < 1:
            raise ValueError(f"min_rank={self.min_rank} must be >= 1")
        if self.whiten and self.method != "tucker":
            raise ValueError(
                f"whiten=True applies to method='tucker' (Tucker-2: one input factor absorbs the whitening); "
                f"for low rank use method='whitened_svd'; {self.method!r} has no single input factor"
            )
        if self.svd not in ("full", "randomized"):
            raise ValueError(f"svd={self.svd!r} must be 'full' or 'randomized'")

    @property
    def needs_stats(self) -> bool:
        """Whether :func:`compress.compress_model` requires activation statistics for this config."""
        return self.method in NEEDS_STATS or self.whiten

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable)."""
        return asdict(self)
