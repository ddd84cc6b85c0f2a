"""Evaluating http checks' conditions (CONTRACT §3) in the poller, without ever stalling its event loop.

A condition is a CEL expression (compiled by shared/conditions.py) over six variables built from the final
response: `status` (int), `headers` (lower-case names to values, repeated headers joined with ", "), `body` (the
first 1 MiB, decoded as CONTRACT §4 says), `json` (the body parsed as strict JSON, else null), `latency_ms` (the
time the check took until its response was read, a double) and `cert_days_left` (double, null without TLS). Only
the variables the program names are built, so a condition that never reads `json` costs no JSON parse.

Why two places to evaluate. The CEL library (Rust, through pyo3) holds the GIL for a whole evaluation and cannot be
interrupted: a nested comprehension over a list of 3,000 held it for 3 s, `json.map(x, body + body)` allocates
gigabytes, and, measured for this module, `body.matches(body)` on a 64 KiB body ran 24 s (the regex is compiled
from the data) and a literal `\\w{200}x` on 32 KiB of "é" 0.5 s. On the poller's event loop that would stop every
other check. So:

- inline, on the event loop, only what cannot run away: the library's own analysis of the program
  (`variables()`, `functions()`) shows no comprehension, no `+` and no `matches` (UNBOUNDED_FUNCTIONS: `all` and
  `exists` expand to `@not_strictly_false`, `map`, `filter` and `exists_one` to `_+_`; a comprehension's variable
  is missing from `variables()` when its body does not use it, so the variables alone do not tell), no variable
  but the six, and the text it reads (body and/or headers) is at most INLINE_MAX_CHARS, at most
  INLINE_MAX_REFERENCED_CHARS counting each reference anew. Such an evaluation is a fixed number of steps, each
  at most linear in that data, but every reference to a variable is a copy of its value: `size([json, json, …])`
  with 196 references to 4 KiB of 819 nested maps held the loop 62 ms, with 16 references 9 ms, with one 6 ms
  (the rule counts every whole word `body`, `json` or `headers` of the text: never fewer than the references). A
  real condition takes 10-20 µs. (At 64 KiB the same took 340 ms, hence the small limit.)
- everything else in a small pool of worker processes (WORKERS, started when first needed, each one request at a
  time): the process runs `python -m services.poller.conditions`, its address space capped with RLIMIT_AS
  (MEMORY_LIMIT_BYTES, 256 MiB: the Rust allocator aborts the process when it is reached; the costliest 1 MiB
  JSON body, 350,000 empty objects, evaluated whole fits in 192 MiB), and an evaluation that has not
  answered within its deadline (DEADLINE_SECONDS, or what is left of the check's timeout if less) has its process
  killed and replaced. The check is then unhealthy, reason `condition`, "took longer than 1 s and was stopped" or
  "ran out of memory". A check whose own timeout ends first (the wait for a free worker counts) is cancelled; its
  worker is killed too, so no runaway outlives the check that started it. The pool costs the poller about 0.1 ms
  per request (a 1 MiB body is sent as UTF-8 bytes, not JSON) and 150-250 ms to start a process. What the worker
  does is bounded only by the deadline: reading the costliest 1 MiB JSON body takes it 0.8 s, so a condition over
  JSON bodies that large and dense may be stopped.
- runaways wait last, and known ones not at all: an expression whose last evaluation was stopped (a known
  runaway, RUNAWAYS_REMEMBERED of them) is served after every other waiting evaluation, and one that finds no
  worker free is not evaluated ("it was stopped at its last evaluation, and every condition worker is busy");
  the others wait for a worker within their check's timeout. Without this, forty checks with a runaway condition,
  each on a 10 s interval, kept both workers busy and queued until their timeouts: every tick the poller takes
  at once (16) was held by a check waiting for a worker, and the poller's checks of every type stopped keeping
  their intervals. A runaway now holds its check for at most its deadline, once it is known (after its first
  evaluation); a condition that finishes in time is no longer a known runaway.

Processes rather than threads: a thread cannot be stopped, and with the GIL held by Rust it would stall the loop
anyway. A pool rather than a process per evaluation: starting Python and the library costs 150 ms, a request 0.1 ms.
A worker exits when its stdin closes (the poller closed the pool or died), and asks Linux to kill it when the
poller's thread dies (PR_SET_PDEATHSIG), so even a SIGKILLed poller leaves no orphan computing a runaway; it ignores
SIGINT (a terminal's Ctrl-C reaches the whole process group; the poller decides when it ends). Its environment holds
none of the poller's HEALTHGATE_* settings (the database URL may hold a password).

The protocol on the worker's stdin and stdout: frames of a 4-byte big-endian length and that many bytes. A request is
two frames, JSON metadata (the expression and the small variables) and the body's UTF-8; the answer one JSON frame.
The worker first sends READY once it has imported the library.

Details never hold a credential, not even in part. `safe_detail` (services/poller/results.py), which every stored
detail goes through, looks for the check's password in the finished text, and for secrets by their shape; but a
detail shows values as JSON (a quote or backslash in a password is escaped there) and cut to VALUE_CHARS (a
password at the cut is left in part), so the values are cleaned before: the check's own credentials
(`ResponseFacts.secrets`) and the values of the headers that carry credentials (REDACTED_HEADERS: cookies, even
when a condition's result or an error names them) are replaced wherever they appear, and so is every value of a
JSON field or header whose name names a secret (`names_a_secret`: "password", "api_token", "clientSecret"), whatever
its type, before anything is escaped or cut. A result that is not a bool is not shown when the expression names a
secret (`json.token`, `headers["x-api-key"]`): it is most likely that secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import itertools
import json
import logging
import math
import os
import re
import resource
import signal
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import cel

from shared.conditions import FUNCTIONS, VARIABLES, ConditionError, compile_condition, is_library_panic
from shared.details import ELLIPSIS, clip_detail, names_a_secret

log = logging.getLogger(__name__)

INLINE_MAX_CHARS = 4 * 1024
# ... and at most this much read in all, counting each reference to the data anew (16 references to 4 KiB).
INLINE_MAX_REFERENCED_CHARS = 16 * INLINE_MAX_CHARS
DEADLINE_SECONDS = 1.0
WORKERS = 2
MEMORY_LIMIT_BYTES = 256 * 1024 * 1024
# A worker that has not imported the library and said READY within this long is given up on.
START_TIMEOUT_SECONDS = 20.0
# A worker that closed its pipe is given this long to exit by itself before it is killed.
EXIT_WAIT_SECONDS = 1.0
PROGRAM_CACHE_SIZE = 512
# How many expressions whose evaluation was stopped (runaways) the pool remembers, to serve them last (WorkerPool).
RUNAWAYS_REMEMBERED = 512
STOPPING = "was not evaluated: the poller is stopping"
# How much of each value, and of the expression, a detail shows.
VALUE_CHARS = 160
EXPRESSION_CHARS = 300
# Response headers whose values are credentials or grant them (cookies, challenges that may carry a realm's nonce).
REDACTED_HEADERS = frozenset(
    {"set-cookie", "cookie", "authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate"}
)
REDACTED = "<redacted>"
# Credentials shorter than this are not looked for in a detail's text (as shared/details.py's redact_credentials).
MIN_SECRET_CHARS = 3
# What the library's analysis shows of an evaluation whose cost is not bounded (measured on cel-rust as this package
# ships it): `all` and `exists` expand to `@not_strictly_false`, `map`, `filter` and `exists_one` to `_+_` (their
# accumulators), and `_+_` is also the only operator whose result outgrows its operands; `matches` compiles its
# pattern, which may come from the data, at every evaluation.
UNBOUNDED_FUNCTIONS = frozenset({"@not_strictly_false", "_+_", "matches"})
READY = b"ready"
MAX_ANSWER_BYTES = 64 * 1024
_FRAME_HEADER_BYTES = 4
_PR_SET_PDEATHSIG = 1
# A JSON escape of a surrogate code point (U+D800-U+DFFF), the only way JSON text can hold one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# The library's message for a name it has no variable or overload for.
_UNDEFINED = re.compile(r"Undefined variable or function: '(?P<name>[^']*)'")
# A word of an expression as names_a_secret reads names (identifiers, and header or field names in strings).
_WORD = re.compile(r"[A-Za-z0-9_-]+")
# A name of the data variables as a whole word: more than the references of an expression (a field or a string
# literal of that name counts too), never fewer, which is what the inline rule needs of it.
DATA_REFERENCE = re.compile(r"(?<![A-Za-z0-9_])(?:body|json|headers)(?![A-Za-z0-9_])")
# Digits enough for an integer that may not fit 64 bits (2**64 has 20).
_LONG_DIGITS = re.compile(r"[0-9]{20}")
# The variables' Python types as CEL names them, for "gave a string, not true or false".
_CEL_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a bool"), (int, "an int"), (float, "a double"), (str, "a string"), (bytes, "bytes"),
    (list, "a list"), (dict, "a map"), (dt.datetime, "a timestamp"), (dt.timedelta, "a duration"),
)  # fmt: skip


@dataclass(frozen=True)
class ResponseFacts:
    """What a condition may read of one response (CONTRACT §3); `headers` as `response_headers` makes them (the
    poller passes a `ResponseHeaders`, built only if a condition reads them)."""

    status: int
    headers: Mapping[str, str]
    body: str
    latency_ms: float
    cert_days_left: float | None
    # The check's credentials (its password, its encoded Basic credentials): a condition cannot read them, and a
    # detail never shows them, not even in part, should the target echo them.
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConditionVerdict:
    """Whether the condition holds, and if not why, in words that follow "status 200 OK, but " in a detail."""

    holds: bool
    detail: str


HOLDS = ConditionVerdict(True, "the condition holds")


def response_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The `headers` variable: names lower-cased, the values of a repeated header joined with ", " in the order
    they came. Text that is not valid Unicode (aiohttp keeps undecodable bytes as lone surrogates) is replaced by
    U+FFFD, which the CEL library can take."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key, text = _valid_text(name.lower()), _valid_text(value)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class ResponseHeaders(Mapping[str, str]):
    """The `headers` variable of a response's header `pairs`, made by `response_headers` when first read (a
    condition that does not read the headers costs no copy of them)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = pairs
        self._made: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._made is None:
            self._made = response_headers(self._pairs)
        return self._made

    def __getitem__(self, name: str) -> str:
        return self._headers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())


def _valid_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _refuse_constant(name: str) -> Any:
    # json.loads takes NaN, Infinity and -Infinity; RFC 8259 has no such values, so such a body is not JSON.
    raise ValueError(f"{name} is not JSON")


def _json_integer(text: str) -> int | float:
    # The CEL library converts an int beyond 64 bits to a double, and fails the whole `json` (whatever field the
    # condition reads) on one beyond a double's range: such an integer is read as the double nearest to it (as
    # JavaScript reads JSON), infinite past 1.8e308. int() raises ValueError past 4,300 digits (see parse_json).
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(text)


def parse_json(body: str) -> Any:
    """The `json` variable: `body` parsed as strict JSON (RFC 8259: no NaN or Infinity), or None when it is not
    JSON, holds an integer longer than Python converts, or is nested too deeply for the parser. A lone surrogate
    escape ("\\ud800", valid JSON, not a character) becomes U+FFFD, as undecodable bytes of the body do. A byte
    order mark before the text is ignored (RFC 8259 allows it; some .NET services send one); an integer outside
    64 bits is a double."""
    try:
        # The hook costs a call per integer (+70 ms on a 1 MiB body of them): only where one may not fit 64 bits.
        integer = _json_integer if _LONG_DIGITS.search(body) else None
        value = json.loads(body.removeprefix("\ufeff"), parse_constant=_refuse_constant, parse_int=integer)
        return _without_lone_surrogates(value) if _SURROGATE_ESCAPE.search(body) else value
    except (ValueError, RecursionError):  # JSONDecodeError and too many digits are ValueErrors
        return None


def _without_lone_surrogates(value: Any) -> Any:
    # json.loads joins a valid pair into one character, so any surrogate left is a lone one.
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Compiled:
    """A compiled condition and what it names: its variables (comprehension variables included) and functions.
    `may_run_away`: whether an evaluation's cost is not bounded by the expression's size times the data's (see the
    module docstring): it may loop (a comprehension), grow values (`+`) or run a regular expression."""

    program: cel.Program
    variables: frozenset[str]
    functions: frozenset[str]
    may_run_away: bool
    # At most how many times an evaluation reads the body, json or headers (see DATA_REFERENCE).
    data_references: int = 1

    @classmethod
    def of(cls, program: cel.Program) -> Compiled:
        variables, functions = frozenset(program.variables()), frozenset(program.functions())
        unbounded = bool(functions & UNBOUNDED_FUNCTIONS) or not variables <= frozenset(VARIABLES)
        references = len(DATA_REFERENCE.findall(program.source))
        return cls(program, variables, functions, unbounded, max(1, references))


class ProgramCache:
    """Compiled conditions by expression text, the `size` most recently used (a check's condition changes only when
    the check does, so the text identifies its version). A condition that does not compile is kept as its error."""

    def __init__(self, size: int = PROGRAM_CACHE_SIZE) -> None:
        self._size = size
        self._programs: OrderedDict[str, Compiled | ConditionError] = OrderedDict()

    def get(self, expression: str) -> Compiled | ConditionError:
        found = self._programs.get(expression)
        if found is not None:
            self._programs.move_to_end(expression)
            return found
        compiled: Compiled | ConditionError
        try:
            compiled = Compiled.of(compile_condition(expression))
        except ConditionError as exc:
            compiled = exc
        self._programs[expression] = compiled
        if len(self._programs) > self._size:
            self._programs.popitem(last=False)
        return compiled


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


class _Hidden:
    """What the detail of one evaluation must never show (see the module docstring), and the means to hide it in
    a text or a value before it is escaped or cut: the check's credentials and the values of the credential headers
    the condition read, wherever they appear; the value of every field whose name names a secret."""

    def __init__(self, facts: ResponseFacts, values: Mapping[str, Any]) -> None:
        secrets = list(facts.secrets)
        for name, value in values.get("headers", {}).items():
            if name in REDACTED_HEADERS:  # "a=1, b=2" for two Set-Cookie headers: each one, and both as joined
                secrets += [value, *value.split(", ")]
        # Each also as a message may show it escaped: as JSON or Rust's Debug (\" and \\), or as Python's repr (a
        # KeyError's key). Longest first: a secret holding another is replaced whole. Shorter ones would blank
        # ordinary words (as redact_credentials, which skips them too).
        forms = {
            form
            for secret in secrets
            if len(secret) >= MIN_SECRET_CHARS
            for form in (secret, json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1])
        }
        self._secrets = sorted(forms, key=len, reverse=True)
        self.longest = len(self._secrets[0]) if self._secrets else 0

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def value(self, value: Any, chars: int = VALUE_CHARS) -> Any:
        """The start of `value` (a CEL value as Python holds it) with its secrets hidden: enough of it that its JSON
        is longer than `chars` if the whole one is, no more (each string, number, list or map adds at least a
        character to the JSON, so a walk stops after `chars` of them: a 1 MiB body is not copied to show 160
        characters of it). Raises RecursionError when nested deeper than Python's recursion limit."""
        left = chars + 1

        def walk(item: Any) -> Any:
            nonlocal left
            left -= 1
            if isinstance(item, str):
                return self.text(item[: chars + self.longest])  # a secret that starts within what shows is whole
            if isinstance(item, list):
                return [walk(element) for element in itertools.takewhile(lambda _: left > 0, item)]
            if isinstance(item, dict):
                return {
                    walk(key): REDACTED if isinstance(key, str) and names_a_secret(key) else walk(element)
                    for key, element in itertools.takewhile(lambda _: left > 0, item.items())
                }
            return item

        return walk(value)


def _shown(value: Any, hidden: _Hidden) -> str:
    """A value as JSON, for a detail (compact, non-ASCII as it is), its secrets hidden, cut to VALUE_CHARS."""
    try:
        text = json.dumps(hidden.value(value), ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        text = "(too deeply nested to show)"
    return _cut(text, VALUE_CHARS)


def _what_it_read(values: dict[str, Any], hidden: _Hidden) -> str:
    """The variables an evaluation was given, in VARIABLES order: "; it read json={...}, latency_ms=12.3"."""
    shown = []
    for name in VARIABLES:
        if name not in values:
            continue
        value = values[name]
        if name == "headers":
            value = {key: REDACTED if key in REDACTED_HEADERS else text for key, text in value.items()}
        elif name == "latency_ms":
            value = round(value, 3)
        elif name == "cert_days_left" and value is not None:
            value = round(value, 2)
        shown.append(f"{name}={_shown(value, hidden)}")
    return f"; it read {', '.join(shown)}" if shown else ""


def _expression(expression: str, hidden: _Hidden) -> str:
    # One line: line breaks would be escaped anyway.
    return _cut(" ".join(hidden.text(expression).split()), EXPRESSION_CHARS)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _CEL_TYPES if isinstance(value, kind)), type(value).__name__)


def _first_sentence(text: str) -> str:
    sentence = text.strip().split("\n", 1)[0].split(". ", 1)[0]
    return _cut(sentence.removesuffix("."), 200)


def _evaluation_fault(exc: BaseException, hidden: _Hidden) -> str:
    """Why an evaluation failed, in words: the library's first sentence, a missing key named as one (a value the
    condition computed, which may be a secret: hidden before it is cut)."""
    if isinstance(exc, KeyError):
        return f"no such key: {_cut(hidden.text(str(exc)), 100)}"
    if isinstance(exc, MemoryError):
        return "it ran out of memory"
    message = _first_sentence(hidden.text(str(exc))) or type(exc).__name__
    undefined = _UNDEFINED.fullmatch(message)
    if undefined is not None and undefined["name"] in FUNCTIONS:
        # The library's word for a function it has, called with arguments it has no overload for (a time zone,
        # `timestamp(1700000000)`): not a missing variable.
        return f"{undefined['name']}() does not take these arguments here"
    if undefined is not None:
        message += f" (the variables are {', '.join(VARIABLES)})"
    return message


def variables_for(names: Iterable[str], facts: ResponseFacts) -> dict[str, Any]:
    """The variables among `names` (what a program references), built from `facts`; `json` only when named."""
    wanted = set(names)
    values: dict[str, Any] = {}
    if "status" in wanted:
        values["status"] = facts.status
    if "headers" in wanted:
        values["headers"] = dict(facts.headers)
    if "body" in wanted:
        values["body"] = facts.body
    if "json" in wanted:
        values["json"] = parse_json(facts.body)
    if "latency_ms" in wanted:
        values["latency_ms"] = float(facts.latency_ms)
    if "cert_days_left" in wanted:
        values["cert_days_left"] = None if facts.cert_days_left is None else float(facts.cert_days_left)
    return values


def evaluate(compiled: Compiled, expression: str, facts: ResponseFacts) -> ConditionVerdict:
    """Evaluate in this process and thread (inline, or in a worker). Never raises for anything the expression or
    the response does: a false result, an error of evaluation and a result that is not a bool are verdicts, their
    details at most DETAIL_LIMIT characters."""
    values = variables_for(compiled.variables, facts)
    try:
        result = compiled.program.execute(values)
    except Exception as exc:
        hidden = _Hidden(facts, values)
        fault, shown = _evaluation_fault(exc, hidden), _expression(expression, hidden)
        return ConditionVerdict(
            False, clip_detail(f"the condition failed ({fault}): {shown}{_what_it_read(values, hidden)}")
        )
    except BaseException as exc:
        if not is_library_panic(exc):
            raise
        shown = _expression(expression, _Hidden(facts, values))
        return ConditionVerdict(False, f"the CEL library failed on the condition ({type(exc).__name__}): {shown}")
    if result is True:
        return HOLDS
    hidden = _Hidden(facts, values)
    shown, read = _expression(expression, hidden), _what_it_read(values, hidden)
    if result is False:
        return ConditionVerdict(False, clip_detail(f"the condition is false: {shown}{read}"))
    # A value read through a secret's name (`json.token`, `headers["x-api-key"]`) is not shown as the result.
    read_a_secret = any(names_a_secret(word) for word in _WORD.findall(expression))
    gave = f"{_type_name(result)} ({REDACTED if read_a_secret else _shown(_plain(result), hidden)})"
    return ConditionVerdict(False, clip_detail(f"the condition gave {gave}, not true or false: {shown}{read}"))


def _plain(value: Any) -> Any:
    """A CEL result as JSON can show it (timestamps, durations and bytes as text)."""
    if isinstance(value, dt.datetime | dt.timedelta | bytes):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _data_chars(compiled: Compiled, facts: ResponseFacts) -> int:
    chars = 0
    if compiled.variables & {"body", "json"}:
        chars += len(facts.body)
    if "headers" in compiled.variables:
        chars += sum(len(name) + len(value) for name, value in facts.headers.items())
    return chars


class ConditionEvaluator:
    """The poller's condition evaluation: compiled programs cached by text, inline evaluation of what cannot run
    away, and the worker pool for the rest (see the module docstring). Create it once at poller start (no process
    starts until one is needed) and `close()` it at shutdown (or use `async with`)."""

    def __init__(
        self,
        *,
        workers: int = WORKERS,
        deadline_seconds: float = DEADLINE_SECONDS,
        memory_limit_bytes: int = MEMORY_LIMIT_BYTES,
        inline_max_chars: int = INLINE_MAX_CHARS,
    ) -> None:
        self._programs = ProgramCache()
        self._deadline = deadline_seconds
        self._inline_max_chars = inline_max_chars
        self._pool = WorkerPool(workers, memory_limit_bytes)

    async def __aenter__(self) -> ConditionEvaluator:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the worker processes (any evaluation still running is killed) and wait for them to exit."""
        await self._pool.close()

    def runs_inline(self, expression: str, facts: ResponseFacts) -> bool:
        """Whether `judge` evaluates this on the event loop (a condition that does not compile runs nowhere)."""
        compiled = self._programs.get(expression)
        return isinstance(compiled, ConditionError) or self._inline(compiled, facts)

    def _inline(self, compiled: Compiled, facts: ResponseFacts) -> bool:
        if compiled.may_run_away:
            return False
        chars = _data_chars(compiled, facts)
        return chars <= self._inline_max_chars and chars * compiled.data_references <= INLINE_MAX_REFERENCED_CHARS

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes running now (none until a condition needed one)."""
        return self._pool.pids()

    async def judge(self, expression: str, facts: ResponseFacts, *, time_left: float) -> ConditionVerdict:
        """Whether `expression` holds for `facts`. `time_left`: seconds left of the check's timeout, which bounds
        an evaluation in a worker along with DEADLINE_SECONDS. Never raises but for cancellation (which kills
        the worker evaluating it, if any)."""
        compiled = self._programs.get(expression)
        if isinstance(compiled, ConditionError):
            return ConditionVerdict(False, f"the condition {compiled}: {_expression(expression, _Hidden(facts, {}))}")
        if self._inline(compiled, facts):
            return evaluate(compiled, expression, facts)
        deadline = max(0.001, min(self._deadline, time_left))
        answer = await self._pool.evaluate(expression, facts, deadline)
        if isinstance(answer, ConditionVerdict):
            return answer
        return ConditionVerdict(False, f"the condition {answer}: {_expression(expression, _Hidden(facts, {}))}")


# ---- the worker pool (parent side) ------------------------------------------------------------------------


def _send_kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_FRAME_HEADER_BYTES, "big") + data


def _worker_environment() -> dict[str, str]:
    # The poller's own settings stay with it: the database URL may carry a password, and a worker needs none.
    return {name: value for name, value in os.environ.items() if not name.startswith("HEALTHGATE_")}


@dataclass
class _Slot:
    process: asyncio.subprocess.Process | None = None
    busy: bool = False


class _Stopped(str):
    """Words for an evaluation its worker did not finish (past its deadline, out of memory, the process died): its
    expression counts as a runaway until an evaluation of it finishes."""

    __slots__ = ()


@dataclass(eq=False)
class _Waiter:
    """An evaluation waiting for a free worker; `slot` is set when one is handed to it."""

    expression: str
    slot: asyncio.Future[_Slot]


class WorkerPool:
    """`size` worker processes, each evaluating one request at a time; started lazily, killed and replaced when
    past their deadline or dead. `evaluate` answers a ConditionVerdict, or words for an evaluation that was
    stopped or not made ("took longer than 1 s and was stopped").

    Runaways wait last (see the module docstring): a freed worker goes to the longest-waiting request whose
    expression is not a known runaway (one whose last evaluation was stopped), else to the longest-waiting one; a
    known runaway that finds no worker free is not evaluated at all. So checks whose conditions keep running away
    cannot keep the others waiting, nor hold the poller's ticks for their whole timeouts."""

    def __init__(self, size: int, memory_limit_bytes: int) -> None:
        self._memory_limit = memory_limit_bytes
        self._slots = [_Slot() for _ in range(size)]
        # A stack, the warmest slot on top: a second process starts only when two evaluations overlap.
        self._idle = list(reversed(self._slots))
        self._waiting: list[_Waiter] = []
        # Expressions whose last evaluation was stopped (deadline, memory, a dead worker), the most recent last.
        self._runaways: OrderedDict[str, None] = OrderedDict()
        self._reaping: set[asyncio.Task[int]] = set()
        self._closed = False

    def pids(self) -> list[int]:
        """The pids of the worker processes running now."""
        return [slot.process.pid for slot in self._slots if slot.process is not None]

    async def evaluate(self, expression: str, facts: ResponseFacts, deadline: float) -> ConditionVerdict | str:
        meta = json.dumps({
            "expression": expression, "status": facts.status, "headers": dict(facts.headers),
            "latency_ms": facts.latency_ms, "cert_days_left": facts.cert_days_left, "secrets": facts.secrets,
        }, ensure_ascii=False).encode("utf-8", "surrogatepass")  # fmt: skip
        body = facts.body.encode("utf-8", "replace")  # a lone surrogate (from a UTF-7 body) becomes "?"
        if self._closed:
            return STOPPING
        slot = await self._acquire(expression)
        if isinstance(slot, str):
            return slot
        try:
            if self._closed:
                return STOPPING
            if slot.process is None or slot.process.returncode is not None:
                try:
                    slot.process = await self._start()
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    log.warning("could not start a condition worker", extra={"error": repr(exc)})
                    return "was not evaluated: its worker process could not be started"
            answer = await self._ask(slot, _frame(meta) + _frame(body), deadline)
            # Known before the slot is handed on, so that the next evaluation is chosen knowing it.
            if isinstance(answer, ConditionVerdict):
                self._runaways.pop(expression, None)
            elif isinstance(answer, _Stopped) and not self._closed:
                self._remember_runaway(expression)
            return answer
        finally:
            self._release(slot)

    async def _acquire(self, expression: str) -> _Slot | str:
        """A free slot (marked busy), or why the evaluation is not made (a known runaway finds none free). Waits
        until a slot is handed over, or the caller is cancelled (the check's timeout)."""
        if self._idle and not self._waiting:
            slot = self._idle.pop()
            slot.busy = True
            return slot
        if expression in self._runaways:
            return "was not evaluated: it was stopped at its last evaluation, and every condition worker is busy"
        waiter = _Waiter(expression, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            return await asyncio.shield(waiter.slot)
        except BaseException:  # cancelled (the check's timeout, shutdown): a slot handed over goes on
            if waiter.slot.done():
                self._release(waiter.slot.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            if not waiter.slot.done():
                waiter.slot.cancel()

    def _release(self, slot: _Slot) -> None:
        """Hand `slot` to the next waiting evaluation (the first that is not a known runaway, else the first), or
        put it back as idle."""
        waiting = [waiter for waiter in self._waiting if not waiter.slot.done()]
        chosen = next((waiter for waiter in waiting if waiter.expression not in self._runaways), None)
        if chosen is None and waiting:
            chosen = waiting[0]
        if chosen is None:
            slot.busy = False
            self._idle.append(slot)
            return
        self._waiting.remove(chosen)
        chosen.slot.set_result(slot)  # stays busy: it passes from one evaluation to the next

    def _remember_runaway(self, expression: str) -> None:
        self._runaways[expression] = None
        self._runaways.move_to_end(expression)
        if len(self._runaways) > RUNAWAYS_REMEMBERED:
            self._runaways.popitem(last=False)

    async def _start(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.poller.conditions", str(self._memory_limit), str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=_worker_environment(),
        )  # fmt: skip
        try:
            assert process.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                ready = await process.stdout.readexactly(len(READY))
            if ready != READY:
                raise OSError(f"a condition worker said {ready!r} instead of {READY!r}")
        except BaseException:
            self._kill(process)
            raise
        return process

    async def _ask(self, slot: _Slot, request: bytes, deadline: float) -> ConditionVerdict | str:
        """Send the request to the slot's process and read its answer: a verdict, or (a `_Stopped` string) why the
        evaluation was stopped."""
        process = slot.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        try:
            async with asyncio.timeout(deadline):
                process.stdin.write(request)
                await process.stdin.drain()
                size = int.from_bytes(await process.stdout.readexactly(_FRAME_HEADER_BYTES), "big")
                if size > MAX_ANSWER_BYTES:
                    raise ValueError(f"an answer of {size} bytes")
                answer = json.loads(await process.stdout.readexactly(size))
        except TimeoutError:
            self._discard(slot)
            log.info("a condition ran past its deadline; its worker was killed", extra={"deadline": deadline})
            return _Stopped(f"took longer than {deadline:g} s and was stopped")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            status = await self._discard(slot, exiting=True)
            if status == -signal.SIGABRT:  # what the Rust allocator does when RLIMIT_AS is reached
                return self._out_of_memory()
            if self._closed:
                return "was stopped: the poller is stopping"
            log.warning("a condition worker failed", extra={"error": repr(exc), "status": status})
            ended = f"signal {-status}" if status < 0 else f"status {status}"
            return _Stopped(f"was stopped: its worker process ended ({ended})")
        except BaseException:  # cancelled (the check's timeout, shutdown): the evaluation must not live on
            self._discard(slot)
            raise
        if answer.get("out_of_memory"):
            self._discard(slot, exiting=True)  # it exits after saying so
            return self._out_of_memory()
        return ConditionVerdict(bool(answer["holds"]), str(answer["detail"]))

    def _out_of_memory(self) -> str:
        return _Stopped(f"ran out of memory (more than {self._memory_limit // (1024 * 1024)} MiB) and was stopped")

    def _discard(self, slot: _Slot, *, exiting: bool = False) -> asyncio.Task[int]:
        """Let go of the slot's process (a new one starts at the slot's next use) and reap it; the task gives its exit
        status. A process that is `exiting` (it closed its end, or said it is done) is first given EXIT_WAIT_SECONDS
        to exit on its own: killing it asks Popen to poll, which may reap it before asyncio's child watcher reads
        its status (the watcher then reports 255, and an abort would not be told from other deaths)."""
        process, slot.process = slot.process, None
        assert process is not None
        if not exiting:
            _send_kill(process)
        return self._reap(process, exiting)

    def _kill(self, process: asyncio.subprocess.Process) -> asyncio.Task[int]:
        _send_kill(process)
        return self._reap(process, False)

    def _reap(self, process: asyncio.subprocess.Process, exiting: bool) -> asyncio.Task[int]:
        async def reap() -> int:
            if exiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(EXIT_WAIT_SECONDS):
                        return await process.wait()
                _send_kill(process)
            return await process.wait()

        reaping = asyncio.ensure_future(reap())
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)
        return reaping

    async def close(self) -> None:
        """Kill every worker, idle or busy (a busy one's evaluation answers that the poller is stopping), and wait
        until they have exited. Evaluations asked for afterwards are not made."""
        self._closed = True
        for slot in self._slots:
            if slot.process is None:
                continue
            if slot.busy:  # killed and waited for here; `_ask` sees its pipe close and discards it
                self._kill(slot.process)
            else:
                self._discard(slot)
        while self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


# ---- the worker (child side): `python -m services.poller.conditions MEMORY_LIMIT PARENT_PID` -------------------


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_FRAME_HEADER_BYTES)
    if len(header) < _FRAME_HEADER_BYTES:
        return None  # the poller closed the pipe: done
    size = int.from_bytes(header, "big")
    data = stream.read(size)
    return data if len(data) == size else None


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (prctl PR_SET_PDEATHSIG); if the
    parent is already gone, exit. Elsewhere a worker still ends when its stdin closes, once it is idle."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(0)


def _answer(programs: ProgramCache, meta: bytes, body: bytes) -> dict[str, Any]:
    request = json.loads(meta)
    facts = ResponseFacts(
        status=int(request["status"]),
        headers={str(name): str(value) for name, value in request["headers"].items()},
        body=body.decode("utf-8", "replace"),
        latency_ms=float(request["latency_ms"]),
        cert_days_left=None if request["cert_days_left"] is None else float(request["cert_days_left"]),
        secrets=tuple(str(secret) for secret in request["secrets"]),
    )
    expression = str(request["expression"])
    compiled = programs.get(expression)
    if isinstance(compiled, ConditionError):
        verdict = ConditionVerdict(False, f"the condition {compiled}: {_expression(expression, _Hidden(facts, {}))}")
    else:
        verdict = evaluate(compiled, expression, facts)
    return {"holds": verdict.holds, "detail": clip_detail(verdict.detail)}


def worker_main(arguments: list[str]) -> int:
    """Serve evaluation requests on stdin until it closes (see the module docstring)."""
    memory_limit, parent_pid = int(arguments[0]), int(arguments[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    # Answers go to a copy of stdout; fd 1 then points at stderr, so that nothing printed can break a frame.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    programs = ProgramCache()
    answers.write(READY)
    answers.flush()
    while True:
        meta = _read_frame(requests)
        body = _read_frame(requests) if meta is not None else None
        if meta is None or body is None:
            return 0
        try:
            answer = _answer(programs, meta, body)
        except MemoryError:
            answers.write(_frame(b'{"out_of_memory": true}'))
            answers.flush()
            return 1  # a fresh process for the next request: this heap may be in pieces
        answers.write(_frame(json.dumps(answer, ensure_ascii=False).encode("utf-8", "surrogatepass")))
        answers.flush()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
