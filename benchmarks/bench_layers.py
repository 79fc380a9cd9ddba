"""How fast are tensornets' factorized linear layers, against dense ``nn.Linear`` and tltorch?

Question answered
-----------------
For square layers of 1024x1024 and 4096x4096, ranks 8 / 16 / 32 and batches B = 1 / 32 / 512, how
long does a forward (inference, ``torch.no_grad``) and a forward + backward (gradients of the input
and of every parameter) take for

- dense ``nn.Linear``,
- our ``FactorizedLinear`` in the formats MPO (4 cores, modes ``(8, 8, 8, 8)`` at 4096 and
  ``(4, 4, 8, 8)`` at 1024), BTT (2 cores, ``(64, 64)`` / ``(32, 32)``), low rank and Tucker
  (one mode per side: ``W = U C V^T``, ranks ``(r, r)``),
- tltorch's ``FactorizedLinear`` with the same structure: ``factorization="blocktt"`` (tltorch's
  name for the MPO / TT-matrix) and ``"tucker"``, both in ``implementation="factorized"`` (contract
  the input with the factors through ``tl.einsum``, i.e. ``torch.einsum``, which searches a path on
  every call) and ``implementation="reconstructed"`` (rebuild W, then ``F.linear``).

For the MPO at B = 512 the three strategies the layer can pick (rebuild W + one GEMM, the planned
einsum over x and every core, or the split into two GEMMs around a middle bond) are also timed on
their own, to check that the automatic choice is never more than 1.1x the best one. A BTT of rank 1 is timed against dense at B = 512 as well.

Method: ``torch.set_num_threads(2)``; every contender is warmed up first, then timed in
*interleaved* rounds (one measurement of each contender per round, round-robin with a rotating
start so no contender always runs first); each measurement loops the call enough times to last
about 2 ms; the reported time is the median over rounds. Outputs of every contender are checked
against its own dense weight before timing.

Run
---
    python benchmarks/bench_layers.py            # full run (< 10 min on 2 cores)
    python benchmarks/bench_layers.py --quick    # 4096 only, rank 16, fewer rounds (~1-2 min)

Writes ``benchmarks/results/layers.md`` (tables, machine info, goals) and
``benchmarks/results/layers.json`` (raw medians and every sample); ``--quick`` writes
``layers_quick.md`` / ``layers_quick.json`` instead so it never overwrites a full run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import tensornets
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tensornets

import tltorch
from tensornets.formats.base import traffic_weight

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SAMPLE_S = 2e-3  # one measurement loops the call until it lasts about this long
OUR_FORMATS = ("mpo", "btt", "lowrank", "tucker")
STRATEGIES = ("rebuild+gemm", "einsum", "split")  # the MPO's ways to run a forward
TL_NAME = {"mpo": "blocktt", "tucker": "tucker"}  # tltorch's factorization for our format


# ---------------------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "tltorch": getattr(tltorch, "__version__", "?"),
        "tensorly": __import__("tensorly").__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------- timing
def _calibrate(fn: Callable[[], object]) -> int:
    """Warm up ``fn`` and return how many calls make one ~TARGET_SAMPLE_S measurement."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, min(1000, math.ceil(TARGET_SAMPLE_S / max(once, 1e-7))))


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Median seconds per call of each ``fns`` entry, measured round-robin (one sample each per round)."""
    names = list(fns)
    inner = {k: _calibrate(fns[k]) for k in names}
    samples: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(rounds):
        shift = rep % len(names)
        for k in names[shift:] + names[:shift]:
            fn, n = fns[k], inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v, "inner": inner[k]} for k, v in samples.items()}


def forward_fn(module: nn.Module | Callable, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)

    return run


def train_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Forward + backward: gradients of the input and every parameter (autograd.grad, no accumulation)."""
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    gy = torch.randn_like(module(x.detach()).detach())

    def run():
        y = module(xg)
        return torch.autograd.grad(y, [xg, *params], gy)

    return run


# ---------------------------------------------------------------------------------------- contenders
def our_layer(n: int, fmt: str, rank: int) -> tensornets.FactorizedLinear:
    kw = {"num_cores": 4} if fmt == "mpo" else {}
    g = torch.Generator().manual_seed(0)
    return tensornets.FactorizedLinear.create(n, n, fmt, rank=rank, generator=g, **kw)


def tl_layer(ours: tensornets.FactorizedLinear, implementation: str) -> tltorch.FactorizedLinear:
    """tltorch's layer with exactly our modes and ranks."""
    f = ours.factorization
    if f.format_name == "mpo":
        rank = [1, *f.ranks, 1]
        shape_in, shape_out = tuple(f.in_modes), tuple(f.out_modes)
    else:  # tucker, one mode per side
        rank = tuple(f.ranks)
        shape_in, shape_out = (f.in_features,), (f.out_features,)
    torch.manual_seed(0)
    return tltorch.FactorizedLinear(
        shape_in, shape_out, bias=True, factorization=TL_NAME[f.format_name], rank=rank, implementation=implementation
    )


def check_outputs(contenders: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Relative error of each contender's forward against ``x W^T + b`` with its own dense W."""
    errs = {}
    with torch.no_grad():
        for name, m in contenders.items():
            if isinstance(m, nn.Linear):
                continue
            if isinstance(m, tltorch.FactorizedLinear):
                W, b = m.weight.to_matrix().reshape(m.out_features, m.in_features), m.bias
            else:
                W, b = m.factorization.to_dense(), m.bias
            ref = F.linear(x, W, b)
            err = float((m(x) - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err < 1e-3:
                raise AssertionError(f"{name}: forward differs from its dense weight (rel. error {err:.2e})")
            errs[name] = err
    return errs


# ---------------------------------------------------------------------------------------- benchmark
def bench_group(n: int, rank: int, batches: list[int], rounds: dict[int, int], formats: tuple[str, ...], with_tl: bool):
    """Time dense, our formats and (optionally) tltorch at one size and rank, for each batch size."""
    torch.manual_seed(0)
    dense = nn.Linear(n, n)
    ours = {fmt: our_layer(n, fmt, rank) for fmt in formats}
    contenders: dict[str, nn.Module] = {"dense": dense}
    contenders.update({f"ours:{fmt}": m for fmt, m in ours.items()})
    if with_tl:
        for fmt in formats:
            if fmt in TL_NAME:
                for impl in ("factorized", "reconstructed"):
                    contenders[f"tl:{fmt}:{impl}"] = tl_layer(ours[fmt], impl)
    errs = check_outputs(contenders, torch.randn(4, n))
    rows = []
    for B in batches:
        x = torch.randn(B, n)
        for mode, make in (("forward", forward_fn), ("forward+backward", train_fn)):
            t = time.perf_counter()
            res = interleaved({k: make(m, x) for k, m in contenders.items()}, rounds[B])
            print(f"  n={n} r={rank} B={B} {mode}: {time.perf_counter() - t:.1f}s (loadavg {os.getloadavg()[0]:.1f})", flush=True)
            for fmt, m in ours.items():
                f = m.factorization
                row = {
                    "n": n, "rank": rank, "B": B, "mode": mode, "format": fmt,
                    "modes": [list(f.out_modes), list(f.in_modes)], "ranks": list(f.ranks),
                    "params": f.num_parameters, "dense_params": n * n, "flops": f.flops(B),
                    "strategy": f.strategy(B), "loadavg_1min": os.getloadavg()[0],
                }
                for stat in ("median", "min"):
                    sfx = "" if stat == "median" else "_min"
                    row[f"ours_ms{sfx}"] = res[f"ours:{fmt}"][f"{stat}_s"] * 1e3
                    row[f"dense_ms{sfx}"] = res["dense"][f"{stat}_s"] * 1e3
                    for impl in ("factorized", "reconstructed"):
                        key = f"tl:{fmt}:{impl}"
                        row[f"tl_{impl}_ms{sfx}"] = res[key][f"{stat}_s"] * 1e3 if key in res else None
                row["samples_ms"] = {k: [s * 1e3 for s in v["samples_s"]] for k, v in res.items()
                                     if k in ("dense", f"ours:{fmt}", f"tl:{fmt}:factorized", f"tl:{fmt}:reconstructed")}
                rows.append(row)
    return rows, errs


def bench_mpo_strategies(n: int, rank: int, B: int, rounds: int) -> list[dict]:
    """MPO at batch B: automatic choice vs each strategy forced (rebuild + GEMM, einsum plan, split)."""
    layer = our_layer(n, "mpo", rank)
    f = layer.factorization
    x = torch.randn(B, n)
    bucket = tensornets.batch_bucket(B)
    einsum_plan = tensornets.plan_contraction(f._equations()[0], [(bucket, *f.in_modes), *f._core_shapes()])
    splits = [f._split_plan(m, bucket) for m in range(1, len(f.out_modes))]
    weight = traffic_weight("cpu")
    split_plan = min(splits, key=lambda p: p.flops + weight * p.traffic)
    W = torch.randn(n, n)
    # Forced strategies go through the layer's own private pieces (no public switch exists).
    variants = {
        "auto": f,
        "rebuild+gemm": lambda inp: F.linear(inp, f._dense()),
        "einsum": lambda inp: f._contract(inp, einsum_plan),
        "split": lambda inp: f._contract(inp, split_plan),
        "rebuild only": lambda inp: f._dense(),
        "gemm only (dense W)": lambda inp: F.linear(inp, W),
    }
    costs = {"rebuild+gemm": f._strategy_costs(bucket)["rebuild"], "einsum": (einsum_plan.flops, einsum_plan.traffic),
             "split": (split_plan.flops, split_plan.traffic)}
    out = []
    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            fns = {k: forward_fn(v, x) for k, v in variants.items()}
        else:
            fns = {}
            for k, v in variants.items():
                if k in ("rebuild only", "gemm only (dense W)"):
                    continue
                fns[k] = train_fn(_Wrap(v, f), x)
        t = time.perf_counter()
        res = interleaved(fns, rounds)
        print(f"  MPO strategies n={n} r={rank} B={B} {mode}: {time.perf_counter() - t:.1f}s", flush=True)
        row = {"n": n, "rank": rank, "B": B, "mode": mode, "auto_picks": f.strategy(B), "split_at": split_plan.split,
               "cost_model": {k: c[0] + weight * c[1] for k, c in costs.items()}, "einsum_path": list(einsum_plan.path)}
        row.update({f"{k}_ms": v["median_s"] * 1e3 for k, v in res.items()})
        row.update({f"{k}_ms_min": v["min_s"] * 1e3 for k, v in res.items()})
        for sfx in ("", "_min"):
            row[f"auto_over_best{sfx}"] = row[f"auto_ms{sfx}"] / min(row[f"{k}_ms{sfx}"] for k in STRATEGIES)
            # the goal names the two strategies the layer had then: rebuild + GEMM and the planned einsum
            row[f"auto_over_best2{sfx}"] = row[f"auto_ms{sfx}"] / min(row[f"{k}_ms{sfx}"] for k in STRATEGIES[:2])
        out.append(row)
    return out


class _Wrap(nn.Module):
    """Give a plain callable the factorization's parameters so train_fn differentiates them."""

    def __init__(self, fn, fact):
        super().__init__()
        self.fn, self.fact = fn, fact

    def forward(self, x):
        return self.fn(x)


# ---------------------------------------------------------------------------------------- report
def _fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _pair(r: dict, key: str, ratio_to: str | None = None) -> str:
    """``median · min`` of a time (or of a ratio of two times) in one table cell."""
    if ratio_to is None:
        return f"{_fmt_ms(r[key])} · {_fmt_ms(r[key + '_min'])}" if r[key] is not None else "—"
    if r[key] is None or r[ratio_to] is None:
        return "—"
    return f"{_ratio(r[key], r[ratio_to])} · {_ratio(r[key + '_min'], r[ratio_to + '_min'])}"


def layer_table(rows: list[dict], mode: str) -> list[str]:
    head = ("| n | format | rank | B | params (% dense) | strategy | ours ms | dense ms | **ours/dense** | "
            "tltorch factorized ms | **ours/tltorch** | tltorch reconstructed ms |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted((r for r in rows if r["mode"] == mode), key=lambda r: (r["n"], OUR_FORMATS.index(r["format"]), r["rank"], r["B"])):
        lines.append(
            f"| {r['n']} | {r['format']} | {r['rank']} | {r['B']} | {r['params']} ({100 * r['params'] / r['dense_params']:.2f} %) | "
            f"{r['strategy']} | {_pair(r, 'ours_ms')} | {_pair(r, 'dense_ms')} | {_pair(r, 'ours_ms', 'dense_ms')} | "
            f"{_pair(r, 'tl_factorized_ms')} | {_pair(r, 'ours_ms', 'tl_factorized_ms')} | {_pair(r, 'tl_reconstructed_ms')} |"
        )
    return lines


def strategy_table(rows: list[dict]) -> list[str]:
    lines = ["| n | rank | B | mode | auto picks | auto ms | rebuild+GEMM ms | einsum ms | split ms | **auto/best** | "
             "rebuild only ms | GEMM only ms | modelled cost rebuild : einsum : split |", "|" + "---|" * 13]
    for r in rows:
        opt = lambda k: _pair(r, k) if k in r else "—"
        model = " : ".join(f"{r['cost_model'][k] / r['cost_model']['rebuild+gemm']:.2f}" for k in STRATEGIES)
        lines.append(
            f"| {r['n']} | {r['rank']} | {r['B']} | {r['mode']} | {r['auto_picks']} | "
            f"{opt('auto_ms')} | {opt('rebuild+gemm_ms')} | {opt('einsum_ms')} | {opt('split_ms')} | "
            f"{r['auto_over_best']:.2f} · {r['auto_over_best_min']:.2f} | "
            f"{opt('rebuild only_ms')} | {opt('gemm only (dense W)_ms')} | {model} |"
        )
    return lines


def evaluate_goals(rows: list[dict], strategies: list[dict]) -> list[dict]:
    """Each goal judged on the medians (the headline) and on the per-contender minima (robust to other load)."""
    goals = []

    def find(n, fmt, rank, B, mode="forward"):
        return next((r for r in rows if (r["n"], r["format"], r["rank"], r["B"], r["mode"]) == (n, fmt, rank, B, mode)), None)

    def add(name, need, value_med, value_min, detail, higher_is_better=True):
        ok = (lambda v: v >= need) if higher_is_better else (lambda v: v <= need)
        goals.append({"goal": name, "pass": ok(value_med), "pass_min": ok(value_min),
                      "value": value_med, "value_min": value_min, "detail": detail})

    r = find(4096, "mpo", 16, 1)
    if r:
        for other, need, label in (("dense_ms", 5, "dense"), ("tl_factorized_ms", 2, "tltorch factorized")):
            add(f"MPO 4096² r=16 B=1 forward >= {need}x faster than {label}", need,
                r[other] / r["ours_ms"], r[other + "_min"] / r["ours_ms_min"],
                f"ours {_pair(r, 'ours_ms')} ms vs {_pair(r, other)} ms")
    fw = [s for s in strategies if s["mode"] == "forward"]
    if fw:
        for key, label in (("auto_over_best2", "the better of (rebuild+GEMM, einsum)"), ("auto_over_best", "the best of (rebuild+GEMM, einsum, split)")):
            detail = ", ".join(f"{s['n']}² r={s['rank']}: {s[key]:.2f} · {s[key + '_min']:.2f}" for s in fw)
            add(f"MPO B=512 forward: auto <= 1.1x {label} at every size/rank", 1.1,
                max(s[key] for s in fw), max(s[key + "_min"] for s in fw), detail, higher_is_better=False)
    r = find(4096, "btt", 1, 512)
    if r:
        add("BTT 4096² r=1 B=512 forward >= 5x faster than dense", 5,
            r["dense_ms"] / r["ours_ms"], r["dense_ms_min"] / r["ours_ms_min"],
            f"ours {_pair(r, 'ours_ms')} ms vs dense {_pair(r, 'dense_ms')} ms")
    return goals


def goal_line(g: dict) -> str:
    verdict = "PASS" if g["pass"] else "FAIL"
    robust = "PASS" if g["pass_min"] else "FAIL"
    return f"{verdict} (on minima: {robust}): {g['goal']}: {g['value']:.2f} · {g['value_min']:.2f} — {g['detail']}"


TL_NOTE = (
    "tltorch's `FactorizedLinear.__init__` defaults to `implementation='factorized'` (its `from_linear` defaults to "
    "`'reconstructed'`). The factorized path calls `tl.einsum` = `torch.einsum` with all cores at once "
    "(opt_einsum path search on every call) for BlockTT and Tucker; the reconstructed path rebuilds W "
    "(`to_matrix()`) and runs `F.linear`. Both paths ran and matched their own dense weight on torch "
    "{torch} (tltorch {tl}). The **ours/tltorch** column compares against the factorized path; the reconstructed "
    "time is shown beside it. tltorch's factorized layer is created here with exactly our modes and ranks "
    "(MPO ↔ `factorization='blocktt'`, Tucker ↔ `'tucker'` with one mode per side)."
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096 only, rank 16, B in {1, 512}, fewer rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)
    print(f"{info['cpu_model']} | torch {info['torch']} | threads {args.threads} | loadavg {info['loadavg_start']}")

    if args.quick:
        sizes, ranks, batches = [4096], [16], [1, 512]
        rounds = {1: 7, 32: 7, 512: 3}
        strat_rounds = 3
    else:
        sizes, ranks, batches = [1024, 4096], [8, 16, 32], [1, 32, 512]
        rounds = {1: 15, 32: 9, 512: 5}
        strat_rounds = 5

    rows, errors = [], {}
    for n in sizes:
        for rank in ranks:
            rr, errs = bench_group(n, rank, batches, rounds, OUR_FORMATS, with_tl=True)
            rows += rr
            errors.update({f"{n}/{rank}/{k}": v for k, v in errs.items()})
        # BTT rank 1 (the goal row) against dense.
        rr, _ = bench_group(n, 1, [b for b in batches if b == 512], rounds, ("btt",), with_tl=False)
        rows += rr
    strategies = []
    for n in sizes:
        for rank in ranks:
            strategies += bench_mpo_strategies(n, rank, 512, strat_rounds)

    goals = evaluate_goals(rows, strategies)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - start

    md = ["# Layer speed: tensornets vs dense nn.Linear vs tltorch", "",
          f"Command: `python benchmarks/bench_layers.py{' --quick' if args.quick else ''}`", "",
          "## Machine", "",
          f"- CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs), torch {info['torch']}, "
          f"`torch.set_num_threads({args.threads})`, tltorch {info['tltorch']}, tensorly {info['tensorly']}, Python {info['python']}",
          f"- load average at start {tuple(round(v, 2) for v in info['loadavg_start'])}, at end "
          f"{tuple(round(v, 2) for v in info['loadavg_end'])} (other jobs on the same cores inflate absolute times; "
          "interleaving spreads that load over all contenders of a row alike)",
          f"- {info['date']}, wall time {info['wall_s']:.0f} s", "",
          "Times: ms per call over interleaved rounds ("
          f"{', '.join(f'B={b}: {rounds[b]}' for b in batches)} rounds; each sample loops the call for ~2 ms). "
          "Every cell is `median · min` over the rounds (the minimum is the figure least disturbed by other jobs "
          "on the machine). Ratios < 1 mean ours is faster. fp32, bias on every layer. Forward = `torch.no_grad()`; "
          "forward+backward = gradients of the input and all parameters (`torch.autograd.grad`).", "",
          "## tltorch", "", TL_NOTE.format(torch=torch.__version__, tl=info["tltorch"]), "",
          "## Forward", ""] + layer_table(rows, "forward") + ["", "## Forward + backward", ""] + layer_table(rows, "forward+backward")
    md += ["", "## MPO at B=512: automatic choice vs each strategy forced", "",
           "`rebuild+GEMM` = `F.linear(x, f._dense())`; `einsum` = the cached opt_einsum plan over x and every core for "
           "the batch bucket; `split` = the cheapest split into two GEMMs around a bond; `rebuild only` = `f._dense()` "
           "alone; `GEMM only` = `F.linear` with a ready dense W (what a cached/merged W costs). The last column is the "
           "cost model the automatic choice is based on (FLOPs + 384 x elements moved), relative to rebuild+GEMM.", ""]
    md += strategy_table(strategies)
    md += ["", "## Goals", "", "Value = speed-up (or auto/best) on medians · on minima; the verdict uses the medians.", ""]
    md += [f"- **{goal_line(g)}**" for g in goals]

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "layers_quick" if args.quick else "layers"
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": info, "rounds": rounds, "layers": rows, "mpo_strategies": strategies,
         "output_rel_errors": errors,
         "goals": goals}, indent=1))

    print()
    print("\n".join(md[md.index("## Forward"):]))
    print()
    for g in goals:
        print(goal_line(g))
    print(f"\nwrote {args.out / (stem + '.md')} and .json ({info['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
