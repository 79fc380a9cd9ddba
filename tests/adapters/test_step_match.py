"""Every method's defaults move the adapted layers like PEFT's default LoRA at the same learning rate.

The muP idea applied to adapters (``adapters/_step_match.py``): after a few Adam steps at one lr
from the same seed and data, the change each method makes to the adapted layers' outputs,
relative to their inputs, is within 0.5-2x of ``LoraConfig(r=8)``'s. The unit-norm factor
inits used before (LoTR, FLoRA, LoRETTA-rep: 0.2-0.3x at width 384, ~5x too slow) and the
earlier LoRETTA-adp init (~4x too fast: it diverged at LoRA's lr) fail this.
"""

from __future__ import annotations

import copy
import json
from typing import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import adapters
from adapters.loretta import LoRETTAAdpLayer
from tolerance import assert_close, assert_close_relative

WIDTH, LAYERS, STEPS, LR = 384, 8, 3, 1e-3


class Blocks(nn.Module):
    """``LAYERS`` residual blocks ``x + tanh(query(x)) * value(x) / 2`` of width 384, orthogonal weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(WIDTH, WIDTH), "value": nn.Linear(WIDTH, WIDTH)}) for _ in range(LAYERS)
        )
        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                nn.init.orthogonal_(linear.weight)  # ‖h‖ = ‖x‖: LoRETTA-adp's input (h) is as large as the others' (x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + torch.tanh(block["query"](x)) * block["value"](x) / 2
        return x


QV = ["query", "value"]
METHODS: dict[str, Callable[[], object]] = {
    "lotr": lambda: adapters.LoTRConfig(target_modules=QV),
    "flora": lambda: adapters.FloraConfig(target_modules=QV),
    "loretta-rep": lambda: adapters.LoRETTARepConfig(target_modules=QV, dropout=0.0),
    "loretta-adp": lambda: adapters.LoRETTAAdpConfig(target_modules=QV),
    "mos": lambda: adapters.MoSConfig(target_modules=QV, dropout=0.0),  # defaults r=16, v=4, p=2 need L >= 7
}


def relative_update(make_config: Callable[[], object]) -> float:
    """``sqrt(Σ‖update‖² / Σ‖input‖²)`` over the adapted layers after ``STEPS`` Adam steps at ``LR``.

    ``update`` = adapted layer output minus base layer output; ``input`` = what the update
    reads: the layer input ``x``, or for LoRETTA-adp (a bottleneck on the output) ``h = base(x)``.
    """
    torch.manual_seed(0)
    model = get_peft_model(Blocks(), make_config())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, WIDTH, generator=g)
    labels = torch.randint(0, 4, (64,), generator=g)
    head = torch.randn(4, WIDTH, generator=g) / WIDTH**0.5
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x) @ head.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: inputs.__setitem__(n, args[0])) for n, m in layers.items()]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        update = reads = 0.0
        for name, layer in layers.items():
            base_out = layer.get_base_layer()(inputs[name])
            update += (layer(inputs[name]) - base_out).double().norm() ** 2
            read = base_out if isinstance(layer, LoRETTAAdpLayer) else inputs[name]
            reads += read.double().norm() ** 2
    return float((update / reads) ** 0.5)


@pytest.fixture(scope="module")
def lora_update() -> float:
    return relative_update(lambda: LoraConfig(r=8, target_modules=QV))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_move_like_lora_at_the_same_lr(method, lora_update):
    ratio = relative_update(METHODS[method]) / lora_update
    assert 0.5 <= ratio <= 2.0, f"{method}: {STEPS} Adam steps at lr {LR} move the adapted layers {ratio:.2f}x LoRA's"


# --- init_weights="lora_rate": the output factor *learns* at LoRA's rate (adapters/_step_match.py) ---------------


class Single(nn.Module):
    """One adapted layer ``q`` (the test layer) in a module PEFT can wrap."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.q = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def adapted(layer: nn.Module, config: object, seed: int = 0) -> PeftModel:
    """``layer`` wrapped by ``config``'s adapter (targeting ``q``), drawn from ``seed``; the layer is ``.q``."""
    torch.manual_seed(seed)
    return get_peft_model(Single(layer), config)


def q(model: PeftModel) -> nn.Module:
    return model.base_model.model.q


#: case -> (base layer, config maker, the stored output factor of a model: LoTR's shared A, FLoRA's U_out).
RATE_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[..., object], Callable[[PeftModel], torch.Tensor]]] = {
    "lotr": (lambda: nn.Linear(WIDTH, WIDTH), lambda **kw: adapters.LoTRConfig(target_modules=["q"], **kw),
             lambda model: q(model).shared_factors("default")[0]),
    "flora-linear": (lambda: nn.Linear(WIDTH, WIDTH), lambda **kw: adapters.FloraConfig(target_modules=["q"], **kw),
                     lambda model: q(model).flr_factors["default"][0]),
    "flora-conv": (lambda: nn.Conv2d(32, 32, 3, padding=1),
                   lambda **kw: adapters.FloraConfig(target_modules=["q"], **kw),
                   lambda model: q(model).flr_factors["default"][0]),
}


def multiplier_of(layer: nn.Module) -> float:
    return layer.lotr_multiplier["default"] if hasattr(layer, "lotr_multiplier") else layer.flr_multiplier["default"]


def input_of(model: PeftModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(q(model).get_base_layer(), nn.Conv2d):
        return torch.randn(8, 32, 6, 6, generator=g)
    return torch.randn(64, WIDTH, generator=g)


@pytest.mark.parametrize("case", ["lotr", "flora-linear"])
def test_lora_rate_init_is_the_plain_init_reparametrized(case):
    # Same draw: μ times the stored output factor is the plain init's factor, μ = sqrt(3 d_in / r) written out,
    # every other tensor identical, and ΔW and the forward the same (float32 rounding of μ · P_stored).
    make_base, make_config, output_factor = RATE_CASES[case]
    plain = adapted(make_base(), make_config(init_weights="plain"))
    rate = adapted(make_base(), make_config())
    mu = (3 * WIDTH / 8) ** 0.5
    assert multiplier_of(q(plain)) == 1.0 and multiplier_of(q(rate)) == pytest.approx(mu, rel=1e-12)
    assert_close(mu * output_factor(rate), output_factor(plain))
    assert abs(output_factor(rate).std().item() * (3 * WIDTH) ** 0.5 - 1) < 0.05  # stored at LoRA's A std
    others_plain = [p for p in plain.parameters() if p.requires_grad and p is not output_factor(plain)]
    others_rate = [p for p in rate.parameters() if p.requires_grad and p is not output_factor(rate)]
    assert len(others_plain) == len(others_rate) and all(map(torch.equal, others_plain, others_rate))
    with torch.no_grad():
        for model in (plain, rate):
            torch.manual_seed(2)
            layer = q(model)
            (layer.lotr_core if case == "lotr" else layer.flr_core)["default"].normal_()
    x = input_of(plain)
    assert_close(q(rate).get_delta_weight("default"), q(plain).get_delta_weight("default"))
    assert_close(q(rate).delta_forward(x, "default"), q(plain).delta_forward(x, "default"))


def adam_relative_changes(module: torch.nn.Module, params: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                          steps: int = 2, lr: float = 1e-3) -> list[float]:
    """``‖Δθ‖ / ‖θ‖`` of each of ``params`` after ``steps`` Adam steps (all trainable parameters of ``module``) on
    the regression ``module(x) ≈ target``."""
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = (module(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [float((p.detach() - b).norm() / b.norm()) for p, b in zip(params, before)]


def relative_changes(model: PeftModel, params: list[torch.Tensor], steps: int = 2, lr: float = 1e-3) -> list[float]:
    """:func:`adam_relative_changes` on a random regression through ``model``."""
    x = input_of(model)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(2))
    return adam_relative_changes(model, params, x, target, steps, lr)


@pytest.mark.parametrize(
    "case, init_weights, low, high",
    [("lotr", "lora_rate", 0.5, 2.0), ("lotr", "plain", 0.0, 0.2), ("flora-linear", "lora_rate", 0.5, 2.0),
     ("flora-linear", "plain", 0.0, 0.2), ("flora-conv", "lora_rate", 0.5, 2.0)],
)
def test_output_factor_learns_at_loras_rate(case, init_weights, low, high):
    # LoRA's A moves by ~lr / σ_A of its size per Adam step. With init_weights="lora_rate" the stored output
    # factor (LoTR's shared A, FLoRA's U_out) does too; stored at its own std r^-1/2 ("plain") it is
    # σ_A sqrt(r) = sqrt(r / (3 d_in)) (0.08x at d_in = 384) as fast. (On the conv, whose U_out std r / (sqrt(r_1)
    # r_in r_kh r_kw) is near σ_A already, the multiplier is ~1.2: only the default is checked.)
    make_base, make_config, output_factor = RATE_CASES[case]
    lora = adapted(make_base(), LoraConfig(r=8, target_modules=["q"]))
    (lora_change,) = relative_changes(lora, [q(lora).lora_A["default"].weight])
    layer = adapted(make_base(), make_config(init_weights=init_weights))
    (change,) = relative_changes(layer, [output_factor(layer)])
    assert low <= change / lora_change <= high, (case, init_weights, change, lora_change)


@pytest.mark.parametrize("case", ["lotr", "flora-linear"])
def test_a_checkpoint_saved_before_init_weights_reloads_bitwise(case, tmp_path):
    # Checkpoints of the earlier default have no init_weights in adapter_config.json and store the output factor
    # at its own std: they must load as "plain" (no multiplier), not as today's default.
    make_base, make_config, _ = RATE_CASES[case]
    torch.manual_seed(0)
    base = make_base()
    model = get_peft_model(Single(copy.deepcopy(base)), make_config(init_weights="plain"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = input_of(model)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["init_weights"]  # as written before the field existed
    config_path.write_text(json.dumps(saved))
    reloaded = PeftModel.from_pretrained(Single(copy.deepcopy(base)), str(tmp_path))
    assert reloaded.peft_config["default"].init_weights == "plain"
    assert multiplier_of(q(reloaded)) == 1.0
    assert torch.equal(reloaded(x), expected)


FP16_CASES: dict[str, Callable[[], object]] = {
    "lotr": lambda: adapters.LoTRConfig(target_modules=["q"]),
    "flora": lambda: adapters.FloraConfig(target_modules=["q"]),
    "loretta-rep": lambda: adapters.LoRETTARepConfig(target_modules=["q"], dropout=0.0),
}


@pytest.mark.parametrize("method", sorted(FP16_CASES))
def test_float16_autocast_forward_matches_float32(method):
    # SmolLM2's width, where LoRETTA-rep's multiplier is ~2e5 and its stored M_B train contracts to entries ~1e-7:
    # multiplied after the contraction, float16 autocast lost them (relative error 0.33, measured); applied
    # before it (each core scaled), the error is float16 rounding (~1e-3).
    d = 576
    model = adapted(nn.Linear(d, d), FP16_CASES[method]())
    layer = q(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():  # the zero core: a trained-looking update
                p.normal_(0.0, 1e-2)
    x = torch.randn(16, d)
    expected = layer.delta_forward(x, "default")
    with torch.autocast("cpu", dtype=torch.float16):
        actual = layer.delta_forward(x, "default")
    assert actual.dtype == torch.float16  # autocast did run the matmuls in float16
    assert_close_relative(actual, expected, tol=1e-2)
