"""Initialization of factorized layers for training from scratch.

Variance-correct rule: an entry of ``W`` is a sum of ``T`` products of one entry from each of
``c`` factors (``T`` = product of the internal ranks). With i.i.d. zero-mean factors of std
``s``, ``Var(W_ij) = T s^(2c)``, so ``s = (sigma / sqrt(T))^(1/c)`` gives ``std(W) = sigma``.
(tltorch divides by ``T`` instead of ``sqrt(T)`` and starts TT-matrix layers ~1000x too small.)

muP for BTT (Qiu et al. 2024): each core is a batch of matrices with ``fan_in``, ``fan_out``;
``std = fan_in^(-1/2) min(1, sqrt(fan_out / fan_in))`` and the Adam learning rate of each core
scales as ``1 / fan_in`` (:func:`mup_param_groups`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .formats import BTT, Factorization

__all__ = ["init_factorization_", "factor_std", "mup_param_groups"]


def factor_std(sigma: float, num_factors: int, num_terms: int) -> float:
    """Per-factor std so a sum of ``num_terms`` products of ``num_factors`` factors has std ``sigma``."""
    if not 0 < sigma < math.inf or num_factors < 1 or num_terms < 1:  # NaN too
        raise ValueError(f"need sigma > 0, num_factors >= 1, num_terms >= 1; got {sigma}, {num_factors}, {num_terms}")
    return (sigma / math.sqrt(num_terms)) ** (1.0 / num_factors)


@torch.no_grad()
def init_factorization_(
    factorization: Factorization,
    std: float | None = None,
    scheme: Literal["variance", "mup"] = "variance",
    generator: torch.Generator | None = None,
) -> Factorization:
    """Fill the cores of ``factorization`` in place with Gaussian noise, each core rescaled to its expected norm.

    Parameters
    ----------
    factorization : Factorization
        Any format's factorization; its cores are overwritten (returned for chaining).
    std : float, optional
        Target std of ``to_dense()`` for ``scheme="variance"``; default ``in_features ** -0.5``
        (variance preserving for unit-variance inputs).
    scheme : {"variance", "mup"}
        ``"mup"`` applies only to BTT (per-core ``fan_in``-based std, see module docstring).
    generator : torch.Generator, optional
        For reproducible draws (CPU generator; values are moved to the cores' device).
    """
    if not isinstance(factorization, Factorization):
        raise TypeError(f"factorization must be a tensornets Factorization (layer.factorization for a "
                        f"FactorizedLinear), got {type(factorization).__name__}")
    if scheme == "mup":
        if not isinstance(factorization, BTT):
            raise ValueError(f"scheme='mup' is defined for the btt format, got {factorization.format_name!r}; use scheme='variance'")
        if std is not None:
            raise ValueError("scheme='mup' sets each core's std from its fan-in; do not pass std=")
        fans = factorization.fan_in_out()
        for name, (fan_in, fan_out) in fans.items():
            param = getattr(factorization, name)
            _normal_(param, fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in)), generator)
        return factorization
    if scheme != "variance":
        raise ValueError(f"scheme={scheme!r} must be 'variance' or 'mup'")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf):
        raise ValueError(f"std={std!r} must be a positive finite number (the target std of the dense weight)")
    sigma = factorization.in_features ** -0.5 if std is None else std
    factors, num_terms = factorization.init_chain()
    s = factor_std(sigma, len(factors), num_terms)
    for p in factors:
        _normal_(p, s, generator)
    return factorization


def _normal_(param: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """Gaussian noise rescaled to its expected norm ``std · sqrt(numel)``: a uniformly random direction.

    The rescaling fixes the realized variance of small factors: a Tucker core at rank 1 is a single scalar, whose
    plain Gaussian draw scaled the whole matrix by anything from 0.002x to 2x the target std.
    """
    if param.is_meta:
        return  # shape only (a model built under torch.device("meta")): nothing to draw
    # drawn on the CPU, where the generator lives: under torch.device(...) randn would follow the default device
    values = torch.randn(param.shape, generator=generator, dtype=torch.float32, device="cpu").double()
    norm = values.norm()
    if norm > 0:
        values *= std * math.sqrt(values.numel()) / norm
    param.copy_(values.to(device=param.device, dtype=param.dtype))


def mup_param_groups(model: nn.Module, lr: float, base_fan_in: int = 64) -> list[dict]:
    """Adam parameter groups with per-core muP learning rates for every BTT in ``model``.

    A BTT core with fan-in ``f`` gets ``lr * base_fan_in / f``; every other parameter gets
    ``lr``. ``base_fan_in`` is the width at which the learning rate ``lr`` was tuned.
    """
    if isinstance(base_fan_in, bool) or not isinstance(base_fan_in, int) or base_fan_in < 1:
        raise ValueError(f"base_fan_in={base_fan_in!r} must be an int >= 1 (the fan-in whose cores keep lr)")
    scaled: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, BTT):
            for name, (fan_in, _) in module.fan_in_out().items():
                scaled[id(getattr(module, name))] = lr * base_fan_in / fan_in
    groups: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        groups.setdefault(scaled.get(id(p), lr), []).append(p)
    return [{"params": ps, "lr": group_lr} for group_lr, ps in groups.items()]
