"""MoS-specific checks: LoRA-rank-v parameter count, checkpoint = pools + index tables, seeded tables and
their layout, loads that restore or refuse them, assembly and the scatter-add gradient against explicit formulas."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import adapters
from adapters.mos import MoSLayer, index_tables
from tolerance import assert_close


class Stack(nn.Module):
    """``n_layers`` blocks of q (d x d) and up (d -> 2d)."""

    def __init__(self, n_layers: int = 4, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(d, d), "up": nn.Linear(d, 2 * d)}) for _ in range(n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(block["up"](block["q"](x)).sum() for block in self.layers)


CONFIG = dict(r=6, v=3, p=1, c=4, target_modules=["q", "up"])


def build(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(Stack(), adapters.MoSConfig(**{**CONFIG, "seed": seed, **overrides}))


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layers_of(model: nn.Module) -> dict[str, MoSLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoSLayer)}


def test_trainable_parameters_equal_lora_at_rank_v():
    model = build()
    lora = get_peft_model(Stack(), LoraConfig(r=CONFIG["v"], target_modules=CONFIG["target_modules"]))
    assert n_trainable(model) == n_trainable(lora) == 4 * 3 * ((16 + 16) + (16 + 32))
    pools = model.base_model.mos_A["default"]
    assert {k: tuple(p.shape) for k, p in pools.items()} == {"q_16x16": (3 * 4 * 4, 4), "up_32x16": (3 * 4 * 4, 4)}


def test_checkpoint_holds_the_pools_and_the_index_tables(tmp_path):
    model = build()
    model.save_pretrained(str(tmp_path))
    checkpoint = load_file(str(tmp_path / "adapter_model.safetensors"))
    pools = sorted(f"base_model.mos_{ab}.{g}" for ab in "AB" for g in ("q_16x16", "up_32x16"))
    tables = {f"base_model.model.{name}.mos_index_{ab}": (module, ab)
              for name, module in layers_of(model.base_model.model).items() for ab in "AB"}
    assert sorted(checkpoint) == sorted([*pools, *tables])
    for key, (module, ab) in tables.items():
        assert torch.equal(checkpoint[key], getattr(module, f"mos_index_{ab}")["default"])
    numel = sum(checkpoint[k].numel() for k in pools)
    assert numel == n_trainable(model)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    table_bytes = 8 * 2 * len(layers_of(model)) * CONFIG["r"] * CONFIG["c"]  # int64, A and B per layer
    assert numel * 4 + table_bytes <= size < numel * 4 + table_bytes + 4096  # plus the JSON header
    expanded = 4 * CONFIG["r"] * ((16 + 16) + (16 + 32))  # per-layer rank-r matrices, what the reference saved
    assert numel * CONFIG["r"] == expanded * CONFIG["v"]  # r / v times smaller than the expanded matrices


def trained_and_saved(directory) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A MoS model with non-zero pools, saved to ``directory``; the model, an input and its output."""
    model = build()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    model.eval()  # MoS has dropout
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(str(directory))
    with torch.no_grad():
        return model, x, model(x)


def load(directory, **kwargs) -> nn.Module:
    torch.manual_seed(0)  # the base weights of build()
    return PeftModel.from_pretrained(Stack(), str(directory), **kwargs).eval()


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_restores_the_saved_tables_whatever_the_seed_in_the_config(tmp_path, low_cpu_mem_usage):
    # the tables used to be drawn again from adapter_config.json's seed: an edited seed (or a torch whose randperm
    # draws otherwise) loaded another model without a word
    model, x, expected = trained_and_saved(tmp_path)
    edit_config(tmp_path, seed=7)
    loaded = load(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    saved, reseeded = model.base_model.index_tables(), build(seed=7).base_model.index_tables()
    assert any(not torch.equal(saved[k][i], reseeded[k][i]) for k in saved for i in (0, 1))  # the edit matters
    here = loaded.base_model.index_tables()
    assert here.keys() == saved.keys()
    assert all(torch.equal(here[k][i], saved[k][i]) for k in saved for i in (0, 1))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    # .to() writes the tables back from CPU copies (for FSDP's to_empty): the loaded ones, not the seed's
    loaded.to(torch.float64).to(torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_checkpoint_without_tables_loads_with_the_seeds_tables_and_a_warning(tmp_path):
    _, x, expected = trained_and_saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: t for k, t in load_file(str(path)).items() if ".mos_index_" not in k}, str(path))
    with pytest.warns(UserWarning, match=r"holds no index tables .* 8 layer\(s\) keep the tables drawn from seed=0"):
        loaded = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("edit, match", [
    (lambda t: {k: (v + 1000 if k.endswith("layers.2.up.mos_index_B") else v) for k, v in t.items()},
     r"mos_index_B points at rows \[\d+, \d+\] of a pool of 48 rows"),
    (lambda t: {k: (-v if k.endswith("layers.0.q.mos_index_A") else v) for k, v in t.items()},
     r"mos_index_A points at rows \[-\d+, 0\] of a pool of 48 rows"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.q.mos_index_A")},
     r"index tables of some layers but not of 1 others"),
    (lambda t: {k: (v.float() if ".mos_index_" in k else v) for k, v in t.items()},
     r"hold floats or bools where the adapter stores integer indices"),
])
def test_altered_tables_are_refused(tmp_path, edit, match):
    trained_and_saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file(edit(load_file(str(path))), str(path))
    with pytest.raises(ValueError, match=match):
        load(tmp_path)


def test_same_seed_same_tables_different_seed_different_tables():
    first, again, other = (build(seed).base_model.index_tables() for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k][i], again[k][i]) for k in first for i in (0, 1))
    assert any(not torch.equal(first[k][i], other[k][i]) for k in first for i in (0, 1))


def test_index_layout_subset_dissociation_privatization():
    r, v, p, c, num_layers = 6, 3, 1, 4, 4
    config = adapters.MoSConfig(r=r, v=v, p=p, c=c)
    tables_a, tables_b = index_tables(num_layers, config, torch.Generator().manual_seed(0))
    n_shared = (v - p) * num_layers * c
    assert tables_a.shape == tables_b.shape == (num_layers, r * c)
    for layer in range(num_layers):
        private = torch.arange(n_shared + layer * p * c, n_shared + (layer + 1) * p * c)
        for table in (tables_a[layer], tables_b[layer]):
            shared = table[: (r - p) * c]
            assert len(set(shared.tolist())) == (r - p) * c and int(shared.max()) < n_shared
            assert torch.equal(table[(r - p) * c :], private)
    assert not torch.equal(tables_a[:, : (r - p) * c], tables_b[:, : (r - p) * c])  # A and B drawn independently


def test_assembly_and_scatter_add_gradient_match_explicit_formulas():
    model = build()
    with torch.no_grad():
        for pool in model.base_model.mos_B["default"].values():
            pool.normal_()
    r, c, scale = CONFIG["r"], CONFIG["c"], model.peft_config["default"].alpha / CONFIG["r"]
    expected_grad_a = {}
    loss = 0.0
    for layer in layers_of(model).values():
        group = layer.mos_group["default"]
        pool_a, pool_b = model.base_model.mos_A["default"][group], model.base_model.mos_B["default"][group]
        idx_a, idx_b = layer.mos_index_A["default"], layer.mos_index_B["default"]
        a = torch.stack([torch.cat([pool_a[idx_a[j * c + i]] for i in range(c)]) for j in range(r)])  # (r, d_in)
        b = torch.stack([torch.cat([pool_b[idx_b[j * c + i]] for i in range(c)]) for j in range(r)], dim=1)  # (d_out, r)
        delta = layer.get_delta_weight("default")
        assert_close(delta, scale * b @ a)
        residual = torch.randn_like(delta)
        loss = loss + (residual * delta).sum()
        # d loss / d A_l = s B_lᵀ R_l, scattered shard by shard into the rows idx_A points at.
        grad_a = (scale * b.T @ residual).detach().reshape(r * c, -1)
        expected_grad_a.setdefault(group, torch.zeros_like(pool_a)).index_add_(0, idx_a, grad_a)
    loss.backward()
    for group, expected in expected_grad_a.items():
        assert_close(model.base_model.mos_A["default"][group].grad, expected)


def test_feasibility_is_checked_before_the_model_changes():
    base = Stack(n_layers=2)
    with pytest.raises(ValueError, match=r"infeasible for module type 'q_16x16' \(\S+\.q, \S+\.q\).*pass v >= 5, "
                       r"or r <= 5, or leave these layers out \(exclude_modules\)"):
        get_peft_model(base, adapters.MoSConfig(r=8, v=3, p=1, c=4, target_modules=["q"]))
    assert not any(isinstance(m, MoSLayer) for m in base.modules())


def test_meta_built_model_materialised_with_to_empty_routes_like_the_cpu_built_one():
    # FSDP-style meta init: when only the base weights are loaded afterwards, nothing sets the index tables; to_empty
    # must not leave them pointing at uninitialised memory
    config = lambda: adapters.MoSConfig(r=4, v=4, p=2, c=2, target_modules=["0", "2"])
    build = lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    torch.manual_seed(0)
    reference = get_peft_model(build(), config())
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    with torch.device("meta"):
        meta = build()
    model = get_peft_model(meta, config())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.eval()
    reference.eval()  # MoS has dropout
    for name, module in model.named_modules():
        if isinstance(module, MoSLayer):
            ref = reference.get_submodule(name)
            assert torch.equal(module.mos_index_A["default"], ref.mos_index_A["default"])
            assert torch.equal(module.mos_index_B["default"], ref.mos_index_B["default"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_loading_onto_a_model_of_another_depth_names_the_pool_size(tmp_path):
    # a pool holds v · L · c shards for L layers: on a deeper base, torch's raw "size mismatch" came from deep
    # inside load_state_dict; the message now says which base the adapter needs
    from peft import PeftModel

    config = adapters.MoSConfig(r=4, v=3, p=1, c=2, target_modules=["q"])
    torch.manual_seed(0)
    get_peft_model(Stack(n_layers=2), config).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"shared tensor .*mos_A.* has shape \(12, 8\), this model's has \(18, 8\) "
                                         r"\(2 such tensors\).*other layer shapes or another number of adapted layers"):
        PeftModel.from_pretrained(Stack(n_layers=3), tmp_path / "a")
    PeftModel.from_pretrained(Stack(n_layers=2), tmp_path / "a")
