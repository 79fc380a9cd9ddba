"""Does vLLM serve what ``tensornets compress --output-dir`` writes, with and without the EoRA adapter? (CUDA only)

Issue 11, point 3: the pack-quantized directory must load in vLLM, and ``out/eora-adapter`` must attach as a LoRA.
vLLM's wheel runs on CUDA only, so this script needs a CUDA GPU. For each ``--bits`` (default 3 and 4):

1. **build** (this venv): ``python -m compress.cli compress --method gptq --bits B --group-size 64 --eora-rank R``
   at small settings (``--calib-tokens``, ``--eval-tokens``) with ``--output-dir``; ``--model-dir`` skips it.
2. **reference** (this venv: transformers + compressed-tensors 0.20 + PEFT): ``AutoModelForCausalLM.from_pretrained``
   of the directory, then ``PeftModel.from_pretrained(model, dir/eora-adapter)``. On ``--windows`` held-out windows
   of ``--seq-len`` tokens (the CLI's evaluation windows, :func:`tensornets.models.token_slices`): the log-probability
   of every prompt token, the top-1 prediction at every position, and ``--new-tokens`` greedy tokens.
3. **vLLM** (a second interpreter, ``--vllm-python``): ``vllm.LLM(model=dir, quantization="compressed-tensors",
   enable_lora=True, max_lora_rank=64, dtype="bfloat16")``, the same windows as ``TokensPrompt``,
   ``SamplingParams(temperature=0, max_tokens=N, prompt_logprobs=1, ignore_eos=True)``, without and with
   ``LoRARequest("eora", 1, dir/eora-adapter)``. The worker imports nothing of this project. Its log says which
   mixed-precision kernel vLLM picked ("Using ... for CompressedTensorsWNA16"); the report quotes it.
4. **compare**: perplexity of the windows per engine, the largest and mean difference of the prompt log-probabilities,
   top-1 agreement and the greedy tokens' common prefix; ``results/vllm.{md,json}``. The checkpoints, the vLLM job
   and vLLM's log stay in ``--work-dir`` (default: a new temporary directory, printed).

Why two interpreters: vLLM 0.33 pins ``compressed-tensors==0.17.0`` and ``transformers<5.21``, this package needs
``compressed-tensors>=0.20.1,<0.21``: pip cannot install both in one environment. And compressed-tensors 0.17 packs
3-bit codes 10 to an int32 word with 2 bits of padding, 0.20 densely (``ceil(in · 3 / 32)`` words, codes straddling
words): our 3-bit checkpoints do not load through transformers + compressed-tensors 0.17 (vLLM's own loader reads the
dense layout; see ``results/vllm_audit.md``). ``--vllm-python`` is an interpreter with ``vllm`` installed; without it
the script uses ``--vllm-venv`` and, if that holds no vLLM, creates it with ``pip install vllm==0.33.*`` (needs the
internet).

    python benchmarks/check_vllm.py                                   # build 3- and 4-bit, run vLLM, write results
    python benchmarks/check_vllm.py --bits 3 --model-dir out --vllm-python /venvs/vllm/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_VENV = Path("~/.cache/tensornets-bench/vllm-venv").expanduser()
VLLM_PIN = "vllm==0.33.*"
#: vLLM's ``LoRAConfig.max_lora_rank`` accepts only these (vllm/config/lora.py: ``MaxLoRARanks``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the worker reports the mixed-precision kernel vLLM chose from this log line (compressed_tensors_wNa16.py)
KERNEL_LINE = re.compile(r"Using (\S+) for CompressedTensorsWNA16")
#: goal: perplexity of the windows under vLLM within this fraction of transformers' (bf16 kernels sum in other
#: orders; a packing-layout error gives perplexities in the hundreds or more)
PPL_TOLERANCE = 0.02
TOP1_NEED = 0.95


# ------------------------------------------------------------------------------------------ worker (vLLM venv)
def worker(args: argparse.Namespace) -> None:
    """Run vLLM on the windows of ``args.job`` (json) and write the log-probabilities and tokens to ``args.out``.

    Imports only vllm (and what it imports): this interpreter does not have our package.
    """
    try:
        import vllm
        from vllm import LLM, SamplingParams, TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise SystemExit(f"vllm is not importable from {sys.executable} ({err}); install it there: "
                         f"{sys.executable} -m pip install '{VLLM_PIN}'") from None
    job = json.loads(Path(args.job).read_text())
    windows: list[list[int]] = job["windows"]
    llm = LLM(model=job["model_dir"], quantization="compressed-tensors", dtype="bfloat16", enable_lora=True,
              max_lora_rank=job["max_lora_rank"], max_loras=1, max_model_len=job["max_model_len"], seed=0,
              gpu_memory_utilization=job["gpu_memory_utilization"], enforce_eager=job["enforce_eager"])
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], prompt_logprobs=1, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
    result: dict[str, Any] = {"vllm": vllm.__version__}
    for variant, lora in (("base", None), ("eora", LoRARequest("eora", 1, job["adapter_dir"]))):
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        rows = []
        for window, out in zip(windows, outputs):
            # prompt_logprobs[i] (i >= 1) maps token id -> Logprob for position i: the prompt token's own entry,
            # plus the rank-1 token; entry 0 is None (nothing predicts the first token)
            logprobs, top1 = [], []
            for pos in range(1, len(window)):
                entries = out.prompt_logprobs[pos]
                logprobs.append(entries[window[pos]].logprob)
                top1.append(next(t for t, lp in entries.items() if lp.rank == 1))
            rows.append({"logprobs": logprobs, "top1": top1, "greedy": list(out.outputs[0].token_ids)})
        result[variant] = rows
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ driver (our venv)
def require_cuda() -> None:
    """Stop with a message unless a CUDA GPU is visible: vLLM's pack-quantized kernels are CUDA-only."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("check_vllm.py needs a CUDA GPU: vLLM's wheel and its pack-quantized (WNA16) kernels run on "
                         "CUDA only, and torch.cuda.is_available() is False here. Run it on a CUDA machine; the "
                         "static audit of vLLM's loader is in benchmarks/results/vllm_audit.md")


def vllm_interpreter(args: argparse.Namespace) -> Path:
    """The Python that has vLLM: ``--vllm-python``, else ``--vllm-venv`` (created with :data:`VLLM_PIN` if needed)."""
    probe = ("import json, torch, vllm; "
             "print(json.dumps([vllm.__version__, torch.__version__, torch.cuda.is_available()]))")
    if args.vllm_python is not None:
        python = Path(args.vllm_python)
    else:
        python = Path(args.vllm_venv) / "bin" / "python"
        if not python.exists() or subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode:
            print(f"[vllm venv] creating {args.vllm_venv} with {VLLM_PIN} (once)", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(args.vllm_venv)], check=True)
            done = subprocess.run([str(python), "-m", "pip", "install", VLLM_PIN], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"pip install {VLLM_PIN!r} into {args.vllm_venv} failed (vLLM needs the internet "
                                 f"and a CUDA wheel); pass --vllm-python PATH of an interpreter that has vllm:\n"
                                 f"{done.stderr[-3000:]}")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"--vllm-python {python}: cannot import vllm ({last}); "
                         f"install it there with `{python} -m pip install '{VLLM_PIN}'`")
    version, torch_version, cuda = json.loads(done.stdout.strip().splitlines()[-1])
    if not cuda:
        raise SystemExit(f"{python} has vllm {version} but its torch {torch_version} sees no CUDA GPU")
    return python


def build(bits: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run our CLI (GPTQ ``bits`` g64 + EoRA) into ``out``; return its perplexities (``--json``) and wall time."""
    summary = out.parent / "cli_summary.json"
    cmd = [sys.executable, "-m", "compress.cli", "compress", "--method", "gptq", "--bits", str(bits),
           "--group-size", "64", "--eora-rank", str(args.eora_rank), "--calib-tokens", str(args.calib_tokens),
           "--eval-tokens", str(args.eval_tokens), "--device", args.build_device, "--output-dir", str(out),
           "--json", str(summary), "--no-progress", "--overwrite"]  # a rerun in the same --work-dir rebuilds it
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"command": " ".join(cmd[2:]), "cli_perplexity": json.loads(summary.read_text())["perplexity"],
            "build_s": time.perf_counter() - start}


def reference(model_dir: Path, windows: list[list[int]], new_tokens: int, device: str) -> dict[str, Any]:
    """transformers (+ PEFT for ``eora``): prompt log-probabilities, top-1 predictions and greedy tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(windows, device=device)
    mask = torch.ones_like(ids)  # no padding: every window has seq_len tokens
    # the directory's quantization_config has "dequantize": true, so the linears hold s (q - z) and PEFT can wrap them
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    result: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype)}
    for variant in ("base", "eora"):
        if variant == "eora":
            model = PeftModel.from_pretrained(model, str(model_dir / "eora-adapter")).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=model.config.eos_token_id)
        token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        result[variant] = [{"logprobs": token_logp[i].tolist(), "top1": logp[i, :-1].argmax(-1).tolist(),
                            "greedy": greedy[i, ids.shape[1]:].tolist()} for i in range(len(windows))]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def run_vllm(python: Path, model_dir: Path, windows: list[list[int]], args: argparse.Namespace,
             lora_rank: int, work: Path) -> tuple[dict[str, Any], list[str]]:
    """Run :func:`worker` in ``python``; return its results and the kernel lines of its log."""
    job = {"model_dir": str(model_dir), "adapter_dir": str(model_dir / "eora-adapter"), "windows": windows,
           "new_tokens": args.new_tokens, "max_lora_rank": lora_rank, "enforce_eager": args.enforce_eager,
           "max_model_len": args.seq_len + args.new_tokens, "gpu_memory_utilization": args.gpu_memory_utilization}
    job_file, out_file, log_file = work / "job.json", work / "vllm_out.json", work / "vllm.log"
    job_file.write_text(json.dumps(job))
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", "--job", str(job_file), "--out", str(out_file)]
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()).returncode
    text = log_file.read_text()
    if code:
        raise SystemExit(f"vLLM failed on {model_dir} (exit {code}); the end of its log ({log_file}):\n{text[-6000:]}")
    return json.loads(out_file.read_text()), sorted(set(KERNEL_LINE.findall(text)))


def compare(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, float]:
    """Perplexities of both engines, log-probability differences, top-1 agreement, greedy common prefix."""
    def ppl(rows):
        lps = [lp for r in rows for lp in r["logprobs"]]
        return math.exp(-sum(lps) / len(lps))

    diffs = [abs(a - b) for r, g in zip(ref, got) for a, b in zip(r["logprobs"], g["logprobs"])]
    top1 = [a == b for r, g in zip(ref, got) for a, b in zip(r["top1"], g["top1"])]
    prefix = []
    for r, g in zip(ref, got):
        n = 0
        while n < min(len(r["greedy"]), len(g["greedy"])) and r["greedy"][n] == g["greedy"][n]:
            n += 1
        prefix.append(n)
    return {"ppl_transformers": ppl(ref), "ppl_vllm": ppl(got), "ppl_ratio": ppl(got) / ppl(ref),
            "max_abs_dlogprob": max(diffs), "mean_abs_dlogprob": sum(diffs) / len(diffs),
            "top1_agreement": sum(top1) / len(top1), "greedy_common_prefix_mean": sum(prefix) / len(prefix),
            "greedy_tokens": len(ref[0]["greedy"])}


def lora_rank_for(adapter_dir: Path) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the adapter's ``r`` (and every ``rank_pattern``)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    r = max([config["r"], *config.get("rank_pattern", {}).values()])
    fitting = [k for k in VLLM_LORA_RANKS if k >= r]
    if not fitting:
        raise SystemExit(f"the EoRA adapter's rank {r} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}; "
                         "compress with a smaller --eora-rank")
    return fitting[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    require_cuda()
    python = vllm_interpreter(args)

    import compressed_tensors
    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer

    from _report import finish, goal, machine_info
    from tensornets.models import token_slices

    start = time.perf_counter()
    versions = json.loads(subprocess.run(
        [str(python), "-c", "import json, importlib.metadata as m; print(json.dumps({k: m.version(k) for k in "
         "('vllm', 'torch', 'transformers', 'compressed-tensors')}))"], capture_output=True, text=True,
        check=True).stdout)
    info = machine_info(threads=torch.get_num_threads(), transformers=transformers.__version__,
                        compressed_tensors=compressed_tensors.__version__, peft=peft.__version__)
    settings, goals = [], []
    # kept after the run: the checkpoints and vLLM's log are what one inspects when a goal fails
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="check_vllm_"))
    print(f"[work dir] {root}", flush=True)
    for bits in args.bits:
        work = root / f"{bits}bit"
        work.mkdir(parents=True, exist_ok=True)
        if args.model_dir is not None:
            model_dir, built = Path(args.model_dir).resolve(), {"command": f"given: --model-dir {args.model_dir}"}
        else:
            model_dir = work / "out"
            print(f"[build] {bits}-bit GPTQ g64 + EoRA r={args.eora_rank} -> {model_dir}", flush=True)
            built = build(bits, args, model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        _, held_out = token_slices(tok, 0, args.windows * args.seq_len, args.seq_len)
        windows = [w[0].tolist() for w in held_out]
        print(f"[reference] transformers {transformers.__version__} on {args.ref_device}", flush=True)
        ref = reference(model_dir, windows, args.new_tokens, args.ref_device)
        print(f"[vllm] {versions['vllm']} via {python}", flush=True)
        got, kernels = run_vllm(python, model_dir, windows, args, lora_rank_for(model_dir / "eora-adapter"),
                                work)
        rows = {variant: compare(ref[variant], got[variant]) for variant in ("base", "eora")}
        settings.append({"bits": bits, **built, "kernels": kernels, "reference_dtype": ref["dtype"], **rows})
        for variant, label in (("base", "pack-quantized"), ("eora", "pack-quantized + EoRA LoRA")):
            r = rows[variant]
            goals.append(goal(f"{bits}-bit {label}: |vLLM perplexity / transformers' - 1| <= {PPL_TOLERANCE}",
                              abs(r["ppl_ratio"] - 1), need=PPL_TOLERANCE, higher_is_better=False,
                              detail=f"{r['ppl_vllm']:.3f} vs {r['ppl_transformers']:.3f}"))
            goals.append(goal(f"{bits}-bit {label}: top-1 agreement", r["top1_agreement"], need=TOP1_NEED))
        goals.append(goal(f"{bits}-bit: EoRA lowers vLLM's perplexity (ratio eora / base <= 1)",
                          rows["eora"]["ppl_vllm"] / rows["base"]["ppl_vllm"], need=1.0, higher_is_better=False))
    finish(info, start)
    write_report(args, info, settings, goals, versions)


def write_report(args: argparse.Namespace, info: dict[str, Any], settings: list[dict[str, Any]],
                 goals: list[dict[str, Any]], versions: dict[str, str]) -> None:
    from _report import goal_section, header, write_results

    command = "python benchmarks/check_vllm.py " + " ".join(sys.argv[1:])
    md = header("vLLM serves tensornets' compressed checkpoints", command.strip(), info,
                versions=["transformers", "compressed_tensors", "peft"])
    md += [f"vLLM venv: {', '.join(f'{k} {v}' for k, v in versions.items())}. Windows: {args.windows} x "
           f"{args.seq_len} held-out tokens (the CLI's evaluation windows), {args.new_tokens} greedy tokens; "
           "transformers reference in the checkpoint's dtype on " + args.ref_device + ".", "",
           "| bits | variant | ppl transformers | ppl vLLM | ratio | max abs dlogprob | mean abs dlogprob "
           "| top-1 agree | greedy common prefix | vLLM kernel |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in settings:
        for variant in ("base", "eora"):
            r = s[variant]
            md.append(f"| {s['bits']} | {variant} | {r['ppl_transformers']:.3f} | {r['ppl_vllm']:.3f} | "
                      f"{r['ppl_ratio']:.4f} | {r['max_abs_dlogprob']:.3f} | {r['mean_abs_dlogprob']:.4f} | "
                      f"{r['top1_agreement']:.3f} | {r['greedy_common_prefix_mean']:.1f} / {r['greedy_tokens']} | "
                      f"{', '.join(s['kernels']) or '?'} |")
    md += [""] + [f"- {s['bits']}-bit build: `{s['command']}`" + (
        f", CLI perplexities {s['cli_perplexity']}" if s.get("cli_perplexity") else "") for s in settings]
    md += goal_section(goals, note="One value per goal (a single run).", digits=4)
    write_results(RESULTS, "vllm", md, {"machine": info, "vllm_venv": versions, "settings": settings,
                                        "goals": goals, "args": vars(args)})
    print("\n".join(md))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="GPTQ bits of the checkpoints to build")
    parser.add_argument("--model-dir", default=None,
                        help="an existing `tensornets compress --output-dir` directory to check instead of building "
                             "(with one --bits value)")
    parser.add_argument("--eora-rank", type=int, default=64, help="EoRA rank of the build")
    parser.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens of the build")
    parser.add_argument("--eval-tokens", type=int, default=512, help="evaluation tokens of the build's own report")
    parser.add_argument("--build-device", default="cuda", help="--device of the build (cpu works, slower)")
    parser.add_argument("--ref-device", default="cuda", help="device of the transformers reference")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows compared")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="tokens per window, BOS included where the tokenizer adds one")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per window")
    parser.add_argument("--vllm-python", default=None, help="a Python interpreter with vllm installed")
    parser.add_argument("--vllm-venv", default=str(DEFAULT_VENV),
                        help=f"venv used (and created with {VLLM_PIN}) when --vllm-python is not given")
    parser.add_argument("--work-dir", default=None,
                        help="where the checkpoints, vLLM's job and log go (kept; default: a new temporary directory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_dir is not None and len(args.bits) != 1:
        parser.error("--model-dir checks one directory: pass the one --bits value it was built with")
    if args.windows < 1 or args.seq_len < 2 or args.new_tokens < 1:
        parser.error("--windows and --new-tokens must be >= 1 and --seq-len >= 2")
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report, when run as a script from anywhere
    main()
