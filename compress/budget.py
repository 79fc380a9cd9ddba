"""Rank allocation across layers under one global parameter budget.

Layer ``l`` of shape ``(m_l, n_l)`` truncated to rank ``k`` costs ``k (m_l + n_l)`` parameters and leaves the
relative squared output error

.. math::

    e_l(k) = \\frac{\\sum_{i > k} \\sigma_{l,i}^2}{\\sum_i \\sigma_{l,i}^2},

where ``σ_{l,i}`` are the singular values of the *weighted* weight ``W_l S_l`` (whitened for SVD-LLM, so
``e_l`` is exactly the calibration output error). Raising ``k`` by one lowers ``e_l`` by ``σ²_{l,k+1} / Σσ²`` for
``m_l + n_l`` parameters; these gains are non-increasing in ``k``, so taking increments greedily by gain per
parameter (all layers at once) until the budget is spent minimizes ``Σ_l e_l`` among allocations on the same
spent budget, up to the one increment that no longer fits.

Calibration data of ``N`` rows gives a whitened spectrum of at most ``N`` non-zero values: past them a rank costs
parameters and measures no gain. When every measured gain is taken and budget remains, the rest is spread over the
layers evenly by rank fraction ``k_l / cap_l`` (with a warning), so that ``keep`` stays the fraction of parameters
kept.
"""

from __future__ import annotations

import heapq
import numbers
import warnings
from collections.abc import Mapping

import torch


def allocate_ranks(
    sq_spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: int,
    *,
    floors: Mapping[str, int] | None = None,
    caps: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Greedy ranks maximizing the total relative error reduction per parameter.

    Parameters
    ----------
    sq_spectra : Mapping[str, torch.Tensor]
        Layer name -> squared singular values ``σ²`` (non-increasing) of its weighted weight.
    shapes : Mapping[str, tuple[int, int]]
        Layer name -> ``(out, in)``.
    budget : int
        Total parameters of all factorized layers (``Σ_l k_l (m_l + n_l) <= budget``).
    floors : Mapping[str, int], optional
        Minimum rank per layer (default 1).
    caps : Mapping[str, int], optional
        Maximum rank per layer (default ``min(out, in)``, or ``len(σ)`` when longer).

    Returns
    -------
    dict[str, int]
        Layer name -> rank.

    Raises
    ------
    ValueError
        If the floors alone exceed the budget.
    """
    floors = floors or {}
    caps = caps or {}
    _check_allocation(sq_spectra, shapes, budget, floors, caps)
    ranks = {n: max(1, floors.get(n, 1)) for n in sq_spectra}
    cost = {n: sum(shapes[n]) for n in sq_spectra}
    spent = sum(ranks[n] * cost[n] for n in ranks)
    if spent > budget:
        raise ValueError(
            f"the per-layer rank floors need {spent} parameters but the budget is {budget}; "
            "lower min_rank / min_keep or raise keep"
        )
    limit = {n: caps.get(n, max(len(sq), min(shapes[n]))) for n, sq in sq_spectra.items()}
    names, gains, costs = [], [], []
    for n, sq in sq_spectra.items():
        sq = sq.double().cpu()
        total = float(sq.sum())
        cap = min(limit[n], sq.numel())
        if total <= 0 or cap <= ranks[n]:
            continue
        inc = sq[ranks[n]:cap] / (total * cost[n])
        inc = inc[inc > 0]  # no measured gain: left to the even fill below
        names += [n] * inc.numel()
        gains.append(inc)
        costs += [cost[n]] * inc.numel()
    order = torch.argsort(torch.cat(gains), descending=True, stable=True).tolist() if gains else []
    for i in order:
        if spent + costs[i] > budget:
            return ranks
        ranks[names[i]] += 1
        spent += costs[i]
    return _fill_evenly(ranks, limit, cost, budget, spent)


def _check_allocation(sq_spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int,
                      floors: Mapping[str, int], caps: Mapping[str, int]) -> None:
    """Refuse what the greedy loop would silently misread: a non-int or negative budget, floors / caps of layers
    not in ``sq_spectra`` or not ints >= 1, a floor above its cap, a missing shape, a spectrum with NaN, inf or
    negative values."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise ValueError(f"budget={budget!r} must be an int >= 0 (a number of parameters)")
    missing = sorted(n for n in sq_spectra if n not in shapes)
    if missing:
        raise ValueError(f"shapes has no (out, in) for layers {missing[:5]}; pass one per layer of sq_spectra")
    for what, table in (("floors", floors), ("caps", caps)):
        unknown = sorted(n for n in table if n not in sq_spectra)
        if unknown:
            raise ValueError(f"{what} names layers {unknown[:5]} that sq_spectra does not have")
        bad = sorted(f"{n}={r!r}" for n, r in table.items()
                     if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1)
        if bad:
            raise ValueError(f"{what} must be ints >= 1, got {bad[:5]}")
    full = {n: max(len(sq), min(shapes[n])) for n, sq in sq_spectra.items()}
    above = sorted(f"{n}: {r} > {full[n]}" for table in (floors, caps) for n, r in table.items() if r > full[n])
    if above:
        raise ValueError(f"floors / caps above a layer's full rank ({above[:5]}); lower them")
    crossed = sorted(f"{n}: floor {floors[n]} > cap {caps[n]}" for n in floors if n in caps and floors[n] > caps[n])
    if crossed:
        raise ValueError(f"floors exceed caps ({crossed[:5]}); lower the floors or raise the caps")
    bad_spectra = sorted(n for n, sq in sq_spectra.items() if not bool(torch.isfinite(sq).all()) or bool((sq < 0).any()))
    if bad_spectra:
        raise ValueError(f"the squared spectra of {bad_spectra[:5]} hold NaN, inf or negative values; recollect the "
                         "statistics")


def _fill_evenly(ranks: dict[str, int], limit: Mapping[str, int], cost: Mapping[str, int], budget: int,
                 spent: int) -> dict[str, int]:
    """Spend what the measured gains left of ``budget`` by raising the layer of lowest rank fraction first."""
    heap = [(ranks[n] / limit[n], n) for n in ranks if ranks[n] < limit[n] and spent + cost[n] <= budget]
    if not heap:
        return ranks
    before = spent
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if spent + cost[n] > budget:
            continue  # a cheaper layer may still fit
        ranks[n] += 1
        spent += cost[n]
        if ranks[n] < limit[n]:
            heapq.heappush(heap, (ranks[n] / limit[n], n))
    warnings.warn(f"the calibration statistics measure no error reduction for {spent - before} of the {budget} "
                  "budgeted parameters (each weighted spectrum has no more non-zero values than the calibration "
                  "data has rows); they were spread over the layers evenly by rank fraction. More calibration "
                  "tokens let the global allocation place them", UserWarning, stacklevel=3)
    return ranks
