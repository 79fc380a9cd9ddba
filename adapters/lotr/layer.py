"""LoTR layer: a frozen ``nn.Linear`` plus ``s · A G_m B`` with group-shared ``A``, ``B``.

Stacking the ``M`` updates of a group gives a Tucker-2 tensor of shape ``(d_out, M, d_in)``
with factors ``A: (d_out, r)``, ``Bᵀ: (d_in, r)`` and core ``(r, M, r)`` whose slices are the
private cores ``G_m``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from adapters._delta import ADAPTER_DTYPE, DeltaLayer
from adapters._step_match import lora_input_std, output_factor_std
from adapters.lotr.config import LoTRConfig

if TYPE_CHECKING:
    from adapters.lotr.model import LoTRModel

__all__ = ["LoTRLayer", "group_key", "random_factors", "step_matched_scales", "tucker2_factors"]


def group_key(module_name: str, shape: tuple[int, int], share: str | dict[str, list[str]]) -> str:
    """Name of the group that the layer ``module_name`` of weight shape ``(d_out, d_in)`` joins.

    Parameters
    ----------
    module_name : str
        Full module name, e.g. ``"encoder.layer.3.attention.self.query"``.
    shape : tuple of int
        ``(d_out, d_in)`` of the layer.
    share : str or dict
        ``"suffix"``: the name after the last purely numeric component (the layer index), plus
        the shape: ``"attention_self_query_384x384"``. ``"all"``: the shape only,
        ``"all_384x384"``. A dict ``{group: [suffixes]}``: the group whose suffix matches the
        name (exactly or after a ``"."``); shapes are checked by the caller.

    Returns
    -------
    str
        A key valid in ``nn.ParameterDict`` (no ``"."``).

    Raises
    ------
    ValueError
        If a dict ``share`` has no group for ``module_name``, or more than one.
    """
    d_out, d_in = shape
    if share == "all":
        return f"all_{d_out}x{d_in}"
    if share == "suffix":
        parts = module_name.split(".")
        numeric = [i for i, part in enumerate(parts) if part.isdigit()]
        suffix = parts[numeric[-1] + 1 :] if numeric and numeric[-1] + 1 < len(parts) else parts[-1:]
        return re.sub(r"\W", "_", "_".join(suffix)) + f"_{d_out}x{d_in}"
    matches = [
        group
        for group, suffixes in share.items()
        if any(module_name == s or module_name.endswith("." + s) for s in suffixes)
    ]
    if len(matches) != 1:
        found = "no group" if not matches else f"several groups {matches}"
        raise ValueError(
            f"share={share!r} gives {found} for the target {module_name!r}; list its name suffix under exactly "
            "one group"
        )
    return matches[0]


def step_matched_scales(d_out: int, d_in: int, r: int) -> tuple[float, float]:
    """Multipliers ``(c_A, c_B)`` taking unit-norm factors to the step-matched scale.

    ``A: (d_out, r)`` with unit columns (entries of std ``d_out^{-1/2}``) times ``c_A`` has
    entries of std ``r^{-1/2}``; ``B: (r, d_in)`` with unit rows times ``c_B`` has LoRA's
    ``A`` std ``(3 d_in)^{-1/2}``. LoTR is LoRA with ``B_lora = s A G_m`` and ``A_lora = B``,
    with the zero core ``G_m: (r, r)`` the only part moving at step 0, so by
    :mod:`adapters._step_match` (``q = r' = r``) one Adam step then moves ``B_lora`` by entries of
    ``s lr`` (``sqrt(r) · r^{-1/2} · lr``), as LoRA's ``ΔB``: the same output change at LoRA's
    ``lr`` and ``alpha``, at any width.
    """
    sigma_b = lora_input_std(d_in)
    sigma_a = output_factor_std(r, r, sigma_b, d_in, r)
    return sigma_a * math.sqrt(d_out), sigma_b * math.sqrt(d_in)


def random_factors(
    d_out: int, d_in: int, r: int, init: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random shared factors ``A: (d_out, r)``, ``B: (r, d_in)`` in float32, step-matched.

    ``init="orthogonal"``: orthogonal columns of ``A`` and rows of ``B`` (QR of a Gaussian);
    ``init="normal"``: i.i.d. Gaussian entries. Either way scaled by
    :func:`step_matched_scales`: entries of ``A`` have std ``r^{-1/2}``, those of ``B`` LoRA's
    ``(3 d_in)^{-1/2}``.
    """
    a = torch.randn(d_out, r, generator=generator, dtype=ADAPTER_DTYPE)
    b = torch.randn(d_in, r, generator=generator, dtype=ADAPTER_DTYPE)
    scale_a, scale_b = step_matched_scales(d_out, d_in, r)
    if init == "orthogonal":
        a, b = torch.linalg.qr(a).Q, torch.linalg.qr(b).Q
    else:
        a, b = a / math.sqrt(d_out), b / math.sqrt(d_in)
    return scale_a * a, (scale_b * b).T.contiguous()


def tucker2_factors(weights: Sequence[torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading factors of the Tucker-2 (HOSVD) of the stack ``T[:, m, :] = W_m``.

    Parameters
    ----------
    weights : sequence of Tensor
        ``M`` matrices of shape ``(d_out, d_in)``.
    r : int
        Rank of both factors, ``r <= min(d_out, d_in)``.

    Returns
    -------
    A : Tensor
        ``(d_out, r)``: the leading left singular vectors of the mode-1 unfolding
        ``[W_1, ..., W_M]: (d_out, M d_in)``, i.e. eigenvectors of ``Σ_m W_m W_mᵀ``.
    B : Tensor
        ``(r, d_in)``: the leading left singular vectors of the mode-3 unfolding
        ``[W_1ᵀ, ..., W_Mᵀ]: (d_in, M d_out)``, transposed.

    Notes
    -----
    The Tucker-2 approximation of member ``m`` is ``A C_m B`` with core ``C_m = Aᵀ W_m Bᵀ``
    (shape ``(r, r)``; not its transpose, the reference code's trap). Computed from the two
    Gram matrices in float64: ``O(M d_out d_in (d_out + d_in))`` time, ``O(d²)`` memory.
    """
    gram_out = sum(w.double() @ w.double().T for w in weights)
    gram_in = sum(w.double().T @ w.double() for w in weights)
    # eigh sorts ascending: the leading r are the last r columns.
    a = torch.linalg.eigh(gram_out).eigenvectors[:, -r:].flip(-1)
    b = torch.linalg.eigh(gram_in).eigenvectors[:, -r:].flip(-1)
    return a.to(ADAPTER_DTYPE), b.T.to(ADAPTER_DTYPE).contiguous()


class LoTRLayer(DeltaLayer):
    """``y = x W0ᵀ + b + s · ((x Bᵀ) G_mᵀ) Aᵀ`` for a frozen ``nn.Linear``.

    The private core ``G_m`` lives here (``lotr_core[adapter]``); ``A`` and ``B`` live once on
    the tuner (``lotr_A[adapter][group]``, ``lotr_B[adapter][group]``) and this layer only
    keeps a reference to those containers. Forward cost of the update:
    ``O(N r (d_in + r + d_out))`` for ``N`` rows of ``x``; no ``(d_out, d_in)`` matrix is built.
    """

    adapter_layer_names = ("lotr_core",)
    other_param_names = ("delta_dropout", "lotr_group", "lotr_scale")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoTRConfig, *, current_key: str, tuner: LoTRModel
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.lotr_core = nn.ParameterDict()
        self.lotr_group: dict[str, str] = {}
        self.lotr_scale: dict[str, float] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        # A plain tuple: registering the tuner's containers here would save them once per layer.
        self._lotr_shared = (tuner.lotr_A, tuner.lotr_B)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key, tuner=tuner)

    def update_layer(self, adapter_name: str, config: LoTRConfig, *, current_key: str, tuner: LoTRModel) -> None:
        """Add adapter ``adapter_name``: join (or create) its group and add a zero core ``(r, r)``."""
        d_out, d_in, r = self.out_features, self.in_features, config.r
        if r > min(d_out, d_in):
            raise ValueError(
                f"r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} for layer {current_key!r}; "
                f"pass r<={min(d_out, d_in)} or leave this layer out of target_modules"
            )
        group = group_key(current_key, (d_out, d_in), config.share)
        device = self.get_base_layer().weight.device
        tuner.shared_factors(adapter_name, group, (d_out, d_in), config, device=device, member=current_key)
        self.lotr_group[adapter_name] = group
        self.lotr_scale[adapter_name] = config.alpha / r
        self.lotr_core[adapter_name] = nn.Parameter(torch.zeros(r, r, dtype=ADAPTER_DTYPE, device=device))
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, G_m, B)`` of one adapter: shapes ``(d_out, r)``, ``(r, r)``, ``(r, d_in)``."""
        group = self.lotr_group[adapter_name]
        shared_a, shared_b = self._lotr_shared
        return shared_a[adapter_name][group], self.lotr_core[adapter_name], shared_b[adapter_name][group]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW_m = s · A G_m B``, shape ``(d_out, d_in)``."""
        a, g, b = self.factors(adapter_name)
        return self.lotr_scale[adapter_name] * (a @ (g @ b))

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s · ((x Bᵀ) G_mᵀ) Aᵀ`` for ``x: (..., d_in)``; cost ``O(N r (d_in + r + d_out))``."""
        a, g, b = self.factors(adapter_name)
        h = x.to(g.dtype) @ b.T
        return (h @ (self.lotr_scale[adapter_name] * g.T)) @ a.T

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA factors of ``ΔW_m``: ``(A_lora, B_lora) = (B, s · A G_m)``, in float64.

        Shapes ``(r, d_in)`` and ``(d_out, r)``; ``B_lora A_lora = s · A G_m B = ΔW_m``, rank ``r``.
        """
        a, g, b = (t.detach().double() for t in self.factors(adapter_name))
        return b.clone(), self.lotr_scale[adapter_name] * (a @ g)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` contract: ``ΔW`` is an additive ``(d_out, d_in)`` update of a linear layer."""
        return True

    def __repr__(self) -> str:
        return "lotr." + super().__repr__()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: group={g}" for name, g in self.lotr_group.items())
