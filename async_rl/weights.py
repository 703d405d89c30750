"""Weight versions from the learner to the actors: the `WeightStore` and its announcements.

Version v is the learner's weights after v global steps; version 0 is the starting checkpoint.
The learner publishes v+1 after every global step and does not wait for anyone; an actor swaps
to the newest complete version between generation steps; a late joiner fetches the newest.

Backends (`learner.weight_store`):
- `fs`: `runs/<name>/weights/v000003/` is a complete Hugging Face checkpoint (the starting
  checkpoint's config and tokenizer files plus `model.safetensors`), written under a temporary
  name and renamed; `manifest.json` is written last, atomically. A version without a valid
  manifest does not exist for readers.
- `ray`: tensors in the Ray object store, indexed by a named Ray actor (`RayWeightStore`), for
  multi-node runs where actors share no filesystem with the learner.
- `collective`: broadcast over a torch.distributed group of the learner and the actors, with
  `fs` or `ray` as the durable store behind it (`async_rl.weight_group`).
Both hand out Hugging Face tensor names (`model.layers.0.mlp.experts.3.gate_proj.weight`), the
layout vLLM and transformers read. Nothing is unpickled: files are safetensors and JSON.

An actor loads a version inside `with store.reading(version) as source:`: what its engine loads,
a checkpoint directory (`fs`) or tensors by Hugging Face name (`ray`); no caller needs to know
which store it has. A version is never collected under its reader: `fs` readers hold a shared
`flock` on the version's weights file, which `collect` needs exclusively (and skips the version
until the next collection otherwise); the kernel drops the lock of a reader that dies. (Linux
NFS clients map `flock` to byte-range locks, so this holds on a shared filesystem too.)

Announcements: the learner's PUB socket sends `WeightsReady(version=v)` (`async_rl.messages`);
actors SUB and also ask the store for `latest()`, so a missed announcement only delays a swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
import zmq
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from async_rl.messages import BadMessage, WeightsReady, decode, encode
from async_rl.paths import RunPaths, write_json_atomic
from async_rl.transport import bind

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
TEMPLATE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# What an engine loads a version from: a Hugging Face checkpoint directory, or (to swap the
# weights of the model it already serves) that checkpoint's tensors by Hugging Face name.
WeightsSource = str | Path | Mapping[str, torch.Tensor]


class WeightStore(Protocol):
    def publish(
        self, version: int, hf_state: dict[str, torch.Tensor], durable: bool = False
    ) -> None:
        """Store `version` completely before any reader can see it (`durable`: a version
        that must outlive the learner, e.g. a checkpoint's; `fs` and `ray` keep them all)."""
        ...

    def latest(self) -> int | None:
        """The newest complete version, None before the first."""
        ...

    def reading(self, version: int) -> contextlib.AbstractContextManager[WeightsSource]:
        """`with store.reading(v) as source:` what an engine loads `version` from, not collected
        before the block ends; `ValueError` if it is not (or no longer) here."""
        ...

    def collect(self, in_use: set[int]) -> list[int]:
        """Delete versions no actor uses, keeping the newest `learner.keep_versions`."""
        ...

    def endpoints(self) -> dict[str, str]:
        """Addresses the learner publishes for the store's readers ({} for most)."""
        ...

    def stats(self) -> dict[str, float]:
        """Metrics of the last publish (`learner/<name>`; {} for most)."""
        ...

    def close(self) -> None: ...


def _version_dir(root: Path, version: int) -> Path:
    return root / f"v{version:06d}"


def read_manifest(path: Path) -> dict:
    """A version directory's manifest, checked; `ValueError` naming the problem otherwise."""
    file = Path(path) / MANIFEST
    try:
        data = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{file}: missing (the version is incomplete)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    version, files = data.get("version"), data.get("files")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{file}: 'version' must be a non-negative integer")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise ValueError(f"{file}: 'files' must map file names to sizes and include {WEIGHTS}")
    for name, size in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ValueError(f"{file}: bad file name {name!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{file}: size of {name!r} must be a non-negative integer")
        try:  # a version being collected loses its files under a reader: gone, not an error
            actual = (Path(path) / name).stat()
        except OSError:
            actual = None
        if actual is None or not stat.S_ISREG(actual.st_mode) or actual.st_size != size:
            raise ValueError(f"{file}: {name} is missing or not {size} bytes")
    return data


def _remove_unread(path: Path, wait: bool) -> bool:
    """Delete the version directory `path` unless a reader holds it (module docstring): its
    manifest goes first, so readers stop seeing it before the files go. With `wait`, wait for
    the readers to finish instead; True when it is gone."""
    try:
        fh = open(path / WEIGHTS, "rb")
    except FileNotFoundError:
        shutil.rmtree(path, ignore_errors=True)
        return True
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """The config and tokenizer files are the same in every version: a hard link writes no
    data (and needs no fsync of its own); another filesystem gets a copy, fsynced."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())


class _Store:
    """What a store without addresses, metrics or threads of its own answers."""

    def endpoints(self) -> dict[str, str]:
        return {}

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class FsWeightStore(_Store):
    """Versioned Hugging Face checkpoints in a directory (`runs/<name>/weights/`)."""

    def __init__(self, root: Path, template: Path | None = None, keep: int = 3):
        self.root, self.template, self.keep = Path(root), template, keep
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        """The checkpoint directory of a complete version (checked against its manifest)."""
        path = _version_dir(self.root, version)
        if read_manifest(path)["version"] != version:
            raise ValueError(f"{path}: manifest names another version")
        return path

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], durable=False) -> None:
        final = _version_dir(self.root, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state.items()}
            save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
            with open(tmp / WEIGHTS, "rb") as fh:
                os.fsync(fh.fileno())
            for name in TEMPLATE_FILES:
                if self.template is not None and (self.template / name).exists():
                    _link_or_copy(self.template / name, tmp / name)
            if final.exists():
                # A resumed learner recomputes versions its crashed run had published.
                _remove_unread(final, wait=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        files = {f.name: f.stat().st_size for f in final.iterdir() if f.name != MANIFEST}
        write_json_atomic(
            final / MANIFEST, {"version": version, "files": files, "created_at": time.time()}
        )

    def versions(self) -> list[int]:
        """Complete versions, oldest first."""
        found = []
        for path in self.root.glob("v[0-9]*"):
            try:
                found.append(read_manifest(path)["version"])
            except ValueError:
                continue
        return sorted(found)

    def latest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator[Path]:
        """The version's checkpoint directory (engines load it as it is), held against
        collection until the block ends (module docstring)."""
        path = _version_dir(self.root, version)
        try:
            fh = open(path / WEIGHTS, "rb")
        except OSError:
            raise ValueError(f"{path}: version {version} is not (or no longer) here") from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            self.path(version)  # still complete: not collected before the lock was taken
            yield path

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        """The version's tensors by Hugging Face name."""
        file = self.path(version) / WEIGHTS
        try:
            return load_file(file)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{file}: cannot read ({e})") from None

    def collect(self, in_use: set[int]) -> list[int]:
        """Delete versions no actor uses or is reading, keeping the newest `keep`; return
        what was deleted."""
        versions = self.versions()
        old = [v for v in versions[: -self.keep] if v not in in_use and v != 0]
        return [v for v in old if _remove_unread(_version_dir(self.root, v), wait=False)]


class WeightAnnouncer:
    """The learner's PUB socket: tells subscribed actors that a version is ready."""

    def __init__(self, ctx: zmq.Context, host: str, curve=None, previous: str | None = None):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.serve(self.socket)
        # a restarted learner takes its old address back: subscribed actors hear it again
        self.address = bind(self.socket, host, previous)

    def announce(self, version: int) -> None:
        self.socket.send_multipart(encode(WeightsReady(version=version)))

    def close(self) -> None:
        self.socket.close(linger=0)


class WeightSubscriber:
    """An actor's SUB socket; `newest()` drains announcements without blocking."""

    def __init__(self, ctx: zmq.Context, address: str, curve=None):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.connect(self.socket)
        self.socket.setsockopt(zmq.SUBSCRIBE, WeightsReady.KIND.encode())
        self.socket.connect(address)

    def newest(self, timeout_ms: int = 0) -> int | None:
        """The newest version announced since the last call, or None; waits up to `timeout_ms`
        for a first valid announcement (a bad one does not end the wait)."""
        best, deadline = None, time.monotonic() + timeout_ms / 1000
        while True:
            wait = 0 if best is not None else max(int((deadline - time.monotonic()) * 1000), 0)
            if not self.socket.poll(wait):
                return best
            try:
                announcement, _ = decode(self.socket.recv_multipart(), WeightsReady)
            except BadMessage:
                continue  # a bad announcement is ignored; the store is the source of truth
            best = max(best or 0, announcement.version)

    def close(self) -> None:
        self.socket.close(linger=0)


class _Registry:
    """Ray actor body: version -> object ref of that version's tensors (numpy arrays)."""

    def __init__(self, keep: int):
        self.keep, self.refs = keep, {}

    def put(self, version: int, refs: list) -> None:
        self.refs[version] = refs[0]  # wrapped in a list so Ray passes the ref, not the value

    def latest(self) -> int | None:
        return max(self.refs) if self.refs else None

    def get(self, version: int) -> list:
        return [self.refs[version]] if version in self.refs else []

    def collect(self, in_use: list[int]) -> list[int]:
        versions = sorted(self.refs)
        doomed = [v for v in versions[: -self.keep] if v not in in_use and v != 0]
        for v in doomed:
            del self.refs[v]
        return doomed


class RayWeightStore(_Store):
    """Weights in the Ray object store, indexed by a named Ray actor (multi-node runs)."""

    def __init__(self, name: str, keep: int = 3, create: bool = False):
        import ray

        self.ray = ray
        if create:
            registry = ray.remote(num_cpus=0)(_Registry)
            self.registry = registry.options(name=name, get_if_exists=True).remote(keep)
        else:
            self.registry = ray.get_actor(name)

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], durable=False) -> None:
        arrays = {k: _to_numpy(v) for k, v in hf_state.items()}
        self.ray.get(self.registry.put.remote(version, [self.ray.put(arrays)]))

    def latest(self) -> int | None:
        return self.ray.get(self.registry.latest.remote())

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator[dict[str, torch.Tensor]]:
        """The version's tensors (the engine swaps them into the model it serves): fetched
        whole, so collection cannot touch them."""
        yield self.fetch(version)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        refs = self.ray.get(self.registry.get.remote(version))
        if not refs:
            raise ValueError(f"weights version {version} is not in the Ray object store")
        return {k: _from_numpy(*v) for k, v in self.ray.get(refs[0]).items()}

    def collect(self, in_use: set[int]) -> list[int]:
        return self.ray.get(self.registry.collect.remote(sorted(in_use)))


def _to_numpy(t: torch.Tensor) -> tuple:
    """(array, dtype name): numpy has no bfloat16, so those travel as their 16 raw bits."""
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(array, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(array.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def weight_store(
    cfg,
    run_dir: Path,
    start: Path | None = None,
    create: bool = False,
    member: str | None = None,
) -> WeightStore:
    """The run's store (`learner.weight_store`); the learner creates it, actors open it (an
    actor names itself, `member`, for the collective path's group)."""
    lrn = cfg.learner
    kind = lrn.durable_store if lrn.weight_store == "collective" else lrn.weight_store
    if kind == "ray":
        durable = RayWeightStore(f"{cfg.run.name}-weights", lrn.keep_versions, create=create)
    else:
        durable = FsWeightStore(RunPaths(run_dir).weights, template=start, keep=lrn.keep_versions)
    if lrn.weight_store != "collective":
        return durable
    from async_rl.weight_group import CollectiveWeightStore, WeightReceiver, WeightSender

    timeout_s, bucket = lrn.collective_timeout_s, lrn.publish_bucket_mib * 2**20
    sender = WeightSender(cfg.run.bind_host, timeout_s, bucket) if create else None
    receiver = WeightReceiver(run_dir, member, timeout_s) if member else None
    return CollectiveWeightStore(durable, lrn.durable_every, sender, receiver)
