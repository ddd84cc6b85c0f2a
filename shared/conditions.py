"""Compiling the `condition` of http checks (CONTRACT §3): a CEL expression, compiled by the Rust CEL interpreter
through common-expression-language (`import cel`).

The API compiles a condition to refuse one that does not compile (422 naming `condition` and saying where); the
poller compiles it to run it (services/poller/conditions.py). Both call `compile_condition`, which never lets the
library's failures escape as anything but a `ConditionError`:

- a syntax error: the library raises ValueError with "ERROR: <input>:LINE:COL: message" (and more such lines, the
  source and a caret); the first error's line, column and first message line are kept. Its recursion limit
  (96 levels of nesting) is a syntax error too, worded "nested too deeply".
- a call of a function this CEL does not have (`body.split(",")`, `json.lowerAscii()`): cel-rust compiles it and
  fails only when it runs, so such a name is refused here, at the column of its call, found by compiling the
  expression again with that one occurrence renamed (the parser decides which occurrence is the call, not a
  pattern of ours). Unknown variables cannot be told from a comprehension's own variables (`all(x, ...)`) by what
  the library reports, so they are errors of the evaluation (reason `condition`), not of compiling.
- text the library cannot take: a NUL (PostgreSQL cannot store one either) or a lone surrogate (not UTF-8),
  refused at its position before the library sees it; more than MAX_CONDITION_CHARS characters.
- a Rust panic: pyo3 raises PanicException, which derives from BaseException (not Exception); any BaseException
  other than the interpreter's own (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError) is taken
  for one and reported as the library failing on the expression.

Measured on this library (common-expression-language 0.10): compiling a 1,000-character expression takes at most a
few milliseconds, nesting is capped by the parser's recursion limit, and no odd input (deep nesting, NUL, control
and bidirectional characters, surrogates, huge literals) made it crash or hang (tests/unit/test_shared_conditions.py).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass

import cel

# CONTRACT §3: the variables a condition reads; their order is the order a detail shows them in.
VARIABLES = ("status", "headers", "body", "json", "latency_ms", "cert_days_left")
MAX_CONDITION_CHARS = 1000
# The functions of cel-rust's standard library as this package ships it (CEL's core: conversions, size, the string
# predicates, the timestamp accessors). Macros (has, all, exists, exists_one, map, filter) are expanded by the
# parser and are not function calls; operators are named "_+_", "!_", "@in" and so on.
FUNCTIONS = frozenset({
    "bytes", "contains", "double", "duration", "dyn", "endsWith", "getDate", "getDayOfMonth", "getDayOfWeek",
    "getDayOfYear", "getFullYear", "getHours", "getMilliseconds", "getMinutes", "getMonth", "getSeconds", "int",
    "matches", "size", "startsWith", "string", "timestamp", "type", "uint",
})  # fmt: skip
# How much of the library's message a ConditionError keeps (its "expecting {...}" lists run long).
MESSAGE_CHARS = 300
# Occurrences of an unknown function's name tried when looking for its call (each try is a compilation, at most a
# few milliseconds): the call is the first occurrence outside a string literal.
MAX_CALL_SEARCH = 20
# The first error of the library's ValueError: "ERROR: <input>:LINE:COLUMN: message".
_LIBRARY_ERROR = re.compile(r"ERROR: <input>:(?P<line>\d+):(?P<column>\d+): (?P<message>[^\n]*)")
# The parser's recursion limit, reported inside a Rust debug representation: OtherError(ParseError { ..., msg:
# "Recursion limit of 96 exceeded", ... }).
_RECURSION = re.compile(r'msg: "(?P<message>Recursion limit of (?P<limit>\d+) exceeded)"')
_INTERPRETER_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


@dataclass(frozen=True)
class ConditionError(Exception):
    """A condition that does not compile: where (1-based line and column, counted in characters; None when the
    fault has no place, as a condition too long) and why, in the library's words or ours."""

    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        return f"does not compile: {where}{self.message}"


def is_library_panic(exc: BaseException) -> bool:
    """Whether `exc`, raised out of a call into the CEL library, is a Rust panic (pyo3's PanicException derives
    from BaseException) rather than the interpreter stopping (Ctrl-C, exit, a cancelled task), which must go on."""
    return not isinstance(exc, (Exception, *_INTERPRETER_EXCEPTIONS))


def position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column (in characters, as the library counts) of `text[index]`."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def compile_condition(text: str) -> cel.Program:
    """Compile a condition. Raises ConditionError (never anything else of the library's) when it does not
    compile; see the module docstring for what counts."""
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"longer than {MAX_CONDITION_CHARS} characters ({len(text)})")
    _refuse_unstorable(text)
    program = _compile(text)
    unknown = sorted(name for name in _called(program) if name not in FUNCTIONS)
    if unknown:
        name = unknown[0]
        line, column = _call_position(text, name) or (None, None)
        known = ", ".join(sorted(FUNCTIONS))
        raise ConditionError(f"unknown function {name}() (the functions are: {known})", line, column)
    return program


def _refuse_unstorable(text: str) -> None:
    for index, character in enumerate(text):
        if character == "\x00":
            raise ConditionError("a NUL character is not allowed", *position(text, index))
        if "\ud800" <= character <= "\udfff":
            raise ConditionError("a lone surrogate is not a character (not valid Unicode)", *position(text, index))


def _compile(text: str) -> cel.Program:
    try:
        return cel.compile(text)
    except Exception as exc:
        raise _syntax_error(str(exc)) from None
    except BaseException as exc:
        if not is_library_panic(exc):
            raise
        raise ConditionError(f"the CEL library failed on it ({type(exc).__name__}: {_first_line(str(exc))})") from None


def _syntax_error(text: str) -> ConditionError:
    found = _LIBRARY_ERROR.search(text)
    if found is None:
        return ConditionError(_cut(_first_line(text) or "not a CEL expression"))
    message = found["message"]
    recursion = _RECURSION.search(message)
    if recursion is not None:
        message = f"nested too deeply (more than {recursion['limit']} levels)"
    return ConditionError(_cut(message), int(found["line"]), int(found["column"]))


def _called(program: cel.Program) -> list[str]:
    """The functions `program` calls by name (not its operators, whose names start with "_", "!" or "@")."""
    return [name for name in program.functions() if name[:1].isalpha()]


def _call_position(text: str, name: str) -> tuple[int, int] | None:
    """Where `name` is first called in `text`: the first occurrence that, renamed to an identifier found nowhere
    else, makes the compiled program call that identifier. The parser decides (an occurrence inside a string or a
    longer identifier is not a call); None if no occurrence is (the library changed its mind between two
    compilations) or the first MAX_CALL_SEARCH whole-word occurrences are not (all inside strings)."""
    stand_in = "hg_stand_in"
    while stand_in in text:
        stand_in += "_"
    occurrences = re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text)
    for occurrence in itertools.islice(occurrences, MAX_CALL_SEARCH):
        start = occurrence.start()
        renamed = text[:start] + stand_in + text[start + len(name) :]
        try:
            calls = _called(cel.compile(renamed))
        except Exception:
            calls = []  # renaming it broke the expression: it was part of something else
        except BaseException as exc:
            if not is_library_panic(exc):
                raise
            calls = []
        if stand_in in calls:
            return position(text, start)
    return None


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def _cut(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"
