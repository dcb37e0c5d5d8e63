"""The plan of the house, kept by tests: the engines' migrations move in step, folders form a
strict stack (helpers < lib < api < the daemon < the CLI < scripts) with no module cycles,
and only the engine modules ask which engine is configured."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import schema
from helpers.config import load_config
from helpers.engine import open_database

ROOT = Path(__file__).resolve().parent.parent
# Lower may never import higher. A module at top level is placed by its name.
LEVELS = {"helpers": 0, "lib": 1, "api": 2, "oos_service_manager": 3, "oos_cli": 4, "scripts": 5}
# Where a dialect is chosen: the engines themselves, the config that names one, and the
# migrations that pick a folder.
ENGINE_MODULES = {"helpers.engine", "helpers.database_config", "helpers.postgres", "helpers.config",
                  "helpers.schema"}
# Tables only one engine keeps, and why: PostgreSQL counts a queue's tasks in sharded rows
# (writers of one queue never wait on one row), SQLite's single writer keeps them in `queues`;
# SQLite searches memories through an FTS5 table (and its shadow tables), PostgreSQL through
# a tsvector column of `memories`.
ONE_ENGINE_ONLY = {"postgresql": ("queue_counts",), "sqlite": ("memories_fts",)}
ONE_ENGINE_COLUMNS = {"memories": {"words"}, "queues": {"enqueued", "succeeded", "failed", "dead"}}


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in [*ROOT.glob("*.py"), *(p for d in LEVELS for p in ROOT.glob(f"{d}/*.py"))]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at the top of the file or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return found


def level(module: str) -> int:
    return LEVELS[module.split(".")[0]]


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_higher_folder():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if level(b) > level(a)]
    assert upward == []


def test_no_module_cycles_even_through_imports_inside_functions():
    assert cycles(graph()) == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from helpers import queue_manager\n")
    assert imports(module, project_modules()) == {"helpers.queue_manager"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_engine_modules_ask_which_engine_is_configured():
    asking = re.compile(r"\bengine\s*[!=]=|\bdatabase_url\b")
    found = [f"{name}:{n}" for name, path in project_modules().items() if name not in ENGINE_MODULES
             for n, line in enumerate(path.read_text().splitlines(), 1) if asking.search(line)]
    assert found == []


def test_both_engines_have_the_same_migration_numbers():
    numbers = {engine: [p.name[:3] for p in schema.steps(engine)] for engine in ("sqlite", "postgresql")}
    assert numbers["sqlite"] == numbers["postgresql"] and numbers["sqlite"]
    assert not list((ROOT / "helpers").glob("*.sql"))


def columns(db) -> dict[str, set[str]]:
    if db.capabilities.local_file:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
        return {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
    out: dict[str, set[str]] = {}
    for table, column in db.execute("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = current_schema()"):
        out.setdefault(table, set()).add(column)
    return out


def test_a_fresh_database_of_each_engine_has_the_same_tables_and_columns(tmp_path, pg_server):
    shapes = {}
    for engine, env in (("sqlite", {}), ("postgresql", {"OOS_DATABASE_URL": pg_server.schema_url()})):
        db = open_database(load_config(env={"OOS_DATA_DIR": str(tmp_path), **env}))
        try:
            shapes[engine] = {t: c for t, c in columns(db).items() if not t.startswith(ONE_ENGINE_ONLY[engine])}
        finally:
            db.close()
    assert set(shapes["sqlite"]) == set(shapes["postgresql"])
    differ = {t: shapes["sqlite"][t] ^ shapes["postgresql"][t] for t in shapes["sqlite"]
              if shapes["sqlite"][t] ^ shapes["postgresql"][t] != ONE_ENGINE_COLUMNS.get(t, set())}
    assert differ == {}


@pytest.mark.parametrize("engine_name", ["sqlite", "postgresql"])
def test_a_gap_in_the_numbers_is_refused(tmp_path, monkeypatch, engine_name):
    folder = tmp_path / engine_name
    folder.mkdir()
    (folder / "001_a.sql").write_text("")
    (folder / "003_c.sql").write_text("")
    monkeypatch.setattr(schema, "SQL", tmp_path)
    with pytest.raises(RuntimeError, match="without gaps"):
        schema.steps(engine_name)


def test_the_shipped_config_shows_every_default_it_names_and_sets_none():
    """data/oos.toml (installed as /etc/oos/oos.toml) holds its keys as commented examples, so
    a default changed in helpers/config.py reaches hosts; each example is a real key showing the
    code's default."""
    import tomllib

    from helpers.config import Config, load_config

    text = (ROOT / "data" / "oos.toml").read_text()
    assert load_config(path=ROOT / "data" / "oos.toml", env={}) == load_config(path="/nonexistent", env={})
    uncommented = "\n".join(re.sub(r"^# (\w+ = .*?)(\s+#.*)?$", r"\1", line) for line in text.splitlines())
    examples = tomllib.loads(uncommented)
    examples["database"].pop("url")  # examples of a value to give, not defaults
    examples["workers"].pop("queues")
    defaults, examples_seen = Config(), 0
    for section, values in examples.items():
        for key, value in (values.items() if isinstance(values, dict) else [(section, values)]):
            name = key if not isinstance(values, dict) else f"{section}_{key}"
            default = getattr(defaults, name)
            assert (list(default) if isinstance(default, tuple) else default) == value, name
            examples_seen += 1
    assert examples_seen >= 15


def test_a_tasks_fields_are_listed_once_and_the_rest_is_made_from_them():
    """The Task dataclass makes the API's TaskOut; enqueue()'s keywords make SPEC_FIELDS (and
    the CLI's options, tested in test_server_and_cli); TaskIn makes EnqueueIn and StepIn."""
    import dataclasses
    import inspect

    from api.schemas import EnqueueIn, StepIn, TaskIn, TaskOut
    from helpers.queue_manager import SPEC_FIELDS, QueueManager, Task
    from helpers.workflow import STEP_FIELDS
    stored = {"payload" if f.name == "task_data" else f.name for f in dataclasses.fields(Task)}
    assert stored == {name for name in TaskOut().fields if not name.endswith("_iso")}
    keywords = {p.name for p in inspect.signature(QueueManager.enqueue).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert SPEC_FIELDS == {"task", "payload"} | keywords - {"now", "connection"}
    assert set(TaskIn().fields) <= SPEC_FIELDS and set(TaskIn().fields) < set(EnqueueIn().fields)
    assert set(StepIn().fields) - {"queue", "after"} <= set(TaskIn().fields) and STEP_FIELDS <= SPEC_FIELDS | {"queue", "after"}
