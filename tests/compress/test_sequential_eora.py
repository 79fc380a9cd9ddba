"""Sequential EoRA: the ridge-penalised drift objective, its cross-validated choice, and the model-level paths."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from compress import (
    CompressionConfig,
    EoraAdapter,
    collect_activation_stats,
    compress_model,
    eora_compensate,
    eora_factors,
    select_sequential_factors,
    sequential_eora_factors,
)
from compress.calibration import CrossStats, LayerStats, accumulate_cross_stats, layer_inputs
from compress.sequential_eora import INDEPENDENT, drifted_output_error, drifted_squared_error
from compress.targets import dense_weight
from anisotropic import anisotropic_mlp
from tolerance import assert_close


def cross_of(X: torch.Tensor, Xt: torch.Tensor) -> CrossStats:
    """Statistics of explicit rows ``X, Xt: (N, in)``."""
    return CrossStats(LayerStats(X.T @ X, X.abs().sum(0), len(X)), LayerStats(Xt.T @ Xt, Xt.abs().sum(0), len(X)),
                      Xt.T @ X)


def drifted_rows(N: int, n: int = 12, m: int = 7, drift: float = 0.3, seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(N, n, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    Xt = X + drift * torch.randn(N, n, dtype=torch.float64)
    W, Wc = torch.randn(m, n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    return X, Xt, W, Wc


def reduced_rank_optimum(Z: torch.Tensor, Y: torch.Tensor, r: int) -> torch.Tensor:
    """``min ‖Y − Z Mᵀ‖`` over rank-r ``M`` (``Z`` of full column rank): rank-r SVD of the least-squares fit."""
    P = Z @ torch.linalg.lstsq(Z, Y).solution
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    return torch.linalg.lstsq(Z, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).solution.T


@pytest.mark.parametrize("ridge", [0.0, 0.05, 3.0])
def test_factors_are_the_optimum_of_the_penalised_drifted_objective(ridge):
    """Against explicit rows: ``‖X Wᵀ − X̃ (W_c + M)ᵀ‖² + λ'‖M − ΔW‖²`` is a reduced-rank regression on the
    stacked design ``[X̃; √λ' I]`` with target ``[X Wᵀ − X̃ W_cᵀ; √λ' ΔWᵀ]``."""
    X, Xt, W, Wc = drifted_rows(200)
    r = 3
    cross = cross_of(X, Xt)
    B, A = sequential_eora_factors(W, Wc, cross, r, ridge=ridge)
    lam = ridge * float((Xt.T @ Xt).diagonal().mean())
    eye = torch.eye(X.shape[1], dtype=torch.float64)
    Z = torch.cat([Xt, lam**0.5 * eye])
    Y = torch.cat([X @ W.T - Xt @ Wc.T, lam**0.5 * (W - Wc).T])
    objective = lambda M: float(torch.linalg.norm(Y - Z @ M.T) ** 2)
    best = reduced_rank_optimum(Z, Y, r)
    assert abs(objective(B @ A) - objective(best)) <= 1e-9 * objective(best)
    assert_close(B @ A, best, tol=1e-8)
    # the statistics give the drifted error of the explicit rows
    got = torch.linalg.norm(X @ W.T - Xt @ (Wc + B @ A).T) / torch.linalg.norm(X @ W.T)
    assert abs(drifted_output_error(W, Wc + B @ A, cross) - float(got)) <= 1e-9


def test_without_drift_and_ridge_it_is_eora():
    X, _, W, Wc = drifted_rows(200)
    same = cross_of(X, X)
    B0, A0 = sequential_eora_factors(W, Wc, same, 3)
    B1, A1 = eora_factors(W - Wc, same.reference, 3)
    assert_close(B0 @ A0, B1 @ A1, tol=1e-9)


def test_large_ridge_tends_to_the_plain_svd_of_the_error():
    X, Xt, W, Wc = drifted_rows(200)
    B, A = sequential_eora_factors(W, Wc, cross_of(X, Xt), 3, ridge=1e8)
    U, S, Vh = torch.linalg.svd(W - Wc)
    assert_close(B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], tol=1e-6)


def test_cross_stats_merge_is_the_statistics_of_the_concatenated_rows():
    X, Xt, _, _ = drifted_rows(60)
    merged = cross_of(X[:25], Xt[:25]).merge(cross_of(X[25:], Xt[25:]))
    whole = cross_of(X, Xt)
    for a, b in [(merged.cross, whole.cross), (merged.current.gram, whole.current.gram),
                 (merged.reference.gram, whole.reference.gram), (merged.current.abs_sum, whole.current.abs_sum)]:
        assert_close(a, b, tol=1e-12)
    assert merged.current.count == 60
    with pytest.raises(ValueError, match="same layer"):
        merged.merge(cross_of(X[:, :5], Xt[:, :5]))


def _fold_error(W, Wc, B, A, X, Xt) -> float:
    return float(torch.linalg.norm(X @ W.T - Xt @ (Wc + B @ A).T) ** 2)


def test_cross_validation_scores_each_candidate_on_the_fold_it_was_not_fitted_on():
    X, Xt, W, Wc = drifted_rows(120, n=20, drift=0.5)
    halves = [(X[0::2], Xt[0::2]), (X[1::2], Xt[1::2])]
    folds = [cross_of(*h) for h in halves]
    ridges = (0.0, 0.1)
    fit = select_sequential_factors(W, Wc, folds, 3, ridges=ridges)
    assert set(fit.heldout_errors) == {INDEPENDENT, "ridge=0", "ridge=0.1"}
    ref = sum(float(torch.linalg.norm(x @ W.T) ** 2) for x, _ in halves)
    for label, ridge in [(INDEPENDENT, None), ("ridge=0", 0.0), ("ridge=0.1", 0.1)]:
        err = 0.0
        for k, (x, xt) in enumerate(halves):
            train = folds[1 - k]
            B, A = (eora_factors(W - Wc, train.reference, 3) if ridge is None
                    else sequential_eora_factors(W, Wc, train, 3, ridge=ridge))
            err += _fold_error(W, Wc, B, A, x, xt)
        assert abs(fit.heldout_errors[label] - (err / ref) ** 0.5) <= 1e-9
    assert fit.choice == min(fit.heldout_errors, key=fit.heldout_errors.get)
    # the chosen candidate is refitted on all folds
    everything = folds[0].merge(folds[1])
    ridge = None if fit.choice == INDEPENDENT else float(fit.choice.split("=")[1])
    B, A = (eora_factors(W - Wc, everything.reference, 3) if ridge is None
            else sequential_eora_factors(W, Wc, everything, 3, ridge=ridge))
    assert_close(fit.B @ fit.A, B @ A, tol=1e-9)


def test_cross_validation_follows_whether_the_drift_is_predictable():
    """A drift that is a fixed linear map of ``X̃`` is worth correcting; a drift that is noise independent of ``X̃``
    (with few tokens per input) is not, and independent EoRA or a strong ridge wins."""
    torch.manual_seed(0)
    n, m, N = 24, 16, 96
    Xt = torch.randn(N, n, dtype=torch.float64)
    W, Wc = torch.randn(m, n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    R = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, dtype=torch.float64) / n**0.5
    folds = lambda X: [cross_of(X[k::2], Xt[k::2]) for k in range(2)]
    predictable = select_sequential_factors(W, Wc, folds(Xt @ R.T), 8, ridges=(1e-3, 1.0))
    assert predictable.choice == "ridge=0.001", predictable.heldout_errors
    noise = select_sequential_factors(W, Wc, folds(Xt + torch.randn(N, n, dtype=torch.float64)), 8,
                                      ridges=(1e-3, 1.0))
    assert noise.choice in (INDEPENDENT, "ridge=1"), noise.heldout_errors
    assert noise.heldout_errors[noise.choice] < noise.heldout_errors["ridge=0.001"]


def test_bad_selection_input():
    X, Xt, W, Wc = drifted_rows(40)
    cross = cross_of(X, Xt)
    with pytest.raises(ValueError, match="at least 2"):
        select_sequential_factors(W, Wc, [cross], 3)
    with pytest.raises(ValueError, match="ridges is empty"):
        select_sequential_factors(W, Wc, [cross, cross], 3, ridges=())
    with pytest.raises(ValueError, match="ridge=-1"):
        sequential_eora_factors(W, Wc, cross, 3, ridge=-1)
    with pytest.raises(ValueError, match="ridge=nan"):
        select_sequential_factors(W, Wc, [cross, cross], 3, ridges=(float("nan"),))
    with pytest.raises(ValueError, match="rank=99"):
        sequential_eora_factors(W, Wc, cross, 99)
    with pytest.raises(ValueError, match="same"):
        sequential_eora_factors(W, Wc[:, :5], cross, 3)
    err, ref = drifted_squared_error(W, Wc, cross)
    assert err > 0 and ref > 0


# --- model level ---


def _rows(model: nn.Module, name: str, batches) -> torch.Tensor:
    """All input rows ``(N, in)`` of layer ``name`` over ``batches``, float64."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: rows.append(layer_inputs(m, args[0].detach()).double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(rows)


def test_model_statistics_pair_dense_and_compensated_inputs_per_fold():
    model, calib, _ = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=2, group_size=16), stats, progress=False).model
    seq = eora_compensate(model, quant, rank=4, sequential=True, calib_batches=calib, progress=False)
    assert [r.name for r in seq.layers] == ["0", "2", "4"] and all(r.choice for r in seq.layers)
    # layer "2" (its own block): dense inputs X paired with the inputs X̃ of the quantized model with layer 0's
    # final residual applied, on even and odd calibration batches
    partial = EoraAdapter({"0": seq.factors["0"]}, {"0": "linear"}, 4, "eora", []).apply(quant)
    folds = [accumulate_cross_stats(model, partial, ["2"], calib[k::2])["2"] for k in range(2)]
    X, Xt = _rows(model, "2", calib[0::2]), _rows(partial, "2", calib[0::2])
    assert_close(folds[0].cross, (Xt.T @ X).float(), tol=1e-5)
    fit = select_sequential_factors(dense_weight(model[2]), dense_weight(quant[2]), folds, 4)
    assert fit.choice == seq.layers[1].choice
    assert_close(seq.factors["2"][0] @ seq.factors["2"][1], (fit.B @ fit.A).float(), tol=1e-4)
    # each residual lowers the error against the dense outputs
    assert all(r.error_after < r.error_before for r in seq.layers)
    with pytest.raises(ValueError, match="pass a list, not an iterator"):
        eora_compensate(model, quant, rank=4, sequential=True, calib_batches=iter(calib))
    with pytest.raises(ValueError, match="at least 2"):
        eora_compensate(model, quant, rank=4, sequential=True, calib_batches=calib[:1])
    with pytest.raises(ValueError, match="method='eora'"):
        eora_compensate(model, quant, rank=4, method="svd", sequential=True, calib_batches=calib)


class _InPlaceResidual(nn.Module):
    """``fc2(h + fc(h))`` with the sum done in place, after ``fc`` has seen ``h``."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, h):
        h = h * 1.0
        h += self.fc(h)
        return self.fc2(h)


def test_cross_statistics_hold_copies_of_the_reference_rows():
    # the reference rows were views of the activation: the in-place residual rewrote them before they were paired
    torch.manual_seed(0)
    model, x = _InPlaceResidual().eval(), torch.randn(32, 16)
    cross = accumulate_cross_stats(model, model, ["fc"], [x], stop_after_all=False)["fc"]
    gram = (x.T @ x).double()
    for moment in (cross.cross, cross.reference.gram, cross.current.gram):
        assert_close(moment.double(), gram, tol=1e-6)


def test_sequential_is_not_worse_than_independent_on_held_out_outputs():
    """Final outputs of the sequentially compensated MLP are at least as close to the dense ones on held-out inputs."""
    model, calib, held_out = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=2, group_size=16), stats, progress=False).model
    errors = {}
    for sequential in (False, True):
        eora = eora_compensate(model, quant, stats, rank=4, sequential=sequential, calib_batches=calib, progress=False)
        comp = eora.apply(quant)
        with torch.no_grad():
            errors[sequential] = sum(float((comp(x) - model(x)).norm() ** 2) for x in held_out)
    assert errors[True] <= errors[False], errors


def test_sequential_groups_transformer_blocks():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, 96, (4, 16)) for _ in range(4)]
    stats = collect_activation_stats(model, batches, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=32), stats, progress=False).model
    seq = eora_compensate(model, quant, stats, rank=4, sequential=True, calib_batches=batches, progress=False)
    assert list(seq.factors) == stats.order
    assert all(torch.isfinite(B).all() and torch.isfinite(A).all() for B, A in seq.factors.values())
