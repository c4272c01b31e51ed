"""Where the CPU went (Linux ``/proc``), waiting for a quiet machine, what the machine is.

"Other" CPU is what the whole machine spent meanwhile minus what the watched process
trees and this process spent: other workloads on a shared machine (and PostgreSQL's
server processes, which are not ours to watch). It is the noise of a measurement.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OTHER_LOAD_WARN = 0.15  # cores' worth of foreign CPU that makes a window suspect
_MAX_TREE = 64


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (just ``pid`` where /proc is missing)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < _MAX_TREE:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text()
            todo += [int(c) for c in children.split()]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree, in seconds (nan when none of it is readable)."""
    total, seen = 0, False
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        seen = True
    return total / os.sysconf("SC_CLK_TCK") if seen else math.nan


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (nan without /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan
    if len(values) < 4:
        return math.nan
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is in user


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds over one window."""

    wall_s: float
    trees: dict[str, float]  # each watched process tree
    own_s: float  # this process
    other_s: float  # the rest of the machine, >= 0 (nan without /proc)

    def other_cores(self, wall_s: float | None = None) -> float:
        """Other CPU as cores busy on average (over ``wall_s``, default the window's)."""
        wall = self.wall_s if wall_s is None else wall_s
        return self.other_s / wall if wall > 0 else math.nan


class CpuWindow:
    """Counts from its creation until :meth:`stop`: the watched trees (name -> pid),
    this process, and the machine."""

    def __init__(self, watch: Mapping[str, int] | None = None) -> None:
        self.watch = dict(watch or {})
        self._t0 = time.perf_counter()
        self._own0 = time.process_time()
        self._trees0 = {name: cpu_seconds(pid) for name, pid in self.watch.items()}
        self._busy0 = machine_busy_seconds()

    def stop(self) -> CpuUsage:
        own = time.process_time() - self._own0
        trees = {name: cpu_seconds(pid) - self._trees0[name] for name, pid in self.watch.items()}
        other = machine_busy_seconds() - self._busy0 - own - sum(trees.values())
        return CpuUsage(time.perf_counter() - self._t0, trees, own,
                        other if math.isnan(other) else max(0.0, other))


def wait_quiet(
    max_wait_s: float,
    log: Callable[[str], None] | None = None,
    *,
    ours: Mapping[str, int] | None = None,
    threshold: float = OTHER_LOAD_WARN,
    window_s: float = 3.0,
    windows: int = 2,
) -> bool:
    """Wait (at most ``max_wait_s``) until processes other than ``ours`` and this one
    keep under ``threshold`` cores busy for ``windows`` consecutive windows of
    ``window_s``. False when that never happened (or cannot be known: no /proc);
    ``log`` hears each busy window and, at the end, that it gave up."""
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while time.monotonic() < deadline:
        window = CpuWindow(ours)
        time.sleep(window_s)
        load = window.stop().other_cores()
        if math.isnan(load):
            return False
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= windows:
            return True
        if log is not None:
            log(f"waiting for a quiet machine: {load:.2f} cores busy")
    if log is not None:
        log(f"warning: the machine was still busy after {max_wait_s:.0f}s; measuring anyway")
    return False


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, Python, platform (for the report and the JSON)."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
