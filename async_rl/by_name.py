"""The user's code by name: `"package.module:attribute"` or `"path/to/file.py:attribute"`.

    normalize_name("rewards/format.py:score")   -> "/abs/path/rewards/format.py:score"
    resolve("my_pkg.tasks:WordProblems")        -> the class

What `task.reward` and `task.type` name (`async_rl.rewards`, `async_rl.tasks`). A module is
imported as `import` would; a file is imported once per process under a name derived from its
absolute path (one module per file, whatever the working directory), under a lock, so that
threads resolving it together all get it whole. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from pathlib import Path

_IMPORTING = threading.Lock()


def normalize_name(name: str, base: Path | None = None) -> str:
    """`name` with a file path made absolute (against `base`, default the working directory),
    so that every process of a run finds the same file; other names unchanged."""
    target, sep, attribute = name.rpartition(":")
    if not sep or not target.endswith(".py"):
        return name
    return f"{((base or Path.cwd()) / target).resolve()}:{attribute}"


def resolve(name: str, what: str = "name", builtins: tuple[str, ...] = (), kind: str = ""):
    """What `name` names (`what`: "function", "Class" in messages); `ValueError` saying what
    is wrong, and which built-in `kind`s (`builtins`) the setting also takes."""
    target, sep, attribute = name.rpartition(":")
    if not sep or not target or not attribute.isidentifier():
        also = f"a built-in {kind} ({', '.join(builtins)}) nor " if builtins else ""
        raise ValueError(
            f"{name!r} is neither {also}'package.module:{what}' or 'path/to/file.py:{what}'"
        )
    with _IMPORTING:
        module = _import(target)
    if not hasattr(module, attribute):
        raise ValueError(f"{target} has no attribute {attribute!r}")
    return getattr(module, attribute)


def _import(target: str):
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except Exception as e:
            raise ValueError(f"cannot import {target!r}: {type(e).__name__}: {e}") from e
    path = Path(target)
    if not path.is_file():
        raise ValueError(f"{target}: no such file")
    module_name = f"async_rl_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # what pickling and dataclasses look classes up in
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(f"{target} failed to import: {type(e).__name__}: {e}") from e
    return module
