"""How much does float rounding alone move the perplexity of a GPTQ-compressed SmolLM2?

Our min-max GPTQ returns llm-compressor's weights layer for layer up to float rounding
(``results/gptq_layer_diff.md``), yet the two whole-model perplexities differ (``results/quality.md``: 22.69 vs
21.74 at 3 bits). This measures the spread that rounding alone causes: the same compressor, data and settings,
with only the *order* of the calibration windows changed. Each linear's statistics ``Σ_b X_bᵀ X_b`` are summed in
float32 over the windows, so a permutation changes them by float32 rounding (about 1e-7 relative) and nothing
else; every row below is an equally valid GPTQ run of the same data.

SmolLM2-135M, the CLI's data (16 x 256 calibration and 16 x 256 held-out tokens of the Python docs, with the special
tokens the tokenizer adds: none for SmolLM2), every block linear but the LM head compressed by the block pipeline
(:func:`compress.compress_blocks`) with min-max grids, group size 64, asymmetric, act-order and damping 0.01: the
settings of ``bench_quality.py``'s "GPTQ 3-bit" / "GPTQ 4-bit" rows and of llm-compressor's rows in
``results/llmcompressor.json``. Order 0 is the CLI's order,
orders 1.. are seeded permutations.

    OMP_NUM_THREADS=1 python benchmarks/bench_gptq_rounding.py --orders 4 --bits 3 4
    OMP_NUM_THREADS=1 python benchmarks/bench_gptq_rounding.py --start 4 --orders 12 --bits 3   # add orders 4-11

Writes ``results/gptq_rounding.{md,json}``; ``--start k`` keeps the rows of orders below ``k`` already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _report import finish, header, machine_info, write_results
from compress import CompressionConfig, compress_blocks
from compress.evaluation import perplexity
from compress.models import load_smollm2, token_slices

RESULTS = Path(__file__).resolve().parent / "results"
CALIB_TOKENS, EVAL_TOKENS, SEQ_LEN, GROUP_SIZE = 16 * 256, 16 * 256, 256, 64  # as bench_quality.py
PEER_SETTING = {3: "3-bit g64 asym", 4: "4-bit g64 asym"}  # results/llmcompressor.json "setting"


def permuted(windows: list[torch.Tensor], order: int) -> list[torch.Tensor]:
    """``windows`` in order ``order``: 0 keeps them, ``k > 0`` is a permutation seeded with ``k``."""
    if order == 0:
        return list(windows)
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(order)).tolist()
    return [windows[i] for i in perm]


def peer_perplexity(path: Path, bits: int) -> float | None:
    """llm-compressor's GPTQ perplexity at ``bits`` (g64 asymmetric), or None when the peer has not been run."""
    if not path.is_file():
        return None
    for row in json.loads(path.read_text())["rows"]:
        if row["setting"] == PEER_SETTING[bits] and row["method"] == "gptq":
            return row["perplexity"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=4, help="orders 0 .. orders-1 per setting (default: 4)")
    parser.add_argument("--start", type=int, default=0,
                        help="first order to run; the existing results' rows of lower orders are kept (default: 0)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3], choices=[3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--peer", type=Path, default=RESULTS / "llmcompressor.json")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the md from the existing json (after a change of the table or the peer file)")
    args = parser.parse_args()
    if args.report_only:
        old = json.loads((RESULTS / "gptq_rounding.json").read_text())
        args.start, args.command = old["start"], old["command"]
        report(args, old["machine"], old["earlier_runs"], old["dense"], old["rows"])
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)

    model, tok = load_smollm2()
    calib, held = token_slices(tok, CALIB_TOKENS, EVAL_TOKENS, SEQ_LEN)
    dense = perplexity(model, held)
    print(f"dense ppl {dense:.3f}", flush=True)
    rows: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []  # machine records of the runs whose rows are kept
    if args.start:
        old = json.loads((RESULTS / "gptq_rounding.json").read_text())
        rows = [r for r in old["rows"] if r["order"] < args.start]
        earlier = old.get("earlier_runs", []) + [old["machine"]]
    for bits in args.bits:
        config = CompressionConfig(method="gptq", bits=bits, group_size=GROUP_SIZE, target_modules="all-linear")
        for order in range(args.start, args.orders):
            t = time.perf_counter()
            res = compress_blocks(model, config, permuted(calib, order), progress=False)
            ppl = perplexity(res.model, held)
            rows.append({"bits": bits, "order": order, "perplexity": ppl, "compress_s": time.perf_counter() - t})
            print(f"GPTQ {bits}-bit order {order}: ppl {ppl:.3f}", flush=True)
            del res
    finish(info, start)

    report(args, info, earlier, dense, rows)


def report(args: argparse.Namespace, info: dict[str, Any], earlier: list[dict[str, Any]], dense: float,
           rows: list[dict[str, Any]]) -> None:
    """Write ``results/gptq_rounding.{md,json}``: every order's perplexity, the spread, llm-compressor beside it."""
    table = ["| setting (min-max, g64, asym) | ppl per calibration order | min | median | max | max / min | "
             "llm-compressor ppl | llm-compressor / our min | our orders above llm-compressor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for bits in sorted({r["bits"] for r in rows}):
        ppls = [r["perplexity"] for r in sorted(rows, key=lambda r: r["order"]) if r["bits"] == bits]
        peer = peer_perplexity(args.peer, bits)
        lo, hi = min(ppls), max(ppls)
        med = statistics.median(ppls)
        summary.append({"bits": bits, "min": lo, "max": hi, "median": med, "peer": peer})
        ratios = "— | —" if peer is None else f"{peer / lo:.3f} | {sum(p > peer for p in ppls)} / {len(ppls)}"
        table.append(f"| GPTQ {bits}-bit | {', '.join(f'{p:.3f}' for p in ppls)} | {lo:.3f} | {med:.3f} | {hi:.3f} | "
                     f"{hi / lo:.3f} | {'—' if peer is None else format(peer, '.3f')} | {ratios} |")
    cmd = getattr(args, "command", None)  # --report-only: the command that measured the rows
    if cmd is None:
        cmd = f"python benchmarks/bench_gptq_rounding.py --orders {args.orders} --bits {' '.join(map(str, args.bits))}"
        cmd += f" --start {args.start}" if args.start else ""
    runs = (f" Orders below {args.start} come from earlier runs (`earlier_runs` in the json): "
            + ", ".join(f"{m['cpu_model']} {m['date']}" for m in earlier) + "." if earlier else "")
    md = header("GPTQ perplexity under float rounding alone: the same data in other orders", cmd, info) + [
        f"Dense perplexity {dense:.3f}. Order 0 is the CLI's calibration order; orders 1.. are seeded permutations "
        "of the same 16 windows, which change each layer's float32-summed statistics by rounding only. "
        "llm-compressor: results/llmcompressor.json (same windows, settings and perplexity arithmetic)." + runs, "",
        *table, ""]
    write_results(RESULTS, "gptq_rounding", md, {"machine": info, "earlier_runs": earlier, "start": args.start,
                                                  "command": cmd, "dense": dense, "rows": rows, "summary": summary})
    print("\n".join(table))


if __name__ == "__main__":
    main()
