"""One settings object, read from ``ROBUSTSCOPE_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.objectstore import Store, open_store

_PLACEHOLDER = "change-me"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBUSTSCOPE_", extra="ignore")

    environment: str = "development"  # development | production | test
    data_dir: Path = Path("var")
    database_url: str = ""  # default: SQLite in data_dir
    broker_url: str = ""  # default: an embedded SQLAlchemy/SQLite broker in data_dir
    # Prepended to every Redis key the broker uses, so deployments can share one Redis.
    broker_key_prefix: str = ""
    # Where checkpoints, datasets, artifacts and job state are kept (core/objectstore.py):
    # empty for data_dir itself, file:///path, or s3://bucket/prefix (with the usual AWS_*
    # variables; AWS_ENDPOINT_URL for any S3-compatible store). With an object store the API and
    # each worker keep only caches and temporary files in their own data_dir.
    storage_url: str = ""
    # Bytes of checkpoints and datasets a worker keeps fetched from an object store (least
    # recently used removed first).
    cache_bytes: int = Field(20 << 30, ge=1 << 20)
    bootstrap_key: str | None = None
    webhook_signing_secret: str = _PLACEHOLDER

    max_checkpoint_bytes: int = 1 << 30
    max_dataset_bytes: int = 2 << 30
    max_json_bytes: int = 1 << 20  # any body that is not an upload
    # Decoded pixels one dataset ingest may hold (checked from image headers before decoding).
    ingest_max_decoded_bytes: int = 2 << 30
    # Per owner; 0 turns a quota off.
    quota_active_jobs: int = 200
    quota_stored_bytes: int = 100 << 30

    # Webhooks to loopback, link-local and private addresses are refused unless this is set
    # (an internal deployment whose receivers live on a private network).
    webhook_allow_private: bool = False
    # /metrics and the detail of /ready answer without a key only when this is set (an
    # operator's scraper on a private network); with a key they always answer.
    metrics_public: bool = False
    # Seconds a verified API key is trusted in one process before its row is read again.
    # Revocation through this process is immediate; through another, within this time.
    auth_cache_seconds: float = 0.0
    # A browser's login (POST /login) lasts this many hours, unless it logs out or its key is
    # revoked first; its cookie is marked Secure over HTTPS, and always when this is set (a
    # deployment behind a TLS-terminating proxy).
    session_hours: float = Field(12.0, gt=0, le=24 * 30)
    session_cookie_secure: bool = False
    # A share link of a private report is valid for at most this many days.
    share_link_max_days: int = Field(90, ge=1, le=3650)
    # Writes with a JSON body (submissions, cancellations, keys) one API process handles at
    # once, once their body is read; more wait their turn without using CPU, so that a flood
    # of submissions cannot starve the polling reads. Uploads are not counted. 0: no limit.
    api_write_concurrency: int = 2
    # The share of the time each of those write slots may be busy: after a write that took
    # t seconds its slot stays closed t * (1 / share - 1) seconds more (its answer is not
    # held back). With 2 slots at 0.25, writes take at most half of a process's time, and a
    # flood of submissions queues instead of slowing every read. 1: no pause.
    api_write_share: float = Field(0.25, gt=0, le=1)
    # Connections (service/http/connections.py): a request's head must arrive within
    # api_header_timeout seconds; a body gets api_body_timeout seconds plus one second per
    # api_body_min_rate bytes received (a slower trickle is closed); past api_max_connections
    # open connections, a process answers a new one 503 and closes it. 0 turns one off
    # (a min rate of 0: the whole body within api_body_timeout).
    api_header_timeout: float = Field(10.0, ge=0)
    api_body_timeout: float = Field(30.0, ge=0)
    api_body_min_rate: float = Field(1024.0, ge=0)
    api_max_connections: int = Field(1000, ge=0)
    # Database connections one process keeps open (PostgreSQL), and how many more it may
    # open for a burst; past the pool, a connection is opened and closed per use.
    db_pool_size: int = Field(5, ge=1)
    db_max_overflow: int = Field(5, ge=0)
    # Connections one process keeps for polls on PostgreSQL (service/http/polling.py), apart from
    # the pool; more polls at once wait their turn. A process opens at most
    # db_pool_size + db_max_overflow + db_poll_connections: times the API processes, that
    # must stay under the server's max_connections, with room for the workers.
    db_poll_connections: int = Field(5, ge=1)

    # Job supervision (seconds).
    heartbeat_interval: float = 5.0
    # Between heartbeats, a running job's cancel flag is read this often (one row by its key).
    cancel_poll_interval: float = Field(0.4, gt=0)
    stale_after: float = 60.0
    reconcile_interval: float = 15.0
    requeue_queued_after: float = 600.0
    max_attempts: int = 3
    job_time_limit: float = 6 * 3600.0
    broker_visibility_timeout: int = 12 * 3600

    # Worker.
    # The worker's name in job records (``robustscope worker --name``); empty: host:pid.
    worker_name: str = ""
    # The queues the worker serves (``robustscope worker --queues``); one that serves
    # ``evaluations`` counts as live for a sharded evaluation's default.
    worker_queues: str = ""
    # CPU threads of a worker's jobs; 0: PyTorch's default (one per core).
    threads: int = Field(0, ge=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: attacks search in bf16 on CUDA, and on a CPU where a probe convolution measured
    # at start-up runs at least 1.5x faster in bf16 than in fp32 (AMX: yes; some AVX512-BF16
    # CPUs: no); every break is confirmed in fp32 and accuracies are measured in fp32.
    # bf16: always search in bf16. fp32: never.
    precision: str = Field("auto", pattern="^(auto|bf16|fp32)$")
    batch_size: int = 256
    # Untrusted models run in a jailed child process (docs/SECURITY.md). "on" refuses to
    # start a worker that cannot build the jail; "off" runs models inside the worker (a
    # single trusted user only).
    sandbox: str = Field("on", pattern="^(on|off)$")
    # A jailed job's memory budget (bytes) on CPU devices. Its /tmp and /dev/shm (tmpfs, sized
    # below) count in it; the rest is each process's address-space cap (RLIMIT_AS), and where
    # a cgroup can be made the whole budget is also its memory limit. Address space, not
    # resident memory: a job maps about 3.3 GB of it; `robustscope worker` refuses a budget
    # below what its start-up probe job measured.
    sandbox_memory_limit: int = 16 << 30
    sandbox_tmp_size: int = Field(256 << 20, ge=1 << 20)  # the jail's /tmp
    sandbox_shm_size: int = Field(64 << 20, ge=1 << 20)  # the jail's /dev/shm
    # Tasks (processes and threads) one jail may hold; 0: 64 + 4 per core.
    sandbox_pids_limit: int = Field(0, ge=0)
    # Disk a job may fill under its /scratch (counted by the supervisor every heartbeat).
    sandbox_scratch_limit: int = Field(8 << 30, ge=1 << 20)
    # Start the next job's child ahead of time (torch imported, waiting for its job).
    sandbox_prewarm: bool = True
    # An uploaded TorchScript/torch.export model runs in a model server of its own: the
    # shared memory its tensors cross (bytes; a larger batch crosses in chunks) and how long
    # the evaluator waits for any one answer (and for the model to load) before it fails
    # the job.
    sandbox_model_shm: int = Field(256 << 20, ge=1 << 20)
    sandbox_model_timeout: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'robustscope.db').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"
        if self.environment == "production" and self.webhook_signing_secret == _PLACEHOLDER:
            raise ValueError(
                "ROBUSTSCOPE_WEBHOOK_SIGNING_SECRET must be set to a real secret in production"
            )
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+") or self.broker_url.startswith("filesystem")

    def store(self) -> Store:
        """The store ``storage_url`` names (one per process and URL)."""
        return open_store(self.storage_url, self.data_dir)

    def path(self, *parts: str) -> Path:
        p = self.data_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@lru_cache
def get_settings() -> Settings:
    return Settings()
