"""Activation statistics of target layers, collected with forward hooks in one streaming pass.

For every target layer the pass accumulates, over all calibration rows ``x`` (one row per token, or per
unfolded patch for ``nn.Conv2d``),

.. math::

    C = \\sum_t x_t x_t^\\top \\in \\mathbb{R}^{n \\times n}, \\qquad
    a = \\sum_t |x_t| \\in \\mathbb{R}^{n}, \\qquad N = \\#\\{t\\},

with ``n`` the layer's input size (``in_features``, or ``in_channels * kh * kw`` for a convolution). ``C`` is all
that whitened SVD (SVD-LLM) and EoRA need, since ``||M X||_F^2 = tr(M C M^T)``; ``a / N`` is ASVD's channel scale.
The accumulation is a plain fp32 sum, so statistics gathered on several devices or runs merge by addition
(:meth:`ActivationStats.merge`).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from compress.targets import TargetSpec, drop_bypassed, find_targets, unwrap_compiled
from tensornets.devices import usable_device


@dataclass
class LayerStats:
    """Input statistics of one layer.

    Attributes
    ----------
    gram : torch.Tensor
        ``(n, n)`` fp32, ``C = Σ_t x_t x_tᵀ`` (a sum, not a mean: its scale does not change any factorization).
    abs_sum : torch.Tensor
        ``(n,)`` fp32, ``Σ_t |x_t|`` (ASVD's channel magnitudes are ``abs_sum / count``).
    count : int
        Number of rows ``N`` accumulated.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    count: int

    @property
    def in_features(self) -> int:
        """Input size ``n`` of the layer."""
        return self.gram.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        """``(n,)`` mean absolute activation per input channel, ``a / N``."""
        return self.abs_sum / self.count

    def merge(self, other: LayerStats) -> LayerStats:
        """Sum of two statistics of the same layer (e.g. gathered on two devices)."""
        if other.gram.shape != self.gram.shape:
            raise ValueError(
                f"cannot merge statistics of input size {other.in_features} into {self.in_features}; "
                "merge statistics of the same layer only"
            )
        return LayerStats(
            self.gram + other.gram.to(self.gram.device),
            self.abs_sum + other.abs_sum.to(self.abs_sum.device),
            self.count + other.count,
        )

    def to(self, device: torch.device | str) -> LayerStats:
        """Copy of the statistics on ``device``."""
        return LayerStats(self.gram.to(device), self.abs_sum.to(device), self.count)


class ActivationStats(Mapping[str, LayerStats]):
    """Per-layer :class:`LayerStats`, keyed by module path, in the order the layers first ran.

    Behaves as a read-only mapping ``name -> LayerStats``; ``order`` is the execution order seen during
    calibration (sequential EoRA relies on it).
    """

    def __init__(self, layers: Mapping[str, LayerStats]):
        self._layers = dict(layers)

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(
                f"no activation statistics for layer {name!r}; statistics exist for {self.order[:8]}"
                f"{' ...' if len(self) > 8 else ''}; collect them with target_modules covering {name!r}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def order(self) -> list[str]:
        """Layer names in execution order."""
        return list(self._layers)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Layer-wise sum with ``other`` (layers present in only one side are kept as they are)."""
        merged = dict(self._layers)
        for name, st in other.items():
            merged[name] = merged[name].merge(st) if name in merged else st
        return ActivationStats(merged)

    def save(self, path: str | Path) -> None:
        """Write the statistics to one safetensors file (layer order and counts in its metadata)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, st in self._layers.items():
            tensors[f"{name}.gram"] = st.gram.contiguous().cpu()
            tensors[f"{name}.abs_sum"] = st.abs_sum.contiguous().cpu()
        meta = {"order": self.order, "count": {n: st.count for n, st in self._layers.items()}}
        save_file(tensors, str(path), metadata={"activation_stats": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "activation_stats" not in header:
            raise ValueError(f"{path} is not an activation statistics file (no 'activation_stats' metadata)")
        meta = json.loads(header["activation_stats"])
        tensors = load_file(str(path))
        return cls(
            {
                n: LayerStats(tensors[f"{n}.gram"], tensors[f"{n}.abs_sum"], int(meta["count"][n]))
                for n in meta["order"]
            }
        )


class StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early (all wanted inputs are captured)."""


def layer_inputs(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``(N, n)`` that ``module``'s weight matrix multiplies, from the module's input ``x``.

    Linear layers (``nn.Linear``, transformers' ``Conv1D``, factorized linears) see the last axis; an
    ``nn.Conv2d`` sees its unfolded patches ``(in_channels * kh * kw)``, matching ``weight.reshape(out, -1)``.

    ``mask``: the batch's ``(B, T)`` real-token mask (:func:`token_mask`). A linear layer whose input is laid out as
    the batch's tokens, ``x: (B, T, n)``, keeps the rows of real tokens only, so that padding never enters the
    statistics; other inputs (a pooled head's ``(B, n)``, a conv's patches) keep every row. A nested ``x`` (what
    ``nn.TransformerEncoder`` passes on with a padding mask) holds only real tokens: all its rows count.
    """
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if isinstance(padding, str):  # 'valid': none; 'same': what the conv pads (the odd element on the right)
            total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if x.is_nested:  # nn.TransformerEncoder's padding-free batch (enable_nested_tensor): its real tokens only
        return torch.cat([part.reshape(-1, part.shape[-1]) for part in x.unbind()])
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def named_inputs(model: nn.Module, batch: Any) -> Any:
    """A tuple / list batch (run as ``model(*batch)``) as ``{parameter name: value}`` of ``model.forward``, so that
    its ``attention_mask`` is found where the forward takes it (``(input_ids, attention_mask)`` for transformers
    models); other batches, and tuples that do not bind, are returned as they are."""
    if not isinstance(batch, (tuple, list)):
        return batch
    try:  # the class's forward: accelerate's hooks replace the instance's with a (*args, **kwargs) wrapper
        arguments = dict(inspect.signature(type(model).forward).bind_partial(model, *batch).arguments)
    except (TypeError, ValueError):
        return batch
    del arguments[next(iter(arguments))]  # self
    return arguments


def token_mask(batch: Any, key: str | None = "attention_mask") -> torch.Tensor | None:
    """The ``(B, T)`` boolean mask of real tokens of a dict batch with a 2-D ``batch[key]`` (a tuple batch goes
    through :func:`named_inputs` first); ``None`` when the batch has none or every token is real (then every row
    counts)."""
    mask = batch.get(key) if isinstance(batch, Mapping) and key is not None else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    mask = mask != 0
    return None if bool(mask.all()) else mask


#: submodules of a multimodal model that never see the text tokens (their inputs are image / audio positions)
_OTHER_TOWERS = ("vision_model", "vision_tower", "visual", "vision_encoder", "image_encoder", "audio_tower")


def mask_keys(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str | None]:
    """Which padding mask of a batch applies to each module's inputs: ``"attention_mask"`` (the input tokens'),
    ``"decoder_attention_mask"`` for what an encoder-decoder model runs after its encoder (decoder, LM head), ``None``
    for a tower that never sees the tokens (CLIP's vision model). Without this, a layer whose sequence merely has the
    tokens' length (a decoder of 6 positions for 6 encoder tokens) lost rows to a mask that is not its own."""
    groups: list[tuple[set[int], str | None]] = []
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    default = "attention_mask"
    if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
        encoder = get_encoder()
        if isinstance(encoder, nn.Module):  # the rest (decoder, LM head) runs on the decoder's positions
            groups.append(({id(m) for m in encoder.modules()}, "attention_mask"))
            default = "decoder_attention_mask"
    for owner in (model, getattr(model, "model", None)):
        for attr in _OTHER_TOWERS:
            tower = getattr(owner, attr, None) if isinstance(owner, nn.Module) else None
            if isinstance(tower, nn.Module):
                groups.append(({id(m) for m in tower.modules()}, None))
    return {name: next((key for ids, key in groups if id(module) in ids), default) for name, module in modules.items()}


def run_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Forward one calibration batch: a tensor (``model(x)``), a tuple/list (``model(*b)``) or a dict (``model(**b)``)."""
    if isinstance(batch, torch.Tensor):
        model(batch.to(device))
    elif isinstance(batch, Mapping):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in batch])
    else:
        raise TypeError(
            f"calibration batch of type {type(batch).__name__} is not supported; pass tensors, tuples or dicts "
            "of model inputs"
        )


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def accumulate_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    stats_device: torch.device | str | None = None,
    stop_after_all: bool = False,
    progress: bool | None = None,
    desc: str = "calibration",
) -> ActivationStats:
    """Accumulate :class:`LayerStats` for the given module objects while ``batches`` run through ``model``.

    Parameters
    ----------
    model : nn.Module
        Model the batches are fed to (in ``eval`` mode, without gradients).
    modules : Mapping[str, nn.Module]
        Name -> module whose inputs are recorded (the names key the result).
    batches : Iterable
        Calibration batches, see :func:`run_batch`; a 2-D ``attention_mask`` (a dict's, or a tuple's at the
        forward's ``attention_mask`` position) leaves padding out (:func:`token_mask`).
    stats_device : torch.device or str, optional
        Where the sums live; default: the device the activations are on.
    stop_after_all : bool
        End each forward pass once every module has seen its input (sequential calibration of early layers).
    progress : bool, optional
        Show a tqdm bar; ``None`` shows it only on a terminal.
    desc : str
        Progress-bar label.

    Returns
    -------
    ActivationStats
        In execution order.

    Raises
    ------
    ValueError
        If ``batches`` is empty, a module never received input, or an activation was NaN or infinite.
    """
    if stats_device is not None:
        stats_device = usable_device(stats_device, "stats_device", fix="pass None (each input's own device) or 'cpu'")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        # a (B, T) tensor iterates over its rows, each run as a batch of one 1-D sequence: a shape error far inside
        raise TypeError(f"batches must be an iterable of model inputs (a list, a DataLoader), got "
                        f"{type(batches).__name__}; for one tensor of token ids pass [ids] or list(ids.split(8))")
    sums: dict[str, list] = {}
    seen: set[str] = set()
    current: dict[str, dict] = {"masks": {}}  # the running batch's real-token masks, by mask_keys' keys
    keys = mask_keys(model, modules)

    def make_hook(name: str, module: nn.Module):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = layer_inputs(module, args[0].detach(), current["masks"][keys[name]])
            x = x.to(stats_device if stats_device is not None else x.device, torch.float32)
            if name not in sums:
                n = x.shape[1]
                sums[name] = [torch.zeros(n, n, dtype=torch.float32, device=x.device),
                              torch.zeros(n, dtype=torch.float32, device=x.device), 0]
            acc = sums[name]
            acc[0].addmm_(x.T, x)
            acc[1].add_(x.abs().sum(0))
            acc[2] += x.shape[0]
            seen.add(name)
            if stop_after_all and len(seen) == len(modules):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in modules.items()]
    device = model_device(model)
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=None if progress is None else not progress, leave=False):
                seen.clear()
                named = named_inputs(model, batch)
                current["masks"] = {key: token_mask(named, key) for key in set(keys.values())}
                try:
                    run_batch(model, batch, device)
                except StopForward:
                    pass
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration batches are empty; pass at least one batch (e.g. 64-256 sequences)")
    missing = [n for n in modules if n not in sums]
    if missing:
        raise ValueError(
            f"layers {missing[:5]} received no input during calibration; check that they are used in the "
            "forward pass, or exclude them with exclude_modules"
        )
    for name, (gram, abs_sum, _) in sums.items():
        if not (torch.isfinite(gram).all() and torch.isfinite(abs_sum).all()):
            raise ValueError(
                f"calibration activations entering layer {name!r} contain NaN or inf (it is the first such layer "
                "in execution order); check the calibration inputs and the model's dtype (fp16 overflow), or "
                "run in float32"
            )
    _warn_if_rank_deficient({n: (g.shape[0], c) for n, (g, _, c) in sums.items()})
    return ActivationStats({n: LayerStats(g, a, c) for n, (g, a, c) in sums.items()})


class CalibrationWarning(UserWarning):
    """Calibration data too small for the layers it calibrates (fewer rows than a layer's inputs)."""


def _warn_if_rank_deficient(sizes: Mapping[str, tuple[int, int]]) -> None:
    """Warn when a layer saw fewer rows than it has inputs: its ``X^T X`` is then singular, and activation-aware fits
    (whitening, GPTQ, EoRA) fit the calibration rows instead of the model's inputs. ``sizes``: name -> ``(n, rows)``.

    The text names no layer, so compressing a model block by block warns once, not once per block.
    """
    short = {name: (n, rows) for name, (n, rows) in sizes.items() if rows < n}
    if short:
        widest = max(n for n, _ in short.values())
        rows = min(r for _, r in short.values())
        warnings.warn(
            f"{len(short)} target layer(s) saw fewer calibration rows (down to {rows}) than they have inputs (up to "
            f"{widest}): their activation statistics are rank-deficient and activation-aware fits (whitening, GPTQ, "
            f"EoRA) overfit the calibration data; calibrate on several times {widest} rows (tokens; sequences for a "
            "layer that sees one row per sequence, such as a pooler or a classification head)",
            CalibrationWarning, stacklevel=2,
        )


@dataclass
class CrossStats:
    """Statistics of one layer's inputs in two models fed the same calibration data, row for row.

    ``X`` are the layer's inputs in a *reference* model (the dense original), ``X̃`` its inputs in the model being
    compensated (compressed, with earlier residuals applied). Sequential EoRA needs all three second moments:

    Attributes
    ----------
    reference : LayerStats
        ``Xᵀ X`` (``(n, n)``), for the reference output energy ``‖W X‖²``.
    current : LayerStats
        ``X̃ᵀ X̃``, the metric the residual is fitted in.
    cross : torch.Tensor
        ``(n, n)`` fp32, ``X̃ᵀ X = Σ_t x̃_t x_tᵀ``.
    """

    reference: LayerStats
    current: LayerStats
    cross: torch.Tensor

    def merge(self, other: CrossStats) -> CrossStats:
        """Sum of two statistics of the same layer on disjoint calibration data (e.g. two folds)."""
        if other.cross.shape != self.cross.shape:
            raise ValueError(f"cannot merge cross statistics of shape {tuple(other.cross.shape)} into "
                             f"{tuple(self.cross.shape)}; merge statistics of the same layer only")
        return CrossStats(self.reference.merge(other.reference), self.current.merge(other.current),
                          self.cross + other.cross.to(self.cross.device))


def _capture_inputs(
    model: nn.Module, modules: Mapping[str, nn.Module], batch: Any, on_input, stop_after_all: bool
) -> None:
    """Run ``batch`` through ``model`` and call ``on_input(name, rows)`` with each module's input rows (fp32)."""
    seen: set[str] = set()
    keys = mask_keys(model, modules)
    named = named_inputs(model, batch)
    masks = {key: token_mask(named, key) for key in set(keys.values())}

    def make_hook(name: str, module: nn.Module):
        def hook(_mod: nn.Module, args: tuple) -> None:
            on_input(name, layer_inputs(module, args[0].detach(), masks[keys[name]]).to(torch.float32))
            seen.add(name)
            if stop_after_all and len(seen) == len(modules):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in modules.items()]
    try:
        run_batch(model, batch, model_device(model))
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def accumulate_cross_stats(
    reference: nn.Module,
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[Any],
    *,
    stop_after_all: bool = True,
    progress: bool | None = None,
    desc: str = "cross calibration",
) -> dict[str, CrossStats]:
    """:class:`CrossStats` of the layers ``names`` (same paths in both models), in one pass over ``batches``.

    Each batch runs through ``reference`` (its layer inputs ``X`` are held for that batch only) and then through
    ``model``, whose layer inputs ``X̃`` are paired with them row for row. Memory: one batch's inputs of the named
    layers. A layer called several times per forward pairs its calls in order.

    Raises
    ------
    ValueError
        If ``batches`` is empty, a layer received no input, the two models gave different row counts for a layer, or
        an activation was NaN or infinite.
    """
    names = list(names)
    ref_modules = {n: reference.get_submodule(n) for n in names}
    modules = {n: model.get_submodule(n) for n in names}
    sums: dict[str, list] = {}
    was_training = (reference.training, model.training)
    reference.eval()
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=None if progress is None else not progress, leave=False):
                held: dict[str, list[torch.Tensor]] = {}
                # a copy: the rows may be a view of the activation, which an in-place op later in the forward
                # (``h += f(h)``) rewrites before it is paired
                _capture_inputs(reference, ref_modules, batch,
                                lambda n, x: held.setdefault(n, []).append(x.clone()), stop_after_all)

                def pair(name: str, xt: torch.Tensor) -> None:
                    if not held.get(name):
                        raise ValueError(f"layer {name!r} ran more often in the compensated model than in the reference")
                    x = held[name].pop(0).to(xt.device)
                    if x.shape != xt.shape:
                        raise ValueError(f"layer {name!r}: reference inputs {tuple(x.shape)} and compensated inputs "
                                         f"{tuple(xt.shape)} differ; both models must see the same batches")
                    if name not in sums:
                        n = x.shape[1]
                        sums[name] = [x.new_zeros(n, n), x.new_zeros(n), x.new_zeros(n, n), x.new_zeros(n),
                                      x.new_zeros(n, n), 0]
                    acc = sums[name]
                    acc[0].addmm_(x.T, x)
                    acc[1].add_(x.abs().sum(0))
                    acc[2].addmm_(xt.T, xt)
                    acc[3].add_(xt.abs().sum(0))
                    acc[4].addmm_(xt.T, x)
                    acc[5] += x.shape[0]

                _capture_inputs(model, modules, batch, pair, stop_after_all)
                n_batches += 1
    finally:
        reference.train(was_training[0])
        model.train(was_training[1])
    if n_batches == 0:
        raise ValueError("calibration batches are empty; pass at least one batch (e.g. 64-256 sequences)")
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"layers {missing[:5]} received no input during calibration; check that they are used in "
                         "the forward pass, or exclude them with exclude_modules")
    out = {}
    for name in names:
        g, a, gt, at, cross, count = sums[name]
        if not all(torch.isfinite(t).all() for t in (g, gt, cross)):
            raise ValueError(f"calibration activations entering layer {name!r} contain NaN or inf; check the "
                             "calibration inputs and the model's dtype (fp16 overflow), or run in float32")
        out[name] = CrossStats(LayerStats(g, a, count), LayerStats(gt, at, count), cross)
    return out


def collect_activation_stats(
    model: nn.Module,
    calib_batches: Iterable[Any],
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec = None,
    *,
    stats_device: torch.device | str | None = None,
    progress: bool | None = None,
) -> ActivationStats:
    """One calibration pass: input second moments of every target layer.

    Parameters
    ----------
    model : nn.Module
        The (dense) model; it is run in ``eval`` mode under ``torch.no_grad`` and is not modified.
    calib_batches : Iterable
        Batches of model inputs: tensors (``model(x)``, e.g. ``input_ids`` of shape ``(B, T)``), tuples
        (``model(*b)``) or dicts (``model(**b)``). Tensors are moved to the model's device. A 2-D
        ``attention_mask`` (a tokenizer's ``padding=True`` output; in a tuple, at the position where ``model.forward``
        takes it, as in ``(input_ids, attention_mask)``) marks the real tokens: padded positions are left out of every
        layer's statistics (see :func:`layer_inputs`).
    target_modules, exclude_modules : str or list of str, optional
        PEFT-style selection (see :func:`compress.targets.find_targets`).
    stats_device : torch.device or str, optional
        Device holding the ``(n, n)`` sums (default: where the activations are). ``"cpu"`` keeps accelerator
        memory free for large models.
    progress : bool, optional
        tqdm bar over batches (default: only on a terminal).

    Returns
    -------
    ActivationStats
        ``name -> LayerStats`` with ``C = Σ x xᵀ`` of shape ``(n, n)``, ``n`` = layer input size.

    Examples
    --------
    >>> stats = collect_activation_stats(model, [ids[i:i + 8] for i in range(0, 64, 8)],
    ...                                  target_modules=["gate_proj", "up_proj", "down_proj"])
    >>> stats["model.layers.0.mlp.up_proj"].gram.shape
    torch.Size([576, 576])
    """
    model = unwrap_compiled(model)
    # 'all-linear': not the layers torch never calls (nn.MultiheadAttention.out_proj): no input reaches them
    targets = drop_bypassed(model, find_targets(model, target_modules, exclude_modules), target_modules, "dense",
                            needs_stats=True)
    return accumulate_stats(model, targets, calib_batches, stats_device=stats_device, progress=progress)
