"""Dependencies the handlers declare by name (Litestar DI): the service, the key
checker, the settings and the configured providers, built once by the app's
lifespan. Handlers never read `app.state` themselves."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from proxy.accounts.auth import Auth
from proxy.config import Settings
from proxy.lifecycle.service import PredictionService


def provide_service(state: State) -> PredictionService:
    service: PredictionService = state.service
    return service


def provide_auth(state: State) -> Auth:
    auth: Auth = state.auth
    return auth


def provide_settings(state: State) -> Settings:
    settings: Settings = state.settings
    return settings


def provide_provider_settings(state: State) -> dict[str, Any]:
    """Every configured provider, enabled or not: name -> (kind, settings)."""
    configured: dict[str, Any] = state.provider_settings
    return configured


DEPENDENCIES: dict[str, Provide] = {
    "service": Provide(provide_service, sync_to_thread=False),
    "auth": Provide(provide_auth, sync_to_thread=False),
    "settings": Provide(provide_settings, sync_to_thread=False),
    "provider_settings": Provide(provide_provider_settings, sync_to_thread=False),
}

# What a handler writes to receive one of them (explicitly named, as Litestar 3 wants).
ServiceDep = NamedDependency[PredictionService]
AuthDep = NamedDependency[Auth]
SettingsDep = NamedDependency[Settings]
ProvidersDep = NamedDependency[dict[str, Any]]
