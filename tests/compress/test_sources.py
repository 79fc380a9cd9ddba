"""RTN fake quantization and magnitude pruning."""

import warnings

import pytest
import torch

from compress.sources import prune_2_4, prune_magnitude, quantization_grid, rtn_quantize, rtn_quantize_weight
from tolerance import assert_close, relative_error


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_groups_use_at_most_2_to_the_bits_levels(bits, symmetric):
    torch.manual_seed(0)
    W = torch.randn(8, 128)
    Q = rtn_quantize(W, bits, 32, symmetric=symmetric)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    for group in Q.reshape(-1, 32):
        assert group.unique().numel() <= 2**bits
    # round to nearest: each weight moves by at most half a step (+ clamping of the symmetric grid's extreme)
    step = (W.reshape(-1, 32).amax(1) - W.reshape(-1, 32).amin(1)) / (2**bits - 1)
    if not symmetric:
        err = (Q - W).reshape(-1, 32).abs().amax(1)
        assert (err <= step / 2 + 1e-6).all()


def test_rtn_error_shrinks_with_bits_and_group_size():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    err = lambda **kw: float((rtn_quantize(W, **kw) - W).norm())
    assert err(bits=2, group_size=64) > err(bits=3, group_size=64) > err(bits=4, group_size=64)
    assert err(bits=3, group_size=None) > err(bits=3, group_size=128) > err(bits=3, group_size=32)


def test_rtn_group_size_must_divide_the_input_width():
    """576 = 4 * 128 + 64: packed formats store whole groups, so 128 is refused and named; >= in is per-row."""
    W = torch.randn(4, 576)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=576.*\[96, 72, 64\]"):
        rtn_quantize(W, 3, 128)
    assert torch.equal(rtn_quantize(W, 3, 1024), rtn_quantize(W, 3, None))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_weight_is_the_reference_grid_and_dequantizes_to_rtn_quantize(bits, symmetric):
    """Codes and zero points in the signed range, 0 inside every group's range (compressed-tensors' convention)."""
    from obs_reference import grid

    torch.manual_seed(0)
    W = torch.randn(8, 96) + 0.8  # groups with positive minima: the grid must still contain 0
    qw = rtn_quantize_weight(W, bits, 32, symmetric=symmetric)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert qw.codes.dtype == torch.int8 and qmin <= int(qw.codes.min()) and int(qw.codes.max()) <= qmax
    assert qmin <= int(qw.zero_point.min()) and int(qw.zero_point.max()) <= qmax
    scale, zero = grid(W.double().reshape(-1, 32), bits, symmetric)
    assert_close(qw.scale.double().flatten(), scale, tol=1e-7)
    assert torch.equal(qw.zero_point.double().flatten(), zero)
    assert torch.equal(rtn_quantize(W, bits, 32, symmetric=symmetric), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_grid_is_the_reference_search_and_never_worse_than_minmax(bits, symmetric):
    """observer='mse': per group the shrink p in {1, .99, ..., .81} with the least sum |Δ|^2.4 (slow reference)."""
    from obs_reference import grid

    torch.manual_seed(0)
    W = torch.randn(6, 64) * torch.where(torch.rand(6, 64) < 0.05, 5.0, 1.0)  # a few outliers per group
    groups = W.double().reshape(-1, 32)
    scale, zero = quantization_grid(groups, bits, symmetric, observer="mse")
    ref_scale, ref_zero = grid(groups, bits, symmetric, "mse")
    assert_close(scale, ref_scale, tol=1e-12)
    assert torch.equal(zero, ref_zero)
    qw = rtn_quantize_weight(W, bits, 32, symmetric=symmetric, observer="mse")  # the same search in float32
    err = lambda q: (q.dequantize() - W).abs().pow(2.4).reshape(-1, 32).sum(1)
    minmax = err(rtn_quantize_weight(W, bits, 32, symmetric=symmetric))
    assert (err(qw) <= minmax * (1 + 1e-6)).all() and (err(qw) < 0.99 * minmax).any()


def test_unknown_observer_is_named():
    from compress import CompressionConfig

    with pytest.raises(ValueError, match="observer='histogram' must be one of"):
        rtn_quantize_weight(torch.randn(4, 8), 3, 4, observer="histogram")
    with pytest.raises(ValueError, match="observer='histogram'"):
        CompressionConfig(method="gptq", bits=3, group_size=64, observer="histogram")


def test_rtn_keeps_constant_groups_exact_and_dtype():
    W = torch.ones(2, 8, dtype=torch.bfloat16) * 0.3
    Q = rtn_quantize(W, 2, 4)
    assert Q.dtype == torch.bfloat16 and torch.equal(Q, W)


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=3, group_size=0), dict(bits=1, symmetric=True)])
def test_rtn_bad_arguments(bad):
    with pytest.raises(ValueError, match="bits|group_size|symmetric"):
        rtn_quantize(torch.randn(4, 8), **bad)


def test_prune_2_4_pattern_keeps_the_two_largest():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    P = prune_2_4(W)
    groups, orig = P.reshape(16, 16, 4), W.reshape(16, 16, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    kept_min = torch.where(groups != 0, orig.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(groups == 0, orig.abs(), -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(P[P != 0], W[P != 0])
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_2_4(torch.randn(4, 10))


def test_prune_magnitude_exact_sparsity():
    torch.manual_seed(0)
    W = torch.randn(10, 30)
    P = prune_magnitude(W, 0.4)
    assert int((P == 0).sum()) == 120
    assert P[P != 0].abs().min() >= W[P == 0].abs().max()
    assert torch.equal(prune_magnitude(W, 0.0), W)
    with pytest.raises(ValueError, match="sparsity=1.0"):
        prune_magnitude(W, 1.0)


@pytest.mark.parametrize("magnitude", [1e7, 1e-30])
def test_scales_the_scale_dtype_cannot_hold_are_refused(magnitude):
    # float16 scales overflowed to inf (NaN weights) or underflowed to 0 (the group quantized to zeros), silently
    torch.manual_seed(0)
    W = torch.randn(8, 64) * magnitude
    with pytest.raises(ValueError, match=r"quantization scale\(s\) .* do not fit scale_dtype=torch.float16 .*"
                                         r"scale_dtype=torch.bfloat16 or torch.float32"):
        rtn_quantize_weight(W, bits=4, group_size=32, scale_dtype=torch.float16)
    q = rtn_quantize_weight(W, bits=4, group_size=32, scale_dtype=torch.bfloat16)
    assert torch.isfinite(q.dequantize()).all() and relative_error(q.dequantize(), W) < 0.2


def test_subnormal_scales_warn():
    # float16 scales of 5e-7 weights are subnormal: kept, but the groups quantize measurably worse than in float32
    torch.manual_seed(0)
    W = torch.randn(64, 128) * 5e-7
    with pytest.warns(UserWarning, match=r"quantization scale\(s\) .* are subnormal in scale_dtype=torch.float16"):
        half = rtn_quantize_weight(W, bits=4, group_size=32, scale_dtype=torch.float16)
    full = rtn_quantize_weight(W, bits=4, group_size=32, scale_dtype=torch.float32)
    assert relative_error(half.dequantize(), W) > 1.2 * relative_error(full.dequantize(), W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rtn_quantize_weight(W * 1e4, bits=4, group_size=32, scale_dtype=torch.float16)  # normal scales: no warning


def test_pruning_refuses_nan_and_quantizers_a_dtype_name():
    W = torch.randn(4, 8)
    W[1, 2] = float("nan")  # a NaN sorts anywhere: it was kept or dropped at random, silently
    for prune in (prune_2_4, lambda w: prune_magnitude(w, 0.5)):
        with pytest.raises(ValueError, match="contains NaN or inf"):
            prune(W)
    with pytest.raises(TypeError, match="scale_dtype='float16' must be a floating torch dtype"):
        rtn_quantize_weight(torch.randn(4, 8), 4, 8, scale_dtype="float16")


@pytest.mark.parametrize("W", [torch.randn(4, 8, dtype=torch.complex64), torch.zeros(0, 8)])
def test_rtn_refuses_complex_and_empty_weights(W):
    with pytest.raises(TypeError, match="W must be a non-empty real floating matrix"):
        rtn_quantize_weight(W, 4, 8)
