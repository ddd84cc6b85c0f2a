"""`healthgate` commands that only fail at start, many at once, without paying Python's start-up for each.

A `healthgate poller` that is refused its settings spends nearly all of its second or two importing the service
(grpc, aiohttp, dnspython, the CEL library...) before it reads the file at fault; dozens of such cases in one test
are dozens of seconds of that, on two cores. `CliForks` (and `run_forked`) starts one process (`python -m tests.support.cli_forks`)
that imports `services.cli` and the services named once, then forks a copy of itself for each case: each copy
gets the case's environment (and nothing else: the server's is cleared), /dev/null on stdin, pipes of its own on
stdout and stderr, and runs `services.cli.main(arguments)` (what `python -m services.cli ARGUMENTS` runs) to its
exit status. What a case is tested for (its status, its one line on stderr) is what that code path does; what the
interpreter's own start would print before it (import-time warnings) is checked once, on the server's output, and
the tests still run a few cases as whole `python -m services.cli` processes.

Operator commands run the same way (`CliForks.run(..., stdin=b"...")` gives a case its standard input).

Protocol: the modules to import are the server's arguments; then one JSON object per line on its stdin,
{"arguments": [...], "envs": [{...}], "at_once": n, "timeout": seconds, "stdin": latin-1 text of the bytes for
standard input, or null for /dev/null}, answered by one JSON list per line on its
stdout, per env in order {"returncode": int | null (still running at `timeout`: killed), "stdout": str, "stderr":
str}. Anything the server itself writes to stderr (an import warning, a traceback) fails the next request.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class CliForks:
    """A server (`python -m tests.support.cli_forks PRELOAD...`) that imported `services.cli` and `preload` once and
    forks a copy of itself for each case it is sent, for as long as this object is open (a context manager)."""

    def __init__(self, preload: tuple[str, ...], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._lock = threading.Lock()
        with stderr_path.open("wb") as stderr:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "tests.support.cli_forks", *preload],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )  # fmt: skip

    def __enter__(self) -> CliForks:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def run_each(
        self,
        arguments: tuple[str, ...],
        envs: list[dict[str, str]],
        *,
        at_once: int = 4,
        timeout: float = 60,
        stdin: bytes | None = None,
    ) -> list[subprocess.CompletedProcess[str]]:
        """`python -m services.cli ARGUMENTS` with each of `envs` (this process's environment, then the env), as
        forks of the server, `at_once` at a time; results in the order of `envs`. Raises AssertionError if a case
        was still running at `timeout` seconds (killed, as `subprocess.run` would raise TimeoutExpired), or if the
        server has written anything to stderr (an import warning, a traceback) or is gone."""
        with self._lock:  # one request at a time: tests may call from threads (asyncio.to_thread)
            return self._run_each(arguments, envs, at_once=at_once, timeout=timeout, stdin=stdin)

    def _run_each(
        self, arguments: tuple[str, ...], envs: list[dict[str, str]], *, at_once: int, timeout: float,
        stdin: bytes | None,
    ) -> list[subprocess.CompletedProcess[str]]:  # fmt: skip
        assert self.server.stdin is not None and self.server.stdout is not None
        request = {
            "arguments": list(arguments),
            "envs": [{**os.environ, **env} for env in envs],
            "at_once": at_once,
            "timeout": timeout,
            "stdin": None if stdin is None else stdin.decode("latin-1"),
        }
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        server_stderr = self.stderr_path.read_text(errors="replace")
        assert line and server_stderr == "", (self.server.poll(), server_stderr)
        results = json.loads(line)
        hung = [
            (env, result["stderr"]) for env, result in zip(envs, results, strict=True) if result["returncode"] is None
        ]
        assert not hung, f"still running after {timeout} s (killed): {hung}"
        return [
            subprocess.CompletedProcess(
                ["healthgate", *arguments], result["returncode"], result["stdout"], result["stderr"]
            )
            for result in results
        ]

    def run(
        self, *arguments: str, env: dict[str, str], timeout: float = 60, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One case: `run_each(arguments, [env])`, with `stdin` as its standard input (None: /dev/null)."""
        return self.run_each(arguments, [env], timeout=timeout, stdin=stdin)[0]


def run_forked(
    arguments: tuple[str, ...],
    envs: list[dict[str, str]],
    *,
    preload: tuple[str, ...],
    stderr_path: Path,
    at_once: int = 4,
    timeout: float = 60,
) -> list[subprocess.CompletedProcess[str]]:
    """`CliForks(preload, stderr_path).run_each(arguments, envs, ...)` with a server of its own, closed after."""
    with CliForks(preload, stderr_path) as forks:
        return forks.run_each(arguments, envs, at_once=at_once, timeout=timeout)


def _read_all(fds: dict[int, bytearray], until: float) -> None:
    """Read the pipes in `fds` until each is closed (every writer exited) or `until` (time.monotonic) passes."""
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and time.monotonic() < until:
            for key, _ in selector.select(max(0.0, until - time.monotonic())):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    fds[key.fd] += chunk
                else:
                    selector.unregister(key.fd)


def _run_case(main: Any, arguments: list[str], env: dict[str, str], stdin: bytes | None) -> tuple[int, int, int]:
    """Fork a child that runs `main(arguments)` with `env` as its whole environment and `stdin` on its standard
    input (a file: no pipe to keep fed; None: /dev/null); returns (pid, stdout fd, stderr fd), the read ends of its
    output pipes."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    if stdin is None:
        devnull = os.open(os.devnull, os.O_RDONLY)
    else:
        with tempfile.TemporaryFile() as source:
            source.write(stdin)
            source.flush()
            devnull = os.dup(source.fileno())
        os.lseek(devnull, 0, os.SEEK_SET)
    pid = os.fork()
    if pid == 0:  # the case: never returns
        code = 70
        try:
            os.dup2(devnull, 0)
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            for fd in (devnull, out_read, out_write, err_read, err_write):
                os.close(fd)
            os.environ.clear()
            os.environ.update(env)
            code = main(arguments)
        except BaseException:  # reported as the case's output, as an unforked process would print it
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(code)
    os.close(devnull)
    os.close(out_write)
    os.close(err_write)
    return pid, out_read, err_read


def _serve(preload: list[str]) -> None:
    cli = importlib.import_module("services.cli")
    # What `healthgate poller` sets before it imports the poller (grpc reads it once, at import).
    os.environ.setdefault("GRPC_VERBOSITY", cli.GRPC_VERBOSITY)
    for module in preload:
        importlib.import_module(module)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.write(json.dumps(_run_request(cli.main, request)) + "\n")
        sys.stdout.flush()


def _run_request(main: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    envs: list[dict[str, str]] = request["envs"]
    results: list[dict[str, Any]] = []
    for start in range(0, len(envs), request["at_once"]):
        stdin = None if request.get("stdin") is None else request["stdin"].encode("latin-1")
        batch = [_run_case(main, request["arguments"], env, stdin) for env in envs[start : start + request["at_once"]]]
        deadline = time.monotonic() + request["timeout"]
        for pid, out_fd, err_fd in batch:
            output = {out_fd: bytearray(), err_fd: bytearray()}
            _read_all(output, deadline)
            returncode: int | None = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    returncode = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.01)
            if returncode is None:  # hung: a failure for the test to report, not a wait for ever
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(out_fd)
            os.close(err_fd)
            results.append(
                {
                    "returncode": returncode,
                    "stdout": output[out_fd].decode(errors="replace"),
                    "stderr": output[err_fd].decode(errors="replace"),
                }
            )
    return results


if __name__ == "__main__":
    _serve(sys.argv[1:])
