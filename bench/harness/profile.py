"""`py-spy` attached to a child process for one measured window, and what its samples say.

The summary sorts the samples four ways: by activity (DB, upstream calls, serving
requests, ...), by the library the sampled frame is in, own-code functions by inclusive
samples, and leaf functions by self samples. The categories know the proxy's layout.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.harness.procs import STOP_TIMEOUT_S, popen


class Profiler:
    """`py-spy record` attached to a running process for one measured window.

    --gil: only the thread holding the GIL is sampled, i.e. where Python spends CPU
    (without it, threads blocked in C -- aiosqlite's queue waits -- look busy).
    Stopped with SIGINT, on which py-spy writes its raw (collapsed) stacks.
    """

    def __init__(self, pid: int, output: Path, rate: int) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.output = output
        self.log = output.with_suffix(".log")
        self._fh = self.log.open("wb")
        self.proc = popen([py_spy, "record", "--pid", str(pid), "--gil", "--format", "raw",
                           "--rate", str(rate), "--output", str(output), "--nonblocking"],
                          self._fh)

    def stop(self) -> str | None:
        """Stop sampling; the summary of what was recorded (None if nothing was)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._fh.close()
        if not self.output.exists():
            return None
        summary = summarize_profile(self.output)
        self.output.with_name(self.output.stem + "-summary.txt").write_text(summary + "\n")
        return summary


_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("sqlite driver (aiosqlite/sqlite3)", ("aiosqlite/", "sqlite3/")),
    ("postgres driver (asyncpg)", ("asyncpg/",)),
    ("SQLAlchemy ORM/Core", ("sqlalchemy/", "sqlmodel/")),
    ("alembic", ("alembic/",)),
    ("httpx/httpcore (upstream calls)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("pydantic (validation)", ("pydantic/", "pydantic_core/", "pydantic_settings/")),
    ("msgspec / json", ("msgspec/", "json/")),
    ("structlog", ("structlog/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("tenacity", ("tenacity/",)),
    ("litestar", ("litestar/",)),
    ("uvicorn/httptools", ("uvicorn/", "httptools/")),
    ("asyncio/uvloop", ("asyncio/", "uvloop/", "concurrent/", "threading.py", "queue.py")),
]


def _frame_file(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    start = frame.rfind("(")
    return frame[start + 1 :] if start >= 0 else frame


def _category(frame: str) -> str | None:
    where = _frame_file(frame)
    if "/proxy/" in where or where.startswith("proxy/"):
        return "proxy/ (own code)"
    if "/providers/" in where or where.startswith("providers/"):
        return "providers/ (own code)"
    for name, needles in _CATEGORIES:
        if any(n in where for n in needles):
            return name
    return None


_DB_FRAMES = ("proxy/store/", "sqlalchemy/", "aiosqlite/", "asyncpg/", "sqlmodel/")
_HTTP_OUT_FRAMES = ("providers/_http.py", "httpx/", "httpcore/")


def _activity(frames: list[str]) -> str:
    """What the proxy was doing in one sample (py-spy stack, root first)."""
    if frames and "threading.py" in frames[0]:
        if any("aiosqlite/" in f for f in frames):
            return "DB: aiosqlite worker threads"
        return "other threads"
    # Frames below the event loop's run(): one task's (or callback's) stack. Stacks
    # without it are SQLAlchemy's greenlets (its sync core runs in one per await_),
    # or stacks py-spy could unwind only in part: judged by the frames they hold.
    root = max((i for i, f in enumerate(frames) if "asyncio/runners.py" in f), default=-1)
    task = [f for f in frames[root + 1 :] if f.strip("() ")]
    text = ";".join(task)
    if not task:
        return "event loop itself (uvloop, scheduling)" if root >= 0 else "other (partial stacks)"
    if "proxy/store/" in text or any(d in task[0] for d in _DB_FRAMES):
        return "DB: store calls (SQLAlchemy + driver)"
    if any(h in text for h in _HTTP_OUT_FRAMES):
        return "upstream HTTP calls (httpx)"
    if "proxy/api/" in text or "proxy/schema.py" in text:
        return "route handlers (parse, validate, render)"
    if any(w in text for w in ("uvicorn/", "litestar/", "httptools")):
        return "serving HTTP (uvicorn, litestar, middleware)"
    if "proxy/" in text or "providers/" in text:
        return "runner/service own code (routing, metrics, logs)"
    return "other (partial stacks, asyncio internals)"


def summarize_profile(path: Path, top: int = 25) -> str:
    """Read py-spy's raw (collapsed) output: where the proxy's samples went.

    Four views: by activity (DB, upstream calls, serving requests, ...), by the library
    the sampled frame is in (leaf-most known frame), own-code functions by inclusive
    samples, and leaf functions by self samples.
    """
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            stacks.append((stack.split(";"), int(number)))
    total = sum(c for _, c in stacks) or 1
    by_cat: collections.Counter[str] = collections.Counter()
    by_activity: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        cat = "other"
        for frame in reversed(frames):
            found = _category(frame)
            if found is not None:
                cat = found
                break
        by_cat[cat] += count
        by_activity[_activity(frames)] += count
        leaf[frames[-1]] += count
        seen = set()
        for frame in frames:
            if _category(frame) in ("proxy/ (own code)", "providers/ (own code)"):
                name = frame.split(" (")[0] + " (" + _short(_frame_file(frame)) + ")"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count

    def pct(c: int) -> str:
        return f"{100 * c / total:5.1f}%"

    out = [f"profile {path.name}: {total} samples"]
    out.append("\nby activity (what the sampled task was doing):")
    out += [f"  {pct(c)}  {name}" for name, c in by_activity.most_common()]
    out.append("\nby library (leaf-most known frame):")
    out += [f"  {pct(c)}  {name}" for name, c in by_cat.most_common()]
    out.append(f"\nown code, inclusive (top {top}):")
    out += [f"  {pct(c)}  {name}" for name, c in inclusive.most_common(top)]
    out.append(f"\nleaf functions, self (top {top}):")
    out += [f"  {pct(c)}  {_short(name)}" for name, c in leaf.most_common(top)]
    return "\n".join(out)


def _short(text: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in text:
            text = text.replace(text[: text.index(marker) + len(marker)], "")
    return text
