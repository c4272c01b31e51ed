"""A Python client for flux-proxy (sync and asyncio), needing only httpx.

    from flux_proxy import FluxProxy

    with FluxProxy("http://127.0.0.1:8080", api_key) as fp:
        pred = fp.generate("a red fox in snow", size="1024*768", seed=42)
        pred.save("out/")   # out/<id>-0.jpg

Errors are typed (flux_proxy._errors has the tree) and carry the proxy's error body.
"""

from __future__ import annotations

from flux_proxy._async import AsyncFluxProxy
from flux_proxy._errors import (
    AuthError,
    BudgetExceeded,
    Conflict,
    ConnectError,
    FieldError,
    FluxProxyError,
    ImageInputError,
    NoProvider,
    NotFound,
    PolicyRefused,
    PredictionFailed,
    RateLimited,
    ServerError,
    Unavailable,
    Unsupported,
    ValidationError,
    WaitTimeout,
)
from flux_proxy._inputs import ImageInput, encode_image
from flux_proxy._sync import FluxProxy
from flux_proxy._types import Attempt, Model, Page, Prediction, ProviderInfo, Spend, SpendRow


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flux-proxy")
    except PackageNotFoundError:  # imported from a source tree that is not installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "AsyncFluxProxy", "Attempt", "AuthError", "BudgetExceeded", "Conflict", "ConnectError",
    "FieldError", "FluxProxy", "FluxProxyError", "ImageInput", "ImageInputError", "Model",
    "NoProvider", "NotFound", "Page", "PolicyRefused", "Prediction", "PredictionFailed",
    "ProviderInfo", "RateLimited", "ServerError", "Spend", "SpendRow", "Unavailable",
    "Unsupported", "ValidationError", "WaitTimeout", "__version__", "encode_image",
]
