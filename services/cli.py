"""The `healthgate` command (CONTRACT §1)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import asyncpg

from shared.crypto import KeyFileError
from shared.database import DATABASE_ERRORS, DatabaseUnavailable
from shared.logs import configure_logging
from shared.schema import migrate
from shared.settings import ServiceConfigError, Settings, SettingsError, load_settings, redact_url

log = logging.getLogger("healthgate")

CLI_ACTOR = "cli"
STOP_TIMEOUT_SECONDS = 18.0
# gRPC's C core logs through absl straight to stderr: not JSON, and with what a server sent in it unescaped (a
# GOAWAY's debug text); since grpcio 1.65 it writes INFO lines unless GRPC_VERBOSITY says otherwise. Every outcome
# of a grpc check is in its result, so the poller turns gRPC's own logging off unless the operator sets the variable.
GRPC_VERBOSITY = "NONE"


class CommandError(Exception):
    """A command failed for a reason the operator can fix; the message says which."""


def _run_api(settings: Settings) -> int:
    from services.api.app import run_api

    return run_api(settings)


def _run_poller(settings: Settings) -> int:
    # Read once, when grpc is first imported (by services.poller.app): it must be set before.
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY)
    from services.poller.app import run_poller

    return run_poller(settings)


def _run_gate(settings: Settings) -> int:
    from services.gate.app import run_gate

    return run_gate(settings)


def _run_pruner(settings: Settings) -> int:
    from services.pruner.app import run_pruner

    return run_pruner(settings)


def _run_notifier(settings: Settings) -> int:
    from services.notifier.app import run_notifier

    return run_notifier(settings)


# The services this installation provides, in start order; `healthgate up` runs all of them.
SERVICES: dict[str, Callable[[Settings], int]] = {
    "api": _run_api,
    "poller": _run_poller,
    "gate": _run_gate,
    "pruner": _run_pruner,
    "notifier": _run_notifier,
}


def _run_async(coroutine: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coroutine)


async def _connect(settings: Settings) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(settings.database_url)
    except DATABASE_ERRORS as exc:
        raise CommandError(f"cannot connect to {redact_url(settings.database_url)}: {exc}") from None


async def _token_create(settings: Settings, arguments: argparse.Namespace) -> int:
    from shared.tokens import TokenNameTaken, create_token

    connection = await _connect(settings)
    try:
        token = await create_token(
            connection, name=arguments.name, role=arguments.role, groups=arguments.group or [], actor=CLI_ACTOR
        )
    except TokenNameTaken as exc:
        raise CommandError(str(exc)) from None
    except asyncpg.UndefinedTableError:
        raise CommandError("the database has no schema yet: run `healthgate migrate` first") from None
    finally:
        await connection.close()
    print(token)
    return 0


async def _token_list(settings: Settings, arguments: argparse.Namespace) -> int:
    from shared.tokens import list_tokens

    connection = await _connect(settings)
    try:
        rows = await list_tokens(connection)
    finally:
        await connection.close()
    print(f"{'NAME':<32} {'ROLE':<9} {'CREATED':<20} GROUPS")
    for row in rows:
        created = row["created_at"].strftime("%Y-%m-%d %H:%M:%S")
        print(f"{row['name']:<32} {row['role']:<9} {created:<20} {','.join(row['groups']) or '-'}")
    return 0


async def _token_revoke(settings: Settings, arguments: argparse.Namespace) -> int:
    from shared.tokens import revoke_token

    connection = await _connect(settings)
    try:
        revoked = await revoke_token(connection, name=arguments.name, actor=CLI_ACTOR)
    finally:
        await connection.close()
    if not revoked:
        raise CommandError(f"no token named {arguments.name!r}")
    print(f"revoked {arguments.name}", file=sys.stderr)
    return 0


async def _migrate(settings: Settings) -> int:
    applied = await migrate(settings.database_url)
    log.info("database is up to date", extra={"applied": applied})
    return 0


def run_all(services: Sequence[str], settings: Settings) -> int:
    """`healthgate up`: one process per service; SIGINT/SIGTERM stops them all within the deadline.

    When any service exits (one that cannot start exits at once, naming the cause on stderr), the others
    are stopped and `up` exits 1, never running half-started (CONTRACT §1). 0 after a requested stop."""
    if settings.health_port:
        # Every worker would try the same port and all but one would fail: refuse before starting any.
        raise CommandError(
            f"HEALTHGATE_HEALTH_PORT={settings.health_port} would give every worker service the same port; "
            "leave it unset (each service uses its own default) or set it to 0 (free ports, logged at start)"
        )
    stopping = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stopping.set())
    children = {name: subprocess.Popen([sys.executable, "-m", "services.cli", name]) for name in services}
    log.info("started services", extra={"services": list(children)})
    failed: list[str] = []
    while not stopping.is_set():
        for name, child in children.items():
            if child.poll() is not None:
                failed.append(name)
                log.error(
                    f"{name} exited with status {child.returncode}; stopping the other services",
                    extra={"service": name, "code": child.returncode},
                )
                stopping.set()
                break
        stopping.wait(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("service did not stop in time, killing it", extra={"service": name})
            child.kill()
            child.wait()
    if failed:
        log.error(f"stopped all services because {failed[0]} exited", extra={"service": failed[0]})
        return 1
    log.info("all services stopped")
    return 0


def package_version() -> str:
    """The installed package's version (its metadata), for `healthgate --version`."""
    try:
        return version("healthgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthgate", description="Hold patch jobs until hosts are healthy.")
    parser.add_argument("--version", action="version", version=f"healthgate {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SERVICES:
        commands.add_parser(name, help=f"run the {name} service")
    commands.add_parser("up", help="run every service until Ctrl-C or SIGTERM")
    commands.add_parser("migrate", help="create the database if needed and apply migrations")
    prune = commands.add_parser("prune", help="prune expired data (one pass, for cron)")
    prune.add_argument("--once", action="store_true", required=True, help="run one pass and exit")
    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="create a token and print it")
    create.add_argument("--name", required=True, type=_token_name)
    create.add_argument("--role", required=True, choices=("admin", "operator", "viewer"))
    create.add_argument("--group", action="append", type=_group_name, help="a group the token may see (repeat)")
    token_commands.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    return parser


def _bounded_text(label: str, maximum: int) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value.strip() or len(value) > maximum:
            raise argparse.ArgumentTypeError(f"{label} must be 1 to {maximum} characters")
        return value

    return parse


_token_name = _bounded_text("a token name", 100)
_group_name = _bounded_text("a group", 100)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    # A service's one error line names the service: under `healthgate up` four processes share one stderr.
    runs_service = arguments.command in SERVICES or arguments.command == "up"
    prefix = f"healthgate {arguments.command}" if runs_service else "healthgate"
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 2
    service = arguments.command if arguments.command in SERVICES else "cli"
    configure_logging(service, settings.log_format)
    try:
        if arguments.command in SERVICES:
            return SERVICES[arguments.command](settings)
        if arguments.command == "up":
            return run_all(list(SERVICES), settings)
        if arguments.command == "migrate":
            return _run_async(_migrate(settings))
        if arguments.command == "prune":
            from services.pruner.app import prune_command

            return _run_async(prune_command(settings))
        token_commands = {"create": _token_create, "list": _token_list, "revoke": _token_revoke}
        return _run_async(token_commands[arguments.token_command](settings, arguments))
    except (CommandError, DatabaseUnavailable, KeyFileError, ServiceConfigError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
