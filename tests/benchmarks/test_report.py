"""benchmarks/_report.py: goals are judged as stated, results files round-trip."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _report import finish, goal, goal_line, goal_section, header, machine_info, write_results  # noqa: E402


def test_goals_judge_medians_and_minima_separately():
    faster = goal("ours >= 4x faster", value=3.9, value_min=4.2, need=4)
    assert (faster["pass"], faster["pass_min"]) == (False, True)
    ratio = goal("auto <= 1.1x best", value=1.05, value_min=1.2, need=1.1, higher_is_better=False, detail="4096² r=16")
    assert (ratio["pass"], ratio["pass_min"]) == (True, False)
    assert goal_line(ratio) == "PASS (on minima: FAIL): auto <= 1.1x best: 1.05 · 1.20 — 4096² r=16"
    assert goal_section([faster])[-1] == "- **FAIL (on minima: PASS): ours >= 4x faster: 3.90 · 4.20**"


def test_machine_header_and_results_files(tmp_path):
    info = machine_info(threads=2, tensorly="0.10.0")
    finish(info, start=0.0)  # wall time since the clock's origin: only its presence is checked
    md = header("Title", "python benchmarks/bench_x.py", info, versions=["tensorly"])
    assert md[:3] == ["# Title", "", "Command: `python benchmarks/bench_x.py`"]
    machine = next(line for line in md if line.startswith("- CPU:"))
    assert "torch.set_num_threads(2)" in machine and "tensorly 0.10.0" in machine and info["torch"] in machine
    md_path, json_path = write_results(tmp_path / "results", "x", md, {"machine": info, "rows": [1, 2]})
    assert md_path.read_text() == "\n".join(md) + "\n"
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == [1, 2] and payload["machine"]["torch_threads"] == 2 and payload["machine"]["wall_s"] >= 0
