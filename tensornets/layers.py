"""Drop-in layers: :class:`FactorizedLinear` (any format) and :class:`FactorizedConv2d`."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.weight_norm import WeightNorm

from .bypassed import weight_recomputed
from .decompositions import rank_for_keep, resolve_eps, resolve_keep
from .devices import usable_device
from .formats import Factorization, LowRank, Tucker, get_format
from .formats.base import _autocast_takes, normalize_rank
from .init import init_factorization_

__all__ = ["FactorizedLinear", "FactorizedConv2d", "decompose"]


def decompose(weight: torch.Tensor, format: str, **kwargs: Any) -> Factorization:
    """Decompose ``weight: (out, in)`` into the registered ``format``.

    ``tensornets.decompose(W, "mpo", rank=16, num_cores=4)`` is
    ``get_format("mpo").from_dense(W, rank=16, num_cores=4)``; see
    :meth:`Factorization.from_dense` for the keyword arguments (``rank``, ``eps``, ``energy``,
    ``keep``, ``num_cores``, ``modes``, ``svd``, ``seed``, ``pad``).
    """
    return get_format(format).from_dense(weight, **kwargs)


def live_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as its next forward computes it.

    ``torch.nn.utils.prune`` and the old ``torch.nn.utils.weight_norm`` recompute ``.weight`` in a forward pre-hook
    (``weight_orig * weight_mask``, ``g v / ||v||``) and leave a copy that goes stale after an optimizer step; this
    runs the hook's computation instead. Parametrized weights are computed on access anyway.
    """
    if weight_recomputed(module) == "hook":
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod) and hook._tensor_name == "weight":
                return hook.apply_mask(module)
            if isinstance(hook, WeightNorm) and hook.name == "weight":
                return hook.compute_weight(module)
    return module.weight


def _refuse_weight_assignment(layer: nn.Module, name: str) -> None:
    """``layer.weight = ...`` raises a clear error (nn.Module's own would be a KeyError "already exists" for a
    Parameter): the weight of a factorized layer is a view of its cores."""
    if name == "weight":
        kind = type(layer).__name__
        raise AttributeError(
            f"{kind}.weight is rebuilt from the cores on every read and cannot be assigned: set the cores of "
            f"layer.factorization, or build a new layer ({kind}.from_{'conv' if 'Conv' in kind else 'linear'}(...))"
        )


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
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor of shape ({self.out_features},) or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            if not bias.is_meta and not torch.isfinite(bias).all():
                raise ValueError("bias has NaN/inf entries; clean it before building the layer")
            ref = next(factorization.parameters())
            self.bias = nn.Parameter(bias.detach().clone().to(device=ref.device, dtype=ref.dtype))
        else:
            self.register_parameter("bias", None)
        self._init = {"scheme": "variance", "std": None}  # what reset_parameters draws with; create sets it

    def reset_parameters(self) -> None:
        """Draw the cores again as :meth:`create` does and zero the bias (``nn.Linear.reset_parameters``'s role).

        Deferred initialization calls it: a model built on the meta device, materialised with ``to_empty`` and
        then initialised by ``reset_parameters`` on each module that has one (FSDP's meta-device init). The
        cores get :func:`~tensornets.init.init_factorization_` with the ``init`` / ``std`` given to
        :meth:`create` (the variance-preserving default for a layer built otherwise). A layer from
        :meth:`from_linear` loses its decomposition, as ``nn.Linear`` loses its weight.
        """
        init_factorization_(self.factorization, **self._init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str, **kwargs: Any) -> "FactorizedLinear":
        """Decompose ``linear.weight`` (see :func:`decompose` for ``kwargs``) and keep its bias.

        A pruned or weight-normed ``linear`` is decomposed from the weight its next forward computes
        (:func:`live_weight`), not from the possibly stale ``.weight`` copy."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(decompose(live_weight(linear), format, **kwargs), linear.bias)

    @classmethod
    def create(
        cls,
        in_features: int,
        out_features: int,
        format: str,
        *,
        rank: int | Sequence[int] | None = None,
        keep: float | None = None,
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

        Its size is ``rank=`` or ``keep=`` (the fraction of the dense ``in * out`` parameters: the largest ranks
        within it, as :meth:`~tensornets.Factorization.from_dense` finds them). ``std`` is the target std of the
        dense weight (default ``in_features ** -0.5``); the bias starts at zero.
        """
        fmt = get_format(format)
        if init not in ("variance", "mup"):
            raise ValueError(f"init={init!r} must be 'variance' or 'mup'")
        _check_factory_kwargs(dtype, device)
        if (rank is None) == (keep is None):
            raise ValueError(f"pass rank= or keep= (got rank={rank}, keep={keep}): the layer's size")
        in_modes, out_modes, ranks = fmt.resolve_structure(in_features, out_features, rank=rank, keep=keep,
                                                            num_cores=num_cores, modes=modes, pad=pad)
        fact = fmt.empty(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks, dtype=dtype, device=device)
        init_factorization_(fact, std=std, scheme=init, generator=generator)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        layer = cls(fact, b)
        layer._init = {"scheme": init, "std": std}
        return layer

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
        """Parameters of the factorization plus the bias."""
        return self.factorization.num_parameters + (0 if self.bias is None else self.out_features)

    def __setattr__(self, name: str, value: Any) -> None:
        _refuse_weight_assignment(self, name)
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight, rebuilt from the cores on every access (read-only).

        For code that inspects ``layer.weight`` as it would an ``nn.Linear``'s: T5's feed-forward reads
        ``wo.weight.dtype`` on every forward, so without it a factorized ``wo`` failed. Each read costs a rebuild
        (the forward itself never reads it); writing into the returned tensor changes nothing, set the cores.
        """
        return self.factorization.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.factorization(x)
        # under torch.autocast y is in the autocast dtype: the bias joins it there, as in nn.Linear (no promotion)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable structure (the factorization's spec and whether there is a bias): what
        :func:`tensornets.save` writes beside the tensors so :func:`tensornets.load` can rebuild the layer."""
        return {"factorization": self.factorization.spec(), "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"format={self.factorization.format_name}, bias={self.bias is not None}"


ConvFormat = Literal["tucker", "lowrank"]


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_ints(**values: Any) -> None:
    """Each value an int or a pair of ints (``nn.Conv2d``'s geometry): ``True`` was read as 1 and ``2.5`` reached
    the rank rules as a kernel of 6.25 positions."""
    for name, value in values.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        if isinstance(value, (tuple, list)) and len(value) != 2 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            raise TypeError(f"{name}={value!r} must be an int or a pair of ints")


def _check_factory_kwargs(dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """``dtype`` a real floating torch dtype and ``device`` a device name (``meta`` allowed: shape-only layers), or
    None: a string dtype or a complex one failed inside torch, or built complex cores nothing else accepts."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r} must be a floating torch dtype (torch.float32, torch.bfloat16, ...) or None")
    if device is not None:
        try:
            shapes_only = torch.device(device).type == "meta"
        except (RuntimeError, TypeError):
            shapes_only = False  # usable_device names the problem
        if not shapes_only:
            usable_device(device, fix="pass 'cpu', an accelerator this machine has, or 'meta' (shapes only)")


class FactorizedConv2d(nn.Module):
    """A factorized ``nn.Conv2d`` (drop-in; ``groups=1``) over a core format.

    The kernel ``K: (C_out, C_in, kh, kw)`` is the matrix ``W = K.reshape(C_out, C_in kh kw)``
    stored as a core :class:`~tensornets.Factorization` (``self.factorization``; its rank rules,
    budget search, decomposition and init are the core's):

    - ``format="tucker"``: a :class:`~tensornets.Tucker` with out mode ``C_out`` and in modes
      ``(C_in, kh kw)``: ``K = core x_1 U_out x_2 U_in x_3 S``, ``core: (R_out, R_in, R_s)``,
      ``U_out: (C_out, R_out)``, ``U_in: (C_in, R_in)``, ``S: (kh kw, R_s)``. ``rank=r`` or
      ``(R_out, R_in)`` keeps the spatial mode whole (``R_s = kh kw``: Tucker-2 on the channels);
      ``(R_out, R_in, R_s)`` sets all three. Forward: 1x1 conv ``C_in -> R_in``, ``kh x kw`` conv
      with ``core x_3 S`` (the layer's stride / padding / dilation), 1x1 conv ``R_out -> C_out``.
    - ``format="lowrank"``: a :class:`~tensornets.LowRank` ``W = U V``: a ``kh x kw`` conv with
      ``V.reshape(r, C_in, kh, kw)``, then a 1x1 conv with ``U``.

    Grouped and depthwise convolutions are refused: their kernels have no ``C_in`` mode to
    compress (``C_in / groups`` is usually 1 or tiny). ``padding_mode`` other than ``"zeros"``
    (``"reflect"``, ``"replicate"``, ``"circular"``) pads explicitly before the spatial conv, as
    ``nn.Conv2d`` does; for Tucker after the ``C_in -> R_in`` 1x1 conv, which commutes with it.
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
        padding_mode: str = "zeros",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_factory_kwargs(dtype, device)
        _check_ints(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                    dilation=dilation, **({} if isinstance(padding, str) else {"padding": padding}))
        pair = lambda v: tuple(int(x) for x in nn.modules.utils._pair(v))  # noqa: E731 - numpy ints: plain (JSON spec)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.dilation = pair(dilation)
        self.padding_mode = padding_mode
        self._check_geometry()
        self.format = format
        fmt, in_modes, out_modes = self.core_structure(format, in_channels, out_channels, self.kernel_size)
        ranks = self.resolve_ranks(format, rank, in_channels, out_channels, self.kernel_size)
        self.factorization = fmt.empty(
            in_channels * math.prod(self.kernel_size), out_channels, in_modes=in_modes, out_modes=out_modes, ranks=ranks
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if dtype is not None or device is not None:
            self.to(dtype=dtype, device=device)
        self._init = {"std": None}  # what reset_parameters draws with; create sets it

    def reset_parameters(self) -> None:
        """Draw the cores again as :meth:`create` does and zero the bias (``nn.Conv2d.reset_parameters``'s role).

        Deferred initialization calls it (FSDP's meta-device init: ``to_empty``, then ``reset_parameters`` on each
        module that has one). The cores get :func:`~tensornets.init.init_factorization_` with the ``std`` given
        to :meth:`create` (default ``(C_in kh kw)^-1/2``). A layer from :meth:`from_conv` loses its
        decomposition, as ``nn.Conv2d`` loses its kernel.
        """
        init_factorization_(self.factorization, **self._init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_geometry(self) -> None:
        """Refuse sizes ``nn.Conv2d`` would refuse, naming the argument, before any core is built."""
        for name, value in (("in_channels", (self.in_channels,)), ("out_channels", (self.out_channels,)),
                            ("kernel_size", self.kernel_size), ("stride", self.stride),
                            ("dilation", self.dilation)):
            if any(int(v) < 1 for v in value):
                raise ValueError(f"{name}={value if len(value) > 1 else value[0]} must be positive")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(f"padding={self.padding!r} must be 'same', 'valid', an int or a pair of ints")
            if self.padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride=1 (got stride={self.stride}), as in nn.Conv2d")
        elif any(int(v) < 0 for v in self.padding):
            raise ValueError(f"padding={self.padding} must be >= 0")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode={self.padding_mode!r} must be one of {_PADDING_MODES}, as in nn.Conv2d")

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """``F.pad``'s ``(left, right, top, bottom)`` for a non-zero ``padding_mode`` (``nn.Conv2d``'s rule; ``'same'``
        puts the odd extra row / column at the end)."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads: list[int] = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        return (self.padding[1], self.padding[1], self.padding[0], self.padding[0])

    def _spatial_conv(self, h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """The ``kh x kw`` conv of the layer's geometry on ``h`` (padded explicitly for a non-zero padding mode)."""
        if self.padding_mode == "zeros":
            return F.conv2d(h, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)
        h = F.pad(h, self._explicit_padding(), mode=self.padding_mode)
        return F.conv2d(h, kernel, stride=self.stride, dilation=self.dilation)

    # ------------------------------------------------------------------ structure
    @staticmethod
    def core_structure(
        format: str, in_channels: int, out_channels: int, kernel_size: tuple[int, int]
    ) -> tuple[type[Factorization], tuple[int, ...], tuple[int, ...]]:
        """The core format and its ``(in_modes, out_modes)`` for a ``(C_out, C_in, kh, kw)`` kernel."""
        if format == "tucker":
            return Tucker, (in_channels, math.prod(kernel_size)), (out_channels,)
        if format == "lowrank":
            return LowRank, (in_channels * math.prod(kernel_size),), (out_channels,)
        raise ValueError(f"format={format!r}: FactorizedConv2d supports 'tucker' (Tucker-2 on channels) and 'lowrank'")

    @staticmethod
    def core_rank(
        format: str, rank: int | Sequence[int], kernel_size: tuple[int, int], in_channels: int, out_channels: int
    ) -> int | tuple[int, ...]:
        """The core format's ranks for a conv ``rank``: tucker ``r`` -> ``(min(r, F_out), min(r, F_in), F_s)``
        with ``F`` the modes' full ranks (``F_out = min(C_out, C_in kh kw)``, ``F_in = min(C_in, C_out kh kw)``,
        ``F_s = min(kh kw, C_out C_in)``, the spatial mode kept whole): an int is capped per channel mode, as every
        format caps an int rank, and raises above both; ``(R_out, R_in)`` -> ``(R_out, R_in, F_s)``; lowrank ``r``
        unchanged."""
        rank = normalize_rank(rank)
        k = math.prod(kernel_size)
        # the spatial mode "whole" is its full rank: kh kw, or C_out C_in when that is smaller (a 7x7 stem conv
        # with 3 in and 8 out channels has spatial rank 24, not 49)
        full_out, full_in, full_spatial = Tucker.full_ranks((in_channels, k), (out_channels,))
        if format == "tucker" and isinstance(rank, int):
            if not 1 <= rank <= max(full_out, full_in):
                kernel = (out_channels, in_channels, *kernel_size)
                raise ValueError(f"rank={rank} does not fit a {kernel} kernel as tucker: pass 1 <= rank <= "
                                 f"{max(full_out, full_in)} (the channel modes' full ranks are {full_out} out, "
                                 f"{full_in} in)")
            return min(rank, full_out), min(rank, full_in), full_spatial
        if isinstance(rank, int):
            return rank
        ranks = rank
        if format == "tucker":
            if len(ranks) == 1:  # (r,) reads as r
                return FactorizedConv2d.core_rank(format, ranks[0], kernel_size, in_channels, out_channels)
            if len(ranks) == 2:
                return (*ranks, full_spatial)
            if len(ranks) != 3:
                raise ValueError(f"rank={rank!r}: tucker conv takes an int, (R_out, R_in) or (R_out, R_in, R_spatial)")
        elif len(ranks) != 1:
            raise ValueError(f"rank={rank!r}: lowrank conv takes one int")
        return ranks

    @classmethod
    def resolve_ranks(
        cls, format: str, rank: int | Sequence[int], in_channels: int, out_channels: int, kernel_size: tuple[int, int]
    ) -> tuple[int, ...]:
        """The core format's explicit ranks for a conv ``rank`` (see :meth:`core_rank`), checked against the kernel."""
        fmt, in_modes, out_modes = cls.core_structure(format, in_channels, out_channels, kernel_size)
        core = cls.core_rank(format, rank, kernel_size, in_channels, out_channels)  # its errors say what fits
        try:
            return fmt.resolve_ranks(core, in_modes, out_modes)
        except ValueError as exc:
            kernel = (out_channels, in_channels, *kernel_size)
            raise ValueError(
                f"rank={rank!r} does not fit a {kernel} kernel as {format}: pass ranks within "
                f"{fmt.full_ranks(in_modes, out_modes)} ({exc})"
            ) from None

    @property
    def ranks(self) -> tuple[int, ...]:
        """The core factorization's ranks (tucker: ``(R_out, R_in, R_s)``; lowrank: ``(r,)``)."""
        return self.factorization.ranks

    @property
    def num_parameters(self) -> int:
        """Parameters of the factorization plus the bias."""
        return self.factorization.num_parameters + (0 if self.bias is None else self.out_channels)

    def __setattr__(self, name: str, value: Any) -> None:
        _refuse_weight_assignment(self, name)
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, kh, kw)`` (:meth:`weight_dense`), rebuilt on every access (read-only).

        For code that inspects ``conv.weight`` as it would an ``nn.Conv2d``'s: ViT's and CLIP's patch embeddings
        read ``projection.weight.dtype`` on every forward. Each read costs a rebuild; writing into the returned
        tensor changes nothing.
        """
        return self.weight_dense()

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable structure (channels, kernel, ranks, format, geometry, bias): what
        :func:`tensornets.save` writes beside the tensors so :func:`tensornets.load` can rebuild the layer."""
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
            "padding_mode": self.padding_mode,
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
        keep: float | None = None,
        algorithm: Literal["hosvd", "hooi"] = "hosvd",
        budget: float | None = None,
    ) -> "FactorizedConv2d":
        """Decompose a trained ``nn.Conv2d`` with the core format's ``from_dense``.

        ``keep`` is the fraction of the kernel's parameters kept: the largest channel rank that
        fits (the spatial mode stays whole). ``eps`` / ``energy`` bound the relative error of the
        kernel (HOSVD over the channel and spatial modes, truncated SVD for lowrank).
        ``budget`` is the deprecated name of ``keep``.
        """
        cls._check_conv(conv)
        if format != "tucker" and algorithm != "hosvd":
            raise ValueError(f"algorithm={algorithm!r} applies to format='tucker' (HOSVD / HOOI); format={format!r} "
                             "takes the truncated SVD: leave algorithm at its default")
        keep = resolve_keep(keep, budget, "FactorizedConv2d.from_conv")
        weight = live_weight(conv)
        c_out, c_in, kh, kw = weight.shape
        ranks = cls.resolve_structure(format, c_in, c_out, (kh, kw), rank=rank, eps=eps, energy=energy, keep=keep)
        fmt, in_modes, out_modes = cls.core_structure(format, c_in, c_out, (kh, kw))
        options = {"algorithm": algorithm} if format == "tucker" else {}
        fact = fmt.from_dense(weight.detach().reshape(c_out, -1), rank=ranks, eps=eps, energy=energy,
                              modes=(out_modes, in_modes), **options)
        layer = cls.from_factorization(fact, (kh, kw), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                       padding_mode=conv.padding_mode,
                                       bias=None if conv.bias is None else conv.bias.detach())
        return layer

    @classmethod
    def resolve_structure(
        cls,
        format: ConvFormat,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rank: int | Sequence[int] | None = None,
        eps: float | None = None,
        energy: float | None = None,
        keep: float | None = None,
    ) -> tuple[int, ...] | None:
        """The core ranks :meth:`from_conv` would use for a ``(C_out, C_in, kh, kw)`` kernel, without reading it.

        Raises the same ``ValueError`` as :meth:`from_conv` for a size request that does not fit, so a
        whole model's convs can be checked before the first is replaced. Returns the maximum ranks
        (an ``eps`` / ``energy`` target may truncate below them), or ``None`` for lowrank sized by
        ``eps`` / ``energy`` alone (its rank comes from the spectrum).
        """
        kernel_size = nn.modules.utils._pair(kernel_size)
        fmt, in_modes, out_modes = cls.core_structure(format, in_channels, out_channels, kernel_size)
        resolve_eps(eps, energy)
        if keep is not None:
            if rank is not None:
                raise ValueError(f"pass rank={rank} or keep={keep}, not both")
            rank = cls.rank_for_keep(format, keep, in_channels, out_channels, kernel_size)
        if rank is None and eps is None and energy is None:
            raise ValueError("FactorizedConv2d.from_conv needs rank=, eps=, energy= or keep=")
        if rank is not None:
            return cls.resolve_ranks(format, rank, in_channels, out_channels, kernel_size)
        # eps alone: tucker starts from the full ranks (the spatial mode may shrink too, within the bound)
        return fmt.full_ranks(in_modes, out_modes) if format == "tucker" else None

    @classmethod
    def from_factorization(
        cls,
        factorization: Factorization,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: torch.Tensor | None = None,
        padding_mode: str = "zeros",
    ) -> "FactorizedConv2d":
        """Wrap a core ``Tucker`` (modes ``(C_out,), (C_in, kh kw)``) or ``LowRank`` (``C_out x C_in kh kw``)."""
        kernel_size = nn.modules.utils._pair(kernel_size)
        format = "tucker" if isinstance(factorization, Tucker) else "lowrank" if isinstance(factorization, LowRank) else None
        if format is None:
            raise TypeError(f"factorization must be a Tucker or LowRank, got {type(factorization).__name__}")
        c_out, spatial = factorization.out_features, math.prod(kernel_size)
        if factorization.in_features % spatial:
            raise ValueError(f"in_features={factorization.in_features} is not C_in * kh * kw for kernel_size={kernel_size}")
        c_in = factorization.in_features // spatial
        _, in_modes, out_modes = cls.core_structure(format, c_in, c_out, kernel_size)
        if (factorization.in_modes, factorization.out_modes) != (in_modes, out_modes):
            raise ValueError(
                f"a {format} conv core needs out_modes={out_modes}, in_modes={in_modes}; got "
                f"{factorization.out_modes}, {factorization.in_modes}"
            )
        ref = next(factorization.parameters())
        layer = cls(c_in, c_out, kernel_size, rank=factorization.ranks, format=format, stride=stride, padding=padding,
                    dilation=dilation, bias=bias is not None, padding_mode=padding_mode).to(device=ref.device,
                                                                                          dtype=ref.dtype)
        layer.factorization = factorization
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
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
        """Random init for training from scratch (:func:`~tensornets.init.init_factorization_`): dense-kernel
        std ``std`` (default ``(C_in kh kw)^-1/2``); the bias starts at zero. ``conv_kwargs``: ``stride``,
        ``padding``, ``dilation``, ``bias``, ``padding_mode``, ``dtype``, ``device``."""
        layer = cls(in_channels, out_channels, kernel_size, rank=rank, format=format, **conv_kwargs)
        init_factorization_(layer.factorization, std=std, generator=generator)
        layer._init = {"std": std}
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
        if not torch.isfinite(live_weight(conv)).all():
            raise ValueError("conv.weight has NaN/inf entries; clean the weight before decomposing it")
        if conv.bias is not None and not torch.isfinite(conv.bias).all():
            raise ValueError("conv.bias has NaN/inf entries; clean it before decomposing the conv")

    @classmethod
    def rank_for_keep(cls, format: str, keep: float, c_in: int, c_out: int, kernel_size: tuple[int, int]) -> int:
        """Largest channel rank ``r`` whose kernel parameters are ``<= keep * C_out C_in kh kw``
        (:func:`tensornets.decompositions.rank_for_keep`); tucker: ``R_out = R_in = r``, each capped at
        its mode's full rank (:meth:`core_rank`), spatial mode whole."""
        fmt, in_modes, out_modes = cls.core_structure(format, c_in, c_out, kernel_size)
        ranks = lambda r: fmt.resolve_ranks(cls.core_rank(format, r, kernel_size, c_in, c_out), in_modes, out_modes)
        full = fmt.full_ranks(in_modes, out_modes)
        dense = c_out * c_in * math.prod(kernel_size)
        count = lambda r: fmt.parameter_count(in_modes, out_modes, ranks(r))
        rank = rank_for_keep(keep, dense, count, max(full[:2]))
        if rank == 0:
            if count(1) > dense:  # tucker's whole spatial factor alone outweighs a kernel with few channels
                raise ValueError(f"format={format!r} cannot compress a ({c_out}, {c_in}, *{kernel_size}) kernel: rank 1 "
                                 f"already needs {count(1)} parameters of its {dense}; use format='lowrank' or leave "
                                 "the layer dense")
            raise ValueError(f"keep={keep} is below the cost of rank 1 for a ({c_out}, {c_in}, *{kernel_size}) kernel "
                             f"({count(1)} of its {dense} parameters); raise it")
        return rank

    # ------------------------------------------------------------------ apply
    def weight_dense(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, kh, kw)``."""
        return self.factorization.to_dense().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense kernel and the same bias and geometry."""
        ref = next(self.factorization.parameters())
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode, device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; convert it with torch.as_tensor(x)")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (N, C_in, H, W) or (C_in, H, W) with "
                             f"C_in=in_channels={self.in_channels}")
        ref = next(self.factorization.parameters())
        if x.dtype != ref.dtype and not _autocast_takes(x):
            raise TypeError(f"x has dtype {x.dtype} but the conv's cores are {ref.dtype}; cast x or .to() the module")
        if x.device != ref.device:
            raise ValueError(f"x is on {x.device} but the conv's cores are on {ref.device}; move one of them")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` through the factor convolutions."""
        self._check_input(x)
        fact = self.factorization
        if isinstance(fact, Tucker):
            u_in, spatial = fact.in_factors
            h = F.conv2d(x, u_in.mT[:, :, None, None])
            kernel = torch.einsum("abs,ks->abk", fact.core, spatial).reshape(*fact.ranks[:2], *self.kernel_size)
            h = self._spatial_conv(h, kernel)
            u_out = fact.out_factors[0]
        else:
            kernel = fact.V.reshape(fact.ranks[0], self.in_channels, *self.kernel_size)
            h = self._spatial_conv(x, kernel)
            u_out = fact.U
        return F.conv2d(h, u_out[:, :, None, None], self.bias)

    # ------------------------------------------------------------------ checkpoints of release 0.1.0
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load the current layout, or the 0.1.0 one mapped to it by :meth:`_v010_state`.

        The layer's own ``load_state_dict`` and those of models holding it (any ``prefix``) both come
        here; torch passes a copy of the user's dict, so renaming keys in it changes nothing outside.
        """
        names = ("in_factor", "core", "out_factor")
        if prefix + "out_factor" in state_dict:  # a key the current layout never has
            old = {name: state_dict.pop(prefix + name) for name in names if prefix + name in state_dict}
            state_dict.update({prefix + key: value for key, value in self._v010_state(old).items()})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _v010_state(self, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename and reshape the kernel tensors of a 0.1.0 ``FactorizedConv2d`` state dict (bias excluded).

        0.1.0 stored, for a ``(C_out, C_in, kh, kw)`` kernel:

        - tucker: ``in_factor: (C_in, R_in)``, ``core: (R_out, R_in, kh, kw)``, ``out_factor: (C_out, R_out)``;
          mapped to ``factorization.in_factors.0 = in_factor``,
          ``factorization.core = core.reshape(R_out, R_in, kh kw)``, ``factorization.out_factors.0 = out_factor``
          and the spatial factor ``factorization.in_factors.1 = I_{kh kw}`` (0.1.0 kept the spatial mode whole);
        - lowrank: ``core: (r, C_in, kh, kw)``, ``out_factor: (C_out, r)``; mapped to
          ``factorization.V = core.reshape(r, C_in kh kw)`` and ``factorization.U = out_factor``.

        Exact: the forward builds the same ``kh x kw`` kernel (``core x_3 I`` is ``core``, bit for bit) and runs
        the same three convolutions. Shapes that do not fit this layer are left to ``load_state_dict``'s size
        check. Raises ``ValueError`` when the layer's format differs from the checkpoint's, or when its spatial
        Tucker rank is below ``kh kw`` (no exact mapping exists).
        """
        if "core" not in old:
            raise ValueError(f"a 0.1.0 FactorizedConv2d state dict has 'core' and 'out_factor'; got only {sorted(old)}")
        saved = "tucker" if "in_factor" in old else "lowrank"
        if saved != self.format:
            raise ValueError(
                f"the state dict is a 0.1.0 {saved} FactorizedConv2d (keys {sorted(old)}), but this layer is "
                f"format={self.format!r}; build the layer with format={saved!r} and the same ranks to load it"
            )
        core = old["core"]
        if core.dim() != 4:
            raise ValueError(
                f"the 0.1.0 'core' has shape {tuple(core.shape)}; it must be 4-D: tucker (R_out, R_in, kh, kw), "
                f"lowrank (r, C_in, kh, kw)"
            )
        if saved == "lowrank":
            return {"factorization.V": core.reshape(core.shape[0], -1), "factorization.U": old["out_factor"]}
        spatial = math.prod(self.kernel_size)
        if self.ranks[2] != spatial:
            raise ValueError(
                f"a 0.1.0 tucker conv keeps the spatial mode whole (kh*kw = {spatial}) but this layer's spatial "
                f"rank is {self.ranks[2]}: no exact mapping. Load it into a layer built with rank=(R_out, R_in), "
                f"then truncate with FactorizedConv2d.from_conv(layer.to_conv(), rank=(R_out, R_in, R_s))"
            )
        return {
            "factorization.core": core.reshape(core.shape[0], core.shape[1], -1),
            "factorization.in_factors.0": old["in_factor"],
            "factorization.in_factors.1": torch.eye(math.prod(core.shape[2:]), dtype=core.dtype, device=core.device),
            "factorization.out_factors.0": old["out_factor"],
        }

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, format={self.format}, "
            f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}" + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else "")
        )
