"""The ``robustscope.ingest`` task's body: decode an uploaded dataset archive on a worker.

Decoding is CPU work with bounded memory (image sizes are read from headers and charged to
the decoded-bytes budget before any pixels are allocated), kept out of the API process so an
upload cannot slow the API or grow it.
"""

from __future__ import annotations

import logging
import uuid

from core.settings import Settings
from service.datasets.ingest import IngestLimits
from service.datasets.service import run_ingest
from workers.runtime import Runtime

log = logging.getLogger("robustscope.ingest")


def limits(settings: Settings) -> IngestLimits:
    return IngestLimits(max_archive_bytes=settings.max_dataset_bytes,
                        max_decoded_bytes=settings.ingest_max_decoded_bytes)


def run(rt: Runtime, dataset_id: uuid.UUID) -> str | None:
    status = run_ingest(rt.sessions, dataset_id, rt.settings.store(), rt.settings.data_dir,
                        limits(rt.settings))
    log.info("dataset %s: %s", dataset_id, status or "nothing to do")
    return status
