"""GPTQ against the slow column-by-column reference, and its guarantees."""

import pytest
import torch
from obs_reference import correlated_layer as _layer, output_error as _output_error, reference_sweep

from compress.gptq import gptq_quantize
from compress.sources import rtn_quantize_weight
from tolerance import assert_close




@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("group_size", "block_size"), [(16, 128), (16, 12), (None, 10), (24, 32)])
def test_gptq_equals_the_slow_reference(bits, symmetric, act_order, group_size, block_size):
    W, C = _layer(dead=(5,))
    qw = gptq_quantize(W, C, bits, group_size, symmetric=symmetric, act_order=act_order, block_size=block_size)
    ref = reference_sweep(W, C, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order)
    assert torch.equal(qw.codes.double(), ref["codes"])
    assert_close(qw.scale.double(), ref["scale"], tol=1e-12)
    assert torch.equal(qw.zero_point.double(), ref["zero"])
    assert_close(qw.dequantize().double(), ref["weight"], tol=1e-6)
    assert (qw.group_size, qw.bits, qw.symmetric) == (group_size or 48, bits, symmetric)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_the_mse_grid_equals_the_slow_reference(bits, symmetric, act_order):
    """Clipped grids: H_ii-weighted on act-order's static groups, plain |Δ|^2.4 on the sweep's own groups."""
    W, C = _layer(dead=(5,))
    W[:, 3] *= 6.0  # outliers make clipping pay
    qw = gptq_quantize(W, C, bits, 16, symmetric=symmetric, act_order=act_order, block_size=12, observer="mse")
    ref = reference_sweep(W, C, bits=bits, group_size=16, symmetric=symmetric, act_order=act_order, observer="mse")
    minmax = gptq_quantize(W, C, bits, 16, symmetric=symmetric, act_order=act_order)
    assert torch.equal(qw.codes.double(), ref["codes"]) and torch.equal(qw.zero_point.double(), ref["zero"])
    assert_close(qw.scale.double(), ref["scale"], tol=1e-12)
    assert (qw.scale < minmax.scale).any()  # some groups were clipped


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_fit_the_signed_range_and_beat_rtn(act_order):
    W, C = _layer(out_f=32, in_f=64, tokens=300)
    qw = gptq_quantize(W, C, 3, 16, act_order=act_order)
    assert qw.codes.dtype == torch.int8 and int(qw.codes.min()) >= -4 and int(qw.codes.max()) <= 3
    assert int(qw.zero_point.min()) >= -4 and int(qw.zero_point.max()) <= 3
    assert _output_error(W, qw.dequantize(), C) < 0.8 * _output_error(W, rtn_quantize_weight(W, 3, 16).dequantize(), C)


def test_dead_inputs_get_zero_columns():
    W, C = _layer(dead=(0, 7))
    qw = gptq_quantize(W, C, 4, 16)
    W_hat = qw.dequantize()
    assert torch.isfinite(W_hat).all() and not W_hat[:, [0, 7]].any()


def test_bad_arguments_name_the_fix():
    W, C = _layer(in_f=48)
    with pytest.raises(ValueError, match="group_size=32 does not divide in_features=48"):
        gptq_quantize(W, C, 4, 32)
    with pytest.raises(ValueError, match="bits=9"):
        gptq_quantize(W, C, 9, 16)
    with pytest.raises(ValueError, match="gram of shape"):
        gptq_quantize(W, C[:4, :4], 4, 16)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(W, -C, 4, 16)
    with pytest.raises(ValueError, match="observer='max'.*'minmax', 'mse'"):
        gptq_quantize(W, C, 4, 16, observer="max")
    W[0, 3] = float("nan")  # a NaN would zero its group (RTN) or spread through the error feedback (GPTQ)
    for quantize in (lambda: gptq_quantize(W, C, 4, 16), lambda: rtn_quantize_weight(W, 4, 16)):
        with pytest.raises(ValueError, match="contains NaN or inf"):
            quantize()


@pytest.mark.slow
def test_gptq_output_error_is_at_most_rtns_on_every_smollm2_layer(smollm2):
    """3-bit, groups of 64, on every block linear of SmolLM2-135M: ``‖(W − Ŵ) X‖`` on the calibration tokens."""
    from compress import CompressionConfig, collect_activation_stats, compress_model
    from compress.models import token_slices

    model, tokenizer = smollm2
    calib, _ = token_slices(tokenizer, 4 * 128, 128, 128)
    stats = collect_activation_stats(model, calib, "all-linear", progress=False)
    errors = {}
    for method in ("rtn", "gptq"):
        report = compress_model(model, CompressionConfig(method=method, bits=3, group_size=64), stats, progress=False)
        errors[method] = {r.name: r.rel_output_error for r in report.layers}
        del report
    assert len(errors["gptq"]) == 30 * 7
    worse = {n: (errors["gptq"][n], e) for n, e in errors["rtn"].items() if errors["gptq"][n] > e}
    assert not worse, worse
    mean = {m: sum(e.values()) / len(e) for m, e in errors.items()}
    assert mean["gptq"] < 0.8 * mean["rtn"], mean
