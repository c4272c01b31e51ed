"""Figures as the benchmarks print them: percentiles, milliseconds, Markdown tables, JSON."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.harness.cpu import OTHER_LOAD_WARN


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float, digits: int = 1, *, signed: bool = False) -> str:
    """Seconds as milliseconds with ``digits`` decimals ("-" for nan)."""
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:{'+' if signed else ''}.{digits}f}"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table, every column right-aligned."""
    rows = list(rows)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in rows)])


def load_notes(loads: Iterable[tuple[str, float]], threshold: float = OTHER_LOAD_WARN
               ) -> list[str]:
    """Lines (after a blank one) for the rows measured while other processes kept more
    than ``threshold`` cores busy; ``loads``: (row label, cores)."""
    notes = [f"note: {label}: other processes used {load:.0%} of a core during the "
             "measurement" for label, load in loads if load > threshold]
    return ["", *notes] if notes else []


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (Paths and other odd values as strings)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def csv_list(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None, *,
             required: bool = False) -> Callable[[str], list[Any]]:
    """An argparse ``type``: "a,b,c" as a list of ``kind``; with ``allowed`` or
    ``required``, other values or an empty list are a usage error."""

    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or (required and not values):
            raise argparse.ArgumentTypeError(f"expected a comma list of {allowed}")
        return values

    return parse
