"""Uploaded media: the store behind WaveSpeed's upload routes (proxy/api/wavespeed_media.py),
the PUT capabilities they hand out, and turning a request's reference to an upload into
something a provider can use (called by `submitting.admit`, so every surface gets it).

Layout under ``settings.media_dir`` (one folder shared by every process and replica that
mounts it; created on demand), sharded by the id's first two hex digits::

    <media_dir>/<id[:2]>/<id>          the bytes, a validated image
    <media_dir>/<id[:2]>/<id>.json     content_type, format, size, key_id, created, filename
    <media_dir>/<id[:2]>/.<id>.*.tmp   being written

An upload exists once its metadata file does. Both files are written to a temporary
file first and then put in place atomically (``os.link`` for the bytes, which also
refuses a second upload to the same id; ``os.replace`` for the metadata), so a crash
never leaves a half file that a reader would serve. Ids are 128 random bits: the
download URL is itself the capability (WaveSpeed's download URLs are public too).

Uploads older than ``media_retention_s`` are not served, and are deleted by `sweep`,
which each upload runs on a few shards (bounded work; a random start, so every shard is
visited over time).

PUT capabilities are stateless signed URLs (like S3's presigned ones): the id, the
declared size and format, the key and an expiry, signed with an HMAC key derived from
the proxy's key-hashing secret, which every process shares. Single use: the bytes of
an id can be written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common import media
from proxy.config import Settings
from proxy.schema import (
    ALLOWED,
    IMAGE_FIELDS,
    IMAGE_MAX_BYTES,
    IMAGE_MAX_PIXELS,
    IMAGE_MAX_SIDE,
    IMAGE_MIN_SIDE,
    FieldError,
    GenerateRequest,
)

FILES_PATH = "/api/v3/media/files/"
TICKET_TTL_S = 3600.0  # a PUT capability is good for an hour
DECODE_WAIT_S = 10.0  # longest an upload waits for decode memory before its 503
SWEEP_SHARDS = 8  # shards visited per sweep (of 256)
SWEEP_MAX_ENTRIES = 1024  # directory entries looked at per sweep, at most
_ID = re.compile(r"^[0-9a-f]{32}$")
_FILE_NAME = re.compile(r"^([0-9a-f]{32})(?:\.[A-Za-z0-9]{1,8})?$")
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif"}


class UploadError(Exception):
    """Why an upload was refused; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def max_upload_bytes(settings: Settings) -> int:
    """Uploads feed image inputs: the schema's limit, and what one body may carry."""
    return min(IMAGE_MAX_BYTES, settings.max_body_bytes)


def new_id() -> str:
    return secrets.token_hex(16)


def format_of(filename: str | None, content_type: str | None) -> str | None:
    """The image format a client declared (content type first, else the extension)."""
    if content_type:
        return media.format_for_mime(content_type)
    if filename and "." in filename:
        return media.format_for_mime("image/" + filename.rsplit(".", 1)[1])
    return None


def file_name(upload_id: str, fmt: str | None) -> str:
    """The last path segment of an upload's download URL."""
    return f"{upload_id}.{EXTENSIONS[fmt]}" if fmt in EXTENSIONS else upload_id


def download_url(base: str, upload_id: str, fmt: str | None) -> str:
    return f"{base.rstrip('/')}{FILES_PATH}{file_name(upload_id, fmt)}"


def parse_file_name(name: str) -> str | None:
    """``<id>`` or ``<id>.<ext>`` -> the id; None for anything else."""
    m = _FILE_NAME.match(name)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- validation


async def validate_image(data: bytes) -> media.ImageInfo:
    """The bytes are one complete JPEG/PNG/GIF/WebP within the request-image limits,
    fully decoded in a worker thread (its memory reserved from the decode budget)."""
    if not data:
        raise UploadError(400, "the file is empty")
    try:
        fmt, width, height = media.read_header(
            data, max_pixels=IMAGE_MAX_PIXELS, max_side=IMAGE_MAX_SIDE)
        info: media.ImageInfo = await media.budget.decoding().run(
            media.decode_cost(fmt, width, height), media.inspect_image, data,
            what="decoding the upload", wait_s=DECODE_WAIT_S,
            max_pixels=IMAGE_MAX_PIXELS, max_side=IMAGE_MAX_SIDE)
    except media.BudgetWait as exc:
        raise UploadError(503, "the server is busy decoding other images; retry shortly",
                          retry_after=1) from exc
    except media.TooLarge as exc:
        raise UploadError(413, f"the image is too large: {exc.reason} (at most "
                          f"{IMAGE_MAX_SIDE} pixels a side, {IMAGE_MAX_PIXELS} in all)") from exc
    except media.MediaError as exc:
        raise UploadError(400, f"the file is not an accepted image: {exc.reason} "
                          "(uploads are image inputs: JPEG, PNG, GIF or WebP)") from exc
    if min(info.width, info.height) < IMAGE_MIN_SIDE:
        raise UploadError(400, f"the image is {info.width}x{info.height} pixels; each side "
                          f"must be at least {IMAGE_MIN_SIDE}")
    return info


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class Upload:
    id: str
    content_type: str
    format: str
    size: int
    created: float  # unix seconds
    key_id: str | None = None
    filename: str | None = None


class UploadStore:
    """Files under `root`; blocking I/O runs in worker threads."""

    def __init__(self, root: str | Path, retention_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        self.clock = clock

    def _paths(self, upload_id: str) -> tuple[Path, Path, Path]:
        shard = self.root / upload_id[:2]
        return shard, shard / upload_id, shard / f"{upload_id}.json"

    async def save(self, upload_id: str, data: bytes, info: media.ImageInfo, *,
                   key_id: str | None, filename: str | None) -> Upload:
        """Store validated image bytes under `upload_id` (409 if it was already used),
        then sweep a few shards."""
        upload = Upload(id=upload_id, content_type=info.mime, format=info.format,
                        size=len(data), created=self.clock(), key_id=key_id,
                        filename=filename)
        await asyncio.to_thread(self._write, upload, data)
        return upload

    def _write(self, upload: Upload, data: bytes) -> None:
        shard, final, meta = self._paths(upload.id)
        shard.mkdir(parents=True, exist_ok=True)
        tag = secrets.token_hex(4)
        tmp, meta_tmp = shard / f".{upload.id}.{tag}.tmp", shard / f".{upload.id}.{tag}.json.tmp"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                # Atomic and exclusive: the complete file appears, or the id was taken.
                os.link(tmp, final)
            except FileExistsError:
                raise UploadError(409, "this upload URL was already used") from None
            with open(meta_tmp, "x", encoding="utf-8") as fh:
                json.dump(asdict(upload), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(meta_tmp, meta)
        finally:
            for path in (tmp, meta_tmp):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.sweep()

    async def get(self, upload_id: str) -> Upload | None:
        """The upload's metadata; None when unknown or past retention."""
        if not _ID.match(upload_id):
            return None
        return await asyncio.to_thread(self._read_meta, upload_id)

    def _read_meta(self, upload_id: str) -> Upload | None:
        _, final, meta = self._paths(upload_id)
        try:
            with open(meta, encoding="utf-8") as fh:
                upload = Upload(**json.load(fh))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        if upload.created + self.retention_s <= self.clock() or not final.exists():
            return None
        return upload

    def path(self, upload: Upload) -> Path:
        return self._paths(upload.id)[1]

    async def read(self, upload_id: str) -> tuple[Upload, bytes] | None:
        return await asyncio.to_thread(self._read, upload_id)

    def _read(self, upload_id: str) -> tuple[Upload, bytes] | None:
        upload = self._read_meta(upload_id) if _ID.match(upload_id) else None
        if upload is None:
            return None
        try:
            return upload, self.path(upload).read_bytes()
        except FileNotFoundError:  # swept meanwhile
            return None

    def sweep(self, shards: int = SWEEP_SHARDS, max_entries: int = SWEEP_MAX_ENTRIES) -> int:
        """Delete files older than the retention in `shards` consecutive shards from a
        random one, looking at `max_entries` entries at most. Returns how many went."""
        cutoff = self.clock() - self.retention_s
        start, removed, seen = random.randrange(256), 0, 0
        for step in range(min(shards, 256)):
            try:
                entries = os.scandir(self.root / f"{(start + step) % 256:02x}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        return removed
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_file() and entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed


_STORES: dict[tuple[str, float], UploadStore] = {}


def store_for(settings: Settings) -> UploadStore:
    key = (settings.media_dir, settings.media_retention_s)
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = UploadStore(settings.media_dir, settings.media_retention_s)
    return store


# --------------------------------------------------------------------------- PUT capabilities


@dataclass(frozen=True)
class Ticket:
    """What a PUT URL allows: `size` bytes of an image, to `upload_id`, until `expires`."""

    upload_id: str
    size: int
    fmt: str  # the declared format ("" when none was declared)
    key_id: str  # "" when auth is off
    expires: int  # unix seconds

    def query(self, secret: bytes) -> dict[str, str]:
        return {"size": str(self.size), "format": self.fmt, "key": self.key_id,
                "expires": str(self.expires), "signature": self._sign(secret)}

    def _sign(self, secret: bytes) -> str:
        derived = hmac.new(secret, b"flux-proxy upload ticket v1", hashlib.sha256).digest()
        text = "\n".join((self.upload_id, str(self.size), self.fmt, self.key_id,
                          str(self.expires)))
        return hmac.new(derived, text.encode(), hashlib.sha256).hexdigest()

    @classmethod
    def issue(cls, size: int, fmt: str | None, key_id: str | None, *,
              now: float | None = None) -> Ticket:
        expires = int((time.time() if now is None else now) + TICKET_TTL_S)
        return cls(new_id(), size, fmt or "", key_id or "", expires)

    @classmethod
    def verify(cls, upload_id: str, params: dict[str, str], secret: bytes, *,
               now: float | None = None) -> Ticket:
        """The ticket a PUT URL carries, or UploadError 403 (forged, altered, expired)."""
        try:
            ticket = cls(upload_id, int(params.get("size", "")), params.get("format", ""),
                         params.get("key", ""), int(params.get("expires", "")))
        except ValueError:
            raise UploadError(403, "not a valid upload URL: ask POST /api/v3/media/uploads "
                              "for one") from None
        if not _ID.match(upload_id) or not hmac.compare_digest(
                ticket._sign(secret), params.get("signature", "")):
            raise UploadError(403, "not a valid upload URL (bad signature)")
        if ticket.expires <= (time.time() if now is None else now):
            raise UploadError(403, "this upload URL has expired: ask POST "
                              "/api/v3/media/uploads for a new one")
        return ticket


# --------------------------------------------------------------------------- use in requests


def _upload_id_in(value: str, bases: list[str]) -> tuple[str, str] | None:
    """(base, file name) when `value` is a download URL of ours on one of `bases`."""
    for base in bases:
        prefix = base + FILES_PATH
        if value.startswith(prefix):
            return base, value[len(prefix):].split("?", 1)[0].split("#", 1)[0]
    return None


async def resolve_images(req: GenerateRequest, settings: Settings, *,
                         request_base: Callable[[], str]) -> GenerateRequest | list[FieldError]:
    """`image` / `mask_image` that are this proxy's own upload URLs (on `request_base()`,
    where this request reached us, or `public_base_url`), made usable by providers: with
    `public_base_url` set, its public URL (providers fetch it); otherwise a data URI of
    the stored bytes (the router keeps providers that need public URLs out). Unknown or
    expired: errors."""
    values = {name: getattr(req, name) for name in IMAGE_FIELDS}
    if not any(v and FILES_PATH in v for v in values.values()):
        return req
    public = settings.public_base_url.rstrip("/")
    bases = [b for b in dict.fromkeys((public, request_base().rstrip("/"))) if b]
    store = store_for(settings)
    changes: dict[str, str] = {}
    errors: list[FieldError] = []
    for name, value in values.items():
        found = _upload_id_in(value, bases) if value else None
        if found is None:
            continue
        base, name_part = found
        upload_id = parse_file_name(name_part)
        if public:
            upload = await store.get(upload_id) if upload_id else None
            if upload is not None and base != public:  # reachable from outside only there
                changes[name] = download_url(public, upload.id, upload.format)
        else:
            stored = await store.read(upload_id) if upload_id else None
            upload = stored[0] if stored else None
            if stored is not None:
                changes[name] = await asyncio.to_thread(media.to_data_uri, stored[1],
                                                        stored[0].format)
        if upload is None:
            errors.append(FieldError(
                field=name, reason="no such upload: unknown, or older than media_retention_s "
                f"({settings.media_retention_s:g}s); upload the file again",
                value=value, allowed=ALLOWED[name]))
    if errors:
        return errors
    return req.model_copy(update=changes) if changes else req
