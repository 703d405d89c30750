"""The `fs` weight store: `runs/<name>/weights/v000003/` is a complete Hugging Face checkpoint
(the starting checkpoint's config and tokenizer files plus `model.safetensors`), written under a
temporary name and renamed; `manifest.json` is written last, atomically. A version without a
valid manifest does not exist for readers.

A reader gets the version's tensors, read from its safetensors file as they are asked for,
inside `with store.reading(version) as tensors:`. A version is never collected under its reader:
readers hold a shared `flock` on the version's weights file, which `collect` needs exclusively
(and skips the version until the next collection otherwise); the kernel drops the lock of a
reader that dies. (Linux NFS clients map `flock` to byte-range locks, so this holds on a shared
filesystem too.) Nothing is unpickled: files are safetensors and JSON.
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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from async_rl.paths import write_json_atomic
from async_rl.weights.delta import Delta, load_delta, save_delta
from async_rl.weights.store import PlainStore, VersionGone

WEIGHTS = "model.safetensors"
DELTA = "delta.safetensors"  # the version as a delta on the one before (`weights.delta`)
MANIFEST = "manifest.json"
TEMPLATE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


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
    if not isinstance(files, dict) or not (WEIGHTS in files or DELTA in files):
        raise ValueError(
            f"{file}: 'files' must map file names to sizes and include {WEIGHTS} or {DELTA}"
        )
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


def _lock_file(path: Path) -> Path:
    """The file of a version that readers and collection lock: its weights, or its delta
    when that is all it holds."""
    return path / WEIGHTS if (path / WEIGHTS).exists() else path / DELTA


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())


def _remove_unread(path: Path, wait: bool) -> bool:
    """Delete the version directory `path` unless a reader holds it (module docstring): its
    manifest goes first, so readers stop seeing it before the files go. With `wait`, wait for
    the readers to finish instead; True when it is gone."""
    try:
        fh = open(_lock_file(path), "rb")
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


class SafetensorsFile(Mapping):
    """The tensors of an open safetensors file by name, each read when it is asked for (a
    reader going through them one at a time holds one in memory, not the version)."""

    def __init__(self, handle):
        self.handle = handle
        self.names = list(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class FsWeightStore(PlainStore):
    """Versioned Hugging Face checkpoints in a directory (`runs/<name>/weights/`)."""

    def __init__(self, root: Path, template: Path | None = None, keep: int = 3):
        self.root, self.template, self.keep = Path(root), template, keep
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        """The checkpoint directory of a complete version (checked against its manifest);
        `VersionGone` naming the reason otherwise."""
        path = _version_dir(self.root, version)
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            raise VersionGone(str(e)) from None
        if manifest["version"] != version:
            raise VersionGone(f"{path}: manifest names another version")
        return path

    def publish(
        self,
        version: int,
        hf_state: dict[str, torch.Tensor],
        durable=False,
        delta: Delta | None = None,
        fingerprint: int | None = None,
        whole: bool = True,
    ) -> None:
        """Write `version` (`hf_state`): whole (a checkpoint directory), as a delta on the
        version before (`delta`, and not `whole`), or both; the manifest, written last, names
        its files and the fingerprint of its weights (`fingerprint`, or the delta's)."""
        final = _version_dir(self.root, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            if delta is not None:
                save_delta(delta, tmp / DELTA)
                _fsync(tmp / DELTA)
            if whole or delta is None:
                tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state.items()}
                save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
                _fsync(tmp / WEIGHTS)
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
        manifest = {"version": version, "files": files, "created_at": time.time()}
        if delta is not None or fingerprint is not None:
            mark = delta.fingerprint if fingerprint is None else fingerprint
            manifest["fingerprint"] = f"{mark:016x}"
        write_json_atomic(final / MANIFEST, manifest)

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

    def fingerprint(self, version: int) -> int | None:
        """The fingerprint of the version's weights (`weights.delta`), if it was stored."""
        mark = read_manifest(self.path(version)).get("fingerprint")
        return None if mark is None else int(mark, 16)

    def sizes(self, version: int) -> tuple[int | None, int | None]:
        """Bytes of the version whole and as a delta (None where it is not stored so)."""
        files = read_manifest(self.path(version))["files"]
        return files.get(WEIGHTS), files.get(DELTA)

    @contextlib.contextmanager
    def _held(self, version: int, name: str):
        """The version's file `name`, held against collection (module docstring)."""
        path = _version_dir(self.root, version)
        try:
            fh = open(_lock_file(path), "rb")
        except OSError:
            fh = None
        if fh is None or not (path / name).is_file():
            if fh is not None:
                fh.close()
            raise VersionGone(f"{path}: version {version} is not (or no longer) here as {name}")
        with fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            self.path(version)  # still complete: not collected before the lock was taken
            yield path / name

    @contextlib.contextmanager
    def reading(self, version: int) -> Iterator[Mapping[str, torch.Tensor]]:
        """The version's tensors, read from its file as they are asked for; the version is
        held against collection until the block ends (module docstring)."""
        with self._held(version, WEIGHTS) as file:
            try:
                handle = safe_open(file, framework="pt")
            except (OSError, SafetensorError) as e:
                raise ValueError(f"{file}: cannot read ({e})") from None
            yield SafetensorsFile(handle)

    def read_delta(self, version: int) -> Delta:
        """The version as a delta on the one before; `VersionGone` when it is not stored so,
        `ValueError` when the file is damaged."""
        with self._held(version, DELTA) as file:
            return load_delta(file)

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        """The version's tensors by Hugging Face name, read whole."""
        with self.reading(version) as tensors:
            return dict(tensors)

    def collect(self, in_use: set[int]) -> list[int]:
        """Delete versions no actor uses or is reading, keeping the newest `keep`, version 0,
        and the newest whole version with every delta after it (whatever version an actor
        holds, it can reach the newest one from there); return what was deleted."""
        versions = self.versions()
        whole = [v for v in versions if (_version_dir(self.root, v) / WEIGHTS).exists()]
        newest_whole = max(whole, default=0)
        old = [v for v in versions[: -self.keep] if v not in in_use and v != 0 and v < newest_whole]
        return [v for v in old if _remove_unread(_version_dir(self.root, v), wait=False)]
