"""The import rules of ARCHITECTURE.md, checked on real interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return set(out.stdout.split())


#: Which package may import which (its own modules aside). A package is a top-level one, or
#: for ``service`` and ``workers`` one of their sub-packages. The order is the layering: each
#: package imports only packages listed before it, so an upward import or a circle between
#: packages is a name missing from its line. ``service``'s domains (auth … theory) import the
#: HTTP layer's building blocks and the domains they build on; ``service.app`` composes them.
MAY_IMPORT: dict[str, set[str]] = {
    "contract": set(),
    "core": {"contract"},
    "service.http": {"contract", "core"},
    "service.jobs": {"contract", "core", "service.http"},
    "service.auth": {"contract", "core", "service.http"},
    "service.models": {"contract", "core", "service.http"},
    # An upload's record carries its ingest job's progress.
    "service.datasets": {"contract", "core", "service.http", "service.jobs"},
    "service.evaluations": {"contract", "core", "service.http", "service.jobs", "service.models",
                            "service.datasets"},
    "service.trainings": {"contract", "core", "service.http", "service.jobs", "service.models",
                          "service.datasets", "service.evaluations"},
    "service.sweeps": {"contract", "core", "service.http", "service.jobs", "service.datasets",
                       "service.evaluations", "service.trainings"},
    # The leaderboard ranks at a dataset's standard threat (its default eps).
    "service.leaderboard": {"contract", "core", "service.http", "service.datasets"},
    "service.ops": {"contract", "core", "service.http"},
    "service.pages": {"contract", "core", "service.http"},
    "service.theory": {"contract", "core", "service.http"},
    "service.app": {"contract", "core", "service.http", "service.jobs", "service.auth",
                    "service.models", "service.datasets", "service.evaluations",
                    "service.trainings",
                    "service.sweeps", "service.leaderboard", "service.ops", "service.pages",
                    "service.theory"},
    "workers.engine": {"contract"},
    "workers.sandbox": {"contract", "core", "workers.engine"},
    # The worker's jobs: the kernel and the domains' services, never the HTTP layer.
    "workers": {"contract", "core", "service.models", "service.datasets",
                "service.evaluations", "workers.engine", "workers.sandbox"},
    "robustscope": {"contract", "core", "service.auth", "service.app"},
}
PACKAGES = ("contract", "core", "service", "workers", "robustscope")
#: Packages that never import torch (nor numpy's heavy kin through the engine).
TORCH_FREE = ("contract", "core", "service", "robustscope")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("service", "workers") and len(parts) > 1 and (
            parts[0] == "service" or parts[1] in ("engine", "sandbox")):
        return ".".join(parts[:2])
    return parts[0]


def _sources() -> dict[str, Path]:
    return {_module(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}


def _imports(path: Path, modules: Iterable[str]) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth of its code (a function's lazy import, one
    under ``TYPE_CHECKING``), with its line: ``from a import b`` is ``a.b`` when that is a
    module, else ``a``."""
    known = set(modules)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in known else node.module))
    return found


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    sources = _sources()
    return sources, {m: _imports(p, sources) for m, p in sources.items()}


def test_every_package_has_its_rule() -> None:
    sources = _sources()
    assert {_package(m) for m in sources} - {"service"} == set(MAY_IMPORT)


def test_packages_import_only_what_their_rule_allows() -> None:
    """No upward import and no circle between packages: each package imports only those
    before it in :data:`MAY_IMPORT`, and never torch where the rule says torch-free."""
    sources, graph = _graph()
    offenders = []
    for module, imported in graph.items():
        mine = _package(module)
        for line, name in imported:
            where = f"{sources[module].relative_to(ROOT)}:{line} imports {name}"
            top = name.split(".")[0]
            if top == "torch" and mine.split(".")[0] in TORCH_FREE:
                offenders.append(where)
            if top in PACKAGES and _package(name) not in (mine, "service") and (
                    _package(name) not in MAY_IMPORT[mine]):
                offenders.append(where)
    assert offenders == []


def test_the_rules_are_layered() -> None:
    """Every package's rule names only packages listed before it: the rules have no circle."""
    order = list(MAY_IMPORT)
    assert [(p, q) for p, allowed in MAY_IMPORT.items() for q in allowed
            if order.index(q) >= order.index(p)] == []


def test_no_module_import_circle() -> None:
    """No two modules import each other, directly or round a loop (a lazy import included)."""
    _, graph = _graph()
    edges = {m: {n for _, n in imported if n in graph and n != m}
             for m, imported in graph.items()}
    circles = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                circles.append(" -> ".join([*path[path.index(n):], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert circles == []


MAP_HEADER = "| package | owns | may import |"


def _map_rules(doc: str) -> dict[str, set[str]]:
    """The rows of the table under ARCHITECTURE.md's ``| package | owns | may import |``
    header, as rules: ``service/http/`` is ``service.http``, ``service/app.py`` is
    ``service.app``; "nothing" is the empty rule, and a row "not checked" states none."""
    lines = doc.splitlines()
    rows = lines[lines.index(MAP_HEADER) + 2:]
    rules = {}
    for line in rows[:next((i for i, r in enumerate(rows) if not r.startswith("|")), None)]:
        package, _, allowed = (c.strip() for c in line.strip("|").split("|"))
        if allowed == "not checked":
            continue
        name = package.strip("`").removesuffix(".py").strip("/").replace("/", ".")
        rules[name] = set() if allowed == "nothing" else {
            c.strip().strip("`") for c in allowed.split(",")}
    return rules


def test_the_map_in_architecture_md_states_these_rules() -> None:
    """docs/ARCHITECTURE.md's map names every package with exactly its rule, in order."""
    rules = _map_rules((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    assert list(rules) == list(MAY_IMPORT)
    assert rules == MAY_IMPORT


def test_the_map_reader_sees_a_wrong_rule() -> None:
    table = "\n".join([
        "intro", MAP_HEADER, "|---|---|---|",
        "| `contract/` | the contract | nothing |",
        "| `service/ops/` | `/health` | `contract`, `core`, `service.http`, `workers` |",
        "| `service/app.py` | the app | `contract` |",
        "| `tests/` | the tests | not checked |",
        "", "| `ENVIRONMENT` | `development` | a setting |"])
    assert _map_rules(table) == {"contract": set(), "service.app": {"contract"},
                                 "service.ops": {"contract", "core", "service.http", "workers"}}


def test_rules_catch_an_upward_import(tmp_path: Path) -> None:
    """The checks above are not vacuous: an import from the kernel up into a domain, and one
    from the HTTP layer into a domain, are both seen."""
    kernel = tmp_path / "core.py"
    kernel.write_text("from service.evaluations.service import to_out\n"
                      "def f():\n    from service.http import polling\n")
    names = [name for _, name in _imports(kernel, ["service.evaluations.service"])]
    assert names == ["service.evaluations.service", "service.http"]
    assert {_package(n) for n in names} - MAY_IMPORT["core"] == {"service.evaluations",
                                                                 "service.http"}


@pytest.mark.slow
def test_api_process_never_imports_torch_or_the_engine() -> None:
    mods = _modules_after("from service.app import create_app\nfrom robustscope.cli import main\n"
                          "import robustscope.client, robustscope.reproduce\ncreate_app()")
    assert "torch" not in mods
    assert not any(m == "workers" or m.startswith("workers.") for m in mods)


@pytest.mark.slow
def test_engine_imports_no_web_celery_or_database_code() -> None:
    mods = _modules_after("import workers.engine.benchmarks as b\nb.names()\n"
                          "import workers.engine.models, workers.engine.data")
    banned = ("fastapi", "starlette", "celery", "sqlalchemy", "service", "kombu", "psycopg")
    found = sorted(m for m in mods if m.split(".")[0] in banned)
    assert found == []


def test_no_unsafe_torch_load_in_sources() -> None:
    offenders = []
    for path in [p for top in PACKAGES for p in ROOT.glob(f"{top}/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []


@pytest.mark.slow
def test_the_engine_child_imports_no_service_or_database_code() -> None:
    """The jailed child holds no settings, secrets or connections: it cannot import them."""
    mods = _modules_after("import workers.sandbox.child")
    banned = ("fastapi", "starlette", "celery", "sqlalchemy", "core", "service", "kombu",
              "psycopg", "redis", "pydantic_settings")
    found = sorted(m for m in mods if m.split(".")[0] in banned)
    assert found == []


@pytest.mark.slow
def test_the_contract_imports_neither_torch_nor_web_nor_database_code() -> None:
    """Both the API and the engine import the contract, so it must suit both."""
    mods = _modules_after("import contract.attacks, contract.metrics")
    banned = ("torch", "fastapi", "starlette", "celery", "sqlalchemy", "service", "workers",
              "numpy")
    assert sorted(m for m in mods if m.split(".")[0] in banned) == []


@pytest.mark.slow
def test_the_kernel_imports_neither_torch_nor_the_http_layer_nor_workers() -> None:
    """The workers import the kernel: it must not drag in the API or the engine."""
    mods = _modules_after("import core.tables, core.db, core.settings, core.queue, "
                          "core.storage, core.migrate, core.repository, core.errors, core.jobs, "
                          "core.keys, core.quotas, core.webhook_policy")
    assert sorted(m for m in mods if m.split(".")[0] in ("torch", "workers", "fastapi")
                  or m.startswith(("service.", "robustscope"))) == []
