"""Factorize sizes into tensor modes, and validate user-facing shape arguments.

Every format tensorizes a size ``n`` (``in_features`` or ``out_features``) into modes
``(n_1, ..., n_k)`` with ``prod(n_i) == n``. :func:`factorize` chooses the most balanced such
split; a size with too few prime factors cannot be split and raises, unless padding is asked
for (:func:`padded_size`).
"""

from __future__ import annotations

import math
import numbers
import operator
from functools import lru_cache
from typing import Sequence

import torch

__all__ = [
    "factorize",
    "padded_size",
    "prime_factors",
    "validate_modes",
    "check_weight",
    "check_tensor",
    "check_int",
    "check_number",
]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` with multiplicity, ascending (``12 -> [2, 2, 3]``)."""
    check_int(n, "n")
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


@lru_cache(maxsize=4096)
def _best_split(n: int, k: int, max_factor: int) -> tuple[int, ...] | None:
    """Most balanced ascending k-tuple of divisors > 1 multiplying to n, each <= max_factor.

    Balanced = lexicographically smallest when sorted descending (smallest largest mode first,
    then the next largest, ...). Exhaustive over divisors: sizes here are at most ~1e6.
    """
    if k == 1:
        return (n,) if 1 < n <= max_factor else None
    best: tuple[int, ...] | None = None
    d = 2
    # The largest mode of a balanced split is at least ceil(n ** (1/k)); search it from there up.
    lower = max(2, math.ceil(round(n ** (1.0 / k), 9)))
    for d in range(lower, min(n, max_factor) + 1):
        if n % d:
            continue
        rest = _best_split(n // d, k - 1, d)
        if rest is not None:
            cand = rest + (d,)
            if best is None or cand[::-1] < best[::-1]:
                best = cand
            # The first feasible largest mode d is the smallest possible: later ones are worse.
            break
    return best


def factorize(n: int, num_modes: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_modes`` factors (each > 1), as balanced as possible, ascending.

    Parameters
    ----------
    n : int
        The size to split, e.g. ``in_features``.
    num_modes : int
        How many modes (factors) to produce.

    Returns
    -------
    tuple of int
        ``(n_1, ..., n_k)``, ascending, ``prod == n``. Balanced means the largest mode is as small
        as possible, then the second largest, and so on.

    Raises
    ------
    ValueError
        If ``n`` has fewer than ``num_modes`` prime factors (a prime cannot be split).

    Examples
    --------
    >>> factorize(768, 3)
    (8, 8, 12)
    >>> factorize(11008, 4)
    (4, 8, 8, 43)
    """
    check_int(n, "n")
    check_int(num_modes, "num_modes")
    if num_modes == 1:
        return (n,)
    primes = prime_factors(n)
    if len(primes) < num_modes:
        raise ValueError(
            f"cannot factorize n={n} (prime factors {primes}) into num_modes={num_modes} modes > 1; "
            f"pass num_modes<={max(len(primes), 1)}, explicit modes, or pad the size with "
            f"tensornets.padded_size({n}, {num_modes}) (formats accept pad=True)"
        )
    split = _best_split(n, num_modes, n)
    assert split is not None  # len(primes) >= num_modes guarantees a split exists
    return split


def padded_size(n: int, num_modes: int, max_ratio: float = 2.0) -> int:
    """Smallest ``m >= n`` whose balanced split into ``num_modes`` modes is well balanced.

    Well balanced: the largest mode is at most ``max_ratio * max(2, ceil(n ** (1 / num_modes)))`` (a mode is at
    least 2). Used when ``n`` itself is prime or very unbalanced (``padded_size(769, 2) == 770``); the formats
    then zero-pad the weight to ``m`` and slice it back (``pad=True``).

    Raises
    ------
    TypeError
        If ``n`` or ``num_modes`` is not an int, or ``max_ratio`` is not a real number.
    ValueError
        If ``n`` or ``num_modes`` is below 1, or ``max_ratio`` is below 1 or NaN (no size would ever qualify).
    """
    check_int(n, "n")
    check_int(num_modes, "num_modes")
    check_number(max_ratio, "max_ratio", minimum=1.0)
    if num_modes == 1:
        return n
    # m = c ** num_modes (c = that rounded-up root) splits into modes c <= bound: the search ends by then
    bound = max_ratio * max(2, math.ceil(n ** (1.0 / num_modes)))
    m = n
    while True:
        if len(prime_factors(m)) >= num_modes and max(factorize(m, num_modes)) <= bound:
            return m
        m += 1


def validate_modes(modes: Sequence[int], size: int, name: str) -> tuple[int, ...]:
    """Check explicit ``modes`` multiply to at least ``size``; return them as a tuple of ints.

    A product larger than ``size`` means zero padding; smaller is an error.
    """
    try:
        modes = tuple(operator.index(m) for m in modes)  # never int(4.9) -> 4: a mode is not rounded
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {modes!r}") from exc
    if not modes or any(m < 1 for m in modes):
        raise ValueError(f"{name}={modes} must be a non-empty sequence of positive ints")
    if math.prod(modes) < size:
        raise ValueError(
            f"{name}={modes} multiply to {math.prod(modes)} < {size}; pass modes whose product is "
            f"{size} (e.g. tensornets.factorize({size}, {len(modes)}))"
        )
    return modes


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise if ``weight`` is not a finite floating 2-D tensor ``(out, in)``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (out, in), got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}; reshape conv kernels to "
            f"(out, in * kh * kw) or use FactorizedConv2d"
        )
    check_tensor(weight, name)


def check_tensor(tensor: torch.Tensor, name: str, ndim: int | None = None) -> None:
    """Raise unless ``tensor`` is a finite, non-empty, floating ``torch.Tensor`` with ``ndim`` axes (any >= 1 if None).

    The input check of the decompositions: a numpy array, an integer tensor (whose SVD LAPACK refuses, and whose
    Gram-matrix factors would be cast back to zeros), a 0-d tensor, a meta tensor or a NaN/inf entry would
    otherwise fail deep inside (LinAlgError, IndexError) or return garbage. ``name`` is the caller's argument.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}; convert it with "
                        f"torch.as_tensor({name})")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dim() == 0:
        raise ValueError(f"{name} is 0-d (a scalar); pass a tensor with one axis per mode")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32/float64/bf16/fp16), got {tensor.dtype}; convert "
                        f"it with {name}.float()")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (no values to decompose); load or materialize the weights "
                         "first (e.g. model.to_empty(...) then load_state_dict, or from_pretrained without init_empty_weights)")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf entries; clean it before decomposing it")


def check_int(value: int, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int if it is an integer (a Python or numpy int) ``>= minimum`` (no bound if None).

    A bool, a float (``2.5`` is never rounded or truncated) or a string raises TypeError; a smaller value ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be an int >= {minimum}")
    return int(value)


def check_number(value: float, name: str, minimum: float) -> float:
    """``value`` as a float if it is a real number (not a bool or string) ``>= minimum``; NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number, got {type(value).__name__}")
    if not value >= minimum:
        raise ValueError(f"{name}={value} must be a number >= {minimum:g}")
    return float(value)
