"""Shared reporting for the benchmark scripts: machine line, goals, and the md/json results files.

Every ``bench_*.py`` answers one question and writes ``results/<stem>.md`` (tables, machine,
goals) and ``results/<stem>.json`` (raw numbers). This module holds the parts they share so
the files look alike and record the same facts about the machine::

    info = machine_info(threads=2, tensorly=tl.__version__)     # at the start
    g = goal("ours >= 4x faster than tensorly", value=5.1, value_min=5.3, need=4)
    finish(info, start)                                          # load average at the end, wall time
    md = header("Title", "python benchmarks/bench_x.py", info, versions=["tensorly"]) + tables + goal_section([g])
    write_results(RESULTS, "x", md, {"machine": info, "goals": [g], ...})

Timing scripts call :func:`pin_mmap_threshold` first, so that glibc's allocator state does not depend on what
ran before.

A goal is judged on medians (the verdict) and on per-contender minima (the figure least
disturbed by other jobs sharing the cores); both are printed.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tensornets.wisdom import cpu_model  # the same CPU name the wisdom cache is keyed by

__all__ = ["cpu_model", "machine_info", "finish", "machine_lines", "header", "goal", "goal_line", "goal_section", "write_results"]


def machine_info(threads: int, **versions: str) -> dict[str, Any]:
    """What the results depend on, taken at the start of a run; ``versions`` adds library versions.

    Keys: ``cpu_model``, ``logical_cpus``, ``torch``, ``torch_threads``, ``python``,
    ``loadavg_start``, ``date``, ``gpu`` (name, or None) and each of ``versions``.
    """
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "gpu": gpu,
        **versions,
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def finish(info: dict[str, Any], start: float) -> None:
    """Record the load average at the end and the wall time since ``start`` (``time.perf_counter()``)."""
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - start


def machine_lines(info: dict[str, Any], versions: Sequence[str] = (), note: str = "") -> list[str]:
    """The "## Machine" section: CPU, torch and thread count, ``versions`` (keys of ``info``), load, date."""
    libs = "".join(f", {name} {info[name]}" for name in versions)
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    end = info.get("loadavg_end")
    load = f"- load average at start {tuple(round(v, 2) for v in info['loadavg_start'])}"
    if end is not None:
        load += f", at end {tuple(round(v, 2) for v in end)}"
    load += " (other jobs on the same cores inflate absolute times" + (f"; {note})" if note else ")")
    wall = f", wall time {info['wall_s']:.0f} s" if "wall_s" in info else ""
    return [
        "## Machine",
        "",
        f"- CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs){gpu}, torch {info['torch']}, "
        f"`torch.set_num_threads({info['torch_threads']})`{libs}, Python {info['python']}",
        load,
        f"- {info['date']}{wall}",
        "",
    ]


def header(title: str, command: str, info: dict[str, Any], versions: Sequence[str] = (), note: str = "") -> list[str]:
    """Title, the command that produced the file, and the machine section."""
    return [f"# {title}", "", f"Command: `{command}`", ""] + machine_lines(info, versions, note)


def goal(
    name: str,
    value: float,
    value_min: float | None = None,
    need: float = 1.0,
    higher_is_better: bool = True,
    detail: str = "",
) -> dict[str, Any]:
    """A goal judged on ``value`` (medians) and ``value_min`` (minima; defaults to ``value``)."""
    value_min = value if value_min is None else value_min
    ok = (lambda v: v >= need) if higher_is_better else (lambda v: v <= need)
    return {"goal": name, "pass": bool(ok(value)), "pass_min": bool(ok(value_min)), "value": value,
            "value_min": value_min, "need": need, "detail": detail}


def goal_line(g: dict[str, Any], digits: int = 2) -> str:
    """``PASS (on minima: PASS): <goal>: <median value> · <min value> — <detail>``."""
    verdict = "PASS" if g["pass"] else "FAIL"
    robust = "PASS" if g["pass_min"] else "FAIL"
    line = f"{verdict} (on minima: {robust}): {g['goal']}: {g['value']:.{digits}f} · {g['value_min']:.{digits}f}"
    return line + (f" — {g['detail']}" if g.get("detail") else "")


def goal_section(goals: Sequence[dict[str, Any]], note: str = "", digits: int = 2) -> list[str]:
    """The "## Goals" section (one bold line per goal)."""
    intro = note or "Value on medians · on minima; the verdict uses the medians."
    return ["", "## Goals", "", intro, ""] + [f"- **{goal_line(g, digits)}**" for g in goals]


def write_results(out: Path, stem: str, md: Sequence[str], payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``out/<stem>.md`` (the lines of ``md``) and ``out/<stem>.json`` (``payload``); return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text("\n".join(md) + "\n")
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    return md_path, json_path


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive mmap threshold (64-bit)


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold at ``nbytes`` and its trim threshold at twice that, for this process; False
    where libc is not glibc.

    glibc serves a request of at least the mmap threshold with a fresh ``mmap`` (page faults on first touch,
    ``munmap`` on free) and raises the threshold, from 128 KiB up to 32 MiB, whenever it frees such a block, with
    the trim threshold (free memory at the heap top above it goes back to the OS) at twice the mmap threshold. So
    whether a forward's temporaries cost page faults on every call depends on the largest block the process freed
    before: MPO 4096² r=16 B=1 toggled between two speeds within one run of bench_layers before this pin (page
    faults on every call at the fixed 128 KiB default). Setting the mmap threshold by ``mallopt`` stops the
    adjustment and leaves the trim threshold at its 128 KiB default, so it is pinned too: otherwise a 16 MB hidden
    freed at the heap top is returned and faulted in again on every call (BTT 1024², r = 8, 512 rows: page faults
    on every call and a slower forward). Pinned, every row is timed in the same allocator state: the one glibc
    reaches after freeing a large block, and the one jemalloc / tcmalloc users always have.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # -3 = M_MMAP_THRESHOLD, -1 = M_TRIM_THRESHOLD
    return bool(libc.mallopt(-3, nbytes)) and bool(libc.mallopt(-1, 2 * nbytes))


def malloc_line(pinned: bool) -> str:
    """What the results file says of the allocator, given :func:`pin_mmap_threshold`'s answer."""
    if pinned:
        return (f"glibc mmap threshold pinned at {MMAP_THRESHOLD >> 20} MiB, trim threshold at "
                f"{2 * MMAP_THRESHOLD >> 20} MiB (pin_mmap_threshold)")
    return "allocator left as is (not glibc)"
