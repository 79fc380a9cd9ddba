"""LoTR's shared factors of a group at init: random at the step-matched scale, or the Tucker-2 of the group.

Stacking the ``M`` updates ``ΔW_m = s · A G_m B`` of a group gives a Tucker-2 tensor of shape
``(d_out, M, d_in)`` with factors ``A: (d_out, r)``, ``Bᵀ: (d_in, r)`` and core ``(r, M, r)`` whose slices are
the private cores ``G_m``; ``init_factors="svd"`` starts ``A``, ``B`` at the leading factors of that
decomposition of the group's frozen weights (:func:`tensornets.stack_tucker2`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

import tensornets
from adapters._delta import ADAPTER_DTYPE
from adapters._step_match import lora_input_std, lora_rate_multiplier, output_factor_std

__all__ = ["random_factors", "shared_a_multiplier", "step_matched_scales", "tucker2_factors"]


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


def shared_a_multiplier(d_in: int, r: int, init_weights: str) -> float:
    """The fixed multiplier ``μ`` of a group's stored ``A`` (``A = μ A_stored``), from the group's shape.

    ``init_weights="lora_rate"``: ``A``'s step-matched std ``σ_P = r^{-1/2}`` over LoRA's ``A``
    std ``σ_A = (3 d_in)^{-1/2}``, i.e. ``μ = sqrt(3 d_in / r)``
    (:func:`adapters._step_match.lora_rate_multiplier`): ``A_stored`` has entries of std ``σ_A``
    and Adam moves it by ``lr / σ_A`` of its size per step, as LoRA's ``A``. ``"plain"``: 1.
    Every member of a group has the group's ``(d_out, d_in)``, so all of them compute the same
    ``μ`` for the one shared ``A``.
    """
    if init_weights == "plain":
        return 1.0
    sigma_b = lora_input_std(d_in)
    return lora_rate_multiplier(output_factor_std(r, r, sigma_b, d_in, r), d_in)


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
    """Leading factors of the Tucker-2 (HOSVD) of the stack ``T[:, m, :] = W_m``, in LoTR's orientation.

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
        ``[W_1, ..., W_M]: (d_out, M d_in)``.
    B : Tensor
        ``(r, d_in)``: the leading left singular vectors of the mode-3 unfolding
        ``[W_1ᵀ, ..., W_Mᵀ]: (d_in, M d_out)``, transposed.

    Notes
    -----
    :func:`tensornets.stack_tucker2` (float64, from the two Gram matrices, never the stack), cast to float32.
    The Tucker-2 approximation of member ``m`` is ``A C_m B`` with core ``C_m = Aᵀ W_m Bᵀ`` (shape ``(r, r)``;
    not its transpose, the reference code's trap).
    """
    a, _, v = tensornets.stack_tucker2(weights, r)
    return a.to(ADAPTER_DTYPE), v.T.to(ADAPTER_DTYPE).contiguous()
