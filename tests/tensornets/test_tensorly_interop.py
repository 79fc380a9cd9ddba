"""tensorly interop: round trips, and tensorly's own reconstruction of our export as the reference."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor, cp_to_tensor
from tensorly.tt_matrix import TTMatrix, tt_matrix_to_tensor
from tensorly.tt_tensor import TTTensor, tt_to_tensor
from tensorly.tucker_tensor import TuckerTensor, tucker_to_tensor

import tensornets
from tensornets import Factorization
from tensornets.tensorly_interop import from_tensorly
from format_cases import IN, OUT, low_rank_plus_noise
from tolerance import assert_close

# (format, decompose kwargs, tensorly type, tensorly's full-tensor function)
CASES = [
    ("tucker", {"num_cores": 1}, TuckerTensor, tucker_to_tensor),
    ("tucker", {"num_cores": 2}, TuckerTensor, tucker_to_tensor),
    ("tt", {"num_cores": 2}, TTTensor, tt_to_tensor),
    ("mpo", {"num_cores": 2}, TTMatrix, tt_matrix_to_tensor),
    ("mpo", {"modes": ((4, 3, 4), (5, 3, 4))}, TTMatrix, tt_matrix_to_tensor),
    ("cp", {"num_cores": 2}, CPTensor, cp_to_tensor),
    ("lowrank", {}, CPTensor, cp_to_tensor),
]
IDS = [f"{c[0]}-{c[1].get('num_cores', 'modes')}" for c in CASES]


@pytest.fixture
def pytorch_backend():
    with tl.backend_context("pytorch"):
        yield


@pytest.mark.parametrize("fmt, kw, kind, full_tensor", CASES, ids=IDS)
def test_export_matches_tensorly_reconstruction(pytorch_backend, fmt, kw, kind, full_tensor):
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=3, **kw)
    exported = fact.to_tensorly()
    assert type(exported) is kind
    full = full_tensor(exported)
    assert tuple(full.shape) == (*fact.out_modes, *fact.in_modes)
    assert_close(full.reshape(OUT, IN), fact.to_dense().detach())


@pytest.mark.parametrize("fmt, kw, kind, full_tensor", CASES, ids=IDS)
def test_round_trip_is_bitwise(fmt, kw, kind, full_tensor):
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=3, **kw)
    back = type(fact).from_tensorly(fact.to_tensorly(), **({} if fmt == "mpo" else {"num_out_modes": len(fact.out_modes)}))
    assert type(back) is type(fact) and back.spec() == fact.spec()
    for (name, a), b in zip(fact.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_base_class_picks_the_format_from_the_tensorly_type():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    for fmt, kind in (("tucker", tensornets.Tucker), ("tt", tensornets.TensorTrain), ("mpo", tensornets.MPO), ("cp", tensornets.CP)):
        fact = tensornets.decompose(W, fmt, rank=3, num_cores=2)
        kwargs = {} if fmt == "mpo" else {"num_out_modes": 2}
        assert type(Factorization.from_tensorly(fact.to_tensorly(), **kwargs)) is kind


def test_tensorly_decompositions_import_into_our_formats(pytorch_backend):
    """tensorly's own decompositions (an independent implementation) come in with the same W."""
    from tensorly.decomposition import parafac, tensor_train, tensor_train_matrix, tucker

    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    T = W.reshape(6, 8, 6, 10)
    for obj, full in (
        (tucker(T, rank=[3, 4, 3, 5]), tucker_to_tensor),
        (tensor_train(T, rank=[1, 4, 5, 4, 1]), tt_to_tensor),
        (parafac(T, 5, init="svd", random_state=0), cp_to_tensor),
    ):
        fact = from_tensorly(obj, num_out_modes=2)
        assert fact.out_modes == (6, 8) and fact.in_modes == (6, 10)
        assert_close(fact.to_dense().detach(), full(obj).reshape(OUT, IN))
    ttm = tensor_train_matrix(W.reshape(6, 8, 6, 10), rank=[1, 7, 1])  # rows (6, 8), columns (6, 10)
    fact = from_tensorly(ttm)
    assert fact.out_modes == (6, 8) and fact.in_modes == (6, 10) and isinstance(fact, tensornets.MPO)
    assert_close(fact.to_dense().detach(), tt_matrix_to_tensor(ttm).reshape(OUT, IN))


def test_cp_weights_are_folded_in():
    torch.manual_seed(0)
    weights = torch.tensor([2.0, -3.0], dtype=torch.float64)
    factors = [torch.randn(n, 2, dtype=torch.float64) for n in (6, 8, 60)]
    fact = from_tensorly(CPTensor((weights, factors)), num_out_modes=2)
    assert_close(fact.to_dense().detach(), torch.einsum("r,ar,br,cr->abc", weights, *factors).reshape(OUT, IN))


def test_padded_sizes_round_trip():
    W = low_rank_plus_noise(53, 61, 4, 0.1)
    fact = tensornets.decompose(W, "mpo", rank=4, num_cores=2, pad=True)
    back = from_tensorly(fact.to_tensorly(), in_features=61, out_features=53)
    assert back.spec() == fact.spec()
    assert torch.equal(back.to_dense(), fact.to_dense())


def test_numpy_arrays_import():
    W = low_rank_plus_noise(OUT, IN, 6, 0.3)
    fact = tensornets.decompose(W, "tt", rank=3, num_cores=2)
    cores = [c.detach().numpy() for c in fact.cores]
    with tl.backend_context("numpy"):  # a TTTensor of numpy arrays is validated by the backend in use
        back = from_tensorly(TTTensor(cores), num_out_modes=2)
    assert torch.equal(back.to_dense(), fact.to_dense())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda f: tensornets.decompose(f, "btt", rank=2).to_tensorly(), TypeError, "BTT has no tensorly counterpart"),
        (lambda f: from_tensorly(tensornets.decompose(f, "tt", rank=2, num_cores=2).to_tensorly()), ValueError, "pass num_out_modes="),
        (lambda f: from_tensorly(tensornets.decompose(f, "tt", rank=2, num_cores=2).to_tensorly(), num_out_modes=4), ValueError, r"num_out_modes=4 must be in \[1, 3\]"),
        (lambda f: tensornets.MPO.from_tensorly(tensornets.decompose(f, "tt", rank=2, num_cores=2).to_tensorly()), TypeError, "reads a tensorly TTMatrix, got a TTTensor"),
        (lambda f: from_tensorly(tensornets.decompose(f, "mpo", rank=2, num_cores=2).to_tensorly(), num_out_modes=1), ValueError, "does not apply to a TTMatrix"),
        (lambda f: from_tensorly(f), TypeError, "from_tensorly reads TuckerTensor"),
        (lambda f: tensornets.LowRank.from_tensorly(tensornets.decompose(f, "cp", rank=2, num_cores=2).to_tensorly(), num_out_modes=2), ValueError, "two-mode CPTensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(low_rank_plus_noise(OUT, IN, 6, 0.3))
