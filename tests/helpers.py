"""Builders and process helpers the test modules share (their fixtures are in `conftest.py`).

- groups and buffers: `make_group()`, `new_buffer()`, `BufferClient` (both sides of the buffer);
  `random_batch()`, a learner's packed global batch;
- run configurations: `run_config()` (a buffer service's), `pipeline_config()` (a small run of
  threads in one process), `train_overrides()` (a real `async-rl train`);
  `services_in_threads()`, a run's buffer service, learner and actor in this process, and
  `train_in_threads()` running them to the run's end;
- processes: `launch()` starts `async-rl <command>` in its own session with output to a log,
  `stop()` ends it (SIGINT, then SIGKILL of its process group) so that nothing it started
  outlives a test; `spawn()` and `end()` do the same for a service run on its own
  (`python -m learner.run`); `pid_of()`, `versions()`, `fleet_sizes()`, `wait_for()` read what
  the run directory says. Tests read run directories by their documented layout, as an
  outsider would, not through `async_rl.paths`.
- engines: `generate_with_logits()`, an embedded engine's completions with the logits they
  were sampled from; `kept_kv_logprobs()`, the in-flight kept-KV reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import zmq

from async_rl.buffer.replay import ReplayBuffer
from async_rl.config import Config, load_config, to_toml
from async_rl.types import RoutingSpec, Trajectory, group_to_batch
from async_rl.wire.clients import ZmqBatchSource, ZmqRolloutSink

if TYPE_CHECKING:
    import torch

    from actors.embedded import EmbeddedEngine
    from actors.engine import Generation, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}
SPEC = RoutingSpec(num_layers=2, top_k=2, num_experts=8)  # the tiny model's
G = 4


# ---------------------------------------------------------------------- groups and buffers
def make_group(gid: str, version: int, g: int = G, seed: int = 0, routing: bool = True):
    """A well-formed group of `g` random completions of one prompt, from weights `version`."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(4, 30, size=int(rng.integers(2, 6))).tolist()
    rows = []
    for i in range(g):
        completion = rng.integers(4, 30, size=int(rng.integers(1, 5))).tolist()
        trace = rng.integers(0, 8, size=(len(prompt) + len(completion) - 1, 2, 2))
        rows.append(
            Trajectory(
                sample_id=f"{gid}-{i}",
                group_id=gid,
                prompt_id=f"p-{gid}",
                actor_id="a0",
                engine="embedded",
                policy_version=version,
                policy_version_max=version,
                prompt_tokens=prompt,
                completion_tokens=completion,
                behavior_logprobs=(-rng.random(len(completion))).tolist(),
                token_versions=[version] * len(completion),
                routing=trace.astype(np.uint8) if routing else None,
                reward=float(rng.integers(0, 2)),
                finish_reason="stop",
                temperature=1.0,
                top_p=1.0,
                quantization="fp8",
            )
        )
    return group_to_batch(rows, SPEC)


def random_batch(seed: int, num_groups: int, g: int, cfg):
    """A learner's global batch of `num_groups` groups of `g` random prompts and completions
    of different lengths, right-padded, for the model `cfg` (a `ModelConfig`).

    mu is a noisy uniform policy (the untrained model is close to uniform, so IS weights and
    clipping are active); the routing trace is random expert ids, as an actor would send;
    rewards alternate 0 / 1, so every group has nonzero advantages.
    """
    import torch

    from learner.batch import PackedBatch

    gen = torch.Generator().manual_seed(seed)
    b = g * num_groups
    prompts = torch.randint(3, 7, (b,), generator=gen).tolist()
    completions = torch.randint(2, 9, (b,), generator=gen).tolist()
    t = max(p + c - 1 for p, c in zip(prompts, completions, strict=True))
    inputs, targets = torch.zeros(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.randint(2, cfg.vocab_size, (p + c,), generator=gen)
        inputs[i, : p + c - 1], targets[i, : p + c - 1] = seq[:-1], seq[1:]
        mask[i, p - 1 : p + c - 1] = True
    mu = -torch.log(torch.tensor(float(cfg.vocab_size))) + 0.3 * torch.randn(b, t, generator=gen)
    rewards = torch.tensor([float(i % 2) for i in range(b)])
    scores = torch.rand(b, t, cfg.num_layers, cfg.num_experts, generator=gen)
    routing = scores.topk(cfg.top_k, dim=-1).indices.to(torch.uint8)
    return PackedBatch(
        inputs_BT=inputs,
        targets_BT=targets,
        mask_BT=mask,
        behavior_logprobs_BT=torch.where(mask, mu, 0.0),
        rewards_B=rewards,
        policy_versions_B=torch.zeros(b, dtype=torch.long),
        routing_BTLK=routing,
    )


class ManualClock:
    """The seconds a test sets (`clock.now = 2.5`), never the machine's: a buffer built with
    it behaves the same on a machine booted a minute ago as on one up for a year."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_buffer(root, **kw) -> ReplayBuffer:
    """A small buffer on a `ManualClock` at 0 s (`buf.clock.now` moves it)."""
    args = dict(group_size=G, global_batch_groups=2, max_staleness=1, segment_groups=3)
    args.update(kw)
    return ReplayBuffer(root, SPEC, vocab_size=32, clock=ManualClock(), **args)


class BufferClient(ZmqRolloutSink, ZmqBatchSource):
    """Both sides of a buffer service in one client: what an actor and the learner call."""


class PublishedVersions:
    """A learner's batch source without a buffer: it has no batches, and records the versions
    published to it and whether it was closed."""

    def __init__(self):
        self.published: list[int] = []
        self.closed = False

    def sample(self, version: int, wait_s: float = 1.0):
        raise AssertionError("PublishedVersions has no batches")

    def publish(self, version: int) -> None:
        self.published.append(version)

    def close(self) -> None:
        self.closed = True


def new_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    """The threads running now that did not in `before` (`set(threading.enumerate())`)."""
    return set(threading.enumerate()) - before


@contextlib.contextmanager
def services_in_threads(cfg: Config, start: Path, actor_start: Path | None = None):
    """`with services_in_threads(cfg, start) as (learner, actor):` the buffer service in a
    thread, a learner and an actor of one run in this process (the actor built from
    `actor_start`, default `start`), started; all closed after. The actor's loop is the caller's to
    run (`actor.run` in a thread), the learner's too (`learner.run`)."""
    from actors.loop import Actor
    from async_rl.buffer.service import BufferService
    from learner.run import Learner

    ctx = zmq.Context()
    buffer = BufferService(cfg, cfg.run_dir, ctx=ctx)
    buffer_thread = threading.Thread(target=buffer.run, daemon=True)
    buffer_thread.start()
    learner = Learner(cfg, cfg.run_dir, start, ctx=ctx)
    actor = Actor(cfg, cfg.run_dir, "a0", ctx=ctx, start=actor_start or start)
    try:
        learner.start()
        actor.start()
        yield learner, actor
    finally:
        actor.close()  # closing one never started does nothing
        learner.close()
        buffer.stop()
        buffer_thread.join(30)


def train_in_threads(cfg: Config, start: Path, actor_start: Path | None = None):
    """`rows, learner, actor = train_in_threads(cfg, start)`: the run's services in threads of
    this process until the learner reaches `run.num_steps`; its metric rows, and the (closed)
    learner and actor."""
    with services_in_threads(cfg, start, actor_start) as (learner, actor):
        thread = threading.Thread(target=actor.run, daemon=True)
        thread.start()
        rows: list[dict] = []
        learner.run(rows.append)
        actor.stop()
        thread.join(60)
    assert learner.version == cfg.run.num_steps
    return rows, learner, actor


# ---------------------------------------------------------------------- configurations
def _written(cfg: Config) -> Config:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
    return cfg


def run_config(tmp_path: Path, *overrides: str) -> Config:
    """A run directory for a buffer service alone: groups of G, 2 per global batch."""
    base = [f"run.output_dir={tmp_path}", "run.name=r", f"algo.group_size={G}"]
    base += ["algo.prompts_per_minibatch=2", "buffer.max_staleness=9"]
    base += ["buffer.segment_groups=4", "buffer.max_message_mib=0.05"]
    return _written(load_config(None, [*base, *overrides]))


def pipeline_config(tmp_path: Path, name: str, *overrides: str) -> Config:
    """A small run for services in threads of one process: one-digit sums, fp32 actor."""
    return _written(
        load_config(
            None,
            [
                f"run.output_dir={tmp_path}",
                f"run.name={name}",
                "run.eval_every=0",
                'task.ops=["+"]',
                "task.max_digits=1",
                "task.heldout_size=20",
                "actor.max_new_tokens=4",
                "actor.quantization=fp32",
                "algo.group_size=4",
                "algo.prompts_per_minibatch=2",
                "learner.lr=1e-3",
                "sft.steps=80",
                "sft.batch_size=32",
                *overrides,
            ],
        )
    )


def train_overrides(tmp_path: Path, start: Path, name: str, steps: int) -> list[str]:
    """Overrides of a short real `async-rl train` from the checkpoint `start`."""
    return [
        f"run.output_dir={tmp_path}",
        f"run.name={name}",
        f"run.init_checkpoint={start}",
        f"run.num_steps={steps}",
        "run.eval_every=0",
        "task.heldout_size=16",
        "algo.group_size=4",
        "algo.prompts_per_minibatch=2",
        "actor.max_new_tokens=4",
        "learner.checkpoint_every=2",
    ]


# ---------------------------------------------------------------------- processes
def launch(log: Path, *args: str, command: str = "train", env=None) -> subprocess.Popen:
    """`async-rl <command> ARGS` in a session of its own, stdout and stderr to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "async_rl.cli", command, *args],
            cwd=ROOT,
            env=env or ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, timeout: float = 300, group: bool = False) -> int:
    """Ctrl-C the driver (with `group`, its whole process group, as a terminal's Ctrl-C or
    `timeout` does) and wait; if it does not end, kill its process group."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode


def descendants(proc: subprocess.Popen) -> list:
    """Every process `proc` started (Ray's and the run's), to check after it ended."""
    import psutil

    return psutil.Process(proc.pid).children(recursive=True)


def left_running(processes: list, timeout: float = 10) -> list[str]:
    """Those of `processes` still running `timeout` seconds from now (pid and command)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.is_running()]


def spawn(log: Path, module: str, *args) -> subprocess.Popen:
    """`python -m module ARGS` (a service on its own), in its own session, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)],
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def end(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM each process, wait, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def end_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group of `proc` (started in a session of its own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            continue
    # the group may outlive its leader: make sure nothing of it is left
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RayCluster:
    """A Ray cluster of several nodes on this machine, as a user starts one: `ray start` per
    node (the head, then workers joining it), each with its CPUs and custom resources, on
    loopback, with token authentication; every node's processes in a session of their own, so
    a test ends them (or kills one node) by process group. `env` is what a client needs.

        with RayCluster(tmp_path) as cluster:
            cluster.add("learner", num_cpus=2, resources={"learner_node": 1})
            launch(log, ..., "--ray-address", cluster.address, env=cluster.env)
    """

    def __init__(
        self,
        tmp_path: Path,
        head_cpus: int = 0,
        head_resources: dict | None = None,
        multinode: bool = False,
    ):
        """`multinode`: Ray's cluster mode (worker nodes may join; its servers then listen
        beyond loopback, behind the token); else its single-machine mode, on loopback only."""
        self.tmp_path, self.nodes = tmp_path, {}
        self.short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths are short
        token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {
            **ENV,
            "RAY_TMPDIR": self.short,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multinode else "0",
            # a dead node is declared dead in about 3 s, not Ray's 15 s (a test run is short)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            **token,
        }
        with socket.socket() as probe:  # a free port for the head's GCS
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        head = ["--head", f"--port={port}", "--include-dashboard=false"]
        self.add("head", head_cpus, head_resources or {}, head)

    def add(
        self,
        name: str,
        num_cpus: int,
        resources: dict,
        args: list[str] | None = None,
        env: dict | None = None,
        cwd: Path | None = None,
    ):
        """Start node `name` (`args`: the head's; default: join the head) and wait for it;
        `env`: more environment for its processes, `cwd`: their working directory."""
        ray_bin = Path(sys.executable).parent / "ray"
        log = self.tmp_path / f"ray-{name}.log"
        command = [
            str(ray_bin),
            "start",
            *(args or [f"--address={self.address}"]),
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            "--disable-usage-stats",
        ]
        proc = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            cwd=cwd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes[name] = proc
        started = "Ray runtime started"
        wait_for(lambda: proc.poll() is not None or started in log.read_text(), timeout=120)
        assert proc.poll() is None, log.read_text()

    def node_ids(self) -> dict[str, str]:
        """Ray's node id of each custom resource's node (`{"learner_node": "3223d3..."}`)."""
        script = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "for k in n['Resources'] if not k.startswith('node:')}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, self.address],
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def kill(self, name: str) -> None:
        """Lose node `name` as a machine dies: SIGKILL to its raylet and every process on it
        (Ray's workers run in sessions of their own, so its process tree, not its group)."""
        import psutil

        root = psutil.Process(self.nodes[name].pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.nodes.pop(name).wait(10)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(list(self.nodes.values())):  # workers first, the head last
            end_session(proc)
        shutil.rmtree(self.short, ignore_errors=True)


class FileAudit:
    """Which processes of a node touched files under `watched` directories: `env` starts a
    node with `tests/audit/sitecustomize.py` (an audit hook in every Python process of it);
    `started()` are the pids it ran in, `touched()` the `(pid, event, path)` it saw.

        audit = FileAudit(tmp_path / "audit.log", [run_dir, start])
        cluster.add("a", 2, {"actor_node": 2}, env=audit.env, cwd=empty_dir)
    """

    def __init__(self, log: Path, watched: list[Path]):
        self.log = log
        hook = Path(__file__).parent / "audit"
        pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
        self.env = {
            "PYTHONPATH": pythonpath,
            "ASYNC_RL_AUDIT_LOG": str(log),
            "ASYNC_RL_AUDIT_DIRS": os.pathsep.join(str(w) for w in watched),
        }

    def _lines(self) -> list[list[str]]:
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split(" ", 2) for line in text.splitlines()]

    def started(self) -> dict[int, str]:
        """The pid of each process the hook ran in, and its working directory."""
        return {int(p[0]): p[2] for p in self._lines() if p[1] == "start"}

    def touched(self) -> list[tuple[int, str, str]]:
        return [(int(p[0]), p[1], p[2]) for p in self._lines() if p[1] != "start"]


def pid_of(run_dir: Path, name: str) -> int | None:
    try:
        return int((run_dir / "control" / "pids" / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def wait_ingested(client, n, timeout=30):
    """Wait until the buffer service has ingested `n` groups; its stats."""
    deadline = time.monotonic() + timeout
    while (stats := client.stats())["buffer/ingested"] < n:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)
    return stats


USER_REWARD = """
    import time

    def score(completion, answer):
        if completion.startswith("1"):
            raise ValueError("this verifier cannot read a leading 1")
        right = float(completion.strip() == answer)
        return {"reward": right, "short": float(len(completion) <= 2)}

    def length(completion):
        if completion == "hang":
            time.sleep(3600)
        return float(len(completion))
"""


def user_reward_file(tmp_path: Path) -> Path:
    """A reward of a user's own in a file: `score` (extras, a failure), `length` (a hang)."""
    path = tmp_path / "user_reward.py"
    path.write_text(textwrap.dedent(USER_REWARD))
    return path


def json_lines(path: Path) -> list[dict]:
    """Parsed lines of a JSONL file (none if it is missing); a torn line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def versions(run_dir: Path) -> list[int]:
    """The version of every complete metrics row, in the order they were written."""
    return [r["version"] for r in json_lines(run_dir / "metrics.jsonl") if "version" in r]


def fleet_sizes(run_dir: Path) -> list[int]:
    return [r.get("rollout/actors", 0) for r in json_lines(run_dir / "metrics.jsonl")]


def wait_for(predicate, timeout: float = 240, proc: subprocess.Popen | None = None, log=None):
    """Poll `predicate` until it holds; fail if `proc` exits first or `timeout` passes."""

    def tail() -> str:  # a pipe is read only once its writer exited (else it would block)
        if log:
            return Path(log).read_text()[-4000:]
        exited = proc is not None and proc.poll() is not None and proc.stdout is not None
        return proc.stdout.read()[-4000:] if exited else ""

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited early ({proc.returncode}):\n{tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate.__name__}:\n{tail()}")
        time.sleep(0.25)


def stored_groups(run_dir: Path) -> list[pa.RecordBatch]:
    """Every group in the buffer's closed segments (pyarrow only)."""
    tables = [pa.ipc.open_file(p).read_all() for p in sorted((run_dir / "buffer").glob("*.arrow"))]
    return [b for t in tables for b in t.to_batches()]


def kept_kv_logprobs(paths: dict, prompt: list[int], tokens: list[int], versions: list[int]):
    """Float64 log-probs of `tokens` after `prompt` when token j was drawn by the weights of
    checkpoint `paths[versions[j]]`, each attending to the KV entries the weights of their time
    computed (the in-flight kept-KV rule: the prompt is fed by the first token's weights, the
    input before token j by token j's), teacher-forced through the embedded engine's model at
    fp32."""
    import torch
    from safetensors.torch import load_file

    from actors.embedded_model import Model
    from async_rl.hf_config import read_model_spec

    spec = read_model_spec(next(iter(paths.values())))
    models = {
        v: Model(spec, load_file(Path(p) / "model.safetensors"), "fp32", torch.device("cpu"))
        for v, p in paths.items()
    }
    inputs = prompt + tokens[:-1]
    fed_by = [versions[0]] * (len(prompt) - 1) + list(versions)  # the weights feeding each input
    cache, logits, start = models[versions[0]].new_cache(1), [], 0
    with torch.inference_mode():
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and fed_by[end] == fed_by[start]:
                end += 1
            model = models[fed_by[start]]
            h, _ = model.forward(
                torch.tensor([inputs[start:end]]), torch.arange(start, end)[None], cache
            )
            logits.append(model.logits(h[0]))
            start = end
    logp = torch.log_softmax(torch.cat(logits)[len(prompt) - 1 :].double(), -1)
    return logp[torch.arange(len(tokens)), tokens]


def generate_with_logits(
    engine: EmbeddedEngine, prompts: list[list[int]], params: SamplingParams, num_samples: int
) -> tuple[list[list[Generation]], list[list[torch.Tensor]]]:
    """`engine.generate(prompts, params, num_samples)` of an `EmbeddedEngine`, and each
    completion's logits `[C, V]` in float32 before temperature and top-p: the distributions its
    tokens were sampled from, read where the engine samples every token (`_take`), which this
    call wraps on the one engine for its duration."""
    import torch

    from actors.engine import requests_of

    kept: dict[tuple[str, int], list[torch.Tensor]] = {}
    take = engine._take

    def reading(rows, logits_BV, *rest):
        for row, logits_V in zip(rows, logits_BV, strict=True):
            kept.setdefault((row.request.request_id, row.sample), []).append(logits_V.cpu())
        return take(rows, logits_BV, *rest)

    engine._take = reading
    try:
        groups = engine.generate(prompts, params, num_samples)
    finally:
        del engine._take
    requests = requests_of(prompts, params, num_samples)  # generate's, so their ids
    logits = [
        [torch.stack(kept[(r.request_id, g)]) for g in range(r.num_samples)] for r in requests
    ]
    return groups, logits
