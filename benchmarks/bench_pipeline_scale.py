"""Does the block pipeline's memory stay flat and its time grow linearly with model depth?

Questions answered
------------------
Peak resident memory and wall time of :func:`compress.compress_blocks` with disk offload on models of SmolLM2-135M's
width (hidden 576, MLP 1536, 9 / 3 heads, vocab 49152) and 30, 60 and 120 layers. The deeper models are SmolLM2's
real blocks repeated: block ``i`` takes the weights of block ``i mod 30`` and ``config.num_hidden_layers`` is
changed. Each model is written to a temporary directory (never in the repository) in bfloat16, one safetensors shard
per block plus an index, and loaded in its own process the way a model too big for memory is loaded::

    from_pretrained(dir, dtype=torch.bfloat16, offload_folder=tmp,
                    device_map={"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                "model.rotary_emb": "cpu", "lm_head": "cpu"})

then compressed in place with the ``tensornets compress`` compressor (RTN 3-bit, groups of 64, asymmetric, every
block linear) and an EoRA residual (``--eora-rank``, default 64), the compressed blocks written back to disk
(``offload_folder=``). Calibration is kept small (``--calib-seqs`` x ``--seq-len`` tokens of the Python docs,
default 4 x 256) so the 120-layer run takes minutes: per block the cost is the passes over the calibration data plus
a fixed per-layer cost (the EoRA eigendecomposition and SVD), so time is linear in depth at any calibration size.

Per depth, in a fresh process: RSS after imports, after loading, the peak while compressing (``VmHWM`` reset after
loading) and overall (``ru_maxrss``), the compression time (wall, and CPU = user + system from ``getrusage``, which
other jobs on a shared machine disturb less than wall time), and the bytes the result keeps in memory for every
layer (the bit-packed codes, scales and zero points that the exporter writes, and the EoRA factors in the storage
dtype), which would grow with depth if they stayed in memory (both are written to disk with their blocks). Then the result is exported (``save_hf_directory``, compressed-tensors, with
its EoRA adapter) with its blocks still on disk: the export's peak (``VmHWM`` reset after compressing), time and
bytes written.

Time linearity: CPU seconds per block at every depth, their ratio deepest / shallowest (1.0 when linear), and a
least-squares fit ``cpu(L) = a + b L`` whose intercept ``a`` (the cost that does not scale with depth) is reported
next to ``b``.

Run
---
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_scale.py                 # 30, 60, 120 layers
    python benchmarks/bench_pipeline_scale.py --depths 30 60 --eora-rank 0     # quicker, no compensation

Writes ``benchmarks/results/pipeline_scale.md`` and ``pipeline_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SOURCE_LAYERS = 30  # SmolLM2-135M's depth: block i of a deeper model is block i mod 30


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def linear_fit(depths: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``value = a + b · depth`` (two or more distinct depths)."""
    n = len(depths)
    mean_d, mean_v = sum(depths) / n, sum(values) / n
    b = sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values)) / sum((d - mean_d) ** 2 for d in depths)
    return mean_v - b * mean_d, b


def build_model(depth: int, out: Path) -> Path:
    """Write a ``depth``-layer SmolLM2-width model to ``out`` in bfloat16 (one shard per block) and return ``out``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compress.models import default_cache_dir, load_smollm2

    cache = default_cache_dir()
    if not (cache / "model.safetensors").is_file():
        load_smollm2()  # converts the packaged GGUF once
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((cache / "config.json").read_text())
    config.update(num_hidden_layers=depth, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weight_map, total = {}, 0
    with safe_open(cache / "model.safetensors", "pt") as f:
        names = list(f.keys())
        rest = {n: f.get_tensor(n).to(torch.bfloat16) for n in names if not n.startswith("model.layers.")}
        save_file(rest, out / "rest.safetensors", metadata={"format": "pt"})
        weight_map.update({n: "rest.safetensors" for n in rest})
        total += sum(t.numel() * 2 for t in rest.values())
        for i in range(depth):
            source = f"model.layers.{i % SOURCE_LAYERS}."
            shard = {f"model.layers.{i}.{n[len(source):]}": f.get_tensor(n).to(torch.bfloat16)
                     for n in names if n.startswith(source)}
            file = f"layers-{i:05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            total += sum(t.numel() * 2 for t in shard.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def child(model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """Load ``model_dir`` with its blocks on disk, compress it block by block, return the numbers (this process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import CompressionConfig, compress_blocks, return_freed_memory
    from compress.export import save_hf_directory
    from compress.factor_store import OffloadedFactors
    from compress.models import default_cache_dir, token_slices

    return_freed_memory()  # as `tensornets compress` does: freed float64 temporaries go back to the OS
    torch.set_num_threads(args.threads)
    after_import = _status_mb("VmRSS")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(default_cache_dir(), local_files_only=True)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device_map,
                                                 offload_folder=str(work / "load"), local_files_only=True).eval()
    load_s = time.perf_counter() - start
    calib, _ = token_slices(tok, args.calib_seqs * args.seq_len, args.seq_len, args.seq_len)
    loaded, peak_loaded = _status_mb("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS

    start, cpu_start = time.perf_counter(), _cpu_s()
    result = compress_blocks(model, CompressionConfig(method="rtn", bits=3, group_size=64), calib,
                             eora_rank=args.eora_rank, inplace=True, offload_folder=work / "compressed",
                             progress=False)
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu_start
    peak_compress = _status_mb("VmHWM")
    quantized = sum(q.nbytes for q in result.report.quantized.values())
    # factors of offloaded blocks are on disk (OffloadedFactors): count what stays in memory, without reading them
    stored = None if result.eora is None else result.eora.factors
    factors = (0 if stored is None else stored.resident_nbytes if isinstance(stored, OffloadedFactors)
               else sum(B.nbytes + A.nbytes for B, A in stored.values()))

    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    # the blocks stay on disk: transformers loads the offloaded tensors it writes one shard at a time
    report = save_hf_directory(result.model, work / "export", tokenizer=tok, quantized=result.report.quantized)
    if result.eora is not None:
        result.eora.save_pretrained(work / "export" / "eora-adapter", dtype=torch.bfloat16)
    export_s, peak_export = time.perf_counter() - start, _status_mb("VmHWM")
    return {
        "layers": model.config.num_hidden_layers, "linears": len(result.report.layers),
        "rss_after_import_mb": after_import, "rss_after_load_mb": loaded, "peak_load_mb": peak_loaded,
        "peak_compress_mb": peak_compress, "peak_export_mb": peak_export,
        "peak_mb": max(peak_loaded, peak_compress, peak_export), "export_s": export_s,
        "export_weights_mb": report.weight_bytes / 1e6,
        "rss_end_mb": _status_mb("VmRSS"), "load_s": load_s, "compress_s": seconds,
        "s_per_block": seconds / model.config.num_hidden_layers, "cpu_s": cpu,
        "cpu_s_per_block": cpu / model.config.num_hidden_layers,
        "kept_quantized_mb": quantized / 1e6, "kept_eora_mb": factors / 1e6,
    }


def main() -> None:
    from _report import finish, goal, goal_section, header, machine_info, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[30, 60, 120])
    parser.add_argument("--calib-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eora-rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, work, out = map(Path, args.child)
        Path(out).write_text(json.dumps(child(model_dir, work, args)))
        return

    start = time.perf_counter()
    info = machine_info(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for depth in args.depths:
            model_dir = build_model(depth, Path(tmp) / f"model-{depth}")
            work = Path(tmp) / f"work-{depth}"
            cmd = [sys.executable, __file__, "--child", str(model_dir), str(work), f"{tmp}/{depth}.json",
                   "--calib-seqs", str(args.calib_seqs), "--seq-len", str(args.seq_len),
                   "--eora-rank", str(args.eora_rank), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            rows.append(json.loads(Path(f"{tmp}/{depth}.json").read_text()))
            print(rows[-1], flush=True)
            for path in (model_dir, work):  # disk: one model at a time
                shutil.rmtree(path, ignore_errors=True)
    finish(info, start)

    base = next(r for r in rows if r["layers"] == min(args.depths))
    deep = next(r for r in rows if r["layers"] == max(args.depths))
    peak_ratio = deep["peak_mb"] / base["peak_mb"]
    cpu_ratio = deep["cpu_s_per_block"] / base["cpu_s_per_block"]
    intercept, slope = linear_fit([r["layers"] for r in rows], [r["cpu_s"] for r in rows])
    goals = [
        goal(f"peak RSS at {deep['layers']} layers <= 1.3x the peak at {base['layers']} (disk offload)",
             value=peak_ratio, need=1.3, higher_is_better=False,
             detail=f"{deep['peak_mb']:.0f} MB vs {base['peak_mb']:.0f} MB"),
        goal(f"peak RSS while compressing (after loading) at {deep['layers']} layers <= 1.3x the peak at "
             f"{base['layers']}", value=deep["peak_compress_mb"] / base["peak_compress_mb"], need=1.3,
             higher_is_better=False, detail=f"{deep['peak_compress_mb']:.0f} MB vs {base['peak_compress_mb']:.0f} MB; "
             f"kept quantized codes {deep['kept_quantized_mb']:.0f} MB vs {base['kept_quantized_mb']:.0f} MB"),
        goal(f"peak RSS while exporting the offloaded result at {deep['layers']} layers <= 1.3x the peak at "
             f"{base['layers']}", value=deep["peak_export_mb"] / base["peak_export_mb"], need=1.3,
             higher_is_better=False, detail=f"{deep['peak_export_mb']:.0f} MB vs {base['peak_export_mb']:.0f} MB; "
             f"weights written {deep['export_weights_mb']:.0f} MB vs {base['export_weights_mb']:.0f} MB"),
        goal(f"time linear in depth: CPU s per block at {deep['layers']} layers / at {base['layers']} <= 1.25",
             value=cpu_ratio, need=1.25, higher_is_better=False,
             detail="CPU s per block: " + ", ".join(f"{r['layers']}: {r['cpu_s_per_block']:.2f}" for r in rows)
             + f"; fit cpu(L) = {intercept:.1f} s + {slope:.2f} s x L (wall s per block: "
             + ", ".join(f"{r['layers']}: {r['s_per_block']:.1f}" for r in rows) + ")"),
    ]
    head = ("layers", "linears", "peak RSS MB", "peak compressing MB", "peak exporting MB", "peak loading MB",
            "RSS after load MB", "RSS after import MB", "kept: quantized MB", "kept: EoRA MB", "exported weights MB",
            "load s", "compress s (wall)", "s / block (wall)", "CPU s", "CPU s / block", "export s")
    table = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    table += ["| " + " | ".join([str(r["layers"]), str(r["linears"])] + [f"{r[k]:.0f}" for k in (
        "peak_mb", "peak_compress_mb", "peak_export_mb", "peak_load_mb", "rss_after_load_mb", "rss_after_import_mb",
        "kept_quantized_mb", "kept_eora_mb", "export_weights_mb", "load_s", "compress_s")]
        + [f"{r['s_per_block']:.1f}", f"{r['cpu_s']:.0f}", f"{r['cpu_s_per_block']:.2f}", f"{r['export_s']:.0f}"])
        + " |" for r in rows]
    setting = (f"RTN 3-bit g64 asymmetric on every block linear, EoRA r={args.eora_rank}, calibration "
               f"{args.calib_seqs} x {args.seq_len} tokens, blocks offloaded to disk, {args.threads} thread(s)")
    command = (f"python benchmarks/bench_pipeline_scale.py --depths {' '.join(map(str, args.depths))} --calib-seqs "
               f"{args.calib_seqs} --seq-len {args.seq_len} --eora-rank {args.eora_rank} --threads {args.threads}")
    md = header("Block pipeline by depth: SmolLM2 width, 30 / 60 / 120 layers, blocks on disk", command, info,
                note="times are comparable only within one run, and only roughly on a shared machine")
    md += [setting + ".", "",
           "*kept*: what the result holds in memory for every layer until it is exported: the quantized codes "
           "(bit-packed), scales and zero points, and the EoRA factors (in the storage dtype, bfloat16), unless they "
           "were written to disk with their block (0 MB then); the model itself stays on disk. *CPU s*: user + system CPU "
           "seconds of the compression (getrusage), less sensitive than wall time to other jobs on the machine. "
           "*exporting*: `save_hf_directory` of the result (compressed-tensors, blocks still offloaded) and its EoRA "
           "adapter, peak reset after compressing.",
           "", *table]
    md += goal_section(goals, note="One run per depth (no repeats): value and minimum coincide.")
    write_results(RESULTS, "pipeline_scale", md, {"machine": info, "setting": setting, "rows": rows, "goals": goals})
    print("\n".join(md))


if __name__ == "__main__":
    main()
