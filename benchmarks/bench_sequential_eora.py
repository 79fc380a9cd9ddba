"""Does sequential EoRA beat independent EoRA? SmolLM2, RTN, GPTQ or SparseGPT 2:4 (``--bits``, default 3, g64),
EoRA at ``--rank``.

Independent EoRA fits each residual to the layer's own error on the dense model's inputs, ``‖(W − W_c − BA) X‖``.
Sequential EoRA fits it to the dense outputs from the compressed-and-compensated model's inputs,
``‖W X − (W_c + BA) X̃‖² + λ'‖BA − ΔW‖²``, with ``λ`` (or independent EoRA) chosen per layer by 2-fold
cross-validation (:mod:`compress.sequential_eora`). Both run through the block pipeline
(:func:`compress.compress_blocks`) on the CLI's data (16 x 256 calibration tokens, 16 x 256 held-out tokens of the
Python docs), so only the objective differs. Prints held-out perplexity, the share of the log-perplexity gap
recovered and which candidate the layers chose; writes ``results/<--stem>.{md,json}`` (default
``sequential_eora``, the README's r=64 table). Every block linear is compressed and compensated.

    python benchmarks/bench_sequential_eora.py --methods rtn gptq
    python benchmarks/bench_sequential_eora.py --methods rtn gptq --rank 16 --stem sequential_eora_r16
    python benchmarks/bench_sequential_eora.py --methods gptq sparsegpt --bits 4 --stem sequential_eora_4bit_gptq
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import torch

from _report import finish, goal, goal_section, header, machine_info, write_results
from compress import CompressionConfig, compress_blocks
from compress.evaluation import perplexity
from compress.models import load_smollm2, token_slices
from compress.sequential_eora import DEFAULT_RIDGES

RESULTS = Path(__file__).resolve().parent / "results"
#: --methods -> (row label, CompressionConfig keywords); every one at --bits, group 64
METHODS = {
    "rtn": ("RTN-{bits} g64", lambda bits: dict(method="rtn", bits=bits)),
    "gptq": ("GPTQ-{bits} g64", lambda bits: dict(method="gptq", bits=bits)),
    "sparsegpt": ("SparseGPT 2:4 + {bits}-bit g64", lambda bits: dict(method="sparsegpt", pattern="2:4",
                                                                       sparse_bits=bits)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rtn"], choices=sorted(METHODS))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--stem", default="sequential_eora",
                        help="results file stem (default sequential_eora: the README's r=64 RTN-3 table)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    label = lambda method: METHODS[method][0].format(bits=args.bits)  # noqa: E731
    start = time.perf_counter()
    info = machine_info(args.threads)
    model, tok = load_smollm2()
    calib, held = token_slices(tok, 16 * 256, 16 * 256, 256)
    dense = perplexity(model, held)
    rows, goals = [], []
    for method in args.methods:
        config = CompressionConfig(**METHODS[method][1](args.bits), group_size=64, target_modules="all-linear")
        compressed = perplexity(compress_blocks(model, config, calib, progress=False).model, held)
        recovered = lambda p: (math.log(compressed) - math.log(p)) / (math.log(compressed) - math.log(dense))
        ppl = {}
        for sequential in (False, True):
            t = time.time()
            res = compress_blocks(model, config, calib, eora_rank=args.rank, eora_sequential=sequential,
                                  progress=False)
            ppl[sequential] = perplexity(res.eora.apply(res.model), held)
            choices = Counter(r.choice for r in res.eora.layers) if sequential else Counter()
            rows.append({"method": method, "eora": "sequential" if sequential else "independent",
                         "compressed": compressed, "perplexity": ppl[sequential],
                         "recovered": recovered(ppl[sequential]), "choices": dict(choices),
                         "seconds": time.time() - t})
            print(f"{method} {rows[-1]['eora']:<11} ppl {ppl[sequential]:8.3f}  recovered "
                  f"{rows[-1]['recovered']:.3f}  {dict(choices)}", flush=True)
        goals.append(goal(f"{label(method)}: sequential EoRA beats independent EoRA (independent ppl "
                          "/ sequential ppl > 1)", value=ppl[False] / ppl[True], need=1.0 + 1e-9))
    finish(info, start)
    table = ["| compressor | EoRA | held-out ppl | gap recovered | layers' choice | s |", "|---|---|---:|---:|---|---:|"]
    for method in args.methods:
        first = next(r for r in rows if r["method"] == method)
        table.append(f"| {label(method)} | none | {first['compressed']:.3f} | 0 | | |")
        table += [f"| {label(method)} | {r['eora']} | {r['perplexity']:.3f} | "
                  f"{r['recovered']:.3f} | {', '.join(f'{k}: {v}' for k, v in sorted(r['choices'].items()))} | "
                  f"{r['seconds']:.0f} |"
                  for r in rows if r["method"] == method]
    command = (f"python benchmarks/bench_sequential_eora.py --methods {' '.join(args.methods)} --rank {args.rank} "
               f"--threads {args.threads}" + (f" --bits {args.bits}" if args.bits != 3 else "")
               + (f" --stem {args.stem}" if args.stem != "sequential_eora" else ""))
    md = (header(f"Sequential vs independent EoRA (SmolLM2, {args.bits}-bit g64, r={args.rank})", command, info)
          + ["", f"Dense perplexity {dense:.3f}. Sequential EoRA chooses per layer, by 2-fold cross-validation over "
             "the calibration batches, between independent EoRA and the ridges "
             f"{', '.join(f'{r:g}' for r in DEFAULT_RIDGES)} (times mean(diag C~)).", ""]
          + table + goal_section(goals))
    write_results(RESULTS, args.stem, md, {"machine": info, "dense": dense, "rows": rows, "goals": goals})


if __name__ == "__main__":
    main()
