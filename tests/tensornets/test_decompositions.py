"""Decompositions: error bounds, agreement with tensorly, randomized vs full SVD."""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix, tucker

import tensornets
from tensornets.decompositions import hooi, hosvd, rank_for_tolerance, truncated_svd, tt_svd
from format_cases import low_rank_plus_noise
from tolerance import assert_close


@pytest.fixture(autouse=True)
def _tensorly_torch_backend():
    tl.set_backend("pytorch")
    yield
    tl.set_backend("numpy")


def test_truncated_svd_eckart_young():
    M = low_rank_plus_noise(40, 70, 8, 0.2)
    U, S, Vh = truncated_svd(M, rank=5)
    full = torch.linalg.svdvals(M)
    err = (M - U @ torch.diag(S) @ Vh).norm()
    assert_close(err, full[5:].norm())


def test_rank_for_tolerance_is_smallest_rank_meeting_the_tail():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert rank_for_tolerance(s, tol=math.sqrt(1.25) + 1e-9) == 2
    assert rank_for_tolerance(s, tol=math.sqrt(1.25) - 1e-9) == 3
    assert rank_for_tolerance(s, tol=0.0) == 4


def test_randomized_svd_is_seeded_and_close_to_full():
    M = low_rank_plus_noise(300, 500, 20, 0.05, dtype=torch.float32)
    U1, S1, V1 = truncated_svd(M, rank=16, method="randomized", seed=3)
    U2, S2, V2 = truncated_svd(M, rank=16, method="randomized", seed=3)
    assert torch.equal(S1, S2) and torch.equal(U1, U2)
    Uf, Sf, Vf = truncated_svd(M, rank=16)
    err_r = float((M - U1 @ torch.diag(S1) @ V1).norm() / M.norm())
    err_f = float((M - Uf @ torch.diag(Sf) @ Vf).norm() / M.norm())
    # Eckart-Young: no rank-16 matrix beats the truncated full SVD, up to the float32 rounding of the factors
    # (1e-7 relative; a randomized factorization can land that much below it on some CPUs)
    assert err_f * (1 - 1e-5) <= err_r <= err_f * 1.01


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_tt_svd_error_bound_holds_nearly_tight(eps):
    T = low_rank_plus_noise(64, 81, 10, 0.3).reshape(4, 16, 9, 9)
    cores = tt_svd(T, eps=eps)
    approx = cores[0]
    for c in cores[1:]:
        approx = torch.tensordot(approx, c, dims=([approx.dim() - 1], [0]))
    err = float((approx.reshape(T.shape) - T).norm() / T.norm())
    assert err <= eps
    # near equality: dropping one more rank anywhere would not be allowed, so the error is not tiny
    assert err > eps / 4


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_mpo_error_equals_tensorly_tensor_train_matrix(rank):
    W = low_rank_plus_noise(64, 36, 10, 0.3)
    ours = tensornets.decompose(W, "mpo", rank=rank, modes=((4, 4, 4), (3, 3, 4)))
    tt = tensor_train_matrix(W.reshape(4, 4, 4, 3, 3, 4), rank=[1] + list(ours.ranks) + [1])
    ref = tl.tt_matrix_to_tensor(tt).reshape(64, 36)
    err_ours = float((ours.to_dense().detach() - W).norm())
    err_ref = float((ref - W).norm())
    assert err_ours == pytest.approx(err_ref, rel=1e-7)


@pytest.mark.parametrize("ranks", [(3, 4), (8, 8), (12, 5)])
def test_tucker_hooi_error_equals_tensorly_tucker(ranks):
    W = low_rank_plus_noise(48, 60, 12, 0.3)
    T = W.reshape(6, 8, 6, 10)
    full_ranks = [ranks[0], ranks[0] // 2 or 1, ranks[1], ranks[1] // 2 or 1]
    full_ranks = [min(r, n) for r, n in zip(full_ranks, T.shape)]
    core, factors = hooi(T, rank=full_ranks, n_iter=100, tol=1e-12)
    ours = tl.tucker_to_tensor((core, factors))
    ref = tl.tucker_to_tensor(tucker(T, rank=full_ranks, init="svd", n_iter_max=100, tol=1e-12))
    assert float((ours - T).norm()) == pytest.approx(float((ref - T).norm()), rel=1e-4)
    fact = tensornets.decompose(W, "tucker", rank=full_ranks, modes=((6, 8), (6, 10)), algorithm="hooi")
    assert float((fact.to_dense().detach() - W).norm()) == pytest.approx(float((ref - T).norm()), rel=1e-4)


def test_hooi_keeps_ranks_above_the_product_of_the_others():
    # rank (4, 1, 1, 1): mode 0's projected unfolding has one column, so its SVD gives one vector; the factor is
    # completed to the 4 columns asked for (what resolve_structure reports and a layer of those ranks loads)
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    request = dict(rank=[4, 1, 1, 1], modes=((4, 4), (4, 6)))
    hooi_fact = tensornets.decompose(W, "tucker", algorithm="hooi", **request)
    hosvd_fact = tensornets.decompose(W, "tucker", **request)
    assert hooi_fact.ranks == hosvd_fact.ranks == (4, 1, 1, 1)
    U = hooi_fact.out_factors[0]
    assert torch.allclose(U.mT @ U, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert (hooi_fact.to_dense() - W).norm() <= (hosvd_fact.to_dense() - W).norm() + 1e-12


def test_hooi_never_worse_than_hosvd():
    T = low_rank_plus_noise(48, 60, 12, 0.5).reshape(6, 8, 6, 10)
    rank = [3, 4, 3, 5]
    e_hosvd = (tl.tucker_to_tensor(hosvd(T, rank=rank)) - T).norm()
    e_hooi = (tl.tucker_to_tensor(hooi(T, rank=rank)) - T).norm()
    assert e_hooi <= e_hosvd + 1e-12


def test_randomized_mpo_close_to_full():
    W = low_rank_plus_noise(256, 256, 32, 0.05, dtype=torch.float32)
    full = tensornets.decompose(W, "mpo", rank=16, num_cores=4)
    rand = tensornets.decompose(W, "mpo", rank=16, num_cores=4, svd="randomized", seed=0)
    e_full = float((full.to_dense().detach() - W).norm() / W.norm())
    e_rand = float((rand.to_dense().detach() - W).norm() / W.norm())
    assert e_full <= e_rand * (1 + 1e-6) and e_rand <= e_full * 1.01


def test_btt_projection_is_blockwise_optimal():
    """Each (o0, a1) block of the BTT projection is that block's best rank-r approximation."""
    W = low_rank_plus_noise(48, 60, 12, 0.5)
    btt = tensornets.decompose(W, "btt", rank=2)
    (m1, m0), (n0, n1) = btt.in_modes, btt.out_modes
    blocks = W.reshape(n0, n1, m1, m0).permute(0, 2, 1, 3)
    approx = btt.to_dense().detach().reshape(n0, n1, m1, m0).permute(0, 2, 1, 3)
    s = torch.linalg.svdvals(blocks)
    assert_close((blocks - approx).pow(2).sum(dim=(-2, -1)), s[..., 2:].pow(2).sum(-1))


@pytest.mark.parametrize("shape", [(12, 700), (700, 12)])
def test_thin_and_gram_svd_match_lapack(shape):
    from tensornets.decompositions import gram_svd, thin_svd

    M = low_rank_plus_noise(*shape, 6, 0.1)
    U, S, Vh = thin_svd(M)
    assert_close(U @ torch.diag(S) @ Vh, M)
    assert_close(S, torch.linalg.svdvals(M))
    Ug, Sg, Vg = gram_svd(M, 5)
    assert_close(Sg, S[:5])
    assert_close(Ug @ torch.diag(Sg) @ Vg, U[:, :5] @ torch.diag(S[:5]) @ Vh[:5])
    # the randomized SVD takes this exact route when the sketch would be nearly as large as the short side
    Ur, Sr, Vr = truncated_svd(M, rank=5, method="randomized")
    assert_close(Sr, S[:5])


def test_mode_product_and_tucker_to_tensor_match_tensorly():
    torch.manual_seed(0)
    core = torch.randn(3, 4, 2, dtype=torch.float64)
    factors = [torch.randn(n, r, dtype=torch.float64) for n, r in ((5, 3), (6, 4), (7, 2))]
    assert_close(tensornets.tucker_to_tensor(core, factors), tl.tucker_to_tensor((core, factors)))
    assert_close(tensornets.mode_product(core, factors[1], 1), tl.tenalg.mode_dot(core, factors[1], 1))
    # a partial Tucker: the factors act on modes 0 and 2 only, mode 1 keeps its size
    partial = tensornets.tucker_to_tensor(core, [factors[0], factors[2]], modes=[0, 2])
    assert_close(partial, torch.einsum("abc,ia,kc->ibk", core, factors[0], factors[2]))


@pytest.mark.parametrize("rank", [(2, 3), (4, 4), (6, 5)])
def test_stack_tucker2_matches_hosvd_and_tensorly_partial_tucker(rank):
    from tensorly.decomposition import partial_tucker

    torch.manual_seed(0)
    matrices = [torch.randn(6, 5, dtype=torch.float64) for _ in range(4)]
    stack = torch.stack(matrices, dim=1)  # (n_out, M, n_in)
    U, core, V = tensornets.stack_tucker2(matrices, rank)
    assert U.shape == (6, rank[0]) and V.shape == (5, rank[1]) and core.shape == (rank[0], 4, rank[1])
    (ref_core, (ref_u, ref_v)), _ = partial_tucker(stack, rank=list(rank), modes=[0, 2], n_iter_max=0, init="svd")
    ours_core, (ours_u, ours_v) = hosvd(stack, rank=list(rank), modes=[0, 2])
    for ref in (ref_u, ours_u):  # same subspaces (singular vectors up to sign)
        assert_close(U @ U.T, ref @ ref.T)
    for ref in (ref_v, ours_v):
        assert_close(V @ V.T, ref @ ref.T)
    reconstruction = tensornets.tucker_to_tensor(core, [U, V], modes=[0, 2])
    assert_close(reconstruction, tensornets.tucker_to_tensor(ref_core, [ref_u, ref_v], modes=[0, 2]))
    if rank == (6, 5):  # full ranks: exact
        assert_close(reconstruction, stack)


def test_stack_tucker2_rejects_bad_input():
    with pytest.raises(ValueError, match="matrices is empty"):
        tensornets.stack_tucker2([], 2)
    with pytest.raises(ValueError, match="of one shape"):
        tensornets.stack_tucker2([torch.zeros(3, 4), torch.zeros(4, 3)], 2)
    with pytest.raises(ValueError, match=r"R_2=5 must lie in \[1, 4\]"):
        tensornets.stack_tucker2([torch.zeros(6, 4)], (2, 5))


def test_randomized_svd_at_full_rank_is_the_exact_svd():
    # at full rank there is nothing to sketch: the Gram route would square the condition number
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(36, 24, generator=gen, dtype=torch.float64)).Q
    M = U @ torch.diag(torch.logspace(0, -12, 24, dtype=torch.float64)) @ V.T
    fact = tensornets.decompose(M, "lowrank", rank=24, svd="randomized")
    assert float((fact.to_dense() - M).norm() / M.norm()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_decomposed_in_float32(dtype):
    # LAPACK has no half-precision SVD: these raised NotImplementedError ("linalg_svd_cpu" not implemented)
    torch.manual_seed(0)
    W = torch.randn(24, 32).to(dtype)
    T = W.reshape(4, 6, 4, 8)
    for function, args in [(tensornets.truncated_svd, (W, 4)), (tensornets.tt_svd, (T, 3)),
                           (tensornets.hosvd, (T, 3)), (tensornets.hooi, (T, 3))]:
        got, expected = function(*args), function(*(a.float() if torch.is_tensor(a) else a for a in args))
        flat_got = [t for item in got for t in (item if isinstance(item, (list, tuple)) else [item])]
        flat_expected = [t for item in expected for t in (item if isinstance(item, (list, tuple)) else [item])]
        assert all(g.dtype == dtype and torch.equal(g, e.to(dtype)) for g, e in zip(flat_got, flat_expected)), function
    U, S, Vh = tensornets.truncated_svd(matrix=W, rank=4)  # by keyword too, as documented
    assert U.dtype == dtype and U.shape == (24, 4)


_GEN = torch.Generator().manual_seed(0)
_M = torch.randn(200, 300, generator=_GEN)
_T = torch.randn(4, 5, 6, generator=_GEN)
_W = torch.randn(6, 8, generator=_GEN)


@pytest.mark.parametrize(
    "function, args, kwargs, error, match",
    [
        # randomized_svd had no rank check: -1 gave 8 triplets, 0 none, 1000 the 200 there are
        (tensornets.randomized_svd, (_M, -1), {}, ValueError, r"rank=-1 must be in \[1, min\(m, n\)=200\]"),
        (tensornets.randomized_svd, (_M, 0), {}, ValueError, r"rank=0 must be in \[1, min\(m, n\)=200\]"),
        (tensornets.randomized_svd, (_M, 1000), {}, ValueError, r"rank=1000 must be in \[1, min\(m, n\)=200\]"),
        (tensornets.randomized_svd, (_M, 2.0), {}, TypeError, r"rank=2.0 must be an int"),
        (tensornets.randomized_svd, (_M, 5), dict(oversample=-5), ValueError, r"oversample=-5 must be an int >= 0"),
        (tensornets.randomized_svd, (_M, 5), dict(n_iter=-1), ValueError, r"n_iter=-1 must be an int >= 0"),
        (tensornets.truncated_svd, (_M, 2), dict(method="randomized", oversample=-5), ValueError, r"oversample=-5"),
        # hosvd / hooi sliced [:, :-2] for rank=-2 and returned empty factors for 0
        (tensornets.hosvd, (_T,), dict(rank=-2), ValueError, r"rank=-2 must be an int >= 1"),
        (tensornets.hosvd, (_T,), dict(rank=0), ValueError, r"rank=0 must be an int >= 1"),
        (tensornets.hosvd, (_T,), dict(rank=[2, 0, 3]), ValueError, r"rank\[1\]=0 must be an int >= 1"),
        (tensornets.hosvd, (_T,), dict(rank=True), TypeError, r"rank=True must be an int"),
        (tensornets.hosvd, (_T,), dict(rank=2, modes=[0, 5]), ValueError, r"modes=\[0, 5\] must be distinct axes"),
        (tensornets.hooi, (_T,), dict(rank=0), ValueError, r"rank=0 must be an int >= 1"),
        (tensornets.hooi, (_T,), dict(rank=2, n_iter=-1), ValueError, r"n_iter=-1 must be an int >= 0"),
        (tensornets.hooi, (_T,), dict(rank=2, tol=float("nan")), ValueError, r"tol=nan must be a number >= 0"),
        # tt_svd ignored an unknown method and truncated rank=[2.7, 3] to [2, 3]
        (tensornets.tt_svd, (_T,), dict(rank=2, method="typo"), ValueError, r"method='typo' must be 'full' or"),
        (tensornets.tt_svd, (_T,), dict(rank=[2.7, 3]), TypeError, r"rank\[0\]=2.7 must be an int"),
        # cp_als: tensorly reads rank=2.5 as a fraction of parameters (20 terms here)
        (tensornets.cp_als, (_T, 2.5), {}, TypeError, r"rank=2.5 must be an int"),
        (tensornets.cp_als, (_T, True), {}, TypeError, r"rank=True must be an int"),
        (tensornets.cp_als, (_T, 0), {}, ValueError, r"rank=0 must be an int >= 1"),
        # stack_tucker2 took rank=True as 1
        (tensornets.stack_tucker2, ([_W, _W], True), {}, TypeError, r"rank=True must be an int"),
        (tensornets.stack_tucker2, ([_W, _W], (2, 2.5)), {}, TypeError, r"rank=2.5 must be an int"),
        (tensornets.stack_tucker2, (torch.stack([_W, _W]), 2), {}, TypeError, r"pass list\(matrices\)"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_low_level_functions_refuse_bad_arguments(function, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(*args, **kwargs)


def _with(tensor: torch.Tensor, value: float) -> torch.Tensor:
    bad = tensor.clone()
    bad.view(-1)[3] = value
    return bad


# (function called on x, argument name, a valid x): the input check runs before any LAPACK call
_INPUT_CASES = [
    (lambda x: tensornets.truncated_svd(x, rank=2), "matrix", _W),
    (lambda x: tensornets.randomized_svd(x, 2), "matrix", _W),
    (lambda x: tensornets.tt_svd(x, rank=2), "tensor", _T),
    (lambda x: tensornets.hosvd(x, rank=2), "tensor", _T),
    (lambda x: tensornets.hooi(x, rank=2), "tensor", _T),
    (lambda x: tensornets.cp_als(x, 2), "tensor", _T),
    (lambda x: tensornets.stack_tucker2([x], 2), r"matrices\[0\]", _W),
]
_BAD_INPUTS = [
    ("numpy", lambda x: x.numpy(), TypeError, "must be a torch.Tensor"),
    ("int", lambda x: x.long(), TypeError, r"must be a floating tensor .*\.float\(\)"),
    ("nan", lambda x: _with(x, float("nan")), ValueError, "has 1 NaN/inf entries"),
    ("inf", lambda x: _with(x, float("inf")), ValueError, "has 1 NaN/inf entries"),
    ("0-d", lambda x: torch.tensor(1.0), ValueError, r"(must be 2-D|is 0-d)"),  # a matrix needs 2 axes, a tensor 1
]


@pytest.mark.parametrize("call, name, good", _INPUT_CASES, ids=["truncated_svd", "randomized_svd", "tt_svd", "hosvd",
                                                               "hooi", "cp_als", "stack_tucker2"])
@pytest.mark.parametrize("kind, make, error, match", _BAD_INPUTS, ids=[case[0] for case in _BAD_INPUTS])
def test_low_level_functions_refuse_bad_input_tensors_naming_the_argument(call, name, good, kind, make, error, match):
    # these failed deep inside (LinAlgError, IndexError, AttributeError) or returned garbage (int stack_tucker2 gave
    # all-zero int factors, cp_als fitted an int tensor)
    call(good)
    with pytest.raises(error, match=rf"^{name} {match}"):
        call(make(good))


def test_rank_lists_as_arrays_and_meta_input_errors():
    import numpy as np

    torch.manual_seed(0)
    T = torch.randn(4, 5, 6)
    for ranks in (np.array([2, 3]), torch.tensor([2, 3])):  # taken as the list they hold
        assert [c.shape[-1] for c in tensornets.tt_svd(T, rank=ranks)[:-1]] == [2, 3]
    core, _ = tensornets.hosvd(T, rank=np.array([2, 2, 2]))
    assert core.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="is on the meta device"):  # not torch's "unsupported scalarType"
        tensornets.tt_svd(torch.empty(4, 5, 6, device="meta"), rank=2)
