"""The layout of DESIGN.md section 6, read from the source: layers point down, functions stay small.

- `async_rl/` minus `async_rl/app/` is the shared core: it imports neither `actors` nor
  `learner`, not even inside a function;
- `actors/` and `learner/` do not import each other, nor the entry points of `async_rl/app/`;
- no function in `async_rl/`, `actors/` or `learner/` is longer than 60 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("async_rl", "actors", "learner")
MAX_LINES = 60


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level package of every import in the file, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """`"<file> imports <module>"` for every import of a module in or under `forbidden`."""
    return [
        f"{p.name} imports {name}"
        for p in paths
        for name in sorted(imported(p))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_the_core_imports_neither_actors_nor_learner():
    core = [p for p in sources("async_rl") if "app" not in p.relative_to(ROOT).parts]
    assert len(core) > 10
    assert _offenders(core, ("actors", "learner", "async_rl.app")) == []


@pytest.mark.parametrize("package, other", [("actors", "learner"), ("learner", "actors")])
def test_actors_and_learner_do_not_import_each_other_or_the_app(package, other):
    assert _offenders(sources(package), (other, "async_rl.app")) == []


def test_no_function_is_longer_than_60_lines():
    long = []
    for package in PACKAGES:
        for path in sources(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []


def test_the_import_check_finds_an_import_inside_a_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import learners\ndef f():\n    from learner.train import X\n    import actors")
    assert _offenders([bad], ("actors", "learner")) == [
        "bad.py imports actors",
        "bad.py imports learner.train",
    ]
