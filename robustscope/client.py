"""``robustscope evaluate``: submit a checkpoint from a pipeline, follow it, gate on thresholds
and on a baseline.

Exit codes: 0 success, 1 the job failed or was cancelled, 2 the command line is wrong (a
missing file, a malformed ``--min``, no baseline to compare with), 3 a ``--min`` threshold was
not met or a ``--max-drop`` was exceeded (significantly), 4 the server refused the request or
could not be reached.

A checkpoint this owner already uploaded (same sha256, same metadata) is not uploaded again: the
evaluation names the existing model.

``--min`` takes ``[BENCHMARK.]METRIC[@KEY=VALUE[,KEY=VALUE...]]=MINIMUM``:

- ``clean.accuracy=0.9``: every row of benchmark ``clean`` with metric ``accuracy``;
- ``robust_accuracy=0.4``: a bare metric must belong to exactly one benchmark of the job (a name
  two benchmarks report, such as ``accuracy`` with ``clean`` and ``groups``, fails as ambiguous);
- ``adversarial.robust_accuracy@norm=linf,eps=0.0314=0.4``: only rows whose params hold those
  values (numbers compared as numbers).

Every row a threshold selects must reach the minimum, and a threshold that selects no row fails.

``--baseline EVALUATION_ID`` (or ``model:NAME``: the newest succeeded evaluation of that model
name with the same dataset, suite, split, seed and ``--n-examples``) compares the new
evaluation with it on the same examples; ``--max-drop SELECTOR=DROP`` (the selector of
``--min``) fails when a selected metric is worse than the baseline's by more than DROP and
McNemar's exact test says so at the 5% level (docs/METRICS.md, "Uncertainty"). Any gate
(``--min``, ``--baseline``, ``--format``) waits for the result.

The checkpoint may be a file, or ``models:/NAME/VERSION`` of an MLflow model registry (the
``mlflow`` extra): the version's artifacts must hold a TorchScript or torch.export file.
``--mlflow-run RUN_ID`` (or ``MLFLOW_RUN_ID``; a new run when only ``MLFLOW_EXPERIMENT_NAME``
or ``MLFLOW_EXPERIMENT_ID`` is set) logs every result, the suite, the report page and the
record to that run, at ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from contract.jobs import FINAL_STATES, JobStatus
from robustscope import gate, mlflow_log

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


def parse_thresholds(items: list[str], option: str = "--min",
                     example: str = "MINIMUM (e.g. clean.accuracy=0.9)") -> list[Threshold]:
    usage = f"{option} takes [BENCHMARK.]METRIC[@KEY=VALUE,...]={example}, not {{!r}}"
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
           suite: Any, seed: int, public: bool, **extra: Any) -> dict[str, Any]:
    """Evaluate ``checkpoint``: against the model already uploaded with these bytes and
    metadata, or uploading it in the same call. ``extra``: ``n_examples``, ``split``,
    ``dataset_params`` (left out when None)."""
    fields = {"dataset": dataset, "suite": suite, "seed": seed, "public": public,
              **{k: v for k, v in extra.items() if v is not None}}
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


def check_thresholds(job: dict[str, Any], thresholds: list[Threshold]) -> list[str]:
    """What the job's results fail of ``thresholds`` (see the module's docstring)."""
    return [f for case in gate.threshold_cases(job, thresholds) for f in case.failures]


def dataset_params(value: str | None) -> dict[str, Any] | None:
    """``--dataset-params``: a JSON object, or a JSON/YAML file holding one."""
    if value is None:
        return None
    try:
        params = json.loads(value) if value.lstrip().startswith("{") else (
            load_structured(value) if Path(value).exists() else None)
    except ValueError as exc:
        raise ClientError(f"--dataset-params is not valid JSON: {exc}", EXIT_USAGE) from exc
    if not isinstance(params, dict):
        raise ClientError("--dataset-params takes a JSON object (e.g. '{\"correlation\": "
                          "0.8}') or a file holding one", EXIT_USAGE)
    return params


SAME_EXAMPLES = ("dataset", "dataset_params", "split", "seed", "n_examples")


def find_baseline(client: httpx.Client, job: dict[str, Any], baseline: str) -> str:
    """The evaluation id ``--baseline`` names: an id as it is, or for ``model:NAME`` the
    newest succeeded evaluation of that model name that ran the same suite on the same
    examples (never the job itself)."""
    if not baseline.startswith("model:"):
        return baseline
    name = baseline.removeprefix("model:")
    cursor = None
    for _ in range(100):  # at most 10 000 evaluations, newest first
        query = {"status": JobStatus.SUCCEEDED.value, "dataset": job["dataset"], "model_name": name,
                 "limit": 100, **({"cursor": cursor} if cursor else {})}
        resp = client.get("/evaluations", params=query)
        if resp.status_code != 200:
            raise ClientError(f"could not list evaluations: {_problem(resp)}")
        page = resp.json()
        for ev in page["items"]:
            if (ev["id"] != job["id"] and ev["model_name"] == name and ev["suite"] == job["suite"]
                    and all(ev.get(k) == job.get(k) for k in SAME_EXAMPLES)):
                return str(ev["id"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    raise ClientError(
        f"no succeeded evaluation of model {name!r} ran this suite on the same examples "
        f"(dataset {job['dataset']}, split {job['split']}, seed {job['seed']}, n_examples "
        f"{job.get('n_examples')}); evaluate the baseline that way first", EXIT_USAGE)


def compare(client: httpx.Client, job_id: str, baseline_id: str) -> dict[str, Any]:
    resp = client.get(f"/evaluations/{job_id}/compare", params={"baseline": baseline_id})
    if resp.status_code != 200:
        raise ClientError(f"could not compare with baseline {baseline_id}: {_problem(resp)}")
    out: dict[str, Any] = resp.json()
    return out


@dataclass(frozen=True)
class Gate:
    """What ``robustscope evaluate`` checks and writes once the job has run."""

    thresholds: list[str] = field(default_factory=list)  # --min
    baseline: str | None = None  # --baseline
    max_drops: list[str] = field(default_factory=list)  # --max-drop
    fmt: str = "text"  # --format: text, json or junit
    output: Path | None = None  # --output
    mlflow_run: str | None = None  # --mlflow-run

    @property
    def waits(self) -> bool:
        return bool(self.thresholds or self.baseline or self.max_drops or self.fmt != "text"
                    or self.output or self.mlflow_run)


@contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[Path]:
    """A checkpoint file, or a model of an MLflow registry (``models:/NAME/VERSION``)
    downloaded for the time of the call."""
    if not checkpoint.startswith("models:/"):
        yield Path(checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="robustscope-mlflow-") as tmp:
        try:
            yield mlflow_log.download_model(checkpoint, Path(tmp))
        except (RuntimeError, ValueError) as exc:
            raise ClientError(str(exc), EXIT_USAGE) from exc


def evaluate(server: str, api_key: str | None, checkpoint: str, metadata_file: Path,
             dataset: str, suite: str, seed: int, public: bool, do_wait: bool,
             thresholds: list[str], interval: float = 1.0, *, n_examples: int | None = None,
             split: str | None = None, params: str | None = None,
             gating: Gate | None = None) -> int:
    started = time.monotonic()
    g = replace(gating or Gate(), thresholds=thresholds)
    if not api_key:
        raise ClientError("pass --api-key or set ROBUSTSCOPE_API_KEY", EXIT_USAGE)
    if not metadata_file.is_file():
        raise ClientError(f"no such metadata file: {metadata_file}", EXIT_USAGE)
    metadata = load_structured(str(metadata_file))
    if not isinstance(metadata, dict):
        raise ClientError(f"{metadata_file} must hold a JSON object of model metadata",
                          EXIT_USAGE)
    limits = parse_thresholds(g.thresholds)
    drops = parse_thresholds(g.max_drops, "--max-drop", "DROP (e.g. clean.accuracy=0.02)")
    if drops and not g.baseline:
        raise ClientError("--max-drop needs --baseline", EXIT_USAGE)
    if g.fmt not in ("text", "json", "junit"):
        raise ClientError(f"--format is text, json or junit, not {g.fmt!r}", EXIT_USAGE)
    extra = {"n_examples": n_examples, "split": split, "dataset_params": dataset_params(params)}
    suite_value = load_structured(suite)
    with local_checkpoint(checkpoint) as path:
        if not path.is_file():
            raise ClientError(f"no such checkpoint file: {path}", EXIT_USAGE)
        headers = {"Authorization": f"Bearer {api_key}"}
        try:
            with httpx.Client(base_url=server, headers=headers, timeout=120) as client:
                job = submit(client, path, metadata, dataset, suite_value, seed, public,
                             **extra)
                report_url = f"{server.rstrip('/')}/evaluations/{job['id']}/report"
                sys.stderr.write(f"evaluation {job['id']} {job['status']}: {report_url}\n")
                if not (do_wait or g.waits):
                    print(job["id"])
                    return 0
                job = wait(client, job["id"], interval, sys.stderr)
                comparison = None
                if g.baseline and job["status"] == JobStatus.SUCCEEDED:
                    comparison = compare(client, job["id"], find_baseline(client, job,
                                                                          g.baseline))
                report = client.get(f"/evaluations/{job['id']}/report").text
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {server}: {exc}") from exc
    cases = [gate.job_case(job), *gate.threshold_cases(job, limits)]
    if comparison is not None:
        cases += gate.drop_cases(comparison, drops)
    seconds = time.monotonic() - started
    text = {"text": lambda: gate.as_text(job, comparison, cases, report_url),
            "json": lambda: gate.as_json(job, comparison, cases, report_url),
            "junit": lambda: gate.as_junit(job, cases, report_url, seconds)}[g.fmt]()
    if g.output:
        g.output.write_text(text)
    else:
        sys.stdout.write(text)
    for c in job.get("checks", []):
        if not c.get("passed"):
            sys.stderr.write(f"sanity check flagged: {c['name']}: {c.get('detail', '')}\n")
    for case in cases:
        for f in case.failures:
            sys.stderr.write(f"{'threshold not met' if case.kind == 'threshold' else 'FAIL'}"
                             f": {f}\n")
    if job["status"] == JobStatus.SUCCEEDED and mlflow_log.wanted(g.mlflow_run):
        try:
            run = mlflow_log.log(g.mlflow_run, job, report, report_url)
        except Exception as exc:  # MLflow's own errors: a refused param, an unreachable server
            raise ClientError(f"could not log to MLflow: {type(exc).__name__}: {exc}") from exc
        sys.stderr.write(f"logged to MLflow run {run}\n")
    if job["status"] != JobStatus.SUCCEEDED:
        return EXIT_FAILED
    return EXIT_THRESHOLD if any(not c.passed for c in cases) else 0
