"""The run directory: every path of `runs/<name>/`, named once, and its small JSON files.

    runs/<name>/
      config.toml            the resolved configuration (`RunPaths.config`)
      metrics.jsonl          one row per global step (the learner writes it)
      buffer/                Arrow IPC segments and consumed.jsonl (`async_rl.buffer.segments`)
      weights/v000012/       weight versions of the `fs` store (`async_rl.weights`)
      checkpoints/sft/       the cold start; checkpoints/learner/step-*/: learner checkpoints
      endpoints/<service>.json   ZeroMQ addresses a service bound ({"ingest": "tcp://..."});
                             under Ray also in Ray's key-value store, where clients read them
      control/pids/<name>.pid    the pid of each process of the run (the driver writes them)
      control/fleet.json     a fleet size asked for with `async-rl scale`
      control/actors.json    the fleet size the driver runs (the learner logs it)
      control/placement.json which Ray node each process runs on ({"a0": {"role": "actor",
                             "node": "3223d3..."}}), kept by the driver
      wandb/, wandb_id       the wandb run, and its id kept across resumes
      sft_metrics.jsonl      the cold start's loss curve
      variant.json, train.log    a sweep's run: its variant, and its `async-rl train` output

JSON files are written atomically (write, fsync, rename): a reader sees the old file or the new
one, never a torn one. Readers check what they read and name the file when it is bad.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run directory. Example: `RunPaths(Path("runs/tiny")).buffer`."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def sft_metrics(self) -> Path:
        return self.root / "sft_metrics.jsonl"

    @property
    def buffer(self) -> Path:
        return self.root / "buffer"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def sft_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "sft"

    @property
    def learner_checkpoints(self) -> Path:
        return self.root / "checkpoints" / "learner"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"

    @property
    def variant(self) -> Path:
        """A sweep's run: which variant and seed it is (`async-rl sweep`)."""
        return self.root / "variant.json"

    @property
    def train_log(self) -> Path:
        """A sweep's run: the output of its `async-rl train`."""
        return self.root / "train.log"

    @property
    def fleet(self) -> Path:
        """Where `async-rl scale` asks the driver for a fleet size."""
        return self.root / "control" / "fleet.json"

    @property
    def actors(self) -> Path:
        """Where the driver says how many actors the fleet has."""
        return self.root / "control" / "actors.json"

    @property
    def placement(self) -> Path:
        """Where the driver says which Ray node each process of the run runs on."""
        return self.root / "control" / "placement.json"

    def endpoint(self, service: str) -> Path:
        return self.root / "endpoints" / f"{service}.json"

    def pid(self, name: str) -> Path:
        return self.root / "control" / "pids" / f"{name}.pid"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


ENDPOINTS_NAMESPACE = "async-rl-endpoints"


def _ray_kv():
    """Ray's key-value store (in the head's GCS) when this process is part of a Ray cluster,
    else None. Endpoints go there too, so that a process on a node without the run directory
    finds its services (`weights.store = ray | collective`)."""
    import sys

    ray = sys.modules.get("ray")  # a process that never imported Ray is not in a cluster
    if ray is None or not ray.is_initialized():
        return None
    from ray.experimental import internal_kv

    return internal_kv


def _endpoint_key(paths: RunPaths, service: str) -> str:
    return f"{paths.root}/{service}"  # the run directory as every process of the run names it


def _check_endpoints(data: Any, where: str) -> dict[str, str]:
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{where}: expected an object of addresses")
    return data


def publish_endpoints(paths: RunPaths, service: str, addresses: dict[str, str]) -> None:
    """Record the addresses a service bound, for clients started anywhere in the run: in
    `endpoints/<service>.json` and, under Ray, in Ray's key-value store."""
    write_json_atomic(paths.endpoint(service), addresses)
    if (kv := _ray_kv()) is not None:
        key = _endpoint_key(paths, service)
        kv._internal_kv_put(key, json.dumps(addresses), namespace=ENDPOINTS_NAMESPACE)


def read_endpoints(paths: RunPaths, service: str) -> dict[str, str] | None:
    """A service's addresses, None before it published them; `ValueError` if they are bad.
    Under Ray they come from Ray's key-value store (the run directory is not read)."""
    if (kv := _ray_kv()) is not None:
        key = _endpoint_key(paths, service)
        raw = kv._internal_kv_get(key, namespace=ENDPOINTS_NAMESPACE)
        if raw is None:
            return None
        try:
            return _check_endpoints(json.loads(raw), f"Ray key {key}")
        except json.JSONDecodeError as e:
            raise ValueError(f"Ray key {key}: not valid JSON ({e})") from None
    path = paths.endpoint(service)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return _check_endpoints(data, str(path))


def wait_for_endpoints(paths: RunPaths, service: str, timeout_s: float = 60.0) -> dict[str, str]:
    """A service's addresses, once it published them; `TimeoutError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (found := read_endpoints(paths, service)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service} did not publish its endpoints in {paths.root}")
        time.sleep(0.05)
    return found


def write_pid(paths: RunPaths, name: str, pid: int | None = None) -> None:
    """`control/pids/<name>.pid`: `pid` (default: this process's), for operators and
    fault-injection tests. Under `async-rl train` the driver writes them (from the processes'
    answers: they may run on nodes without the run directory)."""
    path = paths.pid(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid() if pid is None else pid))


def request_fleet(paths: RunPaths, actors: int) -> None:
    """What `async-rl scale` does: ask the running driver for `actors` actors."""
    write_json_atomic(paths.fleet, {"actors": actors, "requested_at": time.time()})


def read_fleet_request(paths: RunPaths) -> tuple[int, float] | None:
    """(actors, requested_at) of the last `async-rl scale`, or None (none, or unreadable)."""
    try:
        data = json.loads(paths.fleet.read_text())
        wanted, at = data["actors"], float(data["requested_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (wanted, at) if isinstance(wanted, int) and not isinstance(wanted, bool) else None


def write_fleet_size(paths: RunPaths, actors: int) -> None:
    """The driver says how many actors it runs."""
    write_json_atomic(paths.actors, {"actors": actors})


def read_fleet_size(paths: RunPaths) -> int | None:
    """The fleet size the driver last set, None if no driver runs this directory."""
    try:
        return int(json.loads(paths.actors.read_bytes())["actors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
