"""Batched matrix products that ``torch.compile`` keeps as BLAS calls on CPU.

Inductor lowers a CPU ``bmm`` with a single row per batch entry (``(k, 1, m) @ (k, m, n)``, a batch of
matrix-vector products) to an elementwise product and a sum over ``m``, which its C++ code generator then fuses with
the neighbouring ops ("decompose to small ops when memory bound", ``torch/_inductor/kernel/bmm.py``). On BTT's blocks
at batch 1 the generated loop is slower than the BLAS ``bmm`` eager mode runs (compiled stacks of 4096² BTT layers:
``benchmarks/results/layers_quick.md``, "Compiled in a model"). :func:`bmm` sends exactly those products, while
compiling on CPU, through the custom op ``tensornets::bmm``: inductor cannot see inside a custom op, so it calls it
as an extern kernel. Eager mode and every other shape or device keep ``torch.bmm``.
"""

from __future__ import annotations

import torch

__all__ = ["bmm"]


@torch.library.custom_op("tensornets::bmm", mutates_args=())
def _opaque_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``: ``(k, p, m) @ (k, m, n) -> (k, p, n)``, opaque to inductor."""
    return torch.bmm(a, b)


@_opaque_bmm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    a, b = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # d(a b) = da b + a db: grad_a = grad b^T (k, p, m), grad_b = a^T grad (k, m, n); both stay opaque so a
    # compiled backward keeps BLAS too.
    a, b = ctx.saved_tensors
    grad_a = _opaque_bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    grad_b = _opaque_bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


_opaque_bmm.register_autograd(_backward, setup_context=_setup_context)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` for ``a: (k, p, m)``, ``b: (k, m, n)``; the same numbers in eager and compiled code.

    While ``torch.compile`` traces a CPU product with ``p == 1``, it goes through the opaque ``tensornets::bmm`` so
    that inductor keeps the BLAS call (see the module docstring); otherwise, ``torch.export`` included, this is
    ``torch.bmm`` itself.
    """
    # not while exporting: an exported program must hold only ATen ops (a plain torch loads it without this package)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting() and a.device.type == "cpu" and a.shape[1] == 1:
        return _opaque_bmm(a, b)
    return torch.bmm(a, b)
