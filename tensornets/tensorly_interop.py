"""Conversions between tensornets factorizations and tensorly's factorized tensors.

=====================  ==============================================  ===============================
tensornets             tensorly                                        full tensor (tensorly)
=====================  ==============================================  ===============================
``Tucker``             ``TuckerTensor((core, [U_o1.., U_i1..]))``      ``tucker_to_tensor``
``TensorTrain``        ``TTTensor([G_1, ..., G_{m+n}])``               ``tt_to_tensor``
``MPO``                ``TTMatrix([G_1, ..., G_d])``                   ``tt_matrix_to_tensor``
``CP``                 ``CPTensor((ones(R), [A_1.., B_1..]))``         ``cp_to_tensor``
``LowRank``            ``CPTensor((ones(r), [U, V^T]))``               ``cp_to_tensor``
=====================  ==============================================  ===============================

The cores are the same arrays in both libraries: tensorly's TT cores are ``(R_{k-1}, n_k, R_k)``
and its TT-matrix cores ``(r_{k-1}, rows_k, cols_k, r_k)`` with the row (out) mode first, as
``tt_matrix_to_tensor`` contracts them (its ``TensorTrain`` / ``TensorTrainMatrix`` docstrings
are swapped; the code is what counts). The full tensor has the modes ``(o_1..o_m, i_1..i_n)``:
reshaped to ``(prod o, prod i)`` it is the padded ``W``, whose ``[:out, :in]`` corner is
:meth:`~tensornets.Factorization.to_dense`. BTT has no tensorly counterpart.

Exports hold detached tensors sharing storage with the module's parameters (no copy, no
gradient); imports copy into new parameters, on the arrays' device and dtype (numpy arrays are
converted with ``torch.as_tensor``). Exports hold torch tensors: run tensorly on them under its
PyTorch backend (``tl.set_backend("pytorch")`` or ``with tl.backend_context("pytorch"):``).
"""

from __future__ import annotations

import math
from typing import Any

import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from tensorly.tt_matrix import TTMatrix
from tensorly.tt_tensor import TTTensor
from tensorly.tucker_tensor import TuckerTensor

from .formats import CP, MPO, Factorization, LowRank, TensorTrain, Tucker
from .formats.cp import fold_weights

__all__ = ["to_tensorly", "from_tensorly", "TensorlyTensor"]

TensorlyTensor = TuckerTensor | TTTensor | TTMatrix | CPTensor

#: the tensorly type each format exports to and imports from
_TENSORLY_TYPE: dict[type[Factorization], type] = {
    Tucker: TuckerTensor,
    TensorTrain: TTTensor,
    MPO: TTMatrix,
    CP: CPTensor,
    LowRank: CPTensor,
}
#: the format a tensorly object becomes when no format is asked for
_FORMAT_OF: dict[type, type[Factorization]] = {TuckerTensor: Tucker, TTTensor: TensorTrain, TTMatrix: MPO, CPTensor: CP}


def to_tensorly(factorization: Factorization) -> TensorlyTensor:
    """``factorization`` as the tensorly object of the same format (see the module table).

    ``tl.<kind>_to_tensor(result).reshape(padded_out, padded_in)[:out, :in]`` equals
    ``factorization.to_dense()``.
    """
    kind = _format_class(type(factorization))
    cores = [p.detach() for p in _cores(factorization)]
    with tl.backend_context("pytorch", local_threadsafe=True):
        if kind is Tucker:
            return TuckerTensor((cores[0], cores[1:]))
        if kind in (TensorTrain, MPO):
            return _TENSORLY_TYPE[kind](cores)
        weights = torch.ones(factorization.ranks[0], dtype=cores[0].dtype, device=cores[0].device)
        return CPTensor((weights, cores))


def from_tensorly(
    obj: TensorlyTensor,
    format: type[Factorization] | str | None = None,
    *,
    num_out_modes: int | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
) -> Factorization:
    """A factorization holding copies of the cores of a tensorly ``TuckerTensor``, ``TTTensor``,
    ``TTMatrix`` or ``CPTensor``.

    Parameters
    ----------
    obj : tensorly factorized tensor
        Its full tensor has modes ``(o_1..o_m, i_1..i_n)`` (a ``TTMatrix``: rows ``o``, columns ``i``).
    format : Factorization subclass or name, optional
        Default: the format matching ``type(obj)`` (``CPTensor`` -> ``CP``); pass ``"lowrank"`` to
        read a two-mode ``CPTensor`` as ``W = U V``.
    num_out_modes : int, optional
        How many leading modes index the rows of ``W`` (``m``). Required for Tucker, TT and CP
        tensors of more than two modes; a ``TTMatrix`` carries the split itself.
    in_features, out_features : int, optional
        The unpadded sizes, when the modes multiply to more (default: the products of the modes).

    CP weights are folded into the factors (``|w_r|^(1/d)`` into each, the sign into the first).
    """
    cls = _FORMAT_OF.get(type(obj)) if format is None else _resolve_format(format)
    if cls is None:
        raise TypeError(
            f"obj is a {type(obj).__name__}; from_tensorly reads TuckerTensor, TTTensor, TTMatrix or CPTensor"
        )
    cls = _format_class(cls)
    expected = _TENSORLY_TYPE[cls]
    if not isinstance(obj, expected):
        raise TypeError(f"format {cls.format_name!r} reads a tensorly {expected.__name__}, got a {type(obj).__name__}")
    if cls is MPO:
        if num_out_modes is not None:
            raise ValueError("num_out_modes does not apply to a TTMatrix: each core has its own (row, column) pair")
        cores = [_as_torch(c) for c in obj]
        out_modes = [c.shape[1] for c in cores]
        in_modes = [c.shape[2] for c in cores]
        ranks = [c.shape[-1] for c in cores[:-1]]
    elif cls is Tucker:
        core, factors = obj
        cores = [_as_torch(core), *(_as_torch(f) for f in factors)]
        out_modes, in_modes = _split(tuple(f.shape[0] for f in cores[1:]), num_out_modes)
        ranks = list(cores[0].shape)
    elif cls is TensorTrain:
        cores = [_as_torch(c) for c in obj]
        out_modes, in_modes = _split(tuple(c.shape[1] for c in cores), num_out_modes)
        ranks = [c.shape[-1] for c in cores[:-1]]
    else:
        weights, factors = obj
        factors = [_as_torch(f) for f in factors]
        weights = torch.ones(factors[0].shape[1], dtype=factors[0].dtype, device=factors[0].device) if weights is None else _as_torch(weights)
        cores = fold_weights(weights.to(factors[0].dtype), factors)
        out_modes, in_modes = _split(tuple(f.shape[0] for f in cores), num_out_modes)
        ranks = [cores[0].shape[1]]
        if cls is LowRank and len(cores) != 2:
            raise ValueError(f"lowrank reads a two-mode CPTensor (U, V^T), got {len(cores)} modes; use format='cp'")
    module = cls.empty(
        math.prod(in_modes) if in_features is None else in_features,
        math.prod(out_modes) if out_features is None else out_features,
        in_modes=in_modes, out_modes=out_modes, ranks=ranks, dtype=cores[0].dtype, device=cores[0].device,
    )
    with torch.no_grad():
        for param, value in zip(_cores(module), cores):
            if param.shape != value.shape:
                raise ValueError(f"a {type(obj).__name__} core has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value)
    return module


def _format_class(cls: type[Factorization]) -> type[Factorization]:
    """The supported format ``cls`` is (or derives from)."""
    for kind in _TENSORLY_TYPE:
        if issubclass(cls, kind):
            return kind
    raise TypeError(
        f"{cls.__name__} has no tensorly counterpart; tensorly interop covers "
        f"{', '.join(k.format_name for k in _TENSORLY_TYPE)}"
    )


def _resolve_format(format: type[Factorization] | str) -> type[Factorization]:
    if isinstance(format, str):
        from .formats import get_format

        return get_format(format)
    return format


def _cores(module: Factorization) -> list[torch.Tensor]:
    """The parameters in the order tensorly stores them."""
    if isinstance(module, LowRank):
        return [module.U, module.V.T]
    if isinstance(module, Tucker):
        return [module.core, *module.out_factors, *module.in_factors]
    if isinstance(module, CP):
        return [*module.out_factors, *module.in_factors]
    return list(module.cores)


def _split(sizes: tuple[int, ...], num_out_modes: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(out_modes, in_modes)`` from the full tensor's modes."""
    if num_out_modes is None:
        if len(sizes) != 2:
            raise ValueError(
                f"the tensor has {len(sizes)} modes {sizes}: pass num_out_modes= (how many leading modes index the rows of W)"
            )
        num_out_modes = 1
    if not 1 <= num_out_modes < len(sizes):
        raise ValueError(f"num_out_modes={num_out_modes} must be in [1, {len(sizes) - 1}] for a tensor of modes {sizes}")
    return sizes[:num_out_modes], sizes[num_out_modes:]


def _as_torch(array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.as_tensor(array)
