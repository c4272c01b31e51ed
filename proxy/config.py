"""Settings: environment variables, plus an optional TOML file (FLUX_PROXY_CONFIG).

Precedence, highest first: init arguments (tests), the provider variables the
seeds name (`VIBEDREAM_API_KEY`, `WAVESPEED_BASE_URL`, `LOCAL_WORKER_URLS`, ...),
`FLUX_PROXY_*` variables, the TOML file, defaults. Top-level settings read
`FLUX_PROXY_<NAME>`; nested ones join the path with `__`
(`FLUX_PROXY_ROUTING__BREAKER__COOLDOWN_S=5`,
`FLUX_PROXY_PROVIDERS__VIBEDREAM__ASSET_HOSTS=a.example,b.example`). A list
takes JSON (`'["a", "b"]'`) or comma-separated values; a table (a route, a
provider, the breaker) takes a JSON object. Every setting is in the README's
configuration reference.

Unknown settings are refused, naming the variable or key and the closest valid
name: every `FLUX_PROXY_*` variable must be a setting, except those in
`NOT_SETTINGS` (the config file's name, and the test run's own switches).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common import media
from providers.base import ProviderSettings
from providers.registry import settings_class
from proxy.config_sources import (
    CONFIG_VARIABLE,
    DEFAULT_PROVIDERS,
    ENV_PREFIX,
    NOT_SETTINGS,
    TEST_RUN_VARIABLES,
    ConfigError,
    ProviderEnvSource,
    ProxyEnvSource,
    _models,
    _suggest,
    check_config_file,
    provider_kinds,
    read_config_file,
)

# Named here by the CLI and the tests (they live in config_sources.py).
__all__ = ["CONFIG_VARIABLE", "NOT_SETTINGS", "TEST_RUN_VARIABLES", "ConfigError", "Settings",
           "load_settings", "setting_source"]
from proxy.routing import RoutingSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///./flux-proxy.db"
    # Where clients reach us; used to build urls.get / urls.cancel. Empty: from the request.
    public_base_url: str = ""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Uploaded media (WaveSpeed's upload routes): a folder shared by every process,
    # files kept this long after upload, then swept.
    media_dir: str = "./flux-proxy-media"
    media_retention_s: float = Field(default=24 * 3600.0, gt=0)
    # Memory bounds for the whole process (common/media/budget.py): output download
    # bodies held at once (base64 emulation), and image decoding/encoding at once
    # (outputs' pixels and data URIs, requests' inline images). Work waits its turn.
    max_inflight_download_bytes: int = Field(default=media.budget.DEFAULT_DOWNLOAD_BYTES,
                                             ge=1024 * 1024)
    max_inflight_decode_bytes: int = Field(default=media.budget.DEFAULT_DECODE_BYTES,
                                           ge=1024 * 1024)
    # A client must send a request's complete headers within this (from its first
    # byte, or from connecting), and never pause longer than the body timeout between
    # two reads of the body; otherwise 408 and the connection is closed.
    client_header_timeout_s: float = Field(default=10.0, gt=0)
    client_body_timeout_s: float = Field(default=30.0, gt=0)
    # enable_sync_mode waits at most this long, then answers with the running prediction.
    sync_timeout_s: float = Field(default=120.0, gt=0)
    # Bound on one prediction across all its attempts.
    prediction_deadline_s: float = Field(default=600.0, gt=0)
    # How long an Idempotency-Key (and the prediction it made) is remembered per client key.
    idempotency_ttl_s: float = Field(default=86_400.0, gt=0)
    # Webhooks (proxy/lifecycle/webhooks.py): each POST may take webhook_timeout_s; a
    # delivery that keeps failing is retried (backoff from webhook_backoff_s, doubling
    # up to webhook_backoff_max_s) for webhook_retry_window_s after its first try.
    # Webhook URLs must be public addresses unless webhook_allow_private (tests,
    # on-prem receivers); webhook_allowed_hosts, when set, also limits the hosts.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retry_window_s: float = Field(default=24 * 3600.0, gt=0)
    webhook_backoff_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=600.0, gt=0)
    webhook_allow_private: bool = False
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    # Signs the webhooks of predictions made without a client key (admin key, auth
    # off); a client key's own secret signs its predictions'. A rotated key secret
    # keeps signing too for webhook_secret_grace_s (both signatures are sent).
    webhook_secret: SecretStr | None = None
    webhook_secret_grace_s: float = Field(default=24 * 3600.0, ge=0)
    # Finished deliveries and their POSTs (GET /admin/webhooks) are kept this long.
    webhook_history_s: float = Field(default=7 * 86_400.0, gt=0)
    # Outputs the proxy keeps (proxy/outputs_store/): unset, clients get the providers'
    # URLs; a folder (or file:// URL) or s3://bucket/prefix, each output is copied there
    # (at most output_store_max_bytes, within output_copy_timeout_s) before the
    # prediction's end is written, and served at /v1/predictions/{id}/outputs/{n} for
    # output_retention_s; a sweep every output_sweep_interval_s deletes older ones.
    # S3 credentials and region: the usual AWS_* variables; the endpoint of an
    # S3-compatible server: output_store_s3_endpoint_url.
    output_store: str | None = None
    output_store_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    output_copy_timeout_s: float = Field(default=60.0, gt=0)
    output_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    output_sweep_interval_s: float = Field(default=60.0, gt=0)
    output_store_s3_endpoint_url: str | None = None
    # The kept outputs' URLs carry a signature valid for their retention, so a client
    # can fetch them without its key (as SDKs fetch providers' image URLs); off: the
    # route takes the caller's key only.
    output_signed_urls: bool = True
    # Leases: a prediction driven by a process that stopped renewing is resumed elsewhere.
    lease_s: float = Field(default=30.0, gt=0)
    # Names this process in leases; a restart with the same id resumes its own
    # predictions at once. Empty: "<hostname>:<port>".
    instance_id: str = ""
    # Server processes on one port (`serve --workers`), sharing the database; each is
    # named "<instance_id>/<n>" in leases. 1: one process, as before (proxy/serve.py).
    workers: int = Field(default=1, ge=1, le=64)
    # FLUX_PROXY_REDIS_URL: key rate limits, breaker opens and provider 429 cooldowns
    # shared by every process and replica (`?key_prefix=` names its keys; proxy/shared.py).
    redis_url: SecretStr | None = None
    # Client API keys on every /v1 route. Switch off only for local development.
    auth_enabled: bool = True
    admin_key: SecretStr | None = None  # FLUX_PROXY_ADMIN_KEY: guards /admin and sees all
    key_secret: SecretStr | None = None  # FLUX_PROXY_KEY_SECRET: HMAC secret of key hashes
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON lines when stdout is not a terminal (production), console when it is.
    log_format: Literal["auto", "json", "console"] = "auto"
    models: list[str] = Field(default_factory=lambda: ["flux-dev"])
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    # name -> settings table; `kind` picks the adapter (defaults to the name).
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = dict(os.environ)
        path = environ.get(CONFIG_VARIABLE)
        toml = read_config_file(path) if path else {}
        init = dict(getattr(init_settings, "init_kwargs", {}))
        kinds = provider_kinds(init, environ, toml)
        if path:
            check_config_file(toml, path, kinds)
        return (
            init_settings,
            ProviderEnvSource(settings_cls, kinds, environ),
            ProxyEnvSource(settings_cls, kinds, environ, _models(init, toml)),
            InitSettingsSource(settings_cls, toml),
        )

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("database_url must not be empty")
        return v

    @field_validator("output_store")
    @classmethod
    def _output_store(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None  # FLUX_PROXY_OUTPUT_STORE= (empty): off
        if v and v.startswith("s3://") and not v.removeprefix("s3://").split("/", 1)[0]:
            raise ValueError("output_store: s3://<bucket>[/<prefix>] needs a bucket")
        if v and "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError("output_store: a folder, a file:// URL or s3://<bucket>[/<prefix>]")
        return v

    @model_validator(mode="after")
    def _check_providers(self) -> Settings:
        for name in DEFAULT_PROVIDERS:
            self.providers.setdefault(name, {})
        for name, table in self.providers.items():
            values = dict(table)
            kind = values.pop("kind", name)
            try:
                cls = settings_class(kind)
            except KeyError as exc:
                raise ValueError(f"providers.{name}: unknown kind {kind!r}") from exc
            unknown = sorted(set(values) - set(cls.model_fields))
            if unknown:
                hint = _suggest(unknown[0], ["kind", *cls.model_fields])
                raise ValueError(f"providers.{name}: unknown setting {unknown[0]!r} for kind "
                                 f"{kind}{hint}")
            try:
                cls.model_validate(values)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"providers.{name}: {problems}") from None
        unknown = [n for n in self.routing.order if n not in self.providers]
        if unknown:
            raise ValueError(f"routing.order names unknown providers: {unknown}")
        for model, route in self.routing.routes.items():
            if model not in self.models:
                raise ValueError(f"routing.routes.{model}: not one of models {self.models}")
            named = [*(route.providers or []), *route.weights]
            unknown = sorted({n for n in named if n not in self.providers})
            if unknown:
                raise ValueError(f"routing.routes.{model} names unknown providers: {unknown}")
        return self

    @model_validator(mode="after")
    def _check_memory_bounds(self) -> Settings:
        """A download the budgets could never hold is refused here, not at run time."""
        for name, (_kind, ps) in self.provider_settings().items():
            if ps.max_download_bytes > self.max_inflight_download_bytes:
                raise ValueError(
                    f"providers.{name}.max_download_bytes ({ps.max_download_bytes}) exceeds "
                    f"max_inflight_download_bytes ({self.max_inflight_download_bytes}): "
                    "such a download could never fit; raise the budget or lower the limit")
            # Encoding as a data URI holds its text twice (4/3 of the bytes each).
            encode = 2 * media.data_uri_length(ps.max_download_bytes, "jpeg")
            if encode > self.max_inflight_decode_bytes:
                raise ValueError(
                    f"providers.{name}.max_download_bytes ({ps.max_download_bytes}) needs up to "
                    f"{encode} bytes of max_inflight_decode_bytes "
                    f"({self.max_inflight_decode_bytes}) to become a data URI; raise the "
                    "budget or lower the limit")
        return self

    def provider_settings(self) -> dict[str, tuple[str, ProviderSettings]]:
        """name -> (kind, validated settings) for every configured provider."""
        out: dict[str, tuple[str, ProviderSettings]] = {}
        for name, table in self.providers.items():
            values = dict(table)
            kind = values.pop("kind", name)
            out[name] = (kind, settings_class(kind).model_validate(values))
        return out


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def setting_source(name: str, environ: Mapping[str, str] | None = None) -> str:
    """Where a top-level setting comes from: its variable, the config file, or "default"."""
    env = os.environ if environ is None else environ
    variable = ENV_PREFIX + name.upper()
    if any(k.upper() == variable for k in env):
        return variable
    path = env.get(CONFIG_VARIABLE)
    if path and Path(path).is_file() and name in read_config_file(path):
        return path
    return "default"
