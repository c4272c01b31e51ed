"""structlog setup: one JSON line per event (or pretty console lines in a terminal),
secrets and inline image data scrubbed before rendering.

Context bound with ``structlog.contextvars`` (the request id, a prediction's id, key
name, provider and attempt: proxy/api/request_context.py, proxy/lifecycle/) is merged
into every line, library ones included.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

# Keys whose values are never logged, whatever they hold.
SENSITIVE_KEYS = frozenset(
    {"authorization", "api_key", "apikey", "key", "token", "password", "secret", "x-api-key"}
)
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")
# Image bytes never reach a log: a data URI's payload, and bare base64 that starts as
# an encoded PNG, JPEG, WebP or GIF does (or is simply too long to be anything else).
_DATA_URI = re.compile(r"(data:[\w.+-]*/[\w.+-]*(?:;[\w.+-]+=[\w.+-]+)*;base64,)"
                       r"[A-Za-z0-9+/=]*")
_IMAGE_BASE64 = re.compile(r"(?:iVBORw0KGgo|/9j/|UklGR|R0lGOD)[A-Za-z0-9+/]{8,}=*"
                           r"|[A-Za-z0-9+/]{160,}={0,2}")
_secrets: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Values (upstream keys, admin key) scrubbed from every log line."""
    _secrets.update(v for v in values if v and len(v) >= 4)


def _scrub_text(text: str) -> str:
    text = _BEARER.sub("Bearer [REDACTED]", text)
    if len(text) >= 16:
        text = _DATA_URI.sub(lambda m: f"{m[1]}[{len(m[0]) - len(m[1])} chars]", text)
        text = _IMAGE_BASE64.sub(lambda m: f"[base64, {len(m[0])} chars]", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {
            k: "[REDACTED]" if str(k).lower() in SENSITIVE_KEYS else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        event[key] = "[REDACTED]" if key.lower() in SENSITIVE_KEYS else _scrub(event[key])
    return event


def resolve_format(fmt: str, stream: TextIO) -> str:
    """`json` or `console`: `auto` is console when `stream` is a terminal, JSON when it
    is anything else (a pipe, a file, a container's log driver)."""
    if fmt != "auto":
        return fmt
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Every line to `stream` (default stdout): `fmt` json (one object a line),
    console (aligned, coloured on a terminal) or auto (`resolve_format`)."""
    out = stream or sys.stdout
    renderer: Any
    if resolve_format(fmt, out) == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        try:
            colors = out.isatty()
        except (AttributeError, ValueError):
            colors = False
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Library logs (uvicorn, alembic, httpx) get the same JSON lines and redaction.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries: warnings and up; our events go direct
    for name in ("uvicorn.error", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "flux_proxy") -> Any:
    return structlog.get_logger(name)
