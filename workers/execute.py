"""Running a job's work: in a jailed engine child that reports over a pipe (the supervisor
checks each report, copies the child's files out without following links and kills it on
cancel, time limit or a lost claim), or in this process where the sandbox is off. Resumable
state the child writes to its scratch directory is copied to ``state/`` (and the store) as it
appears, so a job whose worker was killed resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.exc import DBAPIError

from contract.jobs import JobErrorType, job_error
from core.objectstore import StateMirror, StoreError
from workers.engine.types import Cancelled
from workers.runtime import Runtime
from workers.sandbox import child as engine_child
from workers.sandbox import files
from workers.sandbox.jail import Child
from workers.sandbox.protocol import EvaluateJob, ProtocolError, Report, TrainJob
from workers.sandbox.remote import SERVER_EXITED
from workers.work import (
    JobFailed,
    LocalWork,
    Scratch,
    Supervision,
    TimeLimit,
    Work,
    sandbox_error,
    storage_error,
)

log = logging.getLogger("robustscope.worker")


def state_mirror(rt: Runtime, state_dir: Path) -> StateMirror:
    """The job's resumable state in the store (a no-op where the store is the data folder)."""
    prefix = state_dir.relative_to(rt.settings.data_dir).as_posix()
    return StateMirror(rt.store, prefix, state_dir)


def execute(rt: Runtime, sup: Supervision, work: Work | LocalWork) -> None:
    """Run the work in a jailed child, or in this process where the sandbox is off or the
    work is a :class:`LocalWork`. The job's state comes from the store first (another worker
    may have started it) and goes back with each report that depends on it, and with the
    heartbeat; the local copy is removed at the end."""
    if isinstance(work, LocalWork):
        work.run_here(sup)
        return
    mirror = state_mirror(rt, work.state_dir)
    try:
        mirror.pull()
        if rt.settings.sandbox == "off":
            _execute_here(rt, sup, work, mirror)
        else:
            _execute_jailed(rt, sup, work, mirror)
    except StoreError as exc:
        raise JobFailed(storage_error(exc)) from exc
    finally:
        if mirror.active:  # the store has it; this folder is the worker's own
            shutil.rmtree(work.state_dir, ignore_errors=True)


def _execute_here(rt: Runtime, sup: Supervision, work: Work, mirror: StateMirror) -> None:
    out = rt.settings.data_dir / "tmp" / f"{work.table.__tablename__}-{work.id}-{work.token}"
    artifacts = out / "artifacts"
    dirs: dict[str, Path] = getattr(work, "scratch_dirs", dict)()
    scratch = Scratch(state=work.state_dir, artifacts=artifacts, out=out,
                      host_artifacts=artifacts, host_out=out, dirs=dirs)
    job = work.describe({k: str(v) for k, v in work.inputs().items()}, scratch,
                        threads=torch.get_num_threads(), device=str(rt.device))

    pushed = time.monotonic()

    def emit(message: Report) -> None:
        # Validated as it was built: a report its model refuses raises in the engine, and
        # fails the job ``sandbox-error`` (engine_child.classify), as the jailed child's would.
        sup.check()
        checked = message.model_dump()
        nonlocal pushed
        if checked.get("t") in ("entry", "epoch", "trained") or (
                time.monotonic() - pushed > rt.settings.heartbeat_interval):
            mirror.push()  # the state that goes with this report first
            pushed = time.monotonic()
        _dispatch(sup, work, checked, scratch)

    try:
        engine_child.run_job(job, emit)
    except (Cancelled, TimeLimit, DBAPIError, JobFailed, StoreError):
        raise
    except Exception as exc:  # the model's (or the engine's) failure, as a typed error
        log.info("%s %s failed in the engine", work.table.__tablename__, work.id, exc_info=True)
        raise JobFailed(engine_child.classify(exc)) from exc
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _dispatch(sup: Supervision, work: Work, message: dict[str, Any], scratch: Scratch) -> None:
    if message.get("t") == "progress":
        low, span = getattr(work, "progress_span", (0.0, 1.0))
        sup.progress(low + span * float(message["fraction"]), str(message["stage"]),
                     str(message["message"]))
    else:
        work.handle(message, scratch)


def _execute_jailed(rt: Runtime, sup: Supervision, work: Work, mirror: StateMirror) -> None:
    child = rt.jail().take()
    try:
        for name, src in work.inputs().items():
            files.link_in(src, child.inputs / name)
        _copy_state_in(work.state_dir, child.scratch / "state")
        dirs: dict[str, Path] = getattr(work, "scratch_dirs", dict)()
        for name, src in dirs.items():
            _copy_state_in(src, child.scratch / "in" / name)
        sync = _StateSync(child.scratch, "state", work.state_dir, mirror)
        scratch = Scratch(state=Path("/scratch/state"), artifacts=Path("/scratch/artifacts"),
                          out=Path("/scratch/out"), host_artifacts=child.scratch / "artifacts",
                          host_out=child.scratch / "out", host_root=child.scratch,
                          dirs={name: Path("/scratch/in") / name for name in dirs})
        job = work.describe({k: f"/job/{k}" for k in work.inputs()}, scratch,
                            threads=torch.get_num_threads(), device=str(rt.device))
        # The jail adds the memory and pids limits its config says.
        child.start(_serve_model(rt, child, work, job))
        try:
            _supervise(rt, sup, work, child, scratch, sync)
        except JobFailed as exc:
            if child.server is None or exc.error.get("detail") != SERVER_EXITED:
                raise
            raise JobFailed(_died(child.server.exit_status())) from exc  # why it exited
    finally:
        child.close()


def _serve_model(rt: Runtime, child: Child, work: Work,
                 job: EvaluateJob | TrainJob) -> EvaluateJob | TrainJob:
    """An uploaded model's code runs in the child's model server, never in the child
    (docs/SECURITY.md); other jobs do not need the server. Returns the job as the child is
    given it."""
    if child.server is None:
        return job
    if not isinstance(job, EvaluateJob) or job.model_format == "safetensors":
        child.server.close()
        child.server = None
        return job
    return job.served(child.server.start(
        work.inputs()["model"], job.server_job(child.config.address_space()), child.channel,
        rt.settings.sandbox_model_timeout))


def _supervise(rt: Runtime, sup: Supervision, work: Work, child: Child, scratch: Scratch,
               sync: _StateSync) -> None:
    """Read the child's reports until it ends. Every report was validated by
    :meth:`Child.read`; a protocol violation kills the child and fails the job as
    ``sandbox-error``, and so does a child that exits before it said it was ready (the
    jail itself could not start it)."""
    error: dict[str, str] | None = None
    done = False
    recorded: float | None = None  # when the job's outcome was written (a training's model)
    last_sync = time.monotonic()
    while True:
        try:
            if recorded is None:
                sup.check()
            elif time.monotonic() - recorded > 30:  # it had its say; it may not linger
                child.kill()
        except BaseException:
            child.kill()
            raise
        try:
            messages = child.read(0.25)
        except ProtocolError as exc:
            child.kill()
            log.warning("engine child of %s %s broke the protocol: %s; its log ends: %s",
                        work.table.__tablename__, work.id, exc, child.log_tail(800))
            raise JobFailed(sandbox_error(f"the engine child broke the report protocol: {exc}")
                            ) from exc
        if messages is None:
            break
        for message in messages:
            kind = message["t"]
            if kind == "error":
                error = job_error(message["type"], message["detail"])
            elif kind == "done":
                done = True
            elif kind != "ready":
                if kind in ("entry", "epoch", "trained"):
                    _sync_or_kill(sync, child)  # the state that goes with this report first
                _dispatch_or_kill(sup, work, message, scratch, child)
                if kind == "trained":  # the success is written: the job is no longer running
                    recorded = time.monotonic()
        if (done or error is not None) and not child.alive():
            break
        if time.monotonic() - last_sync > rt.settings.heartbeat_interval:
            _sync_or_kill(sync, child)
            _check_scratch(rt, child)
            last_sync = time.monotonic()
    status = child.exit_status()
    if recorded is not None:
        if error is not None or not done:
            log.warning("engine child of %s %s ended badly after its outcome was recorded: %s",
                        work.table.__tablename__, work.id, error or f"status {status}")
        return
    if error is not None:
        raise JobFailed(error)
    if not done:
        tail = child.log_tail(800)
        log.warning("engine child of %s %s died: status %s; its log ends: %s",
                    work.table.__tablename__, work.id, status, tail)
        if not child.ready:
            raise JobFailed(_jail_failed(status, tail))
        raise JobFailed(_died(status))


def _check_scratch(rt: Runtime, child: Child) -> None:
    """``/scratch`` is the data directory's disk (RAM where that is a tmpfs), not one of the
    jail's sized mounts: what the job wrote there is counted, and past the limit it fails."""
    used = files.usage(child.scratch)
    if used > rt.settings.sandbox_scratch_limit:
        child.kill()
        raise JobFailed(job_error(JobErrorType.DISK_QUOTA, (
            f"the job wrote {used} bytes to its scratch directory, more than the "
            f"limit of {rt.settings.sandbox_scratch_limit}")))


def _sync_or_kill(sync: _StateSync, child: Child) -> None:
    try:
        sync.run()
    except BaseException:
        child.kill()
        raise


def _jail_failed(status: int | None, log_tail: str) -> dict[str, str]:
    """The child exited before it was ready: the jail (bubblewrap) or the engine's imports
    failed, not the user's model. bubblewrap's own message names the cause."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if line.startswith("bwrap:")), None)
    if cause is None and lines:
        cause = lines[-1]
    detail = "the jail could not start the engine"
    if cause:
        detail += f": {engine_child.strip_paths(cause)}"
    return sandbox_error(f"{detail} (status {status})")


def _dispatch_or_kill(sup: Supervision, work: Work, message: dict[str, Any], scratch: Scratch,
                      child: Child) -> None:
    try:
        _dispatch(sup, work, message, scratch)
    except BaseException:
        child.kill()
        raise


def _died(status: int | None) -> dict[str, str]:
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        if -status == signal.SIGKILL:
            return job_error(JobErrorType.OUT_OF_MEMORY,
                             "the model's process was killed (SIGKILL), most likely for "
                             "running out of memory")
        return job_error(JobErrorType.MODEL_CRASHED, f"the model's process died ({name})")
    return job_error(JobErrorType.MODEL_CRASHED,
                     f"the model's process exited without a result (status {status})")


def _copy_state_in(src: Path, dst: Path) -> None:
    """The job's resumable state (written by earlier attempts' syncs) into the new child's
    scratch, regular files only."""
    if not src.is_dir():
        return
    for rel, st in files.regular_files(src):
        files.copy_out(src, rel, dst / rel, st.st_size)


class _StateSync:
    """Copies the child's finished state files (``root/sub``) to ``dst`` as they appear
    (temporary files are skipped), never through a link: a link, FIFO or device in the
    child's state fails the job as ``sandbox-error``, and so does a file over the cap."""

    MAX_BYTES = 4 << 30

    def __init__(self, root: Path, sub: str, dst: Path, mirror: StateMirror) -> None:
        self.root, self.sub, self.dst, self.mirror = root, sub, dst, mirror
        self.seen: dict[str, tuple[int, int]] = dict(self._files())

    def _files(self) -> list[tuple[str, tuple[int, int]]]:
        try:
            return [(str(rel), (st.st_size, st.st_mtime_ns))
                    for rel, st in files.regular_files(self.root, self.sub)
                    if ".tmp" not in rel.name]
        except (files.UnsafeFile, OSError) as exc:
            raise JobFailed(sandbox_error(f"the job's state was refused: {exc}")) from exc

    def run(self) -> None:
        for rel, key in self._files():
            if self.seen.get(rel) == key:
                continue
            try:
                files.copy_out(self.root, f"{self.sub}/{rel}", self.dst / rel, self.MAX_BYTES)
            except FileNotFoundError:
                continue  # replaced while we looked (the engine writes and renames)
            except (files.UnsafeFile, OSError) as exc:
                raise JobFailed(sandbox_error(f"the job's state was refused: {exc}")) from exc
            self.seen[rel] = key
        self.mirror.push()
