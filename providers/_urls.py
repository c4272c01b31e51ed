"""Upstream URLs: parsed once per provider, and the same-origin rule for URLs an
upstream hands back (only those may be fetched with our key)."""

from __future__ import annotations

import httpx

URL_CACHE_MAX = 4096


class URLCache:
    """Upstream URLs parsed once (httpx re-parses a URL string on every request:
    for a literal IP host that includes an `ipaddress` parse), relative ones merged
    onto `base_url` the way httpx does it (the base's path, then the URL's path).
    Bounded: forgotten all at once when `URL_CACHE_MAX` are held."""

    def __init__(self, base_url: httpx.URL | str | None = None) -> None:
        self._base = httpx.URL(base_url) if base_url is not None else None
        if self._base is not None and not self._base.raw_path.endswith(b"/"):
            self._base = self._base.copy_with(raw_path=self._base.raw_path + b"/")
        self._urls: dict[str, httpx.URL] = {}
        self._origins: dict[str, bool] = {}

    def get(self, url: str) -> httpx.URL:
        """The parsed URL; raises httpx.InvalidURL (as httpx would) for a bad one."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)
            if parsed.is_relative_url and self._base is not None:
                parsed = self._base.copy_with(
                    raw_path=self._base.raw_path + parsed.raw_path.lstrip(b"/"))
            if len(self._urls) >= URL_CACHE_MAX:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    def same_origin(self, url: str) -> bool:
        """`same_origin(url, base_url)`, remembered."""
        known = self._origins.get(url)
        if known is None:
            known = self._base is not None and same_origin(url, str(self._base))
            if len(self._origins) >= URL_CACHE_MAX:
                self._origins.clear()
            self._origins[url] = known
        return known


def same_origin(url: str, base_url: str) -> bool:
    """True when `url` is on base_url's scheme, host and port: the only place an
    upstream-supplied URL may be fetched with our key."""
    try:
        u, b = httpx.URL(url), httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        return False
    return (u.scheme, u.host, u.port) == (b.scheme, b.host, b.port) and not u.userinfo
