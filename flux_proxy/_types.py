"""Typed views of the proxy's JSON (plain dataclasses: no pydantic, no server code).

Parsing is lenient about what it does not know (a newer proxy may add fields: they
stay in `.raw`) and strict about money: costs are integer micro-USD and Decimal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from flux_proxy._errors import error_for_prediction

TERMINAL = frozenset({"completed", "failed", "canceled"})


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _usd(micro: int, text: Any) -> Decimal:
    return Decimal(text) if isinstance(text, str) else Decimal(micro) / 1_000_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream call the proxy made for a prediction."""

    provider: str
    status: str
    upstream_id: str | None = None
    error: str | None = None
    error_kind: str | None = None
    latency_ms: int | None = None
    cost_micro_usd: int = 0
    cost_usd: Decimal = Decimal(0)
    created_at: datetime | None = None
    completed_at: datetime | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Attempt:
        micro = int(d.get("cost_micro_usd") or 0)
        return cls(provider=str(d.get("provider", "")), status=str(d.get("status", "")),
                   upstream_id=d.get("upstream_id"), error=d.get("error"),
                   error_kind=d.get("error_kind"), latency_ms=d.get("latency_ms"),
                   cost_micro_usd=micro, cost_usd=_usd(micro, d.get("cost_usd")),
                   created_at=_time(d.get("created_at")),
                   completed_at=_time(d.get("completed_at")))


@dataclass(slots=True)
class Prediction:
    """A prediction as GET /v1/predictions/{id} shows it."""

    id: str
    status: str
    model: str = "flux-dev"
    outputs: list[str] = field(default_factory=list)
    has_nsfw_contents: list[bool] = field(default_factory=list)
    seed: int | None = None
    provider: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    cost_micro_usd: int = 0
    cost_usd: Decimal = Decimal(0)
    error: str | None = None
    error_kind: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    timings: dict[str, int] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    cancel_requested: bool = False
    surface: str = "native"
    # {"step": i, "total": n} where a backend reports it (none does through the proxy yet).
    progress: dict[str, int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # Set by the client that fetched it: writes the outputs (downloads with its key).
    _saver: Callable[[Prediction, Path], list[Path]] | None = field(
        default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any],
                  saver: Callable[[Prediction, Path], list[Path]] | None = None) -> Prediction:
        micro = int(d.get("cost_micro_usd") or 0)
        progress = d.get("progress")
        return cls(
            id=str(d["id"]), status=str(d.get("status", "")), model=str(d.get("model", "")),
            outputs=[str(o) for o in d.get("outputs") or []],
            has_nsfw_contents=[bool(f) for f in d.get("has_nsfw_contents") or []],
            seed=d.get("seed"), provider=d.get("provider"),
            attempts=[Attempt.from_json(a) for a in d.get("attempts") or []],
            cost_micro_usd=micro, cost_usd=_usd(micro, d.get("cost_usd")),
            error=d.get("error"), error_kind=d.get("error_kind"),
            created_at=_time(d.get("created_at")), started_at=_time(d.get("started_at")),
            completed_at=_time(d.get("completed_at")),
            timings=dict(d.get("timings") or {}), urls=dict(d.get("urls") or {}),
            cancel_requested=bool(d.get("cancel_requested")),
            surface=str(d.get("surface", "native")),
            progress=dict(progress) if isinstance(progress, dict) else None,
            raw=d, _saver=saver)

    @property
    def done(self) -> bool:
        """Terminal: completed, failed or canceled."""
        return self.status in TERMINAL

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def raise_for_status(self) -> Prediction:
        """Raise PredictionFailed (PolicyRefused, BudgetExceeded) unless it completed."""
        if self.done and not self.completed:
            raise error_for_prediction(self)
        return self

    def save(self, directory: str | Path = ".") -> list[Path]:
        """Write the outputs to `directory` as `<id>-<n>.<ext>`; the paths written."""
        if self._saver is None:
            from flux_proxy._outputs import save_standalone

            return save_standalone(self, Path(directory), base_url=None, api_key=None)
        return self._saver(self, Path(directory))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of GET /v1/predictions."""

    data: list[Prediction]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class SpendRow:
    group: str | None
    cost_micro_usd: int
    cost_usd: Decimal
    images: int
    predictions: int
    attempts: int
    failed_attempts: int
    key_id: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpendRow:
        micro = int(d.get("cost_micro_usd") or 0)
        return cls(group=d.get("group"), cost_micro_usd=micro,
                   cost_usd=_usd(micro, d.get("cost_usd")), images=int(d.get("images") or 0),
                   predictions=int(d.get("predictions") or 0),
                   attempts=int(d.get("attempts") or 0),
                   failed_attempts=int(d.get("failed_attempts") or 0), key_id=d.get("key_id"))


@dataclass(frozen=True, slots=True)
class Spend:
    """GET /v1/spend: totals over the attempt records (a key sees its own)."""

    group_by: str
    since: datetime | None
    until: datetime | None
    rows: list[SpendRow]
    total: SpendRow

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spend:
        return cls(group_by=str(d.get("group_by", "")), since=_time(d.get("from")),
                   until=_time(d.get("to")),
                   rows=[SpendRow.from_json(r) for r in d.get("data") or []],
                   total=SpendRow.from_json(d.get("total") or {}))


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    name: str
    kind: str
    enabled: bool
    disabled_reason: str | None = None
    capabilities: dict[str, Any] | None = None
    health: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Model:
    """One entry of GET /v1/models."""

    id: str
    providers: list[ProviderInfo]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Model:
        return cls(id=str(d.get("id", "")), raw=d, providers=[
            ProviderInfo(name=str(p.get("name", "")), kind=str(p.get("kind", "")),
                         enabled=bool(p.get("enabled")),
                         disabled_reason=p.get("disabled_reason"),
                         capabilities=p.get("capabilities"), health=p.get("health"))
            for p in d.get("providers") or []])
