"""What a new client key carries, validated once for the CLI and the admin API."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.accounts.auth import parse_rate
from proxy.schema import usd
from proxy.store.models import ApiKey


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    budget_usd: Decimal | None = Field(default=None, gt=0, max_digits=15, decimal_places=6)
    period: Literal["day", "month"] | None = None
    rate: str | None = None  # "10/s", "600/m"
    burst: int | None = Field(default=None, ge=1, le=100_000)
    meta: dict[str, str] = Field(default_factory=dict)  # team, app, owner ...

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None:
            parse_rate(v)
        return v

    @model_validator(mode="after")
    def _period_needs_budget(self) -> KeySpec:
        if self.period is not None and self.budget_usd is None:
            raise ValueError("period needs budget_usd")
        if self.burst is not None and self.rate is None:
            raise ValueError("burst needs rate")
        return self

    def fields(self) -> dict[str, Any]:
        """Columns of the ApiKey row (money as exact micro-USD)."""
        return {
            "meta": dict(self.meta),
            "budget_micro_usd": None if self.budget_usd is None
            else int(self.budget_usd * 1_000_000),
            "budget_period": None if self.budget_usd is None else (self.period or "month"),
            "rate_per_s": parse_rate(self.rate) if self.rate else None,
            "burst": self.burst,
        }


def key_view(row: ApiKey) -> dict[str, Any]:
    """A key as the admin sees it: never its hash."""
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "meta": row.meta,
        "budget_usd": None if row.budget_micro_usd is None else usd(row.budget_micro_usd),
        "period": row.budget_period,
        "rate_per_s": row.rate_per_s,
        "burst": row.burst,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        # Never the secret itself: it is shown once, at creation or rotation.
        "webhook_secret_set": bool(row.webhook_secret),
        "webhook_previous_secret_until": (row.webhook_secret_prev_until.isoformat()
                                          if row.webhook_secret_prev_until else None),
    }
