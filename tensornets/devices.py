"""Check a device argument once, early, with one message: the loaders and the compression entry points share it."""

from __future__ import annotations

import re

import torch

__all__ = ["usable_device"]


def usable_device(device: torch.device | str | int, argument: str | None = "device",
                  fix: str = "pass 'cpu'") -> torch.device:
    """``device`` as a ``torch.device`` this process can hold values on.

    Raises ``ValueError`` (never torch's own ``RuntimeError`` from deep inside a load) when ``device`` is not a
    device name, is ``meta`` (no values), or names a backend or an index this torch and machine do not have, or an
    index torch cannot hold (it keeps one in 8 bits: ``torch.device("cuda:300")`` is ``cuda:44``). The
    message starts with ``argument=device`` (only the value when ``argument`` is ``None``, for a command-line flag
    that prefixes its own name) and ends with ``fix``, what the caller can pass instead.
    """
    name = repr(device) if argument is None else f"{argument}={device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} is not a torch device ({err}); {fix}") from None
    written = _written_index(device)
    if written is not None and written != dev.index:
        raise ValueError(f"{name}: device index {written} is out of range (torch keeps an index in 8 bits and would "
                         f"use {dev} instead); {fix}")
    if dev.type == "meta":
        raise ValueError(f"{name}: meta holds no values; {fix}")
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if dev.type == "mps":
            available = torch.backends.mps.is_available()
        else:
            available = getattr(backend, "is_available", lambda: False)()
        if not available:
            raise ValueError(f"{name}: this torch ({torch.__version__}) has no usable {dev.type} device; {fix}")
        count = getattr(backend, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name}: there are {count} {dev.type} device(s), numbered from 0; {fix}")
    return dev


_INDEXED_NAME = re.compile(r"[^:]+:(\d+)")


def _written_index(device: object) -> int | None:
    """The device index as the caller wrote it (``"cuda:300"`` -> 300, ``300`` -> 300), ``None`` if it names none.

    ``torch.device`` keeps the index in 8 bits and wraps larger ones without a word, so the parsed device alone
    cannot tell ``"cuda:256"`` from ``"cuda:0"``.
    """
    if isinstance(device, str):
        match = _INDEXED_NAME.fullmatch(device)
        return int(match.group(1)) if match else None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    return None
