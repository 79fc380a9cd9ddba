"""The peer: llm-compressor's RTN and GPTQ on SmolLM2, on the same windows as ``tensornets compress``.

llm-compressor (``oneshot`` with ``QuantizationModifier``, round-to-nearest, and ``GPTQModifier``) quantizes every
block linear of SmolLM2-135M (not the LM head) at the settings of issue 11's table: 3-bit g64 asymmetric, 4-bit g64
asymmetric, 4-bit g64 symmetric. It is calibrated on the CLI's calibration windows (16 x 256 tokens of the Python docs,
with the special tokens the tokenizer adds, none for SmolLM2: :func:`compress.models.token_slices`) and evaluated on
the CLI's held-out windows (16 x 256 tokens).

It runs in a virtual environment of its own (``--venv``, default ``~/.cache/tensornets-bench/llmcompressor-venv``),
created on the first run: ``torch==2.13.0`` first (pip takes the CPU build from this machine's wheels), then
``llmcompressor==0.14.*``. Each setting runs in a fresh subprocess of that venv (``HF_HUB_OFFLINE=1``, the model
read from the safetensors cache :func:`compress.models.load_smollm2` writes, never a hub), which saves the quantized
model with ``save_compressed=True`` (compressed-tensors ``pack-quantized``) and records its own peak RSS
(``ru_maxrss``). A second peer subprocess reloads that directory and computes the held-out perplexity with
:func:`compress.evaluation.perplexity`'s arithmetic (restated: the peer venv cannot import our package), and the
relative difference of the first window's logits to the in-memory model's right after ``oneshot``.

Why not evaluate in this project's venv: llm-compressor 0.14 pins compressed-tensors 0.19, whose ``pack-quantized``
layout packs the zero points of asymmetric schemes (``weight_zero_point`` of shape ``(ceil(out · bits / 32),
groups)``); compressed-tensors 0.20, ours, expects them unpacked ``(out, groups)``, and
``AutoModelForCausalLM.from_pretrained`` refuses the checkpoint (size mismatch). Each directory is still tried here
(``reload_here`` in the json: the logits' relative difference, or the error).

GPTQ settings as ours by default (``tensornets compress --method gptq``): damping 0.01 of the mean Hessian diagonal,
activation order with static groups (``actorder="static"``), blocks of 128 columns.

Writes ``results/llmcompressor.{md,json}``; :mod:`bench_quality` reads the json for its goal lines.

    OMP_NUM_THREADS=1 python benchmarks/peer_llmcompressor.py --venv /work/venvs/llmcompressor --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VENV = Path("~/.cache/tensornets-bench/llmcompressor-venv").expanduser()
#: installed in this order: torch first, so llmcompressor's requirement is already met by the local CPU wheel
PINS = ["torch==2.13.0", "llmcompressor==0.14.*"]
#: (name, bits, symmetric): issue 11's table; group size 64 everywhere (128 does not divide SmolLM2's 576 columns)
SETTINGS = {"3-bit g64 asym": (3, False), "4-bit g64 asym": (4, False), "4-bit g64 sym": (4, True)}
GROUP_SIZE = 64
CALIB_TOKENS, EVAL_TOKENS, SEQ_LEN = 16 * 256, 16 * 256, 256  # the CLI's defaults (compress.main_job.DEFAULTS)


# ------------------------------------------------------------------------------------------ worker (peer venv)
def worker(args: argparse.Namespace) -> None:
    """Quantize with llm-compressor in its own venv; save the model, its first-window logits and its peak RSS.

    Imports nothing of this project: only torch, transformers, safetensors, datasets and llmcompressor.
    """
    import resource

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    windows = load_file(args.windows)
    calib, first_eval = windows["calib"], windows["eval0"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": "group",
        "group_size": args.group_size}}}
    if args.method == "gptq":
        modifier = GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                                actorder="static")
    else:
        modifier = QuantizationModifier(config_groups=scheme, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(input_ids=first_eval, use_cache=False).logits.float()
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    save_file({"logits": logits.contiguous()}, str(out.parent / f"{out.name}.logits.safetensors"))
    (out.parent / f"{out.name}.worker.json").write_text(json.dumps({
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "oneshot_s": seconds}))


def worker_eval(args: argparse.Namespace) -> None:
    """Reload the peer's output directory in the peer venv and compute its held-out perplexity.

    The arithmetic is :func:`compress.evaluation.perplexity`'s, restated here because this venv cannot import our
    package: every window's token NLLs summed in float64, ``ppl = exp(Σ NLL / Σ predicted tokens)``. Also the
    relative difference of the first window's logits to those of the in-memory model right after ``oneshot``
    (the saved artifact is what was measured).
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    windows = load_file(args.windows)
    out = Path(args.out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    nll, tokens = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i, ids in enumerate(windows["eval"]):
            logits = model(input_ids=ids[None], use_cache=False).logits.float()
            if i == 0:
                first = logits
            nll += F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum").double()
            tokens += ids.numel() - 1
    peer_logits = load_file(str(out.parent / f"{out.name}.logits.safetensors"))["logits"]
    (out.parent / f"{out.name}.eval.json").write_text(json.dumps({
        "perplexity": math.exp((nll / tokens).item()),
        "reload_logit_rel_diff": ((first - peer_logits).norm() / peer_logits.norm()).item()}))


# ------------------------------------------------------------------------------------------ driver (our venv)
def ensure_venv(venv: Path) -> Path:
    """``venv/bin/python``, creating the venv and installing :data:`PINS` (one at a time, in order) if needed."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llmcompressor"],
                                          capture_output=True).returncode == 0:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in PINS:
        done = subprocess.run([str(python), "-m", "pip", "install", pin], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip install {pin!r} into {venv} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return python


def peer_versions(python: Path) -> dict[str, str]:
    """The versions of the peer venv's packages that the numbers depend on."""
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['llmcompressor', 'compressed-tensors', 'torch', 'transformers']}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weight_bytes(path: Path) -> int:
    """Bytes of the ``*.safetensors`` files under ``path`` (the weights alone)."""
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def run_setting(python: Path, model_dir: Path, windows: Path, out: Path, method: str, bits: int, symmetric: bool,
                threads: int, mode: str = "--worker") -> dict[str, Any]:
    """Quantize (``mode="--worker"``) or evaluate (``"--worker-eval"``) one setting in a fresh peer subprocess;
    return its record (raises with its log on failure)."""
    cmd = [str(python), str(Path(__file__).resolve()), mode, "--model", str(model_dir), "--windows",
           str(windows), "--out", str(out), "--method", method, "--bits", str(bits), "--group-size", str(GROUP_SIZE),
           "--threads", str(threads)] + (["--symmetric"] if symmetric else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the peer must not see this project's packages
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor {method} {bits}-bit failed (exit {done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    record = json.loads((out.parent / f"{out.name}.{'worker' if mode == '--worker' else 'eval'}.json").read_text())
    record["subprocess_s"] = time.perf_counter() - start
    return record


def reload_here(out: Path, first_window: Any, peer_logits: Any) -> dict[str, Any]:
    """Load the peer's directory with this venv's transformers + compressed-tensors: the relative difference of its
    first-window logits to the peer's in-memory model's, or the error when this compressed-tensors cannot read the
    peer's layout."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure is the finding to report
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    with torch.no_grad():
        logits = model(input_ids=first_window, use_cache=False).logits.float()
    return {"logit_rel_diff": ((logits - peer_logits).norm() / peer_logits.norm()).item()}


def loads_here(record: dict[str, Any]) -> str:
    """Table cell for :func:`reload_here`'s record."""
    if "error" in record and "ignore_mismatched_sizes" in record["error"]:
        # transformers prints the mismatching keys: weight_zero_point, packed by compressed-tensors 0.19
        return "no: size mismatch of weight_zero_point (packed by compressed-tensors 0.19, unpacked in 0.20)"
    if "error" in record:
        return "no: " + record["error"].replace("|", "/")[:90]
    return f"yes, logits rel. diff {record['logit_rel_diff']:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help=f"the peer's virtual environment, created if missing (default: {DEFAULT_VENV})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the peer (default: 1)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=["gptq", "rtn"], choices=["rtn", "gptq"])
    parser.add_argument("--keep-dir", type=Path, default=None,
                        help="keep the peer's output directories here; a later run with the same directory reuses the "
                        "settings already finished there (default: a temporary directory)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite results/llmcompressor.md from results/llmcompressor.json")
    # worker mode (run by the driver inside the peer venv)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--group-size", type=int, default=GROUP_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--symmetric", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.worker_eval:
        (worker if args.worker else worker_eval)(args)
        return
    if args.report_only:
        old = json.loads((RESULTS / "llmcompressor.json").read_text())
        report(args, old["machine"], old["peer_versions"], old["dense"], old["rows"])
        return

    import torch
    from safetensors.torch import load_file, save_file

    from _report import finish, machine_info
    from compress.evaluation import perplexity
    from compress.models import default_cache_dir, load_smollm2, token_slices

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    python = ensure_venv(args.venv.expanduser())
    versions = peer_versions(python)
    info = machine_info(args.threads, **{f"peer_{k}": v for k, v in versions.items()})
    dense_model, tok = load_smollm2()  # builds the safetensors cache the peer reads
    model_dir = default_cache_dir()
    calib, held = token_slices(tok, CALIB_TOKENS, EVAL_TOKENS, SEQ_LEN)
    dense = perplexity(dense_model, held)
    print(f"dense ppl {dense:.3f}", flush=True)
    del dense_model

    work = Path(tempfile.mkdtemp(prefix="llmcompressor-")) if args.keep_dir is None else args.keep_dir
    work.mkdir(parents=True, exist_ok=True)
    windows = work / "windows.safetensors"
    save_file({"calib": torch.cat(calib), "eval0": held[0].contiguous(), "eval": torch.cat(held)}, str(windows))
    rows = []
    for method in args.methods:
        for name in args.settings:
            bits, symmetric = SETTINGS[name]
            out = work / f"{method}-w{bits}g{GROUP_SIZE}{'sym' if symmetric else 'asym'}"
            record_file = out.parent / f"{out.name}.worker.json"
            if args.keep_dir is not None and record_file.is_file() and (out / "config.json").is_file():
                record = json.loads(record_file.read_text())  # finished in an earlier run into the same --keep-dir
            else:
                record = run_setting(python, model_dir, windows, out, method, bits, symmetric, args.threads)
            evaluated = run_setting(python, model_dir, windows, out, method, bits, symmetric, args.threads,
                                    mode="--worker-eval")
            ours = reload_here(out, held[0], load_file(str(work / f"{out.name}.logits.safetensors"))["logits"])
            rows.append({"setting": name, "bits": bits, "group_size": GROUP_SIZE, "symmetric": symmetric,
                         "method": method, "perplexity": evaluated["perplexity"], "dir_bytes": dir_bytes(out),
                         "weight_bytes": weight_bytes(out), "peak_rss_bytes": record["peak_rss_bytes"],
                         "oneshot_s": record["oneshot_s"],
                         "reload_logit_rel_diff": evaluated["reload_logit_rel_diff"], "reload_here": ours})
            here = (f"reloaded here: logits rel. diff {ours['logit_rel_diff']:.1e}" if "error" not in ours else
                    f"not loadable here: {ours['error'][:120]}")
            print(f"{name:<15} {method:<4} ppl {evaluated['perplexity']:8.3f} ({here})  "
                  f"{rows[-1]['dir_bytes'] / 1e6:6.1f} MB  peak RSS {record['peak_rss_bytes'] / 1e9:.2f} GB  oneshot "
                  f"{record['oneshot_s']:.0f} s", flush=True)
            report(args, info, versions, dense, rows)
    finish(info, start)
    report(args, info, versions, dense, rows)


def report(args: argparse.Namespace, info: dict[str, Any], versions: dict[str, str], dense: float,
           rows: list[dict[str, Any]]) -> None:
    """Write ``results/llmcompressor.{md,json}`` for the rows measured so far."""
    from _report import header, write_results

    table = ["| setting | method | held-out ppl | ppl / dense | dir MB | weights MB | peak RSS GB | oneshot s "
             "| reload logits rel. diff | loads here (ct 0.20) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    table += [f"| {r['setting']} | {r['method'].upper()} | {r['perplexity']:.3f} | {r['perplexity'] / dense:.2f} | "
              f"{r['dir_bytes'] / 1e6:.1f} | {r['weight_bytes'] / 1e6:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['oneshot_s']:.0f} | {r['reload_logit_rel_diff']:.1e} | {loads_here(r['reload_here'])} |"
              for r in rows]
    pivot = ["| setting | RTN | GPTQ |", "|---|---:|---:|"]
    for name in args.settings:
        cell = {r["method"]: f"{r['perplexity']:.2f}" for r in rows if r["setting"] == name}
        pivot.append(f"| {name} | {cell.get('rtn', '')} | {cell.get('gptq', '')} |")
    command = "python benchmarks/peer_llmcompressor.py" + (f" --threads {args.threads}" if args.threads != 1 else "")
    versions_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    md = (header("llm-compressor on SmolLM2-135M (RTN and GPTQ, the CLI's windows)", command, info,
                 note="oneshot seconds are on a loaded machine")
          + [f"Peer venv: {versions_line}. Calibration {CALIB_TOKENS // SEQ_LEN} x {SEQ_LEN} tokens, evaluation "
             f"{EVAL_TOKENS // SEQ_LEN} x {SEQ_LEN} held-out tokens of the Python docs (with the special tokens the "
             "tokenizer adds: none for SmolLM2), as "
             f"`tensornets compress`. Every block linear quantized (not the LM head), group size {GROUP_SIZE}; GPTQ "
             "with damping 0.01, actorder='static', block 128. Perplexity of the reloaded output directory, computed "
             "in the peer venv with the arithmetic of compress.evaluation.perplexity (float32 activations, NLL summed "
             "in float64): compressed-tensors 0.20 (ours) cannot load compressed-tensors 0.19's asymmetric "
             "checkpoints (packed zero points); 'here' says whether this venv loads each directory.", "",
             f"Dense perplexity {dense:.3f}.", ""] + pivot + ["", "## All numbers", ""] + table
          + ["", "Peak RSS is the peer subprocess's `ru_maxrss` (model load, oneshot, save). Directory bytes include "
             "config and tokenizer files; the peer keeps embeddings and norms in float32 (the dtype it loaded)."])
    write_results(RESULTS, "llmcompressor", md, {"machine": info, "peer_versions": versions, "dense": dense,
                                                 "calib_tokens": CALIB_TOKENS, "eval_tokens": EVAL_TOKENS,
                                                 "seq_len": SEQ_LEN, "rows": rows})


if __name__ == "__main__":
    main()
