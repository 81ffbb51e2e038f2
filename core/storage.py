"""Files under the data directory: checkpoints, datasets, job state and artifacts.

Rows store paths relative to ``data_dir`` so the API and workers may mount the same volume
at different places.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from core.errors import PayloadTooLarge

CHUNK = 1 << 20


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


def keep(tmp: Path, data_dir: Path, relative: str) -> str:
    """Move a received file to its permanent place; returns the path stored in the row."""
    dest = data_dir / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return relative


def remove(data_dir: Path, relative: str) -> None:
    target = data_dir / relative
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)


def remove_on_rollback(session: Session, data_dir: Path, relative: str) -> None:
    """Delete ``relative`` if the request's transaction rolls back (see ``deps.get_session``),
    so a failed request leaves no file behind."""
    session.info.setdefault("on_rollback", []).append(lambda: remove(data_dir, relative))


def run_rollback_hooks(session: Session) -> None:
    for hook in session.info.pop("on_rollback", []):
        hook()
