"""Configurations of LoRETTA (tensor-train adapters, Yang et al. 2024): the rep and adp variants.

Each variant is a method of its own (its own peft type and parameter prefix), so a checkpoint
says which one it holds; the two configs share the tensor-train fields of
:class:`LoRETTABaseConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from adapters._delta import DeltaConfig

__all__ = ["PEFT_TYPE_ADP", "PEFT_TYPE_REP", "LoRETTAAdpConfig", "LoRETTABaseConfig", "LoRETTARepConfig"]

#: The peft types written to ``adapter_config.json``.
PEFT_TYPE_REP = "LORETTA_REP"
PEFT_TYPE_ADP = "LORETTA_ADP"

_REP_INITS = ("zero", "paper")


def _check_positive_int(value: object, name: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int, e.g. {example}")


@dataclass
class LoRETTABaseConfig(DeltaConfig):
    """Tensor-train fields shared by :class:`LoRETTARepConfig` and :class:`LoRETTAAdpConfig`.

    Every factor is a :class:`tensornets.TensorTrain` of a ``(d, k)`` matrix: ``d`` a model
    dimension (``d_in``, ``d_out``), ``k`` the small side (LoRA rank ``r`` or bottleneck
    ``m``). Its cores ``G_j: (R_{j-1}, n_j, R_j)`` run over the modes of ``d`` then those of
    ``k``, with every internal bond ``R_j = min(tt_rank, full rank of that bond)``;
    parameters ``Σ_j R_{j-1} n_j R_j``. Mode order matters for that count: the reference's
    ``768 × 8`` factor with modes ``[8, 8, 12, 8]`` and ``tt_rank=5`` has
    ``40 + 200 + 300 + 40 = 580`` parameters.
    """

    tt_rank: int = field(
        default=5, metadata={"help": "TT rank R of every internal bond of every factor (paper: 5, scripts also 8)."}
    )
    num_modes: int = field(
        default=3,
        metadata={
            "help": "Number of modes a model dimension (d_in, d_out) is split into when `modes` does not list it: "
            "balanced factorization by tensornets.factorize, e.g. 768 -> [8, 8, 12], 11008 -> [16, 16, 43]. The "
            "small side (r or the bottleneck m) stays one mode unless listed in `modes`."
        },
    )
    modes: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={
            "help": "Explicit modes per size, keyed by the size as a string: {'768': [8, 8, 12], '8': [8]} gives the "
            "768 x 8 factor the modes [8, 8, 12, 8] (d-side first). Each list must multiply to its key."
        },
    )
    train_norms: bool = field(
        default=False,
        metadata={
            "help": "Also train every normalization layer (LayerNorm, RMSNorm, ...), as the paper does; they are "
            "added to modules_to_save (a trained copy per adapter, saved with it) and counted separately by "
            "parameter_counts()."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int(self.tt_rank, "tt_rank", "tt_rank=5")
        _check_positive_int(self.num_modes, "num_modes", "num_modes=3")
        if self.modes is not None:
            if not isinstance(self.modes, dict):
                raise TypeError(f"modes={self.modes!r} must be a dict {{size: [modes]}}, e.g. {{'768': [8, 8, 12]}}")
            checked = {}
            for size, sizes in self.modes.items():
                valid = isinstance(sizes, (list, tuple)) and len(sizes) > 0
                valid = valid and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
                if not valid or str(math.prod(sizes)) != str(size):
                    raise ValueError(
                        f"modes[{size!r}]={sizes!r} must be a list of positive ints multiplying to {size}, "
                        "e.g. modes={'768': [8, 8, 12]}"
                    )
                checked[str(size)] = list(sizes)
            # JSON object keys are strings: normalize int keys so a saved config reloads equal.
            self.modes = checked


@dataclass
class LoRETTARepConfig(LoRETTABaseConfig):
    """Configuration of a :class:`~adapters.loretta.model.LoRETTARepModel` (LoRETTA_rep).

    A LoRA update whose two factors are tensor trains: ``ΔW = s · M_B M_Aᵀ`` with
    ``M_A: (d_in, r)`` and ``M_B: (d_out, r)`` each stored as a TT of rank ``tt_rank`` (modes
    of ``d`` first), ``s = alpha / r``. Parameters per adapted matrix
    ``TT(d_in × r) + TT(d_out × r)``, e.g. 1,160 for ``768 × 768`` with the reference modes
    (LoRA at ``r = 8``: 12,288).

    ``init_weights="zero"`` (default): ``M_A`` and all cores of ``M_B`` but the last are
    Gaussian (:func:`tensornets.init_factorization_` as if ``M_A`` had i.i.d. entries of std
    ``d_in^{-1/2}`` and ``M_B`` of std ``d_out^{-1/2}``); ``M_B``'s last core is zero, so
    ``ΔW = 0`` and the model is unchanged until training starts. ``"paper"``: the reference
    code's random start, every core of both factors ``N(0, 1) / sqrt(R_k) · σ^{1/K}`` with
    ``σ = (d_in + d_out)^{-1/2}`` (``K`` cores, ``R_k`` the core's right bond), so ``ΔW ≠ 0``.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank r: M_A is (d_in, r), M_B is (d_out, r)."})
    alpha: float = field(default=16.0, metadata={"help": "Scale numerator: ΔW = (alpha / r) · M_B M_Aᵀ."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout probability on x before M_A (training only)."})
    init_weights: str = field(
        default="zero",
        metadata={
            "help": "'zero': M_B's last core is zero so ΔW = 0 at init; 'paper': the reference code's random "
            "start (every core N(0,1)/sqrt(R_k) · σ^(1/K), σ = 1/sqrt(d_in + d_out)), ΔW != 0."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE_REP
        _check_positive_int(self.r, "r", "r=8")
        if self.init_weights not in _REP_INITS:
            raise ValueError(f"init_weights={self.init_weights!r} is unknown; use one of {_REP_INITS}")


@dataclass
class LoRETTAAdpConfig(LoRETTABaseConfig):
    """Configuration of a :class:`~adapters.loretta.model.LoRETTAAdpModel` (LoRETTA_adp).

    A bottleneck adapter on the output ``h`` of each target layer:
    ``f(h) = h + s · U(ReLU(D h + b_D)) + s · b_U`` with ``D: d → m`` and ``U: m → d`` tensor
    trains (modes of ``d`` first in both) and biases ``b_D: (m,)``, ``b_U: (d,)``. Targets are
    the attention output projection and the FFN output projection (defaults per architecture
    in :data:`~adapters.loretta.placement.ADP_TARGET_MODULES`: BERT family ``*.output.dense``,
    Llama family ``o_proj`` and ``down_proj``; other models: the same projections found in
    their blocks, :func:`~adapters.loretta.placement.find_adp_placement`). Init: ``U``'s last core and ``b_U`` are zero,
    so the adapter starts as the identity. Not mergeable (it is nonlinear in ``h``).
    """

    bottleneck: int = field(default=64, metadata={"help": "Bottleneck width m of D: d -> m and U: m -> d."})
    scale: float = field(default=1.0, metadata={"help": "Scale s of the adapter branch (initial value if learned)."})
    learn_scale: bool = field(default=False, metadata={"help": "Train s as a parameter of each adapter layer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE_ADP
        _check_positive_int(self.bottleneck, "bottleneck", "bottleneck=64")
