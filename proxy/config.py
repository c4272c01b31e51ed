"""Settings: environment variables, plus an optional TOML file (FLUX_PROXY_CONFIG).

Precedence, highest first: init arguments (tests), environment, TOML file,
defaults. Top-level settings read `FLUX_PROXY_<NAME>`; nested ones use `__`
(`FLUX_PROXY_ROUTING__ORDER='["vibedream"]'`). The provider variables named by
the seeds (`VIBEDREAM_API_KEY`, `WAVESPEED_BASE_URL`, ...) are read as such.
Every setting is documented in the README's configuration reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from providers.base import ProviderSettings
from providers.registry import settings_class

from .routing import RoutingSettings

DEFAULT_PROVIDERS = ("local", "wavespeed", "vibedream")
# Env names the provider contracts use; each maps onto providers.<name>.<field>.
PROVIDER_ENV_FIELDS = ("API_KEY", "BASE_URL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLUX_PROXY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///./flux-proxy.db"
    # Where clients reach us; used to build urls.get / urls.cancel. Empty: from the request.
    public_base_url: str = ""
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # enable_sync_mode waits at most this long, then answers with the running prediction.
    sync_timeout_s: float = Field(default=120.0, gt=0)
    # Bound on one prediction across all its attempts.
    prediction_deadline_s: float = Field(default=600.0, gt=0)
    # Leases: a prediction driven by a process that stopped renewing is resumed elsewhere.
    lease_s: float = Field(default=30.0, gt=0)
    # Names this process in leases; a restart with the same id resumes its own
    # predictions at once. Empty: "<hostname>:<port>".
    instance_id: str = ""
    # Client API keys on every /v1 route. Switch off only for local development.
    auth_enabled: bool = True
    admin_key: SecretStr | None = None  # FLUX_PROXY_ADMIN_KEY: guards /admin and sees all
    key_secret: SecretStr | None = None  # FLUX_PROXY_KEY_SECRET: HMAC secret of key hashes
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
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
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            ProviderEnvSource(settings_cls),
            env_settings,
        ]
        path = os.environ.get("FLUX_PROXY_CONFIG")
        if path:
            if not Path(path).is_file():
                raise ValueError(f"FLUX_PROXY_CONFIG={path}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("database_url must not be empty")
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
            try:
                cls.model_validate(values)
            except ValidationError as exc:
                raise ValueError(f"providers.{name}: {exc}") from exc
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

    def provider_settings(self) -> dict[str, tuple[str, ProviderSettings]]:
        """name -> (kind, validated settings) for every configured provider."""
        out: dict[str, tuple[str, ProviderSettings]] = {}
        for name, table in self.providers.items():
            values = dict(table)
            kind = values.pop("kind", name)
            out[name] = (kind, settings_class(kind).model_validate(values))
        return out


class ProviderEnvSource(PydanticBaseSettingsSource):
    """`VIBEDREAM_API_KEY`-style variables -> providers.vibedream.api_key.

    Reads `<NAME>_<FIELD>` for every provider name in the TOML/defaults plus the
    built-in ones, so a provider added in TOML as `[providers.acme]` takes
    `ACME_API_KEY` too.
    """

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        names = set(DEFAULT_PROVIDERS)
        path = os.environ.get("FLUX_PROXY_CONFIG")
        if path and Path(path).is_file():
            import tomllib

            with open(path, "rb") as fh:
                names |= set(tomllib.load(fh).get("providers", {}))
        providers: dict[str, dict[str, str]] = {}
        for name in names:
            for fld in PROVIDER_ENV_FIELDS:
                value = os.environ.get(f"{name.upper()}_{fld}")
                if value is not None:
                    providers.setdefault(name, {})[fld.lower()] = value
        workers = os.environ.get("LOCAL_WORKER_URLS")
        if workers is not None:  # the name for providers.local.worker_urls
            providers.setdefault("local", {})["worker_urls"] = workers
        return {"providers": providers} if providers else {}


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
