"""Configuration of LoTR (low tensor rank adaptation, Bershatsky et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from adapters._delta import DeltaConfig

__all__ = ["PEFT_TYPE", "LoTRConfig"]

#: The peft type written to ``adapter_config.json``.
PEFT_TYPE = "LOTR"

_INITS = ("orthogonal", "normal", "svd")


@dataclass
class LoTRConfig(DeltaConfig):
    """Configuration of a :class:`~adapters.lotr.model.LoTRModel`.

    A *group* is a set of ``M`` adapted ``nn.Linear`` layers of the same shape ``(d_out, d_in)``.
    The group shares ``A: (d_out, r)`` and ``B: (r, d_in)``; member ``m`` owns a core
    ``G_m: (r, r)`` and gets ``ΔW_m = s · A G_m B`` with ``s = alpha / r``. Trainable parameters
    per group: ``r (d_in + d_out) + M r²`` (LoRA: ``M r (d_in + d_out)``).

    Defaults and why: ``G_m = 0`` (the model is unchanged at init; only the cores get gradient
    at step 0 since ``∂L/∂A ∝ G = 0``) with **orthonormal** ``A``, ``B``: then
    ``‖ΔW_m‖_F = s ‖G_m‖_F`` and the core's gradient ``s Aᵀ (∂L/∂W) Bᵀ`` is a projection, so
    neither grows with the width ``d``, and a learning rate tuned at one width transfers to
    another. ``alpha = r`` (``s = 1``) then makes an Adam step change ``ΔW`` by about
    ``lr · r`` in Frobenius norm, like LoRA at ``alpha = r``. The reference code's
    unit-variance Gaussian factors have norms ``≈ sqrt(d)``, making the cores' effective
    learning rate grow with ``d``; ``init_factors="normal"`` with variance ``1 / d`` is the
    width-normalized version of that.
    """

    r: int = field(default=8, metadata={"help": "Tucker rank r of every group (the shared factors are (d, r))."})
    alpha: float = field(
        default=8.0, metadata={"help": "Scale numerator: ΔW = (alpha / r) · A G B. Default alpha = r = 8, s = 1."}
    )
    share: Union[str, dict[str, list[str]]] = field(
        default="suffix",
        metadata={
            "help": "How targets are grouped to share A and B. 'suffix': one group per module-name suffix after "
            "the layer index (e.g. all 'attention.self.query') and shape; 'all': one group per shape; or a dict "
            "{group_name: [module-name suffixes]} naming the groups (members of a group must share a shape)."
        },
    )
    init_factors: str = field(
        default="orthogonal",
        metadata={
            "help": "Initialization of A and B (cores G start at 0 in every case). 'orthogonal': orthonormal "
            "columns of A and rows of B; 'normal': entries N(0, 1/d) (unit expected column norm); 'svd': leading "
            "mode-1 / mode-3 singular vectors of the stack of the group's frozen weights (Tucker-2 / HOSVD)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive int, e.g. r=8")
        if self.init_factors not in _INITS:
            raise ValueError(f"init_factors={self.init_factors!r} is unknown; use one of {_INITS}")
        if isinstance(self.share, str):
            if self.share not in ("suffix", "all"):
                raise ValueError(
                    f"share={self.share!r} is unknown; use 'suffix', 'all' or a dict {{group: [suffixes]}}"
                )
        elif isinstance(self.share, dict):
            for group, suffixes in self.share.items():
                if not group or "." in group or not isinstance(suffixes, (list, tuple)) or not suffixes:
                    raise ValueError(
                        f"share[{group!r}]={suffixes!r}: group names must be non-empty without '.', "
                        "each mapped to a non-empty list of module-name suffixes"
                    )
        else:
            raise TypeError(f"share={self.share!r} must be 'suffix', 'all' or a dict {{group: [suffixes]}}")
