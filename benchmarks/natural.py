"""Seconds per 1000 images for each natural-axis benchmark, with their default parameters.

    uv run python benchmarks/natural.py [--n 400] [--dataset waterbirds-32] [--threads 2]

The model is the engine's ``small_cnn`` (untrained: the time does not depend on the weights);
``spurious_shift`` redraws the split at three correlations, so it evaluates 3x the images.
"""

from __future__ import annotations

import argparse
import time

import torch

from workers.engine import benchmarks
from workers.engine.data import load_builtin
from workers.engine.models import Normalized, build
from workers.engine.types import RunContext

SUITE = ("clean", "fg_bg_noise", "backgrounds", "groups", "corruptions", "spurious_shift")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--dataset", default="waterbirds-32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_builtin(args.dataset, "test")
    data = data.subset(torch.arange(min(args.n, len(data))))
    c = data.x.shape[1]
    model = Normalized(build("small_cnn", len(data.class_names), c), None, None, c)
    model = model.to(device).eval()
    ctx = RunContext(device=device, amp=device.type == "cuda")
    print(f"{args.dataset}, {len(data)} images, small_cnn, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'benchmark':<16}{'seconds':>10}{'s / 1000 images':>18}")
    for name in SUITE:
        start = time.perf_counter()
        benchmarks.run(model, data, benchmarks.parse({"benchmark": name}), ctx)
        took = time.perf_counter() - start
        print(f"{name:<16}{took:>10.2f}{1000 * took / len(data):>18.2f}")


if __name__ == "__main__":
    main()
