"""LoTR tuner: injects :class:`LoTRLayer` and owns the factors each group shares."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from adapters._delta import DeltaTuner
from adapters.lotr.config import LoTRConfig
from adapters.lotr.layer import LoTRLayer, random_factors, step_matched_scales, tucker2_factors

__all__ = ["LoTRModel"]


class LoTRModel(DeltaTuner):
    """PEFT tuner for LoTR (use through ``peft.get_peft_model(model, LoTRConfig(...))``).

    Shared state: ``lotr_A[adapter][group]: (d_out, r)`` and ``lotr_B[adapter][group]: (r, d_in)``
    live here once (checkpoint keys ``base_model.lotr_A.<group>``); the layers hold the private
    cores.

    Examples
    --------
    >>> import adapters  # registers LoTR with PEFT
    >>> from peft import get_peft_model
    >>> model = get_peft_model(bert, adapters.LoTRConfig(r=8, target_modules=["query", "value"]))
    """

    prefix = "lotr_"
    tuner_layer_cls = LoTRLayer
    uses_shared_state = True
    shared_state_names = ("lotr_A", "lotr_B")

    def _create_new_module(self, config: LoTRConfig, adapter_name: str, target: nn.Module, current_key: str):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"LoTR adapts nn.Linear layers only; target {current_key!r} is {type(base).__name__}. "
                "Leave it out of target_modules (FLoRA adapts embeddings and convolutions)"
            )
        return LoTRLayer(target, adapter_name, config, current_key=current_key, tuner=self)

    def shared_factors(
        self,
        adapter_name: str,
        group: str,
        shape: tuple[int, int],
        config: LoTRConfig,
        *,
        device: torch.device,
        member: str,
    ) -> None:
        """Create the group's ``A``, ``B`` on first use; check the shape of later members."""
        d_out, d_in = shape
        if adapter_name not in self.lotr_A:
            self.lotr_A[adapter_name] = nn.ParameterDict()
            self.lotr_B[adapter_name] = nn.ParameterDict()
        shared_a, shared_b = self.lotr_A[adapter_name], self.lotr_B[adapter_name]
        if group in shared_a:
            have = (shared_a[group].shape[0], shared_b[group].shape[1])
            if have != (d_out, d_in):
                raise ValueError(
                    f"share={config.share!r} puts {member!r} of shape (d_out, d_in)={shape} into group "
                    f"{group!r} of shape {have}; members of a group must have one shape: split the group"
                )
            return
        # Under "svd" these are placeholders, overwritten once every member is known.
        init = "orthogonal" if config.init_factors == "svd" else config.init_factors
        a, b = random_factors(d_out, d_in, config.r, init)
        # Contiguous: QR gives a column-major A, and FSDP2 refuses to shard a non-contiguous parameter.
        shared_a[group] = nn.Parameter(a.to(device).contiguous())
        shared_b[group] = nn.Parameter(b.to(device).contiguous())

    @torch.no_grad()
    def _init_shared_state(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """``init_factors="svd"``: each group's ``A``, ``B`` from the stack of its frozen weights.

        The singular vectors (unit norm) are scaled by :func:`step_matched_scales`, as the random inits.
        """
        if config.init_factors != "svd":
            return
        members: dict[str, list[torch.Tensor]] = {}
        for module in model.modules():
            if isinstance(module, LoTRLayer) and module._has_adapter(adapter_name):
                weight = module.get_base_weight()
                members.setdefault(module.lotr_group[adapter_name], []).append(weight)
        for group, weights in members.items():
            a, b = tucker2_factors(weights, config.r)
            scale_a, scale_b = step_matched_scales(a.shape[0], b.shape[1], config.r)
            a, b = scale_a * a, scale_b * b
            self.lotr_A[adapter_name][group].copy_(a)
            self.lotr_B[adapter_name][group].copy_(b)
