"""Per-key budgets: a request is refused before it goes upstream once the key's
spend for the period, plus what is held for its in-flight submits, plus this
request's expected price, would pass the budget.

The holds live in the database (`proxy.store.budget`): taken when a prediction
is accepted and again before every upstream submit (first attempt, failover,
hedge) at that attempt's expected price, dropped when its cost is recorded. So
they hold across processes, replicas and restarts, and a key can overshoot only
by what attempts already submitted cost above what they held.
"""

from __future__ import annotations

from datetime import UTC, datetime

from proxy import metrics
from proxy.schema import usd
from proxy.store.budget import BudgetRefused, Hold
from proxy.store.models import ApiKey, utcnow
from proxy.store.repo import Store


class BudgetExceeded(Exception):
    def __init__(self, key: ApiKey, spent: int, reserved: int, expected: int) -> None:
        budget = key.budget_micro_usd or 0
        super().__init__(
            f"budget of key {key.name!r} is spent: ${usd(spent)} of ${usd(budget)} this "
            f"{key.budget_period} (plus ${usd(reserved)} in flight); this request may cost "
            f"${usd(expected)}"
        )
        self.key = key


def period_start(period: str | None, now: datetime) -> datetime:
    now = now.astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)  # month


class Budgets:
    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def hold(key: ApiKey | None, expected: int) -> Hold | None:
        """What to reserve for a submit expected to cost `expected` (None: no budget)."""
        if key is None or key.budget_micro_usd is None:
            return None
        return Hold(key.id, key.budget_micro_usd, period_start(key.budget_period, utcnow()),
                    expected)

    @staticmethod
    def refused(key: ApiKey, exc: BudgetRefused) -> BudgetExceeded:
        _publish(key, exc.spent, exc.reserved)
        return BudgetExceeded(key, exc.spent, exc.reserved, exc.amount)

    async def reserved(self, key: ApiKey) -> int:
        """Held now for the key's in-flight submits (every replica's)."""
        _, held = await self.store.exposure(key.id, period_start(key.budget_period, utcnow()))
        return held

    async def publish(self, key: ApiKey | None) -> None:
        """Refresh the remaining-budget gauge for `key`."""
        if key is None or key.budget_micro_usd is None:
            return
        spent, held = await self.store.exposure(key.id,
                                                period_start(key.budget_period, utcnow()))
        _publish(key, spent, held)

    async def publish_all(self) -> int:
        """The budget gauges of every live key with a budget (at start, then about once
        a minute: a new period, or another replica's spend, moves them)."""
        keys = [k for k in await self.store.list_keys(include_revoked=False)
                if k.budget_micro_usd is not None]
        for key in keys:
            await self.publish(key)
        return len(keys)


def _publish(key: ApiKey, spent: int, reserved: int) -> None:
    remaining = max(0, (key.budget_micro_usd or 0) - spent - reserved)
    metrics.BUDGET_REMAINING_USD.labels(key.name).set(remaining / 1_000_000)
    metrics.BUDGET_USD.labels(key.name).set((key.budget_micro_usd or 0) / 1_000_000)
