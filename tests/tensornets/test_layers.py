"""FactorizedLinear and FactorizedConv2d as drop-in replacements."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import tensornets
from tensornets import FactorizedConv2d, FactorizedLinear
from format_cases import IN, OUT, full_rank
from tolerance import assert_close


def test_from_linear_full_rank_matches_the_linear(format_case):
    fmt, kw = format_case
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).double()
    layer = FactorizedLinear.from_linear(linear, fmt, rank=full_rank(fmt, kw), **kw)
    x = torch.randn(7, 3, IN, dtype=torch.float64)
    assert_close(layer(x), linear(x))
    back = layer.to_linear()
    assert_close(back.weight, linear.weight)
    assert_close(back.bias, linear.bias)
    assert layer.num_parameters == sum(p.numel() for p in layer.parameters())


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(format_case):
    """Under ``torch.autocast`` a float32 layer takes float32 or bfloat16 activations (the output of an earlier
    autocast layer) and returns bfloat16, bias included, as ``nn.Linear`` does; gradients reach the float32
    parameters."""
    fmt, kw = format_case
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    layer = FactorizedLinear.from_linear(linear, fmt, rank=full_rank(fmt, kw), **kw)
    x = torch.randn(5, IN)
    for xin in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, expected = layer(xin), linear(xin)
        assert y.dtype == expected.dtype == torch.bfloat16
        # both round the products to bfloat16 (8 significant bits), in different orders
        assert_close(y.float(), expected.float(), tol=5e-2)
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
        layer.zero_grad()
    # outside autocast the dtype check stands
    with pytest.raises(TypeError, match="cast x or .to"):
        layer(x.bfloat16())


def test_autocast_takes_float32_activations_into_a_bfloat16_layer(format_case):
    """A bfloat16 model under autocast gets float32 activations from the ops autocast keeps in float32 (norms,
    softmax): ``nn.Linear`` takes them, and so does a factorized layer, with the same output dtype."""
    fmt, kw = format_case
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).bfloat16()
    layer = FactorizedLinear.from_linear(linear, fmt, rank=full_rank(fmt, kw), **kw)
    x = torch.randn(5, IN)
    for xin in (x, x.half()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, expected = layer(xin), linear(xin)
        assert y.dtype == expected.dtype == torch.bfloat16
        assert_close(y.float(), expected.float(), tol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="cast x or .to"):
        layer(x.double())  # autocast leaves float64 alone, and so does nn.Linear (a dtype error)


def test_from_linear_keeps_no_bias_and_rejects_non_linear():
    layer = FactorizedLinear.from_linear(nn.Linear(IN, OUT, bias=False), "lowrank", rank=4)
    assert layer.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        FactorizedLinear.from_linear(nn.Conv2d(3, 3, 1), "lowrank", rank=1)


def test_factorized_linear_trains():
    torch.manual_seed(0)
    layer = FactorizedLinear.create(64, 32, "mpo", rank=4, num_cores=2)
    teacher = torch.randn(32, 64) / 8
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 64)
    first = None
    for _ in range(50):
        loss = ((layer(x) - x @ teacher.T) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


@pytest.mark.parametrize("fmt", ["tucker", "lowrank"])
@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1), dict(stride=2, padding=0, dilation=2)])
def test_conv_full_rank_equals_the_conv(fmt, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, **geometry).double()
    full = (10, 6) if fmt == "tucker" else 10
    layer = FactorizedConv2d.from_conv(conv, fmt, rank=full)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    assert_close(layer(x), conv(x))
    assert_close(layer.to_conv().weight, conv.weight)


@pytest.mark.parametrize("fmt, rank", [("tucker", (4, 3)), ("lowrank", 4)])
def test_truncated_conv_forward_equals_its_dense_kernel(fmt, rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1).double()
    layer = FactorizedConv2d.from_conv(conv, fmt, rank=rank)
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    assert_close(layer(x), layer.to_conv()(x))
    kernel_params = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert layer.num_parameters - 10 == kernel_params


def test_conv_tucker_errors_decrease_with_rank_and_keep_fits():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3).double()
    errs = [float((FactorizedConv2d.from_conv(conv, rank=r).weight_dense() - conv.weight).norm()) for r in (2, 4, 8, 16)]
    assert errs == sorted(errs, reverse=True)
    layer = FactorizedConv2d.from_conv(conv, keep=0.3)
    assert layer.num_parameters - 24 <= 0.3 * conv.weight.numel()
    # the largest channel rank that fits: one more does not
    r = layer.ranks[0]
    assert layer.ranks == (r, r, 9)
    bigger = tensornets.Tucker.parameter_count((16, 9), (24,), (r + 1, r + 1, 9))
    assert bigger > 0.3 * conv.weight.numel()
    with pytest.warns(DeprecationWarning, match="budget= is renamed keep="):
        assert FactorizedConv2d.from_conv(conv, budget=0.3).ranks == layer.ranks


@pytest.mark.parametrize("fmt, rank", [("tucker", (4, 3)), ("tucker", (4, 3, 5)), ("lowrank", 4)])
def test_conv_wraps_a_core_factorization_and_equals_a_dense_conv_of_it(fmt, rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1).double()
    layer = FactorizedConv2d.from_conv(conv, fmt, rank=rank)
    fact = layer.factorization
    assert isinstance(fact, tensornets.Tucker if fmt == "tucker" else tensornets.LowRank)
    assert (fact.out_features, fact.in_features) == (10, 6 * 9)
    # the static helpers say which core and ranks from_conv builds, without a kernel
    assert FactorizedConv2d.core_structure(fmt, 6, 10, (3, 3)) == (type(fact), fact.in_modes, fact.out_modes)
    assert FactorizedConv2d.core_rank(fmt, rank, (3, 3), 6, 10) == (tuple(fact.ranks) if fmt == "tucker" else rank)
    # the core's to_dense() is the kernel, and a dense conv with it is the layer
    kernel = fact.to_dense().detach().reshape(10, 6, 3, 3)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, kernel, conv.bias, stride=2, padding=1)
    assert_close(layer(x), expected)
    # it is the core's decomposition of the reshaped kernel
    ranks = layer.ranks if fmt == "tucker" else rank
    modes = (((10,), (6, 9)) if fmt == "tucker" else ((10,), (54,)))
    direct = tensornets.decompose(conv.weight.detach().reshape(10, -1), fmt, rank=ranks, modes=modes)
    assert_close(fact.to_dense().detach(), direct.to_dense().detach())
    # wrapping the same factorization gives the same layer
    again = FactorizedConv2d.from_factorization(direct, 3, stride=2, padding=1, bias=conv.bias.detach())
    assert_close(again(x), expected)


def test_conv_eps_bounds_the_kernel_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3).double()
    for fmt in ("tucker", "lowrank"):
        layer = FactorizedConv2d.from_conv(conv, fmt, eps=0.3)
        err = float((layer.weight_dense().detach() - conv.weight).norm() / conv.weight.norm())
        assert err <= 0.3 * (1 + 1e-9), (fmt, err)


def test_conv_random_init_std():
    layer = FactorizedConv2d.create(64, 128, 3, rank=16, generator=torch.Generator().manual_seed(0))
    assert float(layer.weight_dense().detach().std()) == pytest.approx((64 * 9) ** -0.5, rel=0.15)


@pytest.mark.parametrize(
    "conv, match",
    [
        (nn.Conv2d(8, 8, 3, groups=8), "groups=8"),
        (nn.Conv2d(8, 16, 3, groups=2), "groups=2"),
    ],
)
def test_conv_refuses_grouped(conv, match):
    with pytest.raises(ValueError, match=match):
        FactorizedConv2d.from_conv(conv, rank=2)


@pytest.mark.parametrize("c_in, c_out", [(3, 64), (8, 16), (16, 8)])
def test_conv_int_rank_and_keep_cap_each_channel_mode(c_in, c_out):
    # an int rank is capped per channel mode, as every core format caps an int (the first conv of a
    # CNN has C_in = 3 and any channel rank above 3 is lossless there)
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3).double()
    f_out, f_in = min(c_out, 9 * c_in), min(c_in, 9 * c_out)  # full ranks of the channel modes
    big = max(f_out, f_in)
    layer = FactorizedConv2d.from_conv(conv, rank=big)
    assert layer.ranks == (f_out, f_in, 9)
    assert_close(layer.weight_dense(), conv.weight, what="kernel at full channel ranks")
    assert FactorizedConv2d(c_in, c_out, 3, rank=big).ranks == (f_out, f_in, 9)
    with pytest.raises(ValueError, match="does not fit"):
        FactorizedConv2d.from_conv(conv, rank=big + 1)
    with pytest.raises(ValueError, match="does not fit"):
        FactorizedConv2d.resolve_structure("tucker", c_in, c_out, 3, rank=big + 1)
    with pytest.raises(ValueError, match="below the cost of rank 1"):
        FactorizedConv2d.resolve_structure("lowrank", c_in, c_out, 3, keep=0.5 * (c_out + 9 * c_in) / (9 * c_out * c_in))
    dense = conv.weight.numel()
    for keep in (0.5, 0.9):
        layer = FactorizedConv2d.from_conv(conv, keep=keep)
        r = max(layer.ranks[:2])
        assert layer.ranks == (min(r, f_out), min(r, f_in), 9)
        assert FactorizedConv2d.resolve_structure("tucker", c_in, c_out, 3, keep=keep) == layer.ranks  # no kernel read
        assert layer.num_parameters - c_out <= keep * dense
        if r < big:  # the largest r that fits: one more does not
            more = tensornets.Tucker.parameter_count((c_in, 9), (c_out,), (min(r + 1, f_out), min(r + 1, f_in), 9))
            assert more > keep * dense


def test_conv_geometry_and_values_are_checked_like_nn_conv2d():
    for kwargs, match in [(dict(padding="bogus"), "padding='bogus' must be 'same', 'valid'"),
                          (dict(kernel_size=0), r"kernel_size=\(0, 0\) must be positive"),
                          (dict(stride=(1, 0)), r"stride=\(1, 0\) must be positive"),
                          (dict(padding="same", stride=2), "padding='same' needs stride=1"),
                          (dict(padding=-1), "must be >= 0")]:
        args = dict(kernel_size=3, rank=2) | kwargs
        with pytest.raises(ValueError, match=match):
            FactorizedConv2d(4, 6, **args)
    layer = FactorizedConv2d.create(4, 6, 3, rank=2, dilation=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert "dilation=(2, 2)" in repr(layer) and "bias=True" in repr(layer)
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="algorithm='hooi' applies to format='tucker'"):
        FactorizedConv2d.from_conv(conv, "lowrank", rank=2, algorithm="hooi")
    with torch.no_grad():
        conv.bias[0] = float("nan")
    with pytest.raises(ValueError, match="conv.bias has NaN/inf"):
        FactorizedConv2d.from_conv(conv, rank=2)
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.bias[1] = float("inf")
    with pytest.raises(ValueError, match="bias has NaN/inf"):
        FactorizedLinear.from_linear(linear, "lowrank", rank=2)


def test_conv_bad_ranks():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="does not fit"):
        FactorizedConv2d.from_conv(conv, rank=(7, 4))
    with pytest.raises(ValueError, match="format='mpo'"):
        FactorizedConv2d.from_conv(conv, "mpo", rank=2)
    with pytest.raises(ValueError, match="tucker conv takes an int"):
        FactorizedConv2d.from_conv(conv, rank=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="needs rank=, eps=, energy= or keep="):
        FactorizedConv2d.from_conv(conv)
    with pytest.raises(TypeError, match="ranks must be ints"):
        FactorizedConv2d.from_conv(conv, rank=2.0)
    with pytest.raises(TypeError, match="must be a Tucker or LowRank"):
        FactorizedConv2d.from_factorization(tensornets.decompose(torch.randn(6, 36), "tt", rank=2, num_cores=2), 3)


@pytest.mark.parametrize("kind", ["prune", "weight_norm"])
def test_from_linear_and_from_conv_read_the_weight_the_next_forward_computes(kind):
    # prune / the old weight_norm recompute .weight in a forward pre-hook: after an optimizer step the attribute is stale
    torch.manual_seed(0)
    linear, conv = nn.Linear(16, 12).double(), nn.Conv2d(3, 8, 3).double()
    for module in (linear, conv):
        if kind == "prune":
            prune.l1_unstructured(module, "weight", amount=0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch, still in use
                nn.utils.weight_norm(module)
    x, img = torch.randn(5, 16, dtype=torch.float64), torch.randn(2, 3, 9, 9, dtype=torch.float64)
    opt = torch.optim.SGD([*linear.parameters(), *conv.parameters()], lr=0.5)
    (linear(x).square().sum() + conv(img).square().sum()).backward()
    opt.step()  # .weight still holds the values of before the step
    factorized_linear = FactorizedLinear.from_linear(linear, "lowrank", rank=12)  # full ranks: exact
    factorized_conv = FactorizedConv2d.from_conv(conv, rank=8)
    with torch.no_grad():  # the forwards recompute the weights
        assert_close(factorized_linear(x), linear(x), what="linear")
        assert_close(factorized_conv(img), conv(img), what="conv")


def test_a_stem_conv_keeps_its_spatial_mode_at_its_full_rank():
    # 3 -> 8 channels, 7x7: the spatial mode's full rank is 8 * 3 = 24, not 49 (keep= chose (1, 1, 49) and then
    # told the user to lower it)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 7).double()
    layer = FactorizedConv2d.from_conv(conv, rank=8)
    assert layer.ranks == (8, 3, 24)
    assert_close(layer.weight_dense(), conv.weight, what="kernel at full ranks")
    assert FactorizedConv2d.from_conv(conv, rank=(2, 2)).ranks == (2, 2, 24)
    with pytest.raises(ValueError, match=r"format='tucker' cannot compress a \(8, 3, \*\(7, 7\)\) kernel: rank 1 already "
                                         r"needs 1211 parameters of its 1176; use format='lowrank'"):
        FactorizedConv2d.from_conv(conv, keep=0.5)
    assert FactorizedConv2d.from_conv(conv, "lowrank", keep=0.5).ranks == (3,)  # 3 * (8 + 147) <= 588


def test_weight_cannot_be_assigned_and_says_why():
    linear = FactorizedLinear.create(24, 16, "tt", rank=2)
    conv = FactorizedConv2d.from_conv(nn.Conv2d(4, 6, 3), "tucker", rank=2)
    for layer, value in ((linear, nn.Parameter(torch.zeros(16, 24))), (linear, torch.zeros(16, 24)),
                         (conv, nn.Parameter(torch.zeros(6, 4, 3, 3)))):
        with pytest.raises(AttributeError, match=r"\.weight is rebuilt from the cores .* cannot be assigned"):
            layer.weight = value


def test_conv_names_a_wrong_input():
    conv = FactorizedConv2d.from_conv(nn.Conv2d(4, 6, 3), "tucker", rank=2)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the conv's cores are torch.float32"):
        conv(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"C_in=in_channels=4"):
        conv(torch.randn(2, 5, 8, 8))
    assert conv(torch.randn(4, 8, 8)).shape == (6, 6, 6)  # unbatched, as nn.Conv2d
    bf16 = nn.Conv2d(4, 6, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 activations into a bfloat16 conv, as nn.Conv2d
        y = FactorizedConv2d.from_conv(bf16, "tucker", rank=2)(torch.randn(2, 4, 8, 8))
        assert y.dtype == bf16(torch.randn(2, 4, 8, 8)).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "mpo", "btt", "cp"])
def test_decomposing_inside_an_autocast_region_is_unaffected_by_it(fmt):
    # a model converted inside its autocast training region: the decompositions run in float32 all the same
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    outside = tensornets.decompose(W, fmt, rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tensornets.decompose(W, fmt, rank=2)
        conv = FactorizedConv2d.from_conv(nn.Conv2d(4, 6, 3).bfloat16(), "tucker", rank=2)
    assert all(torch.equal(a, b) for a, b in zip(outside.parameters(), inside.parameters()))
    assert conv.factorization.core.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("fmt", ["tucker", "lowrank"])
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(padding=(2, 1), stride=2), dict(padding="same", dilation=2),
                                      dict(kernel_size=(2, 4), padding="same")])
def test_conv_padding_modes_equal_nn_conv2d_at_full_rank(mode, fmt, geometry, tmp_path):
    # nn.Conv2d pads explicitly for these modes; the factor convs do so before the spatial conv
    torch.manual_seed(0)
    geometry = dict(geometry)
    conv = nn.Conv2d(5, 7, geometry.pop("kernel_size", 3), padding_mode=mode, **geometry).double()
    layer = FactorizedConv2d.from_conv(conv, fmt, rank=7)
    for x in (torch.randn(2, 5, 9, 11, dtype=torch.float64), torch.randn(5, 9, 11, dtype=torch.float64)):
        assert_close(layer(x), conv(x), tol=1e-10)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    assert layer.to_conv().padding_mode == mode and "padding_mode" in repr(layer)
    tensornets.save(layer, tmp_path / "conv.safetensors")
    assert torch.equal(tensornets.load(tmp_path / "conv.safetensors")(x), layer(x))
    with pytest.raises(ValueError, match="padding_mode='mirror' must be one of"):
        FactorizedConv2d(5, 7, 3, rank=2, padding_mode="mirror")


def test_create_at_a_parameter_fraction_matches_from_dense(format_case):
    # training from scratch at a budget: the ranks from_dense picks for the same keep, within the budget
    fmt, kw = format_case
    torch.manual_seed(0)
    fresh = FactorizedLinear.create(IN, OUT, fmt, keep=0.3, **kw)
    dense = FactorizedLinear.from_linear(nn.Linear(IN, OUT), fmt, keep=0.3, **kw)
    assert fresh.factorization.ranks == dense.factorization.ranks
    assert fresh.factorization.num_parameters <= 0.3 * IN * OUT
    with pytest.raises(ValueError, match="pass rank= or keep="):
        FactorizedLinear.create(IN, OUT, fmt, **kw)


def test_factories_name_a_bad_dtype_or_device():
    for dtype in ("float32", torch.complex64, torch.int64):
        with pytest.raises(TypeError, match="must be a floating torch dtype"):
            FactorizedLinear.create(IN, OUT, "lowrank", rank=2, dtype=dtype)
        with pytest.raises(TypeError, match="must be a floating torch dtype"):
            FactorizedConv2d(4, 6, 3, rank=2, dtype=dtype)
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        FactorizedLinear.create(IN, OUT, "lowrank", rank=2, device="gpu")
    assert FactorizedLinear.create(IN, OUT, "lowrank", rank=2, device="meta").factorization.U.is_meta  # shapes only


def test_constructors_and_forwards_name_arguments_of_the_wrong_type():
    # True was read as one channel, 2.5 reached the rank rules, a list bias and a numpy input failed in attributes
    import numpy as np

    for kw in (dict(in_channels=True), dict(kernel_size=2.5), dict(stride=(1, 1.5)), dict(padding=(1, 1, 1)),
               dict(in_channels="4")):
        args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kw}
        with pytest.raises(TypeError, match=rf"{next(iter(kw))}=.* must be an int or a pair of ints"):
            FactorizedConv2d(args.pop("in_channels"), args.pop("out_channels"), args.pop("kernel_size"), rank=2, **args)
    fact = tensornets.decompose(torch.randn(OUT, IN), "lowrank", rank=2)
    with pytest.raises(TypeError, match="bias must be a tensor"):
        FactorizedLinear(fact, bias=[0.0] * OUT)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        FactorizedLinear(fact)(np.zeros((2, IN), dtype=np.float32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        FactorizedConv2d(4, 6, 3, rank=2)(np.zeros((1, 4, 5, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="format names and aliases must be non-empty strings, got 3"):
        tensornets.register_format(type(fact), 3)


def test_planning_and_init_helpers_name_arguments_of_the_wrong_type():
    from tensornets import factor_std, init_factorization_, mup_param_groups, plan_contraction

    fact = tensornets.decompose(torch.randn(OUT, IN), "lowrank", rank=2)
    cases = [
        (lambda: tensornets.decompose(torch.randn(OUT, IN), "tt", rank=2, pad="no"), TypeError, "pad='no' must be True"),
        (lambda: fact.flops(2.5), ValueError, "batch=2.5 must be an int >= 1"),
        (lambda: fact.strategy(0), ValueError, "batch=0 must be an int >= 1"),
        (lambda: init_factorization_(nn.Linear(4, 4)), TypeError, "must be a tensornets Factorization"),
        (lambda: mup_param_groups(nn.Linear(4, 4), 1e-3, base_fan_in=0), ValueError, "base_fan_in=0 must be an int"),
        (lambda: factor_std(float("nan"), 2, 1), ValueError, "need sigma > 0"),
        (lambda: plan_contraction("ab,bc->ac", [(2, 3.7), (3, 5)]), ValueError, "must hold ints"),
        (lambda: FactorizedLinear.create(IN, OUT, "lowrank", rank=2, device="cpu:256"), ValueError,
         "device='cpu:256': device index 256 is out of range"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: FactorizedLinear.create(IN, OUT, "lowrank", rank=2, device="cuda"), ValueError,
                      "has no usable cuda device"))
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_jit_script_is_refused_with_the_tools_that_work():
    layer = FactorizedLinear.create(16, 12, "tt", rank=2)
    for module in (layer, nn.Sequential(nn.Linear(16, 16), layer), layer.factorization):
        with pytest.raises(TypeError, match="torch.jit.script cannot compile a tensornets TensorTrain.*use "
                                            "torch.compile, torch.export or torch.jit.trace"):
            torch.jit.script(module)
