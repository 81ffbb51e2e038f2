"""ORM tables. The schema changes only through Alembic migrations (``migrations/``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    exists,
    or_,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from contract.jobs import DatasetStatus, JobStatus
from core.db import Base
from core.errors import problem_body


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite stores datetimes without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    webhook_secret: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobState:
    """The columns of anything a worker claims and runs (a job, or one shard of one): its state
    and progress, who runs it, how it failed, and its times. The worker's generic loop
    (``workers/jobs.py``) reads and writes only these."""

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_stage: Mapped[str] = mapped_column(String(100), default=JobStatus.QUEUED.value)
    progress_message: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobColumns(JobState):
    """The columns every kind of job a user submits carries (an evaluation, a training): its
    owner, who may repeat its request, the engine that ran it, and its :class:`JobState`."""

    owner: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    engine_version: Mapped[str | None] = mapped_column(String(100))


class Model(Base):
    __tablename__ = "models"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str | None] = mapped_column(String(100))
    num_classes: Mapped[int] = mapped_column(Integer)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    model_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_path: Mapped[str] = mapped_column(Text)
    # ingesting -> ready | failed, written with its ingest job's outcome (DatasetIngest).
    status: Mapped[str] = mapped_column(String(16), default=DatasetStatus.READY.value,
                                        server_default=DatasetStatus.READY.value)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    ingest: Mapped[DatasetIngest | None] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True,
        lazy="selectin")


class DatasetIngest(JobState, Base):
    """The job that decodes an upload's archive into its canonical npz (the ``ingest``
    queue): claimed, heart-beaten, fenced by its attempt, cancelled and re-sent like any job.
    Its dataset's ``status`` follows its outcome in the same transaction (:meth:`settled`)."""

    __tablename__ = "dataset_ingests"
    __table_args__ = (UniqueConstraint("dataset_id"),
                      Index("ix_dataset_ingests_status", "status"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    dataset_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"))

    dataset: Mapped[Dataset] = relationship(back_populates="ingest")

    @classmethod
    def settled(cls, session: Session, jid: uuid.UUID) -> None:
        """In the transaction that wrote ingest ``jid``'s outcome: an ingest that ended other
        than ``succeeded`` leaves its dataset ``failed`` with its error (a succeeded one was
        written with its dataset ``ready`` by the worker, which alone has the dataset's
        description)."""
        row = session.get(cls, jid)
        if row is None or row.status == JobStatus.SUCCEEDED:
            return
        ds = session.get(Dataset, row.dataset_id)
        if ds is None or ds.status != DatasetStatus.INGESTING:
            return
        ds.status, ds.finished_at = DatasetStatus.FAILED.value, row.finished_at or utcnow()
        ds.error = row.error or problem_body(
            409, "dataset-ingest-cancelled", "Ingest cancelled",
            "the dataset's ingest was cancelled; upload the archive again")


class Evaluation(JobColumns, Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_evaluations_owner_created", "owner", "created_at"),
        Index("ix_evaluations_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL")
    )
    model_name: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(200))  # a built-in name or an uploaded id
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL")
    )
    dataset_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    split: Mapped[str] = mapped_column(String(32), default="test")
    suite: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook_url: Mapped[str | None] = mapped_column(Text)

    checks: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    artifacts: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    completed_entries: Mapped[list[int]] = mapped_column(JSON, default=list)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # n_examples (a seeded subset of the split) and class_map (model class -> dataset class);
    # for a sharded evaluation also block (the examples per batch its shards align to)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # 1: one job. More: the adversarial entries run first as that many shard jobs
    # (EvaluationShard), then this job merges their states and runs the rest.
    shards: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    results: Mapped[list[Result]] = relationship(
        back_populates="evaluation", order_by="Result.id", cascade="all, delete-orphan"
    )

    @classmethod
    def claimable(cls, stale: datetime) -> ColumnElement[bool]:
        """Which evaluations a worker may claim: queued (unsharded), running whose worker
        went silent, or sharded whose shards all succeeded and whose merge nobody started
        (running with no heartbeat yet)."""
        pending = exists().where(EvaluationShard.evaluation_id == cls.id,
                                 EvaluationShard.status != JobStatus.SUCCEEDED)
        return or_(and_(cls.status == JobStatus.QUEUED, cls.shards == 1),
                   and_(cls.status == JobStatus.RUNNING, cls.heartbeat_at < stale),
                   and_(cls.status == JobStatus.RUNNING, cls.heartbeat_at.is_(None), cls.shards > 1,
                        ~pending))


class EvaluationShard(JobState, Base):
    """One slice of a sharded evaluation's examples (``start`` to ``stop`` of its set), a job
    of its own: claimed, heart-beaten, fenced by its attempt and resumed like any job."""

    __tablename__ = "evaluation_shards"
    __table_args__ = (UniqueConstraint("evaluation_id", "index"),
                      Index("ix_evaluation_shards_status", "status"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    evaluation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)

    completed_entries: Mapped[list[int]] = mapped_column(JSON, default=list)


class WorkerSeen(Base):
    """A worker that serves the evaluations queue, and when it last said so (its reconciler's
    round): the live workers a sharded evaluation's default counts."""

    __tablename__ = "workers_seen"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("evaluation_id", "entry_index", "metric", "params_key"),
        Index("ix_results_lookup", "benchmark", "metric"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    evaluation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), index=True
    )
    entry_index: Mapped[int] = mapped_column(Integer)
    benchmark: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_key: Mapped[str] = mapped_column(Text)
    # An accuracy's count of examples and its per-example outcomes (contract.stats), read
    # only by a paired comparison: deferred, so records and polls never load them.
    n: Mapped[int | None] = mapped_column(Integer)
    outcomes: Mapped[str | None] = mapped_column(Text, deferred=True)

    evaluation: Mapped[Evaluation] = relationship(back_populates="results")


class Training(JobColumns, Base):
    """An adversarial training job; when it succeeds it registers ``model_id`` and, if the spec
    asked for it, queues ``evaluation_id``."""

    __tablename__ = "trainings"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_trainings_owner_created", "owner", "created_at"),
        Index("ix_trainings_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))  # the registered model's name
    dataset: Mapped[str] = mapped_column(String(200))  # a built-in name or an uploaded id
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL")
    )
    dataset_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    held_out_split: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(32))
    threat: Mapped[dict[str, Any]] = mapped_column(JSON)
    epochs: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    evaluate: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL")
    )
    evaluation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("evaluations.id", ondelete="SET NULL")
    )


class Sweep(Base):
    """A grid of trainings (methods x threats), each evaluated with the same suite."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_owner_created", "owner", "created_at"),
                      UniqueConstraint("owner", "idempotency_key",
                                       name="uq_sweeps_owner_idempotency_key"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_ids: Mapped[list[str]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: The tables of the kinds of job (each with :class:`JobState`), and one of their rows.
JobTable = type[Evaluation] | type[Training] | type[EvaluationShard] | type[DatasetIngest]
JobRow = Evaluation | Training | EvaluationShard | DatasetIngest


class BrowserSession(Base):
    """A browser's login: the cookie holds a random token, the table its hash. It opens the
    key owner's pages until it expires, is ended (logout) or its key is revoked."""

    __tablename__ = "browser_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"),
                                              index=True)
    owner: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ShareLink(Base):
    """A read-only link to one private report (an evaluation's or a sweep's): the URL holds a
    random token, the table its hash, so a link is valid only as issued and until it expires
    or its owner revokes it."""

    __tablename__ = "share_links"
    __table_args__ = (Index("ix_share_links_owner_created", "owner", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # evaluation | sweep
    target_id: Mapped[uuid.UUID] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
