"""The layout of docs/design.md section 6, read from the source: layers point down, code stays
small.

- the top: the run (`async_rl/run/`), the tools (`async_rl/tools/`) and the CLI
  (`async_rl/cli.py`); nothing else imports them, and the run does not import the tools;
- the core is the rest of `async_rl/`: it imports none of `actors`, `learner` or the top, not
  even inside a function; the wire (`async_rl/wire/`) imports nothing of the buffer process
  (`async_rl/buffer/`);
- `actors/` and `learner/` do not import each other, nor the top;
- the built-in tasks (`async_rl/tasks/arithmetic.py`, `files.py`) sit on the task interface
  (`async_rl/tasks/__init__.py`, the rewards, the choice types) and nothing imports them: runs
  build them by name;
- every choice of the config is a `Literal` of `async_rl/choices.py`, written nowhere else; a
  compared value is one of its choices;
- no two modules import each other, directly or around a circle;
- no function is longer than 60 lines, no class longer than 250.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("async_rl", "actors", "learner")
TOP = ("async_rl.run", "async_rl.tools", "async_rl.cli")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included); `from m import x` adds both
    `m` and `m.x`, since `x` may be a submodule."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """`"<file> imports <module>"` for every import of a module in or under `forbidden`."""
    return sorted(
        {
            f"{p.name} imports {name}"
            for p in paths
            for name in imported(p)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        }
    )


def import_cycles(paths: list[Path], root: Path = ROOT) -> list[list[str]]:
    """The strongly connected components of more than one module in the import graph (Tarjan)."""
    graph = {module_name(p, root): imported(p) for p in paths}
    graph = {m: sorted(d for d in deps if d in graph and d != m) for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def top(path: Path) -> bool:
    name = module_name(path)
    return any(name == t or name.startswith(t + ".") for t in TOP)


def test_the_core_imports_neither_actors_nor_learner_nor_the_top():
    core = [p for p in sources("async_rl") if not top(p)]
    assert len(core) > 10
    assert _offenders(core, ("actors", "learner", *TOP)) == []


def test_the_wire_imports_nothing_of_the_buffer_process():
    wire = sources("async_rl/wire")
    assert len(wire) == 5
    assert _offenders(wire, ("async_rl.buffer",)) == []


@pytest.mark.parametrize("package, other", [("actors", "learner"), ("learner", "actors")])
def test_actors_and_learner_do_not_import_each_other_or_the_top(package, other):
    assert _offenders(sources(package), (other, *TOP)) == []


def test_the_run_does_not_import_the_tools():
    run = sources("async_rl/run")
    assert len(run) > 5
    assert _offenders(run, ("async_rl.tools", "async_rl.cli")) == []


def test_no_module_imports_itself_around_a_circle():
    assert import_cycles([p for package in PACKAGES for p in sources(package)]) == []


def _too_long(kinds: tuple[type, ...], limit: int) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {node.end_lineno - node.lineno + 1}"
        for package in PACKAGES
        for path in sources(package)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, kinds) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_is_longer_than_60_lines():
    assert _too_long((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES) == []


def test_no_class_is_longer_than_250_lines():
    assert _too_long((ast.ClassDef,), MAX_CLASS_LINES) == []


def test_the_import_check_finds_an_import_inside_a_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import learners\ndef f():\n    from learner.train import X\n    import actors")
    assert _offenders([bad], ("actors", "learner")) == [
        "bad.py imports actors",
        "bad.py imports learner.train",
        "bad.py imports learner.train.X",
    ]


def test_the_cycle_check_finds_a_circle_through_a_function_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("import a\nimport d\n")
    (tmp_path / "d.py").write_text("")
    assert import_cycles(sorted(tmp_path.glob("*.py")), tmp_path) == [["a", "b", "c"]]


def test_the_built_in_tasks_sit_on_the_task_interface_and_are_reached_by_name_only():
    """`async_rl/tasks/__init__.py` is the task interface; the built-in tasks are modules on it
    that import only the interface and the rewards of the core, and that nothing in the
    packages imports: a run builds them by name (`task.type`), as it builds a user's."""
    builtins = ("async_rl.tasks.arithmetic", "async_rl.tasks.files")
    everything = [p for package in PACKAGES for p in sources(package)]
    task_modules = [p for p in everything if module_name(p) in builtins]
    assert len(task_modules) == len(builtins)
    others = [p for p in everything if module_name(p) not in builtins]
    assert _offenders(others, builtins) == []
    ours = ("async_rl", "actors", "learner")
    for path in task_modules:
        used = {n for n in imported(path) if n.split(".")[0] in ours}
        allowed = {
            n
            for n in used
            if n.startswith(("async_rl.tasks", "async_rl.rewards", "async_rl.choices"))
        }
        assert used == allowed, f"{path.name} imports {sorted(used - allowed)}"


def test_the_distribution_installs_no_generic_top_level_module():
    """`pip install .` adds the three packages of the layout and nothing named like `app`."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(ROOT), include=find["packages"]["find"]["include"])
    assert {p.partition(".")[0] for p in packages} == set(PACKAGES)


# Config fields whose choice type a module branches on, by the name the code reads them by.
def _choice_fields() -> dict[str, tuple[str, tuple]]:
    from async_rl import choices
    from async_rl.config import SECTIONS, _section_fields

    types = {id(v): n for n, v in vars(choices).items() if choices.choices(v)}
    out = {}
    for section in SECTIONS:
        for name, f in _section_fields(section).items():
            typ = f.type.__args__[0] if getattr(f.type, "__origin__", None) is list else f.type
            if choices.choices(typ):
                out[name] = (types[id(typ)], choices.choices(typ))
    return out


def _branches(path: Path, fields: dict) -> list[tuple[str, str, int, bool]]:
    """(field, compared string, line, local) for every comparison of a choice field with a
    string; `local`: the field is read as a name or `self.<field>`, not through the config,
    whose fields carry the type."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        strings = [s.value for s in sides if isinstance(s, ast.Constant)]
        for s in sides:
            if isinstance(s, (ast.Tuple, ast.List, ast.Set)):
                strings += [e.value for e in s.elts if isinstance(e, ast.Constant)]
        for s in sides:
            name = getattr(s, "attr", getattr(s, "id", None))
            if name not in fields:
                continue
            local = isinstance(s, ast.Name) or getattr(s.value, "id", None) == "self"
            out += [(name, v, node.lineno, local) for v in strings if isinstance(v, str)]
    return out


OURS = [p for package in (*PACKAGES, "benchmarks") for p in sources(package)]


def test_every_config_choice_is_a_literal_type_written_once():
    """Each choice list is a `Literal` of `async_rl/choices.py` and no module writes one again
    (as a tuple, list or set of the same strings)."""
    fields = _choice_fields()
    assert {"routing_replay", "engine", "store", "deltas", "tis_mode"} <= set(fields)
    lists = {frozenset(values): typ for typ, values in fields.values()}
    repeats = [
        f"{path.relative_to(ROOT)}:{node.lineno} repeats {lists[values]}"
        for path in OURS
        if path.name != "choices.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Tuple, ast.List, ast.Set))
        and len(node.elts) > 1
        and all(isinstance(e, ast.Constant) for e in node.elts)
        and (values := frozenset(e.value for e in node.elts)) in lists
    ]
    assert repeats == []


def test_a_module_that_branches_on_a_choice_imports_its_type_and_names_real_values():
    """`routing_replay == "r3"`: "r3" is one of `RoutingReplay`'s values (a misspelt value would
    be a branch never taken), and a module that holds the choice in a name of its own (a
    parameter, `self.routing_replay`) imports the type to annotate it."""
    fields = _choice_fields()
    missing, wrong = [], []
    for path in [p for package in PACKAGES for p in sources(package)]:
        names = imported(path)
        for field, value, line, local in _branches(path, fields):
            typ, values = fields[field]
            where = f"{path.relative_to(ROOT)}:{line}"
            if value not in values:
                wrong.append(f"{where} {field} == {value!r}")
            if local and f"async_rl.choices.{typ}" not in names and path.name != "config.py":
                missing.append(f"{where} {field}: import {typ}")
    assert wrong == []
    assert missing == []


# What starts another process: a unit test (`tests/unit/`) uses none of it.
PROCESSES = ("ray", "subprocess", "multiprocessing", "torch.multiprocessing")
PROCESS_HELPERS = ("launch", "stop", "spawn", "end", "end_session", "RayCluster", "descendants")


def test_the_unit_tier_starts_no_process():
    """`pytest tests/unit` is the inner loop: tests in one process, no Ray, no subprocess (the
    tests that need them are in `tests/integration/`)."""
    unit = sorted((ROOT / "tests" / "unit").glob("test_*.py"))
    assert len(unit) > 20 and len(list((ROOT / "tests" / "integration").glob("test_*.py"))) > 10
    helpers = tuple(f"tests.helpers.{name}" for name in PROCESS_HELPERS)
    assert _offenders(unit, PROCESSES + helpers) == []
    pool = 'pool="' + 'process"'  # a reward pool of processes (spelt so as not to match here)
    assert [p.name for p in unit if pool in p.read_text()] == []
