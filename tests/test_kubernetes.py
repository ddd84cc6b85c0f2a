"""deploy/kubernetes/, checked without a cluster or the kubectl binary.

The Kustomize directories are rendered by a small reading of their `kustomization.yaml` (the resources it lists,
recursively, then its `namespace` and `images`); every object is validated against the Kubernetes API's JSON
schemas bundled with kubernetes-validate (offline, strict: an unknown field is an error) for a pinned Kubernetes
version; each container's arguments are checked against the CLI, as tests/test_compose.py does; and the probes,
ports, key file, security settings and grace periods against CONTRACT §1 and §2.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.test_compose import healthgate_executable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
OVERLAYS = [BASE, DEPLOY / "examples"]
# The oldest Kubernetes still widely run by managed offerings; the manifests use nothing newer.
KUBERNETES_VERSION = "1.30"
IMAGE = "healthgate"  # the image name in the base (the Dockerfile's image; overlays point it at a registry)
KEY_FILE = "/etc/healthgate/keys/health-check.key"
IMAGE_UID = 10001  # Dockerfile: useradd --uid 10001
# Custom resources (no schema in kubernetes-validate): their API group and the fields the examples rely on.
CUSTOM_RESOURCES = {("rabbitmq.com/v1beta1", "RabbitmqCluster")}
# CONTRACT §2: where each long-running service serves /health/live and /health/ready.
SERVICE_PORT_VARIABLE = {
    "api": "HEALTHGATE_API_PORT",
    "poller": "HEALTHGATE_HEALTH_PORT",
    "gate": "HEALTHGATE_HEALTH_PORT",
    "notifier": "HEALTHGATE_HEALTH_PORT",
}
CONTRACT_PORT = {"api": 8080, "poller": 8081, "gate": 8082, "notifier": 8084}
# The services that load the key file (shared.crypto.load_or_create_key): api, poller, notifier.
NEEDS_KEY = {"api", "poller", "notifier"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    (document,) = load_documents(directory / "kustomization.yaml")
    return document


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` makes, for what our kustomizations use: `resources` (files and
    directories holding a kustomization, in order), then `namespace` and `images` applied to them all."""
    spec = kustomization(directory)
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        objects.extend(render(target) if target.is_dir() else load_documents(target))
    namespace = spec.get("namespace")
    images = {image["name"]: image for image in spec.get("images", [])}
    for obj in objects:
        if namespace and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = namespace
        for container in all_containers(obj):
            name, _, tag = container["image"].partition(":")
            if name in images:
                image = images[name]
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def all_containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def base_objects() -> list[dict[str, Any]]:
    return render(BASE)


def object_id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def all_rendered() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{directory.relative_to(DEPLOY)}:{object_id(obj)}", obj)
        for directory in OVERLAYS
        for obj in render(directory)
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in base_objects() if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in {BASE}, found {len(matches)}"
    return matches[0]


def config_map() -> dict[str, str]:
    return find("ConfigMap", "healthgate-config")["data"]


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment: the ConfigMaps it takes whole (envFrom), then its own `env` values."""
    config_maps = {obj["metadata"]["name"]: obj.get("data", {}) for obj in base_objects() if obj["kind"] == "ConfigMap"}
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(config_maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
    return values


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {entry.get("name"): entry["containerPort"] for entry in container.get("ports", [])}
    assert port in named, f"container {container['name']!r}: probe port {port!r} is not one of its named ports"
    return int(named[port])


@cache
def subcommand_help(subcommand: str) -> str:
    completed = subprocess.run(
        [healthgate_executable(), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert completed.returncode == 0, (
        f"`healthgate {subcommand} --help` exited {completed.returncode}\n{completed.stderr}"
    )
    return completed.stdout


# --- the kustomizations --------------------------------------------------------------------------------------


def test_the_base_lists_every_manifest_beside_it() -> None:
    listed = {entry for entry in kustomization(BASE)["resources"]}
    present = {path.name for path in BASE.glob("*.yaml") if path.name != "kustomization.yaml"}
    assert listed == present, f"listed but missing: {listed - present}; present but not listed: {present - listed}"


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda path: str(path.relative_to(DEPLOY)))
def test_kustomization_resources_exist(directory: Path) -> None:
    spec = kustomization(directory)
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    for entry in spec["resources"]:
        target = directory / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{directory}: {entry} is missing"


def test_every_yaml_file_is_used_or_an_example() -> None:
    used = {(directory / entry).resolve() for directory in OVERLAYS for entry in kustomization(directory)["resources"]}
    for path in DEPLOY.rglob("*.yaml"):
        if path.name == "kustomization.yaml" or path.name.endswith(".example.yaml"):
            continue
        assert path.resolve() in used, f"{path.relative_to(ROOT)} is in no kustomization"


# --- schemas ---------------------------------------------------------------------------------------------------


def objects_to_validate() -> list[tuple[str, dict[str, Any]]]:
    examples = [
        (f"{path.relative_to(DEPLOY)}:{object_id(obj)}", obj)
        for path in sorted(DEPLOY.rglob("*.example.yaml"))
        for obj in load_documents(path)
    ]
    return all_rendered() + examples


@pytest.mark.parametrize(("label", "obj"), objects_to_validate(), ids=[label for label, _ in objects_to_validate()])
def test_object_matches_the_kubernetes_schema(label: str, obj: dict[str, Any]) -> None:
    if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
        assert obj["metadata"]["name"] and isinstance(obj.get("spec"), dict), label
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(map(str, error.absolute_path)) or "<root>"
        pytest.fail(f"{label}: {where}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        pytest.fail(f"{label}: {error.message}")


def test_the_validator_is_strict() -> None:
    """A misspelt field must fail: otherwise the schema test above would pass anything."""
    deployment = find("Deployment", "healthgate-api")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    main_container(broken)["livenessProbe"]["httpGett"] = {"path": "/health/live"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_pod_selectors_match_their_templates() -> None:
    for obj in base_objects():
        if obj["kind"] == "Deployment":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            for key, value in obj["spec"]["selector"]["matchLabels"].items():
                assert labels.get(key) == value, f"{object_id(obj)}: selector {key}={value} misses its pods"
    service = find("Service", "healthgate-api")
    api_labels = find("Deployment", "healthgate-api")["spec"]["template"]["metadata"]["labels"]
    assert all(api_labels.get(key) == value for key, value in service["spec"]["selector"].items())
    (port,) = service["spec"]["ports"]
    assert resolve_port(main_container(find("Deployment", "healthgate-api")), port["targetPort"]) == 8080


# --- commands --------------------------------------------------------------------------------------------------


def healthgate_containers() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{object_id(obj)}:{container['name']}", container)
        for obj in base_objects()
        for container in all_containers(obj)
    ]


@pytest.mark.parametrize(("label", "container"), healthgate_containers(), ids=[n for n, _ in healthgate_containers()])
def test_container_runs_a_healthgate_subcommand(label: str, container: dict[str, Any]) -> None:
    # The image's ENTRYPOINT is `healthgate` (Dockerfile): `args` are its arguments, and `command` would replace it.
    assert container["image"].split(":")[0] == IMAGE, f"{label}: not the healthgate image"
    assert "command" not in container, f"{label}: `command` replaces the image's `healthgate` entrypoint"
    args = container.get("args") or []
    assert args, f"{label}: no subcommand"
    help_text = subcommand_help(args[0])
    for option in args[1:]:
        if option.startswith("-"):
            assert re.search(rf"(?<![\w-]){re.escape(option.split('=')[0])}(?![\w-])", help_text), (
                f"{label}: `healthgate {args[0]}` has no option {option}"
            )


def test_migrate_job_and_pruner_cronjob() -> None:
    job = find("Job", "healthgate-migrate")
    assert [container["args"] for container in all_containers(job)] == [["migrate"]]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    cron = find("CronJob", "healthgate-pruner")
    assert [container["args"] for container in all_containers(cron)] == [["prune", "--once"]]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # Every Deployment migrates first (init container): Kubernetes cannot make it wait for the Job.
    for obj in base_objects():
        if obj["kind"] == "Deployment":
            init = obj["spec"]["template"]["spec"].get("initContainers", [])
            assert [container["args"] for container in init] == [["migrate"]], object_id(obj)


def test_services_and_replicas() -> None:
    for name in ("api", "poller", "gate", "notifier"):
        deployment = find("Deployment", f"healthgate-{name}")
        assert main_container(deployment)["args"] == [name]
    assert find("Deployment", "healthgate-gate")["spec"]["replicas"] >= 2
    poller = find("Deployment", "healthgate-poller")
    assert "replicas" not in poller["spec"], "the HorizontalPodAutoscaler owns the pollers' count"
    hpa = find("HorizontalPodAutoscaler", "healthgate-poller")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "healthgate-poller"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in main_container(poller)["resources"]["requests"], "a CPU autoscaler needs a CPU request"


# --- probes, ports and configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICE_PORT_VARIABLE))
def test_probes_point_at_the_services_health_port(name: str) -> None:
    container = main_container(find("Deployment", f"healthgate-{name}"))
    env = environment(container)
    variable = SERVICE_PORT_VARIABLE[name]
    assert int(env[variable]) == CONTRACT_PORT[name], f"{name}: {variable}={env.get(variable)}"
    # Probes come from the kubelet, over the pod's IP: the service must not listen on loopback only.
    assert env.get("HEALTHGATE_API_HOST") in ("0.0.0.0", "::"), f"{name}: HEALTHGATE_API_HOST"
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, f"{name}: {probe} on {http_get['path']}"
        assert resolve_port(container, http_get["port"]) == CONTRACT_PORT[name], f"{name}: {probe} port"
    assert CONTRACT_PORT[name] in {port["containerPort"] for port in container["ports"]}


def test_connection_urls_come_from_a_secret() -> None:
    for label, container in healthgate_containers():
        env = environment(container)
        assert "HEALTHGATE_DATABASE_URL" not in env and "HEALTHGATE_AMQP_URL" not in env, label
        secrets = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
        assert secrets == ["healthgate-connections"], label


def test_health_details_are_not_open_to_everyone() -> None:
    networks = config_map()["HEALTHGATE_HEALTH_ALLOWED_NETWORKS"].split(",")
    assert "0.0.0.0/0" not in networks and "::/0" not in networks


@pytest.mark.parametrize("name", sorted(NEEDS_KEY))
def test_key_file_comes_from_a_secret(name: str) -> None:
    deployment = find("Deployment", f"healthgate-{name}")
    container = main_container(deployment)
    assert environment(container)["HEALTHGATE_KEY_FILE"] == KEY_FILE
    directory, _, filename = KEY_FILE.rpartition("/")
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert directory in mounts and mounts[directory].get("readOnly"), f"{name}: key directory not mounted read-only"
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[directory]["name"]]["secret"]
    assert secret["secretName"] == "healthgate-key"
    assert [item["path"] for item in secret["items"]] == [filename]
    # The file belongs to root and the pod's fsGroup: readable by the image's user through the group, by no one else.
    assert secret["defaultMode"] & 0o007 == 0 and secret["defaultMode"] & 0o040
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == IMAGE_UID


# --- security, resources and termination -------------------------------------------------------------------------


def workloads() -> list[dict[str, Any]]:
    return [obj for obj in base_objects() if pod_spec(obj) is not None]


@pytest.mark.parametrize("obj", workloads(), ids=[object_id(obj) for obj in workloads()])
def test_workload_is_locked_down_and_bounded(obj: dict[str, Any]) -> None:
    spec = pod_spec(obj)
    assert spec is not None
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == IMAGE_UID
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    # CONTRACT §1: the services stop gracefully within 20 s of SIGTERM (plus the api's 5 s preStop).
    assert spec["terminationGracePeriodSeconds"] >= 25
    for container in all_containers(obj):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{container['name']}: {bound}"
        # The image's working directory is /tmp: writable although the root file system is not.
        assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}, container["name"]


def test_dockerfile_user_matches_the_pods() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"--uid {IMAGE_UID}" in dockerfile and f"--gid {IMAGE_UID}" in dockerfile
    assert 'ENTRYPOINT ["healthgate"]' in dockerfile and "WORKDIR /tmp" in dockerfile


def test_readme_links_the_kubernetes_guide_and_scaling() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(deploy/kubernetes/README.md)" in readme and "(docs/scaling.md)" in readme
    assert (ROOT / "docs" / "scaling.md").is_file() and (DEPLOY / "README.md").is_file()
