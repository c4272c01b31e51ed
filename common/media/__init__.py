"""Fetch, sniff, validate and encode images; guard outbound requests (SSRF).

Public API (import from ``common.media``)::

    MediaError, BlockedURL, TooLarge, OverBudget, BudgetWait
    ImageInfo, sniff_format, inspect_image, to_data_uri, format_for_mime
    read_header, decode_cost, data_uri_bytes, data_uri_length
    b64_to_data_uri, parse_data_uri, inspect_data_uri
    inspect_data_uri_bounded, data_uri_decode_cost
    host_matches, OutboundGuard, parse_http_url, parse_ip_literal, address_refusal
    download, download_to, fetch_image, guarded_post
    budget (module): ByteBudget, holding, downloads, decoding, configure

Memory: the process-wide byte budgets in ``budget`` bound the sum of download
bodies and of image decoding in memory at once (see common/media/budget.py).
"""

from . import budget
from ._datauri import (
    b64_to_data_uri,
    data_uri_decode_cost,
    inspect_data_uri,
    inspect_data_uri_bounded,
    parse_data_uri,
)
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
    data_uri_bytes,
    data_uri_length,
    decode_cost,
    format_for_mime,
    inspect_image,
    read_header,
    sniff_format,
    to_data_uri,
)
from ._send import post as guarded_post
from ._stream import Sink, download_to
from .budget import BudgetWait, ByteBudget, OverBudget, holding

__all__ = [
    "MIME_TYPES",
    "BlockedURL",
    "BudgetWait",
    "ByteBudget",
    "ImageInfo",
    "MediaError",
    "OutboundGuard",
    "OverBudget",
    "Resolver",
    "Sink",
    "Target",
    "TooLarge",
    "address_refusal",
    "b64_to_data_uri",
    "budget",
    "data_uri_bytes",
    "data_uri_decode_cost",
    "data_uri_length",
    "decode_cost",
    "download",
    "download_to",
    "fetch_image",
    "format_for_mime",
    "guarded_post",
    "holding",
    "host_matches",
    "inspect_data_uri",
    "inspect_data_uri_bounded",
    "inspect_image",
    "parse_data_uri",
    "parse_http_url",
    "parse_ip_literal",
    "read_header",
    "sniff_format",
    "to_data_uri",
]
