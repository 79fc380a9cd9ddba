"""Configuration of LoTR (low tensor rank adaptation, Bershatsky et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from adapters._delta import DeltaConfig
from adapters._registry import PeftMethodType
from adapters._step_match import INIT_WEIGHTS

__all__ = ["PEFT_TYPE", "LoTRConfig"]

#: The peft type written to ``adapter_config.json``.
PEFT_TYPE = PeftMethodType("LOTR")

_INITS = ("orthogonal", "normal", "svd")


@dataclass
class LoTRConfig(DeltaConfig):
    """Configuration of a :class:`~adapters.lotr.model.LoTRModel`.

    A *group* is a set of ``M`` adapted ``nn.Linear`` layers of the same shape ``(d_out, d_in)``.
    The group shares ``A: (d_out, r)`` and ``B: (r, d_in)``; member ``m`` owns a core
    ``G_m: (r, r)`` and gets ``ΔW_m = s · A G_m B`` with ``s = alpha / r``. Trainable parameters
    per group: ``r (d_in + d_out) + M r²`` (LoRA: ``M r (d_in + d_out)``).

    Defaults and why: ``G_m = 0`` (the model is unchanged at init; only the cores get gradient
    at step 0 since ``∂L/∂A ∝ G = 0``), ``alpha = r`` (``s = 1``, PEFT's LoRA default), and
    factors at the *step-matched* scale of :mod:`adapters._step_match`: ``A`` with entries of
    std ``r^{-1/2}``, ``B`` with LoRA's ``A`` std ``(3 d_in)^{-1/2}``. LoTR is LoRA with
    ``B_lora = s A G_m``, ``A_lora = B``; one Adam step moves each core entry by ``±lr``, so
    ``s A ΔG_m`` has entries of ``sqrt(r) · r^{-1/2} · s lr = s lr``, exactly LoRA's ``s ΔB``,
    and the output moves as LoRA's does at the same ``lr`` and ``alpha``, whatever the width
    (per output coordinate, independent of ``d_out``: the muP condition). Unit-norm factors
    (LoTR's earlier default) move it ``sqrt(3 r / d_out)`` times as fast (0.25x at d = 384):
    they needed a larger lr than LoRA's. The reference code's unit-variance Gaussian factors with
    ``alpha = 1`` overshoot instead, by ``sqrt(3 d_in / r)`` (12x at d = 384), growing with width.

    ``init_weights="lora_rate"`` (default) also makes ``A`` - the output directions of every
    ``ΔW_m``, which LoRA learns freely in ``B_lora`` - *learn* at LoRA's rate: ``A`` is stored at
    LoRA's ``A`` std ``(3 d_in)^{-1/2}`` (the same draw, rescaled) and used as ``μ A_stored``
    with the fixed ``μ = sqrt(3 d_in / r)`` (12 at d = 384, r = 8; one per group, from its shape;
    :func:`adapters._step_match.lora_rate_multiplier`), so that Adam moves it by ``lr / σ_A`` of
    its size per step, as LoRA's ``A``; stored at ``r^{-1/2}`` it moved 12x slower (with this
    default: 85.3 % vs LoRA's 85.7 %, drug-review, 2 epochs, 3 seeds,
    benchmarks/results/finetune_defaults.md). The value of ``ΔW`` and its first step are the
    same either way. ``"plain"``: ``A`` stored at ``r^{-1/2}`` (the default before; a checkpoint whose config has
    no ``init_weights`` was saved with it and reloads as ``"plain"``).
    """

    r: int = field(default=8, metadata={"help": "Tucker rank r of every group (the shared factors are (d, r))."})
    alpha: float = field(
        default=8.0, metadata={"help": "Scale numerator: ΔW = (alpha / r) · A G B. Default alpha = r = 8, s = 1."}
    )
    init_weights: str = field(
        default="lora_rate",
        metadata={
            "help": "'lora_rate' (default): A stored at LoRA's A std (3 d_in)^-1/2 times a fixed multiplier "
            "sqrt(3 d_in / r), so it learns at LoRA's rate; 'plain': A stored at its std r^-1/2 (the default "
            "before; configs saved without this field load as 'plain'). Same ΔW and first step either way."
        },
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
            "help": "Initialization of A and B (cores G start at 0 in every case). 'orthogonal': orthogonal "
            "columns of A and rows of B; 'normal': i.i.d. Gaussian entries; 'svd': leading mode-1 / mode-3 singular "
            "vectors of the stack of the group's frozen weights (Tucker-2 / HOSVD). All three at the step-matched "
            "scale: entries of A of std r^-1/2, of B of std (3 d_in)^-1/2 (LoRA's A), so LoRA's lr works."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive int, e.g. r=8")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights={self.init_weights!r} is unknown; use one of {INIT_WEIGHTS}")
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

    @classmethod
    def check_kwargs(cls, **kwargs):
        """PEFT's hook on a loaded ``adapter_config.json``: a config saved without ``init_weights`` is ``"plain"``.

        Such a checkpoint stores ``A`` at its own std, without the multiplier of the later default.
        """
        kwargs.setdefault("init_weights", "plain")
        return super().check_kwargs(**kwargs)
