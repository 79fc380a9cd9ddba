"""GPT-2's projections are transformers' ``Conv1D`` (weight stored ``(in, out)``): every method adapts them as the
``(out, in)`` linear they compute, merges into the transposed storage and exports a PEFT LoRA with
``fan_in_fan_out``, which PEFT's own code (forward and merge) must reproduce."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from tolerance import assert_close
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import adapters

CONFIGS = {
    "lotr": lambda: adapters.LoTRConfig(r=2),  # PEFT's default GPT-2 target, c_attn
    "lotr-svd": lambda: adapters.LoTRConfig(r=2, init_factors="svd", target_modules=["c_attn", "c_fc"]),
    "flora": lambda: adapters.FloraConfig(r=2, target_modules="all-linear"),
    "loretta-rep": lambda: adapters.LoRETTARepConfig(r=4, tt_rank=2),
    "mos": lambda: adapters.MoSConfig(r=4, v=3, p=1, c=2, target_modules=["c_attn", "c_proj"]),
    "loretta-adp": lambda: adapters.LoRETTAAdpConfig(bottleneck=8, tt_rank=2),  # default placement: both c_proj
}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_conv1d_layers_adapt_merge_and_round_trip(method, tmp_path):
    base = tiny_gpt2()
    with torch.no_grad():
        plain = base(IDS).logits
    model = get_peft_model(copy.deepcopy(base), CONFIGS[method]())
    wrapped = [m.get_base_layer() for m in model.modules() if hasattr(m, "get_base_layer") and m is not model
               and type(m).__name__.endswith("Layer")]
    assert wrapped and all(isinstance(layer, Conv1D) for layer in wrapped)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain)  # zero update at init
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    perturbed(model)
    with torch.no_grad():
        adapted = model(IDS).logits
    assert (adapted - plain).norm() > 1e-3 * plain.norm()

    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a")(IDS).logits, adapted)
    if method == "loretta-adp":
        return  # a bottleneck on the output: no ΔW to merge (it says so, tests/adapters/test_loretta.py)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    model.merge_adapter()
    with torch.no_grad():
        assert_close(model(IDS).logits, adapted, tol=1e-10)  # merged into Conv1D's (in, out) storage
    model.unmerge_adapter()
    for name, weight in weights.items():
        assert_close(model.get_parameter(name), weight, tol=1e-12)
    with torch.no_grad():
        assert_close(copy.deepcopy(model).merge_and_unload()(IDS).logits, adapted, tol=1e-10)


@pytest.mark.parametrize("method", [m for m in CONFIGS if m != "loretta-adp"])
def test_conv1d_lora_export_is_peft_lora_with_fan_in_fan_out(method):
    base = tiny_gpt2()
    model = perturbed(get_peft_model(copy.deepcopy(base), CONFIGS[method]()).eval())
    config, state = adapters.to_lora(model, dtype=torch.float64)
    assert config.fan_in_fan_out
    lora = get_peft_model(copy.deepcopy(base), config).eval()
    set_peft_model_state_dict(lora, state)
    with torch.no_grad():
        ours = model(IDS).logits
        assert_close(lora(IDS).logits, ours, tol=1e-10)
        # PEFT's merge transposes ΔW for fan_in_fan_out: the orientation of the exported factors is checked by it
        assert_close(lora.merge_and_unload()(IDS).logits, ours, tol=1e-10)


def test_an_export_cannot_mix_conv1d_and_linear_layers():
    model = get_peft_model(tiny_gpt2(), adapters.FloraConfig(r=2, target_modules=["c_attn", "lm_head"]))
    with pytest.raises(ValueError, match=r"adapts Conv1D layers .* and others \(\['lm_head'\]\).*one fan_in_fan_out"):
        adapters.to_lora(model)


def test_init_from_lowrank_on_conv1d_layers():
    # an EoRA-style residual of GPT-2's (out, in) = (96, 32) c_attn: the adapter starts exactly at B A
    model = get_peft_model(tiny_gpt2(), adapters.LoTRConfig(r=4, target_modules=["c_attn"]))
    generator = torch.Generator().manual_seed(3)
    factors = {f"transformer.h.{i}.attn.c_attn": (torch.randn(96, 2, generator=generator, dtype=torch.float64),
                                                   torch.randn(2, 32, generator=generator, dtype=torch.float64))
               for i in range(2)}
    adapters.init_from_lowrank(model, factors)
    for name, (B, A) in factors.items():
        layer = model.base_model.model.get_submodule(name)
        assert_close(layer.get_delta_weight("default").double(), B @ A, tol=1e-6)


def test_unsupported_layers_raise_what_lora_raises_too():
    # PEFT's LoRA raises ValueError for a target it cannot adapt; ours is both a TypeError and a ValueError
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"LoTR adapts nn.Linear, Conv1D layers only; target 'transformer.wte' is "
                                         r"Embedding"):
        get_peft_model(model, adapters.LoTRConfig(r=2, target_modules=["wte"]))
    assert issubclass(adapters.UnsupportedLayerError, TypeError)


def test_lora_on_the_same_targets_is_the_reference_shape():
    # sanity of the reference: PEFT's LoRA on c_attn builds (r, in) / (out, r) factors, the layout we export
    lora = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    layer = lora.base_model.model.transformer.h[0].attn.c_attn
    assert tuple(layer.lora_A["default"].weight.shape) == (2, 32)
    assert tuple(layer.lora_B["default"].weight.shape) == (96, 2)
