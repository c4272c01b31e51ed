"""One attempt's hold on a provider: the breaker ticket (or half-open probe slot)
that `Router.acquire` took, carried by the provider object the attempt calls,
and given back exactly once, with the attempt's outcome, by `settle`."""

from __future__ import annotations

from providers.base import ErrorKind, Provider
from providers.wrapper import WrapperProvider
from proxy.routing.health import ProviderHealth


class Admitted(WrapperProvider):
    def __init__(self, inner: Provider, health: ProviderHealth | None,
                 ticket: int | None) -> None:
        super().__init__(inner)
        self._health = health
        self._ticket = ticket
        self.settled = False

    def settle(self, *, ok: bool, kind: ErrorKind | None = None,
               latency_s: float | None = None, retry_after_s: float | None = None) -> None:
        """Feed the attempt's outcome to the provider's health (first call only)."""
        if self.settled:
            return
        self.settled = True
        if self._health is not None:
            self._health.record(kind, ok=ok, latency_s=latency_s,
                                retry_after_s=retry_after_s, ticket=self._ticket)

    def abandon(self) -> None:
        """The attempt stopped without an outcome (shutdown, store error): the
        slot comes back and health learns nothing."""
        self.settle(ok=False, kind=None)
