"""Tables. One Prediction per client request, one Attempt per upstream submit.

Times are timezone-aware UTC on both SQLite and PostgreSQL; money is integer
micro-USD (1 USD = 1_000_000).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

TERMINAL_STATUSES = frozenset({"completed", "failed", "canceled"})
PREDICTION_STATUSES = ("queued", "processing", *sorted(TERMINAL_STATUSES))
# Attempt.status: submitting (row written before the POST), processing,
# completed, failed, canceled, unknown (submit sent, outcome never learned).
ATTEMPT_STATUSES = ("submitting", "processing", "completed", "failed", "canceled", "unknown")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A UUIDv7-style id: time-ordered, so `ORDER BY id DESC` is newest first."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | (rand & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant bits
    return str(uuid.UUID(int=value))


class UTCDateTime(TypeDecorator[datetime]):
    """SQLite drops tzinfo; store UTC and hand back aware datetimes everywhere."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(index: bool = False) -> Any:
    """A nullable timestamp column."""
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True, index=index))


def _json(nullable: bool = True) -> Column[Any]:
    # none_as_null: Python None is SQL NULL (so `IS NULL` works), not JSON 'null'.
    return Column(JSON(none_as_null=True), nullable=nullable)


class Prediction(SQLModel, table=True):
    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_status_id", "status", "id"),
        Index("ix_predictions_lease", "status", "lease_expires_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    model: str = Field(max_length=64)
    status: str = Field(default="queued", max_length=16)
    # The validated request with defaults applied and a concrete seed.
    request: dict[str, Any] = Field(sa_column=_json(nullable=False))
    seed: int = Field(sa_column=Column(BigInteger, nullable=False))
    provider: str | None = Field(default=None, max_length=64)
    outputs: list[str] | None = Field(default=None, sa_column=_json())
    has_nsfw_contents: list[bool] | None = Field(default=None, sa_column=_json())
    error: str | None = None
    error_kind: str | None = Field(default=None, max_length=32)
    cost_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    timings: dict[str, Any] | None = Field(default=None, sa_column=_json())
    api_key_id: str | None = Field(default=None, max_length=64, index=True)
    cancel_requested: bool = False
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    # Which process is driving this prediction, until when. A process that dies
    # stops renewing; another (or itself after restart) takes it over.
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = _ts()


class Attempt(SQLModel, table=True):
    __tablename__ = "attempts"
    __table_args__ = (
        # One row per (prediction, seq): two drivers can never both record attempt N.
        UniqueConstraint("prediction_id", "seq", name="uq_attempts_prediction_seq"),
        Index("ix_attempts_key_created", "api_key_id", "created_at"),  # spend, budgets
        Index("ix_attempts_created", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    prediction_id: str = Field(foreign_key="predictions.id", index=True, max_length=36)
    seq: int  # 1-based order within the prediction
    provider: str = Field(max_length=64)
    upstream_id: str | None = Field(default=None, max_length=128)
    poll_url: str | None = None
    status: str = Field(default="submitting", max_length=16)
    error: str | None = None
    error_kind: str | None = Field(default=None, max_length=32)
    http_status: int | None = None
    latency_ms: int | None = None
    cost_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    images: int = 0  # outputs a completed attempt produced (spend reports count them)
    # What the key's budget held for this attempt before its submit (the overshoot
    # bound is the sum of cost - reserved over attempts; see budget_reservations).
    reserved_micro_usd: int = Field(default=0, sa_column=Column(BigInteger, nullable=False,
                                                                server_default="0"))
    # The price the upstream quoted when it accepted (VibeDream's costCents), kept so a
    # resumed attempt is charged what was quoted, not the fallback price.
    quoted_micro_usd: int | None = Field(default=None, sa_column=Column(BigInteger,
                                                                       nullable=True))
    api_key_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    completed_at: datetime | None = _ts()


class ApiKey(SQLModel, table=True):
    """A client key. Only a keyed hash of the key is stored; the key is shown once."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=128, unique=True)
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)  # the key's first characters, to recognise it
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=_json(nullable=False))
    budget_micro_usd: int | None = Field(default=None, sa_column=Column(BigInteger))
    budget_period: str | None = Field(default=None, max_length=8)  # "day" | "month"
    rate_per_s: float | None = None
    burst: int | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    revoked_at: datetime | None = _ts()
    # The Standard Webhooks signing secret ("whsec_..."): shown once, at creation or
    # rotation. Kept readable (it signs), unlike the key. After a rotation the previous
    # one also signs until `webhook_secret_prev_until`, so receivers can switch over.
    webhook_secret: str | None = Field(default=None, max_length=64)
    webhook_secret_prev: str | None = Field(default=None, max_length=64)
    webhook_secret_prev_until: datetime | None = _ts()


class Reservation(SQLModel, table=True):
    """Budget held for an upstream submit that has not recorded its cost yet.

    seq 0 is the hold taken when the prediction is accepted (the dearest
    candidate's price); attempt n replaces it with its own (n, price) row just
    before its submit, in the transaction that writes the attempt. The row goes
    in the transaction that records the attempt's cost, so a key's exposure is
    always spend (attempt rows) + holds (these rows), across replicas and crashes.
    """

    __tablename__ = "budget_reservations"

    prediction_id: str = Field(primary_key=True, max_length=36)
    seq: int = Field(primary_key=True)
    api_key_id: str = Field(max_length=64, index=True)
    amount_micro_usd: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )


class Meta(SQLModel, table=True):
    """Small per-database values (e.g. the key-hash secret when none is configured)."""

    __tablename__ = "proxy_meta"

    name: str = Field(primary_key=True, max_length=64)
    value: str


class IdempotencyKey(SQLModel, table=True):
    """A client's Idempotency-Key, kept until `expires_at`: a repeat of the request
    answers the prediction it made. Inserted in the prediction's own transaction."""

    __tablename__ = "idempotency_keys"

    # The client key's id; "" for the admin key and for auth off (one shared scope).
    api_key_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=64)  # SHA-256 of surface + canonical request
    prediction_id: str = Field(max_length=36)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))


WEBHOOK_EVENTS = ("start", "output", "completed")  # Replicate's names, in firing order
# WebhookDelivery.status: waiting (its event has not happened, or its next try is
# later), delivered, failed (gave up after the retry window), skipped (an `output`
# event of a prediction that ended without outputs).
WEBHOOK_STATUSES = ("waiting", "delivered", "failed", "skipped")


class WebhookDelivery(SQLModel, table=True):
    """One event of one prediction to send to its webhook URL, at least once.

    Inserted with the prediction, in its transaction, one row per subscribed event:
    the event is due when the prediction's row shows it happened (`start`: no longer
    queued; `output`: outputs recorded; `completed`: terminal), so a crash anywhere
    leaves nothing unsent. Any replica may send it under a short lease."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)  # webhook-id
    prediction_id: str = Field(max_length=36, index=True)
    api_key_id: str | None = Field(default=None, max_length=64)
    event: str = Field(max_length=16)
    url: str
    base_url: str = ""  # where the client reached us: the payload's urls
    status: str = Field(default="waiting", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    first_attempt_at: datetime | None = _ts()  # the retry window counts from here
    last_status_code: int | None = None
    last_error: str | None = None
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = _ts()
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    delivered_at: datetime | None = _ts()


class WebhookAttempt(SQLModel, table=True):
    """One POST of a delivery, whatever came of it."""

    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(max_length=36, index=True)
    n: int  # 1-based, per delivery
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    instance_id: str = Field(max_length=64)
