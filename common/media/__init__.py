"""Fetch, sniff, validate and encode images; guard outbound requests (SSRF).

Public API (import from ``common.media``)::

    MediaError, BlockedURL, TooLarge
    ImageInfo, sniff_format, inspect_image, to_data_uri, format_for_mime
    b64_to_data_uri, parse_data_uri, inspect_data_uri
    host_matches, OutboundGuard, parse_http_url, parse_ip_literal, address_refusal
    download, fetch_image
"""

from ._datauri import b64_to_data_uri, inspect_data_uri, parse_data_uri
from ._download import download, fetch_image
from ._errors import BlockedURL, MediaError, TooLarge
from ._guard import (
    OutboundGuard,
    Resolver,
    Target,
    address_refusal,
    parse_http_url,
    parse_ip_literal,
)
from ._hosts import host_matches
from ._images import (
    MIME_TYPES,
    ImageInfo,
    format_for_mime,
    inspect_image,
    sniff_format,
    to_data_uri,
)

__all__ = [
    "MIME_TYPES",
    "BlockedURL",
    "ImageInfo",
    "MediaError",
    "OutboundGuard",
    "Resolver",
    "Target",
    "TooLarge",
    "address_refusal",
    "b64_to_data_uri",
    "download",
    "fetch_image",
    "format_for_mime",
    "host_matches",
    "inspect_data_uri",
    "inspect_image",
    "parse_data_uri",
    "parse_http_url",
    "parse_ip_literal",
    "sniff_format",
    "to_data_uri",
]
