"""Uploads: received into the local data directory (hashed, size-limited), then kept in the
store (:mod:`core.objectstore`) under a key the row records.

Every upload goes through one construct, :func:`upload`: whatever fails before the
transaction that records the upload commits, the received file and the stored object are
removed, in the API as in the workers.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from sqlalchemy.orm import Session

from core.db import on_rollback
from core.errors import PayloadTooLarge
from core.objectstore import Store

CHUNK = 1 << 20
log = logging.getLogger("robustscope.storage")


class Received(NamedTuple):
    """A file on this machine, on its way to the store: where, its SHA-256 and its size."""

    path: Path
    sha256: str
    size: int


def receive(stream: BinaryIO, data_dir: Path, limit: int, what: str) -> Received:
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
    return Received(path, digest.hexdigest(), size)


@dataclass
class Upload:
    """A received file and, once :meth:`keep` has sent it, its object in the store."""

    received: Received
    store: Store
    key: str | None = None  #: the stored object's key, once kept

    @property
    def path(self) -> Path:
        return self.received.path

    @property
    def sha256(self) -> str:
        return self.received.sha256

    @property
    def size(self) -> int:
        return self.received.size

    def keep(self, key: str) -> str:
        """Move the file to the store under ``key`` (in parts); returns the key for the row."""
        try:
            self.store.put_file(key, self.path)
        finally:
            self.path.unlink(missing_ok=True)
        self.key = key
        return key

    def discard(self) -> None:
        """Remove the file and the stored object; once, however often it is called."""
        self.path.unlink(missing_ok=True)
        key, self.key = self.key, None
        if key is not None:
            remove(self.store, key)


@contextmanager
def upload(session: Session, store: Store, received: Received) -> Iterator[Upload]:
    """``with upload(session, store, received) as up:`` check the file, ``up.keep(key)`` it
    and add the row that records the key. The local file is gone when the block ends (moved
    to the store, or removed); the stored object is removed if the block raises, or if the
    session's transaction rolls back later instead of committing (:func:`core.db.on_rollback`).
    """
    up = Upload(received, store)
    on_rollback(session, up.discard)
    try:
        yield up
    except BaseException:
        up.discard()
        raise
    finally:
        received.path.unlink(missing_ok=True)


def remove(store: Store, key: str) -> None:
    try:
        store.delete(key)
    except Exception:  # the row is gone; an orphaned object costs space, not correctness
        log.warning("could not delete %s from the store", key, exc_info=True)
