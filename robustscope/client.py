"""``robustscope evaluate``: submit a checkpoint from a pipeline, follow it, gate on thresholds.

Exit codes: 0 success, 1 the job failed or was cancelled, 2 the command line is wrong (a
missing file, a malformed ``--min``), 3 a ``--min`` threshold was not met, 4 the server refused
the request or could not be reached.

A checkpoint this owner already uploaded (same sha256, same metadata) is not uploaded again: the
evaluation names the existing model.

``--min`` takes ``[BENCHMARK.]METRIC[@KEY=VALUE[,KEY=VALUE...]]=MINIMUM``:

- ``clean.accuracy=0.9``: every row of benchmark ``clean`` with metric ``accuracy``;
- ``robust_accuracy=0.4``: a bare metric must belong to exactly one benchmark of the job (a name
  two benchmarks report, such as ``accuracy`` with ``clean`` and ``groups``, fails as ambiguous);
- ``adversarial.robust_accuracy@norm=linf,eps=0.0314=0.4``: only rows whose params hold those
  values (numbers compared as numbers).

Every row a threshold selects must reach the minimum, and a threshold that selects no row fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from contract.jobs import FINAL_STATES, JobStatus

EXIT_FAILED, EXIT_USAGE, EXIT_THRESHOLD, EXIT_REQUEST = 1, 2, 3, 4


class ClientError(Exception):
    def __init__(self, message: str, code: int = EXIT_REQUEST) -> None:
        super().__init__(message)
        self.code = code


def load_structured(path_or_value: str) -> Any:
    """A JSON or YAML file, or a preset name such as ``standard``."""
    path = Path(path_or_value)
    if not path.exists():
        if path_or_value.replace("-", "").isalnum():
            return path_or_value
        raise ClientError(f"no such file: {path_or_value}", EXIT_USAGE)
    try:
        return yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ClientError(f"cannot read {path_or_value}: {exc}", EXIT_USAGE) from exc


@dataclass(frozen=True)
class Threshold:
    """One ``--min``: which result rows it selects and the value each must reach."""

    text: str
    benchmark: str | None
    metric: str
    params: tuple[tuple[str, str], ...]
    minimum: float

    def selects(self, row: dict[str, Any]) -> bool:
        if row["metric"] != self.metric:
            return False
        if self.benchmark is not None and row["benchmark"] != self.benchmark:
            return False
        return all(key in row["params"] and _same(row["params"][key], want)
                   for key, want in self.params)


def _same(have: Any, want: str) -> bool:
    try:
        return math.isclose(float(have), float(want), rel_tol=1e-6, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(have) == want


def parse_thresholds(items: list[str]) -> list[Threshold]:
    usage = ("--min takes [BENCHMARK.]METRIC[@KEY=VALUE,...]=MINIMUM "
             "(e.g. clean.accuracy=0.9), not {!r}")
    out = []
    for item in items:
        name, sep, value = item.rpartition("=")
        selector, _, filters = name.partition("@")
        bench, _, metric = selector.strip().rpartition(".")
        params = []
        for part in filter(None, filters.split(",")):
            key, eq, want = part.partition("=")
            if not eq or not key.strip():
                raise ClientError(usage.format(item), EXIT_USAGE)
            params.append((key.strip(), want.strip()))
        try:
            minimum = float(value)
        except ValueError:
            sep = ""
        if not sep or not metric or not math.isfinite(minimum if sep else 0.0):
            raise ClientError(usage.format(item), EXIT_USAGE)
        out.append(Threshold(item, bench or None, metric, tuple(params), minimum))
    return out


def _problem(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{resp.status_code} {body.get('title', '')}: {body.get('detail', resp.text)}"
    except ValueError:
        return f"{resp.status_code}: {resp.text[:500]}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_METADATA_FIELDS = ("name", "architecture", "num_classes", "input_shape", "mean", "std",
                    "class_names")


def uploaded_model(client: httpx.Client, checkpoint: Path,
                   metadata: dict[str, Any]) -> str | None:
    """The id of this owner's model with these exact bytes and metadata, if there is one."""
    resp = client.get("/models", params={"sha256": sha256_of(checkpoint), "limit": 100})
    if resp.status_code != 200:
        return None  # an older server without the filter: upload as before
    for model in resp.json()["items"]:
        fields = [k for k in _METADATA_FIELDS
                  if k != "architecture" or model["format"] == "safetensors"]
        if all(model.get(k) == metadata.get(k) for k in fields):
            return str(model["id"])
    return None


def submit(client: httpx.Client, checkpoint: Path, metadata: dict[str, Any], dataset: str,
           suite: Any, seed: int, public: bool) -> dict[str, Any]:
    """Evaluate ``checkpoint``: against the model already uploaded with these bytes and
    metadata, or uploading it in the same call."""
    fields = {"dataset": dataset, "suite": suite, "seed": seed, "public": public}
    model_id = uploaded_model(client, checkpoint, metadata)
    if model_id is not None:
        sys.stderr.write(f"reusing model {model_id} (same checkpoint and metadata)\n")
        resp = client.post("/evaluations", json={"model_id": model_id, **fields})
    else:
        with checkpoint.open("rb") as f:
            resp = client.post("/evaluations", files={"checkpoint": (checkpoint.name, f)},
                               data={"spec": json.dumps({"model": metadata, **fields})})
    if resp.status_code not in (200, 202):
        raise ClientError(f"the server refused the evaluation: {_problem(resp)}")
    job: dict[str, Any] = resp.json()
    return job


def wait(client: httpx.Client, job_id: str, interval: float, out: Any) -> dict[str, Any]:
    tty = out.isatty()
    last = ""
    while True:
        resp = client.get(f"/evaluations/{job_id}")
        if resp.status_code != 200:
            raise ClientError(f"could not read the evaluation: {_problem(resp)}")
        job: dict[str, Any] = resp.json()
        p = job["progress"]
        filled = int(30 * p["fraction"])
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {100 * p['fraction']:5.1f}% "
                f"{job['status']:<9} {p['stage']}: {p['message']}"[:120])
        if line != last:
            out.write(("\r" + line.ljust(120)) if tty else line + "\n")
            out.flush()
            last = line
        if job["status"] in FINAL_STATES:
            if tty:
                out.write("\n")
            return job
        time.sleep(interval)


def results_table(job: dict[str, Any]) -> str:
    rows = [("benchmark", "metric", "params", "value")]
    for r in job["results"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        rows.append((r["benchmark"], r["metric"], params, f"{r['value']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_thresholds(job: dict[str, Any], thresholds: list[Threshold]) -> list[str]:
    """What the job's results fail of ``thresholds`` (see the module's docstring)."""
    failures = []
    for t in thresholds:
        rows = [r for r in job["results"] if t.selects(r)]
        benches = sorted({r["benchmark"] for r in rows})
        if not rows:
            failures.append(f"{t.text}: no such result in this evaluation")
        elif t.benchmark is None and len(benches) > 1:
            names = " or ".join(f"{b}.{t.metric}" for b in benches)
            failures.append(f"{t.text}: ambiguous, {t.metric} is reported by {len(benches)} "
                            f"benchmarks; name one ({names})")
        else:
            failures.extend(f"{t.text} {r['params']}: {r['value']:.4f} < {t.minimum}"
                            for r in rows if r["value"] < t.minimum)
    return failures


def evaluate(server: str, api_key: str | None, checkpoint: Path, metadata_file: Path,
             dataset: str, suite: str, seed: int, public: bool, do_wait: bool,
             thresholds: list[str], interval: float = 1.0) -> int:
    if not api_key:
        raise ClientError("pass --api-key or set ROBUSTSCOPE_API_KEY", EXIT_USAGE)
    if not checkpoint.is_file():
        raise ClientError(f"no such checkpoint file: {checkpoint}", EXIT_USAGE)
    if not metadata_file.is_file():
        raise ClientError(f"no such metadata file: {metadata_file}", EXIT_USAGE)
    metadata = load_structured(str(metadata_file))
    if not isinstance(metadata, dict):
        raise ClientError(f"{metadata_file} must hold a JSON object of model metadata",
                          EXIT_USAGE)
    limits = parse_thresholds(thresholds)
    suite_value = load_structured(suite)
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=server, headers=headers, timeout=120) as client:
            job = submit(client, checkpoint, metadata, dataset, suite_value, seed, public)
            sys.stderr.write(f"evaluation {job['id']} {job['status']}: "
                             f"{server.rstrip('/')}/evaluations/{job['id']}\n")
            if not do_wait:
                print(job["id"])
                return 0
            job = wait(client, job["id"], interval, sys.stderr)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {server}: {exc}") from exc
    if job["status"] != JobStatus.SUCCEEDED:
        err = job.get("error") or {}
        sys.stderr.write(f"evaluation {job['status']}: {err.get('type', '')} "
                         f"{err.get('detail', '')}\n")
        return EXIT_FAILED
    print(results_table(job))
    failed_checks = [c for c in job.get("checks", []) if not c.get("passed")]
    for c in failed_checks:
        sys.stderr.write(f"sanity check flagged: {c['name']}: {c.get('detail', '')}\n")
    failures = check_thresholds(job, limits)
    for f in failures:
        sys.stderr.write(f"threshold not met: {f}\n")
    return EXIT_THRESHOLD if failures else 0
