"""Every method's defaults move the adapted layers like PEFT's default LoRA at the same learning rate.

The muP idea applied to adapters (``adapters/_step_match.py``): after a few Adam steps at one lr
from the same seed and data, the change each method makes to the adapted layers' outputs,
relative to their inputs, is within 0.5-2x of ``LoraConfig(r=8)``'s. The unit-norm factor
inits used before (LoTR, FLoRA, LoRETTA-rep: 0.2-0.3x at width 384, ~5x too slow) and the
earlier LoRETTA-adp init (~4x too fast: it diverged at LoRA's lr) fail this.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import adapters
from adapters.loretta import LoRETTAAdpLayer

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
