"""FLoRA-specific checks: the factorized forwards against dense math, ranks, scales, counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import adapters
from adapters.flora import FloraLayer, resolve_ranks
from adapters.flora import layer as flora_layer
from adapters.flora.layer import _conv_delta_dense, _conv_delta_factorized
from tensornets import tucker_to_tensor
from tolerance import assert_close

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def adapted_layer(base: nn.Module, **config) -> FloraLayer:
    torch.manual_seed(0)
    holder = nn.Sequential(base)
    model = get_peft_model(holder, adapters.FloraConfig(target_modules=["0"], **config))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.flr_core["default"].normal_()
    return layer


def dense_conv(base: nn.Conv1d | nn.Conv2d | nn.Conv3d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    conv = _CONV[weight.dim() - 2]
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return conv(x, weight, None, base.stride, 0, base.dilation, base.groups)
    return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


CONVS = {
    "conv1d": lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2, dilation=1),
    "conv2d": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv2d-grouped": lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3),
    "conv2d-depthwise": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
    "conv2d-depthwise-multiplier": lambda: nn.Conv2d(6, 12, (3, 5), padding=(1, 2), groups=6),
    "conv2d-circular-dilated": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2, padding_mode="circular"),
    "conv2d-same": lambda: nn.Conv2d(6, 8, 4, padding="same"),
    "conv3d-grouped": lambda: nn.Conv3d(4, 6, (2, 3, 3), padding=(0, 1, 1), groups=2),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_factorized_forward_matches_dense_delta(name):
    base = CONVS[name]()
    layer = adapted_layer(base, r=3)  # with a non-zero core
    x = torch.randn(2, base.in_channels, *[9] * (base.weight.dim() - 2))
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape
    expected = dense_conv(base, delta, x)
    assert_close(layer.delta_forward(x, "default"), expected)
    assert_close(layer(x), base(x) + expected)
    # both exact forms the layer chooses between, and their gradients
    factors = layer.factors("default")  # in use: μ U_out, U_in, ...
    grads = []
    for form in (_conv_delta_factorized, _conv_delta_dense):
        out = form(layer, x, layer.flr_scale["default"] * layer.flr_core["default"], factors)
        assert_close(out, expected)
        grads.append(torch.autograd.grad(out.square().sum(), [layer.flr_core["default"], *factors]))
    for a, b in zip(*grads):
        assert_close(a, b)


def test_conv_form_follows_the_multiply_add_count(monkeypatch):
    calls = []
    for name in ("_conv_delta_factorized", "_conv_delta_dense"):
        original = getattr(flora_layer, name)
        monkeypatch.setattr(flora_layer, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    # depthwise 3x3 on 32 channels: three convs cost ~r_out r_in more than one conv with the small ΔW
    depthwise = adapted_layer(nn.Conv2d(32, 32, 3, padding=1, groups=32), r=4)
    depthwise(torch.randn(2, 32, 16, 16))
    # pointwise 64 -> 64 at r = 4: x U_in, then U_out, is 8x fewer multiply-adds than the dense 1x1 conv
    pointwise = adapted_layer(nn.Conv2d(64, 64, 1), r=4)
    pointwise(torch.randn(2, 64, 16, 16))
    assert calls == ["_conv_delta_dense", "_conv_delta_factorized"]


def test_depthwise_in_mode_has_rank_one():
    layer = adapted_layer(nn.Conv2d(6, 6, 3, groups=6), r=4)
    assert layer.flr_core["default"].shape == (4, 1, 3, 3)
    assert [tuple(u.shape) for u in layer.flr_factors["default"]] == [(6, 4), (1, 1), (3, 3), (3, 3)]


def test_linear_and_embedding_forward_match_dense_delta():
    linear = adapted_layer(nn.Linear(10, 7), r=[3, 4])
    x = torch.randn(5, 10)
    assert_close(linear.delta_forward(x, "default"), x @ linear.get_delta_weight("default").T)
    embedding = adapted_layer(nn.Embedding(30, 6), r=4)
    ids = torch.randint(0, 30, (3, 4))
    assert_close(embedding.delta_forward(ids, "default"), embedding.get_delta_weight("default")[ids])


def test_delta_weight_is_the_tucker_tensor():
    layer = adapted_layer(nn.Conv2d(6, 8, 3), r=[4, 3, 2, 2], alpha=6.0)
    core, (u0, u1, u2, u3) = layer.flr_core["default"], layer.factors("default")
    expected = 6.0 / 4 * torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, u0, u1, u2, u3)
    assert_close(layer.get_delta_weight("default"), expected)
    assert_close(tucker_to_tensor(core, [u0, u1, u2, u3]), expected / 1.5)


def test_scale_overrides_alpha_over_r():
    assert adapted_layer(nn.Linear(8, 8), r=4, alpha=16.0).flr_scale["default"] == 4.0
    assert adapted_layer(nn.Linear(8, 8), r=4, alpha=16.0, scale=0.5).flr_scale["default"] == 0.5
    # with one rank per mode, r of alpha / r is the largest of them
    assert adapters.FloraConfig(r=[6, 2]).reference_rank == 6 and adapters.FloraConfig(r=4).reference_rank == 4
    assert adapted_layer(nn.Linear(8, 8), r=[6, 2], alpha=12.0).flr_scale["default"] == 2.0


def test_init_zero_core_and_step_matched_factors():
    layer = adapted_layer(nn.Linear(2048, 1024), r=8)
    torch.manual_seed(0)
    fresh = get_peft_model(nn.Sequential(nn.Linear(2048, 1024)), adapters.FloraConfig(r=8, target_modules=["0"]))
    fresh_layer = fresh.base_model.model[0]
    assert not fresh_layer.flr_core["default"].any()
    u_out, u_in = fresh_layer.factors("default")
    # U_out entries of std r^-1/2, U_in LoRA's A std (3 d_in)^-1/2; random: 1 +- O(1/sqrt(d)) relative
    assert_close(u_out.norm(dim=0), torch.full((8,), (1024 / 8) ** 0.5), tol=0.1)
    assert_close(u_in.norm(dim=0), torch.full((8,), 3**-0.5), tol=0.1)
    # stored (default init_weights="lora_rate"): U_out at LoRA's A std too, times μ = sqrt(3 d_in / r) in use
    stored_out = fresh_layer.flr_factors["default"][0]
    assert fresh_layer.flr_multiplier["default"] == pytest.approx((3 * 2048 / 8) ** 0.5, rel=1e-12)
    assert_close(stored_out.norm(dim=0), torch.full((8,), (1024 / (3 * 2048)) ** 0.5), tol=0.1)
    assert layer.flr_core["default"].shape == (8, 8)


def test_parameter_count_matches_formula():
    model = get_peft_model(
        nn.Sequential(nn.Conv2d(16, 32, 3, groups=4), nn.Linear(64, 48)),
        adapters.FloraConfig(r=[8, 4, 2, 2], target_modules=["0"]),
    )
    # core r1 r2 r3 r4 + sum d_k r_k with the in-mode C_in / groups = 4
    expected = 8 * 4 * 2 * 2 + 32 * 8 + 4 * 4 + 3 * 2 + 3 * 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_resolve_ranks():
    assert resolve_ranks(8, (64, 1, 3, 3), "x") == (8, 1, 3, 3)
    assert resolve_ranks([16, 16, 2, 2], (64, 32, 3, 3), "x") == (16, 16, 2, 2)
    with pytest.raises(ValueError, match=r"r\[2\]=4 exceeds mode 2 of size 3 for layer 'conv'"):
        resolve_ranks([2, 2, 4, 2], (8, 8, 3, 3), "conv")
    # an int that fits no mode was capped to the full weight, with the scale still alpha / r
    assert resolve_ranks(64, (64, 32), "x") == (64, 32)
    with pytest.raises(ValueError, match=r"r=1000 exceeds every mode of layer 'fc' \(weight modes \(128, 64\)\)"):
        resolve_ranks(1000, (128, 64), "fc")


def test_the_wrapped_layers_geometry_stays_readable():
    # Whisper's encoder reads conv1.stride: a FLoRA-wrapped conv raised AttributeError
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=1)
            self.embed = nn.Embedding(10, 4)

        def forward(self, ids):
            x = self.embed(ids).transpose(1, 2)
            assert self.conv.stride == (2,) and self.embed.num_embeddings == 10
            return self.conv(x)

    torch.manual_seed(0)
    model = get_peft_model(Owner(), adapters.FloraConfig(r=2, target_modules=["conv", "embed"]))
    layer = model.base_model.model.conv
    assert (layer.stride, layer.padding, layer.kernel_size, layer.in_channels) == ((2,), (1,), (3,), 4)
    assert model(torch.randint(0, 10, (2, 8))).shape == (2, 6, 4)
    with pytest.raises(AttributeError):
        layer._hf_hook  # only the geometry is forwarded, not the base layer's hooks
