"""`tensornets demo` on the real MiniLM weight: every format runs within its budget (the CLI test only checks the
routing)."""

from __future__ import annotations

import pytest
import torch

import tensornets
from tensornets.demo import format_table, run


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    return run(keeps=(0.25,), batches=(1,), reps=1)


def test_every_format_decomposes_the_real_weight_within_its_budget(rows):
    assert [r["format"] for r in rows] == tensornets.available_formats()
    for r in rows:
        assert r["kept"] <= 0.25 and 0 < r["rel_error"] < 1, r
        assert r["ms_B1"] > 0


def test_plain_svd_is_the_most_accurate_per_parameter_as_printed(rows):
    # the demo's closing line; trained weights are not low-rank-plus-structure tensors
    error = {r["format"]: r["rel_error"] for r in rows}
    assert error["lowrank"] == min(error.values())
    assert "lowrank" in format_table(rows, batches=(1,))


def test_budgets_flag_is_a_deprecated_alias_of_keep(monkeypatch, capsys):
    import tensornets.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda keeps, reps: seen.append(keeps) or [])
    monkeypatch.setattr(demo, "format_table", lambda rows: "")
    demo.main(["--keep", "0.3", "--reps", "1"])
    with pytest.warns(FutureWarning, match="--budgets is deprecated"):  # shown by default on the command line
        demo.main(["--budgets", "0.4", "--reps", "1"])
    assert seen == [(0.3,), (0.4,)]
