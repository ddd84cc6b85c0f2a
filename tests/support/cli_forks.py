"""`healthgate` commands that only fail at start, many at once, without paying Python's start-up for each.

A `healthgate poller` that is refused its settings spends nearly all of its second or two importing the service
(grpc, aiohttp, dnspython, the CEL library...) before it reads the file at fault; dozens of such cases in one test
are dozens of seconds of that, on two cores. `run_forked` starts one process (`python -m tests.support.cli_forks`)
that imports `services.cli` and the services named once, then forks a copy of itself for each case: each copy
gets the case's environment (and nothing else: the server's is cleared), /dev/null on stdin, pipes of its own on
stdout and stderr, and runs `services.cli.main(arguments)` (what `python -m services.cli ARGUMENTS` runs) to its
exit status. What a case is tested for (its status, its one line on stderr) is what that code path does; what the
interpreter's own start would print before it (import-time warnings) is checked once, on the server's output, and
the tests still run a few cases as whole `python -m services.cli` processes.

Protocol: one JSON object on the server's stdin, {"preload": [module, ...], "arguments": [...], "envs": [{...}],
"at_once": n, "timeout": seconds}; one JSON list on its stdout, per env in order {"returncode": int | null (still
running at `timeout`: killed), "stdout": str, "stderr": str}. Anything the server itself writes to stderr (an
import warning, a traceback) makes `run_forked` fail.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any


def run_forked(
    arguments: tuple[str, ...],
    envs: list[dict[str, str]],
    *,
    preload: tuple[str, ...],
    at_once: int = 4,
    timeout: float = 60,
) -> list[subprocess.CompletedProcess[str]]:
    """`python -m services.cli ARGUMENTS` with each of `envs` (this process's environment, then the env), as forks
    of one server that imported `preload` (module names) first; `at_once` cases run at a time, each killed (its
    returncode None) after `timeout` seconds. Results are in the order of `envs`. Raises AssertionError if a case
    was still running at its timeout (as `subprocess.run` would raise TimeoutExpired), or if the server writes
    anything to stderr or fails."""
    request = {
        "preload": list(preload),
        "arguments": list(arguments),
        "envs": [{**os.environ, **env} for env in envs],
        "at_once": at_once,
        "timeout": timeout,
    }
    server = subprocess.run(
        [sys.executable, "-m", "tests.support.cli_forks"],
        input=json.dumps(request), capture_output=True, text=True,
        timeout=timeout * (len(envs) / at_once + 2),
    )  # fmt: skip
    assert server.returncode == 0 and server.stderr == "", (server.returncode, server.stderr)
    results = json.loads(server.stdout)
    hung = [(env, result["stderr"]) for env, result in zip(envs, results, strict=True) if result["returncode"] is None]
    assert not hung, f"still running after {timeout} s (killed): {hung}"
    return [
        subprocess.CompletedProcess(
            ["healthgate", *arguments], result["returncode"], result["stdout"], result["stderr"]
        )
        for result in results
    ]


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


def _run_case(main: Any, arguments: list[str], env: dict[str, str]) -> tuple[int, int, int]:
    """Fork a child that runs `main(arguments)` with `env` as its whole environment; returns (pid, stdout fd,
    stderr fd), the read ends of its output pipes."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the case: never returns
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
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
    os.close(out_write)
    os.close(err_write)
    return pid, out_read, err_read


def _serve() -> None:
    request = json.loads(sys.stdin.read())
    cli = importlib.import_module("services.cli")
    # What `healthgate poller` sets before it imports the poller (grpc reads it once, at import).
    os.environ.setdefault("GRPC_VERBOSITY", cli.GRPC_VERBOSITY)
    for module in request["preload"]:
        importlib.import_module(module)
    main = cli.main
    envs: list[dict[str, str]] = request["envs"]
    results: list[dict[str, Any]] = []
    for start in range(0, len(envs), request["at_once"]):
        batch = [_run_case(main, request["arguments"], env) for env in envs[start : start + request["at_once"]]]
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
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    _serve()
