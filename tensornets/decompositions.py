"""Decompositions with rank control: truncated SVD, TT-SVD, HOSVD, HOOI and CP (ALS).

All functions are plain tensor-in / tensors-out; the formats in :mod:`tensornets.formats` wrap
them. Rank control is one of

- ``rank``: a maximum rank (int, or one per bond / mode),
- ``eps``: a relative Frobenius error target; for TT-SVD each step discards at most
  ``eps * ||W||_F / sqrt(d - 1)`` so the total error is ``<= eps * ||W||_F`` (Oseledets 2011),
- ``energy``: the fraction of squared Frobenius norm kept, i.e. ``eps = sqrt(1 - energy)``,

and ``rank`` combined with ``eps``/``energy`` keeps the smaller of the two.

References
----------
I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2011.
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness", SIAM Review 2011.
L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear singular value decomposition", 2000.
T. G. Kolda, B. W. Bader, "Tensor decompositions and applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import warnings
from typing import Callable, Literal, Sequence

import torch

from .shapes import check_int, check_number, check_tensor

__all__ = [
    "truncated_svd",
    "randomized_svd",
    "thin_svd",
    "gram_svd",
    "tt_svd",
    "hosvd",
    "hooi",
    "mode_product",
    "tucker_to_tensor",
    "stack_tucker2",
    "cp_als",
    "cp_slices",
    "cp_rank_bound",
    "resolve_eps",
    "rank_for_tolerance",
    "check_keep",
    "resolve_keep",
    "parameter_limit",
    "rank_for_keep",
]

SVDMethod = Literal["full", "randomized"]


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(item, dtype) for item in obj)
    return obj


def half_in_float32(function: Callable) -> Callable:
    """Run ``function`` on a float16 / bfloat16 first argument in float32 and give its results back in that dtype,
    with ``torch.autocast`` off.

    LAPACK has no half-precision SVD (``"linalg_svd_cpu" not implemented for 'BFloat16'``), and one in half
    precision would be inaccurate anyway; the decompositions compute in float32, as ``from_dense`` does. An
    enclosing autocast region would run their products in its low precision and mix dtypes (``mode_product``:
    "both inputs should have same dtype"), so it is switched off for the call.
    """
    first = next(iter(inspect.signature(function).parameters))  # "matrix" or "tensor", also passed by keyword

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tensor = args[0] if args else kwargs.get(first)
        if not isinstance(tensor, torch.Tensor):
            return function(*args, **kwargs)
        device = tensor.device.type
        off = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
               else contextlib.nullcontext())  # meta has no autocast: its check_tensor error is the one to see
        with off:
            if tensor.dtype not in (torch.float16, torch.bfloat16):
                return function(*args, **kwargs)
            if args:
                args = (tensor.float(), *args[1:])
            else:
                kwargs[first] = tensor.float()
            return _cast(function(*args, **kwargs), tensor.dtype)
    return wrapper


def resolve_eps(eps: float | None, energy: float | None) -> float | None:
    """Turn ``eps`` (relative error) or ``energy`` (fraction of ``||W||_F^2`` kept) into ``eps``."""
    if eps is not None and energy is not None:
        raise ValueError(f"pass eps={eps} or energy={energy}, not both (energy=e means eps=sqrt(1-e))")
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy={energy} must be in (0, 1]: the fraction of squared norm kept")
        return math.sqrt(max(0.0, 1.0 - energy))
    if eps is not None and not 0.0 <= eps < 1.0:
        raise ValueError(f"eps={eps} must be in [0, 1): a relative Frobenius error target")
    return eps


def check_keep(keep: float, name: str = "keep") -> float:
    """``keep`` (the fraction of parameters kept) if it is in ``(0, 1]``; ValueError otherwise."""
    # real scalars of any kind (numpy's float32, a 0-d tensor) are accepted; bools, strings and arrays are not
    not_real = TypeError(f"{name}={keep!r} must be a real number in (0, 1], the fraction of parameters kept")
    if (isinstance(keep, (bool, str, bytes)) or getattr(keep, "ndim", 0) != 0
            or (isinstance(keep, torch.Tensor) and (keep.is_complex() or keep.dtype == torch.bool))):
        raise not_real
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise not_real from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} must be in (0, 1]: it is the fraction of parameters kept (0.8 keeps 80 %)")
    return value


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside this package, so that a warning
    raised several calls deep (``decompose`` -> ``from_dense`` -> here) names the user's line; Python
    shows a DeprecationWarning only when it is attributed to ``__main__`` (or a test), never to a library."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def resolve_keep(keep: float | None, budget: float | None, where: str) -> float | None:
    """``keep``, or the deprecated ``budget`` (its old name in the core) with a DeprecationWarning."""
    if budget is None:
        return keep
    warnings.warn(
        f"{where}: budget= is renamed keep= (the fraction of parameters kept, as in compress); "
        "budget= will be removed in the next release",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )
    if keep is not None:
        raise ValueError(f"pass keep={keep} only: budget={budget} is its deprecated name")
    return budget


def parameter_limit(keep: float, dense: int) -> int:
    """Parameters ``keep`` allows out of ``dense``: ``floor(keep * dense)``.

    The tiny slack keeps ``0.3 * 48 * 60`` (863.99... in floating point) at 864.
    """
    return math.floor(check_keep(keep) * dense * (1 + 1e-12))


def rank_for_keep(keep: float, dense: int, count: Callable[[int], int], max_rank: int) -> int:
    """Largest rank ``r <= max_rank`` with ``count(r) <= keep * dense``; 0 if not even rank 1 fits.

    The one rank-for-a-kept-fraction rule of the library: every format
    (:meth:`Factorization.rank_for_keep <tensornets.Factorization.rank_for_keep>`), the conv layer
    and ``compress`` call it with their own parameter count. ``count`` (the parameter count of
    uniform rank ``r``) must be non-decreasing in ``r``; the search is a bisection.

    >>> rank_for_keep(0.5, 100 * 100, lambda r: r * (100 + 100), max_rank=100)  # W = U V, 100 x 100
    25
    """
    limit = parameter_limit(keep, dense)
    if count(1) > limit:
        return 0
    lo, hi = 1, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rank_for_tolerance(s: torch.Tensor, tol: float, total_sq: float | None = None) -> int:
    """Smallest ``r >= 1`` whose discarded tail ``sqrt(sum_{j>=r} s_j^2)`` is ``<= tol``.

    ``total_sq`` is ``||M||_F^2`` when ``s`` holds only the leading singular values (randomized
    SVD); the tail is then ``sqrt(total_sq - sum_{j<r} s_j^2)``.
    """
    s2 = s.double() ** 2
    total = float(s2.sum()) if total_sq is None else float(total_sq)
    kept = torch.cumsum(s2, 0)
    tails_sq = (total - kept).clamp_min(0.0)  # tails_sq[r-1] = tail after keeping r values
    ok = torch.nonzero(tails_sq <= tol * tol).flatten()
    return int(ok[0]) + 1 if ok.numel() else int(s.numel())


@half_in_float32
def truncated_svd(
    matrix: torch.Tensor,
    rank: int | None = None,
    eps: float | None = None,
    energy: float | None = None,
    method: SVDMethod = "full",
    seed: int = 0,
    oversample: int = 10,
    n_iter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``M ~= U diag(S) Vh`` of ``M: (m, n)`` with rank control.

    Parameters
    ----------
    matrix : Tensor, shape (m, n)
    rank : int, optional
        Maximum rank, ``1 <= rank <= min(m, n)``.
    eps, energy : float, optional
        Relative error target ``||M - U S Vh||_F <= eps ||M||_F`` (or ``energy`` kept).
    method : {"full", "randomized"}
        ``"randomized"`` (Halko et al., seeded) needs ``rank`` and costs ``O(m n rank)``.
    seed : int
        Seed of the randomized sketch (CPU generator, so results match across devices).
    oversample, n_iter : int
        Randomized method: extra sketch columns beyond ``rank`` and power iterations (Halko et al.'s ``p`` and
        ``q``); more of either costs time and brings the result closer to the exact SVD.

    Returns
    -------
    U : (m, r), S : (r,), Vh : (r, n)

    Raises
    ------
    TypeError, ValueError
        If ``matrix`` is not a finite floating 2-D tensor, ``rank`` is not an int in ``[1, min(m, n)]``, ``method``
        is unknown, or ``seed`` / ``oversample`` / ``n_iter`` are not ints (the latter two ``>= 0``).
    """
    m, n = _check_matrix(matrix)
    full = min(m, n)
    eps = resolve_eps(eps, energy)
    _check_method(method)
    _check_sketch(seed, oversample, n_iter)
    if rank is not None:
        rank = _check_svd_rank(rank, m, n)
    if rank is None and eps is None:
        raise ValueError("pass rank=, eps= or energy= to truncate the SVD")
    if method == "randomized" and rank is None:
        raise ValueError("method='randomized' needs rank= (a cap); eps= then truncates further")
    if method == "randomized" and rank < full:  # at full rank there is nothing to sketch, and the exact SVD is exact
        U, S, Vh = randomized_svd(matrix, rank, seed=seed, oversample=oversample, n_iter=n_iter)
        total_sq = float(matrix.double().pow(2).sum()) if eps is not None else None
    else:
        U, S, Vh = thin_svd(matrix)
        total_sq = None
    r = full if rank is None else rank
    if eps is not None:
        norm = math.sqrt(float(matrix.double().pow(2).sum()))
        r = min(r, rank_for_tolerance(S, eps * norm, total_sq))
    return U[:, :r], S[:r], Vh[:r]


def _check_matrix(matrix: torch.Tensor) -> tuple[int, int]:
    check_tensor(matrix, "matrix", ndim=2)
    return tuple(matrix.shape)


def _check_svd_rank(rank: int, m: int, n: int) -> int:
    """``rank`` if it is an int in ``[1, min(m, n)]``: the one rank check of the SVDs."""
    full = min(m, n)
    rank = check_int(rank, "rank", minimum=None)
    if not 1 <= rank <= full:
        raise ValueError(f"rank={rank} must be in [1, min(m, n)={full}] for a ({m}, {n}) matrix; "
                         f"pass 1 <= rank <= {full}")
    return rank


def _check_method(method: str) -> None:
    if method not in ("full", "randomized"):
        raise ValueError(f"method={method!r} must be 'full' or 'randomized'")


def _check_sketch(seed: int, oversample: int, n_iter: int) -> None:
    check_int(seed, "seed", minimum=None)
    check_int(oversample, "oversample", minimum=0)
    check_int(n_iter, "n_iter", minimum=0)


@half_in_float32
def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``M = U diag(S) Vh``; wide matrices are decomposed through their transpose.

    LAPACK's divide-and-conquer SVD of a short, very wide row-major matrix is several times
    slower than of its contiguous transpose (64 x 262144: benchmarks/results/kernels.md), and
    the first TT-SVD step of a large MPO is exactly such a matrix.
    """
    if matrix.shape[0] < matrix.shape[1]:
        V, S, Uh = torch.linalg.svd(matrix.mT.contiguous(), full_matrices=False)
        return Uh.mT, S, V.mT
    return torch.linalg.svd(matrix, full_matrices=False)


def gram_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets from the float64 Gram matrix of the short side.

    For ``M: (m, n)`` with ``m << n``: ``M M^T = U diag(S^2) U^T`` (``eigh``), ``Vh = S^-1 U^T M``.
    Costs ``O(m^2 n)``; float64 keeps singular values down to ~1e-8 of the largest accurate,
    enough for the leading part a truncation keeps (faster than the transposed SVD at
    64 x 262144: benchmarks/results/kernels.md). Directions with a zero singular value get zero
    rows in ``Vh``.
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    A = (matrix if wide else matrix.mT).to(torch.float64)
    lam, Q = torch.linalg.eigh(A @ A.mT)
    lam, Q = lam.flip(0)[:rank].clamp_min(0), Q.flip(1)[:, :rank]
    S = lam.sqrt()
    inv = torch.where(S > S[0] * 1e-12, 1.0 / S, torch.zeros_like(S)) if S.numel() else S
    W = (Q.mT @ A) * inv[:, None]
    U, S, Vh = (Q, S, W) if wide else (W.mT, S, Q.mT)
    return U.to(matrix.dtype), S.to(matrix.dtype), Vh.to(matrix.dtype)


@half_in_float32
def randomized_svd(
    matrix: torch.Tensor, rank: int, seed: int = 0, oversample: int = 10, n_iter: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded randomized SVD (Halko et al. 2011, with ``n_iter`` QR-stabilized power iterations).

    Returns the leading ``rank`` triplets ``U: (m, rank)``, ``S: (rank,)``, ``Vh: (rank, n)``.
    When the sketch would not be much smaller than the short side (``4 (rank + oversample) >=
    min(m, n)``), :func:`gram_svd` is faster and as accurate for the kept part (singular values
    down to ~1e-8 of the largest; :func:`truncated_svd` at full rank takes the exact SVD instead).

    Refuses (TypeError / ValueError) what :func:`truncated_svd` refuses: a ``matrix`` that is not a finite floating
    2-D tensor, a ``rank`` outside ``[1, min(m, n)]``, a negative ``oversample`` or ``n_iter``.
    """
    m, n = _check_matrix(matrix)
    rank = _check_svd_rank(rank, m, n)
    _check_sketch(seed, oversample, n_iter)
    k = rank + oversample
    if 4 * k >= min(m, n):
        return gram_svd(matrix, rank)
    # torch.svd_lowrank takes no generator; a CPU generator keeps sketches identical on any device.
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=matrix.dtype).to(matrix.device)
    Q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(matrix.mT @ Q).Q
        Q = torch.linalg.qr(matrix @ Q).Q
    Ub, S, Vh = thin_svd(Q.mT @ matrix)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def _rank_list(rank: int | Sequence[int] | None, count: int, what: str) -> list[int | None]:
    """``rank`` (None, one int, or ``count`` entries, None for no cap) as ``count`` caps, each an int >= 1.

    The rank check of TT-SVD and HOSVD / HOOI: a bool, a float (``2.7`` is refused, never truncated) or a rank < 1
    raises.
    """
    if hasattr(rank, "tolist") and getattr(rank, "ndim", 0) == 1:  # a numpy array or 1-D tensor of ranks
        rank = rank.tolist()
    if rank is None or isinstance(rank, str) or not isinstance(rank, Sequence):
        return [None if rank is None else check_int(rank, "rank")] * count
    if len(rank) != count:
        raise ValueError(f"rank={list(rank)} needs {count} entries ({what}), got {len(rank)}")
    return [None if r is None else check_int(r, f"rank[{k}]") for k, r in enumerate(rank)]


@half_in_float32
def tt_svd(
    tensor: torch.Tensor,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
    energy: float | None = None,
    method: SVDMethod = "full",
    seed: int = 0,
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011): cores ``G_k: (R_{k-1}, n_k, R_k)`` with ``R_0 = R_d = 1``.

    Sweeps left to right: reshape the remainder to ``(R_{k-1} n_k, rest)``, truncated SVD, keep
    ``R_k``, carry ``S Vh`` on. With ``eps``, each step discards at most
    ``delta = eps ||T||_F / sqrt(d - 1)``, so ``||T - TT||_F <= eps ||T||_F``. ``rank`` caps each
    bond (an int for all, or a list of ``d - 1``); a cap above a bond's full rank
    ``min(prod(n_<=k), prod(n_>k))`` is lossless there.

    Refuses (TypeError / ValueError) a ``tensor`` that is not a finite floating tensor with at least one axis, a
    rank that is not an int >= 1 (``2.7`` is not truncated), and a ``method`` other than "full" / "randomized".
    """
    check_tensor(tensor, "tensor")
    _check_method(method)
    check_int(seed, "seed", minimum=None)
    shape = tuple(tensor.shape)
    d = len(shape)
    eps = resolve_eps(eps, energy)
    caps = _rank_list(rank, d - 1, "one per internal bond")
    delta = None
    if eps is not None and d > 1:
        delta = eps * math.sqrt(float(tensor.double().pow(2).sum())) / math.sqrt(d - 1)
    cores = []
    rest = tensor.reshape(1, -1)
    r_prev = 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * shape[k], -1)
        full = min(mat.shape)
        cap = full if caps[k] is None else min(caps[k], full)
        U, S, Vh = truncated_svd(
            mat,
            rank=cap,
            eps=None if delta is None else _relative(delta, mat),
            method="randomized" if method == "randomized" and cap < full else "full",
            seed=seed + k,
        )
        r = S.numel()
        cores.append(U.reshape(r_prev, shape[k], r))
        rest = S[:, None] * Vh
        r_prev = r
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    return cores


def _relative(delta: float, mat: torch.Tensor) -> float:
    """Express the absolute tail budget ``delta`` relative to ``||mat||_F`` (truncated_svd's eps)."""
    norm = math.sqrt(float(mat.double().pow(2).sum()))
    if norm == 0.0:
        return 0.0
    return min(delta / norm, 1.0 - 1e-12)


def _unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix`` (Kolda & Bader): axis ``mode`` of ``tensor`` (size ``r``) times ``matrix: (d, r)``.

    ``out[..., i, ...] = sum_j matrix[i, j] tensor[..., j, ...]``; the result has size ``d`` on axis ``mode``
    and the other axes of ``tensor``. Cost ``O(numel(tensor) d)``.
    """
    # tensordot reshapes into one GEMM whatever the operands' strides and requires_grad; `movedim(...) @ matrix.mT`
    # lets matmul pick its folding by requires_grad, so a trained and a reloaded (frozen) copy differed in rounding.
    return torch.movedim(torch.tensordot(tensor, matrix, dims=([mode], [1])), -1, mode)


def tucker_to_tensor(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int] | None = None
) -> torch.Tensor:
    """The full tensor ``core x_{m_1} U_1 x_{m_2} U_2 ...`` of a (partial) Tucker decomposition.

    Parameters
    ----------
    core : Tensor
        ``(R_1, ..., R_N)`` (an undecomposed mode keeps its full size, as :func:`hosvd` returns it).
    factors : sequence of Tensor
        ``U_k: (n_k, R_{m_k})``, one per entry of ``modes``.
    modes : sequence of int, optional
        The modes the factors act on; default ``0, 1, ..., len(factors) - 1``.

    Returns
    -------
    Tensor
        ``core`` with axis ``m_k`` of size ``n_k``; ``tensorly.tucker_to_tensor((core, factors))`` for all modes.
    """
    modes = range(len(factors)) if modes is None else modes
    for mode, factor in zip(modes, factors, strict=True):
        core = mode_product(core, factor, mode)
    return core


def _leading_vectors(unfolding: torch.Tensor, rank: int | None, tol: float | None) -> torch.Tensor:
    U, S, _ = thin_svd(unfolding)
    r = S.numel() if rank is None else min(rank, S.numel())
    if tol is not None:
        r = min(r, rank_for_tolerance(S, tol))
    return U[:, :r]


def _check_modes(modes: Sequence[int] | None, ndim: int) -> list[int]:
    """The decomposed ``modes`` (default all) as distinct ints in ``[0, ndim)``."""
    if modes is None:
        return list(range(ndim))
    modes = [check_int(m, "modes entry", minimum=0) for m in modes]
    if not modes or len(set(modes)) != len(modes) or max(modes) >= ndim:
        raise ValueError(f"modes={modes} must be distinct axes in [0, {ndim}) of the {ndim}-D tensor")
    return modes


@half_in_float32
def hosvd(
    tensor: torch.Tensor,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
    energy: float | None = None,
    modes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated higher-order SVD: ``T ~= core x_1 U_1 x_2 U_2 ...`` over ``modes`` (default all).

    ``U_k: (n_k, R_k)`` are the leading left singular vectors of the mode-k unfolding; the core is
    ``T x_k U_k^T``. With ``eps``, each of the N decomposed modes discards at most
    ``eps ||T||_F / sqrt(N)``, so ``||T - T_hat||_F <= eps ||T||_F``. Passing a subset of
    ``modes`` gives a partial Tucker (e.g. Tucker-2 on the channel modes of a conv kernel).

    Returns
    -------
    core : Tensor, shape ``(R_1, ..., R_N)`` (undecomposed modes keep their size)
    factors : list of Tensor ``(n_k, R_k)``, one per entry of ``modes``

    Raises
    ------
    TypeError, ValueError
        If ``tensor`` is not a finite floating tensor with at least one axis, a rank is not an int >= 1 (a rank
        above a mode's size keeps that mode whole), or ``modes`` are not distinct axes of ``tensor``.
    """
    check_tensor(tensor, "tensor")
    modes = _check_modes(modes, tensor.dim())
    caps = _rank_list(rank, len(modes), "one per decomposed mode")
    eps = resolve_eps(eps, energy)
    tol = None
    if eps is not None:
        tol = eps * math.sqrt(float(tensor.double().pow(2).sum())) / math.sqrt(len(modes))
    factors = [_leading_vectors(_unfold(tensor, m), c, tol) for m, c in zip(modes, caps)]
    core = tensor
    for m, U in zip(modes, factors):
        core = mode_product(core, U.mT, m)
    return core, factors


@half_in_float32
def hooi(
    tensor: torch.Tensor,
    rank: int | Sequence[int],
    modes: Sequence[int] | None = None,
    n_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Higher-order orthogonal iteration, started from :func:`hosvd` at the same ranks.

    Each sweep replaces ``U_k`` by the leading singular vectors of the unfolding of
    ``T x_{j != k} U_j^T``; stops when the core norm (the captured energy) improves by less than
    ``tol`` relative. On real weights it barely beats HOSVD at several times the cost. The factors keep the
    ranks HOSVD starts with, also a rank above the product of the others (whose extra directions then carry no
    energy). Refuses what :func:`hosvd` refuses, a negative ``n_iter`` and a negative or NaN ``tol``.
    """
    check_int(n_iter, "n_iter", minimum=0)
    check_number(tol, "tol", minimum=0.0)
    core, factors = hosvd(tensor, rank=rank, modes=modes)
    modes = _check_modes(modes, tensor.dim())
    ranks = [U.shape[1] for U in factors]
    prev = float(core.double().pow(2).sum())
    for _ in range(n_iter):
        for i, m in enumerate(modes):
            proj = tensor
            for j, (mj, Uj) in enumerate(zip(modes, factors)):
                if j != i:
                    proj = mode_product(proj, Uj.mT, mj)
            U = _leading_vectors(_unfold(proj, m), ranks[i], None)
            if U.shape[1] < ranks[i]:
                # the projected unfolding has fewer columns than the rank asked for (a rank above the product of
                # the others): complete the basis from the previous factor. The added directions hold none of
                # this projection's energy, so the fit is the same and the ranks stay the ones asked for.
                U = torch.linalg.qr(torch.cat([U, factors[i]], dim=1)).Q[:, : ranks[i]]
            factors[i] = U
        core = tensor
        for m, U in zip(modes, factors):
            core = mode_product(core, U.mT, m)
        energy = float(core.double().pow(2).sum())
        if energy - prev <= tol * max(prev, 1e-30):
            break
        prev = energy
    return core, factors


def stack_tucker2(
    matrices: Sequence[torch.Tensor], rank: int | tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial HOSVD over modes 0 and 2 of the stack ``T[:, m, :] = W_m``, without building the stack.

    ``T: (n_out, M, n_in) ~= core x_0 U x_2 V`` with ``U: (n_out, R_1)`` the leading left singular vectors of the
    mode-0 unfolding ``[W_1, ..., W_M]``, ``V: (n_in, R_2)`` those of the mode-2 unfolding
    ``[W_1^T, ..., W_M^T]``, and ``core[:, m, :] = U^T W_m V``: what ``hosvd(T, rank, modes=[0, 2])`` and
    tensorly's ``partial_tucker(T, rank, modes=[0, 2], n_iter_max=0)`` return, up to the sign of each vector.
    The singular vectors come from the two Gram matrices ``sum_m W_m W_m^T`` and ``sum_m W_m^T W_m`` (float64,
    ``eigh``): ``O(n_out^2 + n_in^2)`` memory instead of the stack's ``M n_out n_in``, time
    ``O(M n_out n_in (n_out + n_in))``. Used for the shared factors of a group of layers (LoTR).

    Parameters
    ----------
    matrices : sequence of Tensor
        ``M >= 1`` matrices ``W_m: (n_out, n_in)`` of one shape.
    rank : int or (int, int)
        ``(R_1, R_2)``, or one int for both; each at most its mode's size.

    Returns
    -------
    U : Tensor ``(n_out, R_1)``, orthonormal columns
    core : Tensor ``(R_1, M, R_2)``
    V : Tensor ``(n_in, R_2)``, orthonormal columns

    All in the dtype of ``matrices[0]``.

    Raises
    ------
    TypeError
        If ``matrices`` is a tensor rather than a sequence of them, a matrix is not a floating tensor, or a rank is
        not an int (a bool is not a rank).
    ValueError
        If ``matrices`` is empty, of mixed shapes or has NaN/inf entries, or a rank is outside ``[1, mode size]``.
    """
    if isinstance(matrices, torch.Tensor):
        raise TypeError(f"matrices must be a sequence of (n_out, n_in) tensors, got a tensor of shape "
                        f"{tuple(matrices.shape)}; pass list(matrices) for a stack (M, n_out, n_in)")
    if not matrices:
        raise ValueError("matrices is empty; pass at least one (n_out, n_in) matrix")
    for m, w in enumerate(matrices):
        check_tensor(w, f"matrices[{m}]", ndim=2)
    shape = tuple(matrices[0].shape)
    if any(tuple(w.shape) != shape for w in matrices):
        raise ValueError(f"matrices have shapes {sorted({tuple(w.shape) for w in matrices})}; pass 2-d matrices "
                         "of one shape")
    if hasattr(rank, "tolist") and getattr(rank, "ndim", 0) == 1:  # a numpy array or 1-D tensor of ranks
        rank = rank.tolist()
    pair = isinstance(rank, Sequence) and not isinstance(rank, str)
    if pair and len(rank) != 2:
        raise ValueError(f"rank={rank!r} must be one int or a pair (R_1, R_2)")
    ranks = tuple(check_int(r, "rank", minimum=None) for r in (rank if pair else (rank, rank)))
    for name, r, n in zip(("R_1", "R_2"), ranks, shape, strict=True):
        if not 1 <= r <= n:
            raise ValueError(f"rank={rank!r}: {name}={r} must lie in [1, {n}] for matrices of shape {shape}")
    gram_out = sum(w.double() @ w.double().mT for w in matrices)
    gram_in = sum(w.double().mT @ w.double() for w in matrices)
    # eigh sorts ascending: the leading R are the last R columns, flipped into descending order.
    U = torch.linalg.eigh(gram_out).eigenvectors[:, -ranks[0]:].flip(-1)
    V = torch.linalg.eigh(gram_in).eigenvectors[:, -ranks[1]:].flip(-1)
    core = torch.stack([U.mT @ w.double() @ V for w in matrices], dim=1)
    dtype = matrices[0].dtype
    return U.to(dtype), core.to(dtype), V.to(dtype)


def cp_rank_bound(shape: Sequence[int]) -> int:
    """``prod(shape) / max(shape)``: every tensor of ``shape`` is a sum of this many rank-one terms.

    Unfold along the largest mode: each column of the unfolding times the one-hot tensor of its
    multi-index over the other modes is one term (:func:`cp_slices`). The true maximal CP rank is
    often lower (3, not 4, for 2 x 2 x 2) but is unknown in general; this bound is constructive.
    """
    return math.prod(shape) // max(shape)


def cp_slices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The exact CP of ``tensor`` at rank :func:`cp_rank_bound`: factors ``(n_k, P)``, ``P = prod / max``.

    ``T = sum_p F_1[:, p] o ... o F_N[:, p]`` where the largest mode's factor holds the columns of
    the unfolding along that mode and every other factor is one-hot (``F_k[j, p] = 1`` iff the
    multi-index of column ``p`` has ``j`` in mode ``k``).
    """
    shape = tuple(tensor.shape)
    big = shape.index(max(shape))
    others = [k for k in range(len(shape)) if k != big]
    columns = torch.arange(cp_rank_bound(shape), device=tensor.device)
    factors: list[torch.Tensor] = [None] * len(shape)  # type: ignore[list-item]
    factors[big] = _unfold(tensor, big)
    stride = 1
    for k in reversed(others):  # row-major multi-index of the unfolding's columns
        index = (columns // stride) % shape[k]
        factors[k] = torch.nn.functional.one_hot(index, shape[k]).T.to(tensor.dtype)
        stride *= shape[k]
    return factors


@half_in_float32
def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    init: Literal["svd", "random"] = "svd",
    seed: int = 0,
    n_iter_max: int = 200,
    tol: float = 1e-10,
    stop_below: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CP (CANDECOMP / PARAFAC) by alternating least squares: ``T ~= sum_r w_r a_r^(1) o ... o a_r^(N)``.

    Runs tensorly's ``parafac`` on its PyTorch backend (set for this thread only), so the tensor
    stays on its device and dtype. Deterministic: ``init="svd"`` starts from the leading left
    singular vectors of each unfolding (columns beyond a mode's size are drawn from ``seed``),
    ``init="random"`` draws every factor from ``seed``. ALS stops after ``n_iter_max`` sweeps or
    when the relative error improves by less than ``tol``, or (``stop_below``) once the relative
    error ``||T - T_hat|| / ||T||`` is below that target.

    ALS finds a local optimum: unlike truncated SVD / HOSVD it has no error bound, and the best
    rank-R CP may not even exist (the set of rank-R tensors is not closed). An exact rank-R tensor
    is recovered to ``1e-6`` relative or better from the SVD start given enough sweeps
    (``n_iter_max=2000, tol=1e-14`` in the tests, ranks 1-5 of a 6 x 8 x 6 x 10 tensor).

    Returns
    -------
    weights : Tensor, shape ``(rank,)``
        ``w_r``, the norms of the normalized factor columns.
    factors : list of Tensor ``(n_k, rank)``
        Unit-norm columns.

    Raises
    ------
    TypeError
        If ``tensor`` is not a floating tensor, or ``rank`` / ``seed`` / ``n_iter_max`` is not an int (a rank is
        never a bool and never rounded: tensorly would read ``2.5`` as a fraction of parameters).
    ValueError
        If ``tensor`` is 0-d, empty or has NaN/inf entries, ``rank`` or ``n_iter_max`` is below 1, ``seed`` or
        ``tol`` is negative (or NaN), ``init`` is unknown; and when ALS degenerates (a singular least-squares
        system or non-finite factors): the rank is above the tensor's CP rank, or (``init="svd"``) the SVD start
        spans a zero part of the tensor, as a mode zero-padded with ``pad=True`` does; the message names the fixes
        (a smaller rank, ``eps=`` / ``energy=``, ``init="random"``).
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    check_tensor(tensor, "tensor")
    rank = check_int(rank, "rank")
    if init not in ("svd", "random"):
        raise ValueError(f"init={init!r} must be 'svd' or 'random'")
    check_int(seed, "seed", minimum=0)
    check_int(n_iter_max, "n_iter_max")
    check_number(tol, "tol", minimum=0.0)
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # init="svd" with rank > a mode's size fills the extra columns from the seed, and says so.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        # normalize_factors=True diverges in tensorly 0.10 (NaN or 1e27 on a 48 x 60 matrix at rank 4):
        # fit unnormalized, normalize once at the end.
        reached = None if stop_below is None else (lambda _, error: bool(error <= stop_below))
        # ALS on T / max|T|: its Gram systems then neither overflow nor underflow (a weight scaled by 1e20 or 1e-20
        # gave NaN factors; max|T|, unlike ||T||, cannot overflow itself); the scale goes back into the weights.
        scale = tensor.abs().amax()
        unit = tensor / scale if bool(scale > 0) else tensor
        try:
            _, factors = parafac(unit, rank, init=init, n_iter_max=n_iter_max, tol=tol, random_state=seed,
                                 callback=reached)
        except torch.linalg.LinAlgError as err:
            raise _degenerate_als(f"met a singular least-squares system ({err})", tensor, rank, init) from None
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    weights = torch.stack(norms).prod(0) * (scale if bool(scale > 0) else 1.0)
    factors = [f / torch.where(n > 0, n, torch.ones_like(n)) for f, n in zip(factors, norms)]
    if not all(bool(torch.isfinite(t).all()) for t in (weights, *factors)):
        # ALS at a rank above the tensor's CP rank can diverge without a singular system (a constant 48 x 60 at rank 4)
        raise _degenerate_als("gave non-finite factors", tensor, rank, init)
    return weights, factors


def _degenerate_als(what: str, tensor: torch.Tensor, rank: int, init: str) -> ValueError:
    """The error of a CP-ALS run that broke down; ``formats.cp``'s eps= search reads it as "try a lower rank"."""
    cause = f"CP-ALS at rank={rank} {what}; the tensor of shape {tuple(tensor.shape)} likely has a lower CP rank " \
            "(e.g. a constant or low-rank weight)"
    fix = "pass a smaller rank, or eps= / energy= to pick the smallest rank that fits"
    if init != "svd":
        return ValueError(f"{cause}: {fix}")
    # the SVD start of a mode whose unfolding has rank < R includes directions the tensor is zero along (a mode
    # zero-padded by pad=True): ALS then zeroes those columns; a random start has no such columns
    return ValueError(
        f"{cause}, or the SVD start is degenerate (an unfolding with fewer nonzero singular values than the rank, "
        f"as a zero-padded mode of pad=True has): {fix}, or start from random factors with init='random' "
        "(decompose(W, 'cp', rank=..., init='random') or cp_als(T, rank, init='random'))"
    )
