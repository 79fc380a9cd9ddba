"""Why the core computes things the way it does: the kernel-level measurements its comments cite.

Question answered
-----------------
Each design choice in ``tensornets/`` that rests on a timing is measured here, side by side with
the alternative it rejected, so the comments can point at ``results/kernels.md`` instead of
quoting numbers that go stale:

1. ``contraction.py``: ``torch.einsum`` with 3+ operands searches a path on every call; a cached
   :class:`~tensornets.ContractionPlan` runs one C++ einsum with the path given; a Python loop of
   pairwise contractions (``opt_einsum.contract``) runs the same path step by step. Also the
   eager cost of ``torch.ops.aten.einsum`` (the op ``torch.compile`` traces) against ``torch._VF``.
2. ``formats/tt.py``: the TT rebuild as two matmul sweeps against the planned einsum over all cores
   (LoRETTA's ``576 x 8`` factors), forward and forward + backward.
3. ``formats/btt.py``: BTT's two layouts (:class:`~tensornets.formats.btt.BTTPlan`) at ``4096^2``, ``r = 1``, on
   512 and on 4 rows: the batch as rows (regroup made contiguous before the second ``bmm``, and the strided view
   it rejected) against the batch as columns.
4. ``decompositions.py``: the thin SVD of a short, very wide matrix (``64 x 262144``) directly,
   through its transpose, and through the Gram matrix (:func:`~tensornets.decompositions.gram_svd`).

Method: ``torch.set_num_threads(2)``, glibc's mmap threshold pinned (``_report.pin_mmap_threshold``: the 8 MB
temporaries of section 3 would otherwise be fresh mappings, page-faulted on every call, in some allocator states);
each pair is warmed up, then timed in interleaved rounds (median and minimum over rounds; each sample loops the
call for about 2 ms).

Run
---
    python benchmarks/bench_kernels.py            # ~1 min on 2 cores
    python benchmarks/bench_kernels.py --quick    # fewer rounds, no SVD (~10 s)
    python benchmarks/bench_kernels.py --threads 1   # on a busy machine

On a machine busy with other jobs, two OpenMP threads on two cores wait on each other at every
parallel region: section 1 measured 140 ms per call instead of 0.6 ms that way; ``--threads 1``
avoids it (the committed results say which thread count they used).

Writes ``benchmarks/results/kernels.md`` and ``kernels.json`` (``kernels_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import opt_einsum
import torch

try:
    import tensornets
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tensornets

from tensornets.decompositions import gram_svd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_report.py, however the script is run
from _report import (finish, goal, goal_line, goal_section, header, machine_info, malloc_line,  # noqa: E402
                     pin_mmap_threshold, write_results)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fns: dict[str, Callable[[], object]], rounds: int, sample_s: float = 2e-3) -> dict[str, dict[str, float]]:
    """Median and minimum seconds per call of each entry, measured round-robin (rotating start)."""
    names = list(fns)
    loops = {}
    for k in names:
        fns[k]()
        t0 = time.perf_counter()
        fns[k]()
        loops[k] = max(1, min(1000, math.ceil(sample_s / max(time.perf_counter() - t0, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(rounds):
        shift = rep % len(names)
        for k in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                fns[k]()
            samples[k].append((time.perf_counter() - t0) / loops[k])
    return {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in samples.items()}


def einsum_paths(rounds: int) -> dict:
    """MPO 4096^2, modes 8^4, r = 16, B = 1: path search per call vs cached plan vs Python pairwise loop."""
    mpo = tensornets.MPO.empty(4096, 4096, in_modes=(8,) * 4, out_modes=(8,) * 4, ranks=(16,) * 3)
    for core in mpo.parameters():
        torch.nn.init.normal_(core, std=0.1)
    x = torch.randn(1, 8, 8, 8, 8)
    eq = mpo._equations()[0]
    cores = mpo._cores()
    plan = tensornets.plan_contraction(eq, [tuple(x.shape), *mpo._core_shapes()])
    path = [tuple(plan.path[i : i + 2]) for i in range(0, len(plan.path), 2)]
    fns = {
        "torch.einsum (path search each call)": lambda: torch.einsum(eq, x, *cores),
        "ContractionPlan (torch._VF.einsum, path given)": lambda: plan(x, *cores),
        "torch.ops.aten.einsum (path given; what torch.compile traces)": lambda: torch.ops.aten.einsum(eq, [x, *cores], path=list(plan.path)),
        "opt_einsum.contract (Python loop of pairwise steps)": lambda: opt_einsum.contract(eq, x, *cores, optimize=path, backend="torch"),
    }
    with torch.no_grad():
        return timed(fns, rounds)


def tt_rebuild(rounds: int) -> dict:
    """TT of a 576 x 8 matrix (LoRETTA's factors: out modes 8, 8, 9, in mode 8, ranks 5): sweep vs einsum."""
    tt = tensornets.TensorTrain.empty(8, 576, in_modes=(8,), out_modes=(8, 8, 9), ranks=(5, 5, 5))
    for core in tt.parameters():
        torch.nn.init.normal_(core)
    plan = tensornets.plan_contraction(tt._equations()[1], tt._core_shapes())
    einsum = lambda: plan(*tt._cores()).reshape(tt.padded_out, tt.padded_in)
    g = torch.randn(576, 8)
    params = list(tt.parameters())

    def backward(fn):
        return lambda: torch.autograd.grad(fn(), params, g)

    res = {}
    with torch.no_grad():
        res.update({f"forward: {k}": v for k, v in timed({"two sweeps": tt._dense, "planned einsum": einsum}, rounds).items()})
    res.update({f"forward+backward: {k}": v for k, v in
                timed({"two sweeps": backward(tt._dense), "planned einsum": backward(einsum)}, rounds).items()})
    return res


def btt_layouts(rounds: int, batch: int) -> dict:
    """BTT 4096^2, r = 1, whole contraction on ``batch`` rows: rows layout (contiguous regroup, as the core runs it,
    and the strided view it rejected) against the columns layout."""
    m = 64
    btt = tensornets.BTT.empty(m * m, m * m, in_modes=(m, m), out_modes=(m, m), ranks=(1,))
    torch.nn.init.normal_(btt.W1)
    torch.nn.init.normal_(btt.W2)
    rows, columns = btt._contract_candidates(batch)
    x = torch.randn(batch, m * m)

    def strided_view():
        h = torch.bmm(x.reshape(batch, m, m).transpose(0, 1), btt.W1)
        return torch.bmm(h.reshape(m, batch, m, 1).permute(2, 1, 0, 3).reshape(m, batch, m), btt.W2)

    fns = {
        "rows: contiguous regroup": lambda: btt._contract(x, rows),
        "rows: strided view": strided_view,
        "columns": lambda: btt._contract(x, columns),
    }
    with torch.no_grad():
        return timed(fns, rounds)


def wide_svd(rounds: int) -> dict:
    """Thin SVD of a 64 x 262144 matrix (the first TT-SVD unfolding of a 4096^2 MPO with modes 8^4)."""
    M = torch.randn(64, 262144)
    fns = {
        "torch.linalg.svd of the wide matrix": lambda: torch.linalg.svd(M, full_matrices=False),
        "svd of the contiguous transpose": lambda: torch.linalg.svd(M.mT.contiguous(), full_matrices=False),
        "gram_svd (float64 eigh of M M^T), rank 16": lambda: gram_svd(M, 16),
    }
    return timed(fns, rounds, sample_s=0.0)


def _ms(v: float) -> str:
    ms = v * 1e3
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def table(title: str, res: dict[str, dict[str, float]], baseline: str) -> list[str]:
    base = res[baseline]["median_s"]
    lines = [f"### {title}", "", f"| variant | ms (median · min) | time / {baseline} |", "|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {_ms(v['median_s'])} · {_ms(v['min_s'])} | {v['median_s'] / base:.2f} |")
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no SVD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pinned = pin_mmap_threshold()
    start = time.perf_counter()
    info = machine_info(args.threads, opt_einsum=opt_einsum.__version__)
    info["malloc"] = malloc_line(pinned)
    rounds = 5 if args.quick else 15

    results = {"einsum_paths": einsum_paths(rounds), "tt_rebuild": tt_rebuild(rounds),
               "btt_layouts_512": btt_layouts(rounds, 512), "btt_layouts_4": btt_layouts(rounds, 4)}
    if not args.quick:
        results["wide_svd"] = wide_svd(3)
    finish(info, start)

    e, t = results["einsum_paths"], results["tt_rebuild"]
    b, b4 = results["btt_layouts_512"], results["btt_layouts_4"]
    plan_s = e["ContractionPlan (torch._VF.einsum, path given)"]
    goals = [
        goal("cached plan faster than torch.einsum's per-call path search (MPO 4096², B=1)",
             e["torch.einsum (path search each call)"]["median_s"] / plan_s["median_s"],
             e["torch.einsum (path search each call)"]["min_s"] / plan_s["min_s"], 1.0),
        goal("one C++ einsum faster than a Python loop of pairwise steps (MPO 4096², B=1)",
             e["opt_einsum.contract (Python loop of pairwise steps)"]["median_s"] / plan_s["median_s"],
             e["opt_einsum.contract (Python loop of pairwise steps)"]["min_s"] / plan_s["min_s"], 1.0),
        goal("TT rebuild: two sweeps faster than the planned einsum (576 x 8, forward+backward)",
             t["forward+backward: planned einsum"]["median_s"] / t["forward+backward: two sweeps"]["median_s"],
             t["forward+backward: planned einsum"]["min_s"] / t["forward+backward: two sweeps"]["min_s"], 1.0),
        goal("BTT r=1: contiguous regroup faster than the strided view (4096², B=512)",
             b["rows: strided view"]["median_s"] / b["rows: contiguous regroup"]["median_s"],
             b["rows: strided view"]["min_s"] / b["rows: contiguous regroup"]["min_s"], 1.0),
        goal("BTT r=1: columns layout faster than rows (4096², B=512; the formula's choice there)",
             b["rows: contiguous regroup"]["median_s"] / b["columns"]["median_s"],
             b["rows: contiguous regroup"]["min_s"] / b["columns"]["min_s"], 1.0),
        goal("BTT r=1: rows layout faster than columns (4096², B=4; the formula's choice there)",
             b4["columns"]["median_s"] / b4["rows: contiguous regroup"]["median_s"],
             b4["columns"]["min_s"] / b4["rows: contiguous regroup"]["min_s"], 1.0),
    ]
    if "wide_svd" in results:
        w = results["wide_svd"]
        goals.append(goal("64 x 262144 SVD: through the transpose faster than direct",
                          w["torch.linalg.svd of the wide matrix"]["median_s"] / w["svd of the contiguous transpose"]["median_s"],
                          w["torch.linalg.svd of the wide matrix"]["min_s"] / w["svd of the contiguous transpose"]["min_s"], 1.0))

    md = header("Kernel-level choices of the core, measured", f"python benchmarks/bench_kernels.py{' --quick' if args.quick else ''}",
                info, versions=["opt_einsum"])
    md += [f"Interleaved rounds: {rounds} (SVD: 3, one call per sample). Each row is one way to compute the same result; "
           "fp32 unless noted. The last column is the median time over the first row's. "
           f"Allocator: {info['malloc']}.", "", "## Results", ""]
    md += table("1. Einsum over x and every core (tensornets/contraction.py)", e, "ContractionPlan (torch._VF.einsum, path given)")
    md += table("2. TT rebuild of LoRETTA's 576 x 8 factors (tensornets/formats/tt.py)", t, "forward: two sweeps")
    md += table("3. BTT layouts, r = 1, 512 rows (tensornets/formats/btt.py)", b, "rows: contiguous regroup")
    md += table("3b. BTT layouts, r = 1, 4 rows (tensornets/formats/btt.py)", b4, "rows: contiguous regroup")
    if "wide_svd" in results:
        md += table("4. Thin SVD of a 64 x 262144 matrix (tensornets/decompositions.py)", results["wide_svd"], "svd of the contiguous transpose")
    md += goal_section(goals, "Value = speed-up of the core's choice over the rejected one, on medians · on minima.")
    stem = "kernels_quick" if args.quick else "kernels"
    write_results(args.out, stem, md, {"machine": info, "rounds": rounds, "results": results, "goals": goals})
    print("\n".join(md))
    for g in goals:
        print(goal_line(g))


if __name__ == "__main__":
    main()
