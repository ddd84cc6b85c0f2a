"""The `healthgate` command (CONTRACT §1)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import asyncpg
import typer

from services import fleet, operator_commands
from shared.crypto import KeyFileError
from shared.database import DATABASE_ERRORS, DatabaseUnavailable
from shared.logs import configure_logging
from shared.schema import migrate
from shared.settings import ServiceConfigError, Settings, SettingsError, load_settings, redact_url

if TYPE_CHECKING:
    from shared.tokens import Role as TokenRole

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


async def _token_create(settings: Settings, name: str, role: TokenRole, groups: list[str]) -> int:
    from shared.tokens import TokenNameTaken, create_token

    connection = await _connect(settings)
    try:
        token = await create_token(connection, name=name, role=role, groups=groups, actor=CLI_ACTOR)
    except TokenNameTaken as exc:
        raise CommandError(str(exc)) from None
    except asyncpg.UndefinedTableError:
        raise CommandError("the database has no schema yet: run `healthgate migrate` first") from None
    finally:
        await connection.close()
    print(token)
    return 0


async def _token_list(settings: Settings) -> int:
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


async def _token_revoke(settings: Settings, name: str) -> int:
    from shared.tokens import revoke_token

    connection = await _connect(settings)
    try:
        revoked = await revoke_token(connection, name=name, actor=CLI_ACTOR)
    finally:
        await connection.close()
    if not revoked:
        raise CommandError(f"no token named {name!r}")
    print(f"revoked {name}", file=sys.stderr)
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


# Typer (on Click) parses the command line: usage errors exit 2, `--install-completion`/`--show-completion` give
# shell completion. Rich's pretty tracebacks are off: an unexpected error is a bug and prints a plain traceback.
app = typer.Typer(
    name="healthgate",
    help="Hold patch jobs until hosts are healthy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"healthgate {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Hold patch jobs until hosts are healthy."""


def execute(command: str, action: Callable[[Settings], int]) -> NoReturn:
    """Run a command that needs the settings (services, `up`, `migrate`, `prune`, `token`): exits 2 when the
    settings are bad, 1 with one line on stderr when it fails for a reason the operator can fix, else its status.
    A service's line names the service: under `healthgate up` the services share one stderr."""
    runs_service = command in SERVICES or command == "up"
    prefix = f"healthgate {command}" if runs_service else "healthgate"
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    configure_logging(command if command in SERVICES else "cli", settings.log_format)
    try:
        code = action(settings)
    except (CommandError, DatabaseUnavailable, KeyFileError, ServiceConfigError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _add_service_command(name: str, run: Callable[[Settings], int]) -> None:
    def command() -> None:
        execute(name, run)

    app.command(name, help=f"Run the {name} service (one process) until Ctrl-C or SIGTERM.")(command)


for _name, _run in SERVICES.items():
    _add_service_command(_name, _run)


@app.command("up")
def _up() -> None:
    """Run every service until Ctrl-C or SIGTERM."""
    execute("up", lambda settings: run_all(list(SERVICES), settings))


@app.command("migrate")
def _migrate_command() -> None:
    """Create the database if needed and apply migrations (idempotent)."""
    execute("migrate", lambda settings: _run_async(_migrate(settings)))


@app.command("prune")
def _prune(
    once: Annotated[bool, typer.Option("--once", help="Run one pass and exit (required).")] = False,
) -> None:
    """Prune expired data: one pass, for cron."""
    if not once:
        raise typer.BadParameter("only one pass is supported: give --once", param_hint="--once")

    def run(settings: Settings) -> int:
        from services.pruner.app import prune_command

        return _run_async(prune_command(settings))

    execute("prune", run)


token_app = typer.Typer(help="Manage API tokens (in the database directly).", no_args_is_help=True)
app.add_typer(token_app, name="token")


class Role(StrEnum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


def _bounded_text(label: str, maximum: int) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value.strip() or len(value) > maximum:
            raise typer.BadParameter(f"{label} must be 1 to {maximum} characters")
        return value

    return parse


_token_name = _bounded_text("a token name", 100)
_group_name = _bounded_text("a group", 100)


def _group_names(values: list[str] | None) -> list[str] | None:
    return [_group_name(value) for value in values] if values else values


@token_app.command("create")
def _token_create_command(
    name: Annotated[str, typer.Option(help="The token's name (unique).", callback=_token_name)],
    role: Annotated[Role, typer.Option(help="What the token may do.")],
    group: Annotated[
        list[str] | None, typer.Option(help="A group the token may see (repeat).", callback=_group_names)
    ] = None,
) -> None:
    """Create a token and print only the token."""
    execute("token", lambda settings: _run_async(_token_create(settings, name, role.value, group or [])))


@token_app.command("list")
def _token_list_command() -> None:
    """List tokens (never the tokens themselves)."""
    execute("token", lambda settings: _run_async(_token_list(settings)))


@token_app.command("revoke")
def _token_revoke_command(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token by name."""
    execute("token", lambda settings: _run_async(_token_revoke(settings, name)))


# Other modules' commands (`def register(app: typer.Typer) -> None`, adding their commands to `app`):
# the operator commands over the HTTP API (CONTRACT §1); `apply`/`export` (services/fleet.py) join the same way.
operator_commands.register(app)
fleet.register(app)


def main(argv: Sequence[str] | None = None) -> int:
    """The `healthgate` console script: runs the command in `argv` (default sys.argv[1:]), returns its status.
    An argument that is not UTF-8 text is bad usage (2)."""
    arguments = list(argv) if argv is not None else sys.argv[1:]
    for number, argument in enumerate(arguments, start=1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            # Python passes the bytes of a non-UTF-8 argument on as lone surrogates, which no request, database
            # query or file name can carry: every command would end in a UnicodeEncodeError traceback.
            print(f"healthgate: argument {number} is not UTF-8 text", file=sys.stderr)
            return 2
    try:
        app(args=arguments, prog_name="healthgate")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
