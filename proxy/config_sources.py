"""Where settings come from, for proxy/config.py: the TOML file, the environment
(`FLUX_PROXY_*` and the provider contracts' own variables), and the walk over the
settings' schema that finds (and names the closest to) an unknown key."""

from __future__ import annotations

import difflib
import json
import tomllib
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from providers.base import ProviderSettings
from providers.registry import PROVIDERS, UnknownProviderKind, settings_class

if TYPE_CHECKING:
    pass


ENV_PREFIX = "FLUX_PROXY_"
ENV_DELIMITER = "__"
CONFIG_VARIABLE = "FLUX_PROXY_CONFIG"  # names the TOML file; not itself a setting
# Variables that steer the test run, not the proxy (tests/conftest.py keeps them).
TEST_RUN_VARIABLES = frozenset({"FLUX_PROXY_SKIP_PG", "FLUX_PROXY_TEST_PG_URL"})
# Variables of the client side (the flux_proxy package, `flux-proxy generate`): a shell
# that exports them can still run `serve`, `keys` and `spend`.
CLIENT_VARIABLES = frozenset({"FLUX_PROXY_URL", "FLUX_PROXY_API_KEY"})
# FLUX_PROXY_* variables that are allowed without being settings.
NOT_SETTINGS = frozenset({CONFIG_VARIABLE, *TEST_RUN_VARIABLES, *CLIENT_VARIABLES})

DEFAULT_PROVIDERS = ("local", "wavespeed", "vibedream")
# Env names the provider contracts use; each maps onto providers.<name>.<field>.
PROVIDER_ENV_FIELDS = ("API_KEY", "BASE_URL")


class ConfigError(ValueError):
    """A configuration problem, said in one line."""


# --------------------------------------------------------------------------- the TOML file


def read_config_file(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"{CONFIG_VARIABLE}={path}: no such file")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{CONFIG_VARIABLE}={path}: not valid TOML ({exc})") from None


def check_config_file(data: Mapping[str, Any], path: str, kinds: Mapping[str, str]) -> None:
    """Refuse a key that is no setting, at any depth, naming the closest one."""
    unknown = find_unknown(data, (), kinds)
    if unknown:
        where, why = ".".join(unknown[0]), unknown[1]
        known = [".".join(p) for p in setting_paths(kinds, _models({}, data))]
        raise ConfigError(f"{path}: unknown setting {where}{why}{_suggest(where, known)}")


def find_unknown(table: Mapping[str, Any], at: tuple[str, ...],
                 kinds: Mapping[str, str]) -> tuple[tuple[str, ...], str] | None:
    """The first key in `table` (the value of the setting at `at`) that is no
    setting, with why; None when all are."""
    for key, value in table.items():
        where = (*at, str(key))
        try:
            child = _child(_lookup(at, kinds), at, str(key), kinds)
        except _NotASetting as exc:
            return where, exc.why
        if isinstance(value, Mapping) and _is_table(child):
            found = find_unknown(value, where, kinds)
            if found:
                return found
    return None


# --------------------------------------------------------------------------- environment


class ProxyEnvSource(PydanticBaseSettingsSource):
    """`FLUX_PROXY_<PATH>` variables, the path joined with `__`; any other is refused."""

    def __init__(self, settings_cls: type[BaseSettings], kinds: Mapping[str, str],
                 environ: Mapping[str, str], models: Sequence[str]) -> None:
        super().__init__(settings_cls)
        self._kinds, self._environ, self._models = kinds, environ, models

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = [(env_path(name), name) for name in self._environ
                 if name.upper().startswith(ENV_PREFIX) and name.upper() not in NOT_SETTINGS]
        out: dict[str, Any] = {}
        # Whole tables first, so FLUX_PROXY_ROUTING__ORDER refines FLUX_PROXY_ROUTING='{...}'.
        for path, name in sorted(found, key=lambda item: (len(item[0]), item[1])):
            try:
                leaf = _lookup(path, self._kinds)
            except _NotASetting as exc:
                known = [env_name(p) for p in setting_paths(self._kinds, self._models)]
                raise ConfigError(f"unknown setting {name} in the environment{exc.why}"
                                  f"{_suggest(name.upper(), known)}") from None
            value = decode_env_value(name, self._environ[name], leaf)
            unknown = find_unknown(value, path, self._kinds) if isinstance(value, dict) else None
            if unknown:
                raise ConfigError(f"{name}: unknown setting {'.'.join(unknown[0])}{unknown[1]}")
            _merge(out, path, value)
        return out


class ProviderEnvSource(PydanticBaseSettingsSource):
    """`VIBEDREAM_API_KEY`-style variables -> providers.vibedream.api_key.

    Reads `<NAME>_<FIELD>` for every provider name in the defaults, the TOML file
    and `FLUX_PROXY_PROVIDERS__<NAME>__...` variables, so a provider added as
    `[providers.acme]` takes `ACME_API_KEY` too.
    """

    def __init__(self, settings_cls: type[BaseSettings], kinds: Mapping[str, str],
                 environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._kinds, self._environ = kinds, environ

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        providers: dict[str, dict[str, str]] = {}
        for name in self._kinds:
            for fld in PROVIDER_ENV_FIELDS:
                value = self._environ.get(f"{name.upper()}_{fld}")
                if value is not None:
                    providers.setdefault(name, {})[fld.lower()] = value
        workers = self._environ.get("LOCAL_WORKER_URLS")
        if workers is not None:  # the name for worker_urls
            providers.setdefault("local", {})["worker_urls"] = workers
        return {"providers": providers} if providers else {}


def env_path(name: str) -> tuple[str, ...]:
    """FLUX_PROXY_ROUTING__BREAKER__COOLDOWN_S -> ("routing", "breaker", "cooldown_s")."""
    return tuple(name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER))


def env_name(path: Sequence[str]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(path).upper()


def decode_env_value(name: str, raw: str, annotation: Any) -> Any:
    """A variable's text as the setting wants it: lists from JSON or commas,
    tables from a JSON object; scalars stay text for pydantic to convert."""
    ann = _unwrap(annotation)
    if _is_table(ann):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected a JSON object ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a JSON object")
        return value
    if get_origin(ann) in (list, set, tuple, frozenset) or ann in (list, set, tuple, frozenset):
        if raw.lstrip().startswith("["):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: expected a JSON list or comma-separated values "
                                  f"({exc})") from None
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def provider_kinds(init: Mapping[str, Any], environ: Mapping[str, str],
                   toml: Mapping[str, Any]) -> dict[str, str]:
    """Every provider name the configuration can mean -> its kind (by precedence)."""
    kinds = {name: name for name in (*DEFAULT_PROVIDERS, *PROVIDERS)}
    env_tables: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX + "PROVIDERS"):
            continue
        path = env_path(name)
        if path == ("providers",) or (len(path) == 2 and path[0] == "providers"):
            try:
                value = json.loads(raw)
            except ValueError:
                continue  # reported with the variable's name when it is read
            if isinstance(value, dict):
                _merge(env_tables, path[1:], value)
        elif len(path) == 3 and path[0] == "providers" and path[2] == "kind":
            _merge(env_tables, path[1:], raw)
    for source in (toml.get("providers"), env_tables, init.get("providers")):
        if isinstance(source, Mapping):
            for name, table in source.items():
                kind = table.get("kind") if isinstance(table, Mapping) else None
                kinds[str(name)] = str(kind) if kind else kinds.get(str(name), str(name))
    return kinds


# --------------------------------------------------------------------------- the settings tree


class _ProviderTable(NamedTuple):
    kind: str


class _NotASetting(Exception):
    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = f" ({why})" if why else ""


def _unwrap(ann: Any) -> Any:
    """X | None -> X."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _is_table(ann: Any) -> bool:
    ann = _unwrap(ann)
    return (_is_model(ann) or isinstance(ann, _ProviderTable) or ann is dict
            or get_origin(ann) is dict)


def _provider_class(kind: str) -> type[ProviderSettings] | None:
    try:
        return settings_class(kind)
    except UnknownProviderKind:
        return None  # the model validator names the kind


def _child(ann: Any, at: tuple[str, ...], key: str, kinds: Mapping[str, str]) -> Any:
    """The type of setting `key` under the setting of type `ann` found at `at`."""
    ann = _unwrap(ann)
    if at == ("providers",):
        if key not in kinds:
            raise _NotASetting(f"no provider {key!r}; a new one needs its kind, e.g. "
                               f"{env_name(('providers', key, 'kind'))}=wavespeed")
        return _ProviderTable(kinds[key])
    if isinstance(ann, _ProviderTable):
        if key == "kind":
            return str
        cls = _provider_class(ann.kind)
        if cls is None:
            return Any
        if key not in cls.model_fields:
            raise _NotASetting(f"providers of kind {ann.kind} have no setting {key!r}")
        return cls.model_fields[key].annotation
    if _is_model(ann):
        if key not in ann.model_fields:
            raise _NotASetting()
        return ann.model_fields[key].annotation
    if get_origin(ann) is dict:
        return get_args(ann)[1]
    if ann is Any:
        return Any
    raise _NotASetting(f"{'.'.join(at)} has no parts" if at else "")


def _lookup(path: Sequence[str], kinds: Mapping[str, str]) -> Any:
    from proxy.config import Settings  # the root of the schema (it imports this module)

    ann: Any = Settings
    for depth, key in enumerate(path):
        ann = _child(ann, tuple(path[:depth]), key, kinds)
    return ann


def setting_paths(kinds: Mapping[str, str], models: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Every setting's path (per-key tables named by the known providers and models)."""

    def walk(ann: Any, at: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        ann = _unwrap(ann)
        if at == ("providers",):
            keys: Sequence[str] = list(kinds)
        elif isinstance(ann, _ProviderTable):
            cls = _provider_class(ann.kind)
            keys = ["kind", *(cls.model_fields if cls else ())]
        elif _is_model(ann):
            keys = list(ann.model_fields)
        elif get_origin(ann) is dict and at[-1:] == ("routes",):
            keys = list(models)
        elif get_origin(ann) is dict and at[-1:] == ("weights",):
            keys = list(kinds)
        else:
            return
        for key in keys:
            yield (*at, key)
            yield from walk(_child(ann, at, key, kinds), (*at, key))

    from proxy.config import Settings

    return walk(Settings, ())


def _models(init: Mapping[str, Any], toml: Mapping[str, Any]) -> list[str]:
    for source in (init, toml):
        if isinstance(source.get("models"), list):
            return [str(m) for m in source["models"]]
    return ["flux-dev"]


def _merge(out: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Set out[path] = value, merging tables (a later, deeper value wins)."""
    *parents, last = path
    for key in parents:
        nxt = out.get(key)
        if not isinstance(nxt, dict):
            nxt = out[key] = {}
        out = nxt
    if isinstance(value, dict) and isinstance(out.get(last), dict):
        for key, item in value.items():
            _merge(out[last], [key], item)
    else:
        out[last] = value


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
