"""Per-key budgets: refuse a request before it goes upstream once the key's spend
for the period, plus what its in-flight predictions may still cost, plus this
request's expected cost, would pass the budget.

Spend comes from the attempt rows; in-flight predictions hold a reservation of
their expected cost until they finish, so concurrent requests on one replica
cannot overshoot at all, and replicas together by at most what is in flight.
"""

from __future__ import annotations

from datetime import UTC, datetime

from proxy import metrics
from proxy.schema import usd
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
        self._reserved: dict[str, dict[str, int]] = {}  # key id -> prediction id -> micro-USD

    def reserved(self, key_id: str) -> int:
        return sum(self._reserved.get(key_id, {}).values())

    async def reserve(self, key: ApiKey, prediction_id: str, expected: int) -> None:
        """Hold `expected` for this prediction, or raise BudgetExceeded."""
        if key.budget_micro_usd is None:
            return
        spent = await self.store.spent_since(key.id, period_start(key.budget_period, utcnow()))
        # No await from here on: check and reserve are one step for this replica.
        reserved = self.reserved(key.id)
        if spent + reserved + expected > key.budget_micro_usd:
            self._publish(key, spent, reserved)
            raise BudgetExceeded(key, spent, reserved, expected)
        self._reserved.setdefault(key.id, {})[prediction_id] = expected
        self._publish(key, spent, reserved + expected)

    async def release(self, key: ApiKey | None, prediction_id: str) -> None:
        """The prediction ended: its real cost is in the attempt rows now."""
        if key is None or key.budget_micro_usd is None:
            return
        held = self._reserved.get(key.id, {})
        held.pop(prediction_id, None)
        if not held:
            self._reserved.pop(key.id, None)
        spent = await self.store.spent_since(key.id, period_start(key.budget_period, utcnow()))
        self._publish(key, spent, self.reserved(key.id))

    @staticmethod
    def _publish(key: ApiKey, spent: int, reserved: int) -> None:
        remaining = max(0, (key.budget_micro_usd or 0) - spent - reserved)
        metrics.BUDGET_REMAINING_USD.labels(key.name).set(remaining / 1_000_000)
