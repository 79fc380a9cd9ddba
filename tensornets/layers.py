"""Drop-in layers: :class:`FactorizedLinear` (any format) and :class:`FactorizedConv2d`."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .decompositions import hooi, hosvd, resolve_eps, truncated_svd
from .formats import Factorization, get_format
from .init import factor_std, init_factorization_

__all__ = ["FactorizedLinear", "FactorizedConv2d", "decompose"]


def decompose(weight: torch.Tensor, format: str, **kwargs: Any) -> Factorization:
    """Decompose ``weight: (out, in)`` into the registered ``format``.

    ``tensornets.decompose(W, "mpo", rank=16, num_cores=4)`` is
    ``get_format("mpo").from_dense(W, rank=16, num_cores=4)``; see
    :meth:`Factorization.from_dense` for the keyword arguments (``rank``, ``eps``, ``energy``,
    ``budget``, ``num_cores``, ``modes``, ``svd``, ``seed``, ``pad``).
    """
    return get_format(format).from_dense(weight, **kwargs)


class FactorizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as a :class:`Factorization` (drop-in ``nn.Linear``).

    Build it from a trained layer (:meth:`from_linear`), from scratch (:meth:`create`) or from a
    factorization you made (``FactorizedLinear(factorization, bias)``).

    Shapes: ``x: (..., in_features) -> (..., out_features)``.
    """

    def __init__(self, factorization: Factorization, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(factorization, Factorization):
            raise TypeError(f"factorization must be a tensornets Factorization, got {type(factorization).__name__}")
        self.factorization = factorization
        self.in_features = factorization.in_features
        self.out_features = factorization.out_features
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            ref = next(factorization.parameters())
            self.bias = nn.Parameter(bias.detach().clone().to(device=ref.device, dtype=ref.dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, **kwargs: Any) -> "FactorizedLinear":
        """Decompose ``linear.weight`` (see :func:`decompose` for ``kwargs``) and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(decompose(linear.weight, format, **kwargs), linear.bias)

    @classmethod
    def create(
        cls,
        in_features: int,
        out_features: int,
        format: str,
        *,
        rank: int | Sequence[int],
        num_cores: int | None = None,
        modes: tuple[Sequence[int], Sequence[int]] | None = None,
        pad: bool = False,
        bias: bool = True,
        init: Literal["variance", "mup"] = "variance",
        std: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> "FactorizedLinear":
        """A randomly initialized layer for training from scratch (see :mod:`tensornets.init`).

        ``std`` is the target std of the dense weight (default ``in_features ** -0.5``); the bias
        starts at zero.
        """
        fmt = get_format(format)
        in_modes, out_modes = fmt.resolve_modes(in_features, out_features, num_cores, modes, pad)
        ranks = fmt.resolve_ranks(rank, in_modes, out_modes)
        fact = fmt.empty(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks, dtype=dtype, device=device)
        init_factorization_(fact, std=std, scheme=init, generator=generator)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        return cls(fact, b)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight ``to_dense()`` and the same bias."""
        ref = next(self.factorization.parameters())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.factorization.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def num_parameters(self) -> int:
        return self.factorization.num_parameters + (0 if self.bias is None else self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.factorization(x)
        return y if self.bias is None else y + self.bias

    def spec(self) -> dict[str, Any]:
        return {"factorization": self.factorization.spec(), "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"format={self.factorization.format_name}, bias={self.bias is not None}"


ConvFormat = Literal["tucker", "lowrank"]


class FactorizedConv2d(nn.Module):
    """A factorized ``nn.Conv2d`` (drop-in; ``groups=1`` and zero padding only).

    Kernel ``W: (C_out, C_in, kh, kw)``.

    - ``format="tucker"`` (Tucker-2 on the channel modes):
      ``W = core x_1 U_out x_2 U_in``, ``core: (R_out, R_in, kh, kw)``, ``U_out: (C_out, R_out)``,
      ``U_in: (C_in, R_in)``. Forward: 1x1 conv ``C_in -> R_in``, ``kh x kw`` conv with the core
      (the layer's stride / padding / dilation), 1x1 conv ``R_out -> C_out`` (+ bias).
    - ``format="lowrank"``: ``W.reshape(C_out, C_in kh kw) = U V``: a ``kh x kw`` conv
      ``C_in -> r`` then a 1x1 conv ``r -> C_out``.

    Grouped and depthwise convolutions are refused: their kernels have no ``C_in`` mode to
    compress (``C_in / groups`` is usually 1 or tiny).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rank: int | Sequence[int],
        format: ConvFormat = "tucker",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.format = format
        kh, kw = self.kernel_size
        self.ranks = self.resolve_ranks(format, rank, in_channels, out_channels, self.kernel_size)
        if format == "tucker":
            r_out, r_in = self.ranks
            self.in_factor = nn.Parameter(torch.zeros(in_channels, r_in))
            self.core = nn.Parameter(torch.zeros(r_out, r_in, kh, kw))
            self.out_factor = nn.Parameter(torch.zeros(out_channels, r_out))
        else:
            (r,) = self.ranks
            self.core = nn.Parameter(torch.zeros(r, in_channels, kh, kw))
            self.out_factor = nn.Parameter(torch.zeros(out_channels, r))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    # ------------------------------------------------------------------ structure
    @staticmethod
    def resolve_ranks(
        format: str, rank: int | Sequence[int], in_channels: int, out_channels: int, kernel_size: tuple[int, int]
    ) -> tuple[int, ...]:
        """Explicit ranks: ``(R_out, R_in)`` for tucker (an int sets both), ``(r,)`` for lowrank."""
        kh, kw = kernel_size
        if format == "tucker":
            ranks = (rank, rank) if isinstance(rank, int) else tuple(int(r) for r in rank)
            if len(ranks) != 2:
                raise ValueError(f"rank={rank!r}: tucker conv takes an int or (R_out, R_in)")
            full = (min(out_channels, in_channels * kh * kw), min(in_channels, out_channels * kh * kw))
        elif format == "lowrank":
            ranks = (rank,) if isinstance(rank, int) else tuple(int(r) for r in rank)
            if len(ranks) != 1:
                raise ValueError(f"rank={rank!r}: lowrank conv takes one int")
            full = (min(out_channels, in_channels * kh * kw),)
        else:
            raise ValueError(f"format={format!r}: FactorizedConv2d supports 'tucker' (Tucker-2 on channels) and 'lowrank'")
        if any(not 1 <= r <= f for r, f in zip(ranks, full)):
            raise ValueError(f"rank={rank!r} does not fit a ({out_channels}, {in_channels}, {kh}, {kw}) kernel: pass ranks within {full}")
        return ranks

    @staticmethod
    def parameter_count(format: str, ranks: Sequence[int], in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> int:
        """Kernel parameters of the factorized conv (bias excluded)."""
        kh, kw = kernel_size
        if format == "tucker":
            r_out, r_in = ranks
            return r_out * r_in * kh * kw + out_channels * r_out + in_channels * r_in
        (r,) = ranks
        return r * (in_channels * kh * kw + out_channels)

    @property
    def num_parameters(self) -> int:
        return self.parameter_count(self.format, self.ranks, self.in_channels, self.out_channels, self.kernel_size) + (
            0 if self.bias is None else self.out_channels
        )

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": list(self.ranks),
            "format": self.format,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        format: ConvFormat = "tucker",
        *,
        rank: int | Sequence[int] | None = None,
        eps: float | None = None,
        energy: float | None = None,
        budget: float | None = None,
        algorithm: Literal["hosvd", "hooi"] = "hosvd",
    ) -> "FactorizedConv2d":
        """Decompose a trained ``nn.Conv2d``: HOSVD/HOOI on the channel modes, or truncated SVD.

        ``budget`` is the fraction of the kernel's parameters kept (largest uniform rank that fits).
        """
        cls._check_conv(conv)
        weight = conv.weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("conv.weight has NaN/inf entries; clean the weight before decomposing it")
        c_out, c_in, kh, kw = weight.shape
        eps = resolve_eps(eps, energy)
        if budget is not None:
            if rank is not None:
                raise ValueError(f"pass rank={rank} or budget={budget}, not both")
            rank = cls._rank_for_budget(format, budget, c_in, c_out, (kh, kw))
        if rank is None and eps is None:
            raise ValueError("FactorizedConv2d.from_conv needs rank=, eps=, energy= or budget=")
        work = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if format == "tucker":
            ranks = cls.resolve_ranks(format, rank if rank is not None else (c_out, c_in), c_in, c_out, (kh, kw))
            if algorithm == "hosvd":
                core, (u_out, u_in) = hosvd(work, rank=list(ranks), eps=eps, modes=[0, 1])
            elif algorithm == "hooi":
                core, (u_out, u_in) = hooi(work, rank=list(ranks), modes=[0, 1])
            else:
                raise ValueError(f"algorithm={algorithm!r} must be 'hosvd' or 'hooi'")
            tensors = {"in_factor": u_in, "core": core, "out_factor": u_out}
            ranks = (core.shape[0], core.shape[1])
        else:
            full = min(c_out, c_in * kh * kw)
            U, S, Vh = truncated_svd(work.reshape(c_out, -1), rank=rank if rank is not None else full, eps=eps)
            root = S.sqrt()
            tensors = {"core": (root[:, None] * Vh).reshape(-1, c_in, kh, kw), "out_factor": U * root}
            ranks = (S.numel(),)
        layer = cls(
            c_in, c_out, (kh, kw), rank=ranks, format=format, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None,
        ).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(layer, name).copy_(tensor)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rank: int | Sequence[int],
        format: ConvFormat = "tucker",
        std: float | None = None,
        generator: torch.Generator | None = None,
        **conv_kwargs: Any,
    ) -> "FactorizedConv2d":
        """Random init for training from scratch: dense-kernel std ``std`` (default ``(C_in kh kw)^-1/2``)."""
        layer = cls(in_channels, out_channels, kernel_size, rank=rank, format=format, **conv_kwargs)
        kh, kw = layer.kernel_size
        sigma = (in_channels * kh * kw) ** -0.5 if std is None else std
        factors = [layer.in_factor, layer.core, layer.out_factor] if format == "tucker" else [layer.core, layer.out_factor]
        s = factor_std(sigma, len(factors), math.prod(layer.ranks))
        with torch.no_grad():
            for p in factors:
                p.copy_(torch.randn(p.shape, generator=generator) * s)
        return layer

    @staticmethod
    def _check_conv(conv: nn.Module) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"conv has groups={conv.groups}: grouped/depthwise kernels have no full C_in mode to factorize; "
                f"leave this layer dense (exclude it) or use an adapter such as FLoRA"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; FactorizedConv2d supports 'zeros' only")

    @classmethod
    def _rank_for_budget(cls, format: str, budget: float, c_in: int, c_out: int, kernel: tuple[int, int]) -> int:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget={budget} must be in (0, 1]: the fraction of the kernel's parameters kept")
        limit = budget * c_out * c_in * kernel[0] * kernel[1]
        best = None
        for r in range(1, max(c_in, c_out) + 1):
            try:
                ranks = cls.resolve_ranks(format, r, c_in, c_out, kernel)
            except ValueError:
                break
            if cls.parameter_count(format, ranks, c_in, c_out, kernel) > limit:
                break
            best = r
        if best is None:
            raise ValueError(f"budget={budget} is below the cost of rank 1 for a ({c_out}, {c_in}, *{kernel}) kernel; raise it")
        return best

    # ------------------------------------------------------------------ apply
    def weight_dense(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, kh, kw)``."""
        if self.format == "tucker":
            return torch.einsum("oa,abhw,ib->oihw", self.out_factor, self.core, self.in_factor)
        return torch.einsum("or,rihw->oihw", self.out_factor, self.core)

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense kernel and the same bias and geometry."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, device=self.core.device, dtype=self.core.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` through the factor convolutions."""
        if x.dtype != self.core.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the conv factors are {self.core.dtype}; cast x or .to() the module")
        h = x
        if self.format == "tucker":
            h = F.conv2d(h, self.in_factor.mT[:, :, None, None])
        h = F.conv2d(h, self.core, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return F.conv2d(h, self.out_factor[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, format={self.format}, "
            f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}"
        )
