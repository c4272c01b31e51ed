"""/v1/models, /healthz, /readyz."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from ..auth import require_key
from ..service import PredictionService


@get("/v1/models", tags=["models"], summary="Models, providers and their capabilities",
     guards=[require_key])
async def list_models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    state = request.app.state
    service: PredictionService = state.service
    router = service.router
    providers = []
    health = router.snapshot()
    for name, (kind, _settings) in state.provider_settings.items():
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
                "providers": providers,
                "routing": router.settings.route_for(model).model_dump(),
            }
            for model in state.settings.models
        ]
    }


@get("/healthz", tags=["system"], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", tags=["system"], summary="Readiness: database reachable, a provider enabled")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    service: PredictionService = request.app.state.service
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
