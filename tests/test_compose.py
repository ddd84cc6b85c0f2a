"""compose.yaml and the Dockerfile, checked without Docker (there is no Docker engine here or in CI)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema.validators import validator_for

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
# A copy kept in the repository (Apache-2.0, see tests/schemas/README.md): a clone needs nothing beside it.
COMPOSE_SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
KEY_DIR = "/etc/healthgate/keys"


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def project_services() -> dict[str, dict]:
    """Services built from this repository (the ones that run `healthgate`)."""
    return {name: svc for name, svc in load_compose()["services"].items() if "build" in svc}


def first_word(command: str | list[str] | None) -> str | None:
    if command is None:
        return None
    words = shlex.split(command) if isinstance(command, str) else list(command)
    return words[0] if words else None


def is_one_shot(service: dict) -> bool:
    # An unquoted `restart: no` reaches us as False.
    return service.get("restart") in ("no", False)


def healthgate_executable() -> str:
    beside_python = Path(sys.executable).parent / "healthgate"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("healthgate")
    assert found, "the healthgate console script is not installed (run `make test`)"
    return found


def schema_validator_class(schema: dict):
    declared = schema.get("$schema", "")
    # The compose schema says https://json-schema.org/draft-07/schema; jsonschema knows it as http://...#.
    candidates = [declared, declared.replace("https://", "http://", 1).rstrip("#") + "#"]
    for candidate in candidates:
        cls = validator_for({"$schema": candidate}, default=None)
        if cls is not None:
            return cls
    raise AssertionError(f"unknown $schema {declared!r} in {COMPOSE_SCHEMA}")


def test_compose_file_matches_the_compose_specification() -> None:
    assert COMPOSE_SCHEMA.is_file(), f"{COMPOSE_SCHEMA} is missing"
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    cls = schema_validator_class(schema)
    cls.check_schema(schema)
    compose = load_compose()
    assert "version" not in compose, "the Compose Specification has no top-level `version`"
    errors = sorted(cls(schema).iter_errors(compose), key=lambda error: list(map(str, error.absolute_path)))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors
    )


def test_dockerfile_exists_and_runs_healthgate() -> None:
    assert DOCKERFILE.is_file()
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["healthgate"]' in text
    assert f"HEALTHGATE_KEY_FILE={KEY_DIR}/health-check.key" in text
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("name", sorted(project_services()))
def test_service_command_is_a_healthgate_subcommand(name: str) -> None:
    service = project_services()[name]
    subcommand = first_word(service.get("command"))
    assert subcommand, f"service {name!r} has no command"
    completed = subprocess.run(
        [healthgate_executable(), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert completed.returncode == 0, (
        f"service {name!r}: `healthgate {subcommand} --help` exited {completed.returncode}\n{completed.stderr}"
    )


@pytest.mark.parametrize("name", sorted(name for name, svc in project_services().items() if not is_one_shot(svc)))
def test_long_running_service_has_a_readiness_healthcheck(name: str) -> None:
    service = project_services()[name]
    healthcheck = service.get("healthcheck") or {}
    assert not healthcheck.get("disable"), f"service {name!r} disables its healthcheck"
    test = healthcheck.get("test")
    text = " ".join(test) if isinstance(test, list) else str(test or "")
    assert "/health/ready" in text, f"service {name!r} has no healthcheck on /health/ready"


def test_migrate_is_one_shot_and_services_wait_for_it() -> None:
    services = project_services()
    assert "migrate" in services and is_one_shot(services["migrate"])
    for name, service in services.items():
        if name == "migrate":
            continue
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"service {name!r}: depends_on needs conditions"
        assert depends_on.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_services_that_need_the_key_share_the_key_volume() -> None:
    compose = load_compose()
    for name in ("api", "poller"):
        service = compose["services"].get(name)
        if service is None:
            continue
        targets = {str(volume).split(":")[1] for volume in service.get("volumes", []) if ":" in str(volume)}
        assert KEY_DIR in targets, f"service {name!r} does not mount the key volume at {KEY_DIR}"
