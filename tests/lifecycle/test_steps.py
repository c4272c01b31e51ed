"""The state machine's decisions from rows alone: what a fresh process does next."""

from __future__ import annotations

import pytest

from proxy.lifecycle.steps import Step, resume_steps
from proxy.store.models import Attempt, Prediction


def pred(status: str = "processing", cancel: bool = False) -> Prediction:
    return Prediction(id="p", model="flux-dev", request={}, seed=1, status=status,
                      cancel_requested=cancel)


def attempt(status: str, upstream_id: str | None = None, seq: int = 1) -> Attempt:
    return Attempt(prediction_id="p", seq=seq, provider="a", status=status,
                   upstream_id=upstream_id)


@pytest.mark.parametrize(("prediction", "attempts", "steps"), [
    (pred("queued"), [], (Step.START, Step.SUBMIT)),
    (pred(), [], (Step.SUBMIT,)),
    (pred(), [attempt("submitting")], (Step.CLOSE_UNKNOWN, Step.SUBMIT)),
    (pred(), [attempt("processing", "j1")], (Step.FOLLOW,)),
    (pred(), [attempt("failed", "j1")], (Step.SUBMIT,)),
    # The crash window found on main: never "spent, try the next".
    (pred(), [attempt("completed", "j1")], (Step.READ_BACK,)),
    # A hedge: one job upstream, the other never got its id.
    (pred(), [attempt("processing", "j1"), attempt("submitting", seq=2)],
     (Step.CLOSE_UNKNOWN, Step.FOLLOW)),
    (pred(cancel=True), [], (Step.CANCEL, Step.SUBMIT)),
    (pred(cancel=True), [attempt("processing", "j1")], (Step.CANCEL, Step.FOLLOW)),
    (pred("completed"), [attempt("completed", "j1")], (Step.DONE,)),
    (pred("canceled"), [attempt("processing", "j1")], (Step.DONE,)),
])
def test_next_steps_follow_from_the_rows(prediction: Prediction, attempts: list[Attempt],
                                        steps: tuple[Step, ...]) -> None:
    assert resume_steps(prediction, attempts).steps == steps
