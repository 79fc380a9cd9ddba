"""Configurations of LoRETTA (tensor-train adapters, Yang et al. 2024): the rep and adp variants.

Each variant is a method of its own (its own peft type and parameter prefix), so a checkpoint
says which one it holds; the two configs share the tensor-train fields of
:class:`LoRETTABaseConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from adapters._delta import DeltaConfig
from adapters._registry import PeftMethodType

__all__ = ["PEFT_TYPE_ADP", "PEFT_TYPE_REP", "LoRETTAAdpConfig", "LoRETTABaseConfig", "LoRETTARepConfig"]

#: The peft types written to ``adapter_config.json``.
PEFT_TYPE_REP = PeftMethodType("LORETTA_REP")
PEFT_TYPE_ADP = PeftMethodType("LORETTA_ADP")

_REP_INITS = ("lora_rate", "zero", "paper")


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):  # a string "no" is truthy
        raise TypeError(f"{name}={value!r} must be True or False")


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
    ``40 + 200 + 300 + 40 = 580`` parameters. The first core costs ``R n_1``, every later one
    ``R² n_j``, so a large first mode followed by small ones is cheapest: by default
    (``num_modes=None``) the modes of ``d`` are the split that minimises the count exactly
    (:func:`~adapters.loretta.layer.min_parameter_modes`), e.g. ``768 -> [16, 3, 4, 4]``:
    ``80 + 75 + 100 + 100 + 40 = 395`` at ``tt_rank=5``.
    """

    tt_rank: int = field(
        default=5, metadata={"help": "TT rank R of every internal bond of every factor (paper: 5, scripts also 8)."}
    )
    num_modes: Optional[int] = field(
        default=None,
        metadata={
            "help": "How a model dimension (d_in, d_out) not listed in `modes` is split. None (default): the split "
            "of d that minimises the TT parameter count at tt_rank (a large first mode, then small ones: 384 -> "
            "[16, 2, 3, 4] at tt_rank 5); an int: the paper's balanced split into that many modes by "
            "tensornets.factorize, e.g. num_modes=3: 768 -> [8, 8, 12], 11008 -> [16, 16, 43] (the default up to "
            "0.1.0; checkpoints saved by it store num_modes=3 and rebuild those shapes). The small side (r or "
            "the bottleneck m) stays one mode unless listed in `modes`."
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
        _check_bool(self.train_norms, "train_norms")
        _check_positive_int(self.tt_rank, "tt_rank", "tt_rank=5")
        if self.num_modes is not None:
            _check_positive_int(self.num_modes, "num_modes", "num_modes=3 (or None for the fewest parameters)")
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
    ``TT(d_in × r) + TT(d_out × r)``: 690 for ``384 × 384`` at ``tt_rank=5`` and 480 at the
    default ``tt_rank=4`` with the default (parameter-minimal) modes, against LoRA r = 8's
    6,144; 940 with the paper's balanced modes (``num_modes=3``) at ``tt_rank=5``.

    Defaults and why. ``tt_rank=4``: ``M_A``'s last bond caps the rank of ``ΔW`` at
    ``min(r, tt_rank)`` anyway, and at 5 even the parameter-minimal modes give only 8.9x fewer
    parameters than LoRA r = 8 on MiniLM query/value (12.8x at 4). ``alpha = r = 8`` (``s = 1``,
    PEFT's LoRA default; the paper used 16) with a *step-matched* init
    (:mod:`adapters._step_match`): LoRETTA-rep is LoRA with ``A_lora = M_Aᵀ`` and
    ``B_lora = s P C``, where ``C: (q, r)`` is ``M_B``'s last core (zero at init, the only core
    with a gradient at step 0) and ``P: (d_out, q)`` the contraction of the cores before it.
    ``M_A`` is drawn with the singular values of LoRA's ``A`` (entry std
    ``(3 d_in)^{-1/2} sqrt(R / r)``, its rank being at most ``R``) and ``P`` with entries of std
    ``q^{-1/2}``, so one Adam step moves ``B_lora`` by entries of ``s lr`` as LoRA's ``ΔB``: the
    output moves as LoRA's does at the same ``lr``, at any width
    (:func:`~adapters.loretta.layer.step_matched_init_`). The earlier init (``M_B``'s
    entries of std ``d_out^{-1/2}``) was ``~sqrt(3 q / d_out)`` times slower (0.2x at d = 384).

    ``init_weights="lora_rate"`` (default): as above, ``ΔW = 0`` at init, and ``P``'s cores are
    stored at LoRA's ``A`` entry std with a fixed multiplier on ``M_B`` (muP), so that ``P`` -
    the output directions of ``ΔW``, which LoRA learns freely in ``B`` - changes per Adam step
    as fast, relative to its size, as LoRA's ``A`` does; with the plain parametrization it moved
    17x slower at ``d = 384`` and ``ΔW`` stayed mostly in ``P``'s random initial column space
    (MiniLM drug-review, 2 epochs; with the multiplier the 3-seed accuracy is 84.1 ± 1.8 %
    against LoRA's 85.7 ± 1.1 %, ``benchmarks/results/finetune_defaults.md``).
    ``"zero"``: the same first step without the multiplier (the default before; checkpoints
    saved with it store ``init_weights="zero"`` and reload unchanged). ``"paper"``: the
    reference code's random start, every core of both factors
    ``N(0, 1) / sqrt(R_k) · σ^{1/K}`` with ``σ = (d_in + d_out)^{-1/2}`` (``K`` cores, ``R_k``
    the core's right bond), so ``ΔW ≠ 0``.
    """

    tt_rank: int = field(
        default=4,
        metadata={"help": "TT rank R of every internal bond of M_A and M_B (paper: 5, scripts also 8); ΔW has rank "
                  "<= min(r, R)."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank r: M_A is (d_in, r), M_B is (d_out, r)."})
    alpha: float = field(
        default=8.0,
        metadata={"help": "Scale numerator: ΔW = (alpha / r) · M_B M_Aᵀ. Means what LoRA's lora_alpha means: the same "
                  "alpha and lr move the output as fast (default alpha = r = 8, PEFT's LoRA default; paper: 16)."},
    )
    dropout: float = field(default=0.05, metadata={"help": "Dropout probability on x before M_A (training only)."})
    init_weights: str = field(
        default="lora_rate",
        metadata={
            "help": "'lora_rate' (default): M_B's last core is zero so ΔW = 0 at init, and the cores of M_B before "
            "it are stored at LoRA's A std with a fixed multiplier so they learn at LoRA's rate; 'zero': the same "
            "ΔW = 0 start without the multiplier (the default up to this release); 'paper': the reference code's "
            "random start (every core N(0,1)/sqrt(R_k) · σ^(1/K), σ = 1/sqrt(d_in + d_out)), ΔW != 0."
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

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex of the layers whose outputs get an adapter. Default: the attention and "
            "FFN output projections (adapters.loretta.ADP_TARGET_MODULES per architecture, else found by "
            "find_adp_placement), not PEFT's LoRA defaults."
        },
    )
    bottleneck: int = field(default=64, metadata={"help": "Bottleneck width m of D: d -> m and U: m -> d."})
    scale: float = field(default=1.0, metadata={"help": "Scale s of the adapter branch (initial value if learned)."})
    learn_scale: bool = field(default=False, metadata={"help": "Train s as a parameter of each adapter layer."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE_ADP
        _check_bool(self.learn_scale, "learn_scale")
        _check_positive_int(self.bottleneck, "bottleneck", "bottleneck=64")
