"""The import rules of ARCHITECTURE.md, checked on real interpreters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return set(out.stdout.split())


def test_api_process_never_imports_torch_or_the_engine() -> None:
    mods = _modules_after("from service.app import create_app\nfrom service.cli import main\n"
                          "create_app()")
    assert "torch" not in mods
    assert not any(m == "workers" or m.startswith("workers.") for m in mods)


def test_no_service_module_imports_workers_even_lazily() -> None:
    """A function-level import escapes the interpreter check above; read the sources."""
    offenders = []
    for path in ROOT.glob("service/**/*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if words[:2] in (["import", "workers"], ["from", "workers"]) or (
                    words[:1] in (["import"], ["from"]) and len(words) > 1
                    and words[1].startswith(("workers.", "torch"))):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []


def test_engine_imports_no_web_celery_or_database_code() -> None:
    mods = _modules_after("import workers.engine.benchmarks as b\nb.names()\n"
                          "import workers.engine.models, workers.engine.data")
    banned = ("fastapi", "starlette", "celery", "sqlalchemy", "service", "kombu", "psycopg")
    found = sorted(m for m in mods if m.split(".")[0] in banned)
    assert found == []


def test_no_unsafe_torch_load_in_sources() -> None:
    offenders = []
    for path in [*ROOT.glob("service/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []


def test_the_engine_child_imports_no_service_or_database_code() -> None:
    """The jailed child holds no settings, secrets or connections: it cannot import them."""
    mods = _modules_after("import workers.sandbox.child")
    banned = ("fastapi", "starlette", "celery", "sqlalchemy", "service", "kombu", "psycopg",
              "redis", "pydantic_settings")
    found = sorted(m for m in mods if m.split(".")[0] in banned)
    assert found == []


def test_the_contract_imports_neither_torch_nor_web_nor_database_code() -> None:
    """Both the API and the engine import the contract, so it must suit both."""
    mods = _modules_after("import contract.attacks, contract.metrics")
    banned = ("torch", "fastapi", "starlette", "celery", "sqlalchemy", "service", "workers",
              "numpy")
    assert sorted(m for m in mods if m.split(".")[0] in banned) == []
