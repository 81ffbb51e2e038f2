"""``robustscope evaluate``: submit a checkpoint from a pipeline, follow it, gate on thresholds.

Exit codes: 0 success, 1 the job failed or was cancelled, 3 a ``--min`` threshold was not met,
4 the server refused the request or could not be reached.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

EXIT_FAILED, EXIT_THRESHOLD, EXIT_REQUEST = 1, 3, 4


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
        raise ClientError(f"no such file: {path_or_value}")
    return yaml.safe_load(path.read_text())  # YAML is a superset of JSON


def parse_thresholds(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ClientError(f"--min takes METRIC=VALUE (e.g. robust_accuracy=0.4), not {item!r}",
                              EXIT_REQUEST)
    return out


def _problem(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{resp.status_code} {body.get('title', '')}: {body.get('detail', resp.text)}"
    except ValueError:
        return f"{resp.status_code}: {resp.text[:500]}"


def submit(client: httpx.Client, checkpoint: Path, metadata: dict[str, Any], dataset: str,
           suite: Any, seed: int, public: bool) -> dict[str, Any]:
    spec = {"model": metadata, "dataset": dataset, "suite": suite, "seed": seed,
            "public": public}
    with checkpoint.open("rb") as f:
        resp = client.post("/evaluations", files={"checkpoint": (checkpoint.name, f)},
                           data={"spec": json.dumps(spec)})
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
        if job["status"] in ("succeeded", "failed", "cancelled"):
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


def check_thresholds(job: dict[str, Any], thresholds: list[tuple[str, float]]) -> list[str]:
    """Every result row a threshold names must reach it; ``benchmark.metric`` or ``metric``."""
    failures = []
    for name, minimum in thresholds:
        bench, _, metric = name.rpartition(".")
        rows = [r for r in job["results"]
                if r["metric"] == metric and (not bench or r["benchmark"] == bench)]
        if not rows:
            failures.append(f"{name}: no such result in this evaluation")
        for r in rows:
            if r["value"] < minimum:
                failures.append(f"{name} {r['params']}: {r['value']:.4f} < {minimum}")
    return failures


def evaluate(server: str, api_key: str | None, checkpoint: Path, metadata_file: Path,
             dataset: str, suite: str, seed: int, public: bool, do_wait: bool,
             thresholds: list[str], interval: float = 1.0) -> int:
    if not api_key:
        raise ClientError("pass --api-key or set ROBUSTSCOPE_API_KEY")
    metadata = load_structured(str(metadata_file))
    if not isinstance(metadata, dict):
        raise ClientError(f"{metadata_file} must hold a JSON object of model metadata")
    limits = parse_thresholds(thresholds)
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(base_url=server, headers=headers, timeout=120) as client:
            job = submit(client, checkpoint, metadata, dataset, load_structured(suite), seed,
                         public)
            sys.stderr.write(f"evaluation {job['id']} {job['status']}: "
                             f"{server.rstrip('/')}/evaluations/{job['id']}\n")
            if not do_wait:
                print(job["id"])
                return 0
            job = wait(client, job["id"], interval, sys.stderr)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {server}: {exc}") from exc
    if job["status"] != "succeeded":
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
