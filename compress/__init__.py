"""Model compression with activation-aware low-rank / tensor factorizations, and EoRA compensation.

>>> from compress import CompressionConfig, compress_model, collect_activation_stats, eora_compensate, refine_rounds
>>> mlp = ["gate_proj", "up_proj", "down_proj"]
>>> stats = collect_activation_stats(model, calib_batches, target_modules=mlp)
>>> report = compress_model(model, CompressionConfig(method="gptq", bits=3, group_size=64, target_modules=mlp), stats)
>>> print(report)                      # per-layer params before/after, bits, weight and output errors
>>> eora = eora_compensate(model, report.model, stats, rank=32)
>>> eora.save_pretrained("eora-adapter")   # PeftModel.from_pretrained(report.model, "eora-adapter")
>>> report, eora = refine_rounds(model, report.model, report, eora, stats, stats, rounds=4)  # fit both together

Factorizing methods (``CompressionConfig(method="whitened_svd", keep=0.8)``, tensor formats) replace the layers;
their residual applies in memory (``eora.apply``) or folds into low-rank layers (``eora.merge``), and the model
saves with :func:`save_compressed` (quantized layers bit-packed with ``quantized=report.quantized``, for any
``nn.Module``; :func:`compress.export.save_hf_directory` writes what transformers and vLLM load themselves). ``keep`` is
always the fraction of parameters kept.
"""

from compress.budget import allocate_ranks
from compress.calibration import ActivationStats, LayerStats, collect_activation_stats
from compress.compressors import Compressor, available_compressors, get_compressor, register
from compress.config import CompressionConfig
from compress.eora import (
    CompensatedLayer,
    EoraAdapter,
    eora_compensate,
    eora_compensate_pairs,
    eora_factors,
)
from compress.sequential_eora import SequentialFit, select_sequential_factors, sequential_eora_factors
from compress.lowrank import lowrank_factors, rank_for_keep, relative_output_error
from compress.sources import prune_2_4, prune_magnitude, rtn_quantize, rtn_quantize_weight
from compress.gptq import gptq_quantize
from compress.sparsegpt import SparseWeight, sparsegpt_prune
from compress import factorizing  # noqa: F401  (importing it registers svd, asvd, whitened_svd and the tensor formats)
from compress.surgery import CompressionReport, LayerReport, compress_model
from compress.targets import find_targets
from compress.checkpoint import load_compressed, load_compressed_directory, save_compressed
from compress.pipeline import PipelineResult, compress_blocks, disk_offload_map, find_decoder_blocks
from compress.eora_rounds import refine_rounds
from compress.memory import return_freed_memory

__all__ = [
    "ActivationStats",
    "LayerStats",
    "collect_activation_stats",
    "CompressionConfig",
    "Compressor",
    "register",
    "get_compressor",
    "available_compressors",
    "compress_model",
    "compress_blocks",
    "PipelineResult",
    "disk_offload_map",
    "find_decoder_blocks",
    "CompressionReport",
    "LayerReport",
    "find_targets",
    "save_compressed",
    "load_compressed",
    "load_compressed_directory",
    "eora_compensate",
    "eora_compensate_pairs",
    "eora_factors",
    "sequential_eora_factors",
    "select_sequential_factors",
    "refine_rounds",
    "SequentialFit",
    "EoraAdapter",
    "CompensatedLayer",
    "lowrank_factors",
    "rank_for_keep",
    "relative_output_error",
    "allocate_ranks",
    "rtn_quantize",
    "rtn_quantize_weight",
    "gptq_quantize",
    "sparsegpt_prune",
    "SparseWeight",
    "prune_2_4",
    "prune_magnitude",
    "return_freed_memory",
]
