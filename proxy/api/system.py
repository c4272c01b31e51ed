"""/v1/models, /healthz, /readyz, /metrics."""

from __future__ import annotations

from typing import Any

from litestar import Response, get

from proxy import metrics
from proxy.accounts.auth import require_key
from proxy.api.deps import ApiDep

# OpenAI's model object also has `created` (unix seconds) and `owned_by`, which the
# SDK's models.list() / models.retrieve() read: FLUX.1 [dev]'s release (2024-08-01 UTC).
MODEL_CREATED = 1_722_470_400
MODEL_OWNED_BY = "flux-proxy"


@get("/v1/models", tags=["models"], summary="Models, providers and their capabilities",
     guards=[require_key])
async def list_models(api: ApiDep) -> dict[str, Any]:
    router, settings = api.service.router, api.settings
    provider_settings = api.provider_settings
    providers = []
    health = router.snapshot()
    for name, (kind, _settings) in provider_settings.items():
        provider = router.providers.get(name)
        providers.append(
            {
                "name": name,
                "kind": kind,
                "enabled": name in router.enabled,
                "disabled_reason": router.disabled.get(name),
                "capabilities": provider.capabilities.as_dict() if provider else None,
                "health": health.get(name),
            }
        )
    return {
        "data": [
            {
                "id": model,
                "object": "model",
                "created": MODEL_CREATED,
                "owned_by": MODEL_OWNED_BY,
                "providers": providers,
                "routing": router.settings.route_for(model).model_dump(),
            }
            for model in settings.models
        ]
    }


@get("/metrics", tags=["system"], summary="Prometheus metrics (of every worker together)",
     media_type=metrics.CONTENT_TYPE)
async def metrics_page() -> bytes:
    return metrics.exposition()


@get("/healthz", tags=["system"], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["system"], summary="Readiness: database reachable, a provider enabled")
async def readyz(api: ApiDep) -> Response[dict[str, Any]]:
    service = api.service
    db_ok = await service.store.ping()
    enabled = service.router.enabled
    ready = db_ok and bool(enabled)
    health = service.router.snapshot()
    body = {
        "status": "ready" if ready else "not_ready",
        "database": "ok" if db_ok else "unreachable",
        "providers": {name: ("enabled" if name in enabled else why)
                      for name, why in {**service.router.disabled,
                                        **{n: "enabled" for n in enabled}}.items()},
        # Breakers are reported, not used for readiness: every replica shares
        # the same upstreams, so taking this one out of rotation would not help.
        "breakers": {name: h["state"] for name, h in health.items()},
    }
    return Response(body, status_code=200 if ready else 503)
