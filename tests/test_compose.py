"""docker-compose.yml and the Dockerfile must match the real CLI and settings (Docker cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.dashboard import __main__ as dashboard_main
from dispatcher.settings import ENVIRONMENT
from dispatcher.smtp.config import TlsMode, parse_smtp_url
from dispatcher.worker import pool as worker

ROOT = Path(__file__).resolve().parent.parent
_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def resolve(value: str) -> str:
    """Compose interpolation as Docker does it with nothing set: defaults apply, required ones stay named."""
    value = _DEFAULT.sub(lambda m: m.group(2), value)
    return _REQUIRED.sub(lambda m: f"<{m.group(1)}>", value)


def test_services_are_the_documented_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "mailpit", "worker", "dashboard"}


def test_redis_keeps_an_append_only_file_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


@pytest.mark.parametrize("service", ["worker", "dashboard"])
def test_app_services_wait_for_a_healthy_redis_and_name_only_known_settings(
    compose: dict[str, Any], service: str
) -> None:
    spec = compose["services"][service]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    environment = spec["environment"]
    assert set(environment) <= set(ENVIRONMENT), set(environment) - set(ENVIRONMENT)
    assert resolve(environment["REDIS_URL"]) == "redis://redis:6379/0"


def test_worker_command_is_accepted_by_the_worker_cli(compose: dict[str, Any]) -> None:
    command = compose["services"]["worker"]["command"]
    assert command[:2] == ["python", "worker.py"]
    args = worker.parse_args(command[2:])
    assert args.concurrency >= 1
    assert not args.burst
    assert "stop_grace_period" in compose["services"]["worker"]


def test_worker_default_route_parses_and_points_at_mailpit(compose: dict[str, Any]) -> None:
    url = resolve(compose["services"]["worker"]["environment"]["SMTP_URL"])
    config = parse_smtp_url(url)
    assert (config.host, config.port, config.tls) == ("mailpit", 1025, TlsMode.OFF)


def test_dashboard_command_is_accepted_and_published(compose: dict[str, Any]) -> None:
    spec = compose["services"]["dashboard"]
    assert spec["command"][:3] == ["python", "-m", "dispatcher.dashboard"]
    args = dashboard_main.parse_args(spec["command"][3:])
    assert f"{args.port}:{args.port}" in spec["ports"]
    environment = spec["environment"]
    for required in ("DISPATCH_DASHBOARD_USER", "DISPATCH_DASHBOARD_PASSWORD", "DISPATCH_API_TOKEN"):
        assert resolve(environment[required]) == f"<{required}>", f"{required} must be required, not default"


def test_dockerfile_ships_the_entry_points_the_compose_file_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("dispatcher", "worker.py", "enqueue.py", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.MULTILINE), path
    assert "USER " in dockerfile


def test_readme_documents_every_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in ENVIRONMENT if f"`{name}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_the_workers_outcome_journal_is_on_a_volume(compose: dict[str, Any]) -> None:
    """An outcome journaled while Redis was away must survive the worker container's restart."""
    worker_spec = compose["services"]["worker"]
    journal = worker_spec["environment"]["DISPATCH_JOURNAL_DIR"]
    mounts = {volume.split(":", 1)[1]: volume.split(":", 1)[0] for volume in worker_spec["volumes"]}
    assert mounts.get(journal) in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"chown dispatcher {journal}" in dockerfile
