"""The one dependency the handlers declare (Litestar DI): ``api``, the service, the
key checker, the settings, the configured providers and the request-image checker,
built once by the app's lifespan. Handlers never read `app.state` themselves.

One dependency, not one per object: Litestar resolves the dependencies of a handler
that has several concurrently, in an anyio task group (a task per dependency, per
request), which was a fifth of the CPU of POST /v1/predictions (bench/serving.py).
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from proxy.accounts.auth import Auth
from proxy.api.inputs import DEFAULT_CHECKER, RequestImageChecker
from proxy.config import Settings
from proxy.lifecycle.service import PredictionService
from proxy.lifecycle.webhooks import WebhookDispatcher
from proxy.outputs_store import OutputStore


class Api:
    """What a handler may use; each attribute is read from the app's state when used."""

    __slots__ = ("_state",)

    def __init__(self, state: State) -> None:
        self._state = state

    @property
    def service(self) -> PredictionService:
        service: PredictionService = self._state.service
        return service

    @property
    def auth(self) -> Auth:
        auth: Auth = self._state.auth
        return auth

    @property
    def settings(self) -> Settings:
        settings: Settings = self._state.settings
        return settings

    @property
    def provider_settings(self) -> dict[str, Any]:
        """Every configured provider, enabled or not: name -> (kind, settings)."""
        configured: dict[str, Any] = self._state.provider_settings
        return configured

    @property
    def webhooks(self) -> WebhookDispatcher:
        dispatcher: WebhookDispatcher = self._state.webhooks
        return dispatcher

    @property
    def output_store(self) -> OutputStore | None:
        """Where outputs are kept (`output_store`); None when that is off."""
        store: OutputStore | None = self._state.get("output_store")
        return store

    @property
    def image_checker(self) -> RequestImageChecker:
        """The app's checker (``app.state.image_checker``), else the strict default."""
        checker: Any = self._state.get("image_checker")
        return checker if isinstance(checker, RequestImageChecker) else DEFAULT_CHECKER


def provide_api(request: Request[Any, Any, Any]) -> Api:
    # Not `state: State`: Litestar would build a State from the app's dict per request.
    return Api(request.app.state)


DEPENDENCIES: dict[str, Provide] = {"api": Provide(provide_api, sync_to_thread=False)}

# What a handler writes to receive it (explicitly named, as Litestar 3 wants).
ApiDep = NamedDependency[Api]
