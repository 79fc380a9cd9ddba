"""LoTR tuner: plans the factors each group shares, then injects :class:`LoTRLayer`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from adapters._delta import DeltaTuner, LayerPlan, Target, weight_matrix
from adapters._groups import group_targets
from adapters.lotr.config import LoTRConfig
from adapters.lotr.factors import random_factors, shared_a_multiplier, step_matched_scales, tucker2_factors
from adapters.lotr.layer import LoTRLayer

__all__ = ["LoTRModel"]


class LoTRModel(DeltaTuner):
    """PEFT tuner for LoTR (use through ``peft.get_peft_model(model, LoTRConfig(...))``).

    Shared state: ``lotr_A[adapter][group]: (d_out, r)`` and ``lotr_B[adapter][group]: (r, d_in)``
    live here once (checkpoint keys ``base_model.lotr_A.<group>``); the layers hold the private
    cores. Before any layer is created the tuner groups every target (``config.share``), checks
    the rank and the groups' shapes and creates each group's factors, so a bad config raises
    with the model untouched.

    Examples
    --------
    >>> import adapters  # registers LoTR with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(bert, adapters.LoTRConfig(r=8, target_modules=["query", "value"]))
    """

    prefix = "lotr_"
    tuner_layer_cls = LoTRLayer
    method_name = "LoTR"
    uses_shared_state = True
    shared_state_names = ("lotr_A", "lotr_B")

    @torch.no_grad()
    def _plan_shared_state(
        self, config: LoTRConfig, adapter_name: str, targets: Sequence[Target]
    ) -> dict[str, LayerPlan]:
        """Create each group's ``A``, ``B`` of ``adapter_name``; every target's plan names its group.

        ``init_factors="svd"``: the leading Tucker-2 factors of the stack of the group's frozen weights
        (:func:`~adapters.lotr.factors.tucker2_factors`), scaled by :func:`step_matched_scales` like the random
        inits; otherwise :func:`random_factors`, drawn group by group in module order. ``A`` is stored divided by
        its group's multiplier :func:`~adapters.lotr.factors.shared_a_multiplier` (1 for ``init_weights="plain"``),
        which the layers apply: the same ``A`` in use, stored at LoRA's ``A`` std.

        Raises
        ------
        ValueError
            If ``r`` exceeds a target's ``min(d_out, d_in)``, or ``share`` puts layers of different shapes
            into one group (or a target into no group).
        """
        r = config.r
        sizes = {t.key: min(weight_matrix(t.layer).shape) for t in targets}
        small = {key: size for key, size in sizes.items() if r > size}
        if small:
            listed = ", ".join(f"{k!r}" for k in list(small)[:3]) + (", ..." if len(small) > 3 else "")
            suffixes = sorted({k.rsplit(".", 1)[-1] for k in small})
            raise ValueError(
                f"r={r} exceeds min(d_out, d_in)={min(small.values())} of {len(small)} layer(s) ({listed}); pass "
                f"r<={min(small.values())} or leave them out (exclude_modules={suffixes}, e.g. next to "
                "target_modules='all-linear')"
            )
        groups = group_targets(targets, config.share)
        shared_a, shared_b = nn.ParameterDict(), nn.ParameterDict()
        for group, members in groups.items():
            weight = weight_matrix(members[0].layer)
            d_out, d_in = weight.shape
            if config.init_factors == "svd":
                a, b = tucker2_factors([weight_matrix(member.layer) for member in members], r)
                scale_a, scale_b = step_matched_scales(d_out, d_in, r)
                a, b = scale_a * a, scale_b * b
            else:
                a, b = random_factors(d_out, d_in, r, config.init_factors)
            a = a / shared_a_multiplier(d_in, r, config.init_weights)
            # Contiguous: QR gives a column-major A, and FSDP2 refuses to shard a non-contiguous parameter.
            shared_a[group] = nn.Parameter(a.to(weight.device).contiguous())
            shared_b[group] = nn.Parameter(b.to(weight.device).contiguous())
        self.lotr_A[adapter_name] = shared_a
        self.lotr_B[adapter_name] = shared_b
        containers = (self.lotr_A, self.lotr_B)
        return {member.key: LayerPlan(group, containers) for group, members in groups.items() for member in members}
