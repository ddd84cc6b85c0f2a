"""Start-up and operation (issue 9, CONTRACT §1 "A service that cannot start…", §2 HEALTHGATE_LOG_FORMAT and
HEALTHGATE_HEALTH_PORT, §3 OpenAPI and /docs): real processes, real ports, real broker and database.

Time limits here are only guards against a hang (a process that never exits fails the test); no test
asserts how fast something happened.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import pty
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from openapi_spec_validator import validate
from playwright.async_api import async_playwright, expect

from services.api.routes import ENDPOINTS
from services.poller.agent_tls import agent_ssl_context
from shared.settings import load_settings
from tests.support.blackhole import Blackhole, refused_port
from tests.support.cli_forks import CliForks
from tests.support.fake_agent import make_agent_certs
from tests.support.processes import ServiceProcess, free_port, start_together
from tests.support.tcp_proxy import tcp_proxy
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, chromium_installed, script_problems, watch

HEALTHGATE = [sys.executable, "-m", "services.cli"]
WORKERS = ("poller", "gate", "pruner")
SERVICES = ("api", *WORKERS)
# Guards against a hang, not speed goals.
EXIT_GUARD_SECONDS = 60
# How many `healthgate` processes that only fail at start run_cli_each runs at a time: most of each one's second is
# Python importing the service, which leaves the other core idle.
CLI_RUNS_AT_ONCE = 4
# What must never appear in a service's output: a traceback, or asyncio's reports of a task that failed or
# was dropped without anyone looking.
NOISE = ("Traceback", "never retrieved", "was destroyed but it is pending", '"exception":')


def port_variable(service: str) -> str:
    return "HEALTHGATE_API_PORT" if service == "api" else "HEALTHGATE_HEALTH_PORT"


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A 127.0.0.1 port another server is listening on for the duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def run_cli(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEALTHGATE, *arguments], env={**os.environ, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=EXIT_GUARD_SECONDS,
    )  # fmt: skip


def run_cli_each(arguments: tuple[str, ...], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess[str]]:
    """`run_cli(*arguments, env=env)` for each env, a few processes at a time (they are independent: each only
    reads its settings and exits), in the order of `envs`."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=CLI_RUNS_AT_ONCE) as pool:
        return list(pool.map(lambda env: run_cli(*arguments, env=env), envs))


def assert_one_line(stderr: str, *fragments: str) -> str:
    """stderr is exactly one line, holding every fragment, without a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def dependencies_down() -> Iterator[dict[str, str]]:
    """Database and broker URLs on which nothing answers: a service cannot lean on them to fail."""
    with refused_port() as database_port, refused_port() as broker_port:
        yield {
            "HEALTHGATE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{database_port}/healthgate",
            "HEALTHGATE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{broker_port}/",
        }


@pytest.fixture(scope="module")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliForks]:
    """`healthgate SERVICE` cases that fail at start, as forks of one process that imported every service once
    (tests/support/cli_forks.py): each whole process spends a second or two importing its service before it meets
    what it is tested for. Whole processes still meet the same failures in test_an_unusable_key_file_stops_the_service_
    with_one_line, test_unusable_agent_tls_files_stop_the_poller_with_one_line, test_several_bad_agent_tls_files_are_
    named_in_one_line, the `up` case of test_a_bad_setting_stops_the_service_with_one_line and the `up` tests."""
    preload = tuple(f"services.{service}.app" for service in SERVICES)
    with CliForks(preload, tmp_path_factory.mktemp("forks") / "server.stderr") as server:
        yield server


# ---- a service that cannot start -----------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("dependencies", ["up", "down"])
def test_a_taken_port_stops_the_service_with_one_line(
    service: str, dependencies: str, service_env: dict[str, str], dependencies_down: dict[str, str], forks: CliForks
) -> None:
    env = service_env | (dependencies_down if dependencies == "down" else {})
    with taken_port() as port:
        result = forks.run(service, env=env | {port_variable(service): str(port)}, timeout=EXIT_GUARD_SECONDS)
    assert result.returncode != 0
    assert_one_line(result.stderr, f"healthgate {service}:", f"127.0.0.1:{port}", "address already in use")
    assert result.stdout == ""


@pytest.mark.parametrize("service", SERVICES)
def test_an_address_the_machine_does_not_have_stops_the_service_with_one_line(
    service: str, service_env: dict[str, str], forks: CliForks
) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never a local address, and binding sends no packet.
    env = service_env | {"HEALTHGATE_API_HOST": "192.0.2.1", port_variable(service): "0"}
    result = forks.run(service, env=env, timeout=EXIT_GUARD_SECONDS)
    assert result.returncode != 0
    assert_one_line(result.stderr, f"healthgate {service}:", "cannot listen on 192.0.2.1:0")


@pytest.mark.parametrize("service", ["api", "poller"])
def test_an_unusable_key_file_stops_the_service_with_one_line(
    service: str, service_env: dict[str, str], dependencies_down: dict[str, str], tmp_path: Path
) -> None:
    malformed = tmp_path / "malformed.key"
    malformed.write_text("not a key")
    directory = tmp_path / "a-directory.key"  # unreadable as a file, even for root
    directory.mkdir()
    blocked = tmp_path / "a-file" / "health-check.key"  # neither there nor creatable: its parent is a file
    blocked.parent.write_text("")
    env = service_env | dependencies_down | {port_variable(service): "0"}
    cases = ((malformed, "malformed"), (directory, "cannot read"), (blocked, "key file"))
    results = run_cli_each((service,), [env | {"HEALTHGATE_KEY_FILE": str(key_file)} for key_file, _ in cases])
    for (key_file, says), result in zip(cases, results, strict=True):
        assert result.returncode != 0, result.stderr
        assert_one_line(result.stderr, f"healthgate {service}:", str(key_file), says)
    assert malformed.read_text() == "not a key"  # never overwritten


def test_unusable_agent_tls_files_stop_the_poller_with_one_line(service_env: dict[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = (
        {"HEALTHGATE_AGENT_CA_FILE": str(tmp_path / "missing.pem")},
        {"HEALTHGATE_AGENT_CA_FILE": str(garbage)},
        {"HEALTHGATE_AGENT_CERT_FILE": str(garbage), "HEALTHGATE_AGENT_KEY_FILE": str(garbage)},
    )
    for result in run_cli_each(
        ("poller",), [service_env | settings | {"HEALTHGATE_HEALTH_PORT": "0"} for settings in cases]
    ):
        assert result.returncode != 0, result.stderr
        assert_one_line(result.stderr, "healthgate poller:", "agent TLS")


@contextlib.contextmanager
def odd_files(directory: Path) -> Iterator[list[tuple[Path, str]]]:
    """Paths that name something other than a small regular file, each with what the error line must say:
    opening a FIFO for reading waits for a writer forever, `/dev/zero` and `/dev/urandom` never end, a socket
    cannot be opened, a directory cannot be read (even by root, which chmod 000 would not stop), and so on."""
    directory.mkdir(parents=True, exist_ok=True)
    fifo = directory / "a-fifo"
    os.mkfifo(fifo)
    directory_path = directory / "a-directory"
    directory_path.mkdir()
    huge = directory / "huge"
    with huge.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: large without taking the disk
    dangling = directory / "dangling"
    dangling.symlink_to(directory / "nowhere")
    to_fifo = directory / "link-to-fifo"
    to_fifo.symlink_to(fifo)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(directory / "a-socket"))
        yield [
            (fifo, "is a FIFO"),
            (to_fifo, "is a FIFO"),
            (Path("/dev/zero"), "is a character device"),
            (Path("/dev/urandom"), "is a character device"),
            (directory / "a-socket", "is a socket"),
            (directory_path, "is a directory"),
            (huge, "is larger than"),
            (dangling, "symbolic link to a missing file"),
        ]


@pytest.mark.parametrize("service", ["api", "poller"])
def test_a_key_file_that_is_no_regular_file_stops_the_service_with_one_line(
    service: str, service_env: dict[str, str], dependencies_down: dict[str, str], tmp_path: Path, forks: CliForks
) -> None:
    """Each exits non-zero (it never waits on a FIFO or reads a device forever) with one line naming the variable,
    the file and what it is."""
    env = service_env | dependencies_down | {port_variable(service): "0"}
    with odd_files(tmp_path) as files:
        results = forks.run_each(
            (service,),
            [env | {"HEALTHGATE_KEY_FILE": str(key_file)} for key_file, _ in files],
            timeout=EXIT_GUARD_SECONDS,
        )
        for (key_file, says), result in zip(files, results, strict=True):
            assert result.returncode != 0, result.stderr
            assert_one_line(result.stderr, f"healthgate {service}:", "HEALTHGATE_KEY_FILE", str(key_file), says)
    assert not (tmp_path / "nowhere").exists()  # a dangling link is not followed to create a key


@pytest.mark.parametrize("service", ["api", "poller"])
def test_an_empty_key_file_setting_stops_the_service_with_one_line(
    service: str, service_env: dict[str, str], dependencies_down: dict[str, str], forks: CliForks
) -> None:
    env = service_env | dependencies_down | {port_variable(service): "0", "HEALTHGATE_KEY_FILE": ""}
    result = forks.run(service, env=env, timeout=EXIT_GUARD_SECONDS)
    assert result.returncode != 0
    assert_one_line(result.stderr, f"healthgate {service}:", "HEALTHGATE_KEY_FILE", "empty")


def pem_variants(directory: Path) -> dict[str, Path]:
    """An agent CA, a client certificate and key it signed, and wrong versions of each, as files."""
    certs = make_agent_certs(directory / "certs")
    key = serialization.load_pem_private_key(certs.client_key.read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate(certs.client_cert.read_bytes())
    files = {
        "ca": certs.ca_cert,
        "cert": certs.client_cert,
        "key": certs.client_key,
        "other key": certs.rogue_client_key,
        "encrypted key": directory / "encrypted.key",
        "der cert": directory / "client.der",
        "cert with key": directory / "client-with-key.pem",
        "cert with encrypted key": directory / "client-with-encrypted-key.pem",
        "garbage": directory / "garbage.pem",
        "broken pem": directory / "broken.pem",
        "empty": directory / "empty.pem",
    }
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )
    files["encrypted key"].write_bytes(encrypted)
    files["der cert"].write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    files["cert with key"].write_bytes(certs.client_cert.read_bytes() + certs.client_key.read_bytes())
    files["cert with encrypted key"].write_bytes(certs.client_cert.read_bytes() + encrypted)
    files["garbage"].write_text("this is not PEM\n")
    files["broken pem"].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    files["empty"].write_bytes(b"")
    return files


CA, CERT, KEY = "HEALTHGATE_AGENT_CA_FILE", "HEALTHGATE_AGENT_CERT_FILE", "HEALTHGATE_AGENT_KEY_FILE"


def test_each_bad_agent_tls_file_stops_the_poller_with_one_line_naming_it(
    service_env: dict[str, str], dependencies_down: dict[str, str], tmp_path: Path, forks: CliForks
) -> None:
    """Every case exits non-zero with one line naming the variable and the file at fault and saying what is wrong
    in words (never OpenSSL's "[SSL] PEM lib"); none hangs, not even on a FIFO or a passphrase-protected key."""
    pem = pem_variants(tmp_path)
    good = {CA: pem["ca"], CERT: pem["cert"], KEY: pem["key"]}
    cases: list[tuple[dict[str, Path], str, Path, str]] = [
        ({CA: tmp_path / "missing.pem"}, CA, tmp_path / "missing.pem", "does not exist"),
        ({CA: pem["garbage"]}, CA, pem["garbage"], "not a PEM certificate"),
        ({CA: pem["broken pem"]}, CA, pem["broken pem"], "does not decode"),
        ({CA: pem["key"]}, CA, pem["key"], "not a PEM certificate"),
        ({CA: pem["empty"]}, CA, pem["empty"], "empty"),
        ({CA: pem["der cert"]}, CA, pem["der cert"], "DER"),
        ({CERT: pem["cert"]}, CERT, pem["cert"], f"no private key and {KEY} is not set"),
        (good | {KEY: tmp_path / "missing.key"}, KEY, tmp_path / "missing.key", "does not exist"),
        (good | {KEY: pem["other key"]}, KEY, pem["other key"], f"does not match the certificate in {CERT}"),
        (good | {KEY: pem["encrypted key"]}, KEY, pem["encrypted key"], "encrypted"),
        (good | {KEY: pem["garbage"]}, KEY, pem["garbage"], "not a PEM private key"),
        (good | {KEY: pem["cert"]}, KEY, pem["cert"], "a certificate, not a private key"),
        (good | {CERT: pem["der cert"]}, CERT, pem["der cert"], "DER"),
        (good | {CERT: pem["garbage"]}, CERT, pem["garbage"], "not a PEM certificate"),
        (good | {CERT: pem["key"]}, CERT, pem["key"], "not a PEM certificate"),
        ({CERT: pem["cert with encrypted key"]}, CERT, pem["cert with encrypted key"], "encrypted"),
        ({KEY: pem["key"]}, KEY, pem["key"], f"set without {CERT}"),
    ]
    with odd_files(tmp_path / "odd") as odd:
        for path, says in odd:
            cases += [
                ({CA: path}, CA, path, says),
                (good | {CERT: path}, CERT, path, says),
                (good | {KEY: path}, KEY, path, says),
            ]
        env = service_env | dependencies_down | {"HEALTHGATE_HEALTH_PORT": "0"}
        results = forks.run_each(
            ("poller",),
            [env | {name: str(value) for name, value in settings.items()} for settings, *_ in cases],
            timeout=EXIT_GUARD_SECONDS,
        )
        for (settings, variable, path, says), result in zip(cases, results, strict=True):
            assert result.returncode != 0, (settings, result.stderr)
            line = assert_one_line(result.stderr, "healthgate poller:", "agent TLS", f"{variable} {path}", says)
            assert "PEM lib" not in line and "Errno" not in line


def test_several_bad_agent_tls_files_are_named_in_one_line(
    service_env: dict[str, str], dependencies_down: dict[str, str], tmp_path: Path
) -> None:
    pem = pem_variants(tmp_path)
    settings = {CA: tmp_path / "missing-ca.pem", CERT: pem["cert"], KEY: pem["other key"]}
    env = service_env | dependencies_down | {"HEALTHGATE_HEALTH_PORT": "0"}
    result = run_cli("poller", env=env | {name: str(value) for name, value in settings.items()})
    assert result.returncode != 0
    assert_one_line(result.stderr, f"{CA} {settings[CA]} does not exist", f"{KEY} {settings[KEY]}", "does not match")


def test_agent_tls_files_that_work(tmp_path: Path) -> None:
    """The context the poller builds: the CA alone, a certificate with its key in the same file, or in a file of
    its own; an empty variable is unset (compose's `${VAR:-}`)."""
    pem = pem_variants(tmp_path)
    assert agent_ssl_context(None, None, None) is None
    working = ((pem["ca"], None, None), (pem["ca"], pem["cert with key"], None), (None, pem["cert"], pem["key"]))
    for ca, cert, key in working:
        context = agent_ssl_context(ca, cert, key)
        assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.MonkeyPatch.context() as patch:
        for variable in (CA, CERT, KEY):
            patch.setenv(variable, "")
        assert load_settings().agent_tls_files() == (None, None, None)


@pytest.mark.parametrize("service", [*SERVICES, "up"])
def test_a_bad_setting_stops_the_service_with_one_line(
    service: str, service_env: dict[str, str], forks: CliForks
) -> None:
    env = service_env | {"HEALTHGATE_PRUNE_INTERVAL_SECONDS": "soon"}
    # `up` as a whole process (it starts the others as whole processes), each service as a fork.
    result = run_cli(service, env=env) if service == "up" else forks.run(service, env=env, timeout=EXIT_GUARD_SECONDS)
    assert result.returncode != 0
    assert_one_line(result.stderr, f"healthgate {service}:", "HEALTHGATE_PRUNE_INTERVAL_SECONDS")


# ---- healthgate up -------------------------------------------------------------------------------------------------


def run_up(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`healthgate up` in a session of its own, so that the test can see whether any of its children is left."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*HEALTHGATE, "up"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def processes_left(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_stops_every_service_and_fails_when_one_cannot_start(service_env: dict[str, str], tmp_path: Path) -> None:
    log_path = tmp_path / "up.log"
    with taken_port() as port:
        up = run_up(service_env | {"HEALTHGATE_API_PORT": str(port), "HEALTHGATE_HEALTH_PORT": "0"}, log_path)
        try:
            code = up.wait(EXIT_GUARD_SECONDS)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == 1, output
    assert f"healthgate api: cannot listen on 127.0.0.1:{port}: address already in use" in output
    assert "api exited with status 1; stopping the other services" in output
    assert not processes_left(up.pid), "a service outlived `healthgate up`"
    assert not any(noise in output for noise in NOISE), output


def test_up_refuses_one_health_port_for_every_worker(service_env: dict[str, str], tmp_path: Path) -> None:
    log_path = tmp_path / "up.log"
    up = run_up(service_env | {"HEALTHGATE_HEALTH_PORT": str(free_port())}, log_path)
    assert up.wait(EXIT_GUARD_SECONDS) == 1
    output = log_path.read_text()
    assert_one_line(output, "healthgate up:", "HEALTHGATE_HEALTH_PORT")
    assert not processes_left(up.pid)


# ---- the broker down at start, or lost -----------------------------------------------------------------------------


def start_unready(service: str, env: dict[str, str], log_path: Path) -> ServiceProcess:
    """Start a service whose dependencies may be down: wait only for /health/live."""
    port = free_port()
    env = env | {port_variable(service): str(port)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*HEALTHGATE, service], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    started = ServiceProcess(service, process, log_path, f"http://127.0.0.1:{port}", env, port)
    deadline = time.monotonic() + EXIT_GUARD_SECONDS
    while True:
        assert process.poll() is None, f"{service} exited with {process.returncode}:\n{started.log_text()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(started.base_url + "/health/live", timeout=1).status_code == 200:
                return started
        assert time.monotonic() < deadline, f"{service} never answered /health/live:\n{started.log_text()}"
        time.sleep(0.1)


def wait_ready(service: ServiceProcess) -> None:
    """Until /health/ready answers 200 (its start and first database answer may take a moment on a busy machine)."""
    deadline = time.monotonic() + EXIT_GUARD_SECONDS
    while (status := httpx.get(service.base_url + "/health/ready", timeout=10).status_code) != 200:
        assert time.monotonic() < deadline, f"{service.name} never ready ({status}):\n{service.log_text()}"
        time.sleep(0.1)


def wait_for_log(service: ServiceProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + EXIT_GUARD_SECONDS
    while service.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{service.name} never logged {text!r}:\n{service.log_text()}"
        time.sleep(0.1)


def assert_clean_json_log(text: str) -> list[dict[str, Any]]:
    """Every line of the log is one JSON record, none of them a traceback or asyncio's leftovers."""
    assert not any(noise in text for noise in NOISE), text
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("broker", ["refusing", "silent"])
def test_services_start_while_the_broker_is_down_without_tracebacks(
    broker: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if broker == "refusing":
            broker_port = stack.enter_context(refused_port())
        else:  # accepts the connection and never answers: the first attempt is still running when we stop
            broker_port = stack.enter_context(Blackhole()).port
        env = service_env | {"HEALTHGATE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{broker_port}/"}
        services = start_together(
            *(functools.partial(start_unready, name, env, tmp_path / f"{name}.log") for name in SERVICES)
        )
        try:
            for service in services:
                if service.name == "pruner":  # it needs no broker: ready once started and its database answers
                    wait_ready(service)
                else:
                    assert httpx.get(service.base_url + "/health/ready", timeout=10).status_code == 503
                if broker == "refusing" and service.name != "pruner":
                    wait_for_log(service, "cannot connect to RabbitMQ, retrying", count=2)
            for service in services:
                service.process.send_signal(signal.SIGTERM)
            codes = {service.name: service.process.wait(EXIT_GUARD_SECONDS) for service in services}
        finally:
            for service in services:
                service.stop(signal.SIGKILL)
    assert codes == dict.fromkeys(SERVICES, 0)
    for service in services:
        records = assert_clean_json_log(service.log_text())
        assert not any(record["level"] == "error" for record in records), service.log_text()
        if broker == "refusing" and service.name != "pruner":
            retries = [record for record in records if record["message"] == "cannot connect to RabbitMQ, retrying"]
            assert retries and all(record["level"] == "warning" for record in retries)
            assert str(broker_port) in retries[0]["url"]


@pytest.mark.slow
def test_a_lost_broker_connection_is_one_warning_and_comes_back(service_env: dict[str, str], tmp_path: Path) -> None:
    amqp = urlsplit(service_env["HEALTHGATE_AMQP_URL"])
    with tcp_proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as proxy:
        env = service_env | {"HEALTHGATE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/"}
        services = start_together(
            *(functools.partial(start_unready, name, env, tmp_path / f"{name}.log") for name in ("api", "gate"))
        )
        try:
            for service in services:
                wait_for_log(service, "connected to RabbitMQ")
            proxy.cut()
            for service in services:
                wait_for_log(service, "lost the connection to RabbitMQ, reconnecting")
            proxy.restore()
            for service in services:
                wait_for_log(service, "reconnected to RabbitMQ")
                assert httpx.get(service.base_url + "/health/ready", timeout=10).status_code == 200
        finally:
            codes = [service.stop() for service in services]
    assert codes == [0, 0]
    for service in services:
        records = assert_clean_json_log(service.log_text())
        assert not any(record["level"] == "error" for record in records), service.log_text()


# ---- the start line, logs, --version -------------------------------------------------------------------------------


def test_each_service_logs_the_urls_it_serves(
    api: ServiceProcess, service_env: dict[str, str], dependencies_down: dict[str, str], tmp_path: Path
) -> None:
    started = [json.loads(line) for line in api.log_text().splitlines() if '"api started' in line]
    assert len(started) == 1
    for path in ("/", "/docs", "/api/v1", "/metrics"):
        assert f"{api.base_url}{path}" in started[0]["message"]
    # Port 0: the line names the port the service really got, and its URLs answer.
    env = service_env | dependencies_down | {"HEALTHGATE_HEALTH_PORT": "0"}
    log_path = tmp_path / "pruner.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*HEALTHGATE, "pruner"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    pruner = ServiceProcess("pruner", process, log_path, "", env, 0)
    try:
        wait_for_log(pruner, "pruner started")
        line = next(json.loads(line) for line in pruner.log_text().splitlines() if "pruner started" in line)
        urls = re.findall(r"http://\S+?(?=,|$)", line["message"])
        assert [urlsplit(url).path for url in urls] == ["/health", "/metrics"]
        assert all(urlsplit(url).port == line["port"] != 0 for url in urls)
        assert httpx.get(urls[0], timeout=10).json()["status"] == "fail"  # its database is down
        assert "healthgate_pruned_rows" in httpx.get(urls[1], timeout=10).text
    finally:
        assert pruner.stop() == 0


def test_version() -> None:
    result = run_cli("--version", env={"HEALTHGATE_CHECK_TIMEOUT_SECONDS": "bad"})  # needs no valid settings
    assert result.returncode == 0 and result.stdout == f"healthgate {version('healthgate')}\n"


def run_with_terminal_stderr(arguments: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; its exit code and what it wrote there."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        arguments, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary
    )
    os.close(secondary)
    output = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed its end
        while chunk := os.read(primary, 65536):
            output += chunk
    os.close(primary)
    return process.wait(EXIT_GUARD_SECONDS), output.decode(errors="replace")


def test_log_format_is_text_on_a_terminal_and_json_otherwise(service_env: dict[str, str]) -> None:
    env = {key: value for key, value in {**os.environ, **service_env}.items() if key != "HEALTHGATE_LOG_FORMAT"}
    piped = subprocess.run(
        [*HEALTHGATE, "migrate"], env=env, capture_output=True, text=True, timeout=EXIT_GUARD_SECONDS
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stderr.splitlines()[-1])["message"] == "database is up to date"

    code, text = run_with_terminal_stderr([*HEALTHGATE, "migrate"], env)
    assert code == 0, text
    line = text.strip().splitlines()[-1]
    assert "INFO cli healthgate: database is up to date" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)

    code, text = run_with_terminal_stderr([*HEALTHGATE, "migrate"], env | {"HEALTHGATE_LOG_FORMAT": "json"})
    assert code == 0 and json.loads(text.strip().splitlines()[-1])["message"] == "database is up to date"


# ---- OpenAPI and /docs ---------------------------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_1(api: ServiceProcess) -> None:
    document = httpx.get(f"{api.base_url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    validate(document)  # openapi-spec-validator: the whole document against the OpenAPI 3.1 schema
    schemas = document["components"]["schemas"]
    assert all(re.fullmatch(r"[a-zA-Z0-9._-]+", name) for name in schemas), list(schemas)
    references = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    assert references and all(reference.startswith("#/components/schemas/") for reference in references)
    assert {reference.rsplit("/", 1)[1] for reference in references} <= schemas.keys()
    assert "Page_HostView_" in schemas


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for attribute in ("src", "href"):
            if found.get(attribute):
                self.urls.append(found[attribute] or "")
        if tag == "script" and not found.get("src"):
            self.inline_scripts += 1


def test_docs_page_serves_every_asset_itself(api: ServiceProcess) -> None:
    page = httpx.get(f"{api.base_url}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assets = _Assets()
    assets.feed(page.text)
    assert assets.inline_scripts == 0 and len(assets.urls) >= 3
    for url in assets.urls:
        assert url.startswith("/") and not url.startswith("//"), url  # this origin, never a CDN
        answer = httpx.get(f"{api.base_url}{url}", timeout=10)
        assert answer.status_code == 200, url
        assert answer.content
    assert "/openapi.json" in httpx.get(f"{api.base_url}/docs/init.js", timeout=10).text
    # The bundle's demo page (which loads the Petstore from the internet) and anything else are not served.
    for path in ("/docs/assets/index.html", "/docs/assets/swagger-initializer.js", "/docs/assets/..%2F__init__.py"):
        assert httpx.get(f"{api.base_url}{path}", timeout=10).status_code == 404, path


async def test_docs_page_lists_every_operation_in_a_browser(api: ServiceProcess) -> None:
    if not chromium_installed():
        pytest.fail(f"{CHROMIUM} is missing: run `make test-deps` (apt-get install chromium chromium-driver)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = watch(await browser.new_page())
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(f"{api.base_url}/docs")
            await expect(page.locator(".opblock")).to_have_count(len(ENDPOINTS), timeout=20_000)
            await expect(page.locator(".opblock-summary-path").first).to_contain_text("/api/v1/")
            assert script_problems(page) == []
            assert requested and all(url.startswith(api.base_url + "/") for url in requested), requested
        finally:
            await browser.close()
