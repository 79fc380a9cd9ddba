"""torch.compile: every format and layer traces as one graph (fullgraph=True) and matches eager.

The table runs on dynamo + AOT autograd with the ``aot_eager`` backend: the same tracing, graph
capture and autograd graph as inductor, without inductor's C++ code generation (5-30 s per graph
on this project's 2 shared cores, against 1-3 s here). Every format also runs through inductor
itself once, at batch 1, forward and backward (:func:`test_every_format_compiles_with_inductor`),
and the MPO split plan (:func:`test_inductor_compiles_the_mpo_split`).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import tensornets
from format_cases import CASE_IDS, FORMAT_CASES, IN, OUT, low_rank_plus_noise
from tolerance import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # compiled code is cached per code object: each test must trace its own graph
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(module: nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of ``sum(y * g)`` w.r.t. ``x`` and every parameter."""
    xg = x.detach().clone().requires_grad_(True)
    y = fn(xg)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad(y, [xg, *module.parameters()], g)
    return y.detach(), list(grads)


def _assert_compiled_equals_eager(module: nn.Module, x: torch.Tensor, backend: str = "aot_eager") -> None:
    compiled = torch.compile(module, fullgraph=True, dynamic=False, backend=backend)  # a graph break raises
    y_eager, g_eager = _grads(module, x, module)
    y_comp, g_comp = _grads(module, x, compiled)
    assert_close(y_comp, y_eager, what="output")
    for i, (a, e) in enumerate(zip(g_comp, g_eager)):
        assert_close(a, e, what="grad of x" if i == 0 else f"grad of parameter {i - 1}")


@pytest.mark.parametrize("batch", [1, 512])
@pytest.mark.parametrize("fmt, kw", FORMAT_CASES, ids=CASE_IDS)
def test_factorized_linear_compiles_without_graph_breaks(fmt, kw, batch):
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), fmt, rank=3, **kw)
    layer = tensornets.FactorizedLinear(fact, torch.randn(OUT))
    _assert_compiled_equals_eager(layer, torch.randn(batch, 2, IN))  # leading dims, as nn.Linear


@pytest.mark.parametrize("fmt, kw", FORMAT_CASES, ids=CASE_IDS)
def test_every_format_compiles_with_inductor(fmt, kw):
    # inductor's own code generation (C++ kernels, its lowering of einsum / bmm / reshapes), at the batch where the
    # planned contraction (not a rebuilt dense weight) runs; the table above checks both batches on aot_eager
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), fmt, rank=3, **kw)
    layer = tensornets.FactorizedLinear(fact, torch.randn(OUT))
    _assert_compiled_equals_eager(layer, torch.randn(1, 2, IN), backend="inductor")


@pytest.mark.parametrize("strategy", ["split", "einsum", "rebuild"])
def test_every_mpo_plan_compiles(strategy):
    # the table's small layers never pick a split; force each MPO candidate once
    W = low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32)
    fact = tensornets.decompose(W, "mpo", rank=3, num_cores=3).set_strategy(strategy)
    assert fact.strategy(8) == strategy
    _assert_compiled_equals_eager(fact, torch.randn(8, IN))


@pytest.mark.parametrize("batch", [1, 512])
@pytest.mark.parametrize("fmt", ["tucker", "lowrank"])
def test_factorized_conv2d_compiles_without_graph_breaks(fmt, batch):
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = tensornets.FactorizedConv2d.from_conv(conv, fmt, rank=2 if fmt == "lowrank" else (3, 2))
    _assert_compiled_equals_eager(layer, torch.randn(batch, 6, 4, 4))


def test_one_graph_serves_a_batch_bucket_with_dynamic_shapes():
    # With a symbolic batch, bucketing turns into guards: every batch in (4, 8] reuses one graph.
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), "mpo", rank=3, num_cores=3)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fact, fullgraph=True, dynamic=True, backend=counter)
    for batch in (5, 6, 8, 7):
        x = torch.randn(batch, IN)
        assert_close(compiled(x), fact(x))
    assert counter.frame_count == 1


# 2..4096 rows: 12 buckets, more than dynamo's default recompile_limit (8)
SWEEP = [2, 3, 5, 9, 17, 33, 65, 129, 257, 513, 1025, 2049, 4096, 700, 6]


@pytest.mark.parametrize("fmt, kw", [("mpo", {"num_cores": 3}), ("btt", {}), ("tucker", {})])
def test_dynamic_batch_compiles_one_graph_per_plan_change_not_per_bucket(fmt, kw):
    torch.manual_seed(0)
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), fmt, rank=3, **kw)
    # the cores require grad and grad mode is on: the forward runs the plans of training
    points = tensornets.formats.base._traced_change_points(fact._plan_structure(), True)
    # the graphs dynamo must build: one per interval between the buckets where the plan's ops change
    expected = len({next(p for p in points if b <= p) for b in SWEEP})
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fact, fullgraph=True, dynamic=True, backend=counter)
    for batch in SWEEP:
        x = torch.randn(batch, IN)
        assert_close(compiled(x), fact(x), what=f"batch {batch}")
    assert counter.frame_count == expected < 12


@pytest.mark.parametrize("fmt, kw", [("lowrank", {}), ("mpo", {"num_cores": 3}), ("btt", {})])
def test_layers_of_one_structure_share_compiled_code(fmt, kw):
    """Regional compilation (each block or layer compiled on its own): the layers run one compiled code, as
    nn.Linear layers do, instead of recompiling per layer (dynamo's recompile_limit of 8 would stop the 9th).
    A layer of another structure compiles its own graph."""
    torch.manual_seed(0)
    layers = [tensornets.FactorizedLinear(tensornets.decompose(torch.randn(OUT, IN), fmt, rank=3, **kw),
                                          torch.randn(OUT)) for _ in range(12)]
    counter = torch._dynamo.testing.CompileCounter()
    x = torch.randn(4, IN)
    for layer in layers:
        assert_close(torch.compile(layer, fullgraph=True, backend=counter)(x), layer(x))
    assert counter.frame_count == 1
    other = tensornets.FactorizedLinear(tensornets.decompose(torch.randn(OUT, IN), fmt, rank=2, **kw), None)
    assert_close(torch.compile(other, fullgraph=True, backend=counter)(x), other(x))
    assert counter.frame_count == 2


def test_one_graph_holds_layers_of_several_structures(monkeypatch, tmp_path):
    """A block compiled as one graph traces layers of different structures (a Llama MLP's up and down projections);
    plans chosen earlier in the same trace, or measured before it (tune), are found."""
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path))
    tensornets.wisdom.forget()
    torch.manual_seed(0)
    up = tensornets.FactorizedLinear(tensornets.decompose(torch.randn(OUT, IN), "lowrank", rank=3), torch.randn(OUT))
    down = tensornets.FactorizedLinear(tensornets.decompose(torch.randn(IN, OUT), "tt", rank=2, num_cores=2), None)
    block = lambda x: down(torch.relu(up(x)))
    x = torch.randn(5, IN)
    for _ in range(2):
        counter = torch._dynamo.testing.CompileCounter()
        assert_close(torch.compile(block, fullgraph=True, backend=counter)(x), block(x))
        assert counter.frame_count == 1
        up.factorization.tune([5])  # new wisdom: the next trace chooses again
        torch._dynamo.reset()


def test_regional_compilation_of_a_llama_with_factorized_mlps():
    """`for block in model.model.layers: block.compile(fullgraph=True)`: the blocks share one compiled code, the MLPs'
    up / gate / down projections (two structures) inside it, and the model equals eager."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense = getattr(layer.mlp, name)
            setattr(layer.mlp, name, tensornets.FactorizedLinear.from_linear(dense, "lowrank", rank=4))
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        counter = torch._dynamo.testing.CompileCounter()
        for layer in model.model.layers:
            layer.compile(fullgraph=True, backend=counter)
        # use_cache=False: a KV cache recompiles per block, with nn.Linear layers too
        assert_close(model(ids, use_cache=False).logits, expected)
    assert counter.frame_count == 1


def test_a_forced_plan_compiles_once_for_every_batch():
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), "tt", rank=3, num_cores=2)
    fact.set_strategy("rebuild")
    layer = tensornets.FactorizedLinear(fact, torch.randn(OUT))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    for batch in SWEEP:
        x = torch.randn(batch, IN)
        assert_close(compiled(x), layer(x), what=f"batch {batch}")
    assert counter.frame_count == 1


def test_tracing_never_measures(monkeypatch, tmp_path):
    # strategy="measure" without wisdom: the formula decides while tracing, nothing is timed.
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path))
    tensornets.wisdom.forget()

    def no_timing(fn):
        raise AssertionError("a candidate was timed during tracing")

    monkeypatch.setattr(tensornets.formats.base, "default_timer", no_timing)
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), "tt", rank=3, num_cores=2)
    fact.set_strategy("measure")
    x = torch.randn(4, IN)
    assert_close(torch.compile(fact, fullgraph=True, backend="aot_eager")(x), x @ fact.to_dense().T)
    assert not (tmp_path / "wisdom.json").exists()


def test_inductor_compiles_the_mpo_split():
    # One case through inductor's code generation (the table above uses aot_eager, see the module docstring).
    W = low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32)
    fact = tensornets.decompose(W, "mpo", rank=3, num_cores=3).set_strategy("split")
    _assert_compiled_equals_eager(fact, torch.randn(8, IN), backend="inductor")


def test_inductor_compiles_the_btt_columns_layout():
    # BTT's columns layout (the formula's contraction for large batches) reads its hidden as a transposed operand
    W = low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32)
    fact = tensornets.decompose(W, "btt", rank=3).set_strategy("contract")
    assert fact._plan(512, grad=True).label == "contract@cols"
    _assert_compiled_equals_eager(fact, torch.randn(256, 2, IN), backend="inductor")


def test_opaque_bmm_passes_torch_opcheck():
    # the custom op behind extern_ops.bmm: schema, fake (meta) kernel and autograd registration agree with eager
    from tensornets.extern_ops import _opaque_bmm

    gen = torch.Generator().manual_seed(0)
    for p in (1, 3):
        a = torch.randn(4, p, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(_opaque_bmm, (a, b))
        torch.autograd.gradcheck(_opaque_bmm, (a, b))


def test_btt_batch_one_compiles_through_the_opaque_bmm():
    # one row in total (the table above feeds (B, 2, IN), so at least 2 rows): the path of extern_ops.bmm, forward
    # and backward through the custom op's autograd registration
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), "btt", rank=3)
    _assert_compiled_equals_eager(fact, torch.randn(1, IN, generator=torch.Generator().manual_seed(2)))


def test_inductor_keeps_btt_batch_one_products_as_blas_calls():
    # inductor would lower a CPU bmm with one row per batch entry to a fused mul + sum loop, slower than BLAS on
    # BTT's blocks; through extern_ops.bmm the compiled B=1 graph calls the opaque op
    from torch._inductor.utils import run_and_get_code

    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), "btt", rank=3)
    compiled = torch.compile(fact, fullgraph=True, dynamic=False)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, codes = run_and_get_code(compiled, x)
        assert_close(y, fact(x), what="output")
    code = "".join(codes)
    calls = code.count("torch.ops.tensornets.bmm.default(")
    # torch 2.11 (a GPU machine's) found 0 here; the lines that multiply say how its inductor wrote the products
    products = [line.strip() for line in code.splitlines() if "bmm" in line or "extern_kernels" in line]
    assert calls == 2, f"expected both BTT products as opaque bmm calls in the compiled graph, found {calls}: " \
                       f"{products}"
