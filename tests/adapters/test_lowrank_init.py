"""adapters.init_from_lowrank: FLoRA and LoTR start exactly at a given ``ΔW = B A``, or refuse.

The reference is dense math: the model with ``W + B A`` in its weights (float64 sum), against which the adapted
model's ``get_delta_weight`` and outputs must agree to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tolerance import assert_close
from torch import nn

import adapters
from adapters import init_from_lowrank


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(24, 24)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.q(x))))


class Stack(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


TARGETS = ["q", "up", "down"]


def _factors(model: nn.Module, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            d_out, d_in = module.weight.shape
            out[name] = (torch.randn(d_out, k), torch.randn(k, d_in) / d_in**0.5)
    return out


def _reference(model: nn.Module, factors) -> nn.Module:
    """The dense model with ``W + B A`` (summed in float64)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, (B, A) in factors.items():
            w = ref.get_submodule(name).weight
            w.copy_(w.double() + B.double() @ A.double())
    return ref


def _check_exact(peft_model, base: nn.Module, factors) -> None:
    for name, (B, A) in factors.items():
        delta = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
        assert_close(delta.double(), B.double() @ A.double(), tol=1e-5, what=f"ΔW of {name}")
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert_close(peft_model(x), _reference(base, factors)(x), what="outputs")


@pytest.mark.parametrize("r", [4, 7])
def test_flora_starts_exactly_at_the_update(r):
    """r = k and r > k (the spare directions get zero core entries) both reproduce B A."""
    model = Stack()
    factors = _factors(model, k=4)
    peft_model = get_peft_model(copy.deepcopy(model), adapters.FloraConfig(r=r, target_modules=TARGETS))
    init_from_lowrank(peft_model, factors)
    _check_exact(peft_model, model, factors)
    for name in factors:
        u_out, u_in = peft_model.base_model.model.get_submodule(name).factors("default")  # in use: μ U_out_stored
        for u in (u_out, u_in):  # orthonormal columns: unit column norms, as FLoRA's N(0, 1/d) init has on average
            assert_close(u.T.double() @ u.double(), torch.eye(r, dtype=torch.float64), tol=1e-6, what="UᵀU")


def test_flora_gets_gradient_in_every_factor_after_init():
    model = Stack()
    factors = _factors(model, k=4)
    peft_model = get_peft_model(copy.deepcopy(model), adapters.FloraConfig(r=4, target_modules=TARGETS))
    init_from_lowrank(peft_model, factors)
    peft_model(torch.randn(5, 24)).pow(2).sum().backward()
    layer = peft_model.base_model.model.layers[0].q
    for p in [layer.flr_core["default"], *layer.flr_factors["default"]]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_flora_rank_below_the_update_rank_refuses():
    model = Stack()
    peft_model = get_peft_model(copy.deepcopy(model), adapters.FloraConfig(r=3, target_modules=TARGETS))
    with pytest.raises(ValueError, match="rank 4, above the adapter's rank 3.*pass r>=4"):
        init_from_lowrank(peft_model, _factors(model, k=4))


def test_lotr_exact_when_the_group_spans_every_member():
    """Members of a group with one shared column and row space: exact at r = k (what LoTR can hold)."""
    model = Stack()
    k = 3
    factors = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for i, (name, module) in enumerate(linears):
        d_out, d_in = module.weight.shape
        torch.manual_seed(d_out * 1000 + d_in)  # the same spaces for every layer of one shape
        col, row = torch.randn(d_out, k), torch.randn(k, d_in)
        torch.manual_seed(i)
        factors[name] = (col @ torch.randn(k, k), torch.randn(k, k) @ row / d_in**0.5)
    peft_model = get_peft_model(copy.deepcopy(model), adapters.LoTRConfig(r=k, target_modules=TARGETS))
    init_from_lowrank(peft_model, factors)
    _check_exact(peft_model, model, factors)


def test_lotr_exact_at_the_stacked_rank_and_refuses_below():
    """Unrelated residuals of M = 3 layers need r = M k; at r < M k no shared A, B hold them all."""
    model = Stack()
    factors = _factors(model, k=2)
    peft_model = get_peft_model(copy.deepcopy(model), adapters.LoTRConfig(r=6, target_modules=TARGETS))
    init_from_lowrank(peft_model, factors)
    _check_exact(peft_model, model, factors)
    small = get_peft_model(copy.deepcopy(model), adapters.LoTRConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"LoTR group .*3 layers sharing A, B.*rank 6, above the adapter's rank 4"):
        init_from_lowrank(small, factors)


def test_members_without_factors_start_at_zero():
    model = Stack()
    factors = {n: f for n, f in _factors(model, k=2).items() if not n.startswith("layers.2.")}
    peft_model = get_peft_model(copy.deepcopy(model), adapters.LoTRConfig(r=6, target_modules=TARGETS))
    init_from_lowrank(peft_model, factors)
    _check_exact(peft_model, model, factors)


@pytest.mark.parametrize("config, why", [
    (adapters.LoRETTARepConfig(r=4, target_modules=TARGETS), "tensor trains"),
    (adapters.MoSConfig(r=4, v=2, p=1, c=4, target_modules=["q"]), "shards"),
])
def test_methods_without_an_exact_projection_say_why(config, why):
    model = Stack()
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with pytest.raises(ValueError, match=why):
        init_from_lowrank(peft_model, _factors(model, k=2))


def test_bad_input_names_the_argument():
    model = Stack()
    factors = _factors(model, k=2)
    with pytest.raises(TypeError, match="peft_model"):
        init_from_lowrank(model, factors)
    peft_model = get_peft_model(copy.deepcopy(model), adapters.FloraConfig(r=2, target_modules=["q"]))
    with pytest.raises(ValueError, match="adapter_name='other'"):
        init_from_lowrank(peft_model, factors, adapter_name="other")
    with pytest.raises(ValueError, match="does not adapt them; add them to target_modules"):
        init_from_lowrank(peft_model, factors)
    B, A = factors["layers.0.q"]
    with pytest.raises(ValueError, match="must be"):
        init_from_lowrank(peft_model, {"layers.0.q": (B, A.T)})
