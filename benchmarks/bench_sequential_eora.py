"""Does sequential EoRA beat independent EoRA? SmolLM2, RTN 3-bit g64, EoRA r=64 on every block linear.

Independent EoRA fits each residual to the layer's own error on the dense model's inputs, ``‖(W − W_c − BA) X‖``.
Sequential EoRA fits it to the dense outputs from the compressed-and-compensated model's inputs,
``‖W X − (W_c + BA) X̃‖`` (:func:`compress.sequential_eora_factors`), with an optional whitening ridge
``C̃ + ridge · mean(diag C̃) I``. Both run through the block pipeline (:func:`compress.compress_blocks`) on the CLI's
data (16 x 256 calibration tokens, 16 x 256 held-out tokens of the Python docs), so only the objective differs.
Prints held-out perplexity and the share of the log-perplexity gap recovered; writes
``results/sequential_eora.{md,json}``.

    python benchmarks/bench_sequential_eora.py --ridges 0 0.001 0.01 0.1
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from _report import finish, goal, goal_section, header, machine_info, write_results
from compress import CompressionConfig, compress_blocks
from compress.evaluation import perplexity
from compress.models import load_smollm2, token_slices

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)
    model, tok = load_smollm2()
    calib, held = token_slices(tok, 16 * 256, 16 * 256, 256)
    config = CompressionConfig(method="rtn", bits=3, group_size=64, target_modules="all-linear")
    dense = perplexity(model, held)
    plain = compress_blocks(model, config, calib, progress=False)
    compressed = perplexity(plain.model, held)
    recovered = lambda p: (math.log(compressed) - math.log(p)) / (math.log(compressed) - math.log(dense))
    rows = []
    for sequential, ridge in [(False, 0.0)] + [(True, r) for r in args.ridges]:
        t = time.time()
        res = compress_blocks(model, config, calib, eora_rank=args.rank, eora_sequential=sequential,
                              eora_ridge=ridge, progress=False)
        ppl = perplexity(res.eora.apply(res.model), held)
        rows.append({"eora": "sequential" if sequential else "independent", "ridge": ridge, "perplexity": ppl,
                     "recovered": recovered(ppl), "seconds": time.time() - t})
        print(f"{rows[-1]['eora']:<11} ridge={ridge:<6g} ppl {ppl:8.3f}  recovered {rows[-1]['recovered']:.3f}",
              flush=True)
    best_seq = min((r for r in rows if r["eora"] == "sequential"), key=lambda r: r["perplexity"])
    ratio = rows[0]["perplexity"] / best_seq["perplexity"]
    g = goal("best sequential EoRA beats independent EoRA (independent ppl / sequential ppl > 1)", value=ratio,
             need=1.0 + 1e-9, detail=f"best sequential: ridge={best_seq['ridge']:g}")
    finish(info, start)
    table = ["| EoRA | ridge | held-out ppl | gap recovered | s |", "|---|---:|---:|---:|---:|",
             f"| none (RTN-3 g64) | | {compressed:.3f} | 0 | |"]
    table += [f"| {r['eora']} | {r['ridge']:g} | {r['perplexity']:.3f} | {r['recovered']:.3f} | {r['seconds']:.0f} |"
              for r in rows]
    command = f"python benchmarks/bench_sequential_eora.py --ridges {' '.join(map(str, args.ridges))} --rank {args.rank}"
    md = (header(f"Sequential vs independent EoRA (SmolLM2, RTN 3-bit g64, r={args.rank})", command, info)
          + ["", f"Dense perplexity {dense:.3f}.", ""] + table + goal_section([g]))
    write_results(RESULTS, "sequential_eora", md, {"machine": info, "dense": dense, "compressed": compressed,
                                                    "rows": rows, "goals": [g]})


if __name__ == "__main__":
    main()
