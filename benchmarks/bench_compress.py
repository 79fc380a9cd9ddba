"""Which compression keeps a real LLM's perplexity, and how much does EoRA give back?

Questions answered
------------------
On SmolLM2-135M-Instruct (the embedded default model, :func:`compress.models.load_smollm2`), compressing only the
90 MLP layers (``gate_proj``, ``up_proj``, ``down_proj`` of 30 blocks, 79.6 M of the model's 134.5 M parameters),
with calibration and evaluation on disjoint slices of the stdlib Python docs (:func:`compress.models.token_slices`:
32 x 256 calibration tokens, 16 x 256 = 4096 held-out tokens):

1. **Factorizations at a matched budget.** ``svd`` (plain truncated SVD), ``asvd`` (activation-scaled SVD, α = 0.5),
   ``whitened_svd`` (SVD-LLM: whitened by the calibration second moment), ``mpo`` (TT-matrix, the library's default
   modes) and ``tucker`` (the default Tucker-2 on ``(out, in)``) keeping 50 / 70 / 90 % of the MLP parameters
   (``keep`` = fraction KEPT) -> held-out perplexity and decomposition time.
2. **Compensation of a dense compressor.** 3-bit and 4-bit round-to-nearest quantization (asymmetric, groups of 64)
   and 2:4 magnitude pruning, each uncompensated or with a rank-16 / rank-64 residual from plain SVD of
   ``ΔW = W − W_c`` (LoRC), ASVD, or EoRA (whitened: the exact minimizer of ``‖(ΔW − BA) X‖_F``) -> perplexity.

The dense perplexity is printed beside every table. ``keep`` is always the fraction of parameters kept.

How it is computed
------------------
- One calibration pass collects the statistics of the MLP inputs (``compress.collect_activation_stats``). The
  right weightings ``S`` of every layer (``compress.lowrank.input_scaling``: identity, ASVD scales, whitening
  ``Q Λ^{1/2}`` from a float64 ``eigh``) depend only on these statistics and are computed once, then shared by
  both tables.
- ``svd`` / ``asvd`` / ``whitened_svd``: one SVD of ``W S`` per layer and method (``compress.lowrank.scaled_svd``)
  serves all three keeps: the rank-``k`` factors are ``compress.lowrank.factors_from_svd`` truncations of it,
  swapped in with ``compress.factorizing.lowrank_module`` -- exactly what
  ``compress_model(model, CompressionConfig(method, keep=k))`` builds (checked at start-up on three layers). The
  time column is the weighting + SVD pass (shared by the keeps) plus the per-keep surgery.
- ``mpo`` / ``tucker``: ``compress_model`` per keep; the time column is its wall time.
- Compensation: the compressor is ``compress_model(..., CompressionConfig(method="rtn" | "2:4"))``; the residual
  of every layer is the same computation as ``eora_compensate(original, compressed, stats, rank=r, method=m)``
  (``eora_factors`` = SVD of ``ΔW S``, truncated; checked at start-up against ``eora_compensate`` on three
  layers), done once per compressor and method with the cached weightings; the ranks 16 and 64 are truncations
  of that one SVD. The compensated model is ``EoraAdapter.apply`` (the in-memory equivalent of the exported PEFT
  LoRA adapter).

Run
---
    python benchmarks/bench_compress.py               # full run (~20 min on 2 busy cores, see results)
    python benchmarks/bench_compress.py --quick       # 8 x 256 calibration / 1024 eval tokens, keep 0.5, r=16
    python benchmarks/bench_compress.py --threads 1   # on a CPU shared with other jobs 1 thread can be faster

Writes ``benchmarks/results/compress.md`` and ``compress.json`` (``compress_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

try:
    import compress  # noqa: F401
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import finish, header, machine_info, write_results  # noqa: E402

from compress import CompressionConfig, EoraAdapter, collect_activation_stats, compress_model, eora_compensate
from compress import lowrank as lr
from compress.factorizing import LOWRANK_SCALINGS as LOWRANK_METHODS
from compress.eora import EORA_METHODS
from compress.evaluation import perplexity
from compress.models import load_smollm2, token_slices
from compress.factorizing import lowrank_module
from compress.targets import dense_weight, find_targets, replace_module

MLP = ["gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results"


def _now() -> float:
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------- table 1
def input_scalings(targets, stats) -> tuple[dict[str, dict], dict[str, float]]:
    """``S`` of every layer for each weighting (``svd``: identity, ``asvd``, ``whitened``), and the time of each."""
    scalings, times = {}, {}
    for kind in lr.SCALINGS:
        start = _now()
        scalings[kind] = {n: lr.input_scaling(kind, stats.get(n), n=m.in_features) for n, m in targets.items()}
        times[kind] = _now() - start
    return scalings, times


def lowrank_sweep(model, targets, scalings, scaling_time, method: str, keeps, held_out) -> list[dict]:
    """One weighted SVD per layer, truncated to every keep; perplexity of each model."""
    start = _now()
    svds = {}
    for name, module in targets.items():
        U, s, Vh = lr.scaled_svd(dense_weight(module), scalings[name])
        svds[name] = (U.float(), s.float(), Vh.float())
    svd_time = scaling_time + _now() - start
    rows = []
    for keep in keeps:
        start = _now()
        work = copy.deepcopy(model)
        before = after = 0
        for name, module in targets.items():
            U, s, Vh = svds[name]
            out_f, in_f = module.out_features, module.in_features
            rank = lr.rank_for_keep(out_f, in_f, keep)
            B, A = lr.factors_from_svd(U.double(), s.double(), Vh.double(), rank, scalings[name])
            replace_module(work, name, lowrank_module(module, B, A))
            before += out_f * in_f
            after += rank * (out_f + in_f)
        build_time = _now() - start
        rows.append({"method": method, "keep": keep, "keep_actual": after / before, "ppl": perplexity(work, held_out),
                     "time_s": svd_time + build_time, "svd_s": svd_time})
        print(f"  {method:<13} keep {keep:.1f}: ppl {rows[-1]['ppl']:10.2f}  ({rows[-1]['time_s']:.1f} s)", flush=True)
        del work
    return rows


def tensor_sweep(model, stats, method: str, keeps, held_out) -> list[dict]:
    rows = []
    for keep in keeps:
        start = _now()
        report = compress_model(model, CompressionConfig(method=method, keep=keep, target_modules=MLP), stats,
                                progress=False)
        elapsed = _now() - start
        ranks = sorted({r.ranks for r in report.layers})
        rows.append({"method": method, "keep": keep, "keep_actual": report.keep,
                     "ppl": perplexity(report.model, held_out), "time_s": elapsed, "ranks": ranks[:4]})
        print(f"  {method:<13} keep {keep:.1f}: ppl {rows[-1]['ppl']:10.2f}  ({elapsed:.1f} s)", flush=True)
    return rows


CHECK_LAYERS = [f"model.layers.{i}.mlp.{p}" for i, p in ((0, "gate_proj"), (7, "up_proj"), (15, "down_proj"))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_equivalence(model, stats, scalings) -> None:
    """The shared-SVD constructions equal compress_model / eora_compensate on three layers (to fp32 precision)."""
    sub = {n: stats[n] for n in CHECK_LAYERS}
    targets = find_targets(model, CHECK_LAYERS)
    for method, kind in LOWRANK_METHODS.items():
        ref = compress_model(model, CompressionConfig(method=method, keep=0.5, target_modules=CHECK_LAYERS), sub,
                             progress=False).model
        for name, module in targets.items():
            W = dense_weight(module)
            U, s, Vh = lr.scaled_svd(W, scalings[kind][name])
            B, A = lr.factors_from_svd(U, s, Vh, lr.rank_for_keep(*W.shape, 0.5), scalings[kind][name])
            err = _rel(B @ A, dense_weight(ref.get_submodule(name)))
            if err > 1e-4:
                raise AssertionError(f"{method} {name}: shared-SVD weights differ from compress_model by {err:.2e}")
    quant = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=64, target_modules=CHECK_LAYERS),
                           progress=False).model
    for method in EORA_METHODS:
        ref = eora_compensate(model, quant, sub, rank=16, method=method, progress=False)
        mine = residual_factors(targets, quant, {n: scalings[EORA_METHODS[method]][n] for n in CHECK_LAYERS}, (16,))
        for name in CHECK_LAYERS:
            B, A = mine[16][name]
            Br, Ar = ref.factors[name]
            err = _rel(B @ A, Br @ Ar)
            if err > 1e-4:
                raise AssertionError(f"{method} {name}: residual differs from eora_compensate by {err:.2e}")


# ---------------------------------------------------------------------------------------------- table 2
def residual_factors(targets, compressed, scalings, ranks) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``rank -> name -> (B, A)``: truncations of one SVD of ``(W − W_c) S`` per layer (what ``eora_factors`` does)."""
    out: dict[int, dict] = {r: {} for r in ranks}
    for name, module in targets.items():
        if name not in scalings:
            continue
        W = dense_weight(module).double()
        delta = W - dense_weight(compressed.get_submodule(name)).double()
        U, s, Vh = lr.scaled_svd(delta, scalings[name])
        for r in ranks:
            B, A = lr.factors_from_svd(U, s, Vh, r, scalings[name])
            out[r][name] = (B.float(), A.float())
    return out


def compensation_sweep(model, targets, stats, scalings, compressor: str, config: CompressionConfig, ranks,
                       held_out) -> list[dict]:
    start = _now()
    compressed = compress_model(model, config, stats, progress=False).model
    rows = [{"compressor": compressor, "compensation": "none", "rank": 0, "ppl": perplexity(compressed, held_out),
             "time_s": _now() - start, "adapter_params": 0}]
    print(f"  {compressor:<8} none          ppl {rows[-1]['ppl']:10.2f}", flush=True)
    for method, kind in EORA_METHODS.items():
        start = _now()
        factors = residual_factors(targets, compressed, scalings[kind], ranks)
        elapsed = _now() - start
        for r in ranks:
            adapter = EoraAdapter(factors[r], {n: "linear" for n in factors[r]}, r, method, [])
            params = sum(B.numel() + A.numel() for B, A in factors[r].values())
            rows.append({"compressor": compressor, "compensation": method, "rank": r,
                         "ppl": perplexity(adapter.apply(compressed), held_out),
                         "time_s": elapsed, "adapter_params": params})
            print(f"  {compressor:<8} {method:<5} r={r:<4}    ppl {rows[-1]['ppl']:10.2f}  ({elapsed:.1f} s SVDs)",
                  flush=True)
    del compressed
    return rows


# ---------------------------------------------------------------------------------------------- output
def _p(v: float) -> str:
    if v != v or v == float("inf"):
        return str(v)
    return f"{v:.3g}" if v >= 1e4 else f"{v:.2f}"


def markdown(res: dict) -> list[str]:
    meta, dense = res["meta"], res["dense_ppl"]
    keeps = res["keeps"]
    out = header("Compression of SmolLM2-135M: factorizations and EoRA", meta["command"], res["machine"],
                 note="times are inflated and noisy") + [
        "## Setup",
        "",
        f"- Model: SmolLM2-135M-Instruct (embedded, float32); targets: the {meta['targets']} MLP layers "
        f"(gate/up/down_proj of 30 blocks, {meta['target_params'] / 1e6:.1f} M of {meta['model_params'] / 1e6:.1f} M "
        "parameters).",
        f"- Data: calibration {meta['calib']}, evaluation {meta['eval']} (disjoint slices of the stdlib Python docs); "
        "perplexity on the held-out tokens.",
        f"- Calibration pass {meta['calib_s']:.0f} s, one perplexity evaluation ≈ {meta['eval_s']:.0f} s.",
        "",
        f"**Dense perplexity: {_p(dense)}**",
        "",
        "## 1. Factorizations at a matched budget (keep = fraction of MLP parameters kept)",
        "",
        f"Perplexity (dense {_p(dense)}) and decomposition time. For svd / asvd / whitened_svd one SVD per layer "
        "serves the three keeps, so their times share that SVD pass; mpo / tucker time one `compress_model` per keep.",
        "",
        "| method | " + " | ".join(f"keep {k:.1f}: ppl" for k in keeps) + " | "
        + " | ".join(f"keep {k:.1f}: s" for k in keeps) + " | dense ppl |",
        "|---|" + "---|" * (2 * len(keeps) + 1),
    ]
    for method in res["methods"]:
        rows = {r["keep"]: r for r in res["factorization"] if r["method"] == method}
        out.append(f"| {method} | " + " | ".join(_p(rows[k]["ppl"]) for k in keeps) + " | "
                   + " | ".join(f"{rows[k]['time_s']:.0f}" for k in keeps) + f" | {_p(dense)} |")
    actual = {r["method"]: r["keep_actual"] for r in res["factorization"] if r["keep"] == keeps[0]}
    out += ["", "Actual kept fraction at keep " + f"{keeps[0]:.1f}: "
            + ", ".join(f"{m} {v:.3f}" for m, v in actual.items()) + ".", ""]

    ranks = res["ranks"]
    cols = [(m, r) for r in ranks for m in ("svd", "asvd", "eora")]
    label = {"svd": "plain SVD", "asvd": "ASVD", "eora": "**EoRA**"}
    out += [
        "## 2. Compensating a dense compressor (MLP layers)",
        "",
        f"Perplexity (dense {_p(dense)}). RTN: asymmetric round-to-nearest, groups of 64 along the input; 2:4: keep "
        "the 2 largest |w| of every 4. Residual rank r on every MLP layer; plain SVD = LoRC, EoRA = whitened by the "
        "calibration second moment (the optimum of the calibration output error).",
        "",
        "| compressor | none | " + " | ".join(f"{label[m]} r={r}" for m, r in cols) + " | dense ppl |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for comp in res["compressors"]:
        rows = {(r["compensation"], r["rank"]): r for r in res["compensation"] if r["compressor"] == comp}
        out.append(f"| {comp} | {_p(rows[('none', 0)]['ppl'])} | "
                   + " | ".join(_p(rows[(m, r)]["ppl"]) for m, r in cols) + f" | {_p(dense)} |")
    adapter = {r["rank"]: r["adapter_params"] for r in res["compensation"] if r["rank"]}
    eora_t = {r["compressor"]: r["time_s"] for r in res["compensation"] if r["compensation"] == "eora"}
    out += [
        "",
        "Adapter size: " + ", ".join(f"r={r}: {p / 1e6:.2f} M parameters ({100 * p / meta['target_params']:.1f} % of "
                                     "the MLP)" for r, p in sorted(adapter.items()))
        + ". Time of the 90 residual SVDs per compressor (EoRA; the whitening is computed once, "
        f"{meta['whitening_s']:.0f} s): "
        + ", ".join(f"{c} {t:.0f} s" for c, t in eora_t.items()) + ".",
        "",
    ]
    out += ["## Findings", ""] + [f"- {f}" for f in res["findings"]]
    return out


def findings(res: dict) -> list[str]:
    dense = res["dense_ppl"]
    fac = {(r["method"], r["keep"]): r["ppl"] for r in res["factorization"]}
    comp = {(r["compressor"], r["compensation"], r["rank"]): r["ppl"] for r in res["compensation"]}
    keeps, ranks = res["keeps"], res["ranks"]
    lines = []
    for k in keeps:
        best = min(res["methods"], key=lambda m: fac[(m, k)])
        lines.append(f"keep {k:.1f}: best {best} (ppl {_p(fac[(best, k)])}); "
                     + ", ".join(f"{m} {_p(fac[(m, k)])}" for m in res["methods"] if m != best) + ".")
    for c in res["compressors"]:
        r = max(ranks)
        none, e, s, a = (comp[(c, "none", 0)], comp[(c, "eora", r)], comp[(c, "svd", r)], comp[(c, "asvd", r)])
        gap = math.log(none) - math.log(dense)
        rec = (math.log(none) - math.log(e)) / gap if gap > 0 else float("nan")
        lines.append(f"{c}: {_p(none)} -> EoRA r={r} {_p(e)} (recovers {100 * rec:.0f} % of the log-ppl gap to "
                     f"dense); plain SVD {_p(s)}, ASVD {_p(a)} at the same rank.")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 x 256 calibration / 4 x 256 eval tokens, keep 0.5 only, rank 16 only, RTN-3 and 2:4")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--calib-seqs", type=int, default=None, help="calibration sequences of 256 tokens (default 32)")
    parser.add_argument("--eval-seqs", type=int, default=None, help="evaluation sequences of 256 tokens (default 16)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the .md / .json results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = _now()
    info = machine_info(torch.get_num_threads())
    if args.quick:
        calib_seqs, eval_seqs, keeps, ranks = 8, 4, (0.5,), (16,)
        compressors = {"rtn3": dict(method="rtn", bits=3, group_size=64), "2:4": dict(method="2:4")}
    else:
        calib_seqs, eval_seqs, keeps, ranks = 32, 16, (0.5, 0.7, 0.9), (16, 64)
        compressors = {"rtn3": dict(method="rtn", bits=3, group_size=64),
                       "rtn4": dict(method="rtn", bits=4, group_size=64), "2:4": dict(method="2:4")}
    calib_seqs = args.calib_seqs or calib_seqs
    eval_seqs = args.eval_seqs or eval_seqs
    methods = ("svd", "asvd", "whitened_svd", "mpo", "tucker")
    seq = 256

    model, tok = load_smollm2()
    calib, held_out = token_slices(tok, calib_seqs * seq, eval_seqs * seq, seq)
    targets = find_targets(model, MLP)
    start = _now()
    stats = collect_activation_stats(model, calib, MLP, progress=False)
    calib_s = _now() - start
    start = _now()
    dense = perplexity(model, held_out)
    eval_s = _now() - start
    print(f"dense ppl {dense:.3f} (calibration {calib_s:.0f} s, evaluation {eval_s:.0f} s)", flush=True)
    start = _now()
    scalings, scaling_times = input_scalings(targets, stats)
    print("weightings: " + ", ".join(f"{k} {t:.0f} s" for k, t in scaling_times.items()), flush=True)
    check_equivalence(model, stats, scalings)
    print(f"equivalence checks passed ({_now() - start:.0f} s with the weightings)", flush=True)

    print("1. factorizations", flush=True)
    fac_rows = []
    for method in methods:
        if method in LOWRANK_METHODS:
            kind = LOWRANK_METHODS[method]
            fac_rows += lowrank_sweep(model, targets, scalings[kind], scaling_times[kind], method, keeps, held_out)
        else:
            fac_rows += tensor_sweep(model, stats, method, keeps, held_out)

    print("2. compensation", flush=True)
    comp_rows = []
    for name, kw in compressors.items():
        comp_rows += compensation_sweep(model, targets, stats, scalings, name,
                                        CompressionConfig(target_modules=MLP, **kw), ranks, held_out)

    res = {
        "meta": {
            "command": "python benchmarks/bench_compress.py" + (" --quick" if args.quick else "")
            + (f" --threads {args.threads}" if args.threads else "")
            + (f" --calib-seqs {args.calib_seqs}" if args.calib_seqs else "")
            + (f" --eval-seqs {args.eval_seqs}" if args.eval_seqs else ""),
            "targets": len(targets), "target_params": sum(m.weight.numel() for m in targets.values()),
            "model_params": sum(p.numel() for p in model.parameters()),
            "calib": f"{calib_seqs} x {seq} tokens", "eval": f"{eval_seqs} x {seq} tokens",
            "calib_s": calib_s, "eval_s": eval_s, "whitening_s": scaling_times["whitened"],
        },
        "machine": info,
        "dense_ppl": dense, "keeps": list(keeps), "ranks": list(ranks), "methods": list(methods),
        "compressors": list(compressors), "factorization": fac_rows, "compensation": comp_rows,
    }
    finish(info, wall)
    res["findings"] = findings(res)
    md = markdown(res)
    write_results(args.out, "compress_quick" if args.quick else "compress", md, res)
    print("\n" + "\n".join(md))
    return res


if __name__ == "__main__":
    main()
