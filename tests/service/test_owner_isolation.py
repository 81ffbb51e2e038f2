"""Another owner's rows stay out of reach everywhere the repositories scope them: uploaded
datasets, share links, the home page's recent jobs, a sweep's report, quotas and the
Idempotency-Key replay (the evaluation, model and training routes are in their own tests)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import jobs, quotas
from core.db import make_engine, make_sessionmaker
from core.tables import Dataset, Evaluation, Sweep
from service.app import create_app
from service.datasets import repository as datasets
from tests.factories import auth, new_key, settings


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(sqlite_url, tmp_path)), follow_redirects=False) as c:
        yield c


def _add(url: str, row: Any) -> str:
    with make_sessionmaker(make_engine(url)).begin() as s:
        s.add(row)
        s.flush()
        return str(row.id)


def _dataset(owner: str, name: str, size: int = 100) -> Dataset:
    return Dataset(owner=owner, name=name, info={}, sha256="0" * 64, size_bytes=size,
                   storage_path=f"datasets/{uuid.uuid4()}.npz", status="ingesting")


def _evaluation(owner: str, model_name: str, status: str = "succeeded",
                idempotency_key: str | None = None) -> Evaluation:
    return Evaluation(owner=owner, model_name=model_name, dataset="shapes-32",
                      suite=[{"benchmark": "clean"}], seed=0, status=status, public=False,
                      progress_fraction=1.0, checks=[], idempotency_key=idempotency_key,
                      request_hash="h")


def _sweep(owner: str, public: bool = False) -> Sweep:
    return Sweep(owner=owner, spec={"dataset": "shapes-32", "architecture": "small_cnn",
                                    "public": public}, training_ids=[])


def test_another_owners_dataset_is_not_found(client: TestClient, sqlite_url: str) -> None:
    alice, bob = new_key(sqlite_url, "alice"), new_key(sqlite_url, "bob")
    digits = _add(sqlite_url, _dataset("alice", "digits"))
    for ref in (digits, "digits"):
        assert client.get(f"/datasets/{ref}", headers=auth(alice)).json()["id"] == digits
        mine = client.get(f"/datasets/{ref}", headers=auth(bob))
        assert mine.status_code == 404
        assert mine.json()["field"] == "dataset"
        assert client.delete(f"/datasets/{ref}", headers=auth(bob)).status_code == 404
    listed = client.get("/datasets", headers=auth(bob)).json()["items"]
    assert [d["name"] for d in listed if not d["builtin"]] == []
    with make_sessionmaker(make_engine(sqlite_url)).begin() as s:
        assert datasets.name_taken(s, "alice", "digits") is True
        assert datasets.name_taken(s, "bob", "digits") is False
        assert datasets.by_ref(s, "bob", digits) is None
    assert client.get(f"/datasets/{digits}", headers=auth(alice)).status_code == 200


def test_another_owners_reports_and_links_cannot_be_shared_or_revoked(
        client: TestClient, sqlite_url: str) -> None:
    alice, bob = new_key(sqlite_url, "alice"), new_key(sqlite_url, "bob")
    evaluation = _add(sqlite_url, _evaluation("alice", "alice-net"))
    sweep = _add(sqlite_url, _sweep("alice"))
    for field, target in (("evaluation_id", evaluation), ("sweep_id", sweep)):
        refused = client.post("/share-links", headers=auth(bob), json={field: target})
        assert refused.status_code == 404
        assert refused.json()["field"] == field
        assert refused.json()["detail"] == f"no {field.removesuffix('_id')} {target}"
    link = client.post("/share-links", headers=auth(alice),
                       json={"evaluation_id": evaluation}).json()
    assert client.get("/share-links", headers=auth(bob)).json() == {"items": []}
    revoke = client.delete(f"/share-links/{link['id']}", headers=auth(bob))
    assert revoke.status_code == 404
    assert revoke.json()["detail"] == f"no share link {link['id']}"
    assert client.get(link["url"].removeprefix("http://testserver")).status_code == 200
    assert client.delete(f"/share-links/{link['id']}", headers=auth(alice)).status_code == 204


def test_the_home_page_lists_only_the_readers_jobs(client: TestClient, sqlite_url: str) -> None:
    bob = new_key(sqlite_url, "bob")
    _add(sqlite_url, _evaluation("alice", "alice-net"))
    _add(sqlite_url, _evaluation("bob", "bob-net"))
    page = client.get("/", headers=auth(bob)).text
    assert "bob-net" in page
    assert "alice-net" not in page


def test_a_sweep_report_is_the_owners_or_public(client: TestClient, sqlite_url: str) -> None:
    alice, bob = new_key(sqlite_url, "alice"), new_key(sqlite_url, "bob")
    private, public = _add(sqlite_url, _sweep("alice")), _add(sqlite_url, _sweep("alice", True))
    own = client.get(f"/sweeps/{private}/report", headers=auth(alice))
    assert own.status_code == 200
    assert "sweep JSON" in own.text  # the owner's page links to its record
    assert client.get(f"/sweeps/{private}/report", headers=auth(bob)).status_code == 404
    theirs = client.get(f"/sweeps/{public}/report", headers=auth(bob))
    assert theirs.status_code == 200
    assert "sweep JSON" not in theirs.text
    assert client.get(f"/sweeps/{uuid.uuid4()}/report", headers=auth(bob)).status_code == 404


def test_quotas_and_idempotency_keys_count_per_owner(sqlite_url: str) -> None:
    for row in (_evaluation("alice", "a", "queued"), _evaluation("alice", "b", "running"),
                _evaluation("alice", "c", "succeeded"), _evaluation("bob", "d", "queued"),
                _dataset("alice", "x", 300), _dataset("alice", "y", 40),
                _dataset("bob", "z", 5)):
        _add(sqlite_url, row)
    earlier = _add(sqlite_url, _evaluation("alice", "e", "succeeded", idempotency_key="k"))

    with make_sessionmaker(make_engine(sqlite_url)).begin() as s:
        assert (quotas.active_jobs(s, "alice"), quotas.active_jobs(s, "bob")) == (2, 1)
        assert (quotas.stored_bytes(s, "alice"), quotas.stored_bytes(s, "bob")) == (340, 5)
        assert quotas.active_jobs(s, "carol") == 0
        replayed = jobs.replay(s, Evaluation, "alice", "k", "h")
        assert replayed is not None
        assert str(replayed.id) == earlier
        assert jobs.replay(s, Evaluation, "bob", "k", "h") is None
