"""Float comparisons that hold on any CPU, BLAS, thread count and test order.

Element-wise ``atol`` / ``rtol`` checks of float32 results are machine-dependent: a BLAS that sums
in another order (another CPU, another ``OMP_NUM_THREADS``) moves every entry by a few ulps of the
*largest* terms it summed, so one small entry next to large ones fails a fixed ``atol``. The
checks here scale the tolerance to the tensor's norm instead, which is what float rounding
actually bounds:

- :func:`assert_close`: ``max |a - e| <= tol * max(|e|_max, floor)`` and
  ``||a - e||_F <= tol * max(||e||_F, floor)``, with ``tol`` chosen from the dtype (float32:
  ``1e-5`` by default, float64: ``1e-10``).
- :func:`assert_close_relative`: the Frobenius relative error alone, for results that are
  approximations by design (decompositions, quantization).

Compare gradients and long sums either in float64 (exact enough for any fixed ``atol``) or with
these helpers; never with a bare fixed ``atol`` on float32.
"""

from __future__ import annotations

import torch

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance :func:`assert_close` uses for ``dtype`` (float32: ``1e-5``)."""
    return _DEFAULT_TOL.get(dtype, 0.0)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float | None = None,
    floor: float = 0.0,
    what: str = "tensor",
) -> None:
    """Assert ``actual`` equals ``expected`` up to rounding scaled to ``expected``'s magnitude.

    Both bounds are relative to the reference: the largest entry error to ``max |expected|`` and
    the Frobenius error to ``||expected||_F``. ``floor`` keeps the bound meaningful when the
    reference is (close to) zero. Shapes must match exactly; integer and bool tensors must be equal.

    Args:
        actual: the result under test, any shape.
        expected: the reference, same shape.
        tol: relative tolerance; default from the dtype of the two (see :func:`default_tolerance`).
        floor: magnitude below which the reference is treated as ``floor`` (absolute scale).
        what: name used in the failure message.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not (actual.is_floating_point() or actual.is_complex()):
        assert torch.equal(actual, expected), f"{what}: integer tensors differ"
        return
    if tol is None:
        tol = max(default_tolerance(actual.dtype), default_tolerance(expected.dtype))
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: non-finite entries differ"
    diff = a - e
    scale_max = max(e.abs().max().item() if e.numel() else 0.0, floor)
    scale_fro = max(e.norm().item(), floor)
    worst = diff.abs().max().item() if diff.numel() else 0.0
    fro = diff.norm().item()
    assert worst <= tol * scale_max, (
        f"{what}: largest entry error {worst:.3e} > {tol:.1e} x max|expected| ({scale_max:.3e})"
    )
    assert fro <= tol * scale_fro, f"{what}: Frobenius error {fro:.3e} > {tol:.1e} x ||expected|| ({scale_fro:.3e})"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` computed in float64."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    return ((a - e).norm() / e.norm()).item()


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "tensor") -> None:
    """Assert ``||actual - expected||_F <= tol * ||expected||_F`` (float64 arithmetic)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative Frobenius error {err:.3e} > {tol:.1e}"
