"""benchmarks/bench_layers.py --device: cuda is refused without a GPU; with one, everything runs and is timed there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tensorly as tl
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
_backend = tl.get_backend()
import bench_layers  # noqa: E402  (imports tltorch, which sets tensorly's backend to pytorch for the process)

tl.set_backend(_backend)  # tests collected in this process after this file expect tensorly's own default


def test_device_cuda_without_a_gpu_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine checks the refusal too
    with pytest.raises(SystemExit) as exc:
        bench_layers.main(["--device", "cuda", "--smoke", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--device cuda: this torch" in err and "torch.cuda.is_available() is False" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


def test_the_cuda_clock_waits_for_the_device_and_the_cpu_clock_does_not(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    bench_layers.clock(torch.device("cpu"))()
    assert waited == []
    cuda = torch.device("cuda")
    bench_layers.clock(cuda)()  # built and read without touching CUDA (synchronize is stubbed)
    assert waited == [cuda]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_smoke_run_times_on_the_gpu_and_keeps_cpu_results(tmp_path):
    # every contender and input must be on the GPU: a layer left on the CPU fails its first forward
    out = subprocess.run([sys.executable, str(BENCH / "bench_layers.py"), "--device", "cuda", "--smoke", "--no-compile",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers_cuda_smoke.json", "layers_cuda_smoke.md"]
    payload = json.loads((tmp_path / "layers_cuda_smoke.json").read_text())
    assert payload["machine"]["device"] == "cuda" and payload["machine"]["gpu"] == torch.cuda.get_device_name(0)
    fit = payload["traffic_weight_fit"]["all"]
    assert fit["current"] == bench_layers.traffic_weight("cuda") and fit["rows"] == len(payload["strategies"]) == 16
    md = (tmp_path / "layers_cuda_smoke.md").read_text()
    assert "--device cuda" in md and "## Traffic weight fit (cuda)" in md and torch.cuda.get_device_name(0) in md
