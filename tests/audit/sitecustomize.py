"""A file audit for the processes of one test Ray node, installed through `PYTHONPATH`.

Python runs `sitecustomize` at start-up in every interpreter of the node (its raylet's
workers: the run's actors). With `ASYNC_RL_AUDIT_LOG` set, each process writes
`<pid> start <its working directory>` there, then `<pid> <event> <path>` for every file
operation (Python's audit events: open, listdir, scandir, mkdir, rename, remove, ...) on a
path under one of the directories of `ASYNC_RL_AUDIT_DIRS` (separated by `os.pathsep`).
`tests.helpers.FileAudit` reads it back. Opens from C or Rust code (safetensors' reader)
raise no Python event.
"""

import os
import sys

EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.truncate",
    "os.chdir",
    "shutil.rmtree",
    "shutil.copyfile",
}


def _install(log: str, dirs: tuple[str, ...]) -> None:
    pid = os.getpid()

    def write(line: str) -> None:
        with open(log, "a") as f:  # outside the audited directories: no recursion
            f.write(f"{pid} {line}\n")

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or not args or isinstance(args[0], int):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except TypeError:
            return
        if any(path == d or path.startswith(d + os.sep) for d in dirs):
            write(f"{event} {path}")

    write(f"start {os.getcwd()}")
    sys.addaudithook(hook)


if os.environ.get("ASYNC_RL_AUDIT_LOG"):
    _dirs = os.environ.get("ASYNC_RL_AUDIT_DIRS", "").split(os.pathsep)
    _install(os.environ["ASYNC_RL_AUDIT_LOG"], tuple(os.path.realpath(d) for d in _dirs if d))
