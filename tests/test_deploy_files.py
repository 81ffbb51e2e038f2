"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from service.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _cli_commands() -> set[str]:
    sub = next(a for a in parser()._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def test_compose_names_the_production_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")


def test_compose_commands_are_real_cli_commands() -> None:
    services = _compose()["services"]
    commands = _cli_commands()
    for name, expected in (("api", "api"), ("worker", "worker"), ("migrate", "migrate")):
        cmd = services[name]["command"]
        assert cmd[0] == "robustscope"
        assert cmd[1] == expected
        assert expected in commands
        parser().parse_args(cmd[1:])  # the arguments parse


def test_compose_wires_postgres_redis_and_a_gpu() -> None:
    services = _compose()["services"]
    for name in ("api", "worker", "migrate"):
        env = services[name]["environment"]
        assert "@postgres:5432/" in env["ROBUSTSCOPE_DATABASE_URL"]
        assert env["ROBUSTSCOPE_BROKER_URL"].startswith("redis://redis:6379")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    assert services["api"]["volumes"] == services["worker"]["volumes"] == ["data:/data"]


def test_dockerfile_targets_match_compose_and_keep_torch_out_of_the_api() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.S | re.M))
    services = _compose()["services"]
    for name in ("api", "worker", "migrate"):
        assert services[name]["build"]["target"] in stages
    assert "--extra worker" not in stages["api"]
    assert "--all-extras" not in stages["api"]
    assert "--extra worker" in stages["worker"]
