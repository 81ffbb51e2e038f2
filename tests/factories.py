"""Small builders for test models, checkpoints and API clients."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn

from contract.suite import BaseEntry
from core.db import make_engine, make_sessionmaker, transaction
from core.keys import create_key
from core.settings import Settings
from service.app import create_app
from workers.engine import benchmarks
from workers.engine.models import Normalized
from workers.engine.types import EvalData, RunContext

META = {"name": "tiny", "num_classes": 4, "input_shape": [3, 32, 32]}


def run_benchmark(name: str, model: nn.Module, data: EvalData, params: dict[str, Any],
                  ctx: RunContext) -> benchmarks.BenchmarkResult:
    """``params`` as the job boundary parses them (the contract's typed entry), then run."""
    return benchmarks.run(model, data, benchmarks.parse({"benchmark": name, **params}), ctx)


def settings(database_url: str, data_dir: Path, **kw: Any) -> Settings:
    return Settings(database_url=database_url, data_dir=data_dir,
                    broker_url=kw.pop("broker_url", f"sqla+sqlite:///{data_dir / 'broker.db'}"),
                    **kw)


def new_key(database_url: str, owner: str) -> str:
    engine = make_engine(database_url)
    with transaction(make_sessionmaker(engine)) as s:
        key = create_key(s, owner)
    engine.dispose()
    return key


@contextmanager
def api(cfg: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(cfg)) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tiny_net(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(64, num_classes)).eval()


class GreyViews(nn.Module):
    """A grey digit CNN that flattens with ``.view`` after its convolutions (the most common
    MNIST model): with one input channel, channels_last and contiguous strides both count as
    "contiguous", so only the exact strides say which one a convolution sees."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        z = torch.max_pool2d(torch.relu(self.conv2(z)), 2)
        return self.fc(z.view(z.size(0), -1))


def grey_view_net(bn: bool = True) -> GreyViews:
    """An untrained :class:`GreyViews` in eval mode, seeded; with BatchNorm statistics."""
    torch.manual_seed(0)
    net = GreyViews(bn)
    if bn:  # non-trivial running statistics, so a folded copy differs from the identity
        with torch.no_grad():
            net.train()(torch.rand(32, 1, 28, 28))
    return net.eval()


def torchscript_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def export_bytes(model: nn.Module, shape: tuple[int, ...] = (3, 32, 32)) -> bytes:
    buf = io.BytesIO()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.rand(4, *shape),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, buf)
    return buf.getvalue()


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


class _Payload:
    """Unpickling this creates a file: proof that a loader executed the upload."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


def malicious_pickle(target: Path) -> bytes:
    return pickle.dumps(_Payload(target))


def malicious_torch_save(target: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "payload": _Payload(target)}, buf)
    return buf.getvalue()


def upload(client: TestClient, key: str, data: bytes, meta: dict[str, Any] | None = None,
           name: str = "model.bin") -> Any:
    return client.post("/models", headers=auth(key), files={"file": (name, data)},
                       data={"metadata": json.dumps(meta or META)})


def check_unknown_dataset_refused(client: TestClient, key: str, path: str,
                                  body: dict[str, Any]) -> None:
    """A training or a sweep naming a dataset its owner cannot see is not found, whatever the
    domain: a 404 naming the field, and no training queued."""
    resp = client.post(path, headers=auth(key), json={**body, "dataset": "cifar-10"})
    assert resp.status_code == 404, resp.text
    assert resp.json()["field"] == "dataset"
    assert resp.json()["errors"][0]["field"] == "dataset"
    assert client.get("/trainings", headers=auth(key)).json()["items"] == []


def engine_rows(net: nn.Module, data: EvalData, suite: list[dict[str, Any]], seed: int,
                mean: list[float] | None = None, std: list[float] | None = None, *,
                batch_size: int = 256) -> list[Any]:
    """What the engine computes in this process for ``suite``: the rows a job must report.
    The search runs in fp32, as the workers of these tests are told to (``precision`` fp32):
    the ``auto`` choice times a probe, and on a loaded machine two processes can time it
    differently. ``batch_size`` is the worker's (``ROBUSTSCOPE_BATCH_SIZE``): attacks draw their
    random starts per block of that many examples."""
    model = Normalized(net, mean, std, int(data.x.shape[1])).eval()
    ctx = RunContext(seed=seed, amp=False, batch_size=batch_size)
    rows = []
    for entry in suite:
        result = benchmarks.run(model, data, benchmarks.parse(entry), ctx)
        rows += [{k: r.as_dict().get(k) for k in ROW_KEYS} for r in result.rows]
    return comparable(rows)


ROW_KEYS = ("benchmark", "metric", "value", "params", "n")
"""What a result row says, as the engine reports it and the API serves it (the API adds the
interval, a function of the value and ``n``)."""


def served(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API's result rows with only :data:`ROW_KEYS`, to compare with :func:`engine_rows`."""
    return [{k: r[k] for k in ROW_KEYS} for r in results]


COST_METRICS = frozenset({"attack_seconds", "forward_passes", "backward_passes"})


def comparable(rows: list[Any]) -> list[Any]:
    """``rows`` without cost rows: wall-clock seconds differ between any two runs, and pass
    counts with the search precision, which each process chooses by timing a probe (the
    fp32 re-checks of a bf16 search cost a few passes an fp32 search does not)."""
    assert all("stage" in r["params"] for r in rows if r["metric"] in COST_METRICS)
    return [r for r in rows if r["metric"] not in COST_METRICS]


def upload_dataset(client: TestClient, key: str, rt: Any, archive: Path,
                   name: str | None = None, channels: int | None = None) -> Any:
    """POST an archive (202, ``ingesting``), run the worker's ingest job in this process, and
    return ``GET /datasets/{id}``'s answer (its ``status`` is ``ready`` or ``failed``)."""
    import uuid

    from workers import ingest

    form = {k: str(v) for k, v in (("name", name), ("channels", channels)) if v is not None}
    with archive.open("rb") as f:
        resp = client.post("/datasets", headers=auth(key), files={"file": (archive.name, f)},
                           data=form or None)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "ingesting"
    ingest.run(rt, uuid.UUID(resp.json()["ingest"]["id"]))
    return client.get(f"/datasets/{resp.json()['id']}", headers=auth(key))


def accept_test_entries(monkeypatch: pytest.MonkeyPatch, *models: type[BaseEntry]) -> None:
    """Let the worker's job boundary parse the entries of benchmarks only a test registers
    (the contract knows the real ones only); every other entry is parsed as usual."""
    real = benchmarks.parse
    by_name = {get_args(m.model_fields["benchmark"].annotation)[0]: m for m in models}

    def parse(raw: Any) -> Any:
        model = by_name.get(raw.get("benchmark")) if isinstance(raw, dict) else None
        return model.model_validate(raw) if model is not None else real(raw)

    monkeypatch.setattr(benchmarks, "parse", parse)


def worker_runtime(database_url: str, data_dir: Path, **change: Any) -> Any:
    """A worker's runtime for job tests: quick heartbeats, a 300 s job limit unless changed
    (``workers.runtime.Runtime``; imported here so that API tests do not import torch)."""
    import torch

    from workers.runtime import Runtime

    cfg = settings(database_url, data_dir, **{"heartbeat_interval": 0.2, "stale_after": 5.0,
                                              "job_time_limit": 300.0, **change})
    engine = make_engine(database_url)
    return Runtime(settings=cfg, engine=engine, sessions=make_sessionmaker(engine),
                   device=torch.device("cpu"), name="test-worker")


def closed_after(runtime: Any) -> Iterator[Any]:
    """Yield ``runtime``, then close the jail it built (a fixture's body)."""
    yield runtime
    if runtime._jail is not None:
        runtime._jail.close()
