"""What the block pipeline and the evaluation keep in memory: packed codes, factors in the storage dtype, shared
factor storage when applied, per-token NLL a chunk of log-softmax at a time -- each equal to the unreduced form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import calib, logits, tiny_llama, whole_model
from tolerance import assert_close
from torch import nn

from compress import CompressionConfig
from compress.eora import CompensatedLayer
from compress.evaluation import perplexity, token_nll
from compress.pipeline import compress_blocks, float32_compute
from compress.quantized import PackedQuantizedWeight

RTN = CompressionConfig(method="rtn", bits=3, group_size=16)


def test_pipeline_keeps_packed_codes_equal_to_the_whole_model_codes():
    model = tiny_llama()
    batches = calib()
    expected, _ = whole_model(model, RTN, batches)
    out = compress_blocks(model, RTN, batches, progress=False)
    assert sorted(out.report.quantized) == sorted(expected.quantized)
    for name, packed in out.report.quantized.items():
        assert isinstance(packed, PackedQuantizedWeight), name
        unpacked, want = packed.unpack(), expected.quantized[name]
        assert torch.equal(unpacked.codes, want.codes) and torch.equal(unpacked.zero_point, want.zero_point), name
        # the layer holds exactly the dequantized codes
        assert torch.equal(packed.dequantize(), out.model.get_submodule(name).weight), name


def test_factors_are_kept_in_the_storage_dtype():
    """bfloat16 model: the factors are kept in bfloat16 (what the exported adapter holds); a float32 model keeps
    float32 factors (rounding to the storage dtype is then the identity)."""
    model = tiny_llama(dtype=torch.bfloat16)
    out = compress_blocks(model, RTN, calib(), eora_rank=4, progress=False)
    assert {t.dtype for f in out.eora.factors.values() for t in f} == {torch.bfloat16}
    float_model = tiny_llama()
    float_out = compress_blocks(float_model, RTN, calib(), eora_rank=4, progress=False)
    assert {t.dtype for f in float_out.eora.factors.values() for t in f} == {torch.float32}


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_compensated_layer_shares_the_factors_and_computes_in_float32(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 10), torch.randn(3, 12)
        B, A = torch.randn(10, 4), torch.randn(4, 12)
    else:
        base, x = nn.Conv2d(3, 10, 3, padding=1), torch.randn(2, 3, 6, 6)
        B, A = torch.randn(10, 4), torch.randn(4, 27)
    Bh, Ah = B.bfloat16(), A.bfloat16()
    layer = CompensatedLayer(base, Bh, Ah)
    assert layer.lora_A.weight.data_ptr() == Ah.data_ptr() and layer.lora_B.weight.data_ptr() == Bh.data_ptr()
    assert layer.lora_A.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = layer(x)
        # float32 arithmetic on the bfloat16 values, as PEFT runs a bfloat16 adapter
        want = CompensatedLayer(base, Bh.float(), Ah.float())(x)
        if kind == "linear":
            reference = base(x) + (x.double() @ Ah.double().T @ Bh.double().T).float()
        else:
            h = F.conv2d(x.double(), Ah.double().reshape(4, 3, 3, 3), padding=1)
            reference = base(x) + F.conv2d(h, Bh.double()[:, :, None, None]).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert_close(got, reference, what="compensated output")


def test_float32_compute_keeps_the_factors_shared():
    """Evaluating a bfloat16 model with bfloat16 factors applied: one block upcast at a time, and afterwards the
    applied layers still hold the adapter's own factor storage (no second copy)."""
    model = tiny_llama(dtype=torch.bfloat16)
    out = compress_blocks(model, RTN, calib(), eora_rank=4, inplace=True, progress=False)
    ids = calib(n=1)[0]
    with torch.no_grad():
        want = logits(out.eora.apply(copy.deepcopy(out.model).float()), [ids])
        compensated = out.eora.apply(out.model, inplace=True)
        with float32_compute(compensated):
            got = logits(compensated, [ids])
    assert torch.equal(got, want)
    for name, (B, A) in out.eora.factors.items():
        layer = compensated.get_submodule(name)
        assert layer.lora_A.weight.data_ptr() == A.data_ptr() and layer.lora_B.weight.data_ptr() == B.data_ptr()


@pytest.mark.parametrize("chunk", [1, 5, 32, 1000])
def test_token_nll_is_bitwise_the_unchunked_cross_entropy(chunk):
    torch.manual_seed(0)
    z = torch.randn(77, 301) * 4
    y = torch.randint(0, 301, (77,))
    want = F.cross_entropy(z, y, reduction="none")
    assert torch.equal(token_nll(z, y, chunk), want)
    assert torch.equal(token_nll(z.bfloat16(), y, chunk), F.cross_entropy(z.bfloat16().float(), y, reduction="none"))


def test_token_nll_bad_input_names_the_argument():
    z, y = torch.randn(4, 9), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="logits"):
        token_nll(z[0], y)
    with pytest.raises(ValueError, match="targets"):
        token_nll(z, y[:3])
    with pytest.raises(ValueError, match="chunk"):
        token_nll(z, y, 0)


def _reference_perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Full logits, one cross entropy per batch, per-token NLLs summed in float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batches:
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
            z = model(input_ids=ids).logits
            nll = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                  reduction="none")
            total += nll.double().sum()
            count += nll.numel()
    return math.exp((total / count).item())


def _batches() -> list[torch.Tensor]:
    # batches of 2 x 40 tokens (two head chunks per sequence, the second partial) and one 9-token sequence
    return list(calib(n=3, batch=2, seq=40)) + [calib(n=1, batch=1, seq=9, seed=7)[0][0]]


def test_perplexity_applies_the_head_in_chunks_and_equals_the_full_logits(monkeypatch):
    """In float64 the chunked head gives the perplexity of the full logits to float64 rounding."""
    import compress.evaluation as evaluation

    calls = []
    head_nll = evaluation._head_nll
    monkeypatch.setattr(evaluation, "_head_nll", lambda *a: calls.append(1) or head_nll(*a))
    model = tiny_llama().double()
    assert perplexity(model, _batches()) == pytest.approx(_reference_perplexity(model, _batches()), rel=1e-12)
    assert len(calls) == len(_batches())


def test_perplexity_keeps_full_logits_when_the_model_rescales_them(monkeypatch):
    """A model that changes its logits after the head (soft-capping, scaling) is evaluated on its own logits."""
    import compress.evaluation as evaluation

    model = tiny_llama()

    def halve(_module, _args, out):
        out["logits"] = out["logits"] / 2
        return out

    model.register_forward_hook(halve)
    monkeypatch.setattr(evaluation, "_head_nll", lambda *a: pytest.fail("the head was applied in chunks"))
    assert perplexity(model, _batches()) == _reference_perplexity(model, _batches())
