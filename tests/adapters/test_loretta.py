"""LoRETTA-specific checks: TT parameter counts against the formula, TT factors against their dense
contraction, the paper init, per-architecture adp placement and ``train_norms``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from test_step_match import adam_relative_changes
from tolerance import assert_close

import adapters
import tensornets
from adapters.loretta import (
    ADP_TARGET_MODULES,
    LoRETTARepLayer,
    adp_default_targets,
    factor_modes,
    factor_parameter_count,
    find_adp_placement,
    min_parameter_modes,
    paper_init_,
    tt_factor,
)


class Square(nn.Module):
    """``n_layers`` square linears named ``q`` of width ``d``."""

    def __init__(self, d: int, n_layers: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d)}) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block["q"](x)
        return x


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tt_formula(sizes: list[int], tt_rank: int) -> int:
    """``Σ_k R_{k-1} n_k R_k`` with every internal bond ``min(tt_rank, full)``, written out independently."""
    bonds = [1] + [min(tt_rank, math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)] + [1]
    return sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(sizes))


def contract_cores(cores: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a train, one core at a time (no einsum plan): shape ``(n_1, ..., n_K)``."""
    full = cores[0]  # (1, n_1, R_1)
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    return full.squeeze(0).squeeze(-1)


def test_reference_modes_count_580_per_factor_1160_per_matrix():
    config = adapters.LoRETTARepConfig(r=8, tt_rank=5, modes={"768": [8, 8, 12], "8": [8]}, target_modules=["q"])
    assert factor_modes(768, 8, config) == ((8, 8, 12), (8,))
    assert factor_parameter_count(768, 8, config) == 40 + 200 + 300 + 40 == 580
    model = get_peft_model(Square(768), config)
    assert n_trainable(model) == 1_160
    lora = get_peft_model(Square(768), LoraConfig(r=8, target_modules=["q"]))
    assert n_trainable(lora) == 12_288 and n_trainable(lora) / n_trainable(model) >= 10


def test_mode_order_matters_for_the_count():
    # The same modes with the r-side first: 1*8*5 + 5*8*5 + 5*8*5 + 5*12*1 = 500, not 580.
    assert tt_formula([8, 8, 8, 12], 5) == 500 and tt_formula([8, 8, 12, 8], 5) == 580


def ordered_splits(d: int) -> list[tuple[int, ...]]:
    """Every ordered factorization of ``d`` into factors >= 2 (brute force, independent of the library)."""
    if d == 1:
        return [()]
    return [(n, *rest) for n in range(2, d + 1) if d % n == 0 for rest in ordered_splits(d // n)]


@pytest.mark.parametrize("d", [192, 384, 576, 768, 1536])
@pytest.mark.parametrize("tt_rank", [4, 5])
def test_default_modes_minimise_the_parameter_count(d, tt_rank):
    config = adapters.LoRETTARepConfig(tt_rank=tt_rank)
    d_modes, r_modes = factor_modes(d, config.r, config)
    assert math.prod(d_modes) == d and r_modes == (config.r,)
    assert d_modes == min_parameter_modes(d, r_modes, tt_rank)
    count = factor_parameter_count(d, config.r, config)
    assert count == tt_formula([*d_modes, *r_modes], tt_rank)
    assert count == tt_factor(d, config.r, config, layer_name="x").num_parameters
    assert count == min(tt_formula([*split, config.r], tt_rank) for split in ordered_splits(d))
    # the paper's balanced split stays available, and is never cheaper
    balanced = adapters.LoRETTARepConfig(tt_rank=tt_rank, num_modes=3)
    assert factor_modes(d, config.r, balanced)[0] == tensornets.factorize(d, 3)
    assert factor_parameter_count(d, config.r, balanced) >= count


def test_minimal_modes_put_a_large_mode_first():
    assert min_parameter_modes(384, (8,), 5) == (16, 2, 3, 4)  # 345 parameters, balanced (6, 8, 8): 470
    assert factor_parameter_count(384, 8, adapters.LoRETTARepConfig(tt_rank=5)) == 80 + 50 + 75 + 100 + 40
    assert factor_parameter_count(384, 8, adapters.LoRETTARepConfig(tt_rank=5, num_modes=3)) == 470


@pytest.mark.parametrize("d", [768, 3072, 4096, 11008])
def test_default_modes_for_any_size_follow_the_formula(d):
    config = adapters.LoRETTARepConfig()
    d_modes, r_modes = factor_modes(d, config.r, config)
    assert math.prod(d_modes) == d and r_modes == (config.r,)
    count = factor_parameter_count(d, config.r, config)
    assert count == tt_formula([*d_modes, *r_modes], config.tt_rank)
    assert count == tt_factor(d, config.r, config, layer_name="x").num_parameters
    assert 2 * count * 10 <= 2 * d * config.r  # at least 10x fewer than LoRA r=8 on a d x d matrix


def test_tt_factors_equal_their_dense_contraction():
    torch.manual_seed(0)
    config = adapters.LoRETTARepConfig(r=4, tt_rank=3, dropout=0.0, target_modules=["q"])
    model = get_peft_model(Square(24), config)
    layer = model.base_model.model.layers[0]["q"]
    assert isinstance(layer, LoRETTARepLayer)
    with torch.no_grad():
        for tt in (layer.loretta_rep_A["default"], layer.loretta_rep_B["default"]):
            for core in tt.cores:
                core.normal_()
    m_a, m_b = layer.factors("default")
    multiplier_b = layer.loretta_rep_multiplier["default"]  # M_B's fixed muP multiplier (test below)
    for tt, dense, multiplier in ((layer.loretta_rep_A["default"], m_a, 1.0), (layer.loretta_rep_B["default"], m_b, multiplier_b)):
        expected = multiplier * contract_cores(list(tt.cores)).reshape(24, 4)  # d-side modes first: a (d, r) matrix
        assert_close(dense, expected)
    scale = config.alpha / config.r
    delta = layer.get_delta_weight("default")
    assert_close(delta, scale * m_b @ m_a.T)
    x = torch.randn(5, 24)
    assert_close(layer.delta_forward(x, "default"), x @ delta.T)


def test_zero_init_gives_zero_delta_and_nonzero_gradients():
    model = get_peft_model(Square(16), adapters.LoRETTARepConfig(r=4, tt_rank=3, target_modules=["q"]))
    layer = model.base_model.model.layers[0]["q"]
    assert torch.equal(layer.get_delta_weight("default"), torch.zeros(16, 16))
    assert torch.count_nonzero(layer.loretta_rep_B["default"].cores[-1]) == 0
    model(torch.randn(3, 16)).pow(2).sum().backward()
    assert layer.loretta_rep_B["default"].cores[-1].grad.abs().sum() > 0


@pytest.mark.parametrize("r,tt_rank,out,rank", [(8, 4, 48, 4), (2, 4, 48, 2), (8, 4, 3, 3), (8, 4, 1, 1)])
def test_lora_factors_have_the_structural_rank_and_give_delta_w(r, tt_rank, out, rank):
    # rank = min(r, M_A's bond between its d and r modes, M_B's): tt_rank, r, or the 3- / 1-row output's bond
    torch.manual_seed(0)
    config = adapters.LoRETTARepConfig(r=r, tt_rank=tt_rank, dropout=0.0, target_modules=["0"])
    layer = get_peft_model(nn.Sequential(nn.Linear(48, out)), config).base_model.model[0]
    with torch.no_grad():
        for param in layer.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    a, b = layer.lora_factors("default")
    assert a.dtype == b.dtype == torch.float64 and a.shape == (rank, 48) and b.shape == (out, rank)
    delta = layer.get_delta_weight("default").detach().double()  # contracted in float32
    assert torch.linalg.matrix_rank(delta, rtol=1e-5) == rank
    assert_close(b @ a, delta, tol=1e-6)


def rep_layer(init_weights: str, d: int = 96, seed: int = 0) -> LoRETTARepLayer:
    torch.manual_seed(seed)
    config = adapters.LoRETTARepConfig(dropout=0.0, init_weights=init_weights, target_modules=["q"])
    return get_peft_model(Square(d), config).base_model.model.layers[0]["q"]


def test_lora_rate_init_is_the_zero_init_reparametrized():
    # Same draw: M_A identical, and μ_B times the stored P equals the plain init's P, with
    # μ_B = Π_k σ_k / σ_A (σ_1 = q^{-1/2}, σ_k = R_{k-1}^{-1/2} after, σ_A = (3 d_in)^{-1/2}), written out here.
    plain, rate = rep_layer("zero"), rep_layer("lora_rate")
    assert plain.loretta_rep_multiplier["default"] == 1.0
    for core_plain, core_rate in zip(plain.loretta_rep_A["default"].cores, rate.loretta_rep_A["default"].cores):
        assert torch.equal(core_plain, core_rate)
    cores_plain, cores_rate = plain.loretta_rep_B["default"].cores[:-1], rate.loretta_rep_B["default"].cores[:-1]
    sigma_a = (3 * 96) ** -0.5
    q = cores_plain[-1].shape[-1]  # the bond into the zero last core
    stds = [q**-0.5] + [core.shape[0] ** -0.5 for core in cores_plain[1:]]
    expected = math.prod(std / sigma_a for std in stds)
    assert math.isclose(rate.loretta_rep_multiplier["default"], expected, rel_tol=1e-12)
    p_plain = contract_cores([c.detach() for c in cores_plain])  # P: (n_1, ..., n_{K-1}, q)
    p_rate = contract_cores([c.detach() for c in cores_rate])
    assert p_plain.shape[-1] == q
    assert_close(expected * p_rate, p_plain)  # float32: the stored cores are the same draw, rescaled
    assert torch.equal(rate.get_delta_weight("default"), torch.zeros(96, 96))


def relative_core_changes(layer: nn.Module, params: list[torch.Tensor], steps: int = 2, lr: float = 1e-3) -> list[float]:
    """``‖Δθ‖ / ‖θ‖`` of each of ``params`` after ``steps`` Adam steps on a random regression through ``layer``."""
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g)
    return adam_relative_changes(layer, params, x, target, steps, lr)


@pytest.mark.parametrize("init_weights, low, high", [("lora_rate", 0.5, 2.0), ("zero", 0.0, 0.2)])
def test_output_cores_learn_at_loras_rate(init_weights, low, high):
    # LoRA's A moves by ~lr / σ_A of its size per Adam step; the default init makes each core of P
    # (M_B before its zero last core) move as fast, relative to its size. The plain init ("zero",
    # cores of std ~0.5) is ~σ_A / 0.5 = 0.06x as fast: P, the output directions of ΔW, stays put.
    torch.manual_seed(0)
    lora = get_peft_model(Square(96), LoraConfig(r=8, target_modules=["q"])).base_model.model.layers[0]["q"]
    (lora_change,) = relative_core_changes(lora, [lora.lora_A["default"].weight])
    layer = rep_layer(init_weights)
    for change in relative_core_changes(layer, list(layer.loretta_rep_B["default"].cores[:-1])):
        assert low <= change / lora_change <= high, (init_weights, change, lora_change)


def test_a_checkpoint_of_the_plain_init_reloads_unchanged(tmp_path):
    torch.manual_seed(0)
    config = adapters.LoRETTARepConfig(init_weights="zero", dropout=0.0, target_modules=["q"])
    model = get_peft_model(Square(24), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 24)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(Square(24), str(tmp_path))
    reloaded.base_model.model.layers[0]["q"].base_layer.load_state_dict(
        model.base_model.model.layers[0]["q"].base_layer.state_dict()
    )
    assert reloaded.base_model.model.layers[0]["q"].loretta_rep_multiplier["default"] == 1.0
    assert torch.equal(reloaded(x), expected)


def test_paper_init_is_the_reference_draw_and_nonzero():
    config = adapters.LoRETTARepConfig(r=4, tt_rank=3, num_modes=2)
    tt = tt_factor(16, 4, config, layer_name="x")
    sigma = (16 + 16) ** -0.5
    paper_init_(tt, sigma, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    for core in tt.cores:
        expected = torch.randn(core.shape, generator=generator) * sigma ** (1 / 3) / math.sqrt(core.shape[2])
        assert torch.equal(core.detach(), expected)
    model = get_peft_model(Square(16), adapters.LoRETTARepConfig(r=4, init_weights="paper", target_modules=["q"]))
    assert model.base_model.model.layers[0]["q"].get_delta_weight("default").abs().sum() > 0


def test_prime_size_needs_explicit_modes_for_a_balanced_split():
    with pytest.raises(ValueError, match=r"size 17 cannot be split into num_modes=3.*modes=\{'17'"):
        get_peft_model(Square(17), adapters.LoRETTARepConfig(num_modes=3, target_modules=["q"]))
    config = adapters.LoRETTARepConfig(r=4, num_modes=3, modes={"17": [17]}, target_modules=["q"])
    assert n_trainable(get_peft_model(Square(17), config)) == 2 * tt_formula([17, 4], 4)
    # the default (fewest parameters) keeps a prime size as one mode
    default = adapters.LoRETTARepConfig(r=4, target_modules=["q"])
    assert factor_modes(17, 4, default) == ((17,), (4,))
    assert n_trainable(get_peft_model(Square(17), default)) == 2 * tt_formula([17, 4], 4)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("build", "targets", "norm_suffixes"),
    [
        (tiny_bert, {"attention.output.dense", "output.dense"}, ("LayerNorm",)),
        (tiny_llama, {"self_attn.o_proj", "mlp.down_proj"}, ("input_layernorm", "post_attention_layernorm", "norm")),
    ],
    ids=["bert", "llama"],
)
def test_adp_default_placement_and_train_norms(build, targets, norm_suffixes, tmp_path):
    base = build()
    norms = {name: m for name, m in base.named_modules() if name.endswith(norm_suffixes)}
    norm_params = sum(p.numel() for m in norms.values() for p in m.parameters())
    model = get_peft_model(base, adapters.LoRETTAAdpConfig(bottleneck=8, train_norms=True))
    adapted = {name for name, m in model.named_modules() if isinstance(m, adapters.loretta.LoRETTAAdpLayer)}
    assert adapted and {name.split("layers.")[-1].split("layer.")[-1].split(".", 1)[1] for name in adapted} == targets
    counts = model.base_model.parameter_counts()
    assert counts["norms"] == norm_params and counts["other_modules"] == 0
    assert counts["adapter"] + counts["norms"] == n_trainable(model)
    # The norms train and are saved with the adapter: a reload reproduces the trained model exactly.
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out = model(input_ids=ids)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    optimizer.step()
    trained_norm = next(
        p for n, p in model.named_parameters() if "modules_to_save" in n and n.split(".modules_to_save")[0].endswith(norm_suffixes)
    )
    assert trained_norm.requires_grad and not torch.equal(trained_norm, torch.ones_like(trained_norm))
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        first, second = model(input_ids=ids), reloaded(input_ids=ids)
    key = "logits" if hasattr(first, "logits") else "last_hidden_state"
    assert torch.equal(first[key], second[key])


def test_adp_default_mapping_covers_both_families():
    assert ADP_TARGET_MODULES["bert"] == ["output.dense"] and ADP_TARGET_MODULES["roberta"] == ["output.dense"]
    assert ADP_TARGET_MODULES["llama"] == ["o_proj", "down_proj"]


def test_adp_parameter_count_follows_the_formula():
    d, m, tt_rank = 16, 8, 3
    config = adapters.LoRETTAAdpConfig(bottleneck=m, tt_rank=tt_rank, target_modules=["q"])
    model = get_peft_model(Square(d, n_layers=2), config)
    d_modes = min_parameter_modes(d, (m,), tt_rank)
    per_layer = 2 * tt_formula([*d_modes, m], tt_rank) + m + d
    assert n_trainable(model) == 2 * per_layer == model.base_model.parameter_counts()["adapter"]


def table_selection(model: nn.Module, model_type: str) -> list[str]:
    """The linears the table's suffixes select, as PEFT matches them (``name == t`` or ``.t`` suffix)."""
    suffixes = ADP_TARGET_MODULES[model_type]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in suffixes)
    ]


@pytest.mark.parametrize(("build", "model_type"), [(tiny_bert, "bert"), (tiny_llama, "llama")], ids=["bert", "llama"])
def test_structural_placement_equals_the_table_on_bert_and_llama(build, model_type):
    model = build()
    assert model.config.model_type == model_type
    assert find_adp_placement(model) == table_selection(model, model_type)


def tiny_decoder(config_cls_name: str, model_cls_name: str) -> nn.Module:
    """A two-block decoder of a recent model type with random weights, from transformers' config classes."""
    import transformers

    config = getattr(transformers, config_cls_name)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls_name)(config).eval()


NEW_MODEL_TYPES = [
    pytest.param("SmolLM3Config", "SmolLM3ForCausalLM", ["self_attn.o_proj", "mlp.down_proj"], id="smollm3"),
    pytest.param("Glm4Config", "Glm4ForCausalLM", ["self_attn.o_proj", "mlp.down_proj"], id="glm4"),
    pytest.param("ModernBertConfig", "ModernBertModel", ["attn.Wo", "mlp.Wo"], id="modernbert"),
]


@pytest.mark.parametrize(("config_cls", "model_cls", "per_block"), NEW_MODEL_TYPES)
def test_adp_default_placement_on_a_model_type_outside_the_table(config_cls, model_cls, per_block, tmp_path):
    base = tiny_decoder(config_cls, model_cls)
    assert base.config.model_type not in ADP_TARGET_MODULES
    blocks = "model.layers" if hasattr(base, "model") else "layers"
    expected = [f"{blocks}.{i}.{rel}" for i in range(2) for rel in per_block]
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def out(model: nn.Module) -> torch.Tensor:
        result = model(input_ids=ids)
        return result.logits if hasattr(result, "logits") else result.last_hidden_state

    with torch.no_grad():
        reference = out(base)
    model = get_peft_model(base, adapters.LoRETTAAdpConfig(bottleneck=8))
    adapted = [
        name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if isinstance(m, adapters.loretta.LoRETTAAdpLayer)
    ]
    assert adapted == expected
    assert model.peft_config["default"].target_modules == set(per_block)
    with torch.no_grad():
        assert torch.equal(out(model), reference)  # starts as the identity
        generator = torch.Generator().manual_seed(0)
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:  # a non-zero adapter, so a reload that drops a tensor shows
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        adapted_out = out(model)
    assert torch.isfinite(adapted_out).all() and not torch.equal(adapted_out, reference)
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(tiny_decoder(config_cls, model_cls), str(tmp_path), adapter_name="other")
    with torch.no_grad():
        assert torch.equal(out(reloaded), adapted_out)
    # A second adapter on the wrapped model finds the same places.
    model.add_adapter("second", adapters.LoRETTAAdpConfig(bottleneck=4))
    assert model.peft_config["second"].target_modules == set(per_block)


class Block(nn.Module):
    """A hand-written block: ``attention`` (q, k, v, out) and an FFN (``up``, ``down``), or an expert list."""

    def __init__(self, d: int, experts: int = 0) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({name: nn.Linear(d, d) for name in ("q", "k", "v", "out")})
        if experts:
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)) for _ in range(experts)
            )
        else:
            self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class Stack(nn.Module):
    def __init__(self, d: int = 8, n_blocks: int = 3, experts: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(Block(d, experts) for _ in range(n_blocks))
        self.head = nn.Linear(d, 2)


def test_structural_placement_on_a_custom_model():
    model = Stack()
    expected = [f"blocks.{i}.{rel}" for i in range(3) for rel in ("attention.out", "down")]
    assert find_adp_placement(model) == expected
    assert adp_default_targets(model, "custom") == ["attention.out", "down"]
    # A single-segment suffix that also names a module outside the blocks: full names instead.
    model.down = nn.Linear(8, 8)
    assert adp_default_targets(model, "custom") == expected


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(Stack(experts=2), id="experts-only-ffn"),
        pytest.param(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), id="no-blocks"),
    ],
)
def test_unrecognised_structure_raises_a_clear_error(model):
    with pytest.raises(ValueError, match=r"no default placement for model_type='custom'.*pass target_modules="):
        adp_default_targets(model, "custom")
    with pytest.raises(ValueError, match="no default placement"):
        get_peft_model(model, adapters.LoRETTAAdpConfig(bottleneck=4))


def test_gpt2_default_placement_is_both_conv1d_c_proj():
    # GPT-2's projections are transformers' Conv1D: the table places LoRETTA-adp on attn.c_proj and mlp.c_proj
    from transformers import GPT2Config, GPT2Model

    base = GPT2Model(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    model = get_peft_model(base, adapters.LoRETTAAdpConfig(bottleneck=4))
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if type(m).__name__ == "LoRETTAAdpLayer")
    assert adapted == [f"h.{i}.{part}.c_proj" for i in (0, 1) for part in ("attn", "mlp")]


def rep_and_lora_counts(shapes: list[tuple[int, int]], config: adapters.LoRETTARepConfig) -> tuple[int, int]:
    """Trainable parameters of LoRETTA-rep and of LoRA at the same rank over ``(d_out, d_in)`` targets."""
    rep = sum(factor_parameter_count(d_in, config.r, config) + factor_parameter_count(d_out, config.r, config)
              for d_out, d_in in shapes)
    return rep, sum(config.r * (d_in + d_out) for d_out, d_in in shapes)


def test_rep_defaults_train_10x_fewer_parameters_than_lora_on_minilm_and_smollm2():
    from transformers import AutoModel

    from adapter_conformance import minilm_path

    minilm = AutoModel.from_pretrained(minilm_path())
    for targets in (["query", "value"], "all-linear"):
        lora = n_trainable(get_peft_model(copy.deepcopy(minilm), LoraConfig(r=8, target_modules=targets)))
        rep = get_peft_model(copy.deepcopy(minilm), adapters.LoRETTARepConfig(target_modules=targets))
        assert lora >= 10 * n_trainable(rep), (targets, lora, n_trainable(rep))  # q/v: 73,728 vs 5,760
    # SmolLM2-135M (hidden 576, MLP 1536, 9 query / 3 KV heads of 64, 30 layers), from its shapes
    q, kv, mlp_in, mlp_out = (576, 576), (192, 576), (1536, 576), (576, 1536)
    config = adapters.LoRETTARepConfig()
    for shapes in ([q, kv] * 30, [q, kv, kv, q, mlp_in, mlp_in, mlp_out] * 30):
        rep, lora = rep_and_lora_counts(shapes, config)
        assert lora >= 10 * rep, (rep, lora)


def test_modes_for_a_size_no_target_has_warn():
    import adapter_conformance as conf

    config = adapters.LoRETTARepConfig(r=4, tt_rank=2, target_modules=["up", "down"], modes={"768": [8, 8, 12]})
    with pytest.warns(UserWarning, match=r"modes has entries for sizes \['768'\] that no target layer has"):
        get_peft_model(conf.MODELS["mlp"].build(), config)


def test_a_learned_scale_may_not_start_at_zero():
    # y = h + s · branch(h) with the branch zero at init: ∂/∂s is the branch's output (zero) and the branch's
    # gradients carry s (zero), so a learned s = 0 never moves either
    with pytest.raises(ValueError, match=r"scale=0.0 makes the update and all its gradients zero"):
        adapters.LoRETTAAdpConfig(bottleneck=8, target_modules=["v"], scale=0.0, learn_scale=True)


def test_bool_options_refuse_other_types():
    # a string "no" is truthy: train_norms="no" trained the norms
    with pytest.raises(TypeError, match="train_norms='no' must be True or False"):
        adapters.LoRETTARepConfig(train_norms="no")
    with pytest.raises(TypeError, match="learn_scale=1 must be True or False"):
        adapters.LoRETTAAdpConfig(learn_scale=1)
