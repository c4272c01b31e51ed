"""Provider choice for one request: route, capability filter, strategy, health.

`plan()` orders the providers that can serve a request (best first) and says why
the rest cannot; `acquire()` asks, just before an attempt, whether a provider's
breaker and rate-limit cooldown let it take one now, and hands back the provider
wrapped as `Admitted`, whose `settle()` feeds the attempt's outcome back.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.clock import SYSTEM_CLOCK, Clock
from providers.base import ErrorKind, GenerationRequest, Provider
from proxy.routing.admission import Admitted
from proxy.routing.breaker import BreakerSettings
from proxy.routing.health import ProviderHealth
from proxy.routing.ready import ReadyEstimate

Strategy = Literal["priority", "cheapest", "fastest", "weighted"]


class RouteSettings(BaseModel):
    """How one model's requests are routed."""

    model_config = ConfigDict(extra="forbid")

    providers: list[str] | None = None  # the chain; None: routing.order
    strategy: Strategy = "priority"
    weights: dict[str, float] = Field(default_factory=dict)  # weighted: share per provider
    # Hedging: when the first attempt runs longer than this percentile of the
    # provider's recent latencies (or hedge_delay_s until there are enough
    # samples), the same request starts on the next provider; first result wins.
    hedge: bool = False
    hedge_percentile: float = Field(default=95.0, gt=0, lt=100)
    hedge_min_samples: int = Field(default=20, ge=1)
    hedge_delay_s: float = Field(default=10.0, gt=0)


class RoutingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Our own GPUs first (disabled until LOCAL_WORKER_URLS is set), then paid providers.
    order: list[str] = Field(default_factory=lambda: ["local", "wavespeed", "vibedream"])
    strategy: Strategy = "priority"
    routes: dict[str, RouteSettings] = Field(default_factory=dict)  # per model
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    ewma_alpha: float = Field(default=0.2, gt=0, le=1)  # `fastest`: weight of the newest
    default_retry_after_s: float = Field(default=1.0, gt=0)  # a 429 without Retry-After
    max_attempts: int = Field(default=6, ge=1)  # upstream submits per prediction
    # When every eligible provider is open (breaker) or rate-limited: wait at most this
    # long for one; past it a new request gets 503 with Retry-After, and a running
    # prediction fails at once with the reason.
    unavailable_wait_s: float = Field(default=2.0, ge=0)

    def route_for(self, model: str) -> RouteSettings:
        route = self.routes.get(model)
        if route is None:
            return RouteSettings(providers=list(self.order), strategy=self.strategy)
        if route.providers is None:
            return route.model_copy(update={"providers": list(self.order)})
        return route


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
        routing: RoutingSettings,
        disabled: dict[str, str] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.providers = providers
        self.settings = routing
        self.disabled = dict(disabled or {})
        self.order = [name for name in routing.order if name in providers]
        self._rng = rng or random.Random()
        self._quoted: dict[str, int] = {}  # provider -> micro-USD per image it last quoted
        self._ready: dict[str, ReadyEstimate] = {}
        self.health = {
            name: ProviderHealth(name, routing.breaker, ewma_alpha=routing.ewma_alpha,
                                 default_retry_after_s=routing.default_retry_after_s,
                                 clock=clock.monotonic)
            for name in providers
        }

    @property
    def enabled(self) -> list[str]:
        return list(self.order)

    # ------------------------------------------------------------------ planning

    def plan(
        self,
        req: GenerationRequest,
        *,
        model: str = "flux-dev",
        requested: list[str] | None = None,
        exclude: Iterable[str] = (),
    ) -> Plan:
        """Providers able to serve `req`, best first. `requested` (the client's
        `providers`) replaces the route's chain and keeps its order."""
        route = self.settings.route_for(model)
        chain = list(requested) if requested else list(route.providers or [])
        skip = set(exclude)
        plan = Plan(providers=[])
        for name in chain:
            if name in skip:
                continue
            if name not in self.providers:
                plan.excluded[name] = self.disabled.get(name, "not configured")
                continue
            reason = self.providers[name].capabilities.unsupported_reason(req)
            if reason:
                plan.excluded[name] = reason
            else:
                plan.providers.append(self.providers[name])
        if not requested:
            plan.providers = self._order(plan.providers, route, req)
        # Spill-over: a provider whose own capacity is full (every local worker's
        # queue past its threshold) goes last; it still serves when the rest fail.
        plan.providers.sort(key=lambda p: p.saturated())
        return plan

    def _order(self, providers: list[Provider], route: RouteSettings,
               req: GenerationRequest) -> list[Provider]:
        if route.strategy == "cheapest":
            return sorted(providers, key=lambda p: self.expected_cost(p, req))
        if route.strategy == "fastest":
            # No sample yet sorts first, so every provider gets measured.
            return sorted(providers, key=lambda p: self.health[p.name].latency_ewma_s or 0.0)
        if route.strategy == "weighted":
            # Weighted shuffle (Efraimidis-Spirakis): P(first) is proportional to weight.
            def key(p: Provider) -> float:
                w = route.weights.get(p.name, 1.0)
                return self._rng.random() ** (1.0 / w) if w > 0 else -1.0

            return sorted(providers, key=key, reverse=True)
        return providers

    def expected_cost(self, provider: Provider, req: GenerationRequest) -> int:
        """What an attempt on `provider` is expected to cost: the price it last
        quoted per image (VibeDream quotes costCents at submit) where it has
        quoted one, else its list price (what an unanswered submit is charged)."""
        per_image = self._quoted.get(provider.name)
        if per_image is not None:
            return per_image * req.num_images
        return provider.attempt_cost_micro_usd(req, None)

    def learn_quote(self, name: str, req: GenerationRequest, charged_micro_usd: int) -> None:
        """Remember a price the upstream quoted for `req` (per image, rounded up)."""
        if charged_micro_usd > 0 and req.num_images > 0:
            self._quoted[name] = -(-charged_micro_usd // req.num_images)

    # ------------------------------------------------------------------ health

    def acquire(self, name: str) -> Admitted | None:
        """The provider, holding a breaker slot, when `name` may take an attempt
        now (the attempt settles it with its outcome); None when it may not."""
        ticket = self.health[name].acquire()
        if ticket is None:
            return None
        return Admitted(self.providers[name], self.health[name], ticket)

    def resumed(self, name: str) -> Admitted | None:
        """The provider for an attempt already upstream (after a restart): no new
        slot is taken, its outcome still feeds health. None if not configured."""
        if name not in self.providers:
            return None
        return Admitted(self.providers[name], self.health[name], None)

    def available_in(self, name: str) -> float:
        return self.health[name].available_in()

    def unavailable_for(self, providers: list[Provider]) -> float | None:
        """Seconds until the first of `providers` could take an attempt, when that
        is longer than `unavailable_wait_s`; None when one will be ready in time."""
        if not providers:
            return None
        wait = min(self.available_in(p.name) for p in providers)
        return wait if wait > self.settings.unavailable_wait_s else None

    def record(self, name: str, *, ok: bool, kind: ErrorKind | None = None,
               latency_s: float | None = None, retry_after_s: float | None = None) -> None:
        """Feed an outcome seen outside an admitted attempt."""
        if name in self.health:
            self.health[name].record(kind, ok=ok, latency_s=latency_s,
                                     retry_after_s=retry_after_s)

    def ready_after(self, name: str) -> float | None:
        """No poll is worth making before this many seconds after a submit on `name`
        (ready.py; None: too few jobs seen yet)."""
        return self._ready[name].value() if name in self._ready else None

    def learn_ready(self, name: str, *, running_at_s: float | None,
                    done_at_first_poll_s: float | None) -> None:
        """What the polls of one job on `name` saw (ready.py)."""
        self._ready.setdefault(name, ReadyEstimate()).observe(
            running_at_s=running_at_s, done_at_first_poll_s=done_at_first_poll_s)

    def hedge_delay(self, model: str, name: str) -> float | None:
        """Seconds after which to hedge an attempt on `name`; None: no hedging."""
        route = self.settings.route_for(model)
        if not route.hedge:
            return None
        observed = self.health[name].latency_percentile(route.hedge_percentile,
                                                        route.hedge_min_samples)
        return observed if observed is not None else route.hedge_delay_s

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: h.snapshot() for name, h in self.health.items()}
