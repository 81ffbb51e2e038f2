"""Uploads: received into the local data directory (hashed, size-limited), then kept in the
store (:mod:`core.objectstore`) under a key the row records.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from core.db import on_rollback
from core.errors import PayloadTooLarge
from core.objectstore import Store

CHUNK = 1 << 20
log = logging.getLogger("robustscope.storage")


def receive(stream: BinaryIO, data_dir: Path, limit: int, what: str) -> tuple[Path, str, int]:
    """Copy an upload to a temporary file, hashing as it goes; 413 past ``limit`` bytes."""
    tmp_dir = data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"upload-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the {what} is larger than the limit of {limit} bytes",
                                          limit=limit)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


def keep(tmp: Path, store: Store, key: str) -> str:
    """Move a received file to the store (in parts); returns the key stored in the row."""
    try:
        store.put_file(key, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def remove(store: Store, key: str) -> None:
    try:
        store.delete(key)
    except Exception:  # the row is gone; an orphaned object costs space, not correctness
        log.warning("could not delete %s from the store", key, exc_info=True)


def remove_on_rollback(session: Session, store: Store, key: str) -> None:
    """Delete ``key`` if the session's transaction rolls back (:func:`core.db.on_rollback`),
    so a failed request or job leaves no file behind."""
    on_rollback(session, lambda: remove(store, key))
