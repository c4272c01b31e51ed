"""In-process test doubles: a scripted provider and a virtual clock.

`ScriptedProvider` is to the lifecycle what pydantic-ai's FunctionModel is to an
agent: every submit, poll and cancel answers from a script the test writes, so
a test says exactly which upstream behaviour it exercises (accepted, processing
for N polls, completed, failed with each ErrorKind, outcome unknown, hang) and
then reads back what was called and what the upstream would have billed.

`FakeClock` reads the running event loop's time. Under looptime
(`@pytest.mark.looptime`) the loop fast-forwards through sleeps and timeouts,
so a prediction that waits minutes upstream finishes in milliseconds of wall
time with every deadline and backoff still in force.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import SecretStr

from .base import (
    ERRORS_BY_KIND,
    BaseProvider,
    Capabilities,
    ErrorKind,
    GenerationRequest,
    JobStatus,
    ProviderSettings,
    UpstreamJob,
)

__all__ = [
    "Accept",
    "Complete",
    "Fail",
    "FakeClock",
    "Hang",
    "Raise",
    "ScriptExhausted",
    "ScriptedProvider",
    "scripted_settings",
]


# --------------------------------------------------------------------------- script steps


@dataclass(frozen=True, slots=True)
class Complete:
    """The job ends completed with these outputs (default: one URL per image)."""

    outputs: Sequence[str] | None = None
    nsfw: Sequence[bool] | None = None
    inference_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    """The job ends `failed` upstream (accepted first, so possibly billed)."""

    kind: ErrorKind = ErrorKind.UNAVAILABLE
    message: str = "upstream job failed"


@dataclass(frozen=True, slots=True)
class Raise:
    """The call itself fails with the ProviderError of `kind` (on submit: nothing
    was created upstream, except for OUTCOME_UNKNOWN, where `created` says whether
    the lost submit made a job there)."""

    kind: ErrorKind = ErrorKind.UNAVAILABLE
    message: str = "scripted failure"
    retry_after: float | None = None
    final: bool = False
    created: bool = True  # OUTCOME_UNKNOWN only: the upstream did create (and bill) a job


@dataclass(frozen=True, slots=True)
class Hang:
    """The call never answers (the caller's timeout or cancel ends it)."""


PollStep = Literal["processing"] | Raise | Hang


@dataclass(frozen=True, slots=True)
class Accept:
    """The submit is accepted: a job exists upstream and is billed `charged_micro_usd`
    (None: the provider's list price). It answers `polls` processing polls (or the
    given sequence of poll steps), then ends as `then`. `sync=True` answers the
    submit with the terminal job itself (an upstream sync mode)."""

    polls: int | Sequence[PollStep] = 0
    then: Complete | Fail = field(default_factory=Complete)
    charged_micro_usd: int | None = None
    after_s: float = 0.0  # the submit's own latency
    sync: bool = False


SubmitStep = Accept | Raise | Hang


class ScriptExhausted(AssertionError):
    """The lifecycle made a call the test did not script."""


# --------------------------------------------------------------------------- the provider


@dataclass(slots=True)
class _Job:
    upstream_id: str
    step: Accept
    polls: list[PollStep]
    canceled: bool = False


def scripted_settings(**overrides: object) -> ProviderSettings:
    """Settings with short polls, as a test wants them (all still overridable)."""
    values: dict[str, object] = {
        "base_url": "http://scripted.invalid",
        "api_key": SecretStr("scripted"),
        "poll_initial_s": 1.0,
        "poll_max_s": 1.0,
        "poll_multiplier": 1.0,
        "deadline_s": 300.0,
    }
    values.update(overrides)
    return ProviderSettings.model_validate(values)


class ScriptedProvider(BaseProvider):
    """A provider that answers from `submits` (one step per submit call, in order).

    Read back: `calls` (("submit"|"poll"|"cancel", upstream id or None) in order),
    `submits` (how many submit calls), `jobs` (upstream ids created), and
    `billed` (upstream id -> micro-USD the upstream would charge for it).
    """

    def __init__(
        self,
        name: str,
        submits: Iterable[SubmitStep] = (),
        *,
        price_micro_usd: int = 10_000,
        capabilities: Capabilities | None = None,
        settings: ProviderSettings | None = None,
        cancel_ok: bool = True,
        saturated: bool = False,
    ) -> None:
        self.name = name
        self.capabilities = capabilities or Capabilities(cancel=True)
        self.settings = settings or scripted_settings()
        self.price_micro_usd = price_micro_usd  # per image, the list price
        self.cancel_ok = cancel_ok
        self.is_saturated = saturated
        self._script: list[SubmitStep] = list(submits)
        self._jobs: dict[str, _Job] = {}
        self._requests: dict[str, GenerationRequest] = {}
        self._ids = itertools.count(1)
        self.calls: list[tuple[str, str | None]] = []
        self.billed: dict[str, int] = {}

    # -- what the test reads

    @property
    def submits(self) -> int:
        return sum(1 for op, _ in self.calls if op == "submit")

    @property
    def jobs(self) -> list[str]:
        return list(self._jobs)

    def script(self, *steps: SubmitStep) -> None:
        """Append submit steps."""
        self._script.extend(steps)

    # -- the protocol

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        self.calls.append(("submit", None))
        if not self._script:
            raise ScriptExhausted(f"{self.name}: unscripted submit #{self.submits}")
        step = self._script.pop(0)
        if isinstance(step, Hang):
            await asyncio.Event().wait()
        if isinstance(step, Raise):
            if step.kind is ErrorKind.OUTCOME_UNKNOWN and step.created:
                self._create(Accept(), req)  # billed upstream, id never seen by us
            raise self._error(step)
        assert isinstance(step, Accept)
        if step.after_s:
            await asyncio.sleep(step.after_s)
        job = self._create(step, req)
        if step.sync:
            return self._terminal(job, step.charged_micro_usd)
        return UpstreamJob(job.upstream_id, JobStatus.PROCESSING,
                           poll_url=f"{self.settings.base_url}/jobs/{job.upstream_id}",
                           charged_micro_usd=step.charged_micro_usd, raw_status="queued")

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        self.calls.append(("poll", job.upstream_id))
        state = self._jobs.get(job.upstream_id)
        if state is None:
            raise ERRORS_BY_KIND[ErrorKind.UNAVAILABLE](
                f"{self.name}: no job {job.upstream_id}", provider=self.name, final=True)
        # Like VibeDream, the price is quoted at submit only: a poll carries forward
        # whatever quote the caller's job holds (a caller that lost it gets none).
        quote = job.charged_micro_usd
        if state.canceled:
            return UpstreamJob(state.upstream_id, JobStatus.CANCELED, poll_url=job.poll_url,
                               charged_micro_usd=quote, raw_status="canceled")
        if state.polls:
            step = state.polls.pop(0)
            if isinstance(step, Hang):
                await asyncio.Event().wait()
            if isinstance(step, Raise):
                raise self._error(step)
            return UpstreamJob(state.upstream_id, JobStatus.PROCESSING, poll_url=job.poll_url,
                               charged_micro_usd=quote, raw_status="processing")
        return self._terminal(state, quote)

    async def cancel(self, job: UpstreamJob) -> bool:
        self.calls.append(("cancel", job.upstream_id))
        state = self._jobs.get(job.upstream_id)
        if state is None or not self.cancel_ok:
            return False
        state.canceled = True
        return True

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        if job is not None and job.charged_micro_usd is not None:
            return job.charged_micro_usd
        return req.num_images * self.price_micro_usd

    def saturated(self) -> bool:
        return self.is_saturated

    # -- helpers

    def _create(self, step: Accept, req: GenerationRequest) -> _Job:
        upstream_id = f"{self.name}-{next(self._ids)}"
        polls: list[PollStep] = (["processing"] * step.polls if isinstance(step.polls, int)
                                 else list(step.polls))
        job = _Job(upstream_id, step, polls)
        self._jobs[upstream_id] = job
        charged = step.charged_micro_usd
        self.billed[upstream_id] = (charged if charged is not None
                                    else req.num_images * self.price_micro_usd)
        self._requests[upstream_id] = req
        return job

    def _terminal(self, job: _Job, charged: int | None) -> UpstreamJob:
        end = job.step.then
        req = self._requests[job.upstream_id]
        poll_url = f"{self.settings.base_url}/jobs/{job.upstream_id}"
        if isinstance(end, Fail):
            return UpstreamJob(job.upstream_id, JobStatus.FAILED, poll_url=poll_url,
                               error=end.message, error_kind=end.kind,
                               charged_micro_usd=charged, raw_status="failed")
        outputs = list(end.outputs) if end.outputs is not None else [
            f"https://assets.scripted.invalid/{job.upstream_id}/{i}.{req.output_format}"
            for i in range(req.num_images)]
        return UpstreamJob(job.upstream_id, JobStatus.COMPLETED, poll_url=poll_url,
                           outputs=outputs,
                           has_nsfw_contents=list(end.nsfw) if end.nsfw is not None else None,
                           charged_micro_usd=charged, inference_ms=end.inference_ms,
                           raw_status="completed")

    def _error(self, step: Raise) -> Exception:
        return ERRORS_BY_KIND[step.kind](f"{self.name}: {step.message}", provider=self.name,
                                         retry_after=step.retry_after, final=step.final)


# --------------------------------------------------------------------------- the clock


class FakeClock:
    """Virtual time: the running loop's time since this clock first looked, added
    to `start`. With looptime the loop skips ahead whenever every task waits on a
    timer, so waits cost no wall time; `advance` jumps further without waiting."""

    def __init__(self, start: datetime | None = None) -> None:
        self.start = start or datetime.now(UTC)
        self._origin: float | None = None
        self._offset = 0.0

    def monotonic(self) -> float:
        try:
            loop_time = asyncio.get_running_loop().time()
        except RuntimeError:  # no loop (sync code): only `advance` moves it
            loop_time = self._origin or 0.0
        if self._origin is None:
            self._origin = loop_time
        return loop_time - self._origin + self._offset

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.monotonic())

    def advance(self, seconds: float) -> None:
        self._offset += seconds
