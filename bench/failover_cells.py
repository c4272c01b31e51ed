"""The cells of ``failover.py``: what one measured cell is, what it found, its table rows.

A cell is one failure mode at one rate, breaker on or off (or the 0% baseline, or the
secondary alone). Per cell: every request's sample (latency, who served it, attempts,
where its time went from the response's own timestamps), the simulators' upstream
calls, the proxy's failover counters and breaker states, its CPU and the other load.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.harness.report import ms, percentile, render_table

PRIMARY, SECONDARY = "wavespeed", "vibedream"
MODES = ("submit-5xx", "after-accept")


@dataclass(frozen=True)
class CellSpec:
    mode: str  # "baseline", "secondary-only", or one of MODES
    rate: float
    breaker: bool

    @property
    def label(self) -> str:
        if self.mode in MODES:
            return f"{self.mode} {self.rate:.0%} breaker {'on' if self.breaker else 'off'}"
        return self.mode


@dataclass
class Sample:
    latency_s: float
    ok: bool
    provider: str | None = None
    attempts: int = 0
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # PHASES -> seconds

    @classmethod
    def from_answer(cls, status_code: int, data: Any, latency_s: float) -> Sample:
        """What the answer to a sync ``POST /v1/predictions`` says (``data``: its JSON)."""
        if not isinstance(data, dict):
            return cls(latency_s, False, error=f"HTTP {status_code} (not a JSON object)")
        attempts = data.get("attempts") if isinstance(data.get("attempts"), list) else []
        ok = status_code == 200 and data.get("status") == "completed"
        error = None if ok else (
            f"HTTP {status_code} {data.get('status')} {data.get('error_kind')}")
        return cls(latency_s, ok, data.get("provider"), len(attempts or []), error,
                   phases(data, latency_s) if ok else {})


# Where one prediction's time went, from the response's own timestamps (the first and
# last attempt; with two attempts, "first attempt" is the failed one):
PHASES = {
    "before": "created -> first attempt row",
    "first": "first attempt (row written -> outcome recorded)",
    "between": "first attempt recorded -> next attempt row",
    "last": "last attempt (the one that served it)",
    "after": "last attempt recorded -> prediction completed",
    "outside": "client latency minus created -> completed (HTTP, parse, insert, answer)",
}


def _when(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value)
    return None


def phases(data: dict[str, Any], latency_s: float) -> dict[str, float]:
    """Seconds per PHASES key ({} when a timestamp is missing)."""
    attempts = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
    created, completed = _when(data.get("created_at")), _when(data.get("completed_at"))
    if not attempts or created is None or completed is None:
        return {}
    first, last = attempts[0], attempts[-1]
    marks = [_when(first.get("created_at")), _when(first.get("completed_at")),
             _when(last.get("created_at")), _when(last.get("completed_at"))]
    if any(m is None for m in marks):
        return {}
    f0, f1, l0, l1 = (m for m in marks if m is not None)
    out = {"before": f0 - created, "after": completed - l1, "last": l1 - l0}
    if len(attempts) > 1:
        out |= {"first": f1 - f0, "between": l0 - f1}
    result = {k: v.total_seconds() for k, v in out.items()}
    result["outside"] = latency_s - (completed - created).total_seconds()
    return result


@dataclass
class CellResult:
    spec: CellSpec
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    truncated: bool = False
    sim_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    failovers: dict[str, float] = field(default_factory=dict)  # reason -> count
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxy_cpu_s: float | None = None  # the proxy's CPU over the measured window
    other_load: float | None = None  # CPU used by processes not ours, share of all CPUs

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def failures(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    def latencies(self, *, failed_over: bool | None = None) -> list[float]:
        return [s.latency_s for s in self.samples
                if s.ok and (failed_over is None or (s.attempts > 1) == failed_over)]

    def p(self, q: float, **kw: Any) -> float:
        return percentile(self.latencies(**kw), q)

    def phase(self, name: str, q: float = 50, *, failed_over: bool = True) -> float:
        return percentile([s.phases[name] for s in self.samples
                           if s.ok and (s.attempts > 1) == failed_over and name in s.phases], q)

    def calls(self, provider: str | None = None) -> int:
        names = [provider] if provider else list(self.sim_stats)
        return sum(self.sim_stats.get(n, {}).get("submits", 0)
                   + self.sim_stats.get(n, {}).get("polls", 0) for n in names)

    def breaker(self, provider: str) -> str:
        return str(self.health.get(provider, {}).get("state", "?"))

    def summary(self) -> dict[str, Any]:
        served = Counter(s.provider for s in self.samples if s.ok)
        errors = Counter(s.error for s in self.samples if not s.ok)
        return {
            **asdict(self.spec), "n": self.n, "client_failures": self.failures,
            "errors": dict(errors), "served_by": dict(served),
            "failed_over": len(self.latencies(failed_over=True)),
            "p50_ms": _ms(self.p(50)), "p99_ms": _ms(self.p(99)),
            "failed_over_p50_ms": _ms(self.p(50, failed_over=True)),
            "failed_over_p99_ms": _ms(self.p(99, failed_over=True)),
            "phases_p50_ms": {
                group: {k: _ms(self.phase(k, failed_over=fo)) for k in PHASES}
                for group, fo in (("failed_over", True), ("first_attempt_served", False))},
            "wall_s": round(self.wall_s, 3), "truncated": self.truncated,
            "proxy_cpu_s": self.proxy_cpu_s, "other_load": self.other_load,
            "sim_stats": self.sim_stats, "failovers": self.failovers, "health": self.health,
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def _fmt(seconds: float, *, signed: bool = False) -> str:
    return ms(seconds, 0, signed=signed)


MAIN_HEADERS = ["failure", "rate", "breaker", "n", "client failures", "p50 ms", "p99 ms",
                "added p50", "added p99", "upstream calls/pred", "failovers",
                f"breaker {PRIMARY}/{SECONDARY}"]
DETAIL_HEADERS = ["failure", "rate", "breaker", f"served {PRIMARY}/{SECONDARY}",
                  "failed over", "failed-over p50", "failed-over p99",
                  f"{PRIMARY} calls", f"{SECONDARY} submits+polls", "wall s", "pred/s",
                  "proxy CPU ms/pred", "other load"]


def main_cells(r: CellResult, base: CellResult | None) -> list[str]:
    s = r.spec
    def added(q: float) -> str:
        return "-" if base is None or s.mode == "baseline" else _fmt(r.p(q) - base.p(q),
                                                                     signed=True)
    return [
        s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
        ("on" if s.breaker else "off") if s.mode in MODES else "-",
        str(r.n) + (" (cut)" if r.truncated else ""), str(r.failures),
        _fmt(r.p(50)), _fmt(r.p(99)), added(50), added(99),
        f"{r.calls() / r.n:.2f}" if r.n else "-",
        f"{sum(r.failovers.values()):.0f}",
        f"{r.breaker(PRIMARY)}/{r.breaker(SECONDARY)}",
    ]


def detail_cells(r: CellResult) -> list[str]:
    s = r.spec
    served = Counter(x.provider for x in r.samples if x.ok)
    vd = r.sim_stats.get(SECONDARY, {})
    return [
        s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
        ("on" if s.breaker else "off") if s.mode in MODES else "-",
        f"{served.get(PRIMARY, 0)}/{served.get(SECONDARY, 0)}",
        str(len(r.latencies(failed_over=True))),
        _fmt(r.p(50, failed_over=True)), _fmt(r.p(99, failed_over=True)),
        str(r.calls(PRIMARY)), f"{vd.get('submits', 0)}+{vd.get('polls', 0)}",
        f"{r.wall_s:.1f}", f"{r.n / r.wall_s:.0f}" if r.wall_s > 0 else "-",
        f"{r.proxy_cpu_s / r.n * 1000:.1f}" if r.proxy_cpu_s is not None and r.n else "-",
        f"{r.other_load:.0%}" if r.other_load is not None else "-",
    ]


PHASE_HEADERS = ["failure", "rate", "breaker", "requests", *PHASES, "sum of medians", "client p50"]


def phase_rows(r: CellResult) -> list[list[str]]:
    """Median of each phase: failed-over requests, and (baseline / secondary-only)
    requests served by their first attempt."""
    s = r.spec
    rows = []
    for failed_over in ((False,) if s.mode not in MODES else (True,)):
        n = len(r.latencies(failed_over=failed_over))
        if not n:
            continue
        medians = [r.phase(k, failed_over=failed_over) for k in PHASES]
        total = sum(m for m in medians if not math.isnan(m))
        rows.append([
            s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
            ("on" if s.breaker else "off") if s.mode in MODES else "-",
            f"{n} {'failed over' if failed_over else 'first attempt'}",
            *(_fmt(m) for m in medians), _fmt(total),
            _fmt(r.p(50, failed_over=failed_over)),
        ])
    return rows


def report(results: list[CellResult]) -> str:
    base = next((r for r in results if r.spec.mode == "baseline"), None)
    main_rows = [main_cells(r, base) for r in results]
    detail_rows = [detail_cells(r) for r in results]
    errors = [f"- {r.spec.label}: {dict(Counter(s.error for s in r.samples if not s.ok))}"
              for r in results if r.failures]
    phase = [row for r in results for row in phase_rows(r)]
    out = [render_table(MAIN_HEADERS, main_rows), "", render_table(DETAIL_HEADERS, detail_rows), "",
           "Medians (ms) of where the time goes: "
           + "; ".join(f"{k}: {v}" for k, v in PHASES.items()), "",
           render_table(PHASE_HEADERS, phase)]
    if errors:
        out += ["", "client-visible failures:", *errors]
    return "\n".join(out)
