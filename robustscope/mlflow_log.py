"""An evaluation into an MLflow run, and a registered MLflow model out of its registry (the
``mlflow`` extra: ``pip install 'robustscope[mlflow]'``).

Every result row becomes a metric with a name that depends only on the row's benchmark,
metric and parameters (:func:`metric_name`), so the same measurement of two checkpoints lands
under the same name in two runs and MLflow's run comparison lines them up. The suite and what
the examples were are the run's params; the report page and the evaluation record (JSON) are
its artifacts under ``robustscope/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

MAX_NAME = 250  # MLflow's longest metric name
_UNSAFE = re.compile(r"[^\w.\- /]")
ARTIFACT_DIR = "robustscope"


def metric_name(row: dict[str, Any]) -> str:
    """``benchmark/metric/key_value/...`` over the sorted params, in the characters MLflow
    allows (letters, digits, ``_ - . /`` and spaces); a name past 250 characters keeps its
    first 237 and a hash of the whole."""
    parts = [row["benchmark"], row["metric"]]
    for key, value in sorted(row["params"].items()):
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key}_{text}")
    name = "/".join(_UNSAFE.sub("-", p) for p in parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[:MAX_NAME - 13]}~{digest}"
    return name


def run_params(job: dict[str, Any]) -> dict[str, str]:
    """The run's params: what was evaluated, on which examples, with which suite entries."""
    out = {"robustscope.evaluation_id": str(job["id"]),
           "robustscope.model_name": str(job.get("model_name", "")),
           "robustscope.dataset": str(job["dataset"]), "robustscope.split": str(job["split"]),
           "robustscope.seed": str(job["seed"]),
           "robustscope.n_examples": str(job.get("n_examples")),
           "robustscope.dataset_params": json.dumps(job.get("dataset_params") or {},
                                                    sort_keys=True),
           "robustscope.engine_version": str(job.get("engine_version"))}
    for i, entry in enumerate(job["suite"]):
        out[f"robustscope.suite.{i}"] = json.dumps(entry, sort_keys=True)[:6000]
    return out


def _client() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise RuntimeError("MLflow is not installed: pip install 'robustscope[mlflow]'") from exc
    return MlflowClient()


def wanted(run_id: str | None) -> bool:
    """Whether to log: a run named on the command line or by MLflow's environment variables
    (``MLFLOW_RUN_ID``, or an experiment to start a run in)."""
    return bool(run_id or any(os.environ.get(v) for v in (
        "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")))


def _new_run(client: Any, job: dict[str, Any]) -> str:
    """A new run in ``MLFLOW_EXPERIMENT_ID`` or ``MLFLOW_EXPERIMENT_NAME`` (created when
    missing), named after the model."""
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not experiment_id:
        name = os.environ["MLFLOW_EXPERIMENT_NAME"]
        found = client.get_experiment_by_name(name)
        experiment_id = (found.experiment_id if found is not None
                         else client.create_experiment(name))
    run = client.create_run(experiment_id, run_name=f"robustscope {job.get('model_name', '')}")
    return str(run.info.run_id)


def log(run_id: str | None, job: dict[str, Any], report_html: str, report_url: str) -> str:
    """Every result as a metric, the suite as params, the report and the record as
    artifacts, to run ``run_id`` (else ``MLFLOW_RUN_ID``, else a new run) at
    ``MLFLOW_TRACKING_URI``; returns the run's id."""
    from mlflow.entities import Metric, Param

    client = _client()
    given = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    run_id = given or _new_run(client, job)
    now = int(time.time() * 1000)
    metrics = [Metric(metric_name(r), float(r["value"]), now, 0) for r in job["results"]]
    params = [Param(k, v) for k, v in run_params(job).items()]
    params.append(Param("robustscope.report", report_url))
    for start in range(0, max(len(metrics), len(params)), 100):  # MLflow's batch limits
        client.log_batch(run_id, metrics=metrics[start:start + 100],
                         params=params[start:start + 100])
    client.log_text(run_id, report_html, f"{ARTIFACT_DIR}/report.html")
    client.log_text(run_id, json.dumps(job, indent=2), f"{ARTIFACT_DIR}/evaluation.json")
    if given is None:  # a run of its own ends with the evaluation
        client.set_terminated(run_id)
    return run_id


def download_model(uri: str, into: Path) -> Path:
    """The TorchScript or torch.export file of a registered model (``models:/NAME/VERSION``),
    downloaded into ``into``. MLflow's own pytorch flavour pickles the model, which
    robustscope refuses: register a file written by ``torch.jit.save`` or
    ``torch.export.save`` (docs/CI.md, "MLflow")."""
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError as exc:
        raise RuntimeError("MLflow is not installed: pip install 'robustscope[mlflow]'") from exc
    root = Path(download_artifacts(artifact_uri=uri, dst_path=str(into)))
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    archives = [p for p in files if _is_zip(p) and p.suffix in (".pt", ".pt2", ".ts", ".zip")]
    if len(archives) != 1:
        names = ", ".join(str(p.relative_to(root)) for p in files[:20]) or "nothing"
        raise ValueError(
            f"{uri} should hold one TorchScript (.pt) or torch.export (.pt2) file; it holds "
            f"{names}. MLflow's pytorch flavour pickles the model, which robustscope refuses: "
            "log the file torch.jit.save or torch.export.save wrote, and register that")
    return archives[0]


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"
