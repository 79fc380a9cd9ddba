"""Per-layer math: EoRA / whitened SVD against a brute-force dense optimum, baselines, rank rules."""

import pytest
import torch

from compress.calibration import LayerStats
from compress.eora import eora_factors
from compress.lowrank import lowrank_factors, rank_for_energy, rank_for_keep, relative_output_error
from compress.sources import rtn_quantize
from tolerance import assert_close


def stats_of(X: torch.Tensor) -> LayerStats:
    """Statistics of rows ``X: (N, n)`` computed directly (fp32 sums, as calibration stores them)."""
    X = X.float()
    return LayerStats(X.T @ X, X.abs().sum(0), X.shape[0])


def anisotropic_inputs(n: int, N: int, seed: int, decades: float = 2.0, outlier: float = 20.0) -> torch.Tensor:
    """``(N, n)`` rows with a fixed non-isotropic covariance and a few outlier channels (LLM-like)."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -decades, n, dtype=torch.float64)
    scales[:3] = outlier
    x = torch.randn(N, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x * scales) @ mix / n**0.5


def output_err(delta, BA, X):
    return float(torch.linalg.norm((delta - BA) @ X.T) / torch.linalg.norm(delta @ X.T))


@pytest.mark.parametrize("rank", [1, 4, 9])
@pytest.mark.parametrize("seed", [0, 1])
def test_eora_equals_brute_force_dense_optimum(rank, seed):
    """min ‖(ΔW − BA) X‖_F solved directly: Eckart-Young on ΔW X gives BA* = U_r U_rᵀ ΔW."""
    torch.manual_seed(seed)
    m, n, N = 12, 10, 200
    # condition number ~1e4: no eigenvalue falls below the pseudo-inverse cutoff, so the optimum is unique
    X = anisotropic_inputs(n, N, seed, decades=1.0, outlier=5.0)
    delta = torch.randn(m, n, dtype=torch.float64)
    U, _, _ = torch.linalg.svd(delta @ X.T, full_matrices=False)
    best = U[:, :rank] @ U[:, :rank].T @ delta

    B, A = eora_factors(delta, stats_of(X), rank)
    assert B.shape == (m, rank) and A.shape == (rank, n)
    obj = torch.linalg.norm((delta - B @ A) @ X.T)
    obj_best = torch.linalg.norm((delta - best) @ X.T)
    # X holds float32 sums: the optimum is reached to float32 accuracy
    assert abs(float(obj - obj_best)) <= 1e-5 * float(obj_best)
    assert_close(B @ A, best, tol=1e-4)


def test_eora_beats_svd_and_asvd_on_held_out_inputs():
    torch.manual_seed(0)
    m, n, rank = 48, 64, 8
    W = torch.randn(m, n, dtype=torch.float64)
    delta = W - rtn_quantize(W, bits=3, group_size=16)
    X_cal, X_test = anisotropic_inputs(n, 2048, 1), anisotropic_inputs(n, 2048, 2)
    st = stats_of(X_cal)
    errs = {}
    for method in ("eora", "svd", "asvd"):
        B, A = eora_factors(delta, st, rank, method=method)
        errs[method] = output_err(delta, B @ A, X_test)
    assert errs["eora"] < errs["asvd"] and errs["eora"] < errs["svd"], errs
    # the objective the whitened solution optimizes is also what relative_output_error reports
    B, A = eora_factors(delta, st, rank)
    direct = output_err(delta, B @ A, X_cal)
    assert relative_output_error(delta, B @ A, st) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("method", ["eora", "asvd", "svd"])
def test_dead_input_channels_give_finite_factors(method):
    torch.manual_seed(0)
    m, n, rank = 16, 24, 6
    X = anisotropic_inputs(n, 300, 0)
    dead = torch.tensor([0, 5, 6, 23])
    X[:, dead] = 0.0
    delta = torch.randn(m, n, dtype=torch.float64)
    B, A = eora_factors(delta, stats_of(X), rank, method=method)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    if method != "svd":
        # no input energy there: the residual does not act on dead channels
        assert A[:, dead].abs().max() < 1e-6 * A.abs().max()
    # and it still reduces the error on the live channels
    assert output_err(delta, B @ A, X) < 1.0


def test_whitening_truncates_a_rank_deficient_second_moment():
    """Inputs spanning only 5 of 20 directions: C is singular, eigenvalues below the cutoff are dropped."""
    torch.manual_seed(0)
    basis = torch.randn(5, 20, dtype=torch.float64)
    X = torch.randn(400, 5, dtype=torch.float64) @ basis
    delta = torch.randn(8, 20, dtype=torch.float64)
    B, A = eora_factors(delta, stats_of(X), 7)
    assert torch.isfinite(A).all()
    # rank 5 already reproduces ΔW on the input span exactly; the two extra components are zero padding
    assert output_err(delta, B @ A, X) < 1e-3
    assert torch.count_nonzero(B[:, 5:]) == 0


def test_ridge_interpolates_towards_plain_svd():
    torch.manual_seed(0)
    X = anisotropic_inputs(16, 500, 0)
    delta = torch.randn(10, 16, dtype=torch.float64)
    st = stats_of(X)
    B0, A0 = eora_factors(delta, st, 3, method="svd")
    Bh, Ah = eora_factors(delta, st, 3, ridge=1e6)
    # a huge ridge whitens nothing: plain SVD up to O(1/ridge), relative to ||delta||
    assert_close(Bh @ Ah, B0 @ A0, tol=1e-3, floor=float(delta.abs().max()))


def test_whitened_svd_of_a_weight_minimizes_calibration_output_error():
    torch.manual_seed(0)
    W = torch.randn(30, 20, dtype=torch.float64)
    X = anisotropic_inputs(20, 300, 0)
    st = stats_of(X)
    errs = {m: relative_output_error(W, (lambda BA: BA[0] @ BA[1])(lowrank_factors(W, 5, m, st)), st)
            for m in ("whitened", "asvd", "svd")}
    assert errs["whitened"] < errs["asvd"] and errs["whitened"] < errs["svd"]


def test_rank_rules():
    assert rank_for_keep(576, 1536, 1.0) == 576 * 1536 // (576 + 1536)
    assert rank_for_keep(100, 100, 0.5) == 25
    with pytest.raises(ValueError, match=r"keep=1.5 must be in \(0, 1\]"):
        rank_for_keep(10, 10, 1.5)
    with pytest.raises(ValueError, match="keep=0"):
        rank_for_keep(10, 10, 0)
    sq = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert rank_for_energy(sq, 0.7) == 2 and rank_for_energy(sq, 0.71) == 3 and rank_for_energy(sq, 1.0) == 4


def test_rank_above_full_is_refused():
    with pytest.raises(ValueError, match=r"rank=11 for layer 'M' of shape \(10, 12\).*\[1, 10\]"):
        lowrank_factors(torch.randn(10, 12), 11, "svd")
    with pytest.raises(ValueError, match="rank=0"):
        eora_factors(torch.randn(10, 12), None, 0, method="svd")


def test_cutoff_keeps_a_wide_real_spectrum_and_drops_the_null_space_of_few_rows():
    from compress.lowrank import whitening

    # eigenvalues spanning 10^6 (as outlier channels make them; float32 resolves 10^7), plenty of rows:
    # every direction is signal and is kept
    X = torch.randn(4000, 32, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)
    assert whitening(stats_of(X)).right.shape[1] == 32
    # fewer rows than inputs: C has rank 20, its null space only holds float32 rounding noise
    X = torch.randn(20, 64, dtype=torch.float64)
    assert whitening(stats_of(X)).right.shape[1] == 20
