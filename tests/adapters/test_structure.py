"""Structure of ``adapters/``: the import graph has no cycles, layers never import their tuner, shared state
reaches layers as data (a :class:`LayerPlan`), the supported-type check is the tuner's, and nothing on the
adapters side imports ``compress``."""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.utils import prune

import adapters
from adapters._delta import LayerPlan
from adapters.flora import FloraLayer
from adapters.lotr import LoTRLayer
from adapters.mos import MoSLayer
from tolerance import assert_close

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "adapters"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module ``tree`` imports, anywhere in it (``TYPE_CHECKING`` blocks and function bodies included).

    ``from P import n`` counts as importing ``P.n`` when that is a module, else ``P``. The parent packages
    Python initialises on the way are not counted: they are not the importing module's choice.
    """
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the same top-level package it imports}`` for every ``.py`` under ``root``."""
    files = {module_name(path): path for path in sorted(root.rglob("*.py"))}
    top = root.name
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = imported_modules(tree, name, path.name == "__init__.py", set(files))
        graph[name] = {m for m in imports if m == top or m.startswith(top + ".")} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_import_graph_helpers_find_a_cycle_and_resolve_submodules():
    # The checker itself: a two-module circle is found, a chain is not, `from pkg import sub` means pkg.sub.
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("from adapters import lotr\nfrom adapters.lotr import LoTRConfig\nfrom . import layer")
    known = {"adapters", "adapters.lotr", "adapters.lotr.layer"}
    assert imported_modules(tree, "adapters.lotr.model", False, known) == {"adapters.lotr", "adapters.lotr.layer"}


def test_adapters_has_no_import_cycles():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_layers_never_reach_their_tuner():
    graph = import_graph(PACKAGE)
    layers = sorted(m for m in graph if m.endswith(".layer"))
    assert {"adapters.lotr.layer", "adapters.mos.layer", "adapters.flora.layer", "adapters.loretta.layer"} <= set(layers)
    for layer in layers:
        tuners = sorted(m for m in reachable(graph, layer) if m.endswith(".model"))
        assert not tuners, f"{layer} imports {tuners} (directly or through other modules)"


def test_group_key_lives_in_the_shared_module():
    graph = import_graph(PACKAGE)
    assert "adapters._groups" in graph["adapters.mos.model"]
    assert not any(m.startswith("adapters.lotr") for m in reachable(graph, "adapters.mos.model"))


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # IPython magics


ADAPTER_SIDE = [
    *sorted(PACKAGE.rglob("*.py")),
    *sorted((REPO / "tests" / "adapters").glob("*.py")),
    *(REPO / "benchmarks" / name for name in ("bench_adapters.py", "bench_finetune.py", "finetune_data.py")),
    REPO / "notebooks" / "03_peft_adapters.ipynb",
]


@pytest.mark.parametrize("path", ADAPTER_SIDE, ids=lambda p: str(p.relative_to(REPO)))
def test_adapter_side_never_imports_compress(path):
    source = notebook_code(path) if path.suffix == ".ipynb" else path.read_text()
    imports = imported_modules(ast.parse(source), "__main__", False, set())
    assert not [m for m in imports if m == "compress" or m.startswith("compress.")], (
        f"{path.name} imports compress; load the packaged models from tensornets.models"
    )


def test_lotr_layer_takes_its_shared_factors_as_data():
    # No tuner: the plan (group + containers keyed by adapter, then group) is all the layer needs.
    torch.manual_seed(0)
    shared_a = nn.ModuleDict({"default": nn.ParameterDict({"g": nn.Parameter(torch.randn(6, 2))})})
    shared_b = nn.ModuleDict({"default": nn.ParameterDict({"g": nn.Parameter(torch.randn(2, 8))})})
    config = adapters.LoTRConfig(r=2, alpha=4.0)
    layer = LoTRLayer(nn.Linear(8, 6), "default", config, current_key="proj", plan=LayerPlan("g", (shared_a, shared_b)))
    with torch.no_grad():
        layer.lotr_core["default"].normal_()
    a, b = shared_a["default"]["g"], shared_b["default"]["g"]
    mu = layer.lotr_multiplier["default"]  # A = μ A_stored, μ = sqrt(3 d_in / r) from the shape (init_weights)
    assert mu == pytest.approx((3 * 8 / 2) ** 0.5, rel=1e-12)
    assert_close(layer.get_delta_weight("default"), 2.0 * (mu * a) @ layer.lotr_core["default"] @ b)
    assert not any(p is a or p is b for p in layer.parameters())  # referenced, never registered (saved once)


def test_mos_layer_takes_its_pools_and_index_tables_as_data():
    torch.manual_seed(0)
    r, c = 2, 2
    pool_a = nn.ModuleDict({"default": nn.ParameterDict({"g": nn.Parameter(torch.randn(4, 8 // c))})})
    pool_b = nn.ModuleDict({"default": nn.ParameterDict({"g": nn.Parameter(torch.randn(4, 6 // c))})})
    idx_a, idx_b = torch.tensor([3, 0, 1, 2]), torch.tensor([2, 1, 0, 3])
    plan = LayerPlan("g", (pool_a, pool_b), {"index_A": idx_a, "index_B": idx_b})
    config = adapters.MoSConfig(r=r, v=1, p=0, c=c, alpha=2.0)
    layer = MoSLayer(nn.Linear(8, 6), "default", config, current_key="proj", plan=plan)
    a = pool_a["default"]["g"][idx_a].reshape(r, 8)
    b = pool_b["default"]["g"][idx_b].reshape(r, 6).T
    assert_close(layer.get_delta_weight("default"), (2.0 / r) * b @ a)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


@pytest.mark.parametrize(
    "config, names",
    [
        (lambda: adapters.LoTRConfig(r=2, target_modules=["proj", "norm"]),
         "LoTR adapts nn.Linear, Conv1D layers only"),
        (lambda: adapters.MoSConfig(r=2, v=2, p=0, c=1, target_modules=["proj", "norm"]), "MoS adapts nn.Linear"),
        (lambda: adapters.LoRETTARepConfig(target_modules=["proj", "norm"]), "LoRETTA-rep adapts nn.Linear"),
        (
            lambda: adapters.FloraConfig(r=2, target_modules=["proj", "norm"]),
            "FLoRA adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d layers only",
        ),
    ],
)
def test_unsupported_target_raises_before_the_model_changes(config, names):
    model = Mixed()
    with pytest.raises(TypeError, match=rf"{names}.*target 'norm' is LayerNorm\. Leave it out of target_modules"):
        get_peft_model(model, config())
    assert isinstance(model.proj, nn.Linear) and not any(isinstance(m, FloraLayer | LoTRLayer) for m in model.modules())


def _encoder(batch_first: bool = True) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("config", [
    lambda t: adapters.LoTRConfig(r=2, **t), lambda t: adapters.MoSConfig(r=2, v=2, p=0, c=1, **t),
    lambda t: adapters.LoRETTARepConfig(**t), lambda t: adapters.FloraConfig(r=2, **t),
], ids=["lotr", "mos", "loretta-rep", "flora"])
def test_layers_torch_reads_without_calling_are_refused_skipped_or_warned(config):
    # nn.MultiheadAttention never calls out_proj (an adapter there had no effect until merged); a batch_first encoder
    # layer's fused inference path reads linear1 / linear2 weights directly (adapters there run in training only)
    model = _encoder()
    with pytest.raises(ValueError, match=r"target 'layers.0.self_attn.out_proj': nn.MultiheadAttention passes "
                                         r"out_proj.weight .*exclude_modules=\['layers.0.self_attn.out_proj'\]"):
        get_peft_model(model, config(dict(target_modules=["out_proj", "linear1"])))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    with pytest.warns(UserWarning, match=r"'all-linear' leaves out 2 layer\(s\) that torch never calls, such as "
                                         r"'layers.0.self_attn.out_proj'"):
        adapted = get_peft_model(model, config(dict(target_modules="all-linear")))
    wrapped = {n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == {f"layers.{i}.{name}" for i in range(2) for name in ("linear1", "linear2")}
    with pytest.warns(UserWarning, match=r"4 target\(s\) such as 'layers.0.linear1' sit in an "
                                         r"nn.TransformerEncoderLayer.*set_fastpath_enabled\(False\)"):
        get_peft_model(_encoder(), config(dict(target_modules=["linear1", "linear2"])))
    with warnings.catch_warnings():  # batch_first=False: torch never takes the fast path, the adapters always run
        warnings.simplefilter("error", UserWarning)
        get_peft_model(_encoder(batch_first=False), config(dict(target_modules=["linear1", "linear2"])))


class _GatedBlocks(nn.Module):
    """Two blocks of a 16x16 projection and a 1-row gate (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(proj=nn.Linear(16, 16), gate=nn.Linear(16, 1))) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block["proj"](x) * torch.sigmoid(block["gate"](x))
        return x


@pytest.mark.parametrize("config,match", [
    (lambda **kw: adapters.LoTRConfig(r=2, **kw), r"r=2 exceeds min\(d_out, d_in\)=1 of 2 layer\(s\) \('blocks.0.gate', "
                                                   r"'blocks.1.gate'\); .*\(exclude_modules=\['gate'\]"),
    (lambda **kw: adapters.MoSConfig(r=2, v=2, p=0, c=2, **kw), r"c=2 must divide .*\(exclude_modules=\['gate'\]"),
])
def test_layers_too_small_for_the_method_name_the_exclusion_that_works(config, match):
    # the advice named one layer at a time (LoTR) or none (MoS); following it now adapts the rest
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match):
        get_peft_model(_GatedBlocks(), config(target_modules="all-linear"))
    model = get_peft_model(_GatedBlocks(), config(target_modules="all-linear", exclude_modules=["gate"]))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == {"blocks.0.proj", "blocks.1.proj"}


def test_all_linear_says_it_leaves_a_mixtures_fused_experts_out():
    # PEFT's LoRA adapts Mixtral's experts (3-D tensors) through target_parameters; ours silently adapted attention only
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    moe = MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2))
    with pytest.warns(UserWarning, match=r"'all-linear' leaves 12,288 parameters unadapted: 2 MixtralExperts "
                                         r"module\(s\) .* LoTRConfig adapts linear layers only"):
        get_peft_model(moe, adapters.LoTRConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(LlamaForCausalLM(LlamaConfig(**small)), adapters.LoTRConfig(r=2, target_modules="all-linear"))


@pytest.mark.parametrize("config", [
    lambda: adapters.LoTRConfig(r=2, target_modules=["0", "2"]), lambda: adapters.LoRETTARepConfig(target_modules=["0"]),
    lambda: adapters.FloraConfig(r=2, target_modules=["0"]), lambda: adapters.MoSConfig(r=2, v=2, p=0, c=1,
                                                                                     target_modules=["0", "2"]),
], ids=["lotr", "loretta-rep", "flora", "mos"])
def test_a_lazy_module_not_materialized_is_refused(config):
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"target '0' is a lazy module not materialized yet .*run one forward pass"):
        get_peft_model(model, config())
    model(torch.randn(2, 8))  # materialized: adaptable
    get_peft_model(model, config())


def test_adp_default_placement_skips_multihead_attention():
    with pytest.raises(ValueError, match="nn.MultiheadAttention's out_proj does not count: it is never called"):
        get_peft_model(_encoder(), adapters.LoRETTAAdpConfig())


def test_injection_from_a_state_dict_plans_the_modules_it_names():
    # PEFT's state_dict path: the checkpoint's keys, not target_modules, choose the layers.
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.v = nn.Linear(4, 4), nn.Linear(4, 4)

    state_dict = {"q.flr_core": torch.zeros(2, 2), "v.flr_core": torch.zeros(2, 2)}
    model = inject_adapter_in_model(adapters.FloraConfig(r=2, target_modules=["q"]), Two(), state_dict=state_dict)
    assert isinstance(model.q, FloraLayer) and isinstance(model.v, FloraLayer)


@pytest.mark.parametrize("kind", ["parametrized", "pruned"])
@pytest.mark.parametrize("config", [adapters.LoTRConfig, adapters.FloraConfig], ids=["lotr", "flora"])
def test_merging_into_a_recomputed_weight_is_refused_before_any_layer_merges(kind, config):
    # Wav2Vec2's positional conv is weight-normed: the merged update was lost and merge_and_unload returned the base
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("plain", nn.Linear(8, 8))
    model.add_module("normed", nn.Linear(8, 8))
    if kind == "parametrized":
        nn.utils.parametrizations.weight_norm(model.normed)
    else:
        prune.l1_unstructured(model.normed, "weight", amount=0.5)
    peft_model = get_peft_model(model, config(r=2, target_modules=["plain", "normed"]))
    plain = peft_model.base_model.model.plain
    before = plain.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge into 'normed': its weight is .*keep the adapter unmerged"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match=r"cannot merge into 'normed'"):
        peft_model.merge_adapter()
    assert not plain.merged_adapters and torch.equal(plain.get_base_layer().weight, before)
