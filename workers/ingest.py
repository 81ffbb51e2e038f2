"""The ``robustscope.ingest`` job: decode an uploaded dataset archive on a worker.

Decoding is CPU work with bounded memory (image sizes are read from headers and charged to
the decoded-bytes budget before any pixels are allocated), kept out of the API process so an
upload cannot slow the API or grow it. An ingest is a job like any other
(:class:`core.tables.DatasetIngest` on :func:`workers.jobs.run_work`): claimed, fenced by its
attempt, heart-beaten, cancelled, time-limited and re-sent by the reconciler. It runs no user
code (Pillow decodes the images, nothing is unpickled), so it runs in this process as a
:class:`workers.work.LocalWork` rather than in the jailed engine child.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from contract.jobs import FINAL_STATES, DatasetStatus, JobStatus
from core import storage
from core.errors import problem_body
from core.objectstore import StoreError, file_sha256
from core.settings import Settings
from core.tables import Dataset, DatasetIngest, JobTable, utcnow
from service.datasets.ingest import WRITTEN, DatasetIngestError, IngestLimits, ingest
from service.datasets.service import archive_path
from workers.jobs import run_work
from workers.runtime import Runtime
from workers.work import JobFailed, Superseded, Supervision, storage_error

log = logging.getLogger("robustscope.ingest")


def limits(settings: Settings) -> IngestLimits:
    return IngestLimits(max_archive_bytes=settings.max_dataset_bytes,
                        max_decoded_bytes=settings.ingest_max_decoded_bytes)


def run(rt: Runtime, ingest_id: uuid.UUID) -> str:
    """Run ingest ``ingest_id`` if this worker can claim it; returns what happened."""
    status = run_work(rt, DatasetIngest, ingest_id, IngestWork.load)
    log.info("dataset ingest %s: %s", ingest_id, status)
    return status


def archive_missing() -> dict[str, Any]:
    return problem_body(422, "dataset-archive-missing", "Archive missing",
                        "the uploaded archive is no longer stored; upload it again")


@dataclass
class IngestWork:
    """One upload's ingest: its archive is decoded into the canonical npz, which goes to the
    store under the dataset's key; the ingest's success, the dataset's description and its
    ``ready`` are written in one transaction fenced by the attempt."""

    rt: Runtime
    id: uuid.UUID
    token: int
    dataset_id: uuid.UUID
    name: str
    key: str  # where the npz goes in the store
    channels: int | None
    table: JobTable = DatasetIngest
    records_own_success = True

    @classmethod
    def load(cls, rt: Runtime, iid: uuid.UUID, token: int) -> IngestWork:
        with rt.sessions() as s:
            job = s.get(DatasetIngest, iid)
            ds = None if job is None else s.get(Dataset, job.dataset_id)
            if job is None or ds is None:
                raise JobFailed(archive_missing())  # deleted since the claim: nothing is written
            return cls(rt=rt, id=iid, token=token, dataset_id=ds.id, name=ds.name,
                       key=ds.storage_path, channels=(ds.info or {}).get("requested_channels"))

    def run_here(self, sup: Supervision) -> None:
        """Decode, store, record. The archive is read in place where the store is a local
        folder, else fetched into ``data_dir/tmp``; the npz is written there first. Both are
        removed whatever happens, a cancel or time limit raised by ``sup`` included."""
        store = self.rt.store
        tmp_dir = self.rt.settings.data_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        dest = tmp_dir / f"ingest-{self.id}-{self.token}.npz"
        fetched = tmp_dir / f"ingest-{self.id}-{self.token}.upload"
        try:
            try:
                archive = store.local_path(archive_path(self.dataset_id))
                if archive is None:
                    store.download(archive_path(self.dataset_id), fetched)
                    archive = fetched
                info = ingest(archive, dest, name=self.name, limits=limits(self.rt.settings),
                              channels=self.channels, progress=sup.progress).as_dict()
            except DatasetIngestError as exc:
                raise JobFailed(exc.problem()) from exc
            except (FileNotFoundError, StoreError) as exc:
                raise JobFailed(archive_missing()) from exc
            info["content_sha256"] = file_sha256(dest)
            sup.progress(WRITTEN, "storing", "storing the dataset")
            self._check_owned()
            try:
                store.put_file(self.key, dest)
            except StoreError as exc:
                raise JobFailed(storage_error(exc)) from exc
        finally:
            dest.unlink(missing_ok=True)
            fetched.unlink(missing_ok=True)
        self._record(info)

    def _check_owned(self) -> None:
        """Before the npz goes to the store under the dataset's key: an attempt that lost
        the ingest (its heartbeat went stale and another took over) must not replace the file
        the other recorded, nor store one for a dataset deleted meanwhile."""
        with self.rt.sessions() as s:
            job = s.execute(select(DatasetIngest.status, DatasetIngest.attempts)
                            .where(DatasetIngest.id == self.id)).one_or_none()
        if job is None:
            raise Superseded("the dataset was deleted")
        if job.attempts != self.token or job.status != JobStatus.RUNNING:
            raise Superseded("another attempt took over the ingest")

    def _record(self, info: dict[str, Any]) -> None:
        """The ingest succeeded and the dataset is ``ready``, in one transaction, if this
        attempt still owns the ingest. A dataset deleted meanwhile loses the file just
        stored; one another attempt took over keeps it (that attempt writes the same key)."""
        now = utcnow()
        with self.rt.sessions.begin() as s:
            job = s.scalar(select(DatasetIngest).where(DatasetIngest.id == self.id)
                           .with_for_update())
            ds = None if job is None else s.get(Dataset, self.dataset_id)
            if job is not None and ds is not None:
                if job.attempts != self.token or job.status != JobStatus.RUNNING:
                    raise Superseded("the ingest changed hands before it was recorded")
                job.status, job.error, job.finished_at = JobStatus.SUCCEEDED.value, None, now
                job.progress_fraction, job.progress_stage = 1.0, JobStatus.SUCCEEDED.value
                job.progress_message = "done"
                ds.status, ds.error, ds.finished_at = DatasetStatus.READY.value, None, now
                ds.info = info
        store = self.rt.store
        if job is None or ds is None:
            storage.remove(store, self.key)
            storage.remove(store, archive_path(self.dataset_id))
            raise Superseded("the dataset was deleted")
        storage.remove(store, archive_path(self.dataset_id))

    def finished(self, status: str, error: dict[str, Any] | None) -> None:
        """A failed or cancelled ingest's archive goes (the upload must be sent again), once
        this attempt's outcome is the one recorded."""
        if status == JobStatus.SUCCEEDED:
            return
        with self.rt.sessions() as s:
            job = s.execute(select(DatasetIngest.status, DatasetIngest.attempts)
                            .where(DatasetIngest.id == self.id)).one_or_none()
        if job is not None and job.attempts == self.token and job.status in FINAL_STATES:
            storage.remove(self.rt.store, archive_path(self.dataset_id))
