"""Write a safetensors file one tensor at a time, so that writing it never holds more than one tensor in memory.

``safetensors.torch.save_file`` builds the bytes of every tensor before it writes the first one: the peak is the
whole file. :func:`write_safetensors` writes the header from the tensors' dtypes and shapes, given up front, then
the tensors as an iterator yields them. An EoRA adapter of a model compressed block by block (its factors on disk,
:class:`compress.factor_store.OffloadedFactors`) is written this way: one layer's factors in memory at a time. This is our own writer because safetensors has no
streaming one; the file it writes is the format's own (any safetensors reader loads it).

Layout (the safetensors specification): an 8-byte little-endian header length ``N``, a JSON header of ``N`` bytes
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, padded with spaces to a
multiple of 8 bytes), then the tensors' bytes, row-major, little-endian, back to back in the header's order.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping

import torch

#: torch dtype -> safetensors dtype name (the floating and integer types the library writes)
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to the safetensors file ``path``, each as it comes.

    Parameters:
        path: the file to write (replaced if it exists).
        specs: name -> ``(dtype, shape)`` of every tensor, in the order ``tensors`` yields them: the header.
        tensors: ``(name, tensor)`` pairs, in the order of ``specs``; each is written, then dropped by the writer.
        metadata: the header's ``__metadata__`` (strings only), e.g. ``{"format": "pt"}`` as ``save_file`` writes.

    Raises:
        ValueError: a tensor whose name, dtype or shape is not the next one of ``specs``, or a missing one (the
            file is then incomplete: write to a temporary path and rename, as callers do).
        TypeError: a dtype safetensors cannot store here (see ``DTYPE_NAMES``), or non-string metadata.
    """
    if sys.byteorder != "little":  # the bytes are written as they lie in memory; safetensors is little-endian
        raise RuntimeError("write_safetensors writes tensors as they lie in memory and needs a little-endian machine")
    header: dict[str, object] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise TypeError(f"metadata={bad!r}: safetensors metadata maps strings to strings; convert the values with "
                            "str() or json.dumps()")
        header["__metadata__"] = dict(metadata)
    offset = 0
    specs = {name: (dtype, tuple(shape)) for name, (dtype, shape) in specs.items()}
    for name, (dtype, shape) in specs.items():
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__': the header keeps that key for the metadata; "
                             "rename the tensor")
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which write_safetensors does not store; pass one of "
                            f"{', '.join(str(d) for d in DTYPE_NAMES)}")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as the reference writer aligns them
    expected = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, tensor in tensors:
            want = next(expected, None)
            if want is None or want[0] != name or want[1] != (tensor.dtype, tuple(tensor.shape)):
                raise ValueError(f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) is not the next one of "
                                 f"specs ({want!r}); yield the tensors in the order and with the dtypes and shapes "
                                 "of specs")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
        missing = [name for name, _ in expected]
        if missing:
            raise ValueError(f"tensors {missing[:3]} ({len(missing)} in all) of specs were never yielded; the file "
                             f"{str(path)!r} is incomplete")
