"""Fetch, sniff, validate and encode images; guard outbound requests (SSRF).

Public API (import from ``proxy.media``)::

    MediaError, BlockedURL, TooLarge
    ImageInfo, sniff_format, inspect_image, to_data_uri
    b64_to_data_uri, parse_data_uri
    host_matches, OutboundGuard
    download, fetch_image
"""

from ._datauri import b64_to_data_uri, parse_data_uri
from ._download import download, fetch_image
from ._errors import BlockedURL, MediaError, TooLarge
from ._guard import OutboundGuard, Resolver, Target, address_refusal
from ._hosts import host_matches
from ._images import MIME_TYPES, ImageInfo, inspect_image, sniff_format, to_data_uri

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
    "host_matches",
    "inspect_image",
    "parse_data_uri",
    "sniff_format",
    "to_data_uri",
]
