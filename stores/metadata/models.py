"""SQL schema of the metadata store (SQLAlchemy 2 declarative models).

Timestamps are UTC epoch seconds (``float``): lease arithmetic stays exact and
identical on SQLite and PostgreSQL. JSON columns hold small documents only;
step code lives once per hash in ``code_blobs``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = String(36)


class Base(DeclarativeBase):
    pass


class PipelineRow(Base):
    __tablename__ = "pipelines"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    pipeline_id: Mapped[str] = mapped_column(ForeignKey("pipelines.id"), index=True)
    pipeline_name: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    user: Mapped[str] = mapped_column(String(255), default="", index=True)
    orchestrator: Mapped[str] = mapped_column(String(32), default="local")
    steps_total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    #: What the run came from: ``{"kind": "retry" | "rerun" | "copy", "run_id": ..., ...}``.
    origin: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)


class CodeBlobRow(Base):
    __tablename__ = "code_blobs"

    code_hash: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text, default="")
    pickled: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class StepRunRow(Base):
    __tablename__ = "step_runs"
    __table_args__ = (
        UniqueConstraint("run_id", "invocation_id", name="uq_step_runs_run_invocation"),
        Index("ix_step_runs_run_status", "run_id", "status"),
        Index("ix_step_runs_status_lease", "status", "lease_expires_at"),
        Index("ix_step_runs_cache_key", "cache_key", "status"),
        Index("ix_step_runs_cached_from", "cached_from_step_run_id"),
        Index("ix_step_runs_waits_for", "waits_for"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    invocation_id: Mapped[str] = mapped_column(String(255))
    step_name: Mapped[str] = mapped_column(String(255))
    position: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(64), default="cpu")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    deps_left: Mapped[int] = mapped_column(Integer, default=0)
    code_hash: Mapped[str] = mapped_column(String(80))
    source_hash: Mapped[str] = mapped_column(String(80))
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    queued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cache_key: Mapped[str | None] = mapped_column(String(80), nullable=True)
    cache_ingredients: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cached_from_run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    cached_from_step_run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    exception: Mapped[str] = mapped_column(Text, default="")
    traceback: Mapped[str] = mapped_column(Text, default="")
    step_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The step run whose in-flight attempt with the same cache key this one waits for.
    waits_for: Mapped[str | None] = mapped_column(String(36), nullable=True)
    #: After this time the outputs are no longer offered as a cache hit (None: never).
    cache_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    uri: Mapped[str] = mapped_column(Text)
    data_type: Mapped[str] = mapped_column(String(512))
    materializer: Mapped[str] = mapped_column(String(512))
    content_hash: Mapped[str] = mapped_column(String(80), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    producer_run_id: Mapped[str] = mapped_column(String(36), index=True)
    producer_step_run_id: Mapped[str] = mapped_column(String(36), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    #: When a load found the stored bytes no longer match ``content_hash`` (None: never).
    #: A step run with a corrupt output is never offered as a cache hit.
    corrupted_at: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)
    #: When the object was found gone from the artifact store (None: never). Never a cache hit.
    missing_at: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)


class LineageRow(Base):
    """One edge: a step run consumed (``input``) or produced (``output``) an artifact.

    A cached step run has output edges to the original run's artifacts: no copies.
    """

    __tablename__ = "lineage"

    step_run_id: Mapped[str] = mapped_column(
        ForeignKey("step_runs.id", ondelete="CASCADE"), primary_key=True
    )
    direction: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, default=0)
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id"), index=True)
    run_id: Mapped[str] = mapped_column(String(36), index=True)


class WorkerRow(Base):
    """A live worker process and the queues it consumes, refreshed by a heartbeat.

    Lets ``wait()`` and the scheduler tell a user that a queue has no consumer
    without a broadcast to every worker.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Steps it runs at once (its pool's processes); 0: not reported (an older worker).
    concurrency: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Steps it took over after their process was found dead (a counter, never reset).
    takeovers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class StoreInfoRow(Base):
    """Facts about the store itself; ``store_id`` (made at migration time) names it."""

    __tablename__ = "store_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class StepLogRow(Base):
    """One batch of a step attempt's output lines, in order (``seq``) with stream and time."""

    __tablename__ = "step_logs"
    __table_args__ = (UniqueConstraint("step_run_id", "attempt", "seq", name="uq_step_logs_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    step_run_id: Mapped[str] = mapped_column(ForeignKey("step_runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    #: ``stdout``, ``stderr`` or ``log`` (a logging record).
    stream: Mapped[str] = mapped_column(String(8))
    ts: Mapped[float] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)


class StackRow(Base):
    """A stack record a team shares: components as JSON, secrets only as references.

    A component's secret setting is ``{"env": "VAR"}`` or ``{"file": "/path"}``; each user
    supplies the value. Private (``shared`` false) stacks are visible to ``owner`` only.
    """

    __tablename__ = "stacks"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    owner: Mapped[str] = mapped_column(String(255))
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    components: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class CacheFlightRow(Base):
    """A cache key being computed right now, and the step run computing it (single-flight).

    Inserted by the step run that computes; an identical step elsewhere finds the row and
    waits for that step run's commit instead of computing again.
    """

    __tablename__ = "cache_flights"

    cache_key: Mapped[str] = mapped_column(String(80), primary_key=True)
    step_run_id: Mapped[str] = mapped_column(String(36))
    run_id: Mapped[str] = mapped_column(String(36))
    started_at: Mapped[float] = mapped_column(Float)
