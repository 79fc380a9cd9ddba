"""Language-model quality measures used to compare compressed models with the dense one."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity"]


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
                logits = model(input_ids=ids, use_cache=False).logits
                # Position t predicts token t+1; upcast so bf16/fp16 models get an fp32 softmax.
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    ids[:, 1:].reshape(-1),
                    reduction="sum",
                )
                total_nll += nll.double()
                total_tokens += ids[:, 1:].numel()
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
