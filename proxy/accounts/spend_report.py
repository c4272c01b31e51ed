"""The spend report behind GET /v1/spend and `flux-proxy spend`: JSON, CSV, table."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from proxy.schema import usd
from proxy.store.repo import Store
from proxy.store.spend import GroupBy, SpendRow

COLUMNS = ("group", "cost_usd", "cost_micro_usd", "images", "predictions", "attempts",
           "failed_attempts")


def parse_bound(value: str | None, name: str) -> datetime | None:
    """ISO date (midnight UTC) or datetime (naive = UTC); ValueError names the field."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{name}: {value!r} is not an ISO date or datetime") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(slots=True)
class Report:
    group_by: GroupBy
    since: datetime | None
    until: datetime | None
    rows: list[SpendRow]
    total: SpendRow
    names: dict[str, str]  # key id -> name, for group_by=key

    def label(self, row: SpendRow) -> str:
        if row.group is None:
            return "(no key)" if self.group_by == "key" else "(none)"
        return self.names.get(row.group, row.group) if self.group_by == "key" else row.group

    def _cells(self, row: SpendRow, label: str) -> list[str | int]:
        return [label, usd(row.cost_micro_usd), row.cost_micro_usd, row.images,
                row.predictions, row.attempts, row.failed_attempts]

    def as_dict(self) -> dict[str, object]:
        def one(row: SpendRow, label: str | None) -> dict[str, object]:
            return dict(zip(COLUMNS, self._cells(row, label or ""), strict=True)) | {
                "group": label, **({"key_id": row.group} if self.group_by == "key" else {})}

        return {
            "group_by": self.group_by,
            "from": self.since.isoformat() if self.since else None,
            "to": self.until.isoformat() if self.until else None,
            "data": [one(r, self.label(r)) for r in self.rows],
            "total": one(self.total, None),
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow(self._cells(row, self.label(row)))
        writer.writerow(self._cells(self.total, "TOTAL"))
        return out.getvalue()

    def to_table(self) -> str:
        lines = [[str(c) for c in COLUMNS]]
        lines += [[str(c) for c in self._cells(r, self.label(r))] for r in self.rows]
        lines.append([str(c) for c in self._cells(self.total, "TOTAL")])
        widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
        fmt = [f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)]
        text = ["  ".join(f.format(c) for f, c in zip(fmt, line, strict=True))
                for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text)


async def build_report(store: Store, group_by: GroupBy, *, since: datetime | None = None,
                       until: datetime | None = None, api_key_id: str | None = None) -> Report:
    rows = await store.spend(group_by, since=since, until=until, api_key_id=api_key_id)
    [total] = await store.spend(None, since=since, until=until, api_key_id=api_key_id)
    names = {k.id: k.name for k in await store.list_keys()} if group_by == "key" else {}
    return Report(group_by, since, until, rows, total, names)
