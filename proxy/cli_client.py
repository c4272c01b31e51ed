"""`flux-proxy generate | predictions list|get|cancel | models`: a running proxy's client.

These commands talk to a proxy over HTTP through the `flux_proxy` client package
(`--url` or FLUX_PROXY_URL, the key from FLUX_PROXY_API_KEY); they never read the
proxy's settings or database. Exit codes: 0 completed, 1 failed, 2 bad usage (also a
422 from the proxy, or a key it refuses), 3 refused by policy (moderation, invalid
input), 4 budget or rate limit.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from flux_proxy import FluxProxy, FluxProxyError, Prediction

EXIT_FAILED, EXIT_USAGE, EXIT_POLICY, EXIT_LIMITED = 1, 2, 3, 4


def _client_options(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option("--api-key", envvar="FLUX_PROXY_API_KEY", default=None, metavar="KEY",
                      help="Client key (default FLUX_PROXY_API_KEY; prefer it: arguments "
                           "show in `ps`).")(fn)
    return click.option("--url", envvar="FLUX_PROXY_URL", default="http://127.0.0.1:8080",
                        show_default=True, metavar="URL",
                        help="The proxy (or FLUX_PROXY_URL).")(fn)


def _exit_code(exc: FluxProxyError) -> int:
    import flux_proxy as fp

    if isinstance(exc, fp.PolicyRefused):
        return EXIT_POLICY
    if isinstance(exc, fp.BudgetExceeded | fp.RateLimited):
        return EXIT_LIMITED
    if isinstance(exc, fp.ValidationError | fp.AuthError):
        return EXIT_USAGE
    return EXIT_FAILED


def _fail(exc: FluxProxyError, as_json: bool = False) -> None:
    """Say why on stderr (the prediction on stdout with --json) and exit by its kind."""
    if as_json and exc.prediction is not None:
        click.echo(json.dumps(exc.prediction.raw, indent=2))
    click.echo(f"error: {exc}", err=True)
    if exc.retry_after is not None:
        click.echo(f"retry after {exc.retry_after:g} s", err=True)
    sys.exit(_exit_code(exc))


@contextmanager
def _client(url: str, api_key: str | None, as_json: bool = False) -> Iterator[FluxProxy]:
    from flux_proxy import FluxProxy, FluxProxyError

    try:
        # Polls at most a second apart: a person is watching the progress line.
        client = FluxProxy(url, api_key or None, poll_interval=0.25, poll_max_interval=1.0)
    except ValueError as exc:  # a base URL that is not one
        raise click.UsageError(str(exc)) from None
    try:
        with client:
            yield client
    except FluxProxyError as exc:
        _fail(exc, as_json)


# --------------------------------------------------------------------------- progress


def describe(pred: Prediction, elapsed: float) -> str:
    """One line of where a prediction is: status, provider, attempt, step i/n, elapsed.
    (Steps where the prediction reports `progress`: the local GPU worker does.)"""
    parts = [pred.status]
    if pred.provider:
        parts.append(pred.provider)
    if pred.attempts:
        parts.append(f"attempt {len(pred.attempts)}")
    progress = pred.progress or {}
    if progress.get("step") is not None and progress.get("total"):
        parts.append(f"step {progress['step']} of {progress['total']}")
    parts.append(f"{elapsed:.1f}s")
    return " · ".join(parts)


class _Progress:
    """A live line on a terminal (rich), plain lines when stdout is not one."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.started = quiet, time.monotonic()
        self.pred: Prediction | None = None
        self._last: tuple[Any, ...] | None = None
        self._live: Any = None

    def __rich__(self) -> Any:  # rendered by rich.live on every refresh: elapsed ticks
        from rich.spinner import Spinner

        text = describe(self.pred, time.monotonic() - self.started) if self.pred else "submitting"
        return Spinner("dots", text=text)

    def __enter__(self) -> _Progress:
        if not self.quiet and sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self, console=Console(), refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, pred: Prediction) -> None:
        self.pred = pred
        state = (pred.status, pred.provider, len(pred.attempts), str(pred.progress))
        if self.quiet or self._live is not None or state == self._last:
            return
        self._last = state
        click.echo(describe(pred, time.monotonic() - self.started))


# --------------------------------------------------------------------------- generate


@click.command()
@click.argument("prompt")
@click.option("--size", default=None, metavar="W*H", help="e.g. 1024*768 (default 1024*1024).")
@click.option("-n", "--num-images", type=int, default=None, help="Images, 1..4 (default 1).")
@click.option("--seed", type=int, default=None, help="Seed (default: the proxy draws one).")
@click.option("--image", default=None, metavar="PATH|URL", help="Input image (image-to-image).")
@click.option("--mask", default=None, metavar="PATH|URL", help="Inpainting mask (white: redo).")
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Only this provider (repeat for a fallback order).")
@click.option("-o", "--output", "output", default=".", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the images.")
@click.option("--json", "as_json", is_flag=True, help="Print the final prediction as JSON only.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the result.")
@_client_options
def generate(prompt: str, size: str | None, num_images: int | None, seed: int | None,
             image: str | None, mask: str | None, providers: tuple[str, ...], output: str,
             as_json: bool, timeout: float, url: str, api_key: str | None) -> None:
    """Generate images with a running proxy and write them to --output."""
    from flux_proxy import ImageInputError, encode_image

    try:  # local files become data URIs here, so a bad one is refused before any call
        image_ref, mask_ref = encode_image(image, "--image"), encode_image(mask, "--mask")
    except ImageInputError as exc:
        raise click.UsageError(str(exc)) from None
    with _client(url, api_key, as_json) as client:
        progress = _Progress(quiet=as_json)
        with progress:
            pred = client.submit(prompt, size=size, num_images=num_images, seed=seed,
                                 image=image_ref, mask=mask_ref,
                                 providers=list(providers) or None)
            progress.update(pred)
            try:
                pred = client.wait(pred, timeout=timeout, on_update=progress.update)
            except KeyboardInterrupt:
                click.echo(f"\nstill running: {pred.id} (flux-proxy predictions cancel "
                           f"{pred.id})", err=True)
                sys.exit(130)
        pred.raise_for_status()
        paths = client.save(pred, output)
        if as_json:
            click.echo(json.dumps(pred.raw, indent=2))
            return
        per_image = (Decimal(pred.cost_micro_usd) / max(1, len(paths)) / 1_000_000)
        latency = pred.timings.get("total_ms")
        for path, nsfw in zip(paths, pred.has_nsfw_contents or [False] * len(paths),
                              strict=False):
            click.echo(f"{path}  provider={pred.provider} seed={pred.seed} "
                       f"cost=${per_image.quantize(Decimal('0.000001'))} "
                       f"latency={'?' if latency is None else f'{latency / 1000:.2f}s'}"
                       f"{'  nsfw' if nsfw else ''}")


# --------------------------------------------------------------------------- predictions


@click.group()
def predictions() -> None:
    """A running proxy's predictions (this key's own; the admin key sees all)."""


def _row(p: Prediction) -> tuple[str, ...]:
    created = p.created_at.strftime("%Y-%m-%d %H:%M:%S") if p.created_at else ""
    return (p.id, p.status, p.provider or "", str(len(p.outputs)), f"{p.cost_usd:.6f}",
            created, p.error_kind or "")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


@predictions.command("list")
@click.option("--status", type=click.Choice(["queued", "processing", "completed", "failed",
                                             "canceled"]), default=None)
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many to show (newest first; fetched 100 a page).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_client_options
def predictions_list(status: str | None, limit: int, as_json: bool, url: str,
                     api_key: str | None) -> None:
    """List predictions, newest first."""
    from itertools import islice

    with _client(url, api_key) as client:
        preds = list(islice(client.list(status=status, limit=min(limit, 100)), limit))
    if as_json:
        for p in preds:
            click.echo(json.dumps(p.raw))
        return
    _table([("id", "status", "provider", "images", "cost_usd", "created", "error_kind"),
            *map(_row, preds)])


def _show(pred: Prediction, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(pred.raw, indent=2))
        return
    for name, value in (("id", pred.id), ("status", pred.status), ("provider", pred.provider),
                        ("seed", pred.seed), ("cost_usd", f"{pred.cost_usd:.6f}"),
                        ("error", pred.error), ("error_kind", pred.error_kind),
                        ("attempts", ", ".join(f"{a.provider}:{a.status}"
                                               for a in pred.attempts))):
        if value not in (None, ""):
            click.echo(f"{name}: {value}")
    for n, out in enumerate(pred.outputs):
        click.echo(f"output {n}: {out[:60] + '...' if out.startswith('data:') else out}")


@predictions.command("get")
@click.argument("prediction_id")
@click.option("--json", "as_json", is_flag=True)
@_client_options
def predictions_get(prediction_id: str, as_json: bool, url: str, api_key: str | None) -> None:
    """Show one prediction."""
    with _client(url, api_key) as client:
        _show(client.get(prediction_id), as_json)


@predictions.command("cancel")
@click.argument("prediction_id")
@click.option("--json", "as_json", is_flag=True)
@_client_options
def predictions_cancel(prediction_id: str, as_json: bool, url: str,
                       api_key: str | None) -> None:
    """Cancel a prediction (exit 1 if it already ended)."""
    with _client(url, api_key) as client:
        pred = client.cancel(prediction_id)
    if as_json:
        click.echo(json.dumps(pred.raw, indent=2))
    else:
        click.echo(f"{pred.id}: {pred.status}"
                   f"{' (cancel requested)' if pred.cancel_requested and not pred.done else ''}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="GET /v1/models as it answers.")
@_client_options
def models(as_json: bool, url: str, api_key: str | None) -> None:
    """Models and the providers that serve them (enabled, or why not)."""
    with _client(url, api_key) as client:
        found = client.models()
    if as_json:
        click.echo(json.dumps({"data": [m.raw for m in found]}, indent=2))
        return
    rows: list[tuple[str, ...]] = [("model", "provider", "kind", "enabled", "why not")]
    rows += [(m.id, p.name, p.kind, "yes" if p.enabled else "no", p.disabled_reason or "")
             for m in found for p in m.providers]
    _table(rows)


def register(main: click.Group) -> None:
    for command in (generate, predictions, models):
        main.add_command(command)
