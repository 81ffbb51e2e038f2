"""What the sandbox costs a job: the same small evaluation in the worker's own process, in a
child started ahead of time (the default), and in a child started for the job.

The job is the clean pass of a small TorchScript CNN on ``shapes-32``'s test split (400
images), so that the engine's own work is small and the overhead shows. Each row is the best
of ``--repeats`` (the machine may be shared); "overhead" is the row's time minus the in-process
time. The warm child's time starts when its job is handed over (its torch import happened
while the previous job ran); the cold child's time includes starting bubblewrap and importing
torch.

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
from torch import nn

from workers.sandbox import child as engine_child
from workers.sandbox.jail import Child, JailConfig, probe


def _model(path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    path.write_bytes(buf.getvalue())


def _job(model: str, state: str, artifacts: str) -> dict[str, Any]:
    return {"kind": "evaluate", "suite": [{"benchmark": "clean"}], "completed": [], "seed": 0,
            "batch_size": 256, "amp": False, "model_path": model, "model_format": "torchscript",
            "model_metadata": {"name": "tiny", "num_classes": 4, "input_shape": [3, 32, 32]},
            "dataset": "shapes-32", "dataset_path": None, "dataset_params": {}, "split": "test",
            "state_dir": state, "artifact_dir": artifacts,
            "threads": torch.get_num_threads(), "device": "cpu"}


def in_process(root: Path) -> float:
    messages: list[dict[str, Any]] = []
    start = time.perf_counter()
    engine_child.run_job(_job(str(root / "model.pt"), str(root / "state"),
                              str(root / "artifacts")), messages.append)
    assert any(m["t"] == "entry" for m in messages)
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


def jailed(config: JailConfig, root: Path, warm: bool) -> float:
    start = time.perf_counter()
    child = Child(config)
    try:
        if warm:
            _wait(child, "ready")
            start = time.perf_counter()
        (child.inputs / "model").hardlink_to(root / "model.pt")
        child.start(_job("/job/model", "/scratch/state", "/scratch/artifacts"))
        _wait(child, "done")
        return time.perf_counter() - start
    finally:
        child.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _model(root / "model.pt")
        config = JailConfig(slot_root=root / "slots")
        probe(config)
        in_process(root)  # first use: the dataset generator and kernels warm up
        rows = {
            "in the worker's process": min(in_process(root) for _ in range(args.repeats)),
            "jailed, child started ahead": min(jailed(config, root, True)
                                               for _ in range(args.repeats)),
            "jailed, child started for the job": min(jailed(config, root, False)
                                                     for _ in range(args.repeats)),
        }
    base = rows["in the worker's process"]
    print(f"{'clean pass, 400 images, small CNN':<36} {'seconds':>8} {'overhead':>9}")
    for name, seconds in rows.items():
        print(f"{name:<36} {seconds:8.2f} {seconds - base:+9.2f}")


if __name__ == "__main__":
    main()
