"""Global rank allocation: greedy by error reduction per parameter."""

import itertools
import warnings

import pytest
import torch

from compress.budget import allocate_ranks


def rel_error(sq, k):
    return float(sq[k:].sum() / sq.sum())


def test_greedy_matches_exhaustive_search_for_equal_costs():
    torch.manual_seed(0)
    spectra = {f"l{i}": torch.sort(torch.rand(6) ** (i + 1), descending=True).values for i in range(3)}
    shapes = {n: (4, 6) for n in spectra}
    for budget_ranks in range(3, 16):
        budget = budget_ranks * 10
        ranks = allocate_ranks(spectra, shapes, budget)
        assert sum(r * 10 for r in ranks.values()) <= budget
        got = sum(rel_error(spectra[n], ranks[n]) for n in spectra)
        best = min(
            sum(rel_error(spectra[n], k) for n, k in zip(spectra, ks))
            for ks in itertools.product(range(1, 7), repeat=3)
            if sum(ks) * 10 <= budget
        )
        assert got == pytest.approx(best, abs=1e-12)


def test_flat_spectrum_gets_more_rank_than_a_decaying_one():
    flat = torch.ones(32)
    decaying = torch.logspace(0, -6, 32)
    ranks = allocate_ranks({"flat": flat, "decay": decaying}, {"flat": (32, 32), "decay": (32, 32)}, 20 * 64)
    assert ranks["flat"] > ranks["decay"]


def test_cheaper_layer_wins_at_equal_gain():
    sq = torch.ones(16)
    ranks = allocate_ranks({"small": sq, "big": sq}, {"small": (16, 16), "big": (16, 240)}, 16 * 32 + 256)
    assert ranks["small"] == 16 and ranks["big"] == 1


def test_floors_and_caps():
    sq = {"a": torch.logspace(0, -8, 10), "b": torch.ones(10)}
    shapes = {"a": (10, 10), "b": (10, 10)}
    ranks = allocate_ranks(sq, shapes, 100, floors={"a": 3}, caps={"b": 4})
    assert ranks["a"] >= 3 and ranks["b"] <= 4
    with pytest.raises(ValueError, match="floors need 120 parameters but the budget is 100"):
        allocate_ranks(sq, shapes, 100, floors={"a": 3, "b": 3})


@pytest.mark.parametrize("kw,match", [
    # each gave ranks past the layer's size, or was ignored, or read NaN as "no limit"
    (dict(floors={"a": 100}), r"floors / caps above a layer's full rank \(\['a: 100 > 32'\]\)"),
    (dict(caps={"a": 1000}), r"floors / caps above a layer's full rank \(\['a: 1000 > 32'\]\)"),
    (dict(floors={"a": 5}, caps={"a": 3}), r"floors exceed caps \(\['a: floor 5 > cap 3'\]\)"),
    (dict(floors={"nope": 2}), r"floors names layers \['nope'\]"),
    (dict(floors={"a": -1}), r"floors must be ints >= 1, got \['a=-1'\]"),
    (dict(caps={"a": 2.5}), r"caps must be ints >= 1, got \['a=2.5'\]"),
    (dict(budget=float("nan")), "budget=nan must be an int >= 0"),
    (dict(spectra={"a": torch.tensor([1.0, float("nan")])}), r"squared spectra of \['a'\] hold NaN"),
])
def test_bad_allocation_arguments_name_the_problem(kw, match):
    sq = kw.pop("spectra", {"a": torch.logspace(0, -4, 32)})
    with pytest.raises(ValueError, match=match):
        allocate_ranks(sq, {"a": (32, 64)}, kw.pop("budget", 1000), **kw)


def test_budget_without_measured_gains_is_spread_evenly_and_spent():
    """Few calibration rows: the spectra have 3 non-zero values each. keep stays the fraction of parameters kept:
    the measured gains go first, the rest of the budget is spread by rank fraction, with a warning."""
    sq = {"a": torch.tensor([4.0, 2.0, 1.0]), "b": torch.tensor([9.0, 1.0, 0.5]), "c": torch.tensor([1.0, 1.0, 1.0])}
    shapes = {"a": (32, 32), "b": (32, 64), "c": (64, 64)}
    budget = int(0.5 * sum(o * i for o, i in shapes.values()))
    with pytest.warns(UserWarning, match="spread over the layers evenly"):
        ranks = allocate_ranks(sq, shapes, budget)
    spent = sum(ranks[n] * sum(shapes[n]) for n in ranks)
    assert budget - min(sum(s) for s in shapes.values()) < spent <= budget
    assert all(ranks[n] >= 3 for n in ranks)  # every measured gain taken
    fractions = [ranks[n] / min(shapes[n]) for n in ranks]
    assert max(fractions) - min(fractions) < 0.1
    # a budget the measured gains exhaust takes the best of them, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert allocate_ranks(sq, shapes, 288 + 64) == {"a": 2, "b": 1, "c": 1}
