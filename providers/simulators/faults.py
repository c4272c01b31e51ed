"""Which fault a request draws: the decisions, apart from the HTTP that carries them out.

Random faults come from a `random.Random(rng_seed)`, so a run is reproducible: the same
sequence of requests against a freshly reset simulator draws the same faults. Drawn
seeds (seed -1) come from a second RNG, so they never shift the fault sequence.
A request's `[sim:...]` directives win over the server's knobs.
"""

from __future__ import annotations

import random
import time

from .config import Directives, SimConfig
from .jobs import CODE_INTERNAL, CODE_MODERATION, Failure, Job, JobSpec
from .wire import MAX_SEED


class Faults:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.reseed()

    def reseed(self) -> None:
        self._rng = random.Random(self.config.rng_seed)
        self._seed_rng = random.Random(self.config.rng_seed + 1)
        self._tokens: float | None = None
        self._tokens_at = 0.0

    # ------------------------------------------------------------------ submit

    def submit_status(self, d: Directives) -> int | None:
        """The error status this submit is answered with (429 / 5xx), or None."""
        if d.http_status is not None:
            return d.http_status
        cfg = self.config
        if self.chance(cfg.rate_limit) or not self.take_token():
            return 429
        if self.chance(cfg.error_rate):
            return cfg.status_5xx
        return None

    def seed(self, spec: JobSpec) -> int:
        return spec.seed if spec.seed >= 0 else self._seed_rng.randint(0, MAX_SEED)

    def failure(self, d: Directives) -> Failure | None:
        """How an accepted job will end, if not completed."""
        cfg = self.config
        if d.moderate:
            return Failure(CODE_MODERATION)
        if d.fail_code is not None or d.final_status is not None:
            status = d.final_status or "failed"
            code = d.fail_code
            if code is None and status == "failed":
                code = CODE_INTERNAL
            return Failure(code, status)
        if d.fail_after_accept:
            return Failure(cfg.fail_code)
        if cfg.moderate:
            return Failure(CODE_MODERATION)
        if cfg.fail_after_accept:
            return Failure(cfg.fail_code)
        return None

    def nsfw(self, spec: JobSpec, d: Directives) -> tuple[bool, ...]:
        """One flag per image; all False when the request turned the checker off."""
        n = spec.num_images
        if not spec.safety_checker:
            return (False,) * n
        if d.nsfw_indices is not None:
            return tuple(i in d.nsfw_indices for i in range(n))
        return (d.nsfw or self.config.nsfw,) * n

    # ------------------------------------------------------------------ poll

    def poll_status(self, job: Job) -> int | None:
        """The 5xx this poll is answered with, or None."""
        if job.poll_5xx_left > 0:
            job.poll_5xx_left -= 1
            return self.config.status_5xx
        if self.chance(self.config.poll_error_rate):
            return self.config.status_5xx
        return None

    def poll_malformed(self, job: Job) -> bool:
        if job.poll_malformed_left > 0:
            job.poll_malformed_left -= 1
            return True
        return self.config.poll_malformed

    # ------------------------------------------------------------------ primitives

    def chance(self, probability: float) -> bool:
        return probability > 0 and self._rng.random() < probability

    def take_token(self) -> bool:
        """Token bucket of `max_rps` (burst: one second's worth)."""
        rate = self.config.max_rps
        if not rate:
            return True
        now = time.monotonic()
        capacity = max(1.0, rate)
        if self._tokens is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def retry_after(seconds: float) -> str:
    """`Retry-After` value: whole seconds as an integer (the HTTP form), else e.g. 0.5."""
    seconds = max(0.0, float(seconds))
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:g}"
