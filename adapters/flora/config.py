"""Configuration of FLoRA (Tucker updates of N-dimensional weights, Si et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from adapters._delta import DeltaConfig

__all__ = ["PEFT_TYPE", "FloraConfig"]

#: The peft type written to ``adapter_config.json``.
PEFT_TYPE = "FLORA"


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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        ranks = [self.r] if isinstance(self.r, int) else self.r
        if not isinstance(ranks, (list, tuple)) or not ranks or any(not isinstance(x, int) or x < 1 for x in ranks):
            raise ValueError(
                f"r={self.r!r} must be a positive int or a list of positive ints, e.g. r=8 or [8, 8, 2, 2]"
            )
        if isinstance(self.r, tuple):
            self.r = list(self.r)

    @property
    def reference_rank(self) -> int:
        """The ``r`` of ``s = alpha / r``."""
        return self.r if isinstance(self.r, int) else max(self.r)
