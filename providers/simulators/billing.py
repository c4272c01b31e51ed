"""The simulator's billing log: every task it accepted, and what it charges for it.

A task is billed from the moment the simulator creates it, whether or not the client
ever learned its id (`[sim:drop-after-accept]` drops the connection after the task
exists; a client that leaves a sync-mode wait early never sees the answer either).
What each upstream charges follows its wire (`Wire.price_micro_usd`,
`Wire.refunds_failed`):

* VibeDream: the `costCents` it quoted at submit (`cost_cents` x images), kept even
  when the task then fails: the seed quotes the cost up front and says nothing of
  refunds (the proxy's adapter makes the same assumption);
* WaveSpeed: `price_micro_usd_per_image` x images, and nothing for a task that ends
  failed / cancelled / timeout / deleted (WaveSpeed does not bill failed tasks).

A task's fate is fixed when it is accepted, so `charged_micro_usd` is already what it
will cost at its end; `final` says whether it has ended. Served as JSON on
`GET /_sim/billing`; `POST /_sim/reset` empties it. Money is integer micro-USD.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .jobs import Job, iso_ms

if TYPE_CHECKING:
    from .wire import Wire

MICRO_USD_PER_CENT = 10_000


@dataclass(slots=True)
class Charge:
    """One accepted task in the log."""

    job: Job
    price_micro_usd: int  # its price at acceptance, before any refund
    answered: bool = True  # False: the client never got the submit's answer


class BillingLog:
    """Charges by task id, oldest first, bounded: past `max_entries` the oldest leave
    the listing, and their charges are kept in the `evicted` totals."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._charges: OrderedDict[str, Charge] = OrderedDict()
        self.evicted = 0
        self.evicted_micro_usd = 0

    def add(self, job: Job, price_micro_usd: int, wire: Wire) -> Charge:
        charge = Charge(job, price_micro_usd)
        self._charges[job.id] = charge
        while len(self._charges) > max(1, self.max_entries):
            _, old = self._charges.popitem(last=False)
            self.evicted += 1
            self.evicted_micro_usd += charged(old, wire)
        return charge

    def unanswered(self, job_id: str) -> None:
        """The submit that created `job_id` was never answered (dropped, or the
        client left a sync-mode wait)."""
        charge = self._charges.get(job_id)
        if charge is not None:
            charge.answered = False

    def clear(self) -> None:
        self._charges.clear()
        self.evicted = self.evicted_micro_usd = 0

    def __len__(self) -> int:
        return len(self._charges)

    def entries(self, wire: Wire, now: float) -> list[dict[str, Any]]:
        """The listing, oldest first (`now`: monotonic, for each task's status)."""
        return [entry(c, wire, now) for c in list(self._charges.values())]

    def as_dict(self, wire: Wire, now: float) -> dict[str, Any]:
        tasks = self.entries(wire, now)
        listed = sum(t["charged_micro_usd"] for t in tasks)
        return {
            "kind": wire.name,
            "unit": "micro_usd",
            "refunds_failed": wire.refunds_failed,
            "count": len(tasks),
            "charged_micro_usd": listed,
            "evicted": self.evicted,
            "evicted_charged_micro_usd": self.evicted_micro_usd,
            "total_charged_micro_usd": listed + self.evicted_micro_usd,
            "tasks": tasks,
        }


def charged(charge: Charge, wire: Wire) -> int:
    """What the task costs by the upstream's pricing (its fate is known at accept)."""
    job = charge.job
    if job.failure is not None and wire.refunds_failed:
        return 0
    return charge.price_micro_usd


def entry(charge: Charge, wire: Wire, now: float) -> dict[str, Any]:
    job = charge.job
    return {
        "task_id": job.id,
        "charged_micro_usd": charged(charge, wire),
        "price_micro_usd": charge.price_micro_usd,
        "num_images": job.spec.num_images,
        "status": wire.status_of(job, now),
        "final": job.phase(now) == "done",
        "answered": charge.answered,
        "sync": job.spec.sync and wire.supports_sync,
        "prompt": job.spec.prompt,
        "created_at": iso_ms(job.created_at),
    }
