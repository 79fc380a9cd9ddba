"""Conformance suite: every format satisfies the Factorization contract."""

from __future__ import annotations

import pytest
import torch

import tensornets
from tensornets.formats.base import budget_limit, traffic_weight
from format_cases import ALS_ERROR_FLOOR, IN, OUT, full_rank, low_rank_plus_noise
from tolerance import assert_close


def test_registry_lists_every_format_and_alias():
    assert tensornets.available_formats() == ["btt", "cp", "lowrank", "mpo", "tt", "tucker"]
    assert tensornets.get_format("ttm") is tensornets.MPO
    with pytest.raises(ValueError, match="unknown format 'blocktt'"):
        tensornets.get_format("blocktt")


def test_full_rank_round_trip_is_exact(format_case):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.5)
    fact = tensornets.decompose(W, fmt, rank=full_rank(fmt, kw), **kw)
    assert_close(fact.to_dense(), W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 257])
def test_forward_equals_dense_matmul(format_case, dtype, batch):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.5, dtype=dtype)
    fact = tensornets.decompose(W, fmt, rank=4, **kw)
    x = torch.randn(batch, IN, dtype=dtype)
    expected = x @ fact.to_dense().T
    assert_close(fact(x), expected)  # tolerance scaled to the dtype
    # leading dimensions are kept, as in nn.Linear
    assert_close(fact(x.reshape(batch, 1, IN)), expected.reshape(batch, 1, OUT))


def test_both_strategies_agree_and_gradcheck(format_case):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.5)
    fact = tensornets.decompose(W, fmt, rank=3, **kw)
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=True)
    contracted = fact._contract(x, None)
    rebuilt = x @ fact._dense().T
    assert_close(contracted, rebuilt)
    params = tuple(fact.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: fact(x), (x, *params), eps=1e-6, atol=1e-5)


def test_gradients_match_dense_autograd(format_case):
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.5), fmt, rank=3, **kw)
    x = torch.randn(16, IN, dtype=torch.float64)
    target = torch.randn(16, OUT, dtype=torch.float64)
    loss = ((fact(x) - target) ** 2).sum()
    grads = torch.autograd.grad(loss, list(fact.parameters()))
    dense_loss = ((x @ fact.to_dense().T - target) ** 2).sum()
    dense_grads = torch.autograd.grad(dense_loss, list(fact.parameters()))
    for g, d in zip(grads, dense_grads):
        assert_close(g, d)


def test_an_empty_batch_gives_zero_gradients_as_nn_linear(format_case):
    # nn.Linear on (0, in) rows returns (0, out) with a graph: backward gives zero gradients
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.5), fmt, rank=3, **kw)
    x = torch.randn(0, 5, IN, dtype=torch.float64, requires_grad=True)
    y = fact(x)
    assert y.shape == (0, 5, OUT)
    grads = torch.autograd.grad(y.sum(), [x, *fact.parameters()])
    assert grads[0].shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[1:], fact.parameters()))


def test_error_decreases_monotonically_with_rank(format_case):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    errors = []
    for r in range(1, full_rank(fmt, kw) + 1, max(1, full_rank(fmt, kw) // 8)):
        fact = tensornets.decompose(W, fmt, rank=r, **kw)
        errors.append(float((fact.to_dense().detach() - W).norm() / W.norm()))
    slack = ALS_ERROR_FLOOR.get(fmt, 1e-12)
    assert all(b <= a + slack for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_eps_meets_error_target(format_case):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    for eps in (0.05, 0.2, 0.5):
        fact = tensornets.decompose(W, fmt, eps=eps, **kw)
        err = float((fact.to_dense().detach() - W).norm() / W.norm())
        assert err <= eps * (1 + 1e-9), (eps, err, fact.ranks)
    # energy=e is eps=sqrt(1-e)
    a = tensornets.decompose(W, fmt, energy=0.96, **kw)
    b = tensornets.decompose(W, fmt, eps=0.2, **kw)
    assert a.ranks == b.ranks


def test_keep_is_respected_and_tight(format_case):
    fmt, kw = format_case
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    cls = tensornets.get_format(fmt)
    for keep in (0.3, 0.5):
        fact = tensornets.decompose(W, fmt, keep=keep, **kw)
        limit = budget_limit(keep, IN, OUT)
        assert fact.num_parameters <= limit
        assert fact.num_parameters == sum(p.numel() for p in fact.parameters())
        # one more rank would not fit (unless already at the full rank)
        r = max(fact.ranks)
        if r < full_rank(fmt, kw):
            ranks = cls.resolve_ranks(r + 1, fact.in_modes, fact.out_modes)
            assert cls.parameter_count(fact.in_modes, fact.out_modes, ranks) > limit


def test_flops_and_strategy_follow_the_cost_model(format_case):
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=2, **kw)
    weight = traffic_weight("cpu")
    for batch in (1, 8, 4096):
        costs = fact._strategy_costs(batch)
        assert costs["rebuild"][0] == fact._rebuild_cost()[0] + 2 * batch * OUT * IN
        total = {k: flops + weight * traffic for k, (flops, traffic) in costs.items()}
        assert fact.flops(batch) == costs["rebuild" if total["rebuild"] <= total["contract"] else "contract"][0]
        bucket = {k: f + weight * t for k, (f, t) in fact._strategy_costs(tensornets.batch_bucket(batch)).items()}
        assert fact.uses_rebuild(batch) == (bucket["rebuild"] <= bucket["contract"])
        # training: the plan of least forward + backward cost, and FLOPs of both passes
        best = min(fact._candidates(batch), key=lambda c: c.cost(weight, grad=True))
        assert fact.strategy(batch, grad=True) == best.name and best.backward_flops > 0
        assert fact.flops(batch, grad=True) == best.flops + best.backward_flops


def test_padding_handles_prime_sizes():
    W = low_rank_plus_noise(53, 61, 4, 0.1)  # both prime
    with pytest.raises(ValueError, match="in_features=61"):
        tensornets.decompose(W, "mpo", rank=4, num_cores=2)
    fact = tensornets.decompose(W, "mpo", rank=10**3 // 100, num_cores=2, pad=True)
    assert fact.padded_in > 61 and fact.padded_out > 53
    x = torch.randn(3, 61, dtype=torch.float64)
    assert_close(fact(x), x @ fact.to_dense().T)
    full = tensornets.decompose(W, "mpo", rank=max(tensornets.MPO.full_ranks(fact.in_modes, fact.out_modes)), num_cores=2, pad=True)
    assert_close(full.to_dense(), W)


def test_explicit_modes():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    fact = tensornets.decompose(W, "mpo", rank=5, modes=((4, 12), (6, 10)))
    assert fact.out_modes == (4, 12) and fact.in_modes == (6, 10)
    assert fact.modes == ((4, 12), (6, 10))  # (out_modes, in_modes), as modes= takes them
    assert [tuple(c.shape) for c in fact.cores] == [(1, 4, 6, 5), (5, 12, 10, 1)]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda W: tensornets.decompose(W, "lowrank", rank=49), r"rank=49 does not fit"),
        (lambda W: tensornets.decompose(W, "mpo", rank=[2, 2], num_cores=2), r"needs 1 entries"),
        (lambda W: tensornets.decompose(W, "lowrank", keep=1.5), r"keep=1.5 must be in \(0, 1\]"),
        (lambda W: tensornets.decompose(W, "mpo", rank=2, modes=((4, 12), (5, 11))), r"multiply to 55"),
        (lambda W: tensornets.decompose(W, "mpo", rank=2, modes=((48,), (6, 10))), r"as many out modes as in modes"),
        (lambda W: tensornets.decompose(W, "btt", rank=2, num_cores=3), r"exactly 2 modes"),
        (lambda W: tensornets.decompose(W, "tt"), r"needs rank=, eps=, energy= or keep="),
        (lambda W: tensornets.decompose(W, "tt", rank=2, keep=0.5), r"not both"),
        (lambda W: tensornets.decompose(W, "tt", eps=1.5), r"eps=1.5 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(low_rank_plus_noise(OUT, IN, 6, 0.3))


@pytest.mark.parametrize("fmt, modes, ranks, slots", [
    ("lowrank", ((8,), (8,)), (2, 3), 1), ("tt", ((2, 4), (2, 4)), (2, 2), 3), ("mpo", ((2, 4), (2, 4)), (0,), 1),
    ("tucker", ((8,), (8,)), (2,), 2), ("btt", ((2, 4), (2, 4)), (1.5,), 1), ("cp", ((8,), (8,)), (2, 2), 1),
])
def test_constructors_check_their_ranks(fmt, modes, ranks, slots):
    # a wrong count surfaced as "too many values to unpack" from inside the format
    with pytest.raises(ValueError, match=rf"ranks=.* must be {slots} positive int\(s\) for {fmt} .*resolve_structure"):
        tensornets.get_format(fmt)(8, 8, out_modes=modes[0], in_modes=modes[1], ranks=ranks)


def test_keep_accepts_any_real_scalar_and_refuses_the_rest():
    import numpy as np

    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    expected = tensornets.decompose(W, "lowrank", keep=0.5).ranks
    for keep in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert tensornets.decompose(W, "lowrank", keep=keep).ranks == expected
    for keep in (True, "0.5", np.array([0.5])):
        with pytest.raises(TypeError, match="must be a real number in \\(0, 1\\]"):
            tensornets.decompose(W, "lowrank", keep=keep)


def test_set_strategy_refuses_a_plan_the_format_lacks_at_once():
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "tt", rank=2)
    with pytest.raises(ValueError, match=r"strategy='split' is not a plan of tt; its plans are "
                                         r"\['einsum', 'rebuild'\]"):
        fact.set_strategy("split")
    assert fact.set_strategy("rebuild").strategy(4) == "rebuild"


def test_resolve_structure_is_from_dense_without_the_weight(format_case):
    """The modes and ranks a size request gives, found without decomposing (checks a whole model first)."""
    fmt, kw = format_case
    cls = tensornets.get_format(fmt)
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    for size in ({"rank": 3}, {"keep": 0.3}):
        fact = tensornets.decompose(W, fmt, **size, **kw)
        assert cls.resolve_structure(IN, OUT, **size, **kw) == (fact.in_modes, fact.out_modes, fact.ranks)
    in_modes, out_modes, ranks = cls.resolve_structure(IN, OUT, eps=0.5, **kw)  # eps truncates below these
    fact = tensornets.decompose(W, fmt, eps=0.5, **kw)
    assert (in_modes, out_modes) == (fact.in_modes, fact.out_modes)
    assert all(r >= a for r, a in zip(ranks, fact.ranks))


@pytest.mark.parametrize("request_, match", [
    (dict(fmt="lowrank", rank=49), r"rank=49 does not fit"),
    (dict(fmt="mpo", rank=2, modes=((4, 12), (5, 11))), r"multiply to 55"),
    (dict(fmt="tt", rank=2, num_cores=2, out=97), r"cannot factorize n=97"),
    (dict(fmt="btt", keep=0.01), r"keep=0.01 keeps 28 parameters but btt at rank 1 needs"),
    (dict(fmt="tt"), r"needs rank=, eps=, energy= or keep="),
    (dict(fmt="tt", rank=2, keep=0.5), r"not both"),
    (dict(fmt="cp", keep=1.5), r"keep=1.5 must be in \(0, 1\]"),
    (dict(fmt="tucker", energy=0.0), r"energy=0.0 must be in \(0, 1\]"),
])
def test_resolve_structure_raises_what_from_dense_raises(request_, match):
    request_ = dict(request_)
    fmt, out = request_.pop("fmt"), request_.pop("out", OUT)
    with pytest.raises(ValueError, match=match):
        tensornets.get_format(fmt).resolve_structure(IN, out, **request_)
    with pytest.raises(ValueError, match=match):
        tensornets.decompose(low_rank_plus_noise(out, IN, 6, 0.3), fmt, **request_)


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "mpo", "btt"])
def test_bad_weights_raise_clear_errors(fmt):
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        tensornets.decompose(bad, fmt, rank=2)
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        tensornets.decompose(bad, fmt, rank=2)
    with pytest.raises(TypeError, match="floating"):
        tensornets.decompose(torch.ones(OUT, IN, dtype=torch.int64), fmt, rank=2)
    with pytest.raises(ValueError, match="must be 2-D"):
        tensornets.decompose(torch.ones(IN), fmt, rank=2)
    fact = tensornets.decompose(W, fmt, rank=2)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        fact(torch.randn(2, IN))
    with pytest.raises(ValueError, match="in_features=60"):
        fact(torch.randn(2, IN + 1, dtype=torch.float64))


def test_low_precision_weight_keeps_its_dtype():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32).to(torch.bfloat16)
    fact = tensornets.decompose(W, "mpo", rank=4, num_cores=2)
    assert all(p.dtype == torch.bfloat16 for p in fact.parameters())
    assert fact(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # decomposed in float32, then cast: the cores of W.float() cast to bfloat16
    reference = tensornets.decompose(W.float(), "mpo", rank=4, num_cores=2)
    assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(fact.parameters(), reference.parameters()))


@pytest.mark.parametrize("fmt,kw", [("tt", dict(rank=4)), ("mpo", dict(rank=4, num_cores=2))])
def test_trains_spread_the_norm_so_float16_forwards_stay_finite(fmt, kw):
    # TT-SVD leaves the norm of W (~1e5 here) in one core; contracted first, it overflowed float16 (inf) although
    # every entry of W and of x W^T fits. Balanced, every core has one norm and the product is unchanged.
    torch.manual_seed(0)
    W = torch.full((512, 512), 200.0) + torch.randn(512, 512)
    fact = tensornets.decompose(W.half(), fmt, **kw)
    norms = [float(c.detach().double().norm()) for c in fact.parameters()]
    assert max(norms) / min(norms) < 1.01
    for batch in (1, 64, 1024):
        x = torch.randn(batch, 512).half()
        with torch.no_grad():
            y = fact(x)
        assert torch.isfinite(y).all()
        assert_close(y.float(), x.float() @ fact.to_dense().float().T, tol=1e-2)


def test_float16_cores_beyond_its_range_are_refused():
    # every entry (1500) fits float16, but Tucker's core holds sigma_max = 1500 * sqrt(48 * 60) ~ 8.05e4 > 65504
    W = torch.full((OUT, IN), 1500.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"tucker: decomposed in float32, the cores \['core'\] have entries up to "
                                         r".*beyond torch.float16's range .*weight.float\(\)"):
        tensornets.decompose(W, "tucker", rank=2)
    assert torch.isfinite(tensornets.decompose(W.to(torch.bfloat16), "tucker", rank=2).core).all()


@pytest.mark.parametrize("fmt", ["tucker", "btt"])
def test_randomized_svd_is_refused_where_it_does_nothing(fmt):
    with pytest.raises(ValueError, match="svd='randomized' does not apply"):
        tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=2, svd="randomized")
    with pytest.raises(ValueError, match="svd='qr'"):
        tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=2, svd="qr")


def test_budget_is_a_deprecated_alias_of_keep():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    with pytest.warns(DeprecationWarning, match="budget= is renamed keep=") as record:
        old = tensornets.decompose(W, "mpo", budget=0.3, num_cores=2)
    # attributed to the caller's line, not to the library: Python's default filters show a
    # DeprecationWarning only in __main__, so one pointing inside tensornets would stay invisible
    assert record[0].filename == __file__
    assert old.ranks == tensornets.decompose(W, "mpo", keep=0.3, num_cores=2).ranks
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="budget=0.3 is its deprecated name"):
        tensornets.decompose(W, "mpo", budget=0.3, keep=0.3, num_cores=2)
    in_modes, out_modes = tensornets.MPO.resolve_modes(IN, OUT, 2)
    with pytest.warns(DeprecationWarning, match="rank_for_budget"):
        assert tensornets.MPO.rank_for_budget(0.3, IN, OUT, in_modes, out_modes) == old.ranks[0]


def test_rank_takes_ints_of_any_kind_and_nothing_else():
    import numpy as np

    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    for rank in (3, np.int64(3), np.array(3), torch.tensor(3), [np.int64(3)], torch.tensor([3])):
        assert tensornets.decompose(W, "lowrank", rank=rank).ranks == (3,)
    # never rounded: 3.7 -> 3 would silently change the model
    for rank in (3.0, [3.7, 3.2], "3", True, np.array(3.0), torch.tensor(3.0)):
        with pytest.raises(TypeError, match="ranks must be ints"):
            tensornets.decompose(W, "mpo", rank=rank, num_cores=3)
