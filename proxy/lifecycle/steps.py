"""The lifecycle as a small state machine: what the database says decides the
next step, so a fresh process (a restart, another replica) continues exactly
where the last one stopped.

States are the rows: the prediction's status and `cancel_requested`, and each
attempt's status and upstream id. Every transition is one committed write:

    queued --START--> processing
    processing --SUBMIT--> attempt submitting        (attempt row + budget hold)
    attempt submitting --(POST answered)--> processing with upstream id
    attempt submitting --CLOSE_UNKNOWN--> unknown    (resume: the POST may have landed)
    attempt processing --FOLLOW--> failed | canceled (billed; SUBMIT may follow)
    attempt processing --FOLLOW--> completed + prediction completed  (one transaction)
    attempt completed, prediction still open --READ_BACK--> prediction completed
    any --CANCEL--> canceled (upstream job canceled where one exists; never a new SUBMIT)

A step is safe to crash after: `resume_steps` run again on the same rows give
the same decisions, and none of them submits to a provider that may already
hold a job for this prediction.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.store.models import TERMINAL_STATUSES, Attempt, Prediction


class Step(enum.StrEnum):
    START = "start"  # queued: mark it processing
    CANCEL = "cancel"  # a cancel was asked: no new submit, stop what is upstream
    CLOSE_UNKNOWN = "close_unknown"  # attempt written, upstream id never recorded
    FOLLOW = "follow"  # a job is upstream: poll it again
    READ_BACK = "read_back"  # completed upstream, prediction not ended: fetch its outputs
    SUBMIT = "submit"  # nothing left upstream: try the next provider
    DONE = "done"  # terminal: nothing to do


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]
    close_unknown: tuple[Attempt, ...] = ()
    follow: tuple[Attempt, ...] = ()
    read_back: tuple[Attempt, ...] = ()


def resume_steps(pred: Prediction, attempts: Sequence[Attempt]) -> Plan:
    """The steps to take, in order, for a prediction in the state these rows show."""
    if pred.status in TERMINAL_STATUSES:
        return Plan((Step.DONE,))
    steps: list[Step] = []
    if pred.status == "queued":
        steps.append(Step.START)
    if pred.cancel_requested:
        steps.append(Step.CANCEL)
    unknown = tuple(a for a in attempts if a.status == "submitting")
    follow = tuple(a for a in attempts if a.status == "processing" and a.upstream_id)
    read_back = tuple(a for a in attempts if a.status == "completed" and a.upstream_id)
    if unknown:
        steps.append(Step.CLOSE_UNKNOWN)
    if follow:
        steps.append(Step.FOLLOW)
    if read_back:
        steps.append(Step.READ_BACK)
    if not follow and not read_back:
        steps.append(Step.SUBMIT)  # (a CANCEL among the steps turns it into the end)
    return Plan(tuple(steps), unknown, follow, read_back)
