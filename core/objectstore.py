"""Where checkpoints, datasets, artifacts and resumable job state are kept.

``ROBUSTSCOPE_STORAGE_URL`` names the store: empty (the default) is the data directory itself,
``file:///path`` another folder, ``s3://bucket/prefix`` an S3-compatible object store reached
with the usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for any S3-compatible server such as MinIO,
Ceph or R2). With an object store the API and every worker may have their own local folders:
nothing is shared but PostgreSQL, the broker and the store.

Object keys are made here from what the service chose (a row's id, a job's id, a content
hash), never from a name a user or a jailed process gave: :func:`check_key` refuses anything
else. A file goes to the store from a local file in parts (multipart above
:data:`PART_BYTES`), never held whole in memory; a worker reads checkpoints and datasets through
a :class:`BlobCache` (by content hash, bounded, verified), and a job's resumable state through a
:class:`StateMirror`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("robustscope.storage")

CHUNK = 1 << 20
#: Files above this size go to an object store as a multipart upload of parts of this size.
PART_BYTES = 8 << 20
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"
_KEY = re.compile(rf"^(models|datasets|artifacts|state)(/{_SEGMENT}){{1,4}}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """The store could not be reached, or a file in it is missing or not what was stored."""


def check_key(key: str) -> str:
    """A key the service made: a known top folder and at most four plain segments."""
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    """A flat namespace of keys (see :func:`check_key`) holding files."""

    url: str

    def put_file(self, key: str, path: Path, keep: bool = False) -> None:
        """Store the local file ``path`` under ``key``; ``path`` is consumed (moved or removed)
        unless ``keep``."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes | None:
        """A small object's bytes, or None when there is no such key."""
        raise NotImplementedError

    def download(self, key: str, dest: Path) -> None:
        """Write the object to the local file ``dest`` (in parts)."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The object's own file, where the store is a folder on this machine; else None."""
        return None

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks (for an HTTP response); StoreError if missing."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Every object under the folder ``prefix`` (a key)."""
        raise NotImplementedError

    def check(self) -> str | None:
        """Why the store cannot be used now, or None."""
        raise NotImplementedError


class LocalStore(Store):
    """A folder: the data directory (the default) or ``file:///path``."""

    def __init__(self, root: Path, url: str = "") -> None:
        self.root = root
        self.url = url or str(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path, keep: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not keep:
            try:
                os.replace(path, dest)
                return
            except OSError:  # another file system
                pass
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        if not keep:
            path.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError as exc:
            raise StoreError(f"{key} is not in the store") from exc

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        try:
            fh = self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise StoreError(f"{key} is not in the store") from exc
        with fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def check(self) -> str | None:
        return None if self.root.is_dir() else f"the storage folder {self.root} does not exist"


class S3Store(Store):
    """An S3-compatible object store, through boto3 (its transfer manager streams a file in
    parts of :data:`PART_BYTES`, a few at once)."""

    def __init__(self, url: str) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"ROBUSTSCOPE_STORAGE_URL {url!r} names no bucket")
        self.url, self.bucket = url, parsed.netloc
        self.prefix = parsed.path.strip("/")
        # boto3 reads AWS_ENDPOINT_URL, the keys and the region from the environment itself.
        self.client: Any = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(multipart_threshold=PART_BYTES,
                                       multipart_chunksize=PART_BYTES, max_concurrency=4)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return str(code) in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, path: Path, keep: bool = False) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._name(key),
                                    Config=self.transfer)
        except Exception as exc:
            raise StoreError(f"could not store {key}: {exc}") from exc
        if not keep:
            path.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)
        except Exception as exc:
            raise StoreError(f"could not store {key}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
            data: bytes = body.read()
            return data
        except Exception as exc:
            if self._missing(exc):
                return None
            raise StoreError(f"could not read {key}: {exc}") from exc

    def download(self, key: str, dest: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._name(key), str(dest),
                                      Config=self.transfer)
        except Exception as exc:
            if self._missing(exc):
                raise StoreError(f"{key} is not in the store") from exc
            raise StoreError(f"could not read {key}: {exc}") from exc

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except Exception as exc:
            if self._missing(exc):
                raise StoreError(f"{key} is not in the store") from exc
            raise StoreError(f"could not read {key}: {exc}") from exc
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
            return True
        except Exception as exc:
            if self._missing(exc):
                return False
            raise StoreError(f"could not read {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise StoreError(f"could not delete {key}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        folder = self._name(prefix) + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        except Exception as exc:
            raise StoreError(f"could not delete {prefix}/: {exc}") from exc

    def check(self) -> str | None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            return f"the object store {self.url} cannot be reached: {exc}"
        return None


@lru_cache(maxsize=8)
def open_store(url: str, data_dir: Path) -> Store:
    """The store ``url`` names (empty: the data directory)."""
    if not url:
        return LocalStore(data_dir)
    scheme = urlparse(url).scheme
    if scheme == "file":
        return LocalStore(Path(urlparse(url).path), url)
    if scheme == "s3":
        return S3Store(url)
    raise ValueError(f"ROBUSTSCOPE_STORAGE_URL must be empty, file:///path or s3://bucket/"
                     f"prefix, not {url!r}")


def same_folder(store: Store, local: Path, key: str) -> bool:
    """Whether ``key``'s file in ``store`` is the local path ``local`` itself."""
    own = store.local_path(key)
    return own is not None and own.resolve() == local.resolve()


class BlobCache:
    """Checkpoints and datasets a worker fetched from the store, by content hash.

    Each file is downloaded once to a temporary name, its SHA-256 checked against the one the
    service recorded when it stored it, and renamed to its hash; a mismatch is an error and
    nothing is kept. Past ``limit`` bytes the least recently used files are removed first (a
    job that holds one keeps it: the jail's input is a hard link)."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        self._lock = threading.Lock()

    def path(self, store: Store, key: str, sha256: str | None) -> Path:
        """The local file of ``key``: the store's own file where the store is a local folder,
        else this cache's copy (fetched if missing)."""
        own = store.local_path(key)
        if own is not None:
            if not own.is_file():
                raise StoreError(f"{key} is not in the store")
            return own
        if sha256 is None or not _SHA256.match(sha256):
            raise StoreError(f"{key} has no recorded content hash to verify it by")
        return self._fetch(store, key, sha256)

    def _fetch(self, store: Store, key: str, sha256: str) -> Path:
        dest = self.root / sha256[:2] / sha256
        if dest.is_file():
            os.utime(dest)  # most recently used
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".fetch-{uuid.uuid4().hex}.tmp"
        try:
            store.download(key, tmp)
            got = file_sha256(tmp)
            if got != sha256:
                raise StoreError(f"{key} in the store does not match its recorded hash "
                                 f"(sha256 {got[:12]}…, expected {sha256[:12]}…)")
            size = tmp.stat().st_size
            if size > self.limit:
                raise StoreError(f"{key} ({size} bytes) is larger than this worker's cache "
                                 f"(ROBUSTSCOPE_CACHE_BYTES={self.limit})")
            with self._lock:
                self._make_room(size)
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for path in self.root.glob("??/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, st.st_size, path))
        return sorted(found)

    def _make_room(self, incoming: int) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total + incoming <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size

    def usage(self) -> int:
        return sum(size for _, size, _ in self._entries())


class StateMirror:
    """A job's resumable state kept in the store, so that another worker, with its own local
    folder, resumes where a lost one stopped.

    The files are stored by content hash under the job's folder (``state/<job id>/<sha256>``)
    with a manifest (``manifest.json``: relative path -> hash), written after the files it
    names. Where the store is the data directory itself the state already is in place and
    the mirror does nothing."""

    def __init__(self, store: Store, prefix: str, local: Path) -> None:
        self.store, self.prefix, self.local = store, check_key(prefix), local
        self.active = not same_folder(store, local, prefix)
        self.manifest: dict[str, str] = {}
        self.seen: dict[str, tuple[int, int]] = {}

    def _files(self) -> dict[str, tuple[int, int]]:
        if not self.local.is_dir():
            return {}
        found = {}
        for path in self.local.rglob("*"):
            if path.is_file() and not path.is_symlink() and ".tmp" not in path.name:
                st = path.stat()
                found[path.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found

    def pull(self) -> int:
        """Bring the stored state into the local folder; returns how many files came."""
        if not self.active:
            return 0
        raw = self.store.get_bytes(f"{self.prefix}/manifest.json")
        self.manifest = {} if raw is None else dict(json.loads(raw))
        came = 0
        for rel, sha in self.manifest.items():
            parts = PurePosixPath(rel).parts
            if (not parts or PurePosixPath(rel).is_absolute() or ".." in parts
                    or not _SHA256.match(sha)):
                raise StoreError(f"the stored state of {self.prefix} names a bad file {rel!r}")
            dest = self.local.joinpath(*parts)
            if dest.is_file() and file_sha256(dest) == sha:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
            try:
                self.store.download(f"{self.prefix}/{sha}", tmp)
                if file_sha256(tmp) != sha:
                    raise StoreError(f"the stored state file {rel} does not match its hash")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            came += 1
        self.seen = self._files()
        return came

    def push(self) -> int:
        """Store the local files that changed since the last push or pull; returns how many."""
        if not self.active:
            return 0
        changed = [(rel, key) for rel, key in self._files().items() if self.seen.get(rel) != key]
        for rel, key in changed:
            path = self.local / rel
            sha = file_sha256(path)
            if self.manifest.get(rel) != sha:
                self.store.put_file(f"{self.prefix}/{sha}", path, keep=True)
                self.manifest[rel] = sha
            self.seen[rel] = key
        if changed:
            self.store.put_bytes(f"{self.prefix}/manifest.json",
                                 json.dumps(self.manifest, sort_keys=True).encode())
        return len(changed)

    def clear(self) -> None:
        if self.active:
            self.store.delete_prefix(self.prefix)
