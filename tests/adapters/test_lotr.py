"""LoTR-specific checks: grouping, the SVD (Tucker-2) init, parameter counts against the formulas."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import adapters
from adapters._groups import group_key
from adapters.lotr import LoTRLayer, random_factors, shared_a_multiplier, step_matched_scales, tucker2_factors
from tolerance import assert_close


class Stack(nn.Module):
    """``n_layers`` blocks with q / v of shape (d_out, d_in) and a GQA-like k of shape (d_kv, d_in)."""

    def __init__(self, n_layers: int = 12, d: int = 768, d_kv: int | None = None) -> None:
        super().__init__()
        blocks = []
        for _ in range(n_layers):
            block = {"q": nn.Linear(d, d), "v": nn.Linear(d, d)}
            if d_kv is not None:
                block["k"] = nn.Linear(d, d_kv)
            blocks.append(nn.ModuleDict(block))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block[name](x).sum() for block in self.layers for name in ("q", "v"))


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_roberta_base_shaped_q_v_parameter_counts():
    # RoBERTa-base q+v: M = 24 matrices 768x768, r = 8; one group: r (d_in + d_out) + M r^2.
    d, r, m = 768, 8, 24
    shared = get_peft_model(Stack(), adapters.LoTRConfig(r=r, target_modules=["q", "v"], share="all"))
    assert n_trainable(shared) == r * 2 * d + m * r * r == 13_824
    per_suffix = get_peft_model(Stack(), adapters.LoTRConfig(r=r, target_modules=["q", "v"]))
    assert n_trainable(per_suffix) == 2 * r * 2 * d + m * r * r
    lora = get_peft_model(Stack(), LoraConfig(r=r, target_modules=["q", "v"]))
    assert n_trainable(lora) == m * r * 2 * d == 294_912


def test_group_key_suffix_all_and_named():
    assert group_key("encoder.layer.3.attention.self.query", (384, 384), "suffix") == "attention_self_query_384x384"
    assert group_key("layers.0.q", (16, 16), "suffix") == "q_16x16"
    assert group_key("proj", (4, 8), "suffix") == "proj_4x8"
    assert group_key("layers.0.q", (16, 16), "all") == "all_16x16"
    assert group_key("layers.7.self_attn.k_proj", (64, 576), {"kv": ["k_proj", "v_proj"]}) == "kv"


def test_gqa_shapes_get_separate_groups_under_share_all():
    model = get_peft_model(Stack(2, 32, d_kv=8), adapters.LoTRConfig(r=4, target_modules=["q", "v", "k"], share="all"))
    assert sorted(model.base_model.lotr_A["default"].keys()) == ["all_32x32", "all_8x32"]


def test_shared_factors_are_one_tensor_referenced_by_every_member():
    model = get_peft_model(Stack(3, 16), adapters.LoTRConfig(r=4, target_modules=["q"]))
    layers = [m for m in model.modules() if isinstance(m, LoTRLayer)]
    shared = [layer.shared_factors("default") for layer in layers]
    assert len({id(a) for a, _ in shared}) == 1 and len({id(b) for _, b in shared}) == 1
    assert len({id(layer.lotr_core["default"]) for layer in layers}) == 3
    assert len({layer.lotr_multiplier["default"] for layer in layers}) == 1  # one μ for the one shared A


@pytest.mark.parametrize("init", ["orthogonal", "normal"])
def test_random_factors_have_the_step_matched_scales(init):
    # A: entries of std r^-1/2 (column norms sqrt(d_out / r)); B: LoRA's A std (3 d_in)^-1/2 (row norms 3^-1/2).
    torch.manual_seed(0)
    r = 8
    for d_out, d_in in ((64, 96), (1024, 512)):
        a, b = random_factors(d_out, d_in, r, init)
        assert a.shape == (d_out, r) and b.shape == (r, d_in)
        # exact for orthogonal factors, 1 +- O(1/sqrt(d)) relative for normal ones
        tol = 0.3 if init == "normal" else 1e-5
        assert_close(a.norm(dim=0), torch.full((r,), (d_out / r) ** 0.5), tol=tol)
        assert_close(b.norm(dim=1), torch.full((r,), 3**-0.5), tol=tol)
        if init == "orthogonal":
            assert_close(a.T @ a, torch.eye(r) * d_out / r)
            assert_close(b @ b.T, torch.eye(r) / 3)


def test_svd_init_reconstructs_the_stacks_tucker2():
    # A stack that is exactly Tucker-2 of rank r: W_m = A0 C_m B0 with non-symmetric cores.
    torch.manual_seed(0)
    d_out, d_in, r, m = 12, 9, 3, 5
    a0, b0 = torch.randn(d_out, r), torch.randn(r, d_in)
    cores = [torch.randn(r, r) for _ in range(m)]
    weights = [a0 @ c @ b0 for c in cores]
    a, b = tucker2_factors(weights, r)
    assert_close(a.T @ a, torch.eye(r))
    assert_close(b @ b.T, torch.eye(r))
    for w in weights:
        core = a.T @ w @ b.T  # (r, r); its transpose (the reference's trap) would not reconstruct
        assert_close(a @ core @ b, w)
        assert not torch.allclose(a @ core.T @ b, w, atol=1e-2)


def test_svd_init_matches_hosvd_of_the_unfoldings():
    torch.manual_seed(1)
    weights = [torch.randn(10, 7) for _ in range(4)]
    a, b = tucker2_factors(weights, 3)
    u1 = torch.linalg.svd(torch.cat(weights, dim=1)).U[:, :3]
    u3 = torch.linalg.svd(torch.cat([w.T for w in weights], dim=1)).U[:, :3]
    assert_close(a @ a.T, u1 @ u1.T)  # same subspaces
    assert_close(b.T @ b, u3 @ u3.T)


def test_svd_init_in_the_tuner_uses_the_frozen_weights_and_zero_cores():
    torch.manual_seed(0)
    base = Stack(4, 16)
    weights = [block["q"].weight.detach().clone() for block in base.layers]
    model = get_peft_model(base, adapters.LoTRConfig(r=4, target_modules=["q"], init_factors="svd"))
    a_expected, b_expected = tucker2_factors(weights, 4)
    scale_a, scale_b = step_matched_scales(16, 16, 4)  # singular vectors at the step-matched scale
    a_expected, b_expected = scale_a * a_expected, scale_b * b_expected
    shared_a = shared_a_multiplier(16, 4, "lora_rate") * model.base_model.lotr_A["default"]["q_16x16"]  # in use
    shared_b = model.base_model.lotr_B["default"]["q_16x16"]
    assert_close(shared_a.abs(), a_expected.abs())  # eigenvectors up to sign
    assert_close(shared_b.abs(), b_expected.abs())
    assert all(not layer.lotr_core["default"].any() for layer in model.modules() if isinstance(layer, LoTRLayer))


def test_delta_weight_is_scaled_a_g_b():
    torch.manual_seed(0)
    model = get_peft_model(Stack(2, 16), adapters.LoTRConfig(r=4, alpha=2.0, target_modules=["q"]))
    layer = next(m for m in model.modules() if isinstance(m, LoTRLayer))
    with torch.no_grad():
        layer.lotr_core["default"].normal_()
    a, g, b = layer.factors("default")
    assert_close(layer.get_delta_weight("default"), 0.5 * a @ g @ b)
    x = torch.randn(3, 16)
    assert_close(layer.delta_forward(x, "default"), x @ layer.get_delta_weight("default").T)


def test_a_share_group_no_target_joins_warns():
    import adapter_conformance as conf

    share = {"q": ["q"], "v": ["v"], "typo": ["o_prj"]}
    with pytest.warns(UserWarning, match=r"share groups \['typo'\] match no target layer \(suffixes \[\['o_prj'\]\]\)"):
        get_peft_model(conf.MODELS["mlp"].build(), adapters.LoTRConfig(r=2, target_modules=["q", "v"], share=share))
