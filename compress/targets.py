"""Find, read and replace the layers that compression targets.

Supported layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 style, weight stored ``(in, out)``) and
``nn.Conv2d`` with ``groups=1`` (its kernel is handled as the matrix ``(C_out, C_in · kh · kw)``); once compressed,
:class:`tensornets.FactorizedLinear` and :class:`tensornets.FactorizedConv2d`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tensornets import FactorizedConv2d, FactorizedLinear
from tensornets.bypassed import fused_weights, weight_read_directly, weight_recomputed

TargetSpec = str | Sequence[str] | None

#: layer types that compression can target
DENSE_TYPES = (nn.Linear, Conv1D, nn.Conv2d)
#: layer types an EoRA residual can be computed for (compressed layers included)
ANY_TYPES = (*DENSE_TYPES, FactorizedLinear, FactorizedConv2d)


# ---------------------------------------------------------------------------------------------- target selection
def _output_layer_name(model: nn.Module) -> str | None:
    """Name of the output embedding (LM head), which ``"all-linear"`` leaves out as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _supported(module: nn.Module, types: tuple[type, ...]) -> bool:
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d in types and module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, types)


def _is_layer(module: nn.Module) -> bool:
    """A layer with a weight of its own (a linear or a convolution), not a container matched by a loose pattern."""
    return isinstance(module, (nn.Linear, Conv1D, nn.modules.conv._ConvNd))


def _describe(module: nn.Module) -> str:
    """The class name, and for a convolution what makes it unsupported (groups, padding mode)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"Conv2d, groups={module.groups}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"Conv2d, padding_mode={module.padding_mode!r}"
    return type(module).__name__


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def exact_names(names: Sequence[str]) -> str:
    """A ``target_modules`` regex that selects exactly the modules called ``names``.

    A list of names selects by suffix (PEFT's rule): within one decoder block ``["output.dense"]`` also selects
    ``attention.output.dense``. Code that has resolved its layers already passes them on with this instead.
    """
    if not names:
        raise ValueError("names is empty: there is no layer to select")
    return "|".join(re.escape(n) for n in names)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``model._orig_mod``), or ``model`` itself.

    Compression, statistics and checkpoints work on the module: under the wrapper every layer's name would carry an
    ``_orig_mod.`` prefix that neither transformers nor PEFT knows.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _warn_fused(model: nn.Module, target_modules: str) -> None:
    """Warn that ``target_modules`` leaves the model's fused 3-D weights (:func:`fused_weights`) dense."""
    fused = fused_weights(model)
    if fused:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in fused})
        warnings.warn(f"target_modules={target_modules!r} leaves {sum(fused.values()):,} parameters dense: "
                      f"{len(fused)} {'/'.join(kinds)} module(s) ({list(fused)[:2]}) hold them as fused 3-D tensors "
                      "(a mixture's experts), and compression supports nn.Linear, Conv1D and Conv2d layers only",
                      UserWarning, stacklevel=3)


#: where transformers architectures keep their feed-forward linears, tried in order by :func:`mlp_targets`
MLP_PATTERNS = (
    # Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, GPT-NeoX, GPT-2; experts held as linears too (a mixture's shared
    # expert; transformers 4), but not a mixture's router
    r".*\.(mlp|feed_forward|ffn)\.(?!(gate|router|shared_expert_gate)$).*",
    r".*\.(fc1|fc2)",  # OPT (the block's own fc1 / fc2)
    r".*\.(intermediate\.dense|\d+\.output\.dense)",  # BERT-style encoders
)


def mlp_targets(model: nn.Module) -> str:
    """The regex of ``model``'s feed-forward (MLP) linears: the first of :data:`MLP_PATTERNS` that selects any.

    Feed-forward layers hold most of a transformer's parameters and tolerate factorization better than attention,
    so factorizing methods default to them; their names differ by architecture (``gate_proj / up_proj /
    down_proj``, ``fc1 / fc2``, ``dense_h_to_4h``, GPT-2's ``mlp.c_fc / mlp.c_proj``).

    Raises
    ------
    ValueError
        If no pattern selects a linear layer (name the layers instead).
    """
    for pattern in MLP_PATTERNS:
        try:
            find_targets(model, pattern)
        except ValueError:
            continue
        _warn_fused(model, "mlp")
        return pattern
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))][:6]
    fused = fused_weights(model)
    why = (f"its feed-forward weights are fused 3-D tensors ({list(fused)[:2]}), which compression does not support"
           if fused else "none under an 'mlp' / 'feed_forward' / 'ffn' module, no fc1 / fc2")
    raise ValueError(f"target_modules='mlp' found no feed-forward linears in {type(model).__name__} ({why}); name "
                     f"the layers instead, e.g. from {names}")


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec = None,
    *,
    types: tuple[type, ...] = DENSE_TYPES,
) -> dict[str, nn.Module]:
    """Target layers selected PEFT-style, in ``named_modules`` order.

    Parameters
    ----------
    model : nn.Module
        The model to search.
    target_modules : str or list of str
        ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output embedding (as PEFT); a list: modules
        whose name equals an entry or ends with ``"." + entry`` (``["q_proj", "mlp.up_proj"]``); any other string: a
        regular expression that must match the full name (``r".*\\.mlp\\..*"``). ``None`` means ``"all-linear"``.
    exclude_modules : str or list of str, optional
        Same syntax; matching modules are dropped.
    types : tuple of type
        Layer types that may be selected (``nn.Conv2d`` only with ``groups=1`` and zero padding).

    Returns
    -------
    dict[str, nn.Module]
        Name -> module.

    Raises
    ------
    ValueError
        If a list entry or the regex selects no supported layer (the message lists what it matched instead and a
        few available names), or nothing remains after exclusion. An ``exclude_modules`` entry that matches no
        module warns (a typo would leave the layer it meant to protect compressed).
    """
    if target_modules is None:
        target_modules = "all-linear"
    for argument, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if spec is not None and not isinstance(spec, str) and not (
                isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(e, str) for e in spec)):
            raise TypeError(f"{argument}={spec!r} must be a list of module names (['q_proj', 'v_proj']), a regex "
                            "string or 'all-linear'")
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as err:
                raise ValueError(f"{argument}={spec!r} is not a valid regular expression ({err}); fix it, or pass a "
                                 "list of module names (['q_proj', 'v_proj'])") from None
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        head = _output_layer_name(model)
        found = {
            n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, FactorizedLinear)) and isinstance(m, types) and n != head
        }
        _warn_fused(model, target_modules)
    else:
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        found = {}
        for entry in entries:
            spec = entry if isinstance(target_modules, str) else [entry]
            hits = {n: m for n, m in model.named_modules() if n and _matches(n, spec)}
            good = {n: m for n, m in hits.items() if _supported(m, types)}
            if not good:
                available = [n for n, m in model.named_modules() if _supported(m, types)]
                what = (
                    f"it matched only unsupported modules {[f'{n} ({_describe(m)})' for n, m in hits.items()][:4]}"
                    if hits else "it matched no module"
                )
                if isinstance(target_modules, str) and not hits and re.fullmatch(r"[\w.]+", entry):
                    what += (f" (a string is a regex over the full module name; to select modules by name pass a "
                             f"list: [{entry!r}])")
                raise ValueError(
                    f"target_modules entry {entry!r}: {what}; supported layers are "
                    f"{', '.join(t.__name__ for t in types)} (Conv2d with groups=1 and zero padding), "
                    + (f"e.g. {available[:6]}" if available else "and this model has none")
                )
            skipped = [n for n, m in hits.items() if n not in good and _is_layer(m)]
            if skipped:
                warnings.warn(f"target_modules entry {entry!r} also matches {len(skipped)} layer(s) compression does "
                              f"not support, left as they are: {[f'{n} ({_describe(hits[n])})' for n in skipped][:4]}",
                              UserWarning, stacklevel=2)
            found.update(good)
    if exclude_modules:
        # an entry that names no module may be a typo, and the layer it meant to protect is then compressed: say so
        # (a warning, not an error: one exclusion list may serve several models, e.g. ["lm_head", "pooler.dense"])
        names = [n for n, _ in model.named_modules() if n]
        entries = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        for entry in entries:
            spec = entry if isinstance(exclude_modules, str) else [entry]
            if not any(_matches(n, spec) for n in names):
                warnings.warn(f"exclude_modules entry {entry!r} matches no module of this model and protects nothing; "
                              f"check its spelling (layers are named like {sorted(found)[:3]})", UserWarning,
                              stacklevel=2)
        found = {n: m for n, m in found.items() if not _matches(n, exclude_modules)}
    if not found:
        convs = [n for n, m in model.named_modules() if _supported(m, types) and isinstance(m, nn.Conv2d)]
        if isinstance(target_modules, str) and target_modules.lower() == "all-linear" and convs and not exclude_modules:
            raise ValueError(f"target_modules='all-linear' selects linear layers (nn.Linear, Conv1D) and this model "
                             f"has none; name its Conv2d layers in a list or a regex, e.g. target_modules={convs[:4]}")
        raise ValueError(
            f"no target layers left (target_modules={target_modules!r}, exclude_modules={exclude_modules!r}); "
            + ("loosen exclude_modules or name other layers" if exclude_modules else "name other layers")
        )
    return found


# ---------------------------------------------------------------------------------------------- layer access
def check_not_shared(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` if a target's weight is also a parameter of a module that is not a target.

    Tied embeddings are the usual case: compressing a tied ``lm_head`` would silently change the input embeddings
    too (one tensor), and the report would count only the head.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0])
    for name, module in targets.items():
        weight = getattr(module, "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != name]
        aliases = [o for o in others if model.get_submodule(o) is module]
        if aliases:
            raise ValueError(
                f"target {name!r} is one module registered under several names ({[name, *aliases]}): replacing it "
                f"would change {name!r} only; register it once, or exclude it"
            )
        tied = [o for o in others if o in targets]
        if tied:
            raise ValueError(
                f"targets {name!r} and {tied[0]!r} share one weight (tied): compressed apart they would be untied "
                f"and the shared weight counted twice, and compressing one would change the other; exclude both "
                f"(exclude_modules=[{name!r}, {tied[0]!r}]), or untie them first (e.g. {tied[0]}.weight = "
                f"nn.Parameter({tied[0]}.weight.detach().clone()))"
            )
        if others:
            raise ValueError(
                f"target {name!r} shares its weight with {others[0]!r} (tied weights), which compressing it would "
                f"change too; exclude {name!r}, or untie it first (e.g. {name}.weight = nn.Parameter("
                f"{name}.weight.detach().clone()) and config.tie_word_embeddings = False)"
            )


def check_weights_writable(model: nn.Module, targets: dict[str, nn.Module], kind: str) -> None:
    """Raise ``ValueError`` for a target whose weight cannot be read, or whose compressed weight the model would not
    use.

    - A lazy module not materialized yet (no weight to read).
    - A weight recomputed by a forward pre-hook (``torch.nn.utils.prune``, the old ``torch.nn.utils.weight_norm``):
      ``.weight`` is a stale copy of ``weight_orig * weight_mask``, and a written one is overwritten on the next
      forward. Refused for every method.
    - A parametrized weight (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal``):
      ``.weight`` is computed on each access, so a dense method (``kind="dense"``) writing into it changes nothing.
      A factorizing method replaces the layer by one built from the current weight, which is fine.
    - A layer its parent reads without calling it (:func:`tensornets.bypassed.weight_read_directly`: an
      ``nn.MultiheadAttention``'s ``out_proj``, an ``nn.TransformerEncoderLayer``'s linears): a factorizing method's
      replacement would not run (or fail: it has no ``.weight``). Dense methods overwrite the weight the parent
      reads, which is fine.
    """
    for name, module in targets.items():
        if isinstance(module, (FactorizedLinear, FactorizedConv2d)):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"target {name!r} is a lazy module not materialized yet (its weight has no shape); run "
                             "one forward pass of the model first")
        recomputed = weight_recomputed(module)
        if recomputed == "parametrized":
            if kind == "dense":
                raise ValueError(
                    f"target {name!r} has a parametrized weight (weight_norm / spectral_norm / orthogonal "
                    "parametrization): its .weight is recomputed on every access, so writing the compressed weight "
                    f"would change nothing; fold it first with torch.nn.utils.parametrize.remove_parametrizations("
                    f"model.get_submodule({name!r}), 'weight'), or exclude it"
                )
        elif recomputed == "hook":
            raise ValueError(
                f"target {name!r}: its weight is not a parameter but recomputed by a forward pre-hook "
                "(torch.nn.utils.prune or the old torch.nn.utils.weight_norm), so it may be stale and a written one "
                f"is overwritten on the next forward; make it permanent first (torch.nn.utils.prune.remove(module, "
                "'weight') or torch.nn.utils.remove_weight_norm(module)), or exclude it"
            )
        bypass = weight_read_directly(model, name) if kind == "factorized" else None
        if bypass is not None:
            raise ValueError(
                f"target {name!r}: {bypass[0]}, so a factorized replacement would not run; exclude it "
                f"(exclude_modules=[{name!r}]) or use a dense method (rtn, gptq, sparsegpt)"
            )


def drop_bypassed(model: nn.Module, targets: dict[str, nn.Module], spec: TargetSpec, kind: str,
                  needs_stats: bool = False) -> dict[str, nn.Module]:
    """``targets`` without the layers the method cannot serve there, when ``spec`` is ``"all-linear"``.

    Torch reads some layers' weights without calling them (:func:`tensornets.bypassed.weight_read_directly`):
    a factorized replacement (``kind="factorized"``) would not run there, and a layer never called
    (``nn.MultiheadAttention.out_proj``) receives no input to take statistics from (``needs_stats``). ``"all-linear"``
    means every layer that can take the method, so these are left out with a warning; named targets are left to
    :func:`check_weights_writable`, which refuses them.
    """
    if spec != "all-linear":
        return targets
    bypassed = {name: weight_read_directly(model, name) for name in targets}
    dropped = [name for name, bypass in bypassed.items()
               if bypass is not None and (kind == "factorized" or (needs_stats and bypass[1]))]
    if dropped and len(dropped) == len(targets):
        raise ValueError(f"target_modules='all-linear' found no layer this method can take: torch reads the weights "
                         f"of all {len(dropped)} linears (such as {dropped[0]!r}) without calling them; use a dense "
                         "method (rtn) or name the targets")
    if dropped:
        why = ("a factorized layer there would not run" if kind == "factorized" else
               "they receive no input to take activation statistics from")
        warnings.warn(f"target_modules='all-linear' leaves {len(dropped)} layer(s) such as {dropped[0]!r} out: torch "
                      "reads their weights without calling them (nn.MultiheadAttention's out_proj, a batch_first "
                      f"nn.TransformerEncoderLayer's linears), so {why}", UserWarning, stacklevel=3)
    return {name: module for name, module in targets.items() if name not in dropped}


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"factorized_linear"`` or ``"factorized_conv2d"``."""
    for kind, cls in (
        ("conv1d", Conv1D), ("linear", nn.Linear), ("conv2d", nn.Conv2d),
        ("factorized_linear", FactorizedLinear), ("factorized_conv2d", FactorizedConv2d),
    ):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"{type(module).__name__} is not a supported layer ({', '.join(t.__name__ for t in ANY_TYPES)})")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``(out, in)`` matrix its inputs are multiplied by (detached).

    ``Conv1D.weight`` is stored ``(in, out)`` and is transposed; a conv kernel is reshaped to
    ``(C_out, C_in · kh · kw)``; factorized layers are rebuilt densely.
    """
    kind = layer_kind(module)
    with torch.no_grad():
        if kind == "linear":
            return module.weight.detach()
        if kind == "conv1d":
            return module.weight.detach().T
        if kind == "conv2d":
            return module.weight.detach().reshape(module.out_channels, -1)
        if kind == "factorized_linear":
            return module.factorization.to_dense().detach()
        return module.weight_dense().detach().reshape(module.out_channels, -1)


def set_dense_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write the ``(out, in)`` matrix ``W`` into a dense layer's weight (inverse of :func:`dense_weight`)."""
    kind = layer_kind(module)
    with torch.no_grad():
        target = module.weight
        if kind == "conv1d":
            W = W.T
        target.copy_(W.reshape(target.shape).to(target.dtype))


def weight_parameters(module: nn.Module) -> int:
    """Parameters of the layer's weight (bias excluded): the count ``keep`` refers to."""
    kind = layer_kind(module)
    if kind == "factorized_linear":
        return module.factorization.num_parameters
    if kind == "factorized_conv2d":
        return module.num_parameters - (0 if module.bias is None else module.out_channels)
    return module.weight.numel()


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``, in the train / eval mode of the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(model.get_submodule(name).training)
    setattr(parent, child, new)

