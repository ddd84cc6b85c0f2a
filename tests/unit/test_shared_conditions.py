"""shared/conditions.py: compiling conditions as the API and the poller do. Where a fault is reported (line and
column, in characters), the functions this CEL has, text the library must never see (NUL, lone surrogates), and that
no input, however odd, crashes, hangs or escapes as anything but a ConditionError.

The API's 422 for the same conditions is tested through the real API in tests/test_conditions.py."""

from __future__ import annotations

import asyncio
import time

import cel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import conditions
from shared.conditions import (
    FUNCTIONS,
    MAX_CONDITION_CHARS,
    ConditionError,
    compile_condition,
    is_library_panic,
    position,
)

# CEL's tokens and the characters that break lexers, for generated expressions.
TOKENS = [
    "json", "body", "status", "headers", "latency_ms", "cert_days_left", "x", ".", "(", ")", "[", "]", "{", "}", ",",
    ":", "?", "!", "-", "+", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||", " in ", '"a"', "'b'", '"""', "r'\\'",
    "1", "0", "-1", "1.5", "2u", "0x7f", "1e400", "null", "true", 'b"\\xff"', "size", ".all(x,", ".exists(x,",
    ".map(x,", ".filter(x,", "has(", "int(", "double(", "string(", "timestamp(", "duration(", ".matches(",
    ".contains(", "type(", "dyn(", ".split(", '"\\u00e9"', '"\\uD800"', "9223372036854775808", " ", "\n", "\t",
    "\x00", "\u202e", "\ud800", "é", "😀", "//", "/*",
]  # fmt: skip


def compiles(text: str) -> bool:
    try:
        compile_condition(text)
    except ConditionError:
        return False
    return True


def error_of(text: str) -> ConditionError:
    with pytest.raises(ConditionError) as raised:
        compile_condition(text)
    return raised.value


@pytest.mark.parametrize(
    "text",
    [
        'json.status == "UP"',
        'json.status == "UP" && latency_ms < 500',
        'headers["content-type"].startsWith("application/json")',
        '!body.matches("(?m)^\\\\[-\\\\]")',
        "json.checks.all(c, c.ok)",
        "cert_days_left == null || cert_days_left > 30.0",
        "status in [200, 204]",
        "size(body) > 0 && has(json.components)",
        'timestamp(json.time) > timestamp("2020-01-01T00:00:00Z")',
        "x" * 0 + "true",
        "1 == 1 // a comment",
    ],
)
def test_valid_conditions_compile(text: str) -> None:
    assert isinstance(compile_condition(text), cel.Program)


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ('json.status == "UP" &&', 1, 23, "mismatched input '<EOF>'"),
        ("json.status ==\n  == 1", 2, 3, "Syntax error"),
        ('"é" +* 1', 1, 6, "extraneous input '*'"),
        ('"😀😀" +* 1', 1, 7, "extraneous input '*'"),  # characters, not UTF-16 units or bytes
        ('"abc', 1, 1, "token recognition error"),
        ("/* no block comments */ true", 1, 1, "Syntax error"),
        ("", 1, 1, "mismatched input '<EOF>'"),
        ("0xfffffffffffffffffffffff == 1", 1, 1, "invalid int literal"),
        ('"\\uD800" == body', 1, 1, "invalid string literal"),
    ],
)
def test_syntax_errors_say_where(text: str, line: int, column: int, words: str) -> None:
    error = error_of(text)
    assert (error.line, error.column) == (line, column), error
    assert words in error.message
    assert str(error).startswith(f"does not compile: line {line}, column {column}: ")
    assert "\n" not in str(error) and len(error.message) <= conditions.MESSAGE_CHARS


def test_nesting_beyond_the_parsers_limit_is_refused_in_words() -> None:
    error = error_of("(" * 200 + "true" + ")" * 200)
    assert error.message == "nested too deeply (more than 96 levels)" and error.line == 1
    assert compiles("(" * 50 + "true" + ")" * 50)


@pytest.mark.parametrize(
    ("text", "name", "column"),
    [
        ('body.split(",").size() > 1', "split", 6),
        ('json.status.lowerAscii() == "up"', "lowerAscii", 13),
        # The same word earlier inside a string, or as part of a longer name, is not the call.
        ('body.contains("split(x)") && body.split(",") == []', "split", 35),
        ('json.trim_me == 1 && body.trim() == ""', "trim", 27),
        ("max(1, 2) == 2", "max", 1),
    ],
)
def test_unknown_functions_are_refused_where_they_are_called(text: str, name: str, column: int) -> None:
    error = error_of(text)
    assert error.message.startswith(f"unknown function {name}() (the functions are: bytes, contains,")
    assert (error.line, error.column) == (1, column)


def test_every_listed_function_exists_in_the_library() -> None:
    # A function this CEL lacks fails as "Undefined variable or function" when it runs; each listed one is known.
    calls = {
        "bytes": 'bytes("a")', "contains": '"a".contains("a")', "double": "double(1)", "duration": 'duration("1s")',
        "dyn": "dyn(1)", "endsWith": '"a".endsWith("a")', "int": "int(1.5)", "matches": '"a".matches("a")',
        "size": 'size("a")', "startsWith": '"a".startsWith("a")', "string": "string(1)", "type": "type(1)",
        "timestamp": 'timestamp("2024-01-01T00:00:00Z")', "uint": "uint(1)",
    }  # fmt: skip
    accessors = FUNCTIONS - set(calls)
    assert all(name.startswith("get") for name in accessors)
    calls |= {name: f'timestamp("2024-01-01T00:00:00Z").{name}()' for name in accessors}
    for name, call in calls.items():
        assert name in compile_condition(call).functions()
        cel.compile(call).execute({})  # raises if the library does not have it


def test_unknown_variables_are_left_to_the_evaluation() -> None:
    # cel-rust lists a comprehension's variable among the variables, so a typo cannot be told from one here.
    assert set(compile_condition("jsn.status == 1").variables()) == {"jsn"}
    assert set(compile_condition("json.all(item, item.ok)").variables()) == {"json", "item"}


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ("true && \x00", 1, 9, "NUL"),
        ('body == "\x00"', 1, 10, "NUL"),  # inside a string too: PostgreSQL cannot store it
        ("true\n&& \ud800", 2, 4, "lone surrogate"),
        ('"\udfff"', 1, 2, "lone surrogate"),
    ],
)
def test_text_the_library_must_not_see_is_refused_where_it_is(text: str, line: int, column: int, words: str) -> None:
    error = error_of(text)
    assert (error.line, error.column) == (line, column) and words in error.message


def test_length_limit() -> None:
    longest = "true" + " " * (MAX_CONDITION_CHARS - 4)
    assert compiles(longest)
    error = error_of(longest + " ")
    assert error.line is None and str(error) == f"does not compile: longer than {MAX_CONDITION_CHARS} characters (1001)"


def test_control_and_formatting_characters_are_syntax_errors() -> None:
    for character in ("\u202e", "\x1b", "\u2028", "\ufeff"):
        error = error_of(f"true && {character}false")
        assert (error.line, error.column) == (1, 9), (character, error)


def test_position_counts_characters_and_lines() -> None:
    text = "ab\ncdé\nf"
    assert [position(text, index) for index in range(len(text))] == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (2, 4), (3, 1),
    ]  # fmt: skip


def test_a_rust_panic_becomes_a_condition_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class PanicException(BaseException):  # as pyo3 defines it: not an Exception
        pass

    def panicking(text: str) -> cel.Program:
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(conditions.cel, "compile", panicking)
    error = error_of("true")
    assert error.message == "the CEL library failed on it (PanicException: called `Option::unwrap()` on a `None` value)"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError])
def test_the_interpreter_stopping_is_not_taken_for_a_panic(monkeypatch: pytest.MonkeyPatch, stop: type) -> None:
    assert not is_library_panic(stop())

    def stopping(text: str) -> cel.Program:
        raise stop()

    monkeypatch.setattr(conditions.cel, "compile", stopping)
    with pytest.raises(stop):
        compile_condition("true")


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_odd_inputs_never_escape_as_anything_else(text: str) -> None:
    started = time.perf_counter()
    try:
        program = compile_condition(text[:MAX_CONDITION_CHARS])
    except ConditionError as error:
        assert error.message and (error.line is None) == (error.column is None)
        assert "\n" not in str(error)
    else:
        assert isinstance(program, cel.Program)
    assert time.perf_counter() - started < 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_CONDITION_CHARS))
def test_any_text_compiles_or_is_refused(text: str) -> None:
    try:
        compile_condition(text)
    except ConditionError as error:
        assert str(error).startswith("does not compile: ")


@pytest.mark.parametrize(
    "text",
    [
        "(" * 499 + "1" + ")" * 499,
        "[" * 500 + "]" * 500,
        "{" * 333 + "}" * 333,
        "-" * 999 + "1",
        "!" * 996 + "true",
        "1" + "+1" * 499,
        "a" + ".b" * 499,
        "f(" * 333 + ")" * 333,
        "true ? " * 100 + "1" + " : 2" * 100,
        '"' + "\\" * 998 + '"',
        "9" * 1000,
        "1." + "9" * 998,
        "x" * 1000,
        " " * 999 + "1",
        "\n" * 999 + "1",
    ],
)
def test_extreme_shapes_compile_quickly_or_are_refused(text: str) -> None:
    started = time.perf_counter()
    try:
        compile_condition(text[:MAX_CONDITION_CHARS])
    except ConditionError:
        pass
    assert time.perf_counter() - started < 1.0
