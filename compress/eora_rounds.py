"""Fit a compressed weight and its EoRA residual together, by alternating the compressor and EoRA.

EoRA (:mod:`compress.eora`) fixes the compressed weight ``W_c = Q(W)`` and finds the best residual for it. Here
both are chosen for each other, by block coordinate descent on the calibration objective

.. math::

    \\min_{W_c \\in \\mathcal{Q},\\ \\operatorname{rank}(BA) \\le r} \\| (W - W_c - BA) X \\|_F ,

``W: (out, in)``, ``X``: the layer's calibration inputs, ``𝒬``: the weights the compressor can produce (a grid, a
sparsity pattern):

- round 0 is plain compression and EoRA: ``W_c⁽⁰⁾ = Q(W)``, ``B⁽⁰⁾A⁽⁰⁾ = EoRA(W − W_c⁽⁰⁾)``;
- round ``k ≥ 1`` compresses the weight with the residual taken out, ``W_c⁽ᵏ⁾ = Q(W − B⁽ᵏ⁻¹⁾A⁽ᵏ⁻¹⁾)``, and refits
  ``B⁽ᵏ⁾A⁽ᵏ⁾ = EoRA(W − W_c⁽ᵏ⁾)``.

The EoRA step is the exact minimiser for a fixed ``W_c`` (the whitened SVD); the compression step is the
compressor's own (GPTQ and SparseGPT minimise the same output error approximately, RTN the weight error), so a round
can also make a layer worse: each layer keeps the round with the smallest objective, which is therefore never above
plain EoRA's on the calibration data. Taking the residual's few large directions out before quantizing narrows the
range each group's grid has to cover, which is where the gain comes from. The same alternation, with other weightings,
is CALDERA's (Saha et al. 2024, ``W ≈ Q + LR``) and LQ-LoRA's (Guo et al. 2023) initialisation.

The compressed weight is then fitted *with* its residual: used alone it is usually worse than ``Q(W)``, so serve the
two together (the exported model directory and its ``eora-adapter``). Measured gains: ``benchmarks/results/quality.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from compress import lowrank as lr
from compress.calibration import LayerStats
from compress.compressors import LayerJob
from compress.eora import EORA_METHODS, EoraAdapter, EoraLayerReport, eora_factors
from compress.surgery import CompressionReport
from compress.targets import dense_weight, set_dense_weight


def check_rounds(rounds: int, *, eora_rank: int, sequential: bool, compressor_kind: str, method: str) -> None:
    """Raise ``ValueError`` naming ``eora_rounds`` unless the rounds can run: an int ``>= 0``; when ``> 0`` also a
    residual (``eora_rank > 0``), independent EoRA, and a compressor that keeps dense weights."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"eora_rounds={rounds!r} must be an int >= 0 (0: plain EoRA on the compressed weights)")
    if not rounds:
        return
    if not eora_rank:
        raise ValueError(f"eora_rounds={rounds} alternates the compressor with an EoRA residual: set eora_rank > 0")
    if sequential:
        raise ValueError(f"eora_rounds={rounds} refits independent EoRA residuals; it is not combined with "
                         "eora_sequential=True: pass one of the two")
    if compressor_kind != "dense":
        raise ValueError(f"eora_rounds={rounds} recompresses W - BA; method={method!r} replaces the layer by a "
                         "factorized one: use a quantizer or pruner (rtn, gptq, sparsegpt, 2:4, magnitude) or "
                         "eora_rounds=0")


def refine_rounds(
    original: nn.Module,
    compressed: nn.Module,
    report: CompressionReport,
    adapter: EoraAdapter,
    compress_stats: Mapping[str, LayerStats] | None,
    eora_stats: Mapping[str, LayerStats],
    rounds: int,
    *,
    ridge: float = 0.0,
    storage_dtype: torch.dtype | None = None,
) -> tuple[CompressionReport, EoraAdapter]:
    """Alternate compression and EoRA ``rounds`` times on every layer of ``report`` (see the module docstring).

    Parameters
    ----------
    original : nn.Module
        The module before compression (the whole model or one decoder block): ``W`` of each layer.
    compressed : nn.Module
        The same module compressed by ``report.config``'s dense compressor; its layers' weights are overwritten with
        each layer's best round.
    report : CompressionReport
        What compressed it (layer names relative to both modules, the config, the quantized forms if any, unpacked
        :class:`~compress.quantized.QuantizedWeight`).
    adapter : EoraAdapter
        Independent EoRA residuals of those layers on ``compressed`` (round 0), from ``eora_stats``.
    compress_stats : mapping of LayerStats or None
        The statistics the compressor reads (``None`` for methods without statistics).
    eora_stats : mapping of LayerStats
        The statistics EoRA was fitted on; the objective ``‖(W − W_c − BA) X‖_F`` of each round is measured on them.
    rounds : int
        Recompressions per layer, ``>= 1``.
    ridge : float
        EoRA's whitening ridge (as for the round-0 adapter).
    storage_dtype : torch.dtype, optional
        Dtype the compressed weights are stored in; each round's weight is rounded to it before its residual is
        fitted, as the stored model will be. Default: each layer's current dtype.

    Returns
    -------
    tuple of CompressionReport and EoraAdapter
        The report with the chosen rounds' quantized forms and per-layer rows (errors of ``W_c`` alone against
        ``W``, the output error on ``compress_stats``; ``ranks`` says which round was kept), and the adapter with
        their residuals (float32, CPU; report rows: ``error_before`` = ``W_c`` alone, ``error_after`` = with the
        residual).
    """
    check_rounds(rounds, eora_rank=adapter.rank, sequential=False, compressor_kind=report.config.compressor.kind,
                 method=report.config.method)
    if rounds == 0:
        return report, adapter
    if adapter.method not in EORA_METHODS:
        raise ValueError(f"adapter.method={adapter.method!r}: rounds refit independent residuals; pass the adapter of "
                         f"eora_compensate(..., method in {tuple(EORA_METHODS)}) on the compressed module")
    compressor, config = report.config.compressor, report.config
    method = adapter.method
    layers, quantized, factors, rows = [], dict(report.quantized), dict(adapter.factors), []
    for row in report.layers:
        name = row.name
        module = compressed.get_submodule(name)
        dtype = storage_dtype or module.weight.dtype
        W = dense_weight(original.get_submodule(name)).to(torch.float64)
        st = eora_stats[name].to(W.device)
        job_stats = None if compress_stats is None else compress_stats[name].to(W.device)
        B, A = (f.to(W.device, torch.float64) for f in adapter.factors[name])
        best_Wc = dense_weight(module).to(torch.float64)
        best = (lr.relative_output_error(W, best_Wc + B @ A, st), 0, best_Wc, B, A, quantized.get(name))
        for k in range(1, rounds + 1):
            job = LayerJob(name, module, (W - B @ A).to(module.weight.dtype), config, job_stats)
            result = compressor.compress_layer(job)
            Wc = result.weight.to(dtype).to(torch.float64)
            B, A = eora_factors(W - Wc, st, adapter.rank, method=method, ridge=ridge, name=name)
            error = lr.relative_output_error(W, Wc + B @ A, st)
            if error < best[0]:
                best = (error, k, Wc, B, A, result.quantized)
        error, k, Wc, B, A, q = best
        set_dense_weight(module, Wc.to(module.weight.dtype))
        if q is not None:
            quantized[name] = q
        factors[name] = (B.float().cpu(), A.float().cpu())
        layers.append(dataclasses.replace(
            row, ranks=f"{row.ranks}, EoRA round {k} of {rounds}", rel_weight_error=lr.relative_weight_error(W, Wc),
            rel_output_error=None if job_stats is None else lr.relative_output_error(W, Wc, job_stats)))
        rows.append(EoraLayerReport(name, tuple(W.shape), adapter.rank, lr.relative_output_error(W, Wc, st), error))
    return (CompressionReport(compressed, layers, config, quantized),
            EoraAdapter(factors, dict(adapter.kinds), adapter.rank, f"{method}-rounds{rounds}", rows,
                        dict(adapter.conv_kernels)))
