"""Outputs in an S3-compatible bucket (``output_store = "s3://bucket/prefix"``).

boto3 (the ``[s3]`` extra: ``pip install 'flux-proxy[s3]'``), its blocking calls in
worker threads. Credentials and region come from boto3's usual chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``, a profile, an
instance role); another S3-compatible server is named by
``output_store_s3_endpoint_url``. One object per output, ``<prefix>/<id>/<n>``, with
its image Content-Type; a PUT is atomic, so a reader never sees half an image. Its
LastModified is the retention clock. Every call is bounded (connect 5 s, read 30 s,
three tries).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from common import media
from proxy.outputs_store.backend import (
    CHUNK,
    PREDICTION_ID,
    Blob,
    StoreError,
    content_type,
)

if TYPE_CHECKING:
    from proxy.config import Settings

_TYPES = set(media.MIME_TYPES.values())
_PAGE = 1000  # S3's most keys per list and per delete
SPOOL_BYTES = 8 * 1024 * 1024  # an output larger than this is spooled on disk


class S3Bucket:
    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.description = f"s3://{bucket}/{self.prefix}"
        self._token: str | None = None  # where the next sweep goes on listing

    @classmethod
    def from_settings(cls, value: str, settings: Settings) -> S3Bucket:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise RuntimeError("output_store = s3://... needs boto3: install the [s3] extra "
                               "(pip install 'flux-proxy[s3]')") from exc
        bucket, _, prefix = value.removeprefix("s3://").partition("/")
        config = Config(connect_timeout=5, read_timeout=30, max_pool_connections=32,
                        retries={"max_attempts": 3, "mode": "standard"})
        client = boto3.session.Session().client(
            "s3", endpoint_url=settings.output_store_s3_endpoint_url or None, config=config)
        return cls(client, bucket, prefix)

    def _key(self, prediction_id: str, n: int) -> str:
        return f"{self.prefix}{prediction_id}/{n}"

    async def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(getattr(self.client, method), **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(kwargs.get("Key")) from exc
            raise StoreError(f"{what} {self.description}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"{what} {self.description}: {type(exc).__name__}") from exc

    async def writer(self, prediction_id: str, n: int) -> _SpoolWriter:
        return _SpoolWriter(self, self._key(prediction_id, n))

    async def _put_object(self, key: str, body: Any, fmt: str) -> None:
        try:
            await self._call("could not write to", "put_object", Bucket=self.bucket, Key=key,
                             Body=body, ContentType=content_type(fmt))
        except FileNotFoundError as exc:  # the bucket itself is missing
            raise StoreError(f"could not write to {self.description}: no such bucket") from exc

    async def get(self, prediction_id: str, n: int) -> Blob | None:
        try:
            resp = await self._call("could not read", "get_object", Bucket=self.bucket,
                                    Key=self._key(prediction_id, n))
        except FileNotFoundError:
            return None
        body = resp["Body"]
        declared = str(resp.get("ContentType", ""))

        async def release() -> None:
            body.close()

        return Blob(content_type=declared if declared in _TYPES else "application/octet-stream",
                    size=int(resp["ContentLength"]), created=resp["LastModified"].timestamp(),
                    chunks=_read(body), release=release)

    async def sweep(self, cutoff: float, max_entries: int) -> int:
        """A page of keys at a time from where the last sweep stopped (from the start
        again after the last page), deleting those written before `cutoff`."""
        removed = seen = 0
        for _ in range(max_entries // _PAGE + 1):  # pages: bounded even if one is empty
            if seen >= max_entries:
                break
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix,
                                    "MaxKeys": min(_PAGE, max_entries - seen)}
            if self._token:
                args["ContinuationToken"] = self._token
            page = await self._call("could not list", "list_objects_v2", **args)
            objects = page.get("Contents", [])
            seen += len(objects)
            old = [{"Key": o["Key"]} for o in objects if self._ours(o["Key"])
                   and o["LastModified"].timestamp() < cutoff]
            if old:
                await self._call("could not delete from", "delete_objects", Bucket=self.bucket,
                                 Delete={"Objects": old, "Quiet": True})
                removed += len(old)
            self._token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if self._token is None:
                break
        return removed

    def _ours(self, key: str) -> bool:
        """Only `<prefix><id>/<n>` is deleted: other objects under the prefix are left."""
        rest = key[len(self.prefix):].split("/")
        return len(rest) == 2 and bool(PREDICTION_ID.match(rest[0])) and rest[1].isdigit()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.client.close)


class _SpoolWriter:
    """Chunks spooled (in memory up to SPOOL_BYTES, then a temporary file), sent as
    one PUT at commit: S3 objects appear whole or not at all."""

    def __init__(self, bucket: S3Bucket, key: str) -> None:
        self._bucket, self._key = bucket, key
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115

    async def write(self, chunk: bytes) -> None:
        try:
            await asyncio.to_thread(self._spool.write, chunk)
        except OSError as exc:
            raise StoreError(f"could not spool for {self._bucket.description}: {exc}") from exc

    async def commit(self, fmt: str) -> None:
        try:
            self._spool.seek(0)
            await self._bucket._put_object(self._key, self._spool, fmt)
        finally:
            self._spool.close()

    async def abort(self) -> None:
        self._spool.close()


async def _read(body: Any) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(body.read, CHUNK):
            yield chunk
    finally:
        body.close()
