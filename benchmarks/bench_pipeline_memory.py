"""How much memory does compressing SmolLM2 take, block by block vs the whole model at once?

Questions answered
------------------
Peak resident memory (``ru_maxrss``) and wall time of compressing SmolLM2-135M-Instruct
(:func:`compress.models.load_smollm2`) with the ``tensornets compress`` defaults: 3-bit round-to-nearest, groups of
64, asymmetric, on every linear of the 30 blocks (210 layers), with an EoRA residual of rank 64, calibrated on
16 x 256 tokens of the stdlib docs (:func:`compress.models.token_slices`):

- ``whole``: today's path, the model in float32, statistics of all 210 layers, ``compress_model`` (a copy), then
  ``eora_compensate``;
- ``blocks-bf16``: :func:`compress.pipeline.compress_blocks` on the model loaded in bfloat16, in place: one
  float32 block and one block's statistics at a time;
- ``blocks-fp32``: the same pipeline on the float32 model (the block-wise statistics alone, no storage-dtype saving);
- ``blocks-bf16-disk``: the pipeline on the model loaded in bfloat16 with its 30 blocks offloaded to disk by
  accelerate (``from_pretrained(cache, device_map={..., "model.layers": "disk"}, offload_folder=tmp)``), the
  compressed blocks written back to disk (``offload_folder=``). Its perplexity is not evaluated (an EoRA residual
  cannot be attached to offloaded layers in memory).

End to end, ``tensornets compress`` itself (``--cli-modes``; load, dense evaluation, block pipeline with EoRA,
evaluation of the compressed and compensated model, ``--output-dir`` export), each in its own process, its peak
taken from ``wait4``'s ``ru_maxrss`` as ``/usr/bin/time -v`` reports it:

- ``cli``: the console command (``python -m compress.cli compress``): defaults, glibc's mmap threshold fixed at
  128 KiB by the command;
- ``cli-default-malloc``: the same job through ``python -m compress.main_job`` (glibc's dynamic threshold), to show
  whether fixing it still helps;
- ``cli-gptq``: the console command with ``--method gptq`` (the candidate default compressor), for its time next to
  ``cli`` measured at the same moment.

Each mode runs in a fresh process so its peak is its own. The held-out perplexity (4096 tokens, the compensated
model in float32) is printed beside it to show the modes compute the same thing; perplexity is evaluated after the
peak of the compression was recorded.

Run
---
    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline_memory.py            # all modes, one after another
    python benchmarks/bench_pipeline_memory.py --parallel --eval-tokens 0   # peaks only, modes side by side
    python benchmarks/bench_pipeline_memory.py --modes blocks-bf16 --eval-tokens 0
    python benchmarks/bench_pipeline_memory.py --mmap-threshold 131072   # glibc returns freed memory at once
    python benchmarks/bench_pipeline_memory.py --cli-modes cli cli-default-malloc cli-gptq --parallel

Writes ``benchmarks/results/pipeline_memory.md`` and ``pipeline_memory.json`` (``pipeline_memory_mmap.*`` with
``--mmap-threshold``); the CLI modes write ``pipeline_memory_cli.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("whole", "blocks-bf16", "blocks-fp32", "blocks-bf16-disk")
CLI_MODES = {
    "cli": ["-m", "compress.cli", "compress"],
    "cli-default-malloc": ["-m", "compress.main_job"],
    "cli-gptq": ["-m", "compress.cli", "compress", "--method", "gptq"],
}


def _rss_mb() -> float:
    """Current resident set size (``VmRSS``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KB on Linux), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    """Reset the kernel's resident high-water mark ``VmHWM`` (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    """Resident high-water mark since the last :func:`_reset_hwm` (``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, args: argparse.Namespace) -> dict:
    """Run one mode in this process and return its numbers."""
    if args.mmap_threshold:
        # glibc raises its mmap threshold after each large free (up to 32 MB), so freed float64 temporaries stay in
        # the heap; a fixed threshold (as MALLOC_MMAP_THRESHOLD_ does) returns them to the OS
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    sys.path.insert(0, str(ROOT))
    import torch

    from compress import CompressionConfig, collect_activation_stats, compress_model, eora_compensate, find_targets
    from compress.evaluation import perplexity
    from compress.models import load_smollm2, token_slices
    from compress.pipeline import compress_blocks

    torch.set_num_threads(args.threads)
    after_import = _rss_mb()
    dtype = torch.bfloat16 if mode.startswith("blocks-bf16") else torch.float32
    offload_dir = None
    if mode != "blocks-bf16-disk":
        model, tok = load_smollm2(dtype=dtype)
    else:  # from the converted cache (written by an earlier load_smollm2 in its own process), blocks on disk
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from compress.models import default_cache_dir

        if not (default_cache_dir() / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-c", "from compress.models import load_smollm2; load_smollm2()"],
                           check=True, cwd=ROOT)
        tok = AutoTokenizer.from_pretrained(default_cache_dir(), local_files_only=True)
        offload_dir = tempfile.mkdtemp(prefix="bench-offload-")
        device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": "cpu"}
        model = AutoModelForCausalLM.from_pretrained(default_cache_dir(), dtype=dtype, device_map=device_map,
                                                     offload_folder=offload_dir + "/load", local_files_only=True)
        model.eval()
    calib, held_out = token_slices(tok, args.calib_seqs * args.seq_len, args.eval_tokens, args.seq_len)
    loaded, peak_loaded = _rss_mb(), _peak_mb()
    reset = _reset_hwm()
    config = CompressionConfig(method="rtn", bits=args.bits, group_size=args.group_size)

    start = time.perf_counter()
    if mode == "whole":
        targets = list(find_targets(model, config.target_modules))
        stats = collect_activation_stats(model, calib, targets, progress=False)
        report = compress_model(model, config, stats, progress=False)
        eora = eora_compensate(model, report.model, stats, rank=args.rank, target_modules=targets, progress=False)
        compressed = report.model
        del stats
    else:
        out = compress_blocks(model, config, calib, eora_rank=args.rank, inplace=True, progress=False,
                              offload_folder=None if offload_dir is None else offload_dir + "/compressed")
        compressed, eora = out.model, out.eora
    seconds = time.perf_counter() - start
    # clear_refs also resets ru_maxrss: the overall peak is the larger of the loading and the compression peaks
    peak_compress = _hwm_mb() if reset else float("nan")
    peak = max(peak_loaded, _peak_mb())

    ppl = None
    if held_out and offload_dir is None:
        ppl = perplexity(eora.apply(compressed.float(), inplace=True), held_out)
    if offload_dir is not None:
        shutil.rmtree(offload_dir)
    return {
        "mode": mode, "dtype": str(dtype).replace("torch.", ""), "rss_after_import_mb": after_import,
        "rss_after_load_mb": loaded, "peak_after_load_mb": peak_loaded, "peak_mb": peak,
        "peak_compression_mb": peak_compress, "seconds": seconds,
        "perplexity_compensated": ppl,
    }


def run_cli_modes(modes: list[str], args: argparse.Namespace) -> None:
    """Run ``tensornets compress`` once per mode (at once with ``--parallel``); write ``pipeline_memory_cli.*``."""
    from _report import finish, goal, goal_section, header, machine_info, write_results

    start = time.perf_counter()
    info = machine_info(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        running = []
        for mode in modes:
            cmd = [sys.executable, *CLI_MODES[mode], "--output-dir", f"{tmp}/{mode}", "--json", f"{tmp}/{mode}.json",
                   "--no-progress", "--threads", str(args.threads), *args.cli_args.split()]
            running.append((mode, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}),
                            time.perf_counter()))
            if not args.parallel:
                running[-1] = (*running[-1], *os.wait4(running[-1][1].pid, 0)[1:], time.perf_counter())
        for item in running:
            mode, proc, started = item[:3]
            status, usage, ended = item[3:] if len(item) > 3 else (*os.wait4(proc.pid, 0)[1:], time.perf_counter())
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"mode {mode} failed (exit {os.waitstatus_to_exitcode(status)})")
            summary = json.loads(Path(f"{tmp}/{mode}.json").read_text())
            rows.append({"mode": mode, "command": " ".join(["python", *CLI_MODES[mode]]),
                         "peak_mb": usage.ru_maxrss / 1024, "wall_s": ended - started,
                         "cpu_s": usage.ru_utime + usage.ru_stime,
                         "path": summary["path"], "perplexity": summary["perplexity"],
                         "times_s": summary["times_s"], "saved_mb": summary["saved"]["export"]["total_bytes"] / 1e6})
            print(rows[-1], flush=True)
    finish(info, start)
    table = ["| mode | command | peak RSS MB | wall s | CPU s | dense | compressed | + EoRA | export MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['mode']} | `{r['command']}` | {r['peak_mb']:.0f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['perplexity']['dense']:.3f} | {r['perplexity']['compressed']:.3f} | "
              f"{r['perplexity']['compensated_eora']:.3f} | {r['saved_mb']:.1f} |" for r in rows]
    stages = sorted({k for r in rows for k in r["times_s"]}, key=lambda k: min(
        list(r["times_s"]).index(k) for r in rows if k in r["times_s"]))
    table += ["", "Time per stage, s:", "", "| stage | " + " | ".join(r["mode"] for r in rows) + " |",
              "|---|" + "---:|" * len(rows)]
    table += [f"| {k} | " + " | ".join(f"{r['times_s'][k]:.0f}" if k in r["times_s"] else "-" for r in rows) + " |"
              for k in stages]
    goals = [goal(f"peak RSS of `{r['command']}` on SmolLM2-135M defaults <= 1000 MB, end to end",
                  value=r["peak_mb"], need=1000, higher_is_better=False) for r in rows if r["mode"] != "cli-gptq"]
    command = (f"python benchmarks/bench_pipeline_memory.py --cli-modes {' '.join(modes)} --threads {args.threads}"
               + (" --parallel" if args.parallel else "") + (f" --cli-args '{args.cli_args}'" if args.cli_args else ""))
    md = header("Peak memory of `tensornets compress`, end to end (SmolLM2-135M defaults)", command, info,
                note="with --parallel the modes share the cores: compare their times only with each other")
    md += [f"Each row is one process (extra flags: `{args.cli_args or 'none'}`): load (bfloat16, converted tensor by "
           f"tensor from the float32 cache), dense perplexity, the block pipeline (`{rows[0]['path']}`) with EoRA, "
           "compressed and compensated perplexity, `--output-dir` export. Peak RSS is the process's `ru_maxrss` "
           "(`wait4`), what `/usr/bin/time -v` reports as maximum resident set size; CPU s is its user + system "
           "time, which other jobs on the cores inflate much less than the wall time.", "", *table]
    md += goal_section(goals, note="One run per mode.")
    write_results(RESULTS, "pipeline_memory_cli", md, {"machine": info, "rows": rows, "goals": goals})
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cli-modes", nargs="+", choices=list(CLI_MODES), default=None,
                        help="run tensornets compress end to end in these modes instead of the library modes")
    parser.add_argument("--cli-args", default="", help="extra flags for tensornets compress (default: none, the "
                        "defaults; e.g. '--calib-tokens 1024' for a quick check)")
    parser.add_argument("--calib-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="fix glibc's M_MMAP_THRESHOLD to this many bytes in each mode (0: glibc's dynamic default)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the modes at the same time (peaks stay per process; times are then not comparable)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(args.child, args)))
        return
    if args.cli_modes:
        run_cli_modes(args.cli_modes, args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--out", f"{tmp}/{mode}.json",
                   *[x for k, v in vars(args).items() if k not in ("modes", "child", "out", "parallel")
                     for x in (f"--{k.replace('_', '-')}", str(v))]]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}))
            if not args.parallel:
                procs[-1].wait()
        for mode, proc in zip(args.modes, procs):
            if proc.wait() != 0:
                raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
            rows.append(json.loads(Path(f"{tmp}/{mode}.json").read_text()))
            print(rows[-1], flush=True)

    head = ("mode", "storage dtype", "peak RSS MB", "peak while compressing MB", "peak while loading MB",
            "RSS after load MB", "RSS after import MB", "time s",
            "ppl (+EoRA)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        ppl = "-" if r["perplexity_compensated"] is None else f"{r['perplexity_compensated']:.3f}"
        lines.append(" | ".join((r["mode"], r["dtype"], f"{r['peak_mb']:.0f}", f"{r['peak_compression_mb']:.0f}",
                                 f"{r['peak_after_load_mb']:.0f}", f"{r['rss_after_load_mb']:.0f}",
                                 f"{r['rss_after_import_mb']:.0f}", f"{r['seconds']:.1f}", ppl)))
    setting = (f"RTN {args.bits}-bit g{args.group_size} asymmetric on all 210 block linears, EoRA r={args.rank}, "
               f"calibration {args.calib_seqs} x {args.seq_len} tokens, {args.threads} thread(s), glibc M_MMAP_THRESHOLD "
               + (f"fixed at {args.mmap_threshold} bytes" if args.mmap_threshold else "dynamic (default)"))
    md = "\n".join([
        "# Peak memory: block-sequential pipeline vs whole model (SmolLM2-135M)", "",
        f"{setting}. Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()} ({os.cpu_count()} CPUs, shared), by `python benchmarks/bench_pipeline_memory.py`.", "",
        "Peak RSS is the process's `ru_maxrss` when compression ended (imports and loading included); the peak while "
        "compressing is the kernel's `VmHWM`, reset after loading (the loaded model included); "
        "perplexity is measured afterwards on 4096 held-out tokens with the residual applied, in float32.", "",
        *lines, ""])
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "pipeline_memory" + ("_mmap" if args.mmap_threshold else "")
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
