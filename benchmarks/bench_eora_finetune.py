"""Does starting from the EoRA residual help fine-tuning a compressed model? SmolLM2, RTN 3-bit g64, every block linear.

EoRA (Liu et al. 2024) proposes its compensation as the initialization for fine-tuning the compressed model. Here the
compressed model is what ``tensornets compress`` makes by default (RTN 3 bits, group 64, every block linear, EoRA
r=64 calibrated on 16 x 256 tokens of the Python docs: the CLI's data), then fine-tuned for K optimizer steps of
causal-LM loss on a training slice of the same docs, with the quantized base frozen:

- **LoRA, zero init** (PEFT's default, ``B = 0``): starts at the bare RTN-3 model;
- **LoRA, EoRA init** (:meth:`compress.eora.EoraAdapter.as_peft_init`): starts at the compensated model;
- **FLoRA, EoRA init** (:func:`adapters.init_from_lowrank`, exact at ``r = 64``);
- our adapters with their defaults, zero init: LoTR, FLoRA, LoRETTA-rep, MoS (each at r=64 where r is a size).

Text (the pydoc token stream of :func:`compress.models.token_slices`, N tokens): calibration is
``stream[0 : 16·256]``, held-out evaluation ``stream[N/2 : ...]`` (the CLI's windows, ``--eval-seqs`` of them), and
training reads consecutive ``--seq-len`` windows of ``stream[16·256 : N/2]``, so the three never overlap. Every
method sees the same batches in the same order, AdamW at one learning rate (``--lr``, not tuned per method).
Prints and writes held-out perplexity at each K of ``--steps`` to ``results/eora_finetune.{md,json}``.

    python benchmarks/bench_eora_finetune.py --steps 0 10 25 50
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_report.py, however the script is run
import adapters  # noqa: E402
from _report import finish, goal, goal_section, header, machine_info, write_results  # noqa: E402
from compress import CompressionConfig, collect_activation_stats, compress_model, eora_compensate  # noqa: E402
from compress.evaluation import perplexity  # noqa: E402
from compress.models import load_smollm2, pydoc_text, token_slices  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CALIB_SEQS, CALIB_LEN = 16, 256  # the CLI's calibration data


def training_windows(tok, count: int, seq_len: int) -> torch.Tensor:
    """``(count, seq_len)`` consecutive windows of the pydoc stream between the calibration and evaluation slices."""
    stream = torch.tensor(tok(pydoc_text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    start, stop = CALIB_SEQS * CALIB_LEN, stream.numel() // 2
    if start + count * seq_len > stop:
        raise ValueError(f"{count} training windows of {seq_len} tokens need {count * seq_len} tokens; the training "
                         f"slice holds {stop - start}: pass fewer --steps or a smaller --batch / --seq-len")
    return stream[start : start + count * seq_len].view(count, seq_len)


def methods(eora, rank: int) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Name -> function turning a copy of the quantized model into the model to fine-tune."""
    targets = sorted(eora.factors)

    def flora_eora(base):
        model = get_peft_model(base, adapters.FloraConfig(r=rank, target_modules=targets))
        return adapters.init_from_lowrank(model, eora.factors)

    return {
        "LoRA, zero init": lambda base: get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)),
        "LoRA, EoRA init": lambda base: eora.as_peft_init(base),
        "FLoRA, EoRA init": flora_eora,
        "LoTR": lambda base: get_peft_model(base, adapters.LoTRConfig(r=rank, target_modules=targets)),
        "FLoRA": lambda base: get_peft_model(base, adapters.FloraConfig(r=rank, target_modules=targets)),
        "LoRETTA-rep": lambda base: get_peft_model(base, adapters.LoRETTARepConfig(r=rank, target_modules=targets)),
        "MoS": lambda base: get_peft_model(base, adapters.MoSConfig(r=rank, v=rank // 4, p=2, c=4,
                                                                    target_modules=targets)),
    }


def fine_tune(model: nn.Module, train: torch.Tensor, batch: int, steps: list[int], lr: float, held) -> dict:
    """Held-out perplexity after each K in ``steps`` (K = 0 evaluated too), trainable parameters, seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    row = {"trainable": sum(p.numel() for p in params), "perplexity": {}, "train_loss": []}
    done, step_seconds = 0, []
    for k in sorted(steps):
        model.train()
        while done < k:
            ids = train[done * batch : (done + 1) * batch]
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t)
            row["train_loss"].append(float(loss.detach()))
            done += 1
        row["perplexity"][k] = perplexity(model, held)
        print(f"    K={k:<4d} ppl {row['perplexity'][k]:8.3f}  ({sum(step_seconds):.0f} s training)", flush=True)
    row["s_per_step"] = sum(step_seconds) / len(step_seconds) if step_seconds else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 25, 50])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the method names (default: all)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-seqs", type=int, default=16, help="held-out windows of 256 tokens (CLI: 16)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stem", default="eora_finetune", help="results/<stem>.{md,json}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)

    model, tok = load_smollm2()
    calib, held = token_slices(tok, CALIB_SEQS * CALIB_LEN, args.eval_seqs * CALIB_LEN, CALIB_LEN)
    train = training_windows(tok, max(args.steps) * args.batch, args.seq_len)
    stats = collect_activation_stats(model, calib, target_modules=BLOCK_LINEARS)
    config = CompressionConfig(method="rtn", bits=3, group_size=64, target_modules=BLOCK_LINEARS)
    quantized = compress_model(model, config, stats).model
    eora = eora_compensate(model, quantized, stats, rank=args.rank)
    dense_ppl = perplexity(model, held)
    del model, stats
    gc.collect()
    print(f"dense {dense_ppl:.3f}; {len(eora.factors)} layers quantized and compensated", flush=True)

    build = methods(eora, args.rank)
    chosen = args.methods or list(build)
    unknown = sorted(set(chosen) - set(build))
    if unknown:
        parser.error(f"--methods {unknown} unknown; choose from {list(build)}")
    rows = {}
    for name in chosen:
        print(f"{name}", flush=True)
        torch.manual_seed(0)  # the same adapter init draws whatever ran before
        tuned = build[name](copy.deepcopy(quantized))
        rows[name] = fine_tune(tuned, train, args.batch, args.steps, args.lr, held)
        del tuned
        gc.collect()

    steps = sorted(args.steps)
    goals = []
    if {"LoRA, zero init", "LoRA, EoRA init"} <= set(rows):
        zero, init = rows["LoRA, zero init"]["perplexity"], rows["LoRA, EoRA init"]["perplexity"]
        ratios = {k: zero[k] / init[k] for k in steps}
        worst = min(ratios, key=ratios.get)
        goals.append(goal("EoRA-init reaches a lower perplexity than zero-init at every step count measured "
                          "(min over K of zero-init ppl / EoRA-init ppl > 1)", value=ratios[worst], need=1.0 + 1e-9,
                          detail=f"worst at K={worst}: {zero[worst]:.2f} vs {init[worst]:.2f}"))
    finish(info, start)

    head = "| method | trainable | " + " | ".join(f"ppl K={k}" for k in steps) + " | s / step |"
    table = [head, "|---|---:|" + "---:|" * len(steps) + "---:|"]
    for name, row in rows.items():
        ppl = " | ".join(f"{row['perplexity'][k]:.2f}" for k in steps)
        table.append(f"| {name} | {row['trainable']:,} | {ppl} | {row['s_per_step']:.1f} |")
    command = (f"python benchmarks/bench_eora_finetune.py --steps {' '.join(map(str, steps))} --rank {args.rank} "
               f"--batch {args.batch} --seq-len {args.seq_len} --eval-seqs {args.eval_seqs} --lr {args.lr:g}"
               + (f" --methods {' '.join(repr(m) for m in chosen)}" if args.methods else "")
               + (f" --stem {args.stem}" if args.stem != "eora_finetune" else "") + f" --threads {args.threads}")
    note = ("s / step is wall time of forward + backward + AdamW on a shared, loaded machine: compare within a run "
            "only")
    md = (header(f"Fine-tuning SmolLM2 RTN-3 g64 from zero vs from the EoRA residual (r={args.rank})", command, info,
                 note=note)
          + ["", f"Dense perplexity {dense_ppl:.3f} on {args.eval_seqs} x {CALIB_LEN} held-out tokens. Training: "
             f"{args.batch} x {args.seq_len} tokens per step, AdamW lr {args.lr:g} for every method, quantized base "
             "frozen. K = 0 is the starting model: the bare RTN-3 model for zero-init adapters, the compensated one "
             "for EoRA init.", ""]
          + table + goal_section(goals))
    payload = {"machine": info, "args": vars(args), "dense": dense_ppl,
               "rows": {n: {**r, "perplexity": {str(k): v for k, v in r["perplexity"].items()}} for n, r in rows.items()},
               "goals": goals}
    md_path, _ = write_results(RESULTS, args.stem, md, payload)
    print("\n".join(table + goal_section(goals)))
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
