"""benchmarks/bench_layers.py's traffic weight fit: which ``w`` in ``flops + w * traffic`` picks the plans that ran fast."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tensorly as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
_backend = tl.get_backend()
import bench_layers  # noqa: E402  (imports tltorch, which sets tensorly's backend to pytorch for the process)

tl.set_backend(_backend)  # tests collected in this process after this file expect tensorly's own default
from bench_layers import bench_strategies, fit_table, traffic_weight_fit  # noqa: E402


def plans(*terms: tuple[str, int, int, float]) -> dict:
    return {"plans": {name: {"flops": f, "traffic": t, "ms": ms} for name, f, t, ms in terms}}


# Each row's lower envelope of flops + w * traffic, worked by hand (ties go to the plan listed first):
TABLE = [
    # einsum (100 + 40 w) for w <= 29, rebuild (1000 + 10 w) from 30 (the tie); both within 1.1x: right at every w
    plans(("rebuild", 1000, 10, 1.0), ("einsum", 100, 40, 1.05)),
    # the same terms, einsum 2x slower: right from w = 30
    plans(("rebuild", 1000, 10, 1.0), ("einsum", 100, 40, 2.0)),
    # x for w <= 20, y for 21..40, z from 41; y is fastest and the only one within 1.1x
    plans(("x", 0, 100, 2.0), ("y", 1000, 50, 1.0), ("z", 3000, 0, 1.5)),
    # the fastest plan q has more FLOPs and more traffic than p: no w picks it
    plans(("p", 10, 1, 2.0), ("q", 20, 2, 1.0)),
]


def test_fit_on_a_hand_worked_table():
    fit = traffic_weight_fit(TABLE, current=64, weights=range(1, 65))
    assert [r["intervals"] for r in fit["per_row"]] == [[[1, 64]], [[30, 64]], [[21, 40]], []]
    # rows right: 1 at w <= 20, 2 at 21..29, 3 at 30..40, 2 from 41 on; sqrt(30 * 40) = 34.6
    assert (fit["rows"], fit["best_count"], fit["best_intervals"], fit["suggested"]) == (4, 3, [[30, 40]], 35)
    assert (fit["current"], fit["current_count"], fit["current_in_best"], fit["never_right"]) == (64, 2, False, 1)
    assert [r["fastest"] for r in fit["per_row"]] == ["rebuild", "rebuild", "y", "q"]
    assert [r["at_current"] for r in fit["per_row"]] == ["rebuild", "rebuild", "z", "p"]
    assert fit["per_row"][2]["current_over_best"] == pytest.approx(1.5)


def test_default_grid_is_every_integer_weight_up_to_4096():
    fit = traffic_weight_fit(TABLE, current=35)
    assert fit["weights"] == [1, 4096] and fit["best_intervals"] == [[30, 40]]
    assert (fit["current_count"], fit["current_in_best"]) == (3, True)
    assert fit["per_row"][1]["intervals"] == [[30, 4096]]


def test_best_weights_in_two_runs_and_the_suggestion_from_the_wider():
    # x for w <= 8, m for 9..12, l from 13: x and l are within 1.1x of the fastest, m is not
    row = plans(("x", 0, 10, 1.0), ("m", 40, 5, 3.0), ("l", 100, 0, 1.05))
    fit = traffic_weight_fit([row], current=10, weights=range(1, 65))
    assert fit["best_intervals"] == [[1, 8], [13, 64]]
    assert fit["suggested"] == 3  # [1, 8] spans 8x, [13, 64] 4.9x: sqrt(1 * 8) rounded
    assert (fit["current_count"], fit["per_row"][0]["at_current"]) == (0, "m")


def test_no_rows_no_fit():
    fit = traffic_weight_fit([], current=384)
    assert (fit["rows"], fit["best_count"], fit["best_intervals"], fit["suggested"], fit["current_count"]) == (0, 0, [], None, 0)


def test_plan_table_rows_carry_the_terms_the_cost_model_used(monkeypatch, tmp_path):
    # one round on a small MPO (no timing is checked): the forced plans' terms price each plan as the row's cost model
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path))  # tune() records its winner: never in the user's wisdom
    monkeypatch.setattr(bench_layers, "TARGET_SAMPLE_S", 1e-5)
    for grad in (False, True):
        row = bench_strategies(256, 4, "mpo", 32, rounds=1, grad=grad)
        assert set(row["forced"]) == {"rebuild", "einsum", "split"}
        for name in row["forced"]:
            terms = row["plan_terms"][name]
            assert row["cost_model"][terms["label"]] == terms["flops"] + 384 * terms["traffic"]
        [entry] = fit_table([row])
        assert entry["row"] == f"256² mpo r=4 B=32 {row['mode']}" and list(entry["plans"]) == row["forced"]
        assert all(entry["plans"][k]["ms"] == row[f"{k}_ms"] for k in row["forced"])
