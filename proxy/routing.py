"""Provider choice for one request: capability filter, then configured order.

The failover issue grows this into strategies and breakers; the shape stays:
`plan()` returns the providers to try, best first, and why the rest were left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from providers.base import GenerationRequest, Provider


@dataclass(slots=True)
class Plan:
    providers: list[Provider]
    # provider name -> why it cannot take this request
    excluded: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.excluded.items())


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        order: list[str],
        disabled: dict[str, str] | None = None,
    ) -> None:
        self.providers = providers
        self.order = [name for name in order if name in providers]
        self.disabled = dict(disabled or {})

    @property
    def enabled(self) -> list[str]:
        return list(self.order)

    def plan(self, req: GenerationRequest, exclude: Iterable[str] = ()) -> Plan:
        skip = set(exclude)
        plan = Plan(providers=[], excluded=dict(self.disabled))
        for name in self.order:
            if name in skip:
                continue
            provider = self.providers[name]
            reason = provider.capabilities.unsupported_reason(req)
            if reason:
                plan.excluded[name] = reason
            else:
                plan.providers.append(provider)
        return plan
