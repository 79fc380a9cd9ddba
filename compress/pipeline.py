"""Block-sequential compression: one decoder block in float32 and one block's statistics at a time.

A transformers decoder model is a stack of blocks ``h_{i+1} = f_i(h_i)``. :func:`compress_blocks` captures once the
hidden states ``h_0`` of block 0 and the keyword arguments the model passes each block (attention mask, position
embeddings / ids, cache disabled; a local layer's sliding-window mask is its own, on every batch), recorded in one
forward per batch in which every block passes its input through, and then, for ``i = 0, 1, ...``:

1. upcasts block ``i`` alone to float32 on ``device`` (the other blocks stay in their storage dtype and place);
2. collects the statistics ``C̃ = Σ x̃ x̃ᵀ`` of its target linears on the *compressed stream* ``h̃_i``, the inputs that
   the already compressed and compensated blocks ``< i`` produce (and, with independent EoRA, ``C = Σ x xᵀ`` on the
   *dense stream* ``h_i`` that the original blocks produce);
3. compresses its target linears with :func:`compress.compress_model` (statistics ``C̃``);
4. compensates them with EoRA: independent EoRA minimises ``‖(W − W_c − BA) X‖`` on the dense stream (exactly the
   whole-model :func:`compress.eora_compensate`); sequential EoRA (:mod:`compress.sequential_eora`) minimises the
   ridge-penalised ``‖W X − (W_c + BA) X̃‖² + λ'‖BA − ΔW‖²`` (``X`` the original block's layer inputs on ``h_i``,
   ``X̃`` the compensated block's on ``h̃_i``), one layer after the other: each layer's cross moments are collected
   per fold (even / odd calibration batches) with the final residuals of the layers before it in place, as it will
   run, and its ``λ`` (or independent EoRA) is chosen by cross-validation;
5. runs the compressed + compensated block (rounded to its storage dtype) on ``h̃_i`` for ``h̃_{i+1}``, and the
   original block on ``h_i`` for ``h_{i+1}`` (in the dense pass of step 2), casts the block back to its storage
   dtype and device and frees the float32 copies and the statistics.

Cost per block, over the calibration data: without EoRA two passes of the block (statistics, output); with
independent EoRA one more on the dense stream; with sequential EoRA one paired pass of the dense and the compressed
block, then for each layer one paired pass of the block that stops at that layer (in two folds), and the output.
Memory: the storage-dtype model, one float32 block (two with EoRA: the original is kept for ``W``), one
block's statistics, and the hidden states of the calibration data (one or two streams, float32, on ``device``).

Models too big for memory are loaded in their storage dtype with accelerate's big-model tools, the blocks offloaded
to disk (``from_pretrained(path, dtype=torch.bfloat16, device_map={..., "model.layers": "disk"},
offload_folder=...)``). Each offloaded block is loaded from its weights map, processed as above, written to
``offload_folder`` in accelerate's offload format and offloaded again with accelerate's hooks, so one block at a
time is resident. Its quantized codes go to disk with it, and its EoRA factors to ``offload_folder/eora/<block>
.safetensors`` (:class:`compress.factor_store.OffloadedFactors`, read back a layer at a time on lookup;
``save_pretrained`` holds one layer's at a time, ``apply`` all of them, as the layers it wraps): what the result
keeps in memory does not grow with the model's depth.

The compression statistics of every layer of a block come from one pass of the *uncompressed* block on ``h̃_i`` (as
llm-compressor's sequential pipeline does): the drift that compressing ``q_proj`` causes at ``down_proj`` of the
same block reaches the compressor in the next block.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import inspect
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.calibration import (
    ActivationStats,
    CrossStats,
    StopForward,
    accumulate_cross_stats,
    accumulate_stats,
    collect_activation_stats,
    model_device,
    named_inputs,
    run_batch,
    token_mask,
)
from compress.config import CompressionConfig
from compress.eora import (
    EORA_METHODS,
    CompensatedLayer,
    EoraAdapter,
    eora_compensate,
    fit_sequential_layer,
)
from compress.eora_rounds import check_rounds, refine_rounds
from compress.factor_store import OffloadedFactors
from compress.sequential_eora import calibration_folds
from compress.surgery import CompressionReport, compress_model
from compress.targets import (
    check_not_shared,
    check_weights_writable,
    drop_bypassed,
    dense_weight,
    exact_names,
    find_targets,
    layer_kind,
    replace_module,
    unwrap_compiled,
)
from tensornets.devices import usable_device

_NO_BATCHES = ("calib_batches is empty, or the model never ran its first block; pass at least one batch of model "
               "inputs (e.g. 64-256 sequences)")

#: keyword arguments of a block that hold a KV cache: dropped from the captured inputs (every pass starts afresh)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class PipelineResult:
    """What :func:`compress_blocks` returns.

    Attributes
    ----------
    report : CompressionReport
        ``report.model`` is the compressed model (in its storage dtype, without the EoRA residual); one
        :class:`compress.LayerReport` per target layer, errors measured on the compressed stream.
    eora : EoraAdapter or None
        The residuals (``None`` without ``eora_rank``); ``eora.apply(report.model)`` gives the compensated model.
    block_path : str or None
        Path of the block list that was processed block by block (``"model.layers"``); ``None`` when the model had no
        decoder blocks and the whole-model path ran.
    """

    report: CompressionReport
    eora: EoraAdapter | None
    block_path: str | None

    @property
    def model(self) -> nn.Module:
        """The compressed model (``report.model``)."""
        return self.report.model


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of blocks: the ``nn.ModuleList`` of one block class holding the most parameters.

    Returns
    -------
    (str, nn.ModuleList) or None
        Its path (``"model.layers"`` for Llama-style models) and the list; ``None`` if no ``ModuleList`` of identical,
        parameterised modules exists. The pipeline assumes the model runs these blocks in list order, each once per
        forward, feeding each block's output to the next (true of transformers decoder models).
    """
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    return best


def disk_offload_map(model: nn.Module) -> dict[str, str]:
    """A ``device_map`` that keeps ``model``'s decoder blocks on disk and everything else in CPU memory.

    For ``from_pretrained(path, device_map=disk_offload_map(skeleton), offload_folder=...)``, where ``skeleton`` is
    the architecture built on empty weights (``with accelerate.init_empty_weights():
    AutoModelForCausalLM.from_config(config)``): the blocks (:func:`find_decoder_blocks`) map to ``"disk"``, their
    sibling modules and those of every module above them (embeddings, final norm, LM head) to ``"cpu"``. Then
    :func:`compress_blocks` with ``offload_folder=`` holds one block in memory at a time.

    Raises
    ------
    ValueError
        When the model has no decoder blocks, or a module above them holds parameters of its own (no key of a
        device map covers them without its children: write the map by hand).
    """
    found = find_decoder_blocks(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of identical modules) to "
                         "offload to disk")
    path, _ = found
    parts = path.split(".")
    device_map: dict[str, str] = {}
    for depth, part in enumerate(parts):
        owner_name = ".".join(parts[:depth])
        owner = model.get_submodule(owner_name)
        own = [n for n, _ in (*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False))]
        if own:
            raise ValueError(f"{owner_name or type(model).__name__!r} holds tensors of its own ({own[:3]}) above the "
                             f"decoder blocks {path!r}: write the device_map by hand")
        prefix = f"{owner_name}." if owner_name else ""
        device_map.update({prefix + name: "cpu" for name, _ in owner.named_children() if name != part})
    device_map[path] = "disk"
    return device_map


def block_pipeline_obstacle(model: nn.Module, config: CompressionConfig) -> str | None:
    """Why :func:`compress_blocks` cannot process ``model`` block by block, or ``None`` when it can.

    The block path needs a stack of decoder blocks (:func:`find_decoder_blocks`), every target layer of
    ``config`` inside it, and a per-layer budget (``allocation="global"`` ranks all layers against each other).

    Returns
    -------
    str or None
        A sentence naming the obstacle (e.g. ``"LinearStack has no decoder blocks (...)"``), for the fallback warning.
    """
    found = find_decoder_blocks(model)
    if found is None:
        return f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of identical modules)"
    path, _ = found
    with warnings.catch_warnings():  # what it warns about, compress_blocks' (or compress_model's) selection says again
        warnings.simplefilter("ignore", UserWarning)
        targets = find_targets(model, config.target_modules, config.exclude_modules)
    outside = [n for n in targets if not n.startswith(path + ".")]
    if outside:
        return f"target layers {outside[:4]} lie outside the decoder blocks {path!r}"
    blocks = [n for n in targets if n[len(path) + 1:].isdigit()]
    if blocks:
        return f"target layers {blocks[:4]} are decoder blocks themselves (the pipeline compresses layers inside them)"
    if config.allocation == "global":
        return "allocation='global' ranks all layers against each other and needs every layer's statistics"
    return None


def compress_blocks(
    model: nn.Module,
    config: CompressionConfig,
    calib_batches: Iterable[Any],
    *,
    eora_rank: int = 0,
    eora_method: str = "eora",
    eora_sequential: bool = False,
    eora_ridge: float = 0.0,
    eora_rounds: int = 0,
    device: torch.device | str | None = None,
    offload_folder: str | os.PathLike | None = None,
    inplace: bool = False,
    progress: bool | None = None,
) -> PipelineResult:
    """Compress (and EoRA-compensate) a decoder model block by block; other models take the whole-model path.

    Parameters
    ----------
    model : nn.Module
        A transformers decoder model (``LlamaForCausalLM``, ...) in its storage dtype (e.g. bfloat16), on CPU.
        Blocks are found by :func:`find_decoder_blocks`.
    config : CompressionConfig
        Method, size and targets, as for :func:`compress.compress_model` (its ``target_modules`` are matched on the
        whole model's paths; each block is compressed with the targets inside it).
    calib_batches : Iterable
        Calibration batches of model inputs (tensors of ``input_ids`` ``(B, T)``, tuples or dicts, see
        :func:`compress.calibration.run_batch`). Iterated once on the block path; a list is needed for the
        whole-model fallback with ``eora_sequential``.
    eora_rank : int
        Rank ``r`` of the EoRA residual of every target layer; ``0``: no compensation.
    eora_method : {"eora", "svd", "asvd"}
        EoRA or a baseline (see :func:`compress.eora_compensate`).
    eora_sequential : bool
        Fit each residual to the dense outputs from the compressed stream's inputs, ``‖W X − (W_c + BA) X̃‖_F``
        plus a ridge penalty chosen per layer by cross-validation (:mod:`compress.sequential_eora`;
        ``eora_method="eora"`` only; needs at least 2 calibration batches); otherwise each layer is compensated on
        the dense inputs alone, as the whole-model path does.
    eora_ridge : float
        Whitening ridge ``C + ridge · mean(diag C) I`` of independent EoRA (also the independent candidate of
        sequential EoRA).
    eora_rounds : int
        Fit each compressed weight and its residual together: after plain compression and EoRA, ``eora_rounds``
        times recompress ``W − BA`` and refit EoRA, keeping each layer's best round on the calibration objective
        (:mod:`compress.eora_rounds`; dense compressors and independent EoRA only; each round costs one
        compression and one EoRA fit per layer, no extra forward pass). The compressed weights are then fitted
        with their residuals: serve them together. ``0``: plain EoRA.
    device : torch.device or str, optional
        Where each block is processed (``"cuda"`` moves one block at a time to the GPU); default: where the block is
        stored. The hidden states of the calibration data live there too.
    offload_folder : str or os.PathLike, optional
        For a model whose blocks accelerate offloads (``from_pretrained(..., device_map=..., offload_folder=...)``,
        parameters on ``meta``): where the compressed blocks are written (accelerate's offload format, one ``.dat``
        file per tensor; its EoRA factors in ``eora/<block>.safetensors``). Each offloaded block is loaded from its
        weights map, processed, written here and offloaded again, so only one block is ever resident. Required when
        the model has offloaded blocks; keep the folder as long as the result is used.
    inplace : bool
        Compress ``model`` itself; otherwise a deep copy (peak memory then holds two models in their storage dtype;
        a model with offloaded blocks must be compressed in place).
    progress : bool, optional
        tqdm bar over blocks (default: only on a terminal).

    Returns
    -------
    PipelineResult
        ``.model`` (compressed, storage dtype, residual not applied), ``.report``, ``.eora``, ``.block_path``.

    Raises
    ------
    ValueError
        On a bad argument (naming it), empty calibration data, or statistics that are not finite.

    Warns
    -----
    UserWarning
        When the whole-model path runs instead: no decoder blocks, target layers outside the blocks, or
        ``allocation="global"`` (which ranks all layers against each other and needs every layer's statistics).

    Examples
    --------
    >>> cfg = CompressionConfig(method="rtn", bits=3, group_size=64)
    >>> out = compress_blocks(model, cfg, calib, eora_rank=64, inplace=True)
    >>> out.eora.apply(out.model)     # compensated model for evaluation
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    model = unwrap_compiled(model)
    if isinstance(eora_rank, bool) or not isinstance(eora_rank, int) or eora_rank < 0:
        raise ValueError(f"eora_rank={eora_rank!r} must be an int >= 0 (0: no compensation)")
    if eora_method not in EORA_METHODS:
        raise ValueError(f"eora_method={eora_method!r} must be one of {tuple(EORA_METHODS)}")
    if eora_sequential and eora_method != "eora":
        raise ValueError(f"eora_sequential=True fits the drifted inputs in EoRA's eigenspace; eora_method="
                         f"{eora_method!r} has no sequential form: pass eora_method='eora' or eora_sequential=False")
    if eora_sequential and not eora_rank:
        raise ValueError("eora_sequential=True needs eora_rank > 0")
    if isinstance(eora_ridge, bool) or not isinstance(eora_ridge, (int, float)) or not 0 <= eora_ridge < math.inf:
        raise ValueError(f"eora_ridge={eora_ridge!r} must be a finite number >= 0")
    if eora_ridge and eora_method != "eora":  # checked here: the blocks before the error would be compressed in place
        raise ValueError(f"eora_method={eora_method!r} does not read eora_ridge={eora_ridge} (EoRA's whitening does); "
                         "drop it or pass eora_method='eora'")
    check_rounds(eora_rounds, eora_rank=eora_rank, sequential=eora_sequential,
                 compressor_kind=config.compressor.kind, method=config.method)
    calib_batches = list(calib_batches)
    if not calib_batches:
        raise ValueError(_NO_BATCHES)
    if eora_sequential:
        calibration_folds(calib_batches)  # at least 2 batches, before any work
    compute = (None if device is None
               else usable_device(device, fix="pass device=None (the model's own), 'cpu' or 'cuda'"))

    targets = drop_bypassed(model, find_targets(model, config.target_modules, config.exclude_modules),
                            config.target_modules, config.compressor.kind, config.needs_stats or eora_rank > 0)
    check_not_shared(model, targets)
    check_weights_writable(model, targets, config.compressor.kind)
    if config.compressor.check_layer is not None:  # every block's layers, before the first block is compressed
        for name, module in targets.items():
            config.compressor.check_layer(name, module, tuple(dense_weight(module).shape), config)
    reason = block_pipeline_obstacle(model, config)
    if reason is not None and _offloaded_modules(model):
        raise ValueError(f"block-sequential compression is not possible ({reason}), and the whole-model path needs "
                         "every weight in memory, but accelerate offloads some of this model's: load it without "
                         "offload, or remove the obstacle")
    if reason is not None:
        warnings.warn(f"block-sequential compression is not possible: {reason}; compressing the whole model at once "
                      "(float32 statistics of every layer in memory)", UserWarning, stacklevel=2)
        return _whole_model(model, config, calib_batches, list(targets), eora_rank, eora_method,
                            eora_sequential, eora_ridge, eora_rounds, inplace, progress)

    path, blocks = find_decoder_blocks(model)
    offloaded = [i for i, block in enumerate(blocks) if _offloaded_modules(block)]
    if offloaded and offload_folder is None:
        raise ValueError(f"blocks {offloaded[:4]} of {path!r} are offloaded by accelerate: pass offload_folder= (a "
                         "directory for the compressed blocks), or load the model without disk offload")
    if offloaded and not inplace:
        raise ValueError("a model with offloaded blocks cannot be copied: pass inplace=True")
    work = model if inplace else copy.deepcopy(model)
    blocks = work.get_submodule(path)
    work_targets = find_targets(work, exact_names(list(targets)))
    per_block = [{n[len(f"{path}.{i}."):]: m for n, m in work_targets.items() if n.startswith(f"{path}.{i}.")}
                 for i in range(len(blocks))]

    home = compute if compute is not None else _home_device(blocks[0])
    try:
        calls = check_blocks_chain(work, blocks, calib_batches[0], home)
        hidden, block_kwargs, masks = capture_block_inputs(work, blocks, calib_batches, home, passthrough=calls.form)
        if calls.form is not None and not all(_same_argument(recorded[0], real)
                                              for recorded, real in zip(block_kwargs, calls.kwargs)):
            # the model derives some block's arguments from the hidden states: record them on real runs
            hidden, block_kwargs, masks = capture_block_inputs(work, blocks, calib_batches, home)
        del calls
    except UnsupportedBlockCall as err:
        if offloaded:
            raise
        warnings.warn(f"block-sequential compression is not possible: {err}; compressing the whole model at once "
                      "(float32 statistics of every layer in memory)", UserWarning, stacklevel=2)
        return _whole_model(model, config, calib_batches, list(targets), eora_rank, eora_method,
                            eora_sequential, eora_ridge, eora_rounds, inplace, progress)
    comp_h = hidden
    dense_h = list(hidden) if eora_rank else None  # both streams start equal
    export_group = _export_group_size(work_targets, config) if offloaded else None
    layers, quantized, kinds, eora_rows, conv_kernels = [], {}, {}, [], {}
    factors = OffloadedFactors() if offloaded else {}
    for i in tqdm(range(len(blocks)), desc=f"compress blocks ({config.method})",
                  disable=None if progress is None else not progress):
        prefix = f"{path}.{i}."
        execution_device = _onload(blocks[i]) if i in offloaded else None
        try:
            out = _process_block(blocks[i], per_block[i], comp_h, dense_h, block_kwargs[i], masks, config,
                                 eora_rank, eora_method, eora_sequential, eora_ridge, eora_rounds,
                                 compute if compute is not None else execution_device)
        except ValueError as err:  # name the layers by their paths in the model, not in the block
            message = str(err)
            for name in sorted(per_block[i], key=len, reverse=True):
                message = message.replace(repr(name), repr(prefix + name))
            raise ValueError(message) from err
        comp_h, dense_h = out.comp_h, out.dense_h
        if i in offloaded:  # the block's codes go to disk with it: what the result keeps does not grow with depth
            out.quantized = _offload(blocks[i], f"{path}.{i}", offload_folder, execution_device, out.quantized,
                                     export_group)
        gc.collect()  # the block's tensors can sit in reference cycles (hooks, modules): free them before the next
        layers += [dataclasses.replace(r, name=prefix + r.name) for r in out.layers]
        quantized.update({prefix + n: q for n, q in out.quantized.items()})
        if out.eora is not None:
            block_factors = {prefix + n: f for n, f in out.eora.factors.items()}
            if i in offloaded:  # with the block on disk: the factors kept do not grow with depth either
                factors.write(Path(offload_folder) / "eora" / f"{path}.{i}.safetensors", block_factors)
            else:
                factors.update(block_factors)
            kinds.update({prefix + n: k for n, k in out.eora.kinds.items()})
            conv_kernels.update({prefix + n: k for n, k in out.eora.conv_kernels.items()})
            eora_rows += [dataclasses.replace(r, name=prefix + r.name) for r in out.eora.layers]
    eora = None
    if eora_rank:
        label = "-sequential" if eora_sequential else (f"-rounds{eora_rounds}" if eora_rounds else "")
        eora = EoraAdapter(factors, kinds, eora_rank, eora_method + label,
                           eora_rows, conv_kernels)
    return PipelineResult(CompressionReport(work, layers, config, quantized), eora, path)


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib_batches: Iterable[Any],
    device: torch.device | None = None,
    *,
    passthrough: Any = None,
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]], list[torch.Tensor | None]]:
    """Inputs of every block for every calibration batch: block 0's hidden states, each block's other arguments.

    Forward pre-hooks (``with_kwargs=True``) on the blocks record block 0's hidden states ``(B, T, d)`` and every
    block's keyword arguments (attention mask, position embeddings / ids; cache arguments set to ``None``,
    ``use_cache=False``); the last block's hook raises :class:`compress.calibration.StopForward`, so nothing after
    it runs. The model runs with its ``config.use_cache`` off.

    Blocks may take other arguments than block 0 (Gemma 2/3: a sliding-window mask and other position embeddings on
    their local layers; Swin's stages: other ``input_dimensions``), and these may change from batch to batch (a
    sliding-window mask only differs from the full one on sequences longer than the window): each block's are
    recorded on each batch. With ``passthrough`` (the form of block 0's output, see :func:`check_blocks_chain`),
    every block returns its input unchanged instead of running, so the recording costs no block's compute (nor, for
    offloaded blocks, a load from disk); :func:`compress_blocks` checks on the first batch that this gives the
    arguments a real run gives, and records on real runs otherwise (an argument that the model derives from the
    hidden states and that happens to agree on the first batch is not caught).

    Returns
    -------
    (list of torch.Tensor, list of list of dict, list of torch.Tensor or None)
        Per batch, block 0's hidden states; per block, per batch, its keyword arguments (floating-point tensors in
        float32, all on ``device``, default where block 0 is stored; a tensor the model passes several blocks is
        stored once); per batch, the ``(B, T)`` real-token mask (:func:`compress.calibration.token_mask`; ``None``
        without padding), which keeps padded positions out of every block's statistics.

    Raises
    ------
    UnsupportedBlockCall
        When a block is not called exactly once per forward (the pipeline runs each block once, in list order).
    """
    device = device if device is not None else model_device(blocks[0])
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]
    masks: list[torch.Tensor | None] = []
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this batch's tensors, converted once
    called: set[int] = set()  # blocks called on this batch

    def hook(index: int):
        def record(_module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            if index in called:
                raise UnsupportedBlockCall(f"block {index} of {type(model).__name__} runs more than once per forward")
            called.add(index)
            h, kw = _by_name(blocks[index], args, kw)
            if index == 0:
                moved = _to(h.detach(), device)
                # a copy of its own: the model runs on after block 0 (the blocks pass it through) and could change it
                hidden.append(moved.clone() if moved.data_ptr() == h.data_ptr() else moved)
            kwargs[index].append(_to(_without_cache(kw), device, memo))
            if index == len(blocks) - 1:
                raise StopForward
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    with _hooked_run(model, handles) as run, _passing_through(blocks, passthrough):
        for batch in calib_batches:
            memo.clear()
            called.clear()
            run(batch)
            if len(masks) < len(hidden):
                mask = token_mask(named_inputs(model, batch))
                masks.append(None if mask is None else mask.to(device))
    memo.clear()
    if not hidden:
        raise ValueError(_NO_BATCHES)
    missing = [i for i, calls in enumerate(kwargs) if len(calls) != len(hidden)]
    if missing:
        raise UnsupportedBlockCall(f"blocks {missing[:4]} of {type(model).__name__} do not run on every forward")
    return hidden, kwargs, masks


@contextmanager
def _hooked_run(model: nn.Module, handles: list) -> Iterator[Any]:
    """Yield ``run(batch)``: ``model`` on one batch in eval mode, without grad or KV cache, until a hook raises
    :class:`StopForward`; afterwards the ``handles`` are removed and the model's mode and ``use_cache`` restored."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()

    def run(batch: Any) -> None:
        try:
            with torch.no_grad():
                run_batch(model, batch, model_device(model))
        except StopForward:
            pass

    try:
        if use_cache is not None:
            config.use_cache = False
        yield run
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache


@contextmanager
def _passing_through(blocks: nn.ModuleList, form: Any) -> Iterator[None]:
    """Within the context every block returns its hidden states unchanged, in the ``form`` of block 0's output
    (``"tensor"``, or the length of a tuple whose other entries are ``None``); ``form=None``: the blocks run."""
    if form is None:
        yield
        return
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's hooks set an instance forward

    def passthrough(*args: Any, **kw: Any) -> Any:
        hidden = args[0] if args else kw["hidden_states"]
        return hidden if form == "tensor" else (hidden,) + (None,) * (form - 1)

    for block in blocks:  # wraps: inspect.signature (see _by_name) still sees the block's own parameters
        block.forward = functools.wraps(block.forward)(passthrough)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class UnsupportedBlockCall(ValueError):
    """The model calls its blocks in a way the block pipeline cannot replay (e.g. ``*args`` forwards)."""


@dataclass
class BlockCalls:
    """What :func:`check_blocks_chain` saw on one batch.

    Attributes
    ----------
    form : str, int or None
        How block 0 returns its hidden states, for :func:`capture_block_inputs`' ``passthrough``: ``"tensor"``, the
        length of a tuple whose other entries are ``None``, or ``None`` (another form: the blocks must run).
    kwargs : list of dict
        Each block's keyword arguments on the batch, as :func:`capture_block_inputs` records them.
    """

    form: Any
    kwargs: list[dict[str, Any]]


def check_blocks_chain(model: nn.Module, blocks: nn.ModuleList, batch: Any,
                       device: torch.device | None = None) -> BlockCalls:
    """Check that the pipeline can replay the model's block calls, on one batch of a real forward up to the last
    block's call.

    The pipeline feeds each block the previous block's output, with the other arguments the model passed that block
    (recorded by :func:`capture_block_inputs`). A model that transforms the hidden states between its blocks
    (``h = 3 h + block(tanh(h))``) would be compressed on inputs it never produces.

    Raises
    ------
    UnsupportedBlockCall
        When block 1's input is not block 0's output, or a block is called in a way that cannot be replayed.
    """
    device = device if device is not None else model_device(blocks[0])
    seen: dict[str, Any] = {"kwargs": []}
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def output(_module: nn.Module, _args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            seen["form"] = "tensor"
        elif isinstance(out, tuple) and out and all(x is None for x in out[1:]):
            seen["form"] = len(out)
        hidden = out if isinstance(out, torch.Tensor) else next(iter(out.values() if isinstance(out, Mapping) else out),
                                                                None)  # a tuple or a ModelOutput: hidden states first
        if isinstance(hidden, torch.Tensor):
            seen["out"] = hidden.detach()

    def call(index: int):
        def hook(_module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            hidden, named = _by_name(blocks[index], args, kw)
            if len(seen["kwargs"]) != index:
                raise UnsupportedBlockCall(f"{type(model).__name__} does not call its blocks once each, in order")
            seen["kwargs"].append(_to(_without_cache(named), device, memo))
            if index == 1:
                seen["in"] = hidden.detach()
            if index == len(blocks) - 1:
                raise StopForward
        return hook

    handles = [blocks[0].register_forward_hook(output)] if len(blocks) > 1 else []
    handles += [block.register_forward_pre_hook(call(i), with_kwargs=True) for i, block in enumerate(blocks)]
    with _hooked_run(model, handles) as run:
        run(batch)
    if len(blocks) > 1:
        out, given = seen.get("out"), seen.get("in")
        if out is None or given is None or out.shape != given.shape or not torch.equal(out, given.to(out.device)):
            raise UnsupportedBlockCall(f"block 1 of {type(model).__name__} does not take block 0's output as its "
                                       "input (the model changes the hidden states between its blocks)")
    return BlockCalls(seen.get("form"), seen["kwargs"])


def _without_cache(kw: dict[str, Any]) -> dict[str, Any]:
    """A block call's keyword arguments with the cache arguments ``None`` and ``use_cache=False`` (every pass of the
    pipeline starts afresh)."""
    kw = {k: (None if k in _CACHE_KWARGS else v) for k, v in kw.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def _same_argument(a: Any, b: Any) -> bool:
    """Whether two block-call arguments are the same value (tensors: shape and entries; containers: item by item)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_argument(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_argument(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # objects without a value comparison (a cache): the same one
        return a is b


def _by_name(block: nn.Module, args: tuple, kw: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """A block call's hidden states and every other argument by name.

    GPT-2's and BERT's blocks take the attention mask and friends positionally; naming them from ``block.forward``'s
    signature lets the pipeline null the cache arguments and replay the call as ``block(hidden, **kwargs)``.
    """
    kw = dict(kw)
    if not args:
        if "hidden_states" not in kw:
            raise UnsupportedBlockCall(f"block {type(block).__name__} is called without positional arguments or "
                                       "hidden_states=")
        return kw.pop("hidden_states"), kw
    params = list(inspect.signature(block.forward).parameters.values())
    named = [p for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD][1:len(args)]
    if len(named) < len(args) - 1:  # *args or positional-only parameters: no names to replay them by
        raise UnsupportedBlockCall(f"block {type(block).__name__} is called with {len(args)} positional arguments "
                                   "that its forward does not name")
    kw.update({p.name: value for p, value in zip(named, args[1:])})
    return args[0], kw


def _to(obj: Any, device: torch.device, memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """``obj`` (tensor or nested tuple / list / dict) on ``device``, floating-point tensors in float32.

    ``memo`` (``id`` of a tensor -> the tensor and its copy) converts a tensor met again once: a mask or position
    embeddings the model passes every block are stored once. It holds the source tensors, so their ids stay theirs.
    """
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        moved = obj.to(device, torch.float32) if obj.is_floating_point() else obj.to(device)
        if memo is not None:
            memo[id(obj)] = (obj, moved)
        return moved
    if isinstance(obj, tuple):
        return tuple(_to(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


class _Feed(nn.Module):
    """``forward(i) = block(hidden[i], **kwargs[i])``: a block fed from a recorded stream (outputs optionally kept).

    Lets the calibration accumulators, which run batches through a model, run a block on the stream of its own
    inputs (``batches = [tensor(0), tensor(1), ...]``, see :func:`_stream_batches`).
    """

    def __init__(self, block: nn.Module, hidden: Sequence[torch.Tensor], kwargs: Sequence[dict[str, Any]],
                 outputs: list[torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.block = block
        self.hidden, self.kw, self.outputs = hidden, kwargs, outputs
        # the block's mode (not a new module's train mode): the accumulators restore this one on the block
        self.training = block.training

    def forward(self, i: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # attention_mask: the batch's real-token mask, read by the accumulators' hooks; the block gets its own
        # recorded keyword arguments
        i = int(i)
        device = model_device(self.block)  # a no-op unless blocks sit on several devices
        out = self.block(_to(self.hidden[i], device), **_to(self.kw[i], device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if self.outputs is not None:
            self.outputs[i] = out.detach()
        return out


def _stream_batches(masks: Sequence[torch.Tensor | None], ids: Iterable[int] | None = None) -> list[Any]:
    """The batches that make the accumulators run a :class:`_Feed` over recorded batches ``ids`` (default all):
    ``tensor(i)``, or ``{"i": tensor(i), "attention_mask": mask}`` for a padded batch, so that its padded rows stay
    out of the statistics as they do on the whole-model path."""
    ids = range(len(masks)) if ids is None else ids
    return [torch.tensor(i) if masks[i] is None else {"i": torch.tensor(i), "attention_mask": masks[i]}
            for i in ids]


@dataclass
class _BlockResult:
    comp_h: list[torch.Tensor]
    dense_h: list[torch.Tensor] | None
    layers: list
    eora: EoraAdapter | None
    quantized: dict  # relative name -> PackedQuantizedWeight, for quantizing compressors (what exporters write)


def _process_block(
    block: nn.Module,
    targets: Mapping[str, nn.Module],
    comp_h: list[torch.Tensor],
    dense_h: list[torch.Tensor] | None,
    kwargs: list[dict[str, Any]],
    masks: list[torch.Tensor | None],
    config: CompressionConfig,
    eora_rank: int,
    eora_method: str,
    sequential: bool,
    ridge: float,
    rounds: int,
    device: torch.device | None,
) -> _BlockResult:
    """Statistics, compression, compensation and the next inputs of one block (module paths relative to it).

    The caller hands over ``dense_h``: it is emptied once the dense stream has been run, so that its float32 hidden
    states are freed before the EoRA fits (the caller continues with the returned streams)."""
    ref = next((p for p in block.parameters() if p.is_floating_point()), None)
    storage_dtype = ref.dtype if ref is not None else torch.float32
    storage_device = ref.device if ref is not None else torch.device("cpu")
    device = device if device is not None else storage_device
    _place(block, device, torch.float32)
    batches = _stream_batches(masks)
    names = list(targets)
    next_dense = [None] * len(batches) if dense_h is not None else None
    dense = copy.deepcopy(block) if eora_rank else None  # float32 original: W of EoRA and the dense stream

    layers, adapter, quantized = [], None, {}
    if names:
        dense_stats = pre = None
        if sequential:  # one paired pass: compression statistics, drift of the earlier blocks, next dense inputs
            pre = _cross(dense, dense_h, next_dense, block, comp_h, kwargs, masks, names)
            comp_stats = ActivationStats({n: pre[n].current for n in names})
        else:
            comp_stats = accumulate_stats(_Feed(block, comp_h, kwargs), {n: block.get_submodule(n) for n in names},
                                          batches, stop_after_all=True, progress=False)
            if dense is not None:
                dense_stats = accumulate_stats(_Feed(dense, dense_h, kwargs, next_dense),
                                               {n: dense.get_submodule(n) for n in names}, batches, progress=False)
                dense_h.clear()  # consumed (see below)
        # the layers by their exact block-relative names: a list would select by suffix ("output.dense" is also
        # "attention.output.dense")
        block_config = dataclasses.replace(config, target_modules=exact_names(names), exclude_modules=None)
        block_report = compress_model(block, block_config, comp_stats, inplace=True, progress=False)
        if not rounds:  # free the codes and statistics before the residuals are fitted (the peak of the block)
            layers, quantized = _packed(block_report)
            del block_report, comp_stats
        _round_to(block, device, storage_dtype)
        if sequential:
            del pre
            adapter = _sequential_adapter(dense, dense_h, block, comp_h, kwargs, masks, names, eora_rank, ridge,
                                          storage_dtype)
            dense_h.clear()
        elif eora_rank:
            adapter = eora_compensate(dense, block, dense_stats, rank=eora_rank, method=eora_method, ridge=ridge,
                                      target_modules=exact_names(names), progress=False)
            if rounds:
                block_report, adapter = refine_rounds(dense, block, block_report, adapter, comp_stats, dense_stats,
                                                      rounds, ridge=ridge, storage_dtype=storage_dtype)
                layers, quantized = _packed(block_report)
                del block_report, comp_stats
            adapter = _stored(adapter, storage_dtype)
        del dense_stats
    else:
        _round_to(block, device, storage_dtype)
        if dense is not None:
            _run_stream(dense, dense_h, kwargs, next_dense)

    # the original block's last use was above: free it before the compensated pass
    del dense
    if adapter is not None:
        adapter.apply(block, inplace=True)
    next_comp: list[torch.Tensor | None] = [None] * len(batches)
    _run_stream(block, comp_h, kwargs, next_comp)
    if adapter is not None:
        _unwrap(block, adapter)
    _place(block, storage_device, storage_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _BlockResult(next_comp, next_dense, layers, adapter, quantized)


def _cross(dense: nn.Module, dense_h: Sequence[torch.Tensor], dense_out: list | None, block: nn.Module,
           comp_h: Sequence[torch.Tensor], kwargs: Sequence[dict[str, Any]], masks: Sequence[torch.Tensor | None],
           names: list[str], batch_ids: Sequence[int] | None = None) -> dict[str, CrossStats]:
    """Cross moments of the layers ``names``: ``dense`` on the dense stream (outputs into ``dense_out`` if given),
    ``block`` on the compressed stream, paired row for row, over the batches ``batch_ids`` (default all)."""
    batches = _stream_batches(masks, batch_ids)
    cross = accumulate_cross_stats(_Feed(dense, dense_h, kwargs, dense_out), _Feed(block, comp_h, kwargs),
                                   ["block." + n for n in names], batches, stop_after_all=dense_out is None,
                                   progress=False)
    return {n[len("block."):]: c for n, c in cross.items()}


def _packed(report: CompressionReport) -> tuple[list, dict]:
    """The report's rows and its quantized layers bit-packed (kept until export for every layer: b bits per code
    instead of an int8 each)."""
    return report.layers, {n: q.pack() for n, q in report.quantized.items()}


def _stored(adapter: EoraAdapter, dtype: torch.dtype) -> EoraAdapter:
    """``adapter`` with its factors rounded to the model's storage ``dtype``: what the exported PEFT adapter holds,
    what the next block's inputs are computed with, and half the bytes of float32 factors, kept until export (in
    memory, or on disk with an offloaded block)."""
    return dataclasses.replace(adapter, factors={n: (B.to(dtype), A.to(dtype)) for n, (B, A) in
                                                 adapter.factors.items()})


def _unwrap(block: nn.Module, adapter: EoraAdapter) -> None:
    """Undo ``adapter.apply(block, inplace=True)``: put the compressed layers back."""
    for name in adapter.factors:
        wrapped = block.get_submodule(name)
        if isinstance(wrapped, CompensatedLayer):
            replace_module(block, name, wrapped.base_layer)


def _offloaded_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Submodules of ``block`` whose parameters accelerate keeps offloaded (an ``AlignDevicesHook`` with offload)."""
    from accelerate.utils import has_offloaded_params

    return {n: m for n, m in block.named_modules() if has_offloaded_params(m)}


def _home_device(block: nn.Module) -> torch.device:
    """Where ``block`` computes: its hooks' execution device when accelerate offloads it, else its parameters'."""
    modules = _offloaded_modules(block)
    if modules:
        device = next(iter(modules.values()))._hf_hook.execution_device
        return torch.device("cpu") if device is None else torch.device(device)
    return model_device(block)


def _onload(block: nn.Module) -> torch.device:
    """Load an accelerate-offloaded block's parameters to the CPU from its weights maps and remove its hooks.

    Returns the hooks' execution device (to offload the block again with :func:`_offload`).
    """
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    execution_device = _home_device(block)
    modules = _offloaded_modules(block)
    values = {}
    for name, module in modules.items():
        weights = module._hf_hook.weights_map
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "meta":
                values[(name, key)] = weights[key]
    remove_hook_from_module(block, recurse=True)
    for (name, key), value in values.items():
        set_module_tensor_to_device(block.get_submodule(name), key, "cpu", value=value)
    return execution_device


def _export_group_size(targets: Mapping[str, nn.Module], config: CompressionConfig) -> int | None:
    """The one group size the exporter gives every quantized layer of this run (the gcd of the layers' own, see
    :func:`compress.export.save_hf_directory`): codes written to disk are regrouped to it first, since the exporter
    cannot regroup codes it reads from disk. ``None`` for methods without groups, and when every layer is
    quantized per row (the exporter's ``"channel"`` scheme: no regrouping)."""
    from compress.sources import resolve_group_size

    if "group_size" not in (config.compressor.reads or ()):
        return None
    widths = {dense_weight(m).reshape(dense_weight(m).shape[0], -1).shape[1] for m in targets.values()}
    groups = {w: resolve_group_size(config.group_size, w) for w in widths}
    if all(g == w for w, g in groups.items()):
        return None
    return math.gcd(*groups.values()) if groups else None


def _offload(block: nn.Module, name: str, folder: str | os.PathLike, execution_device: torch.device,
             quantized: Mapping[str, Any] | None = None, group_size: int | None = None) -> dict[str, Any]:
    """Write ``block``'s tensors to ``folder`` (accelerate's ``.dat`` offload format) and offload it with hooks.

    Layers whose forward reads a child's parameters without calling it (factorized layers) load all their
    weights at once (accelerate's ``preload_module_classes``). The block's ``quantized`` layers (relative name ->
    :class:`compress.quantized.PackedQuantizedWeight`) are written beside their layer as the exporter writes them
    (``<layer>.weight_packed``, ``.weight_scale``, ``.weight_zero_point``), the scales in the block's storage dtype,
    which an offloaded model is exported in (as :func:`compress.export.save_hf_directory` would cast them), the
    groups regrouped to ``group_size`` (:func:`_export_group_size`) where they are wider; returned with ``meta``
    placeholders instead of their tensors (the exporter reads them through the layer's hook, one shard at a time).
    """
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    from compress.export import pack_quantized_weight, regroup
    from tensornets import FactorizedConv2d, FactorizedLinear

    os.makedirs(folder, exist_ok=True)
    index: dict[str, dict] = {}
    for key, tensor in block.state_dict().items():
        offload_weight(tensor.detach(), f"{name}.{key}", str(folder), index)
    storage = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
    placeholders = {}
    for layer, qw in (quantized or {}).items():
        if group_size and qw.group_size != group_size and qw.group_size % group_size == 0:
            qw = regroup(qw, group_size)
        for key, tensor in pack_quantized_weight(qw, storage).items():
            if key != "weight_shape":  # rebuilt from the shape
                offload_weight(tensor, f"{name}.{layer}.{key}", str(folder), index)
        placeholders[layer] = dataclasses.replace(qw, packed=qw.packed.to("meta"), zero_point=qw.zero_point.to("meta"),
                                                  scale=qw.scale.to("meta", storage))
    preload = sorted({type(m).__name__ for m in block.modules() if isinstance(m, (FactorizedLinear, FactorizedConv2d))})
    attach_align_device_hook(block, execution_device=execution_device, offload=True, module_name=name,
                             weights_map=OffloadedWeightsLoader(save_folder=str(folder), index=index),
                             preload_module_classes=preload or None)
    return placeholders


def _round_to(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Round ``block``'s float32 weights to its storage ``dtype`` and back: the compressed stream then comes from the
    block as it will be stored."""
    _place(block, device, dtype)
    _place(block, device, torch.float32)


def _place(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``block`` (in place) to ``device`` with floating-point parameters and buffers in ``dtype``."""
    block.to(device=device, dtype=dtype)


def _run_stream(block: nn.Module, hidden: Sequence[torch.Tensor], kwargs: Sequence[dict[str, Any]],
                outputs: list[torch.Tensor | None]) -> None:
    """``outputs[i] = block(hidden[i], **kwargs[i])`` for every recorded batch."""
    feed = _Feed(block, hidden, kwargs, outputs)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            for i in range(len(hidden)):
                feed(torch.tensor(i))
    finally:
        block.train(was_training)


def _sequential_adapter(dense: nn.Module, dense_h: Sequence[torch.Tensor], block: nn.Module,
                        comp_h: Sequence[torch.Tensor], kwargs: Sequence[dict[str, Any]],
                        masks: Sequence[torch.Tensor | None], names: list[str], rank: int, ridge: float,
                        dtype: torch.dtype) -> EoraAdapter:
    """Cross-validated sequential EoRA residuals of the block's layers (relative names, in module order, which is
    execution order in transformers blocks), fitted one layer after the other.

    Each layer's cross statistics are collected, per fold, with the final residuals of the layers before it in
    place: exactly the inputs it sees at inference. A layer fitted to the drift of inputs that its predecessors'
    residuals then change corrects that drift a second time (measured on SmolLM2: fitting every layer of a block on
    one pass with independent residuals in place gave a worse perplexity than independent EoRA). Each paired
    pass stops at the layer, so the block's passes cost a few full passes, not one per layer. Each layer's factors are
    rounded to the storage ``dtype`` once fitted: the later layers see them as they will be stored.
    """
    factors, kinds, rows, conv_kernels = {}, {}, [], {}
    parts = calibration_folds(range(len(comp_h)))
    for name in names:
        fitted = EoraAdapter(dict(factors), kinds, rank, "eora-sequential", [], conv_kernels)
        fitted.apply(block, inplace=True)
        folds = [_cross(dense, dense_h, None, block, comp_h, kwargs, masks, [name], part)[name] for part in parts]
        _unwrap(block, fitted)
        module = block.get_submodule(name)
        B, A, row = fit_sequential_layer(name, dense_weight(dense.get_submodule(name)), dense_weight(module), folds,
                                         rank, ridge, None, None)
        rows.append(row)
        factors[name] = (B.to(dtype), A.to(dtype))
        kinds[name] = layer_kind(module)
        if isinstance(module, nn.Conv2d):
            conv_kernels[name] = tuple(module.kernel_size)
    return EoraAdapter(factors, kinds, rank, "eora-sequential", rows, conv_kernels)


def _whole_model(
    model: nn.Module,
    config: CompressionConfig,
    calib: list[Any],
    targets: list[str],
    eora_rank: int,
    eora_method: str,
    sequential: bool,
    ridge: float,
    rounds: int,
    inplace: bool,
    progress: bool | None,
) -> PipelineResult:
    """Today's path: statistics of every target on the dense model, compress all layers, compensate all layers."""
    # the targets compress_blocks chose, by exact names (short names would select by suffix, and 'all-linear' again)
    stats = collect_activation_stats(model, calib, exact_names(targets), progress=progress)
    config = dataclasses.replace(config, target_modules=exact_names(targets), exclude_modules=None)
    # EoRA needs the original weights: the model is then copied even with inplace=True
    report = compress_model(model, config, stats, inplace=inplace and not eora_rank, progress=progress)
    eora = None
    if eora_rank:
        eora = eora_compensate(model, report.model, stats, rank=eora_rank, method=eora_method, ridge=ridge,
                               target_modules=exact_names(targets), sequential=sequential, calib_batches=calib,
                               progress=progress)
        if rounds:
            report, eora = refine_rounds(model, report.model, report, eora, stats, stats, rounds, ridge=ridge)
    return PipelineResult(report, eora, None)


@contextmanager
def float32_compute(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in float32 while it stays stored in its low-precision dtype, one decoder block at a time.

    Inside the context, the modules outside the decoder blocks (embeddings, final norm, LM head: small) are upcast to
    float32, and each block (:func:`find_decoder_blocks`) is upcast by a forward pre-hook just before it runs and cast
    back by a forward hook just after (a block's original storage is put back), so at most one block exists in
    float32. Every cast is ``bf16/fp16 → fp32 → same dtype``, which is exact: on exit the model's tensors hold the
    same values and dtypes as before. Tensors already in float32 are left alone, and so is a float32 model (the
    context is then a no-op).

    Used to evaluate a bfloat16-stored model with the accuracy of float32 arithmetic, without a float32 copy of the
    whole model.

    Yields
    ------
    nn.Module
        ``model`` itself.
    """
    found = find_decoder_blocks(model)
    blocks = list(found[1]) if found is not None else []
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    outside = _low_precision(t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks)
    pending: dict[int, list[tuple[torch.Tensor, torch.dtype]]] = {}
    offloaded = _float32_placeholders(model)

    def upcast(block: nn.Module, _args: tuple) -> None:
        # a block's original storage is kept while it runs (one block: small) and put back, not recast: tensors
        # sharing it (an EoRA layer's weights are its adapter's factors) keep sharing it
        pending[id(block)] = _upcast(_low_precision((*block.parameters(), *block.buffers())), keep=True)

    def restore(block: nn.Module, _args: tuple, _out: Any) -> None:
        _restore(pending.pop(id(block), []))

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(upcast), b.register_forward_hook(restore))]
    upcast_outside = _upcast(outside, keep=False)  # the embeddings are large: freed while upcast
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for casts in pending.values():  # a forward that raised inside a block
            _restore(casts)
        _restore(upcast_outside)
        for module, key, placeholder in offloaded:
            _set_tensor(module, key, placeholder)


def _float32_placeholders(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Give the low-precision tensors that accelerate keeps offloaded (on ``meta``) float32 placeholders; return
    ``(module, name, original placeholder)`` to put back.

    accelerate casts an offloaded tensor it loads for a forward to its placeholder's dtype: the offloaded layers then
    compute in float32 like the resident ones, and their storage on disk is untouched.
    """
    swapped = []
    for module in model.modules():
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if (tensor is not None and tensor.is_meta and tensor.is_floating_point()
                    and tensor.dtype not in (torch.float32, torch.float64)):
                swapped.append((module, key, tensor))
                _set_tensor(module, key, torch.empty_like(tensor, dtype=torch.float32))
    return swapped


def _set_tensor(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in ``module``'s parameter or buffer slot ``key`` (a parameter slot gets a Parameter)."""
    if key in module._parameters:
        old = module._parameters[key]
        module._parameters[key] = (tensor if isinstance(tensor, nn.Parameter)
                                   else nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        module._buffers[key] = tensor


def _low_precision(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct floating-point tensors of ``tensors`` stored below float32 (tied weights once), not on ``meta``."""
    seen, out = set(), []
    for t in tensors:
        if id(t) in seen or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64) or t.is_meta:
            continue
        seen.add(id(t))
        out.append(t)
    return out


def _upcast(tensors: list[torch.Tensor], keep: bool) -> list[tuple[torch.Tensor, torch.Tensor | torch.dtype]]:
    """Replace each tensor's data by its float32 copy in place; return what :func:`_restore` needs: the original
    data when ``keep`` (it stays allocated meanwhile), else the dtype to cast back to."""
    casts = [(t, t.data if keep else t.dtype) for t in tensors]
    for t, _ in casts:
        t.data = t.data.float()
    return casts


def _restore(casts: list[tuple[torch.Tensor, torch.Tensor | torch.dtype]]) -> None:
    for t, original in casts:
        t.data = original if isinstance(original, torch.Tensor) else t.data.to(original)
