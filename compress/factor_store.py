"""EoRA factors kept on disk, read back one layer at a time.

:func:`compress.compress_blocks` with ``offload_folder=`` writes each compressed block to disk; without this module
the EoRA factors of every layer would still be kept in memory until export, growing with the model's depth (1.3 MB
per SmolLM2 block at r = 64 in bfloat16; hundreds of MB for a 7B model). :class:`OffloadedFactors` is the
``EoraAdapter.factors`` mapping of such a result: each block's factors are written to one safetensors file beside
the offloaded block, and every lookup reads the pair it asks for.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tensornets.io import aligned

_TOKEN_KEY = "offloaded_factors_token"


class OffloadedFactors(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Layer name -> ``(B (out, r), A (r, in))``, each pair read from disk when it is looked up.

    A mapping like the ``dict`` an in-memory :class:`compress.EoraAdapter` holds (``factors[name]``, iteration in
    the order the layers were added, ``len``), filled by :func:`compress.compress_blocks`. Layers added with :meth:`update` stay in memory (blocks
    that were not offloaded); :meth:`write` puts a group of layers (one block's) into one safetensors file.
    Each lookup of an offloaded layer reads the file (a fresh CPU tensor, as stored): callers that need a pair
    several times should hold it. A lookup raises ``FileNotFoundError`` once the file is deleted, and
    ``ValueError`` once another store (another run into the same offload folder) wrote over it or it was
    truncated or otherwise made unreadable.
    """

    def __init__(self) -> None:
        self._where: dict[str, Path | tuple[torch.Tensor, torch.Tensor]] = {}
        # written into every file: a later run writing to the same folder is caught on lookup, not read silently
        self._token = uuid.uuid4().hex

    def write(self, file: str | os.PathLike, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write ``factors`` (name -> ``(B, A)``) to the safetensors file ``file`` and look them up there."""
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (B, A) in factors.items():
            tensors[f"{name}.B"] = B.detach().to("cpu").contiguous()
            tensors[f"{name}.A"] = A.detach().to("cpu").contiguous()
        save_file(tensors, str(file), metadata={"format": "pt", _TOKEN_KEY: self._token})
        for name in factors:
            self._where[name] = file

    def update(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold ``factors`` (name -> ``(B, A)``) in memory."""
        self._where.update(factors)

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the factors held in memory (those added with :meth:`update`)."""
        return sum(B.nbytes + A.nbytes for pair in self._where.values() if isinstance(pair, tuple) for B, A in [pair])

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        where = self._where[name]
        if isinstance(where, tuple):
            return where
        try:
            f = safe_open(str(where), framework="pt")
        except FileNotFoundError:
            raise FileNotFoundError(f"the EoRA factors of {name!r} were written to {str(where)!r}, which is gone; "
                                    "keep the offload folder as long as the compress_blocks result is used") from None
        except (SafetensorError, OSError) as e:  # truncated, emptied, replaced by a directory
            raise ValueError(f"{str(where)!r}, which holds the EoRA factors of {name!r}, is no longer a readable "
                             f"safetensors file ({e}): the offload folder was altered while the compress_blocks "
                             "result was in use; run compress_blocks again") from None
        with f:
            if (f.metadata() or {}).get(_TOKEN_KEY) != self._token:
                raise ValueError(f"{str(where)!r} no longer holds this result's EoRA factors of {name!r}: another "
                                 "compress_blocks run wrote to the same offload folder; give each run an offload "
                                 "folder of its own")
            try:
                return aligned(f.get_tensor(f"{name}.B")), aligned(f.get_tensor(f"{name}.A"))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{str(where)!r} lacks or cannot read the EoRA factors of {name!r} ({e}): the "
                                 "offload folder was altered while the compress_blocks result was in use; run "
                                 "compress_blocks again") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        on_disk = sum(not isinstance(w, tuple) for w in self._where.values())
        return f"OffloadedFactors({len(self)} layers, {on_disk} on disk)"
