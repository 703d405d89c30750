"""The learner process: take a global batch, train, publish the next version, repeat.

    version v = 0 (the starting checkpoint), or the version of the newest learner checkpoint
    loop until run.num_steps:
        batch  <- buffer.sample(v)           waits; staleness <= K is the buffer's guarantee
        metrics <- TrainStep(pack(batch))    prox pass + N mini-batch updates
        v <- v + 1; publish v (WeightStore), announce it (zmq PUB), tell the buffer
        checkpoint every learner.checkpoint_every steps; collect weights no actor uses

It never waits for actors, and keeps its own waiting off the training path: a fetch thread asks
for (and packs) the batch of v + 1 while the step of v trains, and a publish thread writes and
announces v + 1 while the step of v + 1 trains (one version in flight; the buffer hears of a
version only once actors can load it), and a checkpoint thread writes a snapshot taken between
steps (torchtitan's asynchronous checkpointing). A resumed learner asks the buffer for the same
versions again and gets the same groups (the buffer's consumption log), so with a fixed seed on
CPU the resumed loss trace equals the uninterrupted one.

Several ranks (`learner.num_ranks`, started by the driver, `learner.parallel`): the model is
sharded with FSDP2 and every rank trains its share of every mini-batch. Rank 0 alone talks to
the buffer, publishes, evaluates and writes metrics and checkpoints; it broadcasts each global
batch (Arrow IPC bytes, no pickle) to the other ranks, or "stop", which ends every rank's loop
at the same step. Gathering weights, evaluating and checkpointing are collective: every rank
runs the same loop and reaches them together.

Run on its own: `python -m learner.run RUN_DIR` (reads `RUN_DIR/config.toml`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
import zmq

from async_rl.clients import BatchSource, ZmqBatchSource
from async_rl.config import Config, load_config, precision_warning
from async_rl.messages import Batch, ipc_to_table, table_to_ipc
from async_rl.paths import RunPaths, publish_endpoints, read_endpoints, read_fleet_size
from async_rl.runtime import configure_torch
from async_rl.security import curve_for
from async_rl.tasks import task_from_config
from async_rl.tokenizer import load_tokenizer
from async_rl.types import RoutingSpec
from async_rl.weights import WeightAnnouncer, weight_store
from learner.batch import PackedBatch, pack, rollout_metrics
from learner.checkpoint import Snapshot, latest_checkpoint, load_checkpoint, new_token
from learner.evaluate import EvalResult, evaluate_run
from learner.hf import hf_state_dict, import_hf
from learner.model import DTYPES, apply_activation_checkpointing
from learner.optim import build_optimizer
from learner.parallel import (
    DataParallel,
    apply_fsdp,
    broadcast_bytes,
    shutdown,
    training_device,
)
from learner.train import TrainStep

log = logging.getLogger(__name__)


KEEP_CHECKPOINTS = 2  # the newest checkpoints a run keeps


class Background:
    """Jobs run one at a time on a thread of their own, at most one in flight.

    `submit` first waits for the job before it; `wait` returns the job's result. An error of a
    job is raised in the learner's thread by the next `submit` or `wait`. The threads are
    daemons: a process that exits (Ctrl-C, SIGTERM) never waits for a fetch asking a buffer
    that is gone. What they write is safe to cut short: checkpoints and weight versions
    appear whole (renamed, manifest last) or not at all.
    """

    def __init__(self, name: str):
        self.name = name
        self.pending: Future | None = None
        self.thread: threading.Thread | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        future: Future = Future()

        def run():
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # raised in the learner's thread by `wait`
                future.set_exception(e)

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        self.pending = future

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        finally:  # the job is done: its thread ends now, so none is left to a normal exit
            self.thread.join()

    def close(self) -> None:
        self.wait()


class Learner:
    """The learner process of a run (module docstring). `sources` makes its batch sources (the
    fetch and publish threads have one each); by default the run's buffer service.
    `evaluator(model)` measures held-out accuracy; by default the model samples for itself
    (`async-rl train` evaluates through an inference engine, `async_rl.app.evaluation`)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        start: Path,
        ctx: zmq.Context | None = None,
        sources: Callable[[], BatchSource] | None = None,
        evaluator: Callable[[dict[str, torch.Tensor]], EvalResult] | None = None,
        dp: DataParallel | None = None,
    ):
        self.cfg, self.paths = cfg, RunPaths(run_dir)
        self.run_dir = self.paths.root
        self.dp = dp or DataParallel(device_type=cfg.learner.device)
        if self.dp.device_type != cfg.learner.device:
            raise ValueError(
                f"learner.device = {cfg.learner.device!r}, but the rank's process group was "
                f"made for {self.dp.device_type!r}"
            )
        self.device = training_device(self.dp)
        torch.manual_seed(cfg.run.seed)
        if (warning := precision_warning(cfg)) and self.dp.is_main:
            log.warning(warning)
        master, compute = DTYPES[cfg.learner.master_dtype], DTYPES[cfg.model.dtype]
        self.model, _ = import_hf(start, cfg.model, device=self.device, dtype=master)
        apply_activation_checkpointing(self.model, cfg.learner.activation_checkpointing)
        apply_fsdp(self.model, self.dp, cfg.learner.expert_parallel, compute)
        self.tokenizer = load_tokenizer(str(start))
        self.task = task_from_config(cfg)
        if evaluator is None and self.dp.enabled and self.dp.is_main and cfg.run.eval_every:
            raise ValueError("several learner ranks evaluate through an engine (an evaluator)")
        self.evaluator = evaluator or (
            lambda weights: evaluate_run(self.model, self.tokenizer, self.task, self.cfg)
        )
        self.optimizer = build_optimizer(self.model, cfg.learner)
        self.step = TrainStep(self.model, self.optimizer, cfg, dp=self.dp)
        self.version = self.saved = 0  # the version trained to, and the last checkpointed
        self._last_tokens: tuple[float, float] | None = None  # (time, buffer's token count)
        checkpoint = latest_checkpoint(self.paths.learner_checkpoints)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.model, self.optimizer)
            self.version, self.step.updates = state["version"], state["updates"]
            self.saved = self.version
            log.info("resumed from %s at version %d", checkpoint, self.version)
        self.stopping = threading.Event()
        # this incarnation of the group: its ranks write a checkpoint into one directory
        token = new_token().encode() if self.dp.is_main else None
        self.token = (broadcast_bytes(token, self.dp) if self.dp.enabled else token).decode()
        weights = self.hf_weights()
        self.fetcher = Background("fetch")
        self.publisher, self.saver = Background("publish"), Background("checkpoint")
        if self.dp.is_main:
            self._connect(start, ctx, sources or self._buffer_source, weights)

    def _connect(self, start: Path, ctx, sources: Callable[[], BatchSource], weights) -> None:
        """Rank 0's side of the run: weight store, announcer, batch sources."""
        cfg = self.cfg
        self.store = weight_store(cfg, self.run_dir, start, create=True)
        latest = self.store.latest()
        if latest is None or latest < self.version:
            self.store.publish(self.version, weights)
        self.ctx = ctx or zmq.Context.instance()
        self.curve = curve_for(cfg)
        previous = (read_endpoints(self.paths, "learner") or {}).get("weights")
        self.announcer = WeightAnnouncer(self.ctx, cfg.run.bind_host, self.curve, previous)
        addresses = {"weights": self.announcer.address, **self.store.endpoints()}
        publish_endpoints(self.paths, "learner", addresses)
        self.source = sources()
        self.source.publish(self.version)
        # The batch source belongs to the fetch thread from here on: it asks for the next
        # global batch while the learner trains on this one; the publish thread has a source
        # of its own (zmq sockets are not thread-safe).
        self.publish_source = sources()

    def _buffer_source(self) -> ZmqBatchSource:
        return ZmqBatchSource(
            self.run_dir,
            ctx=self.ctx,
            curve=self.curve,
            retry_s=self.cfg.buffer.wait_timeout_s,
            stopping=self.stopping,
        )

    def next_batch(self, version: int) -> tuple[pa.Table, Batch] | None:
        """The buffer's global batch for `version` (None when the learner is stopping)."""
        deadline = time.monotonic() + self.cfg.buffer.wait_timeout_s
        while not self.stopping.is_set():
            try:
                table, reply = self.source.sample(version, wait_s=1.0)
            except TimeoutError:  # asked again for wait_timeout_s already
                if self.stopping.is_set():
                    break
                raise
            if table is not None:
                return table, reply
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no global batch for version {version} within "
                    f"buffer.wait_timeout_s = {self.cfg.buffer.wait_timeout_s:.0f}s "
                    f"({reply.metrics.get('buffer/groups', 0)} fresh groups waiting; "
                    "are actors running?)"
                )
        return None

    def fetch(self, version: int) -> Fetched | None:
        """On the fetch thread: the global batch for `version`, packed, the buffer's reply,
        the rollout metrics of the batch and, with several ranks, its bytes to broadcast."""
        got = self.next_batch(version)
        if got is None:
            return None
        table, reply = got
        rollout = rollout_metrics(table) | self._generation_rate(reply)
        payload = table_to_ipc(table).to_pybytes() if self.dp.enabled else None
        return Fetched(self._pack(table), reply, rollout, payload)

    def _pack(self, table: pa.Table) -> PackedBatch:
        return pack(table, RoutingSpec.of(self.cfg.model), self.tokenizer.pad_id)

    def _next(self) -> Fetched | None:
        """The global batch of this version on every rank; None on all of them when rank 0
        stops."""
        if not self.dp.is_main:
            payload = broadcast_bytes(None, self.dp)
            if payload is None:
                self.stopping.set()
                return None
            return Fetched(self._pack(ipc_to_table(payload)), None, {}, None)
        got = None
        if not self.stopping.is_set():
            if self.fetcher.pending is None:  # else the previous step asked for this version
                self.fetcher.submit(self.fetch, self.version)
            got = self.fetcher.wait()
        if self.dp.enabled:
            broadcast_bytes(None if got is None else got.payload, self.dp)
        return got

    def _generation_rate(self, reply: Batch) -> dict[str, float]:
        """`rollout/tokens_per_s`: completion tokens the buffer accepted per second since the
        previous batch (none across a restart of the buffer, whose counter starts again)."""
        now, tokens = time.monotonic(), reply.metrics.get("buffer/completion_tokens", 0.0)
        last, self._last_tokens = self._last_tokens, (now, tokens)
        if last is None or tokens < last[1] or now <= last[0]:
            return {}
        return {"rollout/tokens_per_s": (tokens - last[1]) / (now - last[0])}

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], in_use: set[int]):
        """On the publish thread: the store writes the version (manifest last), the buffer
        learns it (admission), the announcement goes out, old versions are collected.
        A checkpoint's version is durable (the collective path's late joiners start there)."""
        self.store.publish(version, hf_state, durable=self.checkpoints_at(version))
        self.publish_source.publish(version)  # first: an actor told of it may lease at once
        self.announcer.announce(version)
        self.store.collect(in_use)

    def train_one(self) -> dict | None:
        """One global step: its metrics row (rank 0; {} on the others), or None when the
        learner is stopping."""
        start = time.monotonic()
        got = self._next()
        waited = time.monotonic() - start
        if got is None:
            return None
        main = self.dp.is_main
        if main and self.version + 1 < self.cfg.run.num_steps:
            self.fetcher.submit(self.fetch, self.version + 1)  # fetched while this step trains
        metrics = self.step(got.packed)
        self.version += 1
        published = time.monotonic()  # the learner's share: a copy (and a slow previous one)
        state = self.hf_weights()
        if not main:
            return {}
        if not self.dp.enabled and self.device.type == "cpu":
            state = {k: v.clone() for k, v in state.items()}  # views of the parameters
        self.publisher.submit(self.publish, self.version, state, set(got.reply.versions_in_use))
        metrics["publish_time_s"] = time.monotonic() - published
        metrics["publish_peak_mib"] = self._publish_peak(state) / 2**20
        metrics.update(self.store.stats())  # the previous version's transfer, if it tells
        metrics["wait_time_s"] = waited
        return self.metrics_row(metrics, got.reply) | got.rollout

    def metrics_row(self, metrics: dict, reply: Batch) -> dict:
        """`metrics.jsonl`'s row of this version (DESIGN.md section 8): the step's metrics as
        `learner/*` and `rollout/*`, the buffer's as it served the batch, the fleet size."""
        row = {"version": self.version, "learner/num_ranks": self.dp.world_size}
        row.update({f"rollout/{k}": metrics.pop(k) for k in ("reward_mean", "response_len_mean")})
        row.update({f"learner/{k}": v for k, v in metrics.items()})
        row.update(
            {
                "learner/version": self.version,
                "learner/staleness_mean": reply.staleness_mean,
                "learner/staleness_max": reply.staleness_max,
                "learner/tokens_per_s": metrics["num_tokens"] / max(metrics["step_time_s"], 1e-9),
                **reply.metrics,
            }
        )
        # the size the driver runs; without a driver, the actors the buffer saw lately
        fleet = read_fleet_size(self.paths)
        row["rollout/actors"] = fleet if fleet is not None else reply.metrics["buffer/actors_seen"]
        return row

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """The weights of now in Hugging Face names on rank 0 ({} on the others): collective
        under FSDP, gathered `learner.publish_bucket_mib` at a time (`hf_state_dict`)."""
        bucket = self.cfg.learner.publish_bucket_mib * 2**20
        return hf_state_dict(self.model, self.cfg.model, bucket, keep=self.dp.is_main)

    def _publish_peak(self, state: dict[str, torch.Tensor]) -> int:
        """Bytes rank 0 holds to publish a version beyond the model: the version's copy, and
        with several ranks the last bucket in flight (the others hold at most a bucket)."""
        copy = sum(v.numel() * v.element_size() for v in state.values())
        bucket = min(self.cfg.learner.publish_bucket_mib * 2**20, copy)
        return copy + (bucket if self.dp.enabled else 0)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the weights of now (rank 0 evaluates; {} on the others)."""
        weights = self.hf_weights()
        if not self.dp.is_main:
            return {}
        result = self.evaluator(weights)
        self.model.train()
        return {"eval/accuracy": result.avg_at_k, "eval/greedy_accuracy": result.greedy}

    def checkpoints_at(self, version: int) -> bool:
        """Whether the run checkpoints `version`: every `learner.checkpoint_every`, and the last."""
        every = self.cfg.learner.checkpoint_every
        return version == self.cfg.run.num_steps or bool(every and version % every == 0)

    def checkpoint(self, wait: bool = True) -> None:
        """Checkpoint this version: every rank copies its shards and writes them (rank 0
        commits the checkpoint); with `wait=False` they are written while training goes on."""
        snapshot = Snapshot.take(
            self.version,
            self.model,
            self.optimizer,
            {"version": self.version, "updates": self.step.updates},
        )
        self.saved = self.version
        root = self.paths.learner_checkpoints
        self.saver.submit(snapshot.write, root, KEEP_CHECKPOINTS, self.token)
        if wait:
            self.saver.wait()

    def run(self, on_metrics=None) -> None:
        """Train to `run.num_steps`, or until stopped: a stopped learner checkpoints the
        version it reached (every rank writes its shards), one that fails does not
        (it resumes from its last good checkpoint)."""
        every, steps = self.cfg.run.eval_every, self.cfg.run.num_steps
        with self._metrics_log(on_metrics) as emit:
            if every and self.version == 0:
                emit({"version": 0, **self.evaluate()})
            while self.version < steps:
                row = self.train_one()
                if row is None:
                    break
                if every and (self.version % every == 0 or self.version == steps):
                    row.update(self.evaluate())
                emit(row)
                # after its metrics: a learner resumed from this checkpoint logs every version
                if self.checkpoints_at(self.version):
                    self.checkpoint(wait=False)
            if self.version > self.saved:  # stopped: it resumes where it stopped
                self.checkpoint(wait=False)
            # the last version and checkpoint are complete when the learner is done
            self.publisher.wait()
            self.saver.wait()

    @contextlib.contextmanager
    def _metrics_log(self, on_metrics):
        """`emit(row)` appends a row to `metrics.jsonl` (rank 0; the other ranks' rows are
        empty and go nowhere)."""
        if not self.dp.is_main:
            yield lambda row: None
            return
        with self.paths.metrics.open("a+b") as out:
            if out.tell():
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":
                    out.write(b"\n")  # a killed learner's torn last line stays on its own line

            def emit(row):
                row["time"] = time.time()  # wall clock when the row was written
                out.write(json.dumps(row).encode() + b"\n")
                out.flush()
                if on_metrics is not None:
                    on_metrics(row)

            yield emit

    def close(self) -> None:
        try:
            self.publisher.close()  # what is in flight is finished first
            self.saver.close()
        finally:
            # a fetch waiting for a batch gives up within a second; a batch fetched ahead and
            # not trained is served again to the learner that resumes this run
            self.stopping.set()
            if self.dp.is_main:
                for socket in (self.announcer, self.publish_source, self.source):
                    socket.close()
                self.store.close()
            shutdown()


@dataclass
class Fetched:
    """A global batch as the learner trains it; rank 0's also carries the buffer's reply, the
    rollout metrics and, with several ranks, the Arrow IPC bytes it broadcasts."""

    packed: PackedBatch
    reply: Batch | None
    rollout: dict[str, float]
    payload: bytes | None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a run directory's learner.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--start", type=Path, required=True, help="starting HF checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(message)s")
    cfg = load_config(RunPaths(args.run_dir).config)
    configure_torch(cfg.run.num_threads)
    learner = Learner(cfg, args.run_dir, args.start)
    signal.signal(signal.SIGTERM, lambda *_: learner.stopping.set())
    learner.run(lambda m: log.info("version %d: %s", m["version"], m))  # SIGTERM: checkpoints
    learner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
