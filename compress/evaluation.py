"""Language-model quality measures used to compare compressed models with the dense one."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity", "token_nll"]

#: predicted tokens whose log-softmax over the vocabulary exists at once (32 x 49152 floats: 6 MB for SmolLM2)
NLL_CHUNK = 32


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = NLL_CHUNK) -> torch.Tensor:
    r"""Per-token negative log-likelihood ``-log softmax(logits[t])[targets[t]]``, ``chunk`` tokens at a time.

    .. math::

        \ell_t = \log \sum_v e^{z_{t,v}} - z_{t, y_t}

    computed in float32 (bfloat16 / float16 logits are upcast a chunk at a time) by ``F.cross_entropy`` on
    ``chunk`` rows at once, so only ``chunk x vocab`` floats of log-softmax exist instead of a second copy of the
    logits. Each row's value does not depend on the chunking: the result is bitwise that of one
    ``F.cross_entropy(logits.float(), targets, reduction="none")``.

    Parameters
    ----------
    logits
        ``(T, vocab)`` floating point, e.g. the logits of one sequence without its last position.
    targets
        ``(T,)`` integer token ids in ``[0, vocab)``.
    chunk
        Rows per log-softmax, ``>= 1``.

    Returns
    -------
    torch.Tensor
        ``(T,)`` float32.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a (tokens, vocab) floating tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be a ({logits.shape[0]},) integer tensor (one token id per logits row), got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an int >= 1 (tokens per log-softmax)")
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        out[rows] = F.cross_entropy(logits[rows].float(), targets[rows], reduction="none")
    return out


def perplexity(
    model: nn.Module,
    batches: Iterable[torch.Tensor] | torch.Tensor,
    device: torch.device | str | None = None,
) -> float:
    r"""Perplexity of a causal language model on batches of token ids.

    .. math::

        \mathrm{ppl} = \exp\Big(\frac{1}{T} \sum_{b} \sum_{t=1}^{L_b - 1}
        -\log p(x_{b,t} \mid x_{b,<t})\Big)

    where ``T`` is the total number of predicted tokens over all batches (every position but
    the first of each sequence). Tokens are pooled before the mean, so batches of different
    sizes weigh by their token count, not equally. Runs under ``torch.no_grad`` in eval
    mode; the model's previous train / eval mode is restored afterwards.

    Memory: the logits of :data:`NLL_CHUNK` tokens at a time. The model runs up to its output
    layer (``get_output_embeddings()``, e.g. the LM head), which is then applied to
    :data:`NLL_CHUNK` positions at a time, so a ``(seq, vocab)`` logits tensor never exists
    (50 MB for 256 tokens of SmolLM2). Models whose logits are not that layer's output as is
    (soft-capping or scaling after it; checked once on two tokens) or that have none produce
    their full logits, and only the log-softmax is chunked (:func:`token_nll`). Each token's NLL
    is computed in float32 and they are summed in float64, once per batch: the result is the
    perplexity of the unchunked cross entropy up to that float64 sum.

    Parameters
    ----------
    model
        Any Hugging Face causal LM: ``model(input_ids=ids).logits`` has shape
        ``(batch, seq, vocab)``.
    batches
        An iterable of LongTensors of shape ``(batch, seq)`` or ``(seq,)`` -- e.g. the
        ``eval_batches`` of :func:`compress.models.token_slices` -- or a single tensor of
        shape ``(n, seq)``, treated as ``n`` sequences. Sequences are independent windows
        (no state carries over between them); each needs ``seq >= 2``.
    device
        Where to run; default: the device of the model's first parameter. Batches are
        moved there; the model is not moved.

    Returns
    -------
    float
        The perplexity, ``>= 1`` for a proper model. ``inf`` or ``nan`` is returned as is
        (a badly compressed model can overflow), never raised.

    Raises
    ------
    ValueError
        If there are no tokens to predict, or a batch is not an integer tensor of rank 1 or 2.

    Examples
    --------
    >>> from compress.models import load_smollm2, token_slices
    >>> model, tok = load_smollm2()  # doctest: +SKIP
    >>> _, held_out = token_slices(tok, 0, 4096, 512)  # doctest: +SKIP
    >>> perplexity(model, held_out)  # doctest: +SKIP
    """
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(batches, torch.Tensor):
        batches = [batches.unsqueeze(0) if batches.dim() == 1 else batches]

    # Sum in float64: 10^5+ token NLLs summed in float32 lose digits the comparisons need.
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    was_training = model.training
    model.eval()
    head, head_is_last = _output_layer(model), None
    try:
        with torch.no_grad():
            for i, ids in enumerate(batches):
                if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
                    got = f"{type(ids).__name__}" if not isinstance(ids, torch.Tensor) else (
                        f"{ids.dtype} tensor of shape {tuple(ids.shape)}"
                    )
                    raise ValueError(
                        f"batches[{i}] is a {got}; pass LongTensors of shape (batch, seq) or (seq,) "
                        f"as returned by compress.models.token_slices"
                    )
                ids = ids.to(device=device, dtype=torch.long)
                if ids.dim() == 1:
                    ids = ids.unsqueeze(0)
                if ids.shape[1] < 2:
                    continue
                if head_is_last is None:
                    head_is_last = head is not None and _logits_are_head_output(model, head, ids)
                if head_is_last:
                    nll = _head_nll(head, _head_input(model, head, ids), ids)
                else:
                    logits = model(input_ids=ids, use_cache=False).logits
                    # Position t predicts token t+1, one sequence (a contiguous view, no copy) at a time.
                    nll = torch.cat([token_nll(logits[b, :-1], ids[b, 1:]) for b in range(ids.shape[0])])
                    del logits
                total_nll += nll.double().sum()
                total_tokens += nll.numel()
    finally:
        model.train(was_training)

    if total_tokens == 0:
        raise ValueError(
            "batches hold no token to predict (empty, or every sequence shorter than 2 tokens); "
            "pass at least one (batch, seq>=2) LongTensor"
        )
    mean_nll = (total_nll / total_tokens).item()
    # math.exp raises OverflowError past ~709; an overflowing model reports inf instead.
    return math.exp(mean_nll) if not mean_nll > 709.0 else math.inf


class _HeadReached(Exception):
    """Raised by the output layer's pre-hook: the model stops before computing its logits."""


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The module computing the logits (``get_output_embeddings()``), or ``None``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def _logits_are_head_output(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits are ``head``'s output as is, on the first two tokens of one sequence (a model that
    soft-caps or scales its logits after the head fails this, and keeps its full logits)."""
    outputs: list[Any] = []
    handle = head.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        logits = model(input_ids=ids[:1, :2], use_cache=False).logits
    finally:
        handle.remove()
    return (len(outputs) == 1 and isinstance(outputs[0], torch.Tensor) and outputs[0].shape == logits.shape
            and torch.equal(outputs[0], logits))


def _head_input(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``head``'s input ``(batch, seq, hidden)`` for ``ids``: the model runs up to it and stops."""
    captured: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _HeadReached

    handle = head.register_forward_pre_hook(stop)
    try:
        model(input_ids=ids, use_cache=False)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not captured or captured[0].shape[:2] != ids.shape:
        raise RuntimeError(f"{type(model).__name__} did not call its output layer on every position of a "
                           f"{tuple(ids.shape)} batch; its logits cannot be computed in chunks")
    return captured[0]


def _head_nll(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``ids[:, 1:]`` from the head applied to :data:`NLL_CHUNK` positions of ``hidden`` at a
    time, ``(batch · (seq - 1),)`` float32 in the order of ``ids[:, 1:].reshape(-1)``."""
    seq = ids.shape[1]
    out = []
    for b in range(ids.shape[0]):
        for start in range(0, seq - 1, NLL_CHUNK):
            stop = min(start + NLL_CHUNK, seq - 1)
            logits = head(hidden[b, start:stop])
            out.append(F.cross_entropy(logits.float(), ids[b, start + 1:stop + 1], reduction="none"))
    return torch.cat(out)
