"""Fleets as code: `healthgate apply -f FILE [--dry-run] [--prune]` and `healthgate export` (CONTRACT §1).

A fleet file names hosts (by `name`) with their `group`, `agent_url`, optional `id` and checks (by `name`, each
with its `check_type` and the API's check fields), and group policies (CONTRACT §6) under `groups`:

    hosts:
      - name: web-1
        group: web
        agent_url: http://10.0.0.11:9100
        checks:
          - {name: homepage, check_type: http, url: "https://web-1.example/health"}
    groups:
      web: {max_unavailable: 1}

The file is read with ruamel.yaml, which keeps each value's line and column, then `${VAR}` in a string value is
replaced by that environment variable, and the result is validated against `fleet_schema()` (published as
docs/fleet.schema.json) with jsonschema and then by the API's own request models (the rules over several fields,
a CEL `condition` that must compile). Every problem is reported at once as `FILE:LINE: FIELD: message`, and
nothing is applied (exit 2).

`apply` reads the current state through the API (hosts, every check via `GET /api/v1/health-checks`, groups:
pages of 500), computes a `Plan` (create / update / delete / unchanged per host, check and policy), prints it
the way `terraform plan` does, and applies it in dependency order with up to `IN_FLIGHT` requests at once:
policies; deletes of checks (so that a host stays within 5 checks and a service check goes before its host's
agent_url); new hosts with their checks (`POST /api/v1/hosts:batchCreate`, 100 hosts a request, each request all
or none) and updates of hosts; updates and creates of checks of existing hosts; deletes of hosts.

What counts as a change: a host's `group` and `agent_url` (omitted = none) and, with an `id` in the file, an id
that differs is an error (ids cannot change). A check's fields are compared after the API's own model gave the
file's check its defaults (`enabled` true, `method` GET, ...); `interval_seconds` and `timeout_seconds` default
to the server's configuration, so they are compared only when the file names them. `basic_auth_pass` is
write-only: the API says only whether one is set (`basic_auth_pass_set`), so a password in the file counts as a
change only when none is set, `basic_auth_pass: null` only when one is set, and an omitted one never (the stored
one is kept). A password that changed while one is set is therefore not seen; it is sent again whenever its check
is updated for another reason, and `--resend-secrets` re-sends every password of the file (the API keeps a
password that is the same, and changes nothing then). A policy is compared in full (a PUT replaces every field).

`export` writes every visible host and check (and the policies that differ from the defaults) as a fleet file:
fields at their default are left out, except `interval_seconds` and `timeout_seconds`; a set password becomes
`basic_auth_pass: ${HEALTHGATE_PASS_<HOST>_<CHECK>}` (never its value), so `export | apply` plans nothing once
those variables are set.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import httpx
import jsonschema
import jsonschema_rs
import typer
from pydantic import TypeAdapter, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from services.api.schemas import (
    CHECK_WRITE_MODELS,
    COMMON_WRITABLE_FIELDS,
    FIELDS_OF_TYPE,
    HostBatchItem,
    HostCreate,
)
from services.api_client import (
    DEFAULT_URL,
    MAX_PAGE,
    TOKEN_VARIABLE,
    UNREACHABLE,
    URL_VARIABLE,
    ApiClientError,
    ApiError,
    ApiUnreachable,
    answer_of,
    api_path,
    page_items,
    unreachable,
    usable_base_url,
    usable_token,
)
from shared.group_policies import GroupPolicy

# Writes in flight at once during an apply: enough to keep the API's database busy on a small machine without
# queueing hundreds of requests in its pool.
IN_FLIGHT = 16
EXIT_OK, EXIT_FAILED, EXIT_BAD_FILE = 0, 1, 2
# Failed changes an apply prints: when the API goes away mid-apply, every change in flight after it fails for the
# same reason, and hundreds of identical lines would bury what to do.
SHOWN_FAILURES = 10
SENSITIVE = "(sensitive)"
PASSWORD = "basic_auth_pass"
# Defaulted by the server's configuration (HEALTHGATE_POLL_INTERVAL_SECONDS, ..._CHECK_TIMEOUT_SECONDS): compared
# only when the file names them.
SERVER_DEFAULTED = frozenset({"interval_seconds", "timeout_seconds"})
_VARIABLE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---- the schema ----------------------------------------------------------------------------------


def fleet_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a fleet file, built from the API's request models so that the two never
    disagree: each check type's fields as the API takes them (selected by `check_type` with if/then, so that an
    error names the field of the right type), a host's fields, and the group policy of CONTRACT §6.
    docs/fleet.schema.json is this, published (tests/test_fleet.py keeps it equal)."""
    definitions: dict[str, Any] = {}
    type_rules = []
    for kind, model in CHECK_WRITE_MODELS.items():
        name = f"{kind}_check"
        definitions[name] = _clean(model.model_json_schema(ref_template="#/$defs/{model}"), definitions)
        type_rules.append(
            {
                "if": {"properties": {"check_type": {"const": kind}}, "required": ["check_type"]},
                "then": {"$ref": f"#/$defs/{name}"},
            }
        )
    definitions["check"] = {
        "type": "object",
        "description": "a health check, matched by its name on the host; the API's check fields (docs/api.md)",
        "required": ["name", "check_type"],
        "properties": {"check_type": {"enum": list(CHECK_WRITE_MODELS)}},
        "allOf": type_rules,
    }
    host = _clean(HostCreate.model_json_schema(ref_template="#/$defs/{model}"), definitions)
    host["properties"]["id"] = {
        "type": "string",
        "format": "uuid",
        "description": "reuse another system's host id (only when the host is created; it never changes)",
    }
    host["properties"]["checks"] = {
        "type": "array",
        "maxItems": 5,
        "items": {"$ref": "#/$defs/check"},
        "description": "at most 5, each name once; with --prune, the host's checks not named here are deleted",
    }
    host["description"] = "a host, matched by its name"
    definitions["host"] = host
    definitions["group_policy"] = _clean(GroupPolicy.model_json_schema(ref_template="#/$defs/{model}"), definitions)
    definitions["group_policy"]["description"] = "a group's policy (CONTRACT §6); omitted fields take their defaults"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://healthgate.invalid/fleet.schema.json",
        "title": "healthgate fleet file",
        "description": "hosts, their checks and group policies, for `healthgate apply -f FILE` (docs/fleet.md)",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "hosts": {"type": "array", "items": {"$ref": "#/$defs/host"}},
            "groups": {
                "type": "object",
                "propertyNames": copy.deepcopy(host["properties"]["group"]),
                "additionalProperties": {"$ref": "#/$defs/group_policy"},
            },
        },
        "$defs": definitions,
    }


def _clean(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A pydantic model's schema as plain JSON Schema: its $defs moved up, titles dropped, and pydantic's
    `ge`/`le` (left in unions of annotated ints) written as `minimum`/`maximum`."""
    definitions.update(schema.pop("$defs", {}))

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            renamed = {{"ge": "minimum", "le": "maximum"}.get(key, key): walk(value) for key, value in node.items()}
            if isinstance(renamed.get("title"), str):
                del renamed["title"]
            return renamed
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    cleaned: dict[str, Any] = walk(schema)
    for name, definition in list(definitions.items()):
        definitions[name] = walk(definition)
    return cleaned


# ---- reading a file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem of a fleet file: its line (1-based; None when unknown), the field (`hosts[2].checks[0].port`)
    and what is wrong, in words that never hold a secret's value."""

    line: int | None
    field: str
    message: str

    def render(self, source: str) -> str:
        """`FILE:LINE: FIELD: message`, one line (a YAML reader's message spans two)."""
        place = f"{source}:{self.line}" if self.line is not None else source
        message = " ".join(self.message.split())
        return f"{place}: {self.field}: {message}" if self.field else f"{place}: {message}"


class FleetFileError(Exception):
    """A fleet file that cannot be applied; `problems` lists every problem found, `source` names the file."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(problem.render(source) for problem in self.problems))


@dataclass
class DesiredCheck:
    """A check as the file wants it: `fields` every writable field (the API's defaults filled in, no password),
    `named` the fields the file gives, `password` the file's basic_auth_pass (`named` says whether it gave one)."""

    name: str
    fields: dict[str, Any]
    named: frozenset[str]
    password: str | None
    line: int | None


@dataclass
class DesiredHost:
    name: str
    group: str
    agent_url: str | None
    id: str | None
    checks: list[DesiredCheck]
    line: int | None


@dataclass
class Fleet:
    """A validated fleet file: its hosts (in file order) and group policies."""

    hosts: list[DesiredHost]
    policies: dict[str, GroupPolicy]

    @property
    def groups(self) -> set[str]:
        """The file's groups: those its hosts name and those under `groups` (--prune stays within them)."""
        return {host.group for host in self.hosts} | set(self.policies)


def load_fleet(text: str, source: str, environ: Mapping[str, str]) -> Fleet:
    """Read, substitute `${VAR}` from `environ`, and validate a fleet file's `text` (`source` names it in
    errors). Raises FleetFileError listing every problem with its line.

    The file is read first by the json module when it is JSON, else by ruamel.yaml's safe loader (its C parser
    when ruamel.yaml.clib is installed), and checked with jsonschema-rs and the API's models over the whole list
    of hosts (`_fast_fleet`). Only a file with problems is read again with the round-trip loader, whose line and
    column of every value name the lines, and checked with jsonschema, whose errors say which branch failed: that
    path is pure Python and several times slower (a 5,000-host file: tens of seconds)."""
    document = _json_document(text)
    if document is _NOT_READ:
        try:
            document = YAML(typ="safe").load(text)
        except YAMLError:
            document = _NOT_READ
    if document is not _NOT_READ:
        fleet = _fast_fleet(document, environ)
        if fleet is not None:
            return fleet
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise FleetFileError(source, [Problem(line, "", f"not valid YAML: {exc.problem or exc.context}")]) from None
    except ReaderError as exc:  # a character YAML does not allow (NUL, ...): named by its position in the text
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        raise FleetFileError(source, [Problem(line, "", f"not valid YAML: {exc.reason}")]) from None
    except YAMLError as exc:
        raise FleetFileError(source, [Problem(None, "", f"not valid YAML: {exc}")]) from None
    fleet, problems = _validated(document, environ)
    if problems or fleet is None:
        raise FleetFileError(source, problems or [Problem(None, "", "not a fleet file")])
    return fleet


_NOT_READ = object()


def _json_document(text: str) -> Any:
    """A file written as JSON (a YAML 1.2 document too) read by the json module, ~100x faster than a YAML
    loader (generated fleets); _NOT_READ when it is not JSON, or holds a key twice (YAML refuses that: the
    slow path says where)."""
    if not text.lstrip().startswith("{"):
        return _NOT_READ

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = {key for key, _ in pairs}
        if len(keys) != len(pairs):
            raise ValueError("a key given twice")
        return dict(pairs)

    def not_json(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")  # NaN and Infinity: YAML reads them as strings

    try:
        return json.loads(text, object_pairs_hook=unique, parse_constant=not_json)
    except (ValueError, RecursionError):
        return _NOT_READ


# A file's hosts as POST /api/v1/hosts:batchCreate takes them: the host's fields and its checks by check_type.
_HOSTS: TypeAdapter[list[HostBatchItem]] = TypeAdapter(list[HostBatchItem])


@functools.cache
def _schema_validator() -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for(fleet_schema(), validate_formats=True)


def _fast_fleet(document: Any, environ: Mapping[str, str]) -> Fleet | None:
    """The fleet of a valid file read by the safe loader, checked with jsonschema-rs and the API's models over
    the whole list at once; None when the file has a problem (the slow path then words every problem with its
    line) or holds what the fast checks cannot take (a YAML timestamp, an integer beyond 64 bits)."""
    if document is None:
        document = {}
    if _shape_problem(document) is not None:  # a cycle or "billion laughs": never walked further here
        return None
    if any(True for _ in _substitute(document, environ, ())):
        return None
    try:
        if not _schema_validator().is_valid(document):
            return None
        items = _HOSTS.validate_python(document.get("hosts", []))
        policies = {group: GroupPolicy.model_validate(raw) for group, raw in document.get("groups", {}).items()}
    except (ValidationError, ValueError, TypeError, OverflowError):
        return None
    hosts: list[DesiredHost] = []
    names: set[str] = set()
    ids: set[uuid.UUID] = set()
    for raw, item in zip(document.get("hosts", []), items, strict=True):
        if item.name in names or (item.id is not None and item.id in ids):
            return None
        names.add(item.name)
        if item.id is not None:
            ids.add(item.id)
        checks: list[DesiredCheck] = []
        for raw_check, body in zip(raw.get("checks", []), item.checks, strict=True):
            if any(check.name == body.name for check in checks):
                return None
            values = body.model_dump()
            password = values.pop(PASSWORD, None)
            checks.append(DesiredCheck(body.name, values, frozenset(raw_check), password, None))
        hosts.append(
            DesiredHost(item.name, item.group, item.agent_url, str(item.id) if item.id else None, checks, None)
        )
    return Fleet(hosts, policies)


def _validated(document: Any, environ: Mapping[str, str]) -> tuple[Fleet | None, list[Problem]]:
    """The fleet of a loaded document, or the problems found (their lines known when `document` came from the
    round-trip loader)."""
    if document is None:
        document = CommentedMap()
    shape = _shape_problem(document)
    if shape is not None:
        return None, [shape]
    used: dict[str, str] = {}
    problems = list(_substitute(document, environ, (), used=used))
    if problems:
        return None, problems
    plain = _plain(document)
    validator = jsonschema.Draft202012Validator(fleet_schema(), format_checker=jsonschema.FormatChecker())
    for error in sorted(validator.iter_errors(plain), key=lambda error: list(map(str, error.absolute_path))):
        problems.append(_schema_problem(document, error))
    if problems:
        return None, _without_values(problems, used)
    fleet, problems = _read_models(document, plain)
    return fleet, _without_values(problems, used)


# Values of variables shorter than this are left in messages: they hold no secret, and replacing a "1" or "web"
# everywhere in a message would garble it.
MIN_HIDDEN_VALUE = 4


def _without_values(problems: list[Problem], used: Mapping[str, str]) -> list[Problem]:
    """`problems` with every value of a `${VAR}` the file used (`used`: name → value) written `${VAR}` again:
    `${VAR}` is there for secrets, and a message quotes the value that does not fit (`'...' is too long`)."""
    hidden = sorted(
        ((value, name) for name, value in used.items() if len(value) >= MIN_HIDDEN_VALUE),
        key=lambda pair: -len(pair[0]),
    )
    if not hidden:
        return problems
    result = []
    for problem in problems:
        message = problem.message
        for value, name in hidden:
            for shown in {value, repr(value)[1:-1], json.dumps(value)[1:-1]}:
                message = message.replace(shown, "${" + name + "}")
        result.append(Problem(problem.line, problem.field, message))
    return result


# A fleet file is at most 7 levels deep (hosts, a host, its checks, a check, expected_values, ...); far deeper
# nesting is no fleet file, and the recursive steps below (and jsonschema's) would exhaust Python's stack on it.
MAX_DEPTH = 32
# Aliases may share a node (a list of checks several hosts name), but the file they make must stay near the size
# of the text: "billion laughs" (nine aliases of nine aliases of ...) expands a few lines to 10^9 values.
MAX_EXPANSION_FACTOR = 100
MIN_EXPANSION_LIMIT = 100_000


def _shape_problem(document: Any) -> Problem | None:
    """A problem when the loaded `document` is no tree a fleet file can be: a mapping or list that holds itself
    through an alias, nesting deeper than MAX_DEPTH, or aliases that expand it to more than MAX_EXPANSION_FACTOR
    times its own nodes (at least MIN_EXPANSION_LIMIT). None when it is fine. Linear in the document's distinct
    nodes, without recursion."""
    sizes: dict[int, int] = {}  # a finished container's id → its nodes once every alias is expanded
    active: set[int] = set()  # the containers on the path being walked (a cycle comes back to one of them)
    stack: list[tuple[Any, int, Iterator[Any]]] = []

    def children(node: Any) -> Iterator[Any]:
        return iter(node.values() if isinstance(node, dict) else node)

    def enter(node: Any, depth: int) -> Problem | None:
        if depth > MAX_DEPTH:
            return Problem(_line_of(node, None), "", f"nested more than {MAX_DEPTH} levels deep: not a fleet file")
        active.add(id(node))
        stack.append((node, depth, children(node)))
        return None

    if not isinstance(document, (dict, list)):
        return None
    problem = enter(document, 1)
    while stack and problem is None:
        node, depth, rest = stack[-1]
        child = next(rest, _NOT_READ)
        if child is _NOT_READ:
            stack.pop()
            active.discard(id(node))
            values = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(sizes.get(id(item), 1) for item in values)
            continue
        if not isinstance(child, (dict, list)) or id(child) in sizes:
            continue
        if id(child) in active:
            return Problem(_line_of(node, None), "", "an alias refers to a node that holds it (a cycle)")
        problem = enter(child, depth + 1)
    if problem is not None:
        return problem
    limit = max(MIN_EXPANSION_LIMIT, MAX_EXPANSION_FACTOR * len(sizes))
    if sizes[id(document)] > limit:
        return Problem(
            None, "", f"its aliases expand it to {sizes[id(document)]:,} values (more than {limit:,}): not a fleet file"
        )
    return None


def _substitute(
    node: Any,
    environ: Mapping[str, str],
    path: tuple[str | int, ...],
    done: set[int] | None = None,
    used: dict[str, str] | None = None,
) -> Iterator[Problem]:
    """Replace `${VAR}` in every string value, in place; `$${VAR}` stands for a literal `${VAR}`. Keys are
    left alone. Yields a problem for each variable that is not set. A node that aliases share is substituted
    once (`done`: the ids of the containers already done), or a second pass would read a `$${VAR}` made
    literal, or a variable's value, for variables again. `used` gets each variable used and its value."""
    done = set() if done is None else done
    used = {} if used is None else used
    if id(node) in done:
        return
    done.add(id(node))
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return
    for key, value in items:
        if isinstance(value, str):
            missing: list[str] = []

            def replace(match: re.Match[str], missing: list[str] = missing) -> str:
                if match[1]:
                    return "${" + match[2] + "}"
                if match[2] not in environ:
                    missing.append(match[2])
                    return ""
                used[match[2]] = environ[match[2]]
                return environ[match[2]]

            replaced = _VARIABLE.sub(replace, value)
            for name in missing:
                yield Problem(_line_of(node, key), _field_name((*path, key)), f"environment variable {name} is not set")
            if replaced != value:
                node[key] = replaced
        else:
            yield from _substitute(value, environ, (*path, key), done, used)


def _plain(node: Any) -> Any:
    """The document as plain JSON values (ruamel's round-trip types are subclasses, but jsonschema and pydantic
    are happier with the builtins)."""
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _line_of(container: Any, key: str | int | None) -> int | None:
    """The 1-based line of `container[key]` (of the container itself when key is None or unknown)."""
    try:
        if key is not None and isinstance(container, CommentedMap) and key in container:
            return int(container.lc.key(key)[0]) + 1
        if key is not None and isinstance(container, CommentedSeq) and isinstance(key, int) and key < len(container):
            return int(container.lc.item(key)[0]) + 1
        if isinstance(container, (CommentedMap, CommentedSeq)):
            return int(container.lc.line) + 1
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    return None


def _locate(document: Any, path: Sequence[str | int]) -> tuple[Any, str | int | None]:
    """The deepest container along `path` and the key within it."""
    node, key = document, None
    for index, step in enumerate(path):
        if index == len(path) - 1:
            return node, step
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return node, step
    return node, key


def _field_name(path: Sequence[str | int]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def _schema_problem(document: Any, error: jsonschema.ValidationError) -> Problem:
    path = list(error.absolute_path)
    message = error.message
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        container, _ = _locate(document, [*path, ""])
        return Problem(_line_of(container, None), _field_name([*path, *missing[:1]]), "required")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = [name for name in error.instance if name not in allowed]
        container, _ = _locate(document, [*path, ""])
        first = extra[0] if extra else None
        return Problem(_line_of(container, first), _field_name([*path, *extra[:1]]), "not a field here (unknown)")
    if error.context:
        # A union (`integer or null`): the branch whose type fits says what is wrong, not "is not of type 'null'".
        fitting = [sub for sub in error.context if sub.validator != "type"]
        message = (fitting or error.context)[0].message
    if path and path[-1] == PASSWORD:
        message = "must be a string of at most 500 characters"  # the value itself is never repeated
    container, key = _locate(document, path)
    return Problem(_line_of(container, key), _field_name(path), message)


def _model_problems(document: Any, path: Sequence[str | int], exc: ValidationError) -> Iterator[Problem]:
    for error in exc.errors(include_url=False):
        loc = [step for step in error["loc"] if isinstance(step, (str, int))]
        full = [*path, *loc]
        container, key = _locate(document, full) if loc else (_locate(document, [*path, ""])[0], None)
        message = error["msg"].removeprefix("Value error, ")
        if loc and loc[-1] == PASSWORD:
            message = "not a valid password (" + error["type"] + ")"
        yield Problem(_line_of(container, key), _field_name(full), message)


def _read_models(document: Any, plain: dict[str, Any]) -> tuple[Fleet, list[Problem]]:
    """The file through the API's request models: the rules over several fields that a schema cannot say, the
    API's defaults, and names given once."""
    problems: list[Problem] = []
    hosts: list[DesiredHost] = []
    names: dict[str, int] = {}
    ids: dict[str, int] = {}
    for index, raw in enumerate(plain.get("hosts", [])):
        path: tuple[str | int, ...] = ("hosts", index)
        host_fields = {key: value for key, value in raw.items() if key != "checks"}
        try:
            host = HostCreate.model_validate(host_fields)
        except ValidationError as exc:
            problems.extend(_model_problems(document, path, exc))
            continue
        line = _line_of(document["hosts"], index)
        if host.name in names:
            where = _line_of(document["hosts"][index], "name")
            problems.append(
                Problem(
                    where, _field_name((*path, "name")), f"{host.name!r} is named twice (hosts[{names[host.name]}])"
                )
            )
        names.setdefault(host.name, index)
        if host.id is not None:
            if str(host.id) in ids:
                where = _line_of(document["hosts"][index], "id")
                problems.append(Problem(where, _field_name((*path, "id")), "the same id as another host"))
            ids.setdefault(str(host.id), index)
        checks: list[DesiredCheck] = []
        seen: set[str] = set()
        for number, check in enumerate(raw.get("checks", [])):
            check_path = (*path, "checks", number)
            model = CHECK_WRITE_MODELS[check["check_type"]]
            try:
                body = model.model_validate(check)
            except ValidationError as exc:
                problems.extend(_model_problems(document, check_path, exc))
                continue
            if body.name in seen:
                where = _line_of(document["hosts"][index]["checks"][number], "name")
                problems.append(
                    Problem(where, _field_name((*check_path, "name")), f"{body.name!r} is named twice on this host")
                )
            seen.add(body.name)
            values = body.model_dump()
            password = values.pop(PASSWORD, None)
            checks.append(
                DesiredCheck(
                    body.name, values, frozenset(check), password, _line_of(document["hosts"][index]["checks"], number)
                )
            )
        hosts.append(
            DesiredHost(host.name, host.group, host.agent_url, str(host.id) if host.id else None, checks, line)
        )
    policies: dict[str, GroupPolicy] = {}
    for group, raw_policy in plain.get("groups", {}).items():
        try:
            policies[group] = GroupPolicy.model_validate(raw_policy)
        except ValidationError as exc:
            problems.extend(_model_problems(document, ("groups", group), exc))
    return Fleet(hosts, policies), problems


# ---- the API -------------------------------------------------------------------------------------


@dataclass
class FleetApi:
    """What apply and export need of healthgate's API, over one `httpx.AsyncClient` (its base URL and token
    set by the caller)."""

    http: httpx.AsyncClient

    async def call(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        """One call → the answer's JSON (None for 204). Raises ApiError (services/api_client.py) for an error
        answer, ApiUnreachable when there is none."""
        try:
            response = await self.http.request(method, path, json=body, params=params)
        except UNREACHABLE as exc:
            raise unreachable(exc, str(self.http.base_url)) from None
        return answer_of(response, has_token="authorization" in self.http.headers, base_url=str(self.http.base_url))

    async def every(self, path: str) -> list[dict[str, Any]]:
        """Every item of a paged list, 500 at a time."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": MAX_PAGE} | ({"cursor": cursor} if cursor else {})
            page = await self.call("GET", path, params=params)
            items.extend(page_items(page, str(self.http.base_url)))
            cursor = page.get("next_cursor")
            if not cursor:
                return items


@dataclass
class Current:
    """What the API holds now: hosts by name, each host's checks by name, and every group's policy."""

    hosts: dict[str, dict[str, Any]]
    checks: dict[str, dict[str, dict[str, Any]]]
    policies: dict[str, dict[str, Any]]


async def read_current(api: FleetApi) -> Current:
    """Hosts, checks and groups through the paged lists, read at once."""
    hosts, checks, groups = await asyncio.gather(
        api.every("/api/v1/hosts"), api.every("/api/v1/health-checks"), api.every("/api/v1/groups")
    )
    names = {host["id"]: host["name"] for host in hosts}
    by_host: dict[str, dict[str, dict[str, Any]]] = {host["name"]: {} for host in hosts}
    for check in checks:
        name = names.get(check["host_id"])
        if name is not None:  # a host created between the two reads: not in this plan
            by_host[name][check["name"]] = check
    return Current(
        {host["name"]: host for host in hosts}, by_host, {group["group"]: group["policy"] for group in groups}
    )


# ---- planning ------------------------------------------------------------------------------------

Action = Literal["create", "update", "delete"]
SYMBOL = {"create": "+", "update": "~", "delete": "-"}


@dataclass
class Change:
    """One change of the plan. `kind` host | check | policy; `host` the host's name (a check's host), `name`
    the check's name or the group; `changes` (field, before, after) for an update, values shown by `render`."""

    action: Action
    kind: Literal["host", "check", "policy"]
    host: str
    name: str
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)
    host_id: str | None = None
    check_id: str | None = None


@dataclass
class Plan:
    changes: list[Change]
    unchanged: dict[str, int]
    errors: list[str]

    def count(self, action: Action) -> int:
        return sum(1 for change in self.changes if change.action == action)

    def by(self, action: Action, kind: str) -> list[Change]:
        return [change for change in self.changes if change.action == action and change.kind == kind]


def plan(fleet: Fleet, current: Current, *, prune: bool, resend_secrets: bool = False) -> Plan:
    """The changes that make the API match `fleet` (see the module's docstring for what counts as one)."""
    changes: list[Change] = []
    unchanged = {"host": 0, "check": 0, "policy": 0}
    errors: list[str] = []
    for group, policy in sorted(fleet.policies.items()):
        wanted = policy.model_dump()
        before = current.policies.get(group)
        if before is None:
            changes.append(Change("create", "policy", "", group, body=wanted))
            continue
        diff = [(name, before.get(name), value) for name, value in wanted.items() if before.get(name) != value]
        if diff:
            changes.append(Change("update", "policy", "", group, diff, body=wanted))
        else:
            unchanged["policy"] += 1
    named = set()
    for host in fleet.hosts:
        named.add(host.name)
        body = {"name": host.name, "group": host.group, "agent_url": host.agent_url}
        existing = current.hosts.get(host.name)
        if existing is None:
            changes.append(
                Change("create", "host", host.name, host.name, body=body | ({"id": host.id} if host.id else {}))
            )
            for check in host.checks:
                changes.append(Change("create", "check", host.name, check.name, body=_check_body(check, True)))
            continue
        if host.id is not None and host.id != existing["id"]:
            errors.append(
                f"host {host.name}: the file's id {host.id} is not the host's id {existing['id']} (ids never change)"
            )
            continue
        diff = [
            (name, existing.get(name), body[name])
            for name in ("group", "agent_url")
            if existing.get(name) != body[name]
        ]
        if diff:
            changes.append(Change("update", "host", host.name, host.name, diff, body=body, host_id=existing["id"]))
        else:
            unchanged["host"] += 1
        stored = current.checks.get(host.name, {})
        for check in host.checks:
            before_check = stored.get(check.name)
            if before_check is None:
                changes.append(
                    Change(
                        "create", "check", host.name, check.name, body=_check_body(check, True), host_id=existing["id"]
                    )
                )
                continue
            diff = _check_diff(check, before_check, resend_secrets)
            if diff:
                changes.append(
                    Change(
                        "update", "check", host.name, check.name, diff,
                        body=_check_body(check, False, before_check), host_id=existing["id"],
                        check_id=before_check["id"],
                    )
                )  # fmt: skip
            else:
                unchanged["check"] += 1
        if prune:
            wanted_names = {check.name for check in host.checks}
            for name, before_check in sorted(stored.items()):
                if name not in wanted_names:
                    changes.append(
                        Change("delete", "check", host.name, name, host_id=existing["id"], check_id=before_check["id"])
                    )
    if prune:
        groups = fleet.groups
        for name, existing in sorted(current.hosts.items()):
            if name not in named and existing["group"] in groups:
                checks = current.checks.get(name, {})
                changes.append(
                    Change("delete", "host", name, name, [("checks", len(checks), 0)], host_id=existing["id"])
                )
    return Plan(changes, unchanged, errors)


@functools.cache
def _check_fields(kind: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*COMMON_WRITABLE_FIELDS, *(n for n in FIELDS_OF_TYPE[kind] if n != PASSWORD))))


def _normal(name: str, value: Any) -> Any:
    # The API stores an empty expected_body as none.
    return None if name == "expected_body" and value == "" else value


def _check_diff(check: DesiredCheck, before: dict[str, Any], resend_secrets: bool) -> list[tuple[str, Any, Any]]:
    diff = []
    for name in _check_fields(check.fields["check_type"]):
        wanted, stored = check.fields.get(name), before.get(name)
        if wanted == stored or (name in SERVER_DEFAULTED and name not in check.named):
            continue
        if _normal(name, stored) != _normal(name, wanted):
            diff.append((name, stored, _normal(name, wanted)))
    is_set = bool(before.get("basic_auth_pass_set"))
    if PASSWORD in check.named:
        if (check.password is not None) != is_set or (check.password is not None and resend_secrets):
            diff.append((PASSWORD, SENSITIVE if is_set else None, SENSITIVE if check.password is not None else None))
    elif is_set and check.fields.get("basic_auth_user") is None:
        # The file wants no user: the password cannot be kept (the API sends it only with a user).
        diff.append((PASSWORD, SENSITIVE, None))
    return diff


def _check_body(check: DesiredCheck, create: bool, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The POST or PUT body: the file's fields as it gives them (the API fills in the same defaults), the password
    when the file gives one, `null` when the file's check has no user but a password is stored."""
    body = {name: value for name, value in check.fields.items() if name in check.named or value is not None}
    body = {name: value for name, value in body.items() if not (name in SERVER_DEFAULTED and name not in check.named)}
    if PASSWORD in check.named:
        body[PASSWORD] = check.password
    elif before is not None and before.get("basic_auth_pass_set") and check.fields.get("basic_auth_user") is None:
        body[PASSWORD] = None
    if create and body.get(PASSWORD) is None:
        body.pop(PASSWORD, None)
    return body


def render_plan(result: Plan, out: IO[str]) -> None:
    """The plan as `terraform plan` prints one: `+` create, `~` update (each changed field, before → after),
    `-` delete; a password only ever as (sensitive); then a one-line summary."""
    for change in result.changes:
        symbol = SYMBOL[change.action]
        if change.kind == "policy":
            out.write(f"{symbol} policy {change.name}\n")
        elif change.kind == "host":
            extra = f" (group {change.body['group']})" if change.action == "create" else ""
            out.write(f"{symbol} host {change.name}{extra}\n")
        else:
            kind = f" ({change.body['check_type']})" if change.action == "create" else ""
            out.write(f"  {symbol} check {change.host}/{change.name}{kind}\n")
        indent = "      " if change.kind == "check" else "    "
        for name, before, after in change.changes:
            if change.action == "delete":
                continue
            out.write(f"{indent}~ {name}: {_shown(name, before)} → {_shown(name, after)}\n")
    for message in result.errors:
        out.write(f"! {message}\n")
    total = sum(result.unchanged.values())
    if not result.changes:
        out.write(f"No changes: {_unchanged_text(result.unchanged)} match the file.\n")
    else:
        out.write(
            f"Plan: {result.count('create')} to create, {result.count('update')} to update, "
            f"{result.count('delete')} to delete, {total} unchanged.\n"
        )


def _unchanged_text(unchanged: dict[str, int]) -> str:
    return f"{unchanged['host']} host(s), {unchanged['check']} check(s) and {unchanged['policy']} policy(ies)"


def _shown(name: str, value: Any) -> str:
    if name == PASSWORD:
        return "(none)" if value is None else SENSITIVE
    return json.dumps(value, ensure_ascii=False)


# ---- applying ------------------------------------------------------------------------------------


async def apply_plan(api: FleetApi, result: Plan, out: IO[str], in_flight: int = IN_FLIGHT) -> list[str]:
    """Carry out `result` in dependency order, `in_flight` requests at a time; a phase that fails stops the
    phases after it (they may need what it did). Returns one line per failed change."""
    limit = asyncio.Semaphore(in_flight)
    failures: list[str] = []
    # Once the API cannot be reached, the changes still waiting are not tried: each would wait for its own
    # connect timeout (minutes for a fleet when the API's address black-holes).
    untried = 0
    unreachable_api = False

    async def run(change: Change, step: Callable[[Change], Awaitable[None]]) -> None:
        nonlocal untried, unreachable_api
        async with limit:
            if unreachable_api:
                untried += 1
                return
            try:
                await step(change)
            except ApiClientError as exc:
                unreachable_api = unreachable_api or isinstance(exc, ApiUnreachable)
                what = f"{change.host}/{change.name}" if change.kind == "check" else change.name
                failures.append(f"{change.action} {change.kind} {what}: {exc}")

    async def put_policy(change: Change) -> None:
        await api.call("PUT", api_path("groups", change.name, "policy"), change.body)

    async def delete_check(change: Change) -> None:
        await api.call("DELETE", f"/api/v1/hosts/{change.host_id}/health-checks/{change.check_id}")

    async def create_hosts(batch: list[Change]) -> None:
        nonlocal untried, unreachable_api
        async with limit:
            if unreachable_api:
                untried += len(batch)
                return
            try:
                await api.call("POST", BATCH_CREATE, {"hosts": [host_batch_item(change) for change in batch]})
            except ApiClientError as exc:
                unreachable_api = unreachable_api or isinstance(exc, ApiUnreachable)
                names = batch[0].name if len(batch) == 1 else f"{batch[0].name} … {batch[-1].name}"
                failures.append(f"create host {names} ({len(batch)} host(s) with their checks): {exc}")

    async def update_host(change: Change) -> None:
        await api.call("PUT", f"/api/v1/hosts/{change.host_id}", change.body)

    async def write_check(change: Change) -> None:
        if change.host_id is None:
            return  # a new host's check: created with its host
        host_id = change.host_id
        if change.action == "create":
            await api.call("POST", f"/api/v1/hosts/{host_id}/health-checks", change.body)
        else:
            await api.call("PUT", f"/api/v1/hosts/{host_id}/health-checks/{change.check_id}", change.body)

    async def delete_host(change: Change) -> None:
        await api.call("DELETE", f"/api/v1/hosts/{change.host_id}")

    new_checks: dict[str, list[Change]] = {}
    for change in result.by("create", "check"):
        if change.host_id is None:
            new_checks.setdefault(change.host, []).append(change)

    def host_batch_item(change: Change) -> dict[str, Any]:
        return change.body | {"checks": [check.body for check in new_checks.get(change.name, [])]}

    phases: list[tuple[list[Change], Callable[[Change], Awaitable[None]]]] = [
        ([*result.by("create", "policy"), *result.by("update", "policy")], put_policy),
        (result.by("delete", "check"), delete_check),
        (result.by("update", "host"), update_host),
        ([*result.by("update", "check"), *result.by("create", "check")], write_check),
        (result.by("delete", "host"), delete_host),
    ]
    for number, (changes, step) in enumerate(phases):
        if number == 2:
            # New hosts go with their checks, in batches (after the checks deleted to keep a host within 5).
            batches = _batches(result.by("create", "host"), host_batch_item)
            await asyncio.gather(*(create_hosts(batch) for batch in batches), *(run(c, step) for c in changes))
        else:
            await asyncio.gather(*(run(change, step) for change in changes))
        if failures:
            break
    if untried:
        failures.append(f"{untried} more change(s) not tried: the API could not be reached")
    return failures


# POST /api/v1/hosts:batchCreate (services/api/host_batches.py) takes at most 100 hosts and 2 MiB.
BATCH_CREATE = "/api/v1/hosts:batchCreate"
BATCH_HOSTS = 100
BATCH_BYTES = 1_500_000


def _batches(changes: list[Change], item: Callable[[Change], dict[str, Any]]) -> list[list[Change]]:
    """The host creates in batches of at most BATCH_HOSTS hosts and about BATCH_BYTES of JSON each."""
    batches: list[list[Change]] = []
    size = 0
    for change in changes:
        length = len(json.dumps(item(change), ensure_ascii=False).encode())
        if not batches or len(batches[-1]) >= BATCH_HOSTS or size + length > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(change)
        size += length
    return batches


async def run_apply(
    api: FleetApi,
    text: str,
    source: str,
    out: IO[str],
    err: IO[str],
    *,
    dry_run: bool = False,
    prune: bool = False,
    resend_secrets: bool = False,
    environ: Mapping[str, str] | None = None,
) -> int:
    """`healthgate apply`: 0 when the API matches the file (or would, with --dry-run), 1 when the API refused a
    change or cannot be reached, 2 for a bad file (nothing applied)."""
    # The API's state is read while the file is (a 5,000-host file takes seconds to read; the API and its
    # database answer meanwhile on the other core). A bad file is said first, whatever the API answered.
    reading = asyncio.create_task(read_current(api))
    try:
        fleet = await asyncio.to_thread(load_fleet, text, source, os.environ if environ is None else environ)
    except FleetFileError as exc:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        err.write(f"{exc}\n")
        return EXIT_BAD_FILE
    except RecursionError:
        # ruamel.yaml's line-keeping loader is recursive: nesting deep enough for it is no fleet file.
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        err.write(f"{source}: nested more than {MAX_DEPTH} levels deep: not a fleet file\n")
        return EXIT_BAD_FILE
    except BaseException:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        raise
    try:
        current = await reading
    except ApiClientError as exc:
        err.write(f"{exc}\n")
        return EXIT_FAILED
    result = plan(fleet, current, prune=prune, resend_secrets=resend_secrets)
    render_plan(result, out)
    if result.errors:
        err.write(f"{len(result.errors)} problem(s) between the file and the API: nothing applied\n")
        return EXIT_FAILED
    try:
        refused = await _refused_by_role(api, result)
    except ApiClientError as exc:
        err.write(f"{exc}\n")
        return EXIT_FAILED
    if refused:
        err.write(f"{refused}{' (this is a dry run)' if dry_run else ''}\n")
        if not dry_run:
            return EXIT_FAILED
    if dry_run or not result.changes:
        return EXIT_OK
    failures = await apply_plan(api, result, out)
    if failures:
        for line in failures[:SHOWN_FAILURES]:
            err.write(f"{line}\n")
        more = f" (the first {SHOWN_FAILURES} above)" if len(failures) > SHOWN_FAILURES else ""
        err.write(
            f"{len(failures)} of the plan's {len(result.changes)} changes failed{more}; the later steps were not run, "
            "the changes made stay: fix the cause and apply again (it plans only what is left)\n"
        )
        return EXIT_FAILED
    out.write(
        f"Applied: {result.count('create')} created, {result.count('update')} updated, "
        f"{result.count('delete')} deleted.\n"
    )
    return EXIT_OK


async def _refused_by_role(api: FleetApi, result: Plan) -> str | None:
    """One line when the token's role (`GET /api/v1/me`) may not make some of the plan's changes (CONTRACT §3: an
    operator changes only checks, a viewer nothing), naming them and saying nothing was applied; else None.
    Asked before the first change, so that such a plan is refused whole rather than applied up to its first
    forbidden step (a --prune's check deletes, say, before a host that cannot be created). An API without
    `/me` (404) is not asked: its answers to the changes say it then."""
    if not result.changes:
        return None
    try:
        caller = await api.call("GET", "/api/v1/me")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    role = caller.get("role") if isinstance(caller, dict) else None
    if role == "admin" or role not in ("operator", "viewer"):
        return None
    refused = [change for change in result.changes if role == "viewer" or change.kind != "check"]
    if not refused:
        return None
    named = [
        f"{change.action} {change.kind} {change.host + '/' if change.kind == 'check' else ''}{change.name}"
        for change in refused
    ]
    shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    may = "changes only checks" if role == "operator" else "changes nothing"
    return (
        f"a token of role {role!r} ({caller.get('name')}) {may}: {len(refused)} of the plan's changes need an admin "
        f"token ({shown}); nothing applied"
    )


# ---- exporting -----------------------------------------------------------------------------------


def password_variable(host: str, check: str) -> str:
    """The environment variable an exported file names for a check's password: HEALTHGATE_PASS_<HOST>_<CHECK>,
    upper case, every other character than A-Z and 0-9 as `_`."""
    return re.sub(r"[^A-Z0-9]", "_", f"HEALTHGATE_PASS_{host}_{check}".upper())


def export_document(current: Current) -> dict[str, Any]:
    """The fleet file of what the API holds: every visible host by name with its checks by name (fields at their
    default left out, except the server-defaulted interval and timeout), and the non-default group policies.
    A `${...}` in a value is escaped as `$${...}`; a set password is `${HEALTHGATE_PASS_<HOST>_<CHECK>}`, with
    `_2`, `_3`, ... after the second and later checks whose names make the same variable."""
    hosts = []
    variables: set[str] = set()
    for name, host in sorted(current.hosts.items()):
        entry: dict[str, Any] = {"name": name, "group": host["group"], "id": host["id"]}
        if host.get("agent_url") is not None:
            entry["agent_url"] = host["agent_url"]
        checks = []
        for check_name, check in sorted(current.checks.get(name, {}).items()):
            model = CHECK_WRITE_MODELS[check["check_type"]]
            item: dict[str, Any] = {}
            for field_name in _check_fields(check["check_type"]):
                value = check.get(field_name)
                info = model.model_fields.get(field_name)
                default = info.default if info is not None else None
                if field_name in ("name", "check_type", *SERVER_DEFAULTED) or _normal(field_name, value) != _normal(
                    field_name, default
                ):
                    item[field_name] = value
            item = _escaped(item)
            if check.get("basic_auth_pass_set"):
                # Names that differ only in what the variable cannot hold (`a-b`, `a_b`) get _2, _3, ...
                variable = base = password_variable(name, check_name)
                number = 1
                while variable in variables:
                    number += 1
                    variable = f"{base}_{number}"
                variables.add(variable)
                item[PASSWORD] = "${" + variable + "}"
            checks.append(item)
        entry = _escaped(entry)
        if checks:
            entry["checks"] = checks
        hosts.append(entry)
    document: dict[str, Any] = {"hosts": hosts}
    defaults = GroupPolicy().model_dump()
    policies = {group: policy for group, policy in sorted(current.policies.items()) if policy != defaults}
    if policies:
        document["groups"] = {
            group: {key: value for key, value in policy.items() if value != defaults.get(key)}
            for group, policy in policies.items()
        }
    return document


def _escaped(value: Any) -> Any:
    """`value` with every `${VAR}` in its strings written `$${VAR}` (and `$${VAR}` as `$$${VAR}`, ...), so that
    apply's substitution gives back the text the API holds, not an environment variable's value."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: "$" + match[0], value)
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


def dump_yaml(document: Any, out: IO[str]) -> None:
    yaml = YAML(typ="rt")  # the round-trip dumper keeps each mapping's order: name, group, ... first
    yaml.default_flow_style = False
    yaml.dump(document, out)


async def run_export(api: FleetApi, out: IO[str], err: IO[str]) -> int:
    """`healthgate export`: the fleet file on `out`; 1 when the API cannot be read."""
    try:
        current = await read_current(api)
    except ApiClientError as exc:
        err.write(f"{exc}\n")
        return EXIT_FAILED
    dump_yaml(export_document(current), out)
    return EXIT_OK


def open_api(base_url: str, token: str | None) -> httpx.AsyncClient:
    """The HTTP client of apply and export: keep-alive connections for `IN_FLIGHT` requests at once."""
    headers = {"Accept": "application/json", "User-Agent": "healthgate-fleet"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(60.0, connect=10.0),
        limits=httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT),
    )


def main_apply(path: str, *, dry_run: bool, prune: bool, resend_secrets: bool, base_url: str, token: str | None) -> int:
    """The `apply` command: read FILE (`-` for stdin) and run `run_apply` against the API."""
    if path == "-":
        # The bytes, decoded here: sys.stdin's own decoding (surrogateescape under a C locale) passes bytes that
        # are not UTF-8 on as lone surrogates, which the YAML loader then fails on with a traceback.
        try:
            text, source = sys.stdin.buffer.read().decode("utf-8"), "<stdin>"
        except UnicodeDecodeError as exc:
            sys.stderr.write(f"<stdin>: not UTF-8 text (byte {exc.start + 1}: {exc.reason})\n")
            return EXIT_BAD_FILE
    else:
        try:
            text, source = Path(path).read_text(encoding="utf-8"), path
        except (OSError, UnicodeDecodeError) as exc:
            sys.stderr.write(f"{path}: cannot read the file: {exc}\n")
            return EXIT_BAD_FILE

    async def go(api: FleetApi) -> int:
        return await run_apply(
            api, text, source, sys.stdout, sys.stderr, dry_run=dry_run, prune=prune, resend_secrets=resend_secrets
        )

    return _with_api(base_url, token, go)


def main_export(*, base_url: str, token: str | None) -> int:
    return _with_api(base_url, token, lambda api: run_export(api, sys.stdout, sys.stderr))


def _with_api(base_url: str, token: str | None, command: Callable[[FleetApi], Awaitable[int]]) -> int:
    """Run `command` over a client of the API at `base_url` with `token`; exit 1 with one line when the URL or the
    token is not usable (`usable_base_url`, `usable_token`: the message never holds a password or the token)."""
    try:
        base_url, token = usable_base_url(base_url), usable_token(token)
    except ApiClientError as exc:
        sys.stderr.write(f"healthgate: {exc}\n")
        return EXIT_FAILED

    async def go() -> int:
        async with open_api(base_url, token) as http:
            return await command(FleetApi(http))

    return asyncio.run(go())


def register(app: typer.Typer) -> None:
    """Add `apply` and `export` to the `healthgate` app (services/cli.py), over the API at `HEALTHGATE_URL` with
    `HEALTHGATE_TOKEN`."""

    @app.command("apply")
    def apply_command(
        file: Annotated[str, typer.Option("-f", "--file", help="The fleet file (YAML; - for stdin).")],
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, change nothing.")] = False,
        prune: Annotated[
            bool,
            typer.Option(
                "--prune",
                help="Also delete the hosts of the file's groups, and the checks of its hosts, that it does not name.",
            ),
        ] = False,
        resend_secrets: Annotated[
            bool,
            typer.Option(
                "--resend-secrets",
                help="Send every basic_auth_pass of the file again (a changed password is not seen).",
            ),
        ] = False,
    ) -> None:
        """Make hosts, checks and group policies match a fleet file (docs/fleet.md); exit 2 for a bad file."""
        base_url, token = _connection()
        raise typer.Exit(
            main_apply(
                file, dry_run=dry_run, prune=prune, resend_secrets=resend_secrets, base_url=base_url, token=token
            )
        )

    @app.command("export")
    def export_command() -> None:
        """Print the current hosts, checks and group policies as a fleet file that apply accepts (no secrets)."""
        base_url, token = _connection()
        raise typer.Exit(main_export(base_url=base_url, token=token))


def _connection() -> tuple[str, str | None]:
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL, os.environ.get(TOKEN_VARIABLE) or None
