"""torch.export and torch.jit.trace: every format records its plan as ATen ops and matches eager."""

from __future__ import annotations

import pytest
import torch

import tensornets
from format_cases import CASE_IDS, FORMAT_CASES, IN, OUT, low_rank_plus_noise
from tensornets.formats.base import _forget_traced_plans
from tolerance import assert_close


@pytest.fixture(autouse=True)
def _fresh_tracing_state():
    # no stand-in or traced plan left by an earlier compile: a non-strict export used to need one
    torch._dynamo.reset()
    _forget_traced_plans()
    yield
    torch._dynamo.reset()


def _layer(fmt: str, kw: dict) -> tensornets.FactorizedLinear:
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32), fmt, rank=3, **kw)
    return tensornets.FactorizedLinear(fact, torch.randn(OUT, generator=torch.Generator().manual_seed(0))).eval()


def _op_namespaces(program: torch.export.ExportedProgram) -> set[str]:
    return {node.target.namespace for node in program.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("fmt, kw", FORMAT_CASES, ids=CASE_IDS)
def test_export_records_aten_ops_equal_to_eager(fmt, kw, batch, strict):
    layer = _layer(fmt, kw)
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(layer, (x,), strict=strict)
    # ATen only: the program loads in a torch without this package (BTT's batch-1 products used to be a custom op)
    assert _op_namespaces(program) <= {"aten"}, _op_namespaces(program)
    with torch.no_grad():
        assert_close(program.module()(x), layer(x), what="exported output")


@pytest.mark.parametrize("fmt, kw", FORMAT_CASES, ids=CASE_IDS)
def test_jit_trace_equals_eager(fmt, kw):
    layer = _layer(fmt, kw)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(2))
    # as users call it: grad on, trainable cores, and trace's own check (a second trace under no_grad) left on;
    # both record the inference plan, whatever the training plan is
    traced = torch.jit.trace(layer, (x,))
    with torch.no_grad():
        assert_close(traced(x), layer(x), what="traced output")
        assert_close(torch.jit.trace(layer, (x,))(x), layer(x), what="output traced under no_grad")


def test_a_forced_plan_exports_one_graph_for_a_dynamic_batch():
    layer = _layer("tucker", {"num_cores": 2})
    layer.factorization.set_strategy("rebuild")
    batch = torch.export.Dim("batch", min=2, max=100_000)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(3))
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    for rows in (2, 1000):
        x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert_close(program.module()(x), layer(x), what=f"{rows} rows")
