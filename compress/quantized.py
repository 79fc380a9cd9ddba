"""Group-wise integer weights: the one representation every quantizer returns and every exporter packs.

A quantized ``(out, in)`` weight is stored as integer codes ``q``, one scale ``s`` and one zero point ``z`` per
``(row, group)``, groups being ``group_size`` consecutive columns (``in`` a multiple of ``group_size``):

.. math::

    \\hat W[o, j] = s[o, g(j)] \\, (q[o, j] - z[o, g(j)]), \\qquad g(j) = \\lfloor j / \\text{group\\_size} \\rfloor,

with codes and zero points in the **signed** range ``[-2^{b-1}, 2^{b-1} - 1]``, the convention of
compressed-tensors (what llm-compressor writes and transformers / vLLM read), so export is a bit-packing and
nothing is re-rounded. Symmetric quantization has ``z = 0``.

:class:`QuantizedWeight` holds the codes as int8 (what quantizers produce and compare); :class:`PackedQuantizedWeight`
holds the same codes bit-packed, ``b`` bits each, in compressed-tensors' ``pack-quantized`` words (3-bit codes take
3/8 of the int8 bytes). The block pipeline keeps every layer's codes packed until export, which writes the words
as they are. The constructors check shapes and dtypes; :func:`check_values` checks the values of scales and zero
points read from a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes, per-group scales and zero points of one ``(out, in)`` weight.

    Attributes:
        codes: ``(out, in)`` int8, each in ``[-2^{b-1}, 2^{b-1} - 1]``.
        scale: ``(out, in // group_size)`` floating point, ``> 0`` (a constant group gets any positive scale).
        zero_point: ``(out, in // group_size)`` int8 in the code range; all zero when ``symmetric``.
        bits: bits per code, 2..8.
        group_size: columns per group; ``in`` is a multiple of it.
        symmetric: whether ``zero_point`` is identically zero.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise TypeError(f"codes must be a (out, in) int8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}")
        out_f, in_f = self.codes.shape
        _check_groups(self.group_size, self.scale, self.zero_point, out_f, in_f)

    @property
    def shape(self) -> torch.Size:
        """``(out, in)``."""
        return self.codes.shape

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(out, in)`` weight ``s (q - z)``, computed in float32 and cast to ``dtype``."""
        out_f, in_f = self.codes.shape
        q = self.codes.to(torch.float32).reshape(out_f, -1, self.group_size)
        z = self.zero_point.to(torch.float32).unsqueeze(-1)
        s = self.scale.to(torch.float32).unsqueeze(-1)
        return ((q - z) * s).reshape(out_f, in_f).to(dtype)

    def pack(self) -> PackedQuantizedWeight:
        """The same weight with its codes bit-packed (compressed-tensors ``pack_to_int32``): lossless,
        ``unpack()`` gives back equal codes."""
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        return PackedQuantizedWeight(pack_to_int32(self.codes.cpu(), self.bits), self.scale, self.zero_point,
                                     self.bits, self.group_size, self.symmetric, tuple(self.codes.shape))


@dataclass(frozen=True)
class PackedQuantizedWeight:
    """A :class:`QuantizedWeight` whose ``(out, in)`` codes are bit-packed into int32 words.

    ``packed[o, k]`` holds codes ``32 k / b, ...`` of row ``o``, each offset to ``q + 2^{b-1}`` in ``[0, 2^b)`` and
    written ``b`` bits at a time from the least significant bit, a code crossing a word boundary split between two
    words: compressed-tensors' ``pack_to_int32`` layout, the ``weight_packed`` tensor of a ``pack-quantized``
    checkpoint. ``ceil(in b / 32)`` words per row instead of ``in`` bytes.

    Attributes:
        packed: ``(out, ceil(in · bits / 32))`` int32.
        scale: ``(out, in // group_size)`` floating point, as in :class:`QuantizedWeight`.
        zero_point: ``(out, in // group_size)`` int8, as in :class:`QuantizedWeight`.
        bits: bits per code, 2..8.
        group_size: columns per group.
        symmetric: whether ``zero_point`` is identically zero.
        unpacked_shape: ``(out, in)`` of the codes.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    unpacked_shape: tuple[int, int]

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if len(self.unpacked_shape) != 2:
            raise ValueError(f"unpacked_shape={self.unpacked_shape!r} must be (out, in)")
        out_f, in_f = self.unpacked_shape
        words = (out_f, -(-in_f * self.bits // 32))
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape) != words:
            raise TypeError(f"packed must be a {words} int32 tensor (pack_to_int32 of ({out_f}, {in_f}) {self.bits}-bit "
                            f"codes), got {self.packed.dtype} {tuple(self.packed.shape)}")
        _check_groups(self.group_size, self.scale, self.zero_point, out_f, in_f)

    @property
    def shape(self) -> torch.Size:
        """``(out, in)``."""
        return torch.Size(self.unpacked_shape)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: packed codes, scales and zero points (0 when :attr:`offloaded`)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero_point) if not t.is_meta)

    @property
    def offloaded(self) -> bool:
        """Whether the tensors are placeholders on ``meta``: the values were written to disk beside an offloaded
        layer (:func:`compress.compress_blocks` with ``offload_folder=``), where the exporter reads them."""
        return self.packed.is_meta

    def unpack(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` with int8 codes (compressed-tensors ``unpack_from_int32``)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        codes = unpack_from_int32(self.packed, self.bits, self.shape)
        return QuantizedWeight(codes, self.scale, self.zero_point, self.bits, self.group_size, self.symmetric)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(out, in)`` weight ``s (q - z)``, as :meth:`QuantizedWeight.dequantize`."""
        return self.unpack().dequantize(dtype)


def _check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in [2, 8]")


def _check_groups(group_size: int, scale: torch.Tensor, zero_point: torch.Tensor, out_f: int, in_f: int) -> None:
    """Raise unless ``group_size`` is an int dividing ``in_f`` and ``scale`` (floating), ``zero_point`` (int8) are
    ``(out, in // group_size)``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or in_f % group_size:
        raise ValueError(f"group_size={group_size!r} must be an int dividing in_features={in_f}")
    groups = (out_f, in_f // group_size)
    if tuple(scale.shape) != groups or tuple(zero_point.shape) != groups:
        raise ValueError(f"scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} must be {groups}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be floating point, got {scale.dtype}")
    if zero_point.dtype != torch.int8:
        raise TypeError(f"zero_point must be int8, got {zero_point.dtype}")


def check_values(q: QuantizedWeight | PackedQuantizedWeight) -> None:
    """Raise ``ValueError`` unless ``q``'s scales and zero points keep the invariants of :class:`QuantizedWeight`:
    every scale finite and ``> 0``, every zero point in ``[-2^{b-1}, 2^{b-1} - 1]``, all zero when symmetric.

    The constructors check shapes and dtypes only (no device sync on the quantizers' hot path); a reader of stored
    tensors calls this. Reductions over the per-group tensors: ``1 / group_size`` of the weight's entries.
    """
    qmin, qmax = -(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1
    positive = (q.scale > 0) & torch.isfinite(q.scale)
    if not bool(positive.all()):
        bad = q.scale[~positive]
        raise ValueError(f"weight_scale has {bad.numel()} entries that are not finite positive numbers (e.g. "
                         f"{float(bad[0]):g})")
    zero_point = q.zero_point.to(torch.int32)
    if bool(((zero_point < qmin) | (zero_point > qmax)).any()):
        raise ValueError(f"weight_zero_point spans [{int(zero_point.min())}, {int(zero_point.max())}], outside the "
                         f"{q.bits}-bit code range [{qmin}, {qmax}]")
    if q.symmetric and bool(zero_point.any()):
        raise ValueError("weight_zero_point is not all zero although the weight is symmetric")
