"""Outputs from a provider's asset hosts: only those hosts, never with our key,
through the outbound guard, bounded in size and time; whole (`download`) or
streamed into a sink (`download_to`)."""

from __future__ import annotations

import httpx

from common import media

from ._text import safe_text
from .base import (
    ConfigurationError,
    MalformedResponse,
    ProviderError,
    ProviderSettings,
    UpstreamUnavailable,
)


def _asset_host(provider: str, url: str, settings: ProviderSettings) -> tuple[str, bool]:
    """(host, listed) of an output URL; ConfigurationError for a host not in
    `asset_hosts` (our setting refuses it, not the provider's failure)."""
    try:
        parsed = httpx.URL(url)
        host = parsed.host
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except (httpx.InvalidURL, TypeError):
        host, port = "", 0
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listed = bool(host) and (not settings.asset_hosts
                             or media.host_matches(shown, settings.asset_hosts))
    if host and not listed:
        raise ConfigurationError(
            f"{provider}: output host {host!r} is not in providers.{provider}.asset_hosts"
            " (base64 emulation downloads only from those): add it there",
            provider=provider)
    return host, listed


def _download_error(provider: str, host: str, listed: bool, settings: ProviderSettings,
                    exc: media.MediaError) -> ProviderError:
    if isinstance(exc, media.BlockedURL):
        if listed and not settings.allow_private_asset_hosts:
            # A host the operator listed that resolves to a private address.
            return ConfigurationError(
                f"{provider}: output host {host!r} is listed in asset_hosts but refused"
                f" ({safe_text(exc.reason)}); set providers.{provider}."
                "allow_private_asset_hosts = true if it is an internal host you trust",
                provider=provider)
        return MalformedResponse(
            f"{provider}: output URL refused: {safe_text(exc.reason)}", provider=provider)
    return UpstreamUnavailable(
        f"{provider}: output download failed: {safe_text(exc.reason)}", provider=provider)


async def download(
    provider: str,
    assets: httpx.AsyncClient,
    url: str,
    settings: ProviderSettings,
    guard: media.OutboundGuard,
) -> tuple[bytes, str | None]:
    """One output from the provider's asset hosts (never with our key), bounded:
    `max_download_bytes` for this one, the process-wide download budget
    (`max_inflight_download_bytes`, common/media/budget.py) for all at once; the
    wait for that budget counts against `download_timeout_s`. A caller that keeps
    the bytes opens `media.holding()` around the call to keep them counted.

    A refusal our own settings cause is a `ConfigurationError` naming the setting
    (asset_hosts, allow_private_asset_hosts), not the provider's failure."""
    host, listed = _asset_host(provider, url, settings)
    try:
        return await media.download(
            assets,
            url,
            max_bytes=settings.max_download_bytes,
            timeout_s=settings.download_timeout_s,
            allowed_hosts=settings.asset_hosts,
            guard=guard,
        )
    except media.MediaError as exc:
        raise _download_error(provider, host, listed, settings, exc) from exc


async def download_to(
    provider: str,
    assets: httpx.AsyncClient,
    url: str,
    sink: media.Sink,
    settings: ProviderSettings,
    guard: media.OutboundGuard,
) -> str | None:
    """`download`, streamed into `sink` (no download budget: nothing is held)."""
    host, listed = _asset_host(provider, url, settings)
    try:
        return await media.download_to(
            assets, url, sink, max_bytes=settings.max_download_bytes,
            timeout_s=settings.download_timeout_s, allowed_hosts=settings.asset_hosts,
            guard=guard)
    except media.MediaError as exc:
        raise _download_error(provider, host, listed, settings, exc) from exc
