"""The engine child's boundaries, typed on both sides: the job the supervisor hands it (built
through :class:`EvaluateJob` / :class:`TrainJob`, validated by the child on receipt) and the
reports it writes (built from the message models the supervisor validates, written as the
same JSON the supervisor has always read)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from contract.stats import encode_outcomes
from contract.training import TrainingSpec
from workers.engine.types import Check, MetricRow
from workers.sandbox import child
from workers.sandbox.protocol import (
    CheckReport,
    Decoder,
    Done,
    EntryDone,
    Error,
    EvaluateJob,
    ModelLink,
    ProtocolError,
    Ready,
    Row,
    ServerJob,
    TrainJob,
    dump_job,
    encode,
    parse_job,
    parse_server_job,
)

META = {"name": "m", "num_classes": 4, "input_shape": [3, 32, 32]}


def _evaluate(**change: Any) -> EvaluateJob:
    fields: dict[str, Any] = {
        "kind": "evaluate", "suite": [{"benchmark": "clean"}], "completed": [1], "seed": 3,
        "batch_size": 64, "amp": False, "model_path": "/job/model",
        "model_format": "torchscript", "model_metadata": META, "dataset": "shapes-32",
        "dataset_path": None, "dataset_params": {"train_size": 10}, "split": "test",
        "n_examples": 16, "class_map": [0, 1, 2, 3], "state_dir": "/scratch/state",
        "artifact_dir": "/scratch/artifacts", "threads": 2, "device": "cpu"}
    return EvaluateJob(**{**fields, **change})


def _train() -> TrainJob:
    spec = TrainingSpec.model_validate({
        "architecture": "small-cnn", "method": "standard", "epochs": 1, "batch_size": 32,
        "lr": 0.1, "threat": {"norm": "linf", "eps": 0.03, "steps": 5, "step_size": 0.01}})
    return TrainJob(kind="train", spec=spec, dataset="shapes-32", dataset_path="/job/data.npz",
                    dataset_params={}, held_out_split="val", train_examples=None,
                    eval_examples=100, checkpoint="/scratch/state/checkpoint.safetensors",
                    weights="/scratch/out/weights.safetensors", threads=1, device="cpu")


# --- the job ------------------------------------------------------------------------------


def test_a_job_reaches_the_child_as_the_supervisor_built_it() -> None:
    link = ModelLink(request=5, reply=6, shm=7, shm_size=1 << 20, timeout=600.0)
    job = (_evaluate(shard_parts=["/scratch/in/part-0", "/scratch/in/part-1"],
                     shard_bounds=[(0, 64), (64, 100)])
           .served(link).sliced(64, 100, completed=[0]).limited(memory_limit=1 << 34,
                                                                pids_limit=None))
    line = dump_job(job)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # one line on the child's stdin
    got = parse_job(line)
    assert got == job
    assert isinstance(got, EvaluateJob)
    assert (got.shard, got.completed, got.memory_limit) == ((64, 100), [0], 1 << 34)
    assert got.shard_bounds == [(0, 64), (64, 100)]
    assert got.model_server == link
    train = _train()
    assert parse_job(dump_job(train)) == train
    assert json.loads(dump_job(train))["spec"]["method"] == "standard"


def test_the_model_servers_job_is_the_evaluations_model_and_its_cap() -> None:
    job = _evaluate().server_job(memory_limit=123)
    assert job == ServerJob(model_format="torchscript", model_metadata=META, threads=2,
                            device="cpu", memory_limit=123, model_path="/job/model")
    assert parse_server_job(dump_job(job.at("/slot/in/model"))).model_path == "/slot/in/model"
    with pytest.raises(ProtocolError, match=r"an invalid job \(kind: Extra inputs"):
        parse_server_job(json.dumps({**job.model_dump(), "kind": "evaluate"}))


@pytest.mark.parametrize(("change", "where"), [
    ({"secret": "x"}, "evaluate.secret: Extra inputs are not permitted"),
    ({"threads": "2"}, "evaluate.threads: Input should be a valid integer"),
    ({"threads": 0}, "evaluate.threads: Input should be greater than or equal to 1"),
    ({"kind": "delete"}, "Input tag 'delete' found using 'kind' does not match"),
    ({"shard": [1, 2, 3]}, "evaluate.shard"),
    ({"model_server": {"request": 1}}, "evaluate.model_server.reply: Field required"),
])
def test_the_child_refuses_a_job_it_was_not_built_to_run(change: dict[str, Any],
                                                        where: str) -> None:
    raw = {**json.loads(dump_job(_evaluate())), **change}
    with pytest.raises(ProtocolError) as caught:
        parse_job(json.dumps(raw))
    assert where in str(caught.value)
    error = child.classify(caught.value)
    assert error["type"] == "sandbox-error"
    assert error["detail"].startswith("the engine child was given an invalid job (")


def test_a_job_missing_a_field_is_refused() -> None:
    raw = json.loads(dump_job(_evaluate()))
    del raw["seed"]
    with pytest.raises(ProtocolError, match=r"evaluate\.seed: Field required"):
        parse_job(json.dumps(raw))
    with pytest.raises(ProtocolError, match="an invalid job"):
        parse_job(b"not json")


# --- the reports --------------------------------------------------------------------------


def _frame_body(frame: bytes) -> bytes:
    return frame[4:]


def test_reports_are_written_as_the_json_the_supervisor_reads() -> None:
    """The child's typed reports give byte for byte the frames it wrote as dicts."""
    flags = torch.tensor([True, False, True, True])
    rows = [MetricRow("clean", "accuracy", 0.75, {"eps": 0.0}, flags),
            MetricRow("shift", "gap", 0.125, {"variant": "a"})]
    check = Check("box", True, "all in [0, 1]", {"max": 1.0})
    entry = EntryDone(t="entry", index=2, seconds=0.5, rows=[child._row(r) for r in rows],
                      checks=[child._check(check)], artifacts={"plot": "entry-2/plot.png"})
    as_dicts = {"t": "entry", "index": 2, "seconds": 0.5,
                "rows": [r.as_dict() for r in rows], "checks": [check.as_dict()],
                "artifacts": {"plot": "entry-2/plot.png"}}
    assert encode(entry) == encode(as_dicts)
    assert b'"n"' not in _frame_body(encode(entry.rows[1]))  # a row without outcomes
    assert json.loads(_frame_body(encode(entry)))["rows"][0] == {
        "benchmark": "clean", "metric": "accuracy", "value": 0.75, "params": {"eps": 0.0},
        "n": 4, "outcomes": encode_outcomes([1, 0, 1, 1])}
    progress = child._progress(0.5, "clean", "batch 1 of 2")
    assert encode(progress) == encode({"t": "progress", "fraction": 0.5, "stage": "clean",
                                       "message": "batch 1 of 2"})
    error = Error.model_validate({"t": "error", **child.classify(MemoryError())})
    assert encode(error) == encode({"t": "error", "type": "out-of-memory",
                                    "detail": error.detail})
    decoder = Decoder("evaluate")
    read = decoder.feed(encode(Ready(t="ready", address_space=1)) + encode(progress)
                       + encode(entry) + encode(Done(t="done", peak_address_space=2)))
    assert read[2].model_dump() == entry.model_dump()  # rows[1]: n and outcomes None
    assert [m.t for m in read] == ["ready", "progress", "entry", "done"]


def test_a_report_the_child_cannot_build_fails_the_job_as_a_protocol_error() -> None:
    """What the supervisor would refuse as a frame, the child's own models refuse as it is
    built: ``sandbox-error``, not the model's crash."""
    with pytest.raises(ValueError, match="stage") as long_stage:
        child._progress(0.1, "x" * 201, "")
    with pytest.raises(ValueError, match="outcomes count") as lying_row:
        Row(benchmark="clean", metric="accuracy", value=1.0, params={}, n=4,
            outcomes=encode_outcomes([1, 0, 0, 0]))
    with pytest.raises(ValueError, match="passed") as wrong_type:
        CheckReport.model_validate({"name": "c", "passed": "yes", "detail": "", "params": {}})
    for caught, where in ((long_stage, "stage"), (lying_row, ""), (wrong_type, "passed")):
        error = child.classify(caught.value)
        assert error["type"] == "sandbox-error", error
        assert error["detail"].startswith(
            f"the engine broke the report protocol: invalid message ({where}")
    # A validation error of anything else is still the model's (or the engine's) failure.
    with pytest.raises(ValueError, match="architecture") as other:
        TrainingSpec.model_validate({})
    assert child.classify(other.value)["type"] == "model-crashed"

