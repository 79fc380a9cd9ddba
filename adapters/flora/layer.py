"""FLoRA layer: a frozen Linear / Embedding / Conv{1,2,3}d plus a Tucker-format update.

``ΔW = s · G ×_1 U_1 ... ×_K U_K`` over the modes of the base weight. Per layer kind (a registry
keyed by the base module type) the input goes through the factors one mode at a time, without
building ``ΔW``; only convs where the rebuilt ``ΔW`` is cheaper (depthwise) build it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters._delta import ADAPTER_DTYPE, LINEAR_LAYERS, DeltaLayer, LayerPlan, weight_matrix
from adapters._step_match import lora_input_std, lora_rate_multiplier, output_factor_std
from adapters.flora.config import FloraConfig
from tensornets import mode_product, tucker_to_tensor

__all__ = [
    "FloraLayer",
    "SUPPORTED_LAYERS",
    "delta_forward_for",
    "resolve_ranks",
    "step_matched_stds",
]


def resolve_ranks(r: int | list[int], modes: Sequence[int], layer_name: str) -> tuple[int, ...]:
    """Explicit per-mode Tucker ranks for a weight with mode sizes ``modes``.

    An int ``r`` gives ``min(r, d_k)`` for every mode (a Tucker rank cannot exceed its mode: a conv's
    3 x 3 kernel modes keep rank 3 under ``r = 8``), and must fit at least one mode;
    a list must have one entry per mode, each at most that mode's size.

    Raises
    ------
    ValueError
        If an int exceeds every mode, a list has the wrong length or an entry above its mode size.
    """
    if isinstance(r, int):
        if r > max(modes):
            raise ValueError(
                f"r={r} exceeds every mode of layer {layer_name!r} (weight modes {tuple(modes)}): the update would be "
                f"the full weight; pass r<={max(modes)}, or leave the layer out of target_modules"
            )
        return tuple(min(r, d) for d in modes)
    if len(r) != len(modes):
        raise ValueError(
            f"r={r} gives {len(r)} ranks but layer {layer_name!r} has {len(modes)} weight modes {tuple(modes)}; "
            f"pass {len(modes)} ranks or an int"
        )
    for k, (rank, d) in enumerate(zip(r, modes)):
        if rank > d:
            raise ValueError(
                f"r[{k}]={rank} exceeds mode {k} of size {d} for layer {layer_name!r} (weight modes "
                f"{tuple(modes)}); pass r[{k}]<={d}"
            )
    return tuple(r)


def _linear_delta(layer: FloraLayer, x: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]):
    # ΔW = U_out (sG) U_inᵀ: x U_in (sG)ᵀ U_outᵀ, O(N (d_in r_in + r_in r_out + r_out d_out)).
    u_out, u_in = factors
    return ((x.to(core.dtype) @ u_in) @ core.T) @ u_out.T


def _embedding_delta(layer: FloraLayer, x: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]):
    # Row i of ΔW = U_0[i] (sG) U_1ᵀ: a lookup in U_0, then O(N (r_0 r_1 + r_1 d)).
    u_rows, u_dim = factors
    out = (F.embedding(x, u_rows) @ core) @ u_dim.T
    embed_scale = layer._get_embed_scale()
    return out if embed_scale is None else out * embed_scale.to(out.dtype)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_delta(layer: FloraLayer, x: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]):
    """``Δ * x`` for a conv, by whichever of two exact forms costs fewer multiply-adds.

    - factorized (:func:`_conv_delta_factorized`): three convs, per output pixel about
      ``C_in r_in + g r_out r_in ∏k + C_out r_out``;
    - dense (:func:`_conv_delta_dense`): build ``ΔW`` once (``numel(ΔW) · r_out``), then one conv of
      ``C_out (C_in / g) ∏k`` per output pixel.

    Pointwise and ordinary convs take the factorized form; depthwise convs (``C_in / g = 1``) the
    dense one, which there costs ~``r_out r_in`` times fewer FLOPs per output pixel (the factorized
    form's middle conv alone does ``r_out r_in ∏k`` per pixel and group, against ``∏k`` for one
    depthwise conv of the built ``ΔW``).
    """
    base = layer.get_base_layer()
    c_out, c_in_group, *kernel_size = base.weight.shape
    g, k = base.groups, math.prod(kernel_size)
    r_out, r_in = core.shape[:2]
    pixels_in = x.numel() // (c_in_group * g)  # batched (N, C, ...) or unbatched (C, ...)
    pixels_out = max(1, pixels_in // math.prod(base.stride))  # ConvNd stores stride as a tuple
    factorized = pixels_in * c_in_group * g * r_in + pixels_out * (g * r_out * r_in * k + c_out * r_out)
    dense = c_out * c_in_group * k * r_out + pixels_out * c_out * c_in_group * k
    if dense < factorized:
        return _conv_delta_dense(layer, x, core, factors)
    return _conv_delta_factorized(layer, x, core, factors)


def _conv_delta_dense(layer: FloraLayer, x: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]):
    """``conv(x, ΔW)`` with ``ΔW`` rebuilt from the factors and the base conv's geometry (padding mode included)."""
    base = layer.get_base_layer()
    return base._conv_forward(x.to(core.dtype), tucker_to_tensor(core, factors), None)


def _conv_delta_factorized(layer: FloraLayer, x: torch.Tensor, core: torch.Tensor, factors: list[torch.Tensor]):
    """Grouped conv ``Δ * x`` as three convs: 1x1 (``U_in``), k×k (folded core), 1x1 (``U_out``).

    With ``g`` groups, ``ΔW[o, c, κ] = Σ_ab U_out[o, a] U_in[c, b] K[a, b, κ]`` where the folded
    core ``K = sG ×_3 U_k1 ...: (r_out, r_in, k_1, ...)``. Every group shares ``U_in`` and ``K``,
    so steps 1-2 are grouped convs with those weights repeated ``g`` times and step 3 is a
    grouped 1x1 conv with ``U_out``. Cost per output pixel: ``C_in r_in`` (at input pixels) +
    ``g r_out r_in ∏k`` + ``C_out r_out``, versus ``C_out (C_in / g) ∏k`` for the base conv.
    Stride, padding (any padding mode: it commutes with the 1x1 convs) and dilation are the
    base conv's.
    """
    base = layer.get_base_layer()
    u_out, u_in, *u_space = factors
    n, g = len(u_space), base.groups
    conv = _CONV_FN[n]
    ones = (1,) * n
    kernel = core
    for j, u in enumerate(u_space):
        kernel = mode_product(kernel, u, 2 + j)
    r_out, r_in = kernel.shape[:2]
    z = conv(x.to(core.dtype), u_in.T.repeat(g, 1).reshape(g * r_in, -1, *ones), groups=g)
    padding = base.padding
    if base.padding_mode != "zeros":
        z = F.pad(z, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    kernel = kernel.repeat(g, *(1,) * (n + 1))
    z = conv(z, kernel, stride=base.stride, padding=padding, dilation=base.dilation, groups=g)
    return conv(z, u_out.reshape(-1, r_out, *ones), groups=g)


def step_matched_stds(modes: Sequence[int], ranks: Sequence[int], r: int) -> list[float]:
    """Entry stds of the factors ``U_k: (d_k, r_k)`` that make FLoRA's first steps move like LoRA's.

    On a weight with modes ``(d_out, d_in, k_1, ...)`` FLoRA is LoRA with
    ``B_lora = s U_1 G_(1)`` and ``A_lora = (U_2 ⊗ U_3 ⊗ ...)ᵀ`` (``r' = r_2 r_3 ⋯`` rows).
    ``U_2`` gets LoRA's ``A`` std ``(3 d_in)^{-1/2}`` and the kernel modes ``d_k^{-1/2}``, so
    ``A_lora`` has LoRA's entry std ``(3 fan_in)^{-1/2}`` (``fan_in = d_in k_1 ⋯``) and moves,
    relative to its size, as fast as LoRA's ``A`` under Adam. At step 0 only the zero core moves
    (``±lr`` per entry); :func:`adapters._step_match.output_factor_std` with ``q = r_1`` gives
    ``U_1``'s std ``σ_1 = r / (sqrt(r_1) r')`` for which the output then moves as LoRA rank
    ``r`` does at the same ``s = alpha / r``: ``r^{-1/2}`` on a linear layer (0.35 at r = 8).
    Unit-norm factors (FLoRA's earlier default) moved it ``sqrt(3 r / d_out)`` times as fast
    at the first step (0.25x at d = 384) and fell further behind after.
    """
    fan_in = math.prod(modes[1:])
    input_stds = [lora_input_std(modes[1])] + [d**-0.5 for d in modes[2:]]
    input_std = math.prod(input_stds)
    return [output_factor_std(ranks[0], math.prod(ranks[1:]), input_std, fan_in, r), *input_stds]


DeltaForward = Callable[["FloraLayer", torch.Tensor, torch.Tensor, list], torch.Tensor]

#: Base layer types FLoRA adapts, each with its factorized forward (the registry the layer dispatches on).
SUPPORTED_LAYERS: dict[type[nn.Module], DeltaForward] = {
    nn.Linear: _linear_delta,
    Conv1D: _linear_delta,  # GPT-2's projections: the factors are those of the (out, in) matrix, as for nn.Linear
    nn.Embedding: _embedding_delta,
    nn.Conv1d: _conv_delta,
    nn.Conv2d: _conv_delta,
    nn.Conv3d: _conv_delta,
}


def delta_forward_for(base_layer: nn.Module) -> DeltaForward | None:
    """The factorized forward for ``base_layer``'s type or its nearest registered base class."""
    return next((SUPPORTED_LAYERS[cls] for cls in type(base_layer).__mro__ if cls in SUPPORTED_LAYERS), None)


class FloraLayer(DeltaLayer):
    """A frozen Linear / Embedding / Conv{1,2,3}d plus ``s · G ×_1 U_1 ... ×_K U_K``.

    Holds ``flr_core[adapter]: (r_1, ..., r_K)`` and ``flr_factors[adapter][k]: (d_k, r_k)``; the
    first factor is used as ``μ U_1`` with a fixed multiplier ``μ`` derived from the shapes
    (``flr_multiplier[adapter]``, 1 unless ``init_weights="lora_rate"`` on a linear or conv
    layer; never saved: :meth:`update_layer`), the others as stored (:meth:`factors`).
    Forward cost of the update for ``N`` rows (pixels for convs): linear
    ``O(N (d_in r_in + r_in r_out + r_out d_out))``; embedding ``O(N (r_0 r_1 + r_1 d))``;
    conv see :func:`_conv_delta`.
    """

    adapter_layer_names = ("flr_core", "flr_factors")
    other_param_names = ("delta_dropout", "flr_scale", "flr_multiplier")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: FloraConfig,
        *,
        current_key: str,
        plan: Optional[LayerPlan] = None,
    ) -> None:
        super().__init__()
        self._init_delta_layer(base_layer)
        self.flr_core = nn.ParameterDict()
        self.flr_factors = nn.ModuleDict()
        self.flr_scale: dict[str, float] = {}
        self.flr_multiplier: dict[str, float] = {}
        self._delta_forward = delta_forward_for(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key=current_key)

    def update_layer(self, adapter_name: str, config: FloraConfig, *, current_key: str, **_: object) -> None:
        """Add adapter ``adapter_name``: zero core, Gaussian factors at the step-matched scale.

        Gaussian factors of stds :func:`step_matched_stds`. Embeddings (their input is a lookup,
        not a matmul) keep ``N(0, 1/d_k)`` for both factors. With ``init_weights="lora_rate"`` a
        linear or conv layer stores ``U_1`` at LoRA's ``A`` std ``σ_A = (3 fan_in)^{-1/2}`` (the
        same draw divided by ``μ = σ_1 / σ_A``, :func:`adapters._step_match.lora_rate_multiplier`)
        and uses ``μ U_1``: the same ``ΔW`` and first step, with ``U_1`` moving by ``lr / σ_A`` of
        its size per Adam step, as LoRA's ``A``.
        """
        base = self.get_base_layer()
        weight = weight_matrix(base)  # (out, in) for a Conv1D too; convs and embeddings as stored
        modes = tuple(weight.shape)
        ranks = resolve_ranks(config.r, modes, current_key)
        device = weight.device
        multiplier = 1.0
        if isinstance(base, nn.Embedding):
            stds = [d**-0.5 for d in modes]
        else:
            stds = step_matched_stds(modes, ranks, config.reference_rank)
            if config.init_weights == "lora_rate":
                multiplier = lora_rate_multiplier(stds[0], math.prod(modes[1:]))
        stored_stds = [stds[0] / multiplier, *stds[1:]]
        self.flr_core[adapter_name] = nn.Parameter(torch.zeros(ranks, dtype=ADAPTER_DTYPE, device=device))
        self.flr_factors[adapter_name] = nn.ParameterList(
            nn.Parameter(std * torch.randn(d, r, dtype=ADAPTER_DTYPE, device=device))
            for d, r, std in zip(modes, ranks, stored_stds)
        )
        self.flr_multiplier[adapter_name] = multiplier
        scale = config.scale if config.scale is not None else config.alpha / config.reference_rank
        self.flr_scale[adapter_name] = scale
        self._set_dropout(adapter_name, config.dropout)
        self.set_adapter(self.active_adapters)

    def factors(self, adapter_name: str) -> list[torch.Tensor]:
        """The factors in use, ``[μ U_1_stored, U_2, ..., U_K]``, shapes ``(d_k, r_k)``."""
        first, *rest = self.flr_factors[adapter_name]
        multiplier = self.flr_multiplier[adapter_name]
        return [first if multiplier == 1.0 else multiplier * first, *rest]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s · G ×_1 U_1 ... ×_K U_K``, the base weight's shape, in the adapter's dtype."""
        core = self.flr_scale[adapter_name] * self.flr_core[adapter_name]
        return tucker_to_tensor(core, self.factors(adapter_name))

    def delta_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        core = self.flr_scale[adapter_name] * self.flr_core[adapter_name]
        return self._delta_forward(self, x, core, self.factors(adapter_name))

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact rank-``R`` factors of ``ΔW`` unfolded along its first mode, in float64.

        Returns ``(A, B)`` with ``A: (R, d_2, ..., d_K)``, ``B: (d_1, R)`` and
        ``ΔW = tensordot(B, A, 1)``, i.e. ``ΔW_(1) = B A_(1)`` for the mode-1 unfoldings. The
        unfolding of a Tucker tensor is ``U_1 (sG)_(1) (U_K ⊗ ... ⊗ U_2)ᵀ``, of rank at most
        ``R = min(r_1, r_2 ⋯ r_K)``:

        - ``r_1 <= r_2 ⋯ r_K``: ``B = U_1`` and ``A = sG ×_2 U_2 ... ×_K U_K``
          (a linear layer: ``A = sG U_2ᵀ``);
        - otherwise ``B = U_1 (sG)_(1)`` and ``A = I ×_2 U_2 ... ×_K U_K`` with ``I`` the identity
          of size ``r_2 ⋯ r_K`` reshaped to ``(R, r_2, ..., r_K)``.
        """
        core = self.flr_scale[adapter_name] * self.flr_core[adapter_name].detach().double()
        u_first, *u_rest = (u.detach().double() for u in self.factors(adapter_name))
        r_first, rest = core.shape[0], core.shape[1:]
        rest_size = math.prod(rest)
        if r_first <= rest_size:
            b, mixer = u_first, core
        else:
            b = u_first @ core.reshape(r_first, rest_size)
            mixer = torch.eye(rest_size, dtype=core.dtype, device=core.device).reshape(rest_size, *rest)
        eye = torch.eye(mixer.shape[0], dtype=core.dtype, device=core.device)
        return tucker_to_tensor(mixer, [eye, *u_rest]), b

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's ``convert_to_lora`` contract, met on linear layers only.

        ``convert_to_lora`` takes the SVD of ``get_delta_weight`` as a matrix and writes
        ``lora_A.weight`` / ``lora_B.weight``: right for an ``nn.Linear``, wrong for an embedding
        (PEFT's embedding LoRA keys differ) and a conv (a 4-d ``ΔW``). :func:`adapters.to_lora`
        exports all three exactly.
        """
        return isinstance(self.get_base_layer(), LINEAR_LAYERS)

    def __repr__(self) -> str:
        return "flora." + super().__repr__()
