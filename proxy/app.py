"""Litestar app factory: wires settings, store, providers, service and routes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
from litestar import Litestar
from litestar.config.compression import CompressionConfig
from litestar.exceptions import HTTPException

from common import media
from common.logging import configure_logging, get_logger, register_secrets
from providers.base import Provider, ProviderSettings
from providers.registry import build_provider
from proxy import metrics
from proxy.accounts.auth import Auth
from proxy.accounts.ratelimit import limiter_for
from proxy.api import openai_compat, playground, vibedream_compat, wavespeed_compat
from proxy.api.admin import AdminKeysController
from proxy.api.deps import DEPENDENCIES
from proxy.api.errors import http_exception_handler, internal_error_handler
from proxy.api.middleware import HttpMetrics, SmallBodyCompression
from proxy.api.openapi import openapi_config
from proxy.api.outputs import SKIP_COMPRESSION, get_output
from proxy.api.predictions import PredictionController
from proxy.api.render import webhook_body
from proxy.api.request_context import RequestContext
from proxy.api.spend import spend
from proxy.api.system import healthz, list_models, metrics_page, readyz
from proxy.api.webhooks_admin import AdminWebhooksController
from proxy.config import Settings
from proxy.lifecycle.notify import notifier_for
from proxy.lifecycle.service import PredictionService
from proxy.lifecycle.webhooks import WebhookConfig, WebhookDispatcher
from proxy.outputs_store import open_store, signing
from proxy.routing import Router
from proxy.routing.instrumented import InstrumentedProvider
from proxy.store.repo import Store

if TYPE_CHECKING:
    from proxy.routing.sharing import HealthSync
    from proxy.shared import SharedRedis

log = get_logger("flux_proxy.app")


def disabled_reason(name: str, settings: ProviderSettings) -> str | None:
    if not settings.enabled:
        return "disabled in config"
    return settings.missing(name)


def build_providers(
    settings: Settings,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
) -> tuple[dict[str, Provider], dict[str, str]]:
    providers: dict[str, Provider] = {}
    disabled: dict[str, str] = {}
    for name, (kind, psettings) in settings.provider_settings().items():
        reason = disabled_reason(name, psettings)
        if reason:
            disabled[name] = reason
            continue
        if psettings.api_key is not None:
            register_secrets([psettings.api_key.get_secret_value()])
        inner = build_provider(name, kind, psettings,
                               transport=(transports or {}).get(name))
        providers[name] = InstrumentedProvider(inner)
    return providers, disabled


def _open_shared(url: str) -> SharedRedis:
    from proxy.shared import open_shared

    return open_shared(url)


def _health_sync(router: Router, shared: SharedRedis, instance_id: str) -> HealthSync:
    from proxy.routing.sharing import HealthSync

    return HealthSync(router.health, shared, instance_id)


def _webhooks(settings: Settings, store: Store, instance_id: str) -> WebhookDispatcher:
    guard = media.OutboundGuard(allow_private=settings.webhook_allow_private,
                                allowed_hosts=tuple(settings.webhook_allowed_hosts))
    keyless = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    config = WebhookConfig(
        timeout_s=settings.webhook_timeout_s, retry_window_s=settings.webhook_retry_window_s,
        backoff_s=settings.webhook_backoff_s, backoff_max_s=settings.webhook_backoff_max_s,
        # Outlives one POST (so no peer sends it meanwhile); what a dead process had
        # leased is sent again this soon after.
        lease_s=2 * settings.webhook_timeout_s + 5, keyless_secret=keyless,
        history_s=settings.webhook_history_s)
    return WebhookDispatcher(store, webhook_body, instance_id=instance_id, guard=guard,
                             config=config)


def create_app(
    settings: Settings | None = None,
    *,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    migrate: bool = True,
) -> Litestar:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    instance_id = settings.instance_id or f"{socket.gethostname()}:{settings.port}"

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        store = Store(settings.database_url)
        if migrate:
            await store.upgrade()
        providers, disabled = build_providers(settings, transports)
        router = Router(providers, settings.routing, disabled)
        metrics.precreate(providers, settings.models)  # every known series, at zero
        metrics.precreate_keys(providers, settings.models,
                               [k.name for k in await store.list_keys(include_revoked=False)])
        service = PredictionService(
            store,
            router,
            instance_id=instance_id,
            lease_s=settings.lease_s,
            prediction_deadline_s=settings.prediction_deadline_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            notifier=notifier_for(store.listen_dsn()),
        )
        app.state.service = service
        app.state.provider_settings = settings.provider_settings()
        webhooks = _webhooks(settings, store, instance_id)
        service.on_change = webhooks.nudge
        app.state.webhooks = webhooks
        # Outputs copied before each end is written, served by api/outputs.py, swept.
        output_store = open_store(settings)
        service.runner.output_store = output_store
        app.state.output_store = output_store
        # Shared by every process and replica (README "Several processes"); redis is
        # imported only when it is configured.
        shared = _open_shared(settings.redis_url.get_secret_value()) if settings.redis_url \
            else None
        if shared is not None and not await shared.ping():
            log.warning("redis.unreachable", redis=shared.safe_url,
                        message="rate limits and breakers are per process until it answers")
        app.state.auth = Auth(
            store,
            enabled=settings.auth_enabled,
            admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
            key_secret=settings.key_secret.get_secret_value() if settings.key_secret else None,
            limiter=limiter_for(shared=shared, store=store, workers=settings.workers),
        )
        key_hash_secret = await app.state.auth.secret()
        if output_store is not None and settings.output_signed_urls:
            output_store.signing_key = signing.derive_key(key_hash_secret)
        health_sync = _health_sync(router, shared, instance_id) if shared else None
        if health_sync is not None:
            await health_sync.start()
        if output_store is not None:
            await output_store.start()
        await service.start()
        await webhooks.start()
        log.info("proxy.started", instance_id=instance_id, providers=router.enabled,
                 disabled=disabled, database=store.safe_url, auth=settings.auth_enabled,
                 key_hash_secret=app.state.auth.secret_source,
                 admin_routes=bool(settings.admin_key),
                 redis=shared.safe_url if shared else None,
                 output_store=output_store.backend.description if output_store else None,
                 rate_limits=type(app.state.auth.limiter).__name__)
        if not settings.auth_enabled:
            log.warning("auth.disabled", message="client API keys are NOT checked "
                        "(auth_enabled = false): every caller can spend; local development only")
        try:
            yield
        finally:
            await service.stop()
            await webhooks.stop()
            if output_store is not None:
                await output_store.stop()
            if health_sync is not None:
                await health_sync.stop()
            if shared is not None:
                await shared.aclose()
            for provider in providers.values():
                await provider.aclose()
            await store.dispose()
            log.info("proxy.stopped", instance_id=instance_id)

    handlers: dict[Any, Any] = {
        HTTPException: http_exception_handler,
        Exception: internal_error_handler,
    }
    app = Litestar(
        route_handlers=[PredictionController, get_output, list_models, spend,
                        AdminKeysController,
                        AdminWebhooksController,
                        healthz, readyz, metrics_page,
                        # Compatibility surfaces: other wire formats onto the same service.
                        *openai_compat.HANDLERS, *wavespeed_compat.HANDLERS,
                        *vibedream_compat.HANDLERS, *playground.HANDLERS],
        lifespan=[lifespan],
        # flux_proxy_http_* per route (not /metrics); its buckets go past sync_timeout_s.
        middleware=[HttpMetrics],
        exception_handlers=handlers,
        dependencies=DEPENDENCIES,
        request_max_body_size=settings.max_body_bytes,
        # Bearer security derived from the guards; /schema works offline (api/openapi.py).
        openapi_config=openapi_config(title="flux-proxy", version="0.1.0", path="/schema"),
        compression_config=CompressionConfig(backend="gzip", minimum_size=4096,
                                             middleware_class=SmallBodyCompression,
                                             exclude_opt_key=SKIP_COMPRESSION),
        debug=False,
        logging_config=None,  # ours (common/logging.py) renders every line, library ones too
    )
    app.state.settings = settings
    # x-request-id, x-flux-proxy-overhead-ms, the log context: around everything, 404s too.
    app.asgi_handler = RequestContext(app.asgi_handler)
    return app
