"""Configuration of FLoRA (Tucker updates of N-dimensional weights, Si et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from adapters._delta import DeltaConfig
from adapters._registry import PeftMethodType
from adapters._step_match import INIT_WEIGHTS

__all__ = ["PEFT_TYPE", "FloraConfig"]

#: The peft type written to ``adapter_config.json``.
PEFT_TYPE = PeftMethodType("FLORA")


@dataclass
class FloraConfig(DeltaConfig):
    """Configuration of a :class:`~adapters.flora.model.FloraModel`.

    For a weight with modes ``(d_1, ..., d_K)`` (``(d_out, d_in)`` for ``nn.Linear``,
    ``(num_embeddings, embedding_dim)`` for ``nn.Embedding``, ``(C_out, C_in / groups, k_1, ...)``
    for ``nn.Conv1d/2d/3d``) the update is the Tucker tensor
    ``ΔW = s · G ×_1 U_1 ×_2 U_2 ... ×_K U_K`` with core ``G: (r_1, ..., r_K)`` (zero at init)
    and factors ``U_k: (d_k, r_k)``. For a linear layer this is ``ΔW = s · U_out G U_inᵀ``: a
    LoRA with an ``r × r`` mixer.

    Init (step-matched, :mod:`adapters._step_match`): Gaussian factors of stds
    :func:`~adapters.flora.layer.step_matched_stds` (a linear layer: ``U_in`` LoRA's ``A`` std
    ``(3 d_in)^{-1/2}``, ``U_out`` ``r^{-1/2}``), so that with
    the default ``alpha = r`` (``s = 1``, PEFT's LoRA default) one Adam step at LoRA's ``lr``
    moves the output as LoRA's does. Unit-norm output columns (the earlier default) were
    ``sqrt(3 r / d_out)`` times slower (0.25x at d = 384). Embeddings keep ``N(0, 1/d_k)`` factors.

    ``init_weights="lora_rate"`` (default) also makes ``U_out`` (``U_1``, the output directions of
    ``ΔW``, which LoRA learns freely in ``B``) *learn* at LoRA's rate on linear and conv layers:
    it is stored at LoRA's ``A`` std ``(3 fan_in)^{-1/2}`` (the same draw, rescaled) and used as
    ``μ U_out_stored`` with the fixed ``μ = σ_1 / (3 fan_in)^{-1/2}`` (``sqrt(3 d_in / r)`` on a
    linear layer, 12 at d = 384, r = 8; :func:`adapters._step_match.lora_rate_multiplier`), so
    Adam moves it by ``lr / σ_A`` of its size per step, as LoRA's ``A``. Stored at its own std
    it moved 12x slower (with this default on MiniLM: 86.0 % vs LoRA's 85.7 %, drug-review,
    2 epochs, 3 seeds, benchmarks/results/finetune_defaults.md). The value of ``ΔW`` and its
    first step are the same either way; the other factors and embeddings are stored as they are used.
    ``"plain"``: no multiplier (the default before; a checkpoint whose config has no ``init_weights`` was
    saved with it and reloads as ``"plain"``).
    """

    r: Union[int, list[int]] = field(
        default=8,
        metadata={
            "help": "Tucker ranks. An int applies to every mode (a mode smaller than r keeps its full size, e.g. "
            "a 3x3 kernel or the in-mode of a depthwise conv); a list gives one rank per weight mode, e.g. "
            "[16, 16, 2, 2] for (C_out, C_in/groups, kh, kw) of a Conv2d, and must fit every mode."
        },
    )
    alpha: float = field(
        default=8.0, metadata={"help": "Scale numerator: s = alpha / r (alpha / max(r) for a list). NLP default."}
    )
    scale: Optional[float] = field(
        default=None,
        metadata={"help": "A constant scale s replacing alpha / r (the vision code's choice, e.g. 4.0)."},
    )

    init_weights: str = field(
        default="lora_rate",
        metadata={
            "help": "'lora_rate' (default): U_out stored at LoRA's A std times a fixed multiplier, so it learns "
            "at LoRA's rate; 'plain': U_out stored at its own std (the default before; configs saved without "
            "this field load as 'plain'). Same ΔW and first step either way."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights={self.init_weights!r} is unknown; use one of {INIT_WEIGHTS}")
        ranks = [self.r] if isinstance(self.r, int) else self.r
        if not isinstance(ranks, (list, tuple)) or not ranks or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ranks
        ):
            raise ValueError(
                f"r={self.r!r} must be a positive int or a list of positive ints, e.g. r=8 or [8, 8, 2, 2]"
            )
        if isinstance(self.r, tuple):
            self.r = list(self.r)

    @property
    def reference_rank(self) -> int:
        """The ``r`` of ``s = alpha / r``."""
        return self.r if isinstance(self.r, int) else max(self.r)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """PEFT's hook on a loaded ``adapter_config.json``: a config saved without ``init_weights`` is ``"plain"``.

        Such a checkpoint stores ``U_out`` at its own std, without the multiplier of the later default.
        """
        kwargs.setdefault("init_weights", "plain")
        return super().check_kwargs(**kwargs)
