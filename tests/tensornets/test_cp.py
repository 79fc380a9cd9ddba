"""CP format specifics beyond the conformance suite: exact recovery, ALS behaviour, options, init."""

from __future__ import annotations

import pytest
import torch

import tensornets
from tensornets import CP, FactorizedLinear
from tensornets.decompositions import cp_als, cp_rank_bound, cp_slices
from tensornets.formats.cp import fold_weights
from format_cases import IN, OUT, low_rank_plus_noise
from tolerance import assert_close, assert_close_relative, relative_error

MODES = ((6, 8), (6, 10))  # (out_modes, in_modes) of the 48 x 60 test matrix


def exact_cp_matrix(rank: int, seed: int = 0) -> torch.Tensor:
    """A 48 x 60 matrix whose tensorization (6, 8, 6, 10) has CP rank ``rank`` exactly."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in (*MODES[0], *MODES[1])]
    return torch.einsum("ar,br,cr,dr->abcd", *factors).reshape(OUT, IN)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_als_recovers_an_exact_cp_tensor(rank):
    W = exact_cp_matrix(rank)
    fact = tensornets.decompose(W, "cp", rank=rank, modes=MODES, n_iter_max=2000, tol=1e-14)
    assert fact.ranks == (rank,)
    assert_close_relative(fact.to_dense().detach(), W, tol=1e-6)


def test_error_falls_with_rank_on_a_random_matrix():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN, dtype=torch.float64)
    errors = [relative_error(tensornets.decompose(W, "cp", rank=r, modes=MODES).to_dense().detach(), W) for r in (1, 8, 32, 96, 200)]
    assert errors == sorted(errors, reverse=True), errors
    # the bound rank is exact by construction, whatever W is
    assert_close(tensornets.decompose(W, "cp", rank=cp_rank_bound((6, 8, 6, 10)), modes=MODES).to_dense().detach(), W)


def test_decomposition_is_deterministic_and_seeded():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    a = tensornets.decompose(W, "cp", rank=12, modes=MODES)
    b = tensornets.decompose(W, "cp", rank=12, modes=MODES)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = tensornets.decompose(W, "cp", rank=12, modes=MODES, init="random", seed=1)
    d = tensornets.decompose(W, "cp", rank=12, modes=MODES, init="random", seed=2)
    assert not torch.equal(c.out_factors[0], d.out_factors[0])


def test_cp_slices_and_rank_bound():
    torch.manual_seed(0)
    T = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    factors = cp_slices(T)
    assert cp_rank_bound(T.shape) == 3 * 2 * 4
    assert [tuple(f.shape) for f in factors] == [(3, 24), (5, 24), (2, 24), (4, 24)]
    assert torch.equal(torch.einsum("ar,br,cr,dr->abcd", *factors), T)


def test_fold_weights_keeps_the_tensor_and_balances_scales():
    torch.manual_seed(0)
    w = torch.tensor([4.0, -9.0], dtype=torch.float64)
    factors = [torch.randn(n, 2, dtype=torch.float64) for n in (3, 4)]
    folded = fold_weights(w, factors)
    assert_close(torch.einsum("ar,br->ab", *folded), torch.einsum("r,ar,br->ab", w, *factors))
    assert_close(folded[1], factors[1] * w.abs().sqrt())


def test_cp_als_weights_and_unit_columns():
    W = exact_cp_matrix(3).reshape(6, 8, 6, 10)
    weights, factors = cp_als(W, 3, n_iter_max=2000, tol=1e-14)
    for f in factors:
        assert_close(torch.linalg.vector_norm(f, dim=0), torch.ones(3, dtype=torch.float64))
    assert_close_relative(torch.einsum("r,ar,br,cr,dr->abcd", weights, *factors), W, tol=1e-6)


def test_eps_returns_the_smallest_bisected_rank_that_meets_it():
    W = exact_cp_matrix(4)
    fact = tensornets.decompose(W, "cp", eps=1e-3, modes=MODES, n_iter_max=2000)
    assert relative_error(fact.to_dense().detach(), W) <= 1e-3
    assert fact.ranks == (4,)  # every rank >= 4 fits W exactly, none below does
    # rank= caps eps: the smaller rank wins
    assert tensornets.decompose(W, "cp", eps=1e-3, rank=2, modes=MODES).ranks == (2,)


def test_forward_cost_is_linear_in_rank_and_modes():
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "cp", rank=4, modes=MODES)
    assert fact.num_parameters == 4 * (6 + 8 + 6 + 10) == sum(p.numel() for p in fact.parameters())
    flops, _ = fact._contract_cost(64)
    # x (B, in) meets the in-factors (2 B R in), the out-factors expand to (B, out) (2 B R out); the middle steps are smaller
    assert 2 * 64 * 4 * (IN + OUT) <= flops <= 4 * 64 * 4 * (IN + OUT)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=3, init="hosvd"), ValueError, r"init='hosvd' must be 'svd' or 'random'"),
        (dict(rank=3, algorithm="hooi"), TypeError, r"unexpected options \['algorithm'\]"),
        (dict(rank=3, svd="randomized"), ValueError, r"svd='randomized' does not apply to cp"),
        (dict(rank=10**4), ValueError, r"rank=10000 does not fit the cp format"),
        (dict(rank=3, n_iter_max=0), ValueError, r"n_iter_max=0 must be an int >= 1"),
        (dict(rank=3, n_iter_max=2.5), TypeError, r"n_iter_max=2.5 must be an int"),
        (dict(rank=3, tol=float("nan")), ValueError, r"tol=nan must be a number >= 0"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "cp", modes=MODES, **kwargs)


@pytest.mark.parametrize("std", [None, 0.02])
def test_random_init_std_within_15_percent(std):
    gen = torch.Generator().manual_seed(0)
    layer = FactorizedLinear.create(1024, 768, "cp", rank=64, num_cores=2, generator=gen)
    if std is not None:
        tensornets.init_factorization_(layer.factorization, std=std, generator=gen)
    target = 1024**-0.5 if std is None else std
    realized = float(layer.factorization.to_dense().detach().std())
    assert abs(realized / target - 1) < 0.15, (realized, target)
    assert isinstance(layer.factorization, CP)


def test_a_zero_weight_decomposes_exactly():
    # a zero-initialised projection: ALS would divide by its zero norm
    W = torch.zeros(24, 36)
    assert tensornets.decompose(W, "cp", rank=3).ranks == (3,)
    for kw in ({"rank": 3}, {"eps": 0.1}, {"keep": 0.5}):
        fact = tensornets.decompose(W, "cp", **kw)
        assert torch.equal(fact.to_dense(), W)
    assert tensornets.decompose(W, "cp", eps=0.1).ranks == (1,)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_the_fit_does_not_depend_on_the_weight_scale(scale):
    # ALS runs on W / max|W|: a weight scaled by 1e20 gave NaN factors and one scaled by 1e-30 a singular system
    W = low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32)
    unit = tensornets.decompose(W, "cp", rank=4, num_cores=2)
    scaled = tensornets.decompose(W * scale, "cp", rank=4, num_cores=2)
    assert torch.isfinite(scaled.to_dense()).all()
    assert relative_error(scaled.to_dense().double(), W.double() * scale) == pytest.approx(
        relative_error(unit.to_dense().double(), W.double()), rel=1e-3)


def test_a_rank_the_tensor_cannot_support_is_a_clear_error():
    with pytest.raises(ValueError, match=r"CP-ALS at rank=4 met a singular least-squares system .*pass a smaller rank, "
                                         r"or eps= / energy="):
        tensornets.decompose(torch.full((64, 96), 3.0), "cp", rank=4)  # exactly rank 1: ALS's systems are singular
    assert tensornets.decompose(torch.full((64, 96), 3.0), "cp", eps=1e-4).ranks == (1,)


@pytest.mark.parametrize("init, names_random_init", [("svd", True), ("random", False)])
def test_non_finite_als_factors_are_an_error(monkeypatch, init, names_random_init):
    # tensorly's parafac can return NaN factors without raising; cp_als returned them as its fit
    def diverged(tensor, rank, **_):
        return None, [torch.full((n, rank), float("nan"), dtype=tensor.dtype) for n in tensor.shape]

    monkeypatch.setattr("tensorly.decomposition.parafac", diverged)
    with pytest.raises(ValueError, match=r"CP-ALS at rank=2 gave non-finite factors; .*pass a smaller rank") as info:
        cp_als(exact_cp_matrix(2).reshape(6, 8, 6, 10), 2, init=init)
    assert ("init='random'" in str(info.value)) == names_random_init


def test_a_rank_above_a_constant_weights_cp_rank_is_an_error_and_eps_lowers_it():
    # ALS at rank 4 on a constant (CP rank 1) gave NaN cores silently, or a singular system
    W = torch.ones(OUT, IN)
    with pytest.raises(ValueError, match=r"CP-ALS at rank=4 (gave non-finite factors|met a singular least-squares)"):
        tensornets.decompose(W, "cp", rank=4)
    # eps= reads the error as "lower the rank", also when the cap itself breaks down
    for kw in ({"eps": 1e-3}, {"eps": 1e-3, "rank": 8}):
        fact = tensornets.decompose(W, "cp", **kw)
        assert fact.ranks == (1,) and relative_error(fact.to_dense().detach(), W) <= 1e-3


def test_a_zero_padded_mode_error_names_the_random_init_that_fits_it():
    # pad=True zero-pads in=2 to modes (2, 2): the SVD start puts a column on the zero half and ALS turns singular,
    # although the padded tensor's CP rank is not low (rank 8 fits, and a random start fits rank 2)
    W = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"CP-ALS at rank=2 .*pass a smaller rank.*init='random'"):
        tensornets.decompose(W, "cp", rank=2, pad=True)
    fact = tensornets.decompose(W, "cp", rank=2, pad=True, init="random")
    assert fact.ranks == (2,) and torch.isfinite(fact.to_dense()).all()
    assert relative_error(fact.to_dense().detach(), W) < 1
