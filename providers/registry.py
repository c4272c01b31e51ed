"""Provider kinds by name, imported lazily.

The proxy builds providers only through here, so it imports just the adapter
modules its configuration names (the local GPU provider pulls in heavy
dependencies it must not pay for when unused).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, cast

from .base import Provider, ProviderSettings

if TYPE_CHECKING:
    import httpx

    from common.media import OutboundGuard

# kind -> ("module:SettingsClass", "module:ProviderClass")
PROVIDERS: dict[str, tuple[str, str]] = {
    "vibedream": ("providers.vibedream:VibeDreamSettings", "providers.vibedream:VibeDreamProvider"),
    "wavespeed": ("providers.wavespeed:WaveSpeedSettings", "providers.wavespeed:WaveSpeedProvider"),
    # Our own GPU workers; the adapter imports no torch (only the worker does).
    "local": ("providers.local:LocalSettings", "providers.local:LocalProvider"),
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class UnknownProviderKind(KeyError, ValueError):
    """A provider kind not in PROVIDERS (a KeyError for lookups, a ValueError for
    validators)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _entry(kind: str) -> tuple[str, str]:
    try:
        return PROVIDERS[kind]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise UnknownProviderKind(f"unknown provider kind {kind!r} (known: {known})") from None


def settings_class(kind: str) -> type[ProviderSettings]:
    """The settings model for `kind`, e.g. to validate a config section."""
    return cast(type[ProviderSettings], _load(_entry(kind)[0]))


def build_provider(
    name: str,
    kind: str,
    settings: ProviderSettings | dict[str, Any],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    guard: OutboundGuard | None = None,
) -> Provider:
    """A provider instance called `name`. `settings` may be the kind's own
    settings, a plain mapping, or a base `ProviderSettings` (re-validated).
    `transport` replaces the HTTP transport (tests); `guard` vets output
    downloads (None: as the settings say)."""
    settings_ref, provider_ref = _entry(kind)
    settings_cls: type[ProviderSettings] = _load(settings_ref)
    if not isinstance(settings, settings_cls):
        data = settings if isinstance(settings, dict) else settings.model_dump()
        settings = settings_cls.model_validate(data)
    provider_cls = _load(provider_ref)
    return cast(Provider, provider_cls(name, settings, transport=transport, guard=guard))
