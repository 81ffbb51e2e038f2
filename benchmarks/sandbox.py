"""What the sandbox costs a job: the same evaluation of an uploaded TorchScript model with the
model in the jailed engine child itself ("unsplit"), and with the model alone in its own
jailed model server that the child asks for logits and VJPs ("split", the default for
TorchScript and torch.export uploads; docs/SECURITY.md), against the same job in the worker's
own process (no sandbox).

The job is a clean pass and a short APGD-CE (``--steps``, at an eps small enough that every
example stays robust, so every step runs on the whole batch) on ``--examples`` images of
``shapes-32``, for a small CNN and ResNet-18 (the engine's CIFAR variants, untrained: speed
does not depend on the weights). Children (and servers) are started ahead of their job, as the
worker does, and timed from the moment the job is handed over to its ``done``. Each row is the
best of ``--repeats`` (the machine may be shared); "vs unsplit" is the split job's time over
the unsplit one's.

    uv run python benchmarks/sandbox.py
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workers.engine import nets
from workers.sandbox import child as engine_child
from workers.sandbox.jail import Child, JailConfig, probe

META = {"name": "bench", "num_classes": 4, "input_shape": [3, 32, 32]}
MODELS = {"small CNN": nets.small_cnn, "ResNet-18": nets.resnet18_cifar}


def _model(path: Path, build: Any) -> None:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(build(4, 3).eval()), buf)
    path.write_bytes(buf.getvalue())


def _job(model: str, state: str, artifacts: str, args: argparse.Namespace) -> dict[str, Any]:
    suite = [{"benchmark": "clean"},
             {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf",
              "eps": [0.1 / 255], "steps": args.steps}]
    return {"kind": "evaluate", "suite": suite, "completed": [], "seed": 0,
            "batch_size": args.batch_size, "amp": False, "model_path": model,
            "model_format": "torchscript", "model_metadata": META, "dataset": "shapes-32",
            "dataset_path": None, "dataset_params": {}, "split": "test",
            "n_examples": args.examples, "class_map": None, "state_dir": state,
            "artifact_dir": artifacts, "threads": torch.get_num_threads(), "device": "cpu"}


def in_process(root: Path, args: argparse.Namespace) -> float:
    messages: list[dict[str, Any]] = []
    start = time.perf_counter()
    engine_child.run_job(_job(str(root / "model.pt"), str(root / "state-here"),
                              str(root / "artifacts-here"), args), messages.append)
    assert sum(m["t"] == "entry" for m in messages) == 2
    return time.perf_counter() - start


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


def jailed(config: JailConfig, root: Path, args: argparse.Namespace) -> float:
    """One job in a child started ahead (and its model server, where ``config`` has one)."""
    child = Child(config)
    try:
        _wait(child, "ready")
        time.sleep(args.settle)  # the server imports torch alongside the child: let it finish
        job = _job("/job/model", "/scratch/state", "/scratch/artifacts", args)
        start = time.perf_counter()
        (child.inputs / "model").hardlink_to(root / "model.pt")
        if child.server is not None:
            spec = {k: job[k] for k in ("model_format", "model_metadata", "threads", "device")}
            job["model_server"] = child.server.start(root / "model.pt", spec, child.channel,
                                                     600.0)
        child.start(job)
        _wait(child, "done")
        return time.perf_counter() - start
    finally:
        child.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds a started child and server are given to import torch")
    args = parser.parse_args()
    print(f"clean + APGD-CE ({args.steps} steps) on {args.examples} images, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads; seconds, best of "
          f"{args.repeats}")
    print(f"{'model':<10} {'no sandbox':>10} {'unsplit':>8} {'split':>8} {'vs unsplit':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unsplit = JailConfig(slot_root=root / "slots", model_server=False)
        split = JailConfig(slot_root=root / "slots", model_server=True)
        probe(unsplit)
        for name in args.models:
            build = MODELS[name]
            _model(root / "model.pt", build)
            in_process(root, args)  # first use: the dataset generator and kernels warm up
            here = min(in_process(root, args) for _ in range(args.repeats))
            a, b = [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine
                a.append(jailed(unsplit, root, args))
                b.append(jailed(split, root, args))
            print(f"{name:<10} {here:10.2f} {min(a):8.2f} {min(b):8.2f} "
                  f"{min(b) / min(a) - 1:+11.1%}")
            (root / "model.pt").unlink()


if __name__ == "__main__":
    main()
