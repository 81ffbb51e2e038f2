"""Times the dataset ingest of N small PNGs (default 10 000 of 32x32) from a zip and a tar.gz.

    uv run python benchmarks/bench_ingest.py [N] [SIDE] [--masks]

Images are smooth patterns with mild noise (they compress about like photos; pure noise would
make the npz step look slower than real uploads make it). ``--masks`` adds one PNG mask each.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from service.datasets.ingest import IngestLimits, ingest


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def build(count: int, side: int, masks: bool) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    rows = ["path,label,split" + (",mask" if masks else "")]
    y, x = np.mgrid[0:side, 0:side]
    for i in range(count):
        phase = rng.random(3) * 6
        wave = np.sin(x[:, :, None] / 5 + y[:, :, None] / 7 + phase) * 100 + 128
        img = (wave + rng.normal(0, 6, (side, side, 3))).clip(0, 255).astype(np.uint8)
        files[f"img/{i}.png"] = _png(img)
        row = f"img/{i}.png,{i % 10},{'train' if i % 5 else 'test'}"
        if masks:
            files[f"mask/{i}.png"] = _png(
                ((x - side / 2) ** 2 + (y - side / 2) ** 2 < i % side**2) * np.uint8(255)
            )
            row += f",mask/{i}.png"
        rows.append(row)
    files["manifest.csv"] = "\n".join(rows).encode()
    return files


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    count = int(args[0]) if args else 10_000
    side = int(args[1]) if len(args) > 1 else 32
    masks = "--masks" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = build(count, side, masks)
        zpath = root / "d.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        tpath = root / "d.tar.gz"
        with tarfile.open(tpath, "w:gz") as tf:
            for name, data in files.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tf.addfile(member, io.BytesIO(data))
        for path in (zpath, tpath):
            started, cpu_started = time.perf_counter(), time.process_time()
            info = ingest(path, root / "out.npz", name="bench", limits=IngestLimits())
            took = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            print(
                f"{path.name}: {info.num_examples} images {side}x{side}"
                f"{' + masks' if masks else ''} in {took:.2f} s "
                f"= {info.num_examples / took:,.0f} images/s (npz included; "
                f"{cpu:.2f} s CPU = {info.num_examples / cpu:,.0f} images per CPU-second)"
            )


if __name__ == "__main__":
    main()
