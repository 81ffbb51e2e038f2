"""``robustscope evaluate`` without a server: usage errors, threshold matching, reuse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from robustscope import client
from robustscope.cli import main

ROWS = [
    {"benchmark": "clean", "metric": "accuracy", "value": 0.9, "params": {}},
    {"benchmark": "groups", "metric": "accuracy", "value": 0.5, "params": {"group": "a"}},
    {"benchmark": "groups", "metric": "accuracy", "value": 0.7, "params": {"group": "b"}},
    {"benchmark": "adversarial", "metric": "robust_accuracy", "value": 0.4,
     "params": {"attack": "pgd", "norm": "linf", "eps": 0.0314}},
    {"benchmark": "adversarial", "metric": "robust_accuracy", "value": 0.2,
     "params": {"attack": "pgd", "norm": "l2", "eps": 0.5}},
]
JOB = {"results": ROWS}


def failures(*specs: str) -> list[str]:
    return client.check_thresholds(JOB, client.parse_thresholds(list(specs)))


def test_qualified_metric_selects_only_its_benchmark() -> None:
    assert failures("clean.accuracy=0.9") == []
    assert failures("clean.accuracy=0.91") == ["clean.accuracy 0.9000 < 0.91"]


def test_bare_metric_reported_by_two_benchmarks_is_ambiguous() -> None:
    [msg] = failures("accuracy=0.1")
    assert msg == ("accuracy=0.1: ambiguous, accuracy is reported by 2 benchmarks; name one "
                   "(clean.accuracy or groups.accuracy)")


def test_every_selected_row_must_reach_the_minimum() -> None:
    assert failures("groups.accuracy=0.6") == ["groups.accuracy (group=a) 0.5000 < 0.6"]
    assert len(failures("robust_accuracy=0.3")) == 1  # only the l2 row fails


def test_param_filters_compare_numbers_as_numbers() -> None:
    assert failures("adversarial.robust_accuracy@norm=linf,eps=0.031400=0.4") == []
    assert failures("robust_accuracy@norm=l2=0.3") == [
        "adversarial.robust_accuracy (attack=pgd, eps=0.5, norm=l2) 0.2000 < 0.3"]
    assert failures("robust_accuracy@norm=l1=0.1") == [
        "robust_accuracy@norm=l1=0.1: no such result in this evaluation"]


@pytest.mark.parametrize("spec", ["accuracy", "=0.3", "clean.accuracy=high", "acc@norm=0.1x",
                                  "acc@=x=0.1", "acc=nan"])
def test_malformed_thresholds_are_usage_errors(spec: str) -> None:
    with pytest.raises(client.ClientError) as info:
        client.parse_thresholds([spec])
    assert info.value.code == client.EXIT_USAGE


def _args(tmp_path: Path, **over: str) -> list[str]:
    ckpt, meta = tmp_path / "m.pt", tmp_path / "meta.json"
    ckpt.write_bytes(b"weights")
    meta.write_text(json.dumps({"name": "n", "num_classes": 2, "input_shape": [3, 8, 8]}))
    opts = {"--metadata": str(meta), "--dataset": "shapes-32", "--api-key": "k",
            "--server": "http://127.0.0.1:9"} | over
    return ["evaluate", over.pop("checkpoint", str(ckpt)),
            *[x for kv in opts.items() if kv[0] != "checkpoint" for x in kv]]


def test_missing_files_exit_2_without_a_traceback(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, checkpoint=str(tmp_path / "nope.pt"))) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint file" in err
    assert "Traceback" not in err
    assert main(_args(tmp_path, **{"--metadata": str(tmp_path / "nope.json")})) == 2
    assert main(_args(tmp_path, **{"--min": "accuracy"})) == 2
    assert main(_args(tmp_path, **{"--api-key": ""})) == 2


def test_unreachable_server_exits_4(tmp_path: Path) -> None:
    assert main(_args(tmp_path)) == 4


def _transport(models: list[dict[str, Any]], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            return httpx.Response(200, json={"items": models, "next_cursor": None})
        return httpx.Response(202, json={"id": "e1", "status": "queued"})
    return httpx.MockTransport(handle)


def test_an_uploaded_checkpoint_is_reused(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    meta = {"name": "n", "num_classes": 2, "input_shape": [3, 8, 8]}
    stored = {"id": "m1", "format": "torchscript", "architecture": None, "mean": None,
              "std": None, "class_names": None, **meta}
    seen: list[httpx.Request] = []
    with httpx.Client(base_url="http://x", transport=_transport([stored], seen)) as c:
        client.submit(c, ckpt, meta, "shapes-32", "standard", 0, False)
    assert seen[0].url.params["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert json.loads(seen[1].content)["model_id"] == "m1"

    seen.clear()
    other = {**stored, "num_classes": 3}  # same bytes, other metadata: a new model
    with httpx.Client(base_url="http://x", transport=_transport([other], seen)) as c:
        client.submit(c, ckpt, meta, "shapes-32", "standard", 0, False)
    assert seen[1].headers["content-type"].startswith("multipart/form-data")


def test_worker_names_are_celery_node_names() -> None:
    import socket

    from robustscope.cli import node_name

    host = socket.gethostname()
    assert node_name("gpu-3") == f"gpu-3@{host}"
    assert node_name("gpu-3@rack7") == "gpu-3@rack7"
    assert node_name(None).startswith("robustscope-")
    assert node_name(None).endswith(f"@{host}")
    for bad in ("a b", "-x", "x@", "x/y", "a" * 101):
        with pytest.raises(SystemExit, match="--name"):
            node_name(bad)


def test_up_splits_the_cores_between_its_job_workers() -> None:
    from robustscope.cli import parser, up_workers

    assert up_workers(1, 8) == [("worker", "evaluations,webhooks", "evaluations and trainings", 0),
                                ("ingest", "ingest", "dataset ingests", 0)]
    assert [(n, t) for n, _, _, t in up_workers(3, 8)] == [
        ("worker-1", 2), ("worker-2", 2), ("worker-3", 2), ("ingest", 0)]
    assert [t for *_, t in up_workers(4, 2)][:4] == [1, 1, 1, 1]
    assert parser().parse_args(["up", "--workers", "2"]).workers == 2
    with pytest.raises(SystemExit):
        parser().parse_args(["up", "--workers", "0"])


def test_evaluate_help_names_its_environment_and_gate_options() -> None:
    from robustscope.cli import parser

    sub = parser()._subparsers._group_actions[0].choices["evaluate"]  # type: ignore[union-attr]
    text = sub.format_help()
    for needle in ("ROBUSTSCOPE_SERVER", "ROBUSTSCOPE_API_KEY", "MLFLOW_TRACKING_URI",
                   "MLFLOW_RUN_ID", "--n-examples", "--split", "--dataset-params",
                   "--baseline", "--max-drop", "--format", "--output", "--mlflow-run",
                   "models:/NAME/VERSION"):
        assert needle in text, needle


def test_gate_options_that_cannot_work_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, **{"--max-drop": "clean.accuracy=0.02"})) == 2
    assert "--max-drop needs --baseline" in capsys.readouterr().err
    assert main(_args(tmp_path, **{"--max-drop": "clean.accuracy", "--baseline": "x"})) == 2
    assert "--max-drop takes" in capsys.readouterr().err
    assert main(_args(tmp_path, **{"--dataset-params": "{not json"})) == 2
    assert "--dataset-params is not valid JSON" in capsys.readouterr().err
    assert main(_args(tmp_path, **{"--dataset-params": "[1]"})) == 2


def test_dataset_params_come_from_json_text_or_a_file(tmp_path: Path) -> None:
    assert client.dataset_params('{"correlation": 0.8}') == {"correlation": 0.8}
    path = tmp_path / "params.yaml"
    path.write_text("correlation: 0.5\n")
    assert client.dataset_params(str(path)) == {"correlation": 0.5}
    assert client.dataset_params(None) is None
