"""What the sandbox costs a job: the same evaluation of an uploaded TorchScript model with the
model in the jailed engine child itself ("unsplit"), and with the model alone in its own
jailed model server that the child asks for logits and VJPs ("split", the default for
TorchScript and torch.export uploads; docs/SECURITY.md), against the same job in the worker's
own process (no sandbox).

The job is a clean pass and a short APGD-CE (``--steps``, at an eps small enough that every
example stays robust, so every step runs on the whole batch) on ``--examples`` images of
``shapes-32``, for a small CNN and ResNet-18 (the engine's CIFAR variants, untrained: speed
does not depend on the weights). Every job generates its dataset, in the worker's process as in
the jail (the in-process generator's cache is cleared before each run). Children (and servers)
are started ahead of their job, as the worker does, and handed it once they have finished
importing (no CPU used for ``--settle`` seconds); each job is timed from the moment it is
handed over to its ``done``.

Two measures per job: wall time, and CPU time (every thread of every process of the job: the
worker's own process, or the jail's child and its model server), which a busy machine disturbs
far less than wall time. Each column is the best of ``--repeats`` (unsplit and split runs
interleaved, so both see the same machine); "vs unsplit" is the split job's over the unsplit
one's.

    uv run python benchmarks/sandbox.py
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine import nets
from workers.engine.data import builtin
from workers.sandbox import child as engine_child
from workers.sandbox.config import JailConfig, probe
from workers.sandbox.jail import Child
from workers.sandbox.protocol import EvaluateJob, Report

META = {"name": "bench", "num_classes": 4, "input_shape": [3, 32, 32]}
MODELS = {"small CNN": nets.small_cnn, "ResNet-18": nets.resnet18_cifar}
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float


def _model(path: Path, build: Any) -> None:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(build(4, 3).eval()), buf)
    path.write_bytes(buf.getvalue())


def _job(model: str, state: str, artifacts: str, args: argparse.Namespace) -> EvaluateJob:
    suite: list[dict[str, Any]] = [
        {"benchmark": "clean"},
        {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf", "eps": [0.1 / 255],
         "steps": args.steps}]
    return EvaluateJob(kind="evaluate", suite=suite, completed=[], seed=0,
                       batch_size=args.batch_size, amp=False, model_path=model,
                       model_format="torchscript", model_metadata=META, dataset="shapes-32",
                       dataset_path=None, dataset_params={}, split="test",
                       n_examples=args.examples, class_map=None, state_dir=state,
                       artifact_dir=artifacts, threads=torch.get_num_threads(), device="cpu")


def in_process(root: Path, args: argparse.Namespace) -> Timing:
    messages: list[Report] = []
    builtin._arrays.cache_clear()  # generated in the job, as a jailed child does
    # A fresh state folder per run: the engine resumes from a kept state and would skip
    # the work a previous run finished.
    here = Path(tempfile.mkdtemp(dir=root))
    start, cpu = time.perf_counter(), time.process_time()
    engine_child.run_job(_job(str(root / "model.pt"), str(here / "state"),
                              str(here / "artifacts"), args), messages.append)
    timing = Timing(time.perf_counter() - start, time.process_time() - cpu)
    assert sum(m.t == "entry" for m in messages) == 2
    return timing


def _wait(child: Child, until: str) -> None:
    while True:
        messages = child.read(1.0)
        if messages is None:
            raise RuntimeError("the child died: " + child.log_tail())
        for m in messages:
            if m["t"] == "error":
                raise RuntimeError(str(m))
            if m["t"] == until:
                return


def _cpu(roots: list[int]) -> float:
    """CPU seconds of the processes ``roots`` and all their descendants (the jail's bwrap,
    its init and the Python inside), reaped children included."""
    parent: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parent[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    family, grew = set(roots), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    return sum(times.get(pid, 0) for pid in family) / TICKS


def _settle(roots: list[int], quiet: float, limit: float = 300.0) -> None:
    """Until the processes have used no CPU for ``quiet`` seconds (their imports are done)."""
    deadline = time.monotonic() + limit
    last, since = _cpu(roots), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.25)
        now = _cpu(roots)
        if now != last:
            last, since = now, time.monotonic()


def jailed(config: JailConfig, root: Path, args: argparse.Namespace) -> Timing:
    """One job in a child started ahead (and its model server, where ``config`` has one)."""
    child = Child(config)
    try:
        _wait(child, "ready")
        roots = [child.proc.pid] + ([child.server.proc.pid] if child.server else [])
        _settle(roots, args.settle)
        job = _job("/job/model", "/scratch/state", "/scratch/artifacts", args)
        cpu = _cpu(roots)
        start = time.perf_counter()
        (child.inputs / "model").hardlink_to(root / "model.pt")
        if child.server is not None:
            job = job.served(child.server.start(root / "model.pt", job.server_job(None),
                                                child.channel, 600.0))
        child.start(job)
        _wait(child, "done")
        # Read while both still run (the child exits after "done", the server after it).
        return Timing(time.perf_counter() - start, _cpu(roots) - cpu)
    finally:
        child.close()


def _ratio(a: float, b: float) -> str:
    return f"{b / a - 1:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds without CPU use by a started child and server (their "
                        "imports done) before their job is handed over")
    args = parser.parse_args()
    print(f"clean + APGD-CE ({args.steps} steps) on {args.examples} images, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads; seconds, best of "
          f"{args.repeats}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10} {'':<5} {'no sandbox':>10} {'unsplit':>8} {'split':>8} "
          f"{'vs unsplit':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unsplit = JailConfig(slot_root=root / "slots", model_server=False)
        split = JailConfig(slot_root=root / "slots", model_server=True)
        probe(unsplit)
        for name in args.models:
            build = MODELS[name]
            _model(root / "model.pt", build)
            in_process(root, args)  # first use: kernels and lazy imports warm up
            here = [in_process(root, args) for _ in range(args.repeats)]
            a, b = [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine
                a.append(jailed(unsplit, root, args))
                b.append(jailed(split, root, args))
            for measure in ("wall", "cpu"):
                h, u, s = (min(getattr(t, measure) for t in ts) for ts in (here, a, b))
                print(f"{name:<10} {measure:<5} {h:10.2f} {u:8.2f} {s:8.2f} "
                      f"{_ratio(u, s):>11}")
            (root / "model.pt").unlink()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
