"""Simulator knobs: the server-wide `SimConfig` and the per-request `[sim:...]` directives.

Server knobs (`SimConfig`, set at creation, changed live with `server.config.x = ...`
or `POST /_sim/config` with a JSON object of fields; `POST /_sim/reset` restores the
values the server was created with unless the body is `{"keep_config": true}`):

===================  =========  ============================================================
knob                 default    effect
===================  =========  ============================================================
api_key              "sim-key"  bearer key every API call must carry (None: no auth)
job_latency_s        0.05       submit -> terminal state, by wall clock
submit_latency_s     0.0        delay before a submit is answered (any answer)
poll_latency_s       0.0        delay before a poll is answered
asset_latency_s      0.0        delay before an image download is answered
error_rate           0.0        fraction of submits answered `status_5xx` (seeded RNG)
status_5xx           500        which status `error_rate` answers with
rate_limit           0.0        fraction of submits answered 429 (True == every submit)
retry_after_s        1.0        the 429's `Retry-After` (integer seconds when whole)
max_rps              None       token bucket on submits; over it -> 429
hang                 False      submits are never answered (until the client leaves)
hang_s               3600.0     how long a hang lasts at most
drop                 False      submits close the connection without any response
drop_after_accept    False      the task is created (and billed), then the connection is
                                closed without any response: the client never learns its id
malformed            False      submits answered 200 with a bad body
malformed_body       "text"     "text": non-JSON HTML; "shape": JSON of the wrong shape
moderate             False      accepted, then failed as a content-moderation refusal
nsfw                 False      every image flagged (WaveSpeed, with the safety checker on)
fail_after_accept    False      accepted, then failed with a non-policy error
fail_code            5000       the WaveSpeed `data.code` of `fail_after_accept`
poll_error_rate      0.0        fraction of polls answered `status_5xx`
poll_malformed       False      polls answered 200 with a bad body
cost_cents           2          VibeDream `costCents` per image (billed even if it fails)
price_micro_usd_per_image
                     12000      WaveSpeed's price per image, micro-USD (failed tasks: 0);
                                only the billing log shows it (the wire has no price)
sync_give_up_s       90.0       WaveSpeed sync mode gives up after this long
sync_timeout_mode    "5004"     give-up answer: "5004" (200, processing, data.code 5004)
                                or "504" (bare HTTP 504 with an HTML body)
strict_steps         False      VibeDream: enforce the documented 0.1 / 0.5 value grids
rng_seed             0          seed of the RNG behind every random fault and seed -1
max_jobs             100000     jobs kept in memory (oldest evicted first)
===================  =========  ============================================================

Per-request directives go anywhere in the prompt and override the server knobs for that
request only: `[sim:moderate]`, `[sim:nsfw]` (all images) or `[sim:nsfw=0,2]` (those
indices), `[sim:fail-after-accept]`, `[sim:code=1402]` (fail with that WaveSpeed code),
`[sim:status=cancelled|timeout|deleted|failed]` (end in that terminal status),
`[sim:500]` / `[sim:503]` / `[sim:429]` (answer the submit with that HTTP status),
`[sim:hang]` / `[sim:hang=2]`, `[sim:drop]`, `[sim:drop-after-accept]`,
`[sim:malformed]` / `[sim:malformed=shape]`,
`[sim:latency=1.5]` (job latency), `[sim:submit-latency=0.2]`, `[sim:poll-500]` /
`[sim:poll-500=3]` (the job's first N polls answer `status_5xx`), `[sim:poll-malformed=N]`.
An unknown directive is answered 400, so a typo never passes silently.

Every accepted task is in the billing log (`GET /_sim/billing`, see `billing.py`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

TERMINAL_FAILURES = ("failed", "cancelled", "timeout", "deleted")


@dataclass(slots=True)
class SimConfig:
    """Server-wide knobs; see the module docstring. Mutate fields to change them live."""

    api_key: str | None = "sim-key"
    job_latency_s: float = 0.05
    submit_latency_s: float = 0.0
    poll_latency_s: float = 0.0
    asset_latency_s: float = 0.0
    error_rate: float = 0.0
    status_5xx: int = 500
    rate_limit: float = 0.0
    retry_after_s: float = 1.0
    max_rps: float | None = None
    hang: bool = False
    hang_s: float = 3600.0
    drop: bool = False
    drop_after_accept: bool = False
    malformed: bool = False
    malformed_body: Literal["text", "shape"] = "text"
    moderate: bool = False
    nsfw: bool = False
    fail_after_accept: bool = False
    fail_code: int = 5000
    poll_error_rate: float = 0.0
    poll_malformed: bool = False
    cost_cents: int = 2
    price_micro_usd_per_image: int = 12_000
    sync_give_up_s: float = 90.0
    sync_timeout_mode: Literal["5004", "504"] = "5004"
    strict_steps: bool = False
    rng_seed: int = 0
    max_jobs: int = 100_000

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> SimConfig:
        return dataclasses.replace(self)

    def assign(self, other: SimConfig) -> None:
        """Copy every field of `other` onto this (live) object."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a JSON object of field changes, all or nothing. Raises ValueError."""
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        merged = self.as_dict()
        for key, value in changes.items():
            # JSON has no int/float distinction worth failing on, and `rate_limit: true`
            # reads naturally as "every submit".
            if isinstance(value, bool) and "float" in str(names[key].type):
                value = float(value)
            merged[key] = value
        try:
            new = msgspec.convert(merged, SimConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from exc
        for name in ("error_rate", "rate_limit", "poll_error_rate"):
            if not 0.0 <= getattr(new, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 100 <= new.status_5xx <= 599:
            raise ValueError("status_5xx must be an HTTP status code")
        self.assign(new)


# --------------------------------------------------------------------------- directives


@dataclass(slots=True)
class Directives:
    """What `[sim:...]` markers in one prompt asked for (None / False: not asked)."""

    http_status: int | None = None
    hang: bool = False
    hang_s: float | None = None
    drop: bool = False
    drop_after_accept: bool = False
    malformed: Literal["text", "shape"] | None = None
    moderate: bool = False
    nsfw: bool = False
    nsfw_indices: tuple[int, ...] | None = None
    fail_after_accept: bool = False
    fail_code: int | None = None
    final_status: str | None = None
    latency_s: float | None = None
    submit_latency_s: float | None = None
    poll_5xx: int = 0
    poll_malformed: int = 0


_DIRECTIVE = re.compile(r"\[sim:([A-Za-z0-9_-]+)(?:=([^\]]*))?\]")


def parse_directives(prompt: object) -> Directives:
    """Read every `[sim:name]` / `[sim:name=value]` in `prompt`. Raises ValueError."""
    out = Directives()
    if not isinstance(prompt, str) or "[sim:" not in prompt:
        return out
    for match in _DIRECTIVE.finditer(prompt):
        name = match.group(1).lower().replace("_", "-")
        value = (match.group(2) or "").strip()
        try:
            _apply(out, name, value)
        except ValueError as exc:
            raise ValueError(f"bad simulator directive [sim:{match.group(1)}]: {exc}") from None
    return out


def _apply(out: Directives, name: str, value: str) -> None:
    if name.isdigit() and len(name) == 3:
        status = int(name)
        if not 400 <= status <= 599:
            raise ValueError("only 4xx/5xx statuses can be injected")
        out.http_status = status
    elif name == "hang":
        out.hang = True
        out.hang_s = _seconds(value) if value else None
    elif name == "drop":
        out.drop = True
    elif name == "drop-after-accept":
        out.drop_after_accept = True
    elif name == "malformed":
        if value not in ("", "text", "shape"):
            raise ValueError("malformed is 'text' or 'shape'")
        out.malformed = "shape" if value == "shape" else "text"
    elif name in ("moderate", "moderation"):
        out.moderate = True
    elif name == "nsfw":
        out.nsfw = True
        if value:
            out.nsfw_indices = tuple(int(v) for v in value.split(",") if v.strip())
    elif name == "fail-after-accept":
        out.fail_after_accept = True
    elif name == "code":
        out.fail_code = int(value)
    elif name == "status":
        if value not in TERMINAL_FAILURES:
            raise ValueError(f"status is one of {', '.join(TERMINAL_FAILURES)}")
        out.final_status = value
    elif name == "latency":
        out.latency_s = _seconds(value)
    elif name == "submit-latency":
        out.submit_latency_s = _seconds(value)
    elif name in ("poll-500", "poll-5xx"):
        out.poll_5xx = int(value) if value else 1
    elif name == "poll-malformed":
        out.poll_malformed = int(value) if value else 1
    else:
        raise ValueError("unknown directive")


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0.0 <= seconds < 1e6:
        raise ValueError("seconds must be >= 0")
    return seconds
