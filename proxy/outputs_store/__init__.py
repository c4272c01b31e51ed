"""Outputs the proxy keeps (`output_store`): copies of the providers' images, served at
``GET /v1/predictions/{id}/outputs/{n}`` (n 0-based) for `output_retention_s`.

* backend.py  the interface: write (streamed) / get / sweep one output, by prediction and index
* local.py    a folder (a path or file:// URL; the compose stack's default)
* s3.py       an S3-compatible bucket (``s3://bucket/prefix``; the ``[s3]`` extra)
* keeper.py   copying when a prediction completes, opening for the route, the sweeper
"""

from __future__ import annotations

from proxy.config import Settings
from proxy.outputs_store.backend import Backend, Blob, StoreError
from proxy.outputs_store.keeper import OutputStore, output_path
from proxy.outputs_store.local import LocalFolder, folder_of

__all__ = ["Backend", "Blob", "LocalFolder", "OutputStore", "StoreError", "open_store",
           "output_path"]


def open_store(settings: Settings) -> OutputStore | None:
    """The store `settings.output_store` names; None when it is unset (outputs are the
    providers' URLs, as before)."""
    value = (settings.output_store or "").strip()
    if not value:
        return None
    backend: Backend
    if value.startswith("s3://"):
        from proxy.outputs_store.s3 import S3Bucket  # the [s3] extra, imported only here

        backend = S3Bucket.from_settings(value, settings)
    else:
        backend = LocalFolder(folder_of(value))
    return OutputStore(backend, max_bytes=settings.output_store_max_bytes,
                       retention_s=settings.output_retention_s,
                       copy_timeout_s=settings.output_copy_timeout_s,
                       sweep_interval_s=settings.output_sweep_interval_s)
