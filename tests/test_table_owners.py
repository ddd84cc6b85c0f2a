"""One owner per table, and no import cycle: static checks of the source, no services.

Every table has one owning module in `shared/`, listed in docs/architecture.md ("Who writes which table");
no other module of the running system (every .py under services/ and shared/) spells SQL that writes it:
INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY … FROM, `copy_records_to_table`/`copy_to_table`, ALTER/DROP TABLE,
CREATE TABLE … PARTITION OF, on the table or on one of its partitions (`check_results_20260101`). A write
whose target is computed (an f-string placeholder such as `DELETE FROM {partition}`) cannot be attributed
by reading it, so it is allowed only in the owner of a partitioned table, whose partitions are named at run
time. Docstrings are prose and are not read; every other string literal is, f-strings and `+` joins too, and
str.format / `%` with literal arguments filled in (a name filled in otherwise, `{t}`, `%s`, `$t`, is computed);
SQL comments are skipped.

bench/ and tests/ are not scanned: they seed and inspect data directly, as an outside client of the
database would, and are not part of the running system.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("services", "shared")
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Created by the migration runner itself, not by a migration file.
CODE_TABLES = frozenset({"schema_migrations"})
PLACEHOLDER = "{}"

_TARGET = r"(?P<target>[\w.\"{}]*)"
# Between a keyword and a quoted name no space is needed: `UPDATE"gate_jobs"` is SQL too.
_SP = r'(?:\s+|(?="))'
WRITE_STATEMENTS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"\bINSERT\s+INTO{_SP}{_TARGET}",
        rf"\bUPDATE{_SP}(?:ONLY\s+)?{_TARGET}",
        rf"\bDELETE\s+FROM{_SP}(?:ONLY\s+)?{_TARGET}",
        rf"\bMERGE\s+INTO{_SP}(?:ONLY\s+)?{_TARGET}",
        rf"\bCOPY\s+{_TARGET}\s*(?:\([^)]*\))?\s+FROM\b",
        rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_TARGET}",
        rf"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?{_TARGET}",
        rf"\bCREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[\w.\"{{}}]*\s+PARTITION\s+OF\s+{_TARGET}",
    )
)
# SQL comments, which may stand between a keyword and its table (`DELETE FROM /* old */ gate_jobs`).
SQL_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
# A name filled in later: str.format's `{}`, `{0}`, `{table}`, %-formatting's `%s`, `%(table)s`, string.Template's
# `$table`/`${table}` (never `$1`: a query parameter): each is read as a computed part, "{}".
FILLED_IN = re.compile(r"\{[^{}]*\}|%(?:\(\w+\))?s|\$\{?[A-Za-z_]\w*\}?")
# Not writes of their own: a row lock, and ON CONFLICT's update of the row the INSERT names.
NOT_A_WRITE = re.compile(r"\b(?:FOR\s+(?:NO\s+KEY\s+)?UPDATE|DO\s+UPDATE)\b", re.IGNORECASE)
TRUNCATE = re.compile(r"\bTRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?(?P<targets>[\w.\"{}]+(?:\s*,\s*[\w.\"{}]+)*)", re.I)
COPY_METHODS = frozenset({"copy_records_to_table", "copy_to_table"})


@dataclass(frozen=True)
class Write:
    module: str  # path relative to the repository, with "/"
    line: int
    target: str  # as spelled, quotes and schema removed; "{}" for a computed part
    statement: str


def migration_tables() -> tuple[set[str], set[str]]:
    """(every table the migrations create, the partitioned ones), read from shared/migrations/*.sql."""
    tables: set[str] = set()
    partitioned: set[str] = set()
    for path in sorted((ROOT / "shared" / "migrations").glob("*.sql")):
        sql = re.sub(r"--[^\n]*", "", path.read_text())
        tables.update(re.findall(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", sql, re.IGNORECASE))
        for match in re.finditer(r"CREATE\s+TABLE\s+(\w+)\s*\((?:[^;]*?)\)\s*PARTITION\s+BY", sql, re.I | re.S):
            partitioned.add(match.group(1))
    return tables, partitioned


def documented_owners() -> dict[str, str]:
    """table → owning module, from the table in docs/architecture.md: rows "| `table` | `shared/x.py` | …"."""
    owners: dict[str, str] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        match = re.match(r"^\|\s*`(\w+)`\s*\|\s*`(shared/[\w/]+\.py)`\s*\|", line)
        if match:
            assert match.group(1) not in owners, f"{match.group(1)} is listed twice in docs/architecture.md"
            owners[match.group(1)] = match.group(2)
    return owners


def _text(node: ast.expr) -> str | None:
    """A string expression as text, each computed part as "{}"; None if it is not a string expression."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else PLACEHOLDER
            for part in node.values
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        # "UPDATE {} SET …".format("gate_jobs"): filled in when every argument is a literal, else computed.
        template = _text(node.func.value)
        if template is None:
            return None
        try:
            args = [ast.literal_eval(arg) for arg in node.args]
            kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords if keyword.arg}
            return str(template.format(*args, **kwargs))
        except (ValueError, TypeError, KeyError, IndexError, SyntaxError):
            return template
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        # "UPDATE %s SET …" % "gate_jobs", likewise.
        template = _text(node.left)
        if template is None:
            return None
        try:
            return str(template % ast.literal_eval(node.right))
        except (ValueError, TypeError, KeyError, SyntaxError):
            return template
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else PLACEHOLDER) + (right if right is not None else PLACEHOLDER)
    return None


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes (module, class, function): prose, not SQL."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant | ast.JoinedStr):
                found.add(id(body[0].value))
    return found


def _clean(target: str) -> str:
    target = target.replace('"', "")
    return target.rsplit(".", 1)[-1] if "." in target and not target.endswith(".") else target


def writes_in(source: str, module: str) -> Iterator[Write]:
    """Every write statement in one module's source, with the table it names."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    seen: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COPY_METHODS:
            argument = (
                node.args[0]
                if node.args
                else next((keyword.value for keyword in node.keywords if keyword.arg == "table_name"), None)
            )
            text = _text(argument) if argument is not None else None
            yield Write(module, node.lineno, _clean(text) if text else PLACEHOLDER, node.func.attr)
        if not isinstance(node, ast.expr) or id(node) in docstrings or id(node) in seen:
            continue
        text = _text(node)
        if text is None:
            continue
        text = NOT_A_WRITE.sub(" ", FILLED_IN.sub(PLACEHOLDER, SQL_COMMENT.sub(" ", text)))
        # Parts of an f-string or a `+` join are read once, as the whole.
        seen.update(id(child) for child in ast.walk(node))
        for pattern in WRITE_STATEMENTS:
            for match in pattern.finditer(text):
                yield Write(module, node.lineno, _clean(match.group("target")), match.group(0))
        for match in TRUNCATE.finditer(text):
            for target in match.group("targets").split(","):
                yield Write(module, node.lineno, _clean(target.strip()), match.group(0))


def table_of(target: str, tables: set[str], partitioned: set[str]) -> str | None:
    """The table a write's target is, or None when the target is no table of ours (prose: "update the row").
    A partition (`check_results_20260101`, `check_results_{}`) is its table's; a computed name is "{}"."""
    if target in tables:
        return target
    for table in partitioned:
        if target.startswith(table + "_"):
            return table
    if PLACEHOLDER in target:
        return PLACEHOLDER
    return None


def violations(module: str, source: str, owners: dict[str, str], tables: set[str], partitioned: set[str]) -> list[str]:
    """What `module` writes that is not its own: one line per statement."""
    dynamic_writers = {owners[table] for table in partitioned if table in owners}
    found = []
    for write in writes_in(source, module):
        table = table_of(write.target, tables, partitioned)
        if table is None:
            continue
        if table == PLACEHOLDER:
            if module not in dynamic_writers:
                found.append(
                    f"{module}:{write.line}: {write.statement!r} writes a computed table name; only the "
                    f"owner of a partitioned table ({', '.join(sorted(dynamic_writers))}) may"
                )
        elif owners.get(table) != module:
            found.append(f"{module}:{write.line}: {write.statement!r} writes {table}, owned by {owners.get(table)}")
    return found


def scanned_modules() -> Iterator[tuple[str, str]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


# ---- the tests ---------------------------------------------------------------------------------------


def test_every_table_has_one_documented_owner() -> None:
    tables, partitioned = migration_tables()
    assert {"gate_jobs", "check_results", "hosts"} <= tables and partitioned == {"check_results"}
    owners = documented_owners()
    all_tables = tables | CODE_TABLES
    assert set(owners) == all_tables, (
        f"docs/architecture.md lists owners of {sorted(owners)}; the schema has {sorted(all_tables)}"
    )
    for table, module in owners.items():
        assert (ROOT / module).is_file(), f"the owner of {table}, {module}, does not exist"


def test_only_the_owner_writes_a_table() -> None:
    tables, partitioned = migration_tables()
    tables |= CODE_TABLES
    owners = documented_owners()
    found = [
        line for module, source in scanned_modules() for line in violations(module, source, owners, tables, partitioned)
    ]
    assert not found, "tables written outside their owner:\n" + "\n".join(found)


def test_every_owner_writes_its_table() -> None:
    """The scan sees the owners' own writes: a scanner that saw nothing would pass the test above."""
    tables, partitioned = migration_tables()
    tables |= CODE_TABLES
    owners = documented_owners()
    written: dict[str, set[str]] = {}
    for module, source in scanned_modules():
        for write in writes_in(source, module):
            table = table_of(write.target, tables, partitioned)
            if table is not None:
                written.setdefault(table, set()).add(module)
    for table, module in owners.items():
        assert written.get(table) == {module}, f"{table} is written by {sorted(written.get(table, ()))}"


def test_the_scan_catches_a_write_outside_the_owner() -> None:
    """The scanner itself: each kind of write, spelled in a module that does not own the table, is found."""
    tables, partitioned = migration_tables()
    tables |= CODE_TABLES
    owners = documented_owners()
    planted = {
        'await c.execute("UPDATE gate_jobs SET status = $1")': "gate_jobs",
        'await c.execute("update  gate_jobs j set status = $1")': "gate_jobs",
        'await c.fetchval("INSERT INTO hosts (id) VALUES ($1) RETURNING id")': "hosts",
        'await c.execute(f"DELETE FROM audit_log WHERE id = {x}")': "audit_log",
        'await c.execute("DELETE FROM " + "outbox WHERE sent_at < $1")': "outbox",
        'await c.execute("TRUNCATE api_tokens, dashboard_sessions CASCADE")': "api_tokens",
        'await c.copy_records_to_table("check_state", records=rows)': "check_state",
        'await c.copy_records_to_table(table_name="check_results", records=rows)': "check_results",
        'await c.execute("COPY health_checks (id) FROM STDIN")': "health_checks",
        'await c.execute("ALTER TABLE check_results DETACH PARTITION check_results_20260101")': "check_results",
        'await c.execute("DROP TABLE IF EXISTS check_results_20260101")': "check_results",
        'await c.execute(f"DROP TABLE {name}")': "computed",
        'await c.execute(f"DELETE FROM {name} WHERE ctid = ANY($1)")': "computed",
        'await c.execute(f"CREATE TABLE {n} PARTITION OF check_results FOR VALUES FROM (1) TO (2)")': "check_results",
        'await c.execute("""\n    INSERT INTO check_schedule (check_id) VALUES ($1)\n""")': "check_schedule",
        'SQL = "UPDATE check_schedule SET next_run_at = now()"': "check_schedule",
        # Spellings a future change may use: a CTE, INSERT … SELECT, MERGE, comments, no space before a quote.
        'await c.execute("WITH x AS (UPDATE gate_jobs SET status = $1 RETURNING 1) SELECT * FROM x")': "gate_jobs",
        'await c.execute("insert into gate_jobs (job_id) select job_id from jobs")': "gate_jobs",
        'await c.execute("MERGE INTO gate_jobs j USING jobs s ON s.job_id = j.job_id WHEN MATCHED THEN DELETE")': (
            "gate_jobs"
        ),
        'await c.execute("merge into\\n  public.hosts h using x on true when matched then do nothing")': "hosts",
        'await c.execute("DELETE FROM /* old rows */ gate_jobs WHERE true")': "gate_jobs",
        'await c.execute("UPDATE -- the jobs\\n  jobs SET halted_at = now()")': "jobs",
        "await c.execute('UPDATE\"gate_jobs\" SET status = $1')": "gate_jobs",
        'await c.execute(\'DELETE FROM"public"."outbox"\')': "outbox",
        # A table name filled in by str.format, %-formatting or string.Template: attributed when it is a literal
        # (so the owner of a partitioned table is caught writing another table that way), else computed.
        'await c.execute("UPDATE {} SET status = $1".format("gate_jobs"))': "gate_jobs",
        'await c.execute("UPDATE {t} SET status = $1".format(t="gate_jobs"))': "gate_jobs",
        'await c.execute("UPDATE %s SET status = $1" % "gate_jobs")': "gate_jobs",
        'await c.execute("UPDATE {t} SET status = $1".format(t=name))': "computed",
        'await c.execute("UPDATE {0} SET status = $1".format(name))': "computed",
        'await c.execute("UPDATE %(t)s SET status = $1" % {"t": name})': "computed",
        'await c.execute(string.Template("DELETE FROM $t").substitute(t=name))': "computed",
    }
    for statement, table in planted.items():
        source = f"async def f(c, x, name, n, rows):\n    {statement}\n"
        found = violations("services/api/jobs.py", source, owners, tables, partitioned)
        assert found, f"not caught in services/api/jobs.py: {statement}"
        assert table == "computed" or table in found[0], found
    # Not writes: prose in a docstring, ON CONFLICT's DO UPDATE, reads, and a write in the owner itself.
    harmless = (
        'def f():\n    """Every decision is an UPDATE gate_jobs … WHERE waiting."""\n',
        'SQL = "INSERT INTO gate_jobs (job_id) VALUES ($1) ON CONFLICT (job_id) DO UPDATE SET job_id = $1"\n',
        'SQL = "SELECT * FROM gate_jobs WHERE status = $1 FOR UPDATE"\n',
    )
    assert not violations("services/api/jobs.py", harmless[0], owners, tables, partitioned)
    assert not violations("shared/jobs.py", harmless[1], owners, tables, partitioned)
    assert violations("services/api/jobs.py", harmless[1], owners, tables, partitioned)
    assert not violations("services/api/jobs.py", harmless[2], owners, tables, partitioned)
    # The owner of the partitioned table may write computed names, but not another table by a literal filled in.
    dynamic = documented_owners()["check_results"]
    for statement in ('"UPDATE {} SET x = 1".format("gate_jobs")', '"DELETE FROM %s" % "hosts"'):
        assert violations(dynamic, f"SQL = {statement}\n", owners, tables, partitioned), statement
    assert not violations(dynamic, 'SQL = "DROP TABLE {}".format(name)\n', owners, tables, partitioned)


# ---- imports ------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the modules of services/ and shared/ it imports, at any level (TYPE_CHECKING and
    function-local imports included: a cycle hidden that way is still a cycle)."""
    modules = {_module_name(path): path for top in SCANNED for path in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "services.api.auth" in graph
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles)
