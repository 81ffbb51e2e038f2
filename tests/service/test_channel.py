"""What leaves the jail, without a jail: the framed report channel and the file reader.

Each hostile input is built here: lines and frames the evaluator never writes, links and FIFOs
where the supervisor expects files."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from workers.sandbox import files
from workers.sandbox.protocol import MAX_FRAME, Decoder, ProtocolError, encode

ENTRY: dict[str, Any] = {
    "t": "entry", "index": 0, "seconds": 0.5, "artifacts": {},
    "rows": [{"benchmark": "clean", "metric": "accuracy", "value": 1.0, "params": {}}],
    "checks": [{"name": "c", "passed": True, "detail": "", "params": {}}]}
READY = {"t": "ready", "address_space": 1}
DONE = {"t": "done", "peak_address_space": 2}


def _feed(*chunks: bytes, kind: str = "evaluate") -> list[dict[str, Any]]:
    decoder = Decoder(kind)
    out = []
    for chunk in chunks:
        out += [m.model_dump() for m in decoder.feed(chunk)]
    decoder.close()
    return out


def test_frames_in_order_decode_even_split_byte_by_byte() -> None:
    stream = encode(READY) + encode(ENTRY) + encode(DONE)
    messages = _feed(*[stream[i:i + 1] for i in range(len(stream))])
    assert [m["t"] for m in messages] == ["ready", "entry", "done"]
    assert messages[1]["rows"][0]["value"] == 1.0


@pytest.mark.parametrize(("stream", "why"), [
    # The forgery that once won: JSON lines in the report pipe (read as a 2 GB length).
    ((json.dumps(READY) + "\n" + json.dumps(ENTRY) + "\n" + json.dumps(DONE) + "\n").encode(),
     "a frame of 2065855522 bytes"),
    (struct.pack(">I", MAX_FRAME + 1), f"a frame of {MAX_FRAME + 1} bytes"),
    (encode(READY) + struct.pack(">I", 5) + b"hello", "a frame that is not JSON"),
    (encode(READY) + encode({"t": "result", "value": 1.0}), "invalid message"),
    (encode(READY) + encode({**ENTRY, "index": "0"}), "entry.index"),
    (encode(READY) + encode({**ENTRY, "rows": [{**ENTRY["rows"][0], "value": "1.0"}]}),
     "entry.rows.0.value"),
    (encode(READY) + encode({**ENTRY, "extra": 1}), "entry.extra"),
    (encode(READY) + encode({"t": "error", "type": "worker-lost", "detail": "x"}),
     "error.type"),
    (encode(ENTRY), "a 'entry' message before 'ready'"),
    (encode(READY) + encode(READY), "a second 'ready' message"),
    (encode(READY) + encode({"t": "error", "type": "model-crashed", "detail": "x"})
     + encode(ENTRY) + encode(DONE), "a 'entry' message after the end of the job"),
    (encode(READY) + encode(DONE) + encode(DONE), "a 'done' message after the end"),
    (encode(READY) + encode({"t": "epoch", "history": []}), "a 'epoch' message in a 'evaluate'"),
    (encode(READY) + encode(ENTRY)[:-3], "the channel closed inside a frame"),
])
def test_anything_the_evaluator_does_not_write_is_refused(stream: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(why)):
        _feed(stream)


# --- files leave the jail as regular files, no link followed -------------------------------


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    root = tmp_path / "scratch"
    (root / "artifacts" / "entry-0").mkdir(parents=True)
    (root / "artifacts" / "entry-0" / "ok.txt").write_text("fine")
    return root


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret"
    path.write_text("HOST-SECRET")
    return path


def test_a_regular_file_is_copied(scratch: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "ok.txt"
    assert files.copy_out(scratch, "artifacts/entry-0/ok.txt", dst, 100) == 4
    assert dst.read_text() == "fine"


def test_a_link_as_the_file_is_refused(scratch: Path, secret: Path, tmp_path: Path) -> None:
    (scratch / "artifacts" / "entry-0" / "leak").symlink_to(secret)
    with pytest.raises(files.UnsafeFile, match="cannot be opened as a file"):
        files.copy_out(scratch, "artifacts/entry-0/leak", tmp_path / "x", 100)
    assert not (tmp_path / "x").exists()


def test_a_link_as_a_directory_is_refused(scratch: Path, secret: Path, tmp_path: Path) -> None:
    (scratch / "artifacts" / "entry-1").symlink_to(secret.parent)
    with pytest.raises(files.UnsafeFile, match="'entry-1' is not a directory"):
        files.copy_out(scratch, f"artifacts/entry-1/{secret.name}", tmp_path / "x", 100)
    # and the directory the supervisor reads from, swapped for a link
    os.rename(scratch / "artifacts", scratch / "old")
    (scratch / "artifacts").symlink_to(scratch / "old")
    with pytest.raises(files.UnsafeFile, match="'artifacts' is not a directory"):
        files.copy_out(scratch, "artifacts/entry-0/ok.txt", tmp_path / "x", 100)


def test_a_fifo_a_parent_path_and_a_large_file_are_refused(scratch: Path,
                                                           tmp_path: Path) -> None:
    os.mkfifo(scratch / "artifacts" / "entry-0" / "fifo")  # opening must not block
    with pytest.raises(files.UnsafeFile, match="not a regular file"):
        files.copy_out(scratch, "artifacts/entry-0/fifo", tmp_path / "x", 100)
    for rel in ("../host-secret", "/etc/passwd", "artifacts/./entry-0/ok.txt"):
        with pytest.raises(files.UnsafeFile, match="not a plain relative path"):
            files.copy_out(scratch, rel, tmp_path / "x", 100)
    with pytest.raises(files.UnsafeFile, match="4 bytes, over the limit of 3"):
        files.copy_out(scratch, "artifacts/entry-0/ok.txt", tmp_path / "x", 3)


def test_the_walk_never_follows_a_link(scratch: Path, secret: Path) -> None:
    assert [str(r) for r, _ in files.regular_files(scratch, "artifacts")] == [
        "entry-0/ok.txt"]
    assert list(files.regular_files(scratch, "missing")) == []
    (scratch / "artifacts" / "entry-0" / "sub").symlink_to(secret.parent)
    with pytest.raises(files.UnsafeFile, match="entry-0/sub is not a regular file"):
        list(files.regular_files(scratch, "artifacts"))
