"""Factorizing compressors: each target layer is replaced by a factorized one of fewer parameters.

- ``svd``, ``asvd``, ``whitened_svd`` (SVD-LLM): truncated SVD of ``W S`` under an input weighting ``S``
  (:mod:`compress.lowrank`), giving a rank-``r`` :class:`tensornets.FactorizedLinear` (or low-rank
  :class:`tensornets.FactorizedConv2d`);
- ``tucker``, ``tt``, ``mpo``, ``btt``, ``cp``: :func:`tensornets.decompose` of the weight (``whiten=True``: Tucker-2 of the
  whitened weight, the inverse folded into the input factor).

Sized by exactly one of ``keep`` (fraction of parameters kept), ``rank`` or ``energy``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from compress import lowrank as lr
from compress.compressors import Compressor, LayerJob, LayerResult, register
from compress.config import CompressionConfig
from compress.targets import weight_parameters
from tensornets import Factorization, FactorizedConv2d, FactorizedLinear, decompose, factorize, get_format

#: low-rank methods -> the input weighting of :func:`compress.lowrank.input_scaling`
LOWRANK_SCALINGS = {"svd": "svd", "asvd": "asvd", "whitened_svd": "whitened"}
#: tensor formats of :func:`tensornets.decompose`
TENSOR_FORMATS = ("tucker", "tt", "mpo", "btt", "cp")


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def lowrank_module(module: nn.Module, B: torch.Tensor, A: torch.Tensor) -> nn.Module:
    """Drop-in replacement of a dense layer by ``W ≈ B A`` (``B: (out, r)``, ``A: (r, in)``), bias kept.

    ``nn.Linear`` / ``Conv1D`` become a :class:`tensornets.FactorizedLinear` over a ``LowRank`` factorization
    (``U = B``, ``V = A``); ``nn.Conv2d`` becomes a low-rank :class:`tensornets.FactorizedConv2d` (a ``kh × kw`` conv
    to ``r`` channels, then a 1×1 conv).
    """
    ref = module.weight
    out_f, r = B.shape
    B = B.to(ref.device, ref.dtype)
    A = A.to(ref.device, ref.dtype)
    if isinstance(module, nn.Conv2d):
        new = FactorizedConv2d(
            module.in_channels, module.out_channels, module.kernel_size, rank=r, format="lowrank",
            stride=module.stride, padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
        ).to(ref.device, ref.dtype)
        with torch.no_grad():
            new.factorization.V.copy_(A)
            new.factorization.U.copy_(B)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new
    fact = get_format("lowrank").empty(A.shape[1], out_f, in_modes=(A.shape[1],), out_modes=(out_f,), ranks=(r,),
                                       dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        fact.U.copy_(B)
        fact.V.copy_(A)
    return FactorizedLinear(fact, _bias(module))


def _rank_of(config: CompressionConfig, out_f: int, in_f: int, sq: torch.Tensor | None, name: str) -> int:
    if config.rank is not None:
        lr.check_rank(config.rank, out_f, in_f, name)
        return config.rank
    if config.keep is not None:
        rank = lr.rank_for_keep(out_f, in_f, config.keep)
        if rank < 1:
            raise ValueError(
                f"keep={config.keep} leaves rank 0 for layer {name!r} of shape ({out_f}, {in_f}); one rank costs "
                f"{(out_f + in_f) / (out_f * in_f):.4f} of its parameters: raise keep"
            )
        return rank
    return lr.rank_for_energy(sq, config.energy)


def check_lowrank_layer(name: str, module: nn.Module, shape: tuple[int, int], config: CompressionConfig) -> None:
    """``Compressor.check_layer`` of the low-rank methods: ``rank`` fits the layer, and ``keep`` leaves rank >= 1
    (per layer; ``allocation='global'`` spreads ``keep`` over the model and checks it there)."""
    if config.rank is not None or (config.keep is not None and config.allocation == "layer"):
        _rank_of(config, *shape, None, name)


def _scaling(job: LayerJob, kind: str) -> lr.InputScaling:
    c = job.config
    return lr.input_scaling(kind, job.stats, alpha=c.alpha, ridge=c.ridge, eps=c.eps, n=job.weight.shape[1],
                            device=job.weight.device)


def compress_lowrank(job: LayerJob) -> LayerResult:
    """Rank-``r`` factors ``B A`` of ``W`` minimising ``‖(W − BA) S‖_F`` (``S`` by the method), as a factorized layer."""
    W = job.weight
    scaling = _scaling(job, LOWRANK_SCALINGS[job.config.method])
    U, s, Vh = lr.scaled_svd(W, scaling)
    rank = job.rank if job.rank is not None else _rank_of(job.config, *W.shape, s.square(), job.name)
    B, A = lr.factors_from_svd(U, s, Vh, rank, scaling)
    return LayerResult(description=str(rank), module=lowrank_module(job.module, B, A))


def lowrank_spectrum(job: LayerJob) -> torch.Tensor:
    """Squared singular values of the weighted weight ``W S`` (what global rank allocation compares)."""
    return torch.linalg.svdvals(_scaling(job, LOWRANK_SCALINGS[job.config.method]).scale(job.weight.to(torch.float64))).square()


def _whitened_modes(out_f: int, in_f: int, config: CompressionConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(out_modes, (in_f,))`` of the whitened Tucker-2: the input stays one mode, the whitening's factor."""
    if config.modes is not None:
        out_modes, in_modes = tuple(config.modes[0]), tuple(config.modes[1])
        if len(in_modes) != 1:
            raise ValueError(
                f"whiten=True needs one input mode (Tucker-2); got modes[1]={in_modes}: pass modes=(out_modes, ({in_f},))"
            )
        return out_modes, in_modes
    return (factorize(out_f, config.num_cores) if config.num_cores else (out_f,)), (in_f,)


def _whitened_tucker(module: nn.Module, W: torch.Tensor, scaling: lr.InputScaling, config: CompressionConfig) -> nn.Module:
    """Tucker-2 of the whitened weight ``W S`` with ``S⁺`` folded into the single input factor."""
    out_f, in_f = W.shape
    out_modes, in_modes = _whitened_modes(out_f, in_f, config)
    tucker = get_format("tucker")
    rank = config.rank
    if config.keep is not None:  # of the layer's parameters: W S may have fewer columns than W
        rank = tucker.rank_for_keep(config.keep, in_f, out_f, in_modes, out_modes)
    Ws = scaling.scale(W.to(torch.float64))
    if rank is not None:
        # rank-deficient statistics (fewer calibration rows than inputs) leave W S fewer columns than the layer has
        # inputs; ranks beyond its full ranks add nothing (whitened_svd zero-pads them), so they are capped there
        rank = min(rank, max(tucker.full_ranks((Ws.shape[1],), out_modes)))
    fs = decompose(Ws, "tucker", rank=rank, energy=config.energy, modes=(out_modes, (Ws.shape[1],)),
                   **(config.decompose_options or {}))
    fact = tucker.empty(in_f, out_f, in_modes=(in_f,), out_modes=out_modes, ranks=fs.ranks,
                        dtype=module.weight.dtype, device=module.weight.device)
    with torch.no_grad():
        fact.core.copy_(fs.core)
        for dst, src in zip(fact.out_factors, fs.out_factors):
            dst.copy_(src)
        fact.in_factors[0].copy_(scaling.unscale(fs.in_factors[0].T).T)
    return FactorizedLinear(fact, _bias(module))


def _size(config: CompressionConfig) -> dict:
    return {k: v for k, v in (("rank", config.rank), ("energy", config.energy), ("keep", config.keep)) if v is not None}


def check_tensor_layer(name: str, module: nn.Module, shape: tuple[int, int], config: CompressionConfig) -> None:
    """``Compressor.check_layer`` of the tensor formats: the layer's sizes split into the format's modes and the
    requested rank / keep fits them (checked without decomposing); a Conv2d takes Tucker-2 only, and not whitened."""
    out_f, in_f = shape
    if isinstance(module, nn.Conv2d):
        if config.whiten:
            raise ValueError(
                f"layer {name!r}: whiten=True needs the whitened input to be one factor, but a Conv2d's Tucker-2 input "
                "factor acts on channels only; use method='whitened_svd' for convolutions"
            )
        if config.method != "tucker":
            raise ValueError(
                f"layer {name!r} is a Conv2d: method={config.method!r} applies to linear layers; use 'tucker' "
                "(Tucker-2 on the channels) or a low-rank method, or exclude it"
            )
    try:
        if isinstance(module, nn.Conv2d):
            FactorizedConv2d.resolve_structure("tucker", module.in_channels, module.out_channels, module.kernel_size,
                                               **_size(config))
        elif config.whiten:
            get_format("tucker").resolve_structure(in_f, out_f, modes=_whitened_modes(out_f, in_f, config),
                                                   **_size(config))
        else:
            get_format(config.method).resolve_structure(in_f, out_f, num_cores=config.num_cores, modes=config.modes,
                                                        **_size(config))
    except ValueError as err:
        raise ValueError(f"layer {name!r} of shape {shape}: {err}") from None


def compress_tensor(job: LayerJob) -> LayerResult:
    """Tensor-format decomposition of the weight (``whiten=True``: whitened Tucker-2) as a factorized layer."""
    module, W, config, name = job.module, job.weight, job.config, job.name
    size = _size(config)
    check_tensor_layer(name, module, tuple(W.shape), config)
    if config.whiten:
        new = _whitened_tucker(module, W, _scaling(job, "whitened"), config)
    elif isinstance(module, nn.Conv2d):
        new = FactorizedConv2d.from_conv(module, "tucker", **size, **(config.decompose_options or {}))
    else:
        fact = decompose(W, config.method, num_cores=config.num_cores, modes=config.modes, svd=config.svd,
                         seed=config.seed, **size, **(config.decompose_options or {}))
        new = FactorizedLinear(fact.to(module.weight.dtype), _bias(module))
    ranks = getattr(new, "factorization", new).ranks
    return LayerResult(description=",".join(map(str, ranks)), module=new)


def _parameters(module: nn.Module, config: CompressionConfig) -> int:
    return weight_parameters(module)


def _storage_bits(shape: tuple[int, int], parameters: int, config: CompressionConfig) -> float:
    return parameters * 16.0


def _label(config: CompressionConfig) -> str:
    size = next(f"{k} {v}" for k, v in (("keep", config.keep), ("rank", config.rank), ("energy", config.energy))
                if v is not None)
    return f"{config.method}{' (whitened)' if config.whiten else ''}, {size}"


_HELP = {
    "svd": "plain truncated SVD", "asvd": "activation-scaled SVD (ASVD)", "whitened_svd": "whitened SVD (SVD-LLM)",
    "tucker": "Tucker decomposition", "tt": "tensor train", "mpo": "matrix product operator (TT-matrix)",
    "btt": "block tensor train", "cp": "CP / PARAFAC (ALS)",
}
#: the options each scaling of the low-rank methods reads (lowrank.input_scaling); their SVD is always the full one
_LOWRANK_READS = {"svd": frozenset(), "asvd": frozenset({"alpha", "eps"}), "whitened": frozenset({"ridge", "eps"})}
for _name, _kind in LOWRANK_SCALINGS.items():
    register(Compressor(
        name=_name, kind="factorized", compress_layer=compress_lowrank, needs_stats=_kind != "svd",
        parameters=_parameters, storage_bits=_storage_bits, label=_label, spectrum=lowrank_spectrum, help=_HELP[_name],
        reads=_LOWRANK_READS[_kind], check_layer=check_lowrank_layer,
    ))


def _tensor_reads(name: str) -> tuple[frozenset[str], dict[str, str]]:
    """``(reads, reads_only_with)`` of a tensor format, from its class: its modes; the randomized SVD of the formats
    that run large SVDs (its seed only with it, unless the decomposition is seeded itself, as CP's ALS); Tucker's
    whitening (see _whitened_tucker: a single input factor absorbs it) with the whitening's ridge and cutoff."""
    fmt = get_format(name)
    reads, conditions = {"num_cores", "modes"}, {}
    if fmt.supports_randomized_svd:
        reads |= {"svd", "seed"}
        conditions["seed"] = "svd"
    if fmt.seeded_decomposition:
        reads.add("seed")
        conditions.pop("seed", None)
    if name == "tucker":
        reads |= {"whiten", "ridge", "eps"}
        conditions.update(ridge="whiten", eps="whiten")
    if decompose_option_names(name):
        reads.add("decompose_options")
    return frozenset(reads), conditions


def decompose_option_names(name: str) -> frozenset[str]:
    """The format-specific keyword options of ``get_format(name).from_dense``: the keywords its ``_decompose`` takes
    beyond the base class's."""
    shared = inspect.signature(Factorization._decompose).parameters
    return frozenset(inspect.signature(get_format(name)._decompose).parameters) - set(shared)


def check_decompose_options(config: CompressionConfig) -> None:
    """``Compressor.validate`` of the tensor formats: ``decompose_options`` names options the format takes."""
    options = config.decompose_options
    if options is None:
        return
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"decompose_options={options!r} must be a dict of option names to values")
    unknown = sorted(set(options) - decompose_option_names(config.method))
    if unknown:
        raise ValueError(f"decompose_options: {config.method} takes {sorted(decompose_option_names(config.method))}, "
                         f"not {unknown}")
    if config.whiten and set(options) - {"algorithm"}:
        raise ValueError("decompose_options: whiten=True decomposes with Tucker-2, which takes algorithm= only")


for _name in TENSOR_FORMATS:
    _reads, _conditions = _tensor_reads(_name)
    register(Compressor(
        name=_name, kind="factorized", compress_layer=compress_tensor, needs_stats=False, parameters=_parameters,
        storage_bits=_storage_bits, label=_label, help=_HELP[_name], check_layer=check_tensor_layer,
        reads=_reads, reads_only_with=_conditions, validate=check_decompose_options,
    ))
