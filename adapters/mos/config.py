"""Configuration of MoS (Mixture of Shards, Wang et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters._delta import DeltaConfig
from adapters._registry import PeftMethodType

__all__ = ["PEFT_TYPE", "MoSConfig"]

#: The peft type written to ``adapter_config.json``.
PEFT_TYPE = PeftMethodType("MOS")


@dataclass
class MoSConfig(DeltaConfig):
    """Configuration of a :class:`~adapters.mos.model.MoSModel`.

    Per module type (targets sharing a name suffix after the layer index and a shape, e.g. all
    ``q_proj``; ``L`` of them) one pair of shard pools ``P_A: (n, d_in / c)``,
    ``P_B: (n, d_out / c)`` with ``n = v L c`` is shared by all ``L`` layers: exactly the
    trainable parameters of LoRA at rank ``v`` on the same targets. Layer ``l`` assembles
    ``A_l: (r, d_in)`` and ``B_l: (d_out, r)`` from ``r c`` shards each, picked by a fixed
    index table (subset selection from the shared range, independent tables for ``A`` and
    ``B`` — pair dissociation —, ``c`` shards per rank vector — vector sharding —, and ``p``
    private rank vectors per layer — privatization), and gets ``ΔW_l = (alpha / r) B_l A_l``.
    The tables are drawn from ``seed`` and saved beside the pools (``L · 2 r c`` int64 per module
    type, a few kB), so a load restores them whatever the seed in ``adapter_config.json`` or the
    torch version. Init: ``P_A`` uniform in ``±d_in^{-1/2}`` (LoRA's Kaiming-uniform ``A``),
    ``P_B = 0``.

    ``alpha``: ``A_l`` has LoRA's ``A`` entries and one Adam step moves every entry of ``P_B``
    by ``±lr``; with private shards the output would change per coordinate by about
    ``(alpha / r) · lr · r σ_A ‖x‖ = alpha · lr σ_A ‖x‖``, as LoRA's at the same ``alpha``
    (:mod:`adapters._step_match`). But every shard of ``P_B`` serves several rank vectors of
    all ``L`` layers, so its gradient's sign agrees only partly with any one use, and the
    update moves slower than PEFT's default LoRA's at ``alpha = 8`` (measured on an 8-layer
    BERT). The reference's ``alpha = 16`` (twice PEFT's 8) is therefore kept as the default: it
    moves like ``LoraConfig()`` at the same lr (``tests/adapters/test_step_match.py`` checks
    the default's update against LoRA's).

    Requirements (checked before anything is created): ``0 <= p <= v <= r``,
    ``(v - p) L >= r - p`` for every module type, and ``c`` divides ``d_in`` and ``d_out``.
    """

    r: int = field(default=16, metadata={"help": "Rank r of the assembled A_l: (r, d_in), B_l: (d_out, r)."})
    v: int = field(default=4, metadata={"help": "Equivalent LoRA rank v: the pools hold v·L·c shards (LoRA-rank-v size)."})
    p: int = field(default=2, metadata={"help": "Private rank vectors per layer (of the r), from shards no other layer uses."})
    c: int = field(default=4, metadata={"help": "Shards per rank vector; must divide d_in and d_out."})
    alpha: float = field(default=16.0, metadata={"help": "Scale numerator: ΔW_l = (alpha / r) · B_l A_l."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout probability on x before A_l (training only)."})
    seed: int = field(default=0, metadata={"help": "Seed the index tables are drawn from (the tables are saved too)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        for name in ("r", "v", "c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int (defaults r=16, v=4, p=2, c=4)")
        if isinstance(self.p, bool) or not isinstance(self.p, int) or not 0 <= self.p <= self.v:
            raise ValueError(f"p={self.p!r} must be an int with 0 <= p <= v={self.v}; lower p or raise v")
        if self.v > self.r:
            raise ValueError(f"v={self.v} exceeds r={self.r}: MoS assembles rank r from a rank-v budget; pass v <= r")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative int")
