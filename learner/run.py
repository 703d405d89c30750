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
the buffer (its feed, `learner.feed.BufferFeed`, broadcasts each global batch as Arrow IPC
bytes, or "stop", which ends every rank's loop at the same step; the others' `RankFeed`
receives it), publishes (`learner.publish.Publisher`: the other ranks have none), evaluates and
writes metrics (`async_rl.metrics.MetricsWriter`). Gathering weights, evaluating and
checkpointing are collective: every rank runs the same loop and reaches them together.

Run on its own: `python -m learner.run RUN_DIR --start CHECKPOINT` (reads `RUN_DIR/config.toml`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

from async_rl.config import Config, load_config, precision_warning
from async_rl.metrics import MetricsWriter
from async_rl.paths import RunPaths
from async_rl.runtime import configure_torch
from async_rl.tasks import task_from_config
from async_rl.tokenizer import tokenizer_from_config
from async_rl.wire.clients import BatchSource, ZmqBatchSource
from async_rl.wire.messages import Batch
from async_rl.wire.security import curve_for
from learner.background import Background
from learner.checkpoint import Snapshot, latest_checkpoint, load_checkpoint, new_token
from learner.evaluate import EvalResult, evaluate_run
from learner.feed import BufferFeed, RankFeed
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
from learner.publish import Publisher, checkpoints_at
from learner.train import TrainStep

log = logging.getLogger(__name__)


KEEP_CHECKPOINTS = 2  # the newest checkpoints a run keeps


class Learner:
    """The learner process of a run (module docstring). Build it, which stores its arguments
    and opens, loads and starts nothing, then `start()` it (every rank together), then `run()`;
    `close()` closes what `start()` opened (nothing, for a learner never started).

    `start` is the starting Hugging Face checkpoint. `sources` makes its batch sources (the
    fetch and publish threads have one each); by default the run's buffer service.
    `evaluator(model)` measures held-out accuracy; by default the model samples for itself
    (`async-rl train` evaluates through an inference engine, `async_rl.run.evaluation`)."""

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
        self.run_dir, self.start_checkpoint = self.paths.root, Path(start)
        self.ctx, self.sources, self.evaluator = ctx, sources, evaluator
        self.dp = dp or DataParallel(device_type=cfg.learner.device)
        if self.dp.device_type != cfg.learner.device:
            raise ValueError(
                f"learner.device = {cfg.learner.device!r}, but the rank's process group was "
                f"made for {self.dp.device_type!r}"
            )
        if evaluator is None and self.dp.enabled and self.dp.is_main and cfg.run.eval_every:
            raise ValueError("several learner ranks evaluate through an engine (an evaluator)")
        self.started = False
        self.version = self.saved = 0  # the version trained to, and the last checkpointed
        self.stopping = threading.Event()
        self.saver = Background("checkpoint")  # a thread per checkpoint, when one is written
        self.model: torch.nn.Module | None = None  # `start()` makes it, and what follows:
        self.publisher: Publisher | None = None  # rank 0's alone
        self.feed: BufferFeed | RankFeed | None = None
        self.metrics: MetricsWriter | None = None  # rank 0's alone

    def start(self) -> Learner:
        """Load the starting checkpoint (sharded with FSDP2 over the ranks), resume from the
        run's newest learner checkpoint, and open rank 0's publisher (which publishes the
        version reached) and feed, or the other ranks' feed. Collective: every rank starts."""
        if self.started:
            raise RuntimeError("the learner is started already")
        self.started = True
        cfg, start = self.cfg, self.start_checkpoint
        self.device = training_device(self.dp)
        torch.manual_seed(cfg.run.seed)
        if (warning := precision_warning(cfg)) and self.dp.is_main:
            log.warning(warning)
        master, compute = DTYPES[cfg.learner.master_dtype], DTYPES[cfg.model.dtype]
        self.model, _ = import_hf(start, cfg.model, device=self.device, dtype=master)
        apply_activation_checkpointing(self.model, cfg.learner.activation_checkpointing)
        apply_fsdp(self.model, self.dp, cfg.learner.expert_parallel, compute)
        self.tokenizer = tokenizer_from_config(cfg, start)
        self.task = task_from_config(cfg)
        self.evaluator = self.evaluator or (
            lambda weights: evaluate_run(self.model, self.tokenizer, self.task, self.cfg)
        )
        self.optimizer = build_optimizer(self.model, cfg.learner)
        self.step = TrainStep(self.model, self.optimizer, cfg, dp=self.dp)
        self._resume()
        # this incarnation of the group: its ranks write a checkpoint into one directory
        token = new_token().encode() if self.dp.is_main else None
        self.token = (broadcast_bytes(token, self.dp) if self.dp.enabled else token).decode()
        weights = self.hf_weights()
        if self.dp.is_main:
            self._connect(weights)
        else:
            self.feed = RankFeed(cfg, self.tokenizer.pad_id, self.dp, self.stopping)
        return self

    def _resume(self) -> None:
        """Go on from the run's newest learner checkpoint, if it has one."""
        checkpoint = latest_checkpoint(self.paths.learner_checkpoints)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.model, self.optimizer)
            self.version, self.step.updates = state["version"], state["updates"]
            self.saved = self.version
            log.info("resumed from %s at version %d", checkpoint, self.version)

    def _connect(self, weights: dict[str, torch.Tensor]) -> None:
        """Rank 0's side of the run: the publisher (weight store, announcer) and the feed, each
        with a batch source of its own (zmq sockets are not thread-safe). A source waits for
        the buffer's endpoints up to `run.startup_timeout_s`."""
        ctx = self.ctx or zmq.Context.instance()
        curve = curve_for(self.cfg)
        sources = self.sources or (
            lambda: ZmqBatchSource(
                self.run_dir,
                ctx=ctx,
                timeout_s=self.cfg.run.startup_timeout_s,
                curve=curve,
                retry_s=self.cfg.buffer.wait_timeout_s,
                stopping=self.stopping,
            )
        )
        self.publisher = Publisher(
            self.cfg, self.paths, self.start_checkpoint, ctx, curve, sources(), self.dp.world_size
        )
        self.publisher.start(self.version, weights)
        self.feed = BufferFeed(self.cfg, sources(), self.tokenizer.pad_id, self.dp, self.stopping)
        self.metrics = MetricsWriter(self.run_dir)

    def _check_started(self) -> None:
        if not self.started:
            raise RuntimeError("the learner is not started: call start() first")

    def train_one(self) -> dict | None:
        """One global step: its metrics row (rank 0; {} on the others), or None when the
        learner is stopping."""
        self._check_started()
        start = time.monotonic()
        got = self.feed.next(self.version)
        waited = time.monotonic() - start
        if got is None:
            return None
        if self.version + 1 < self.cfg.run.num_steps:
            self.feed.prefetch(self.version + 1)  # fetched while this step trains
        metrics = self.step(got.packed)
        self.version += 1
        published = time.monotonic()  # the learner's share: a copy (and a slow previous one)
        if self.publisher is not None:
            self.publisher.before_gather()
        state = self.hf_weights()
        if self.publisher is None:
            return {}
        if not self.dp.enabled and self.device.type == "cpu":
            state = {k: v.clone() for k, v in state.items()}  # views of the parameters
        metrics |= self.publisher.submit(self.version, state, set(got.reply.versions_in_use))
        metrics["publish_time_s"] = time.monotonic() - published
        metrics["wait_time_s"] = waited
        return self.metrics_row(metrics, got.reply) | got.rollout

    def metrics_row(self, metrics: dict, reply: Batch) -> dict:
        """`metrics.jsonl`'s row of this version (docs/design.md section 8): the step's metrics as
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
        row["rollout/actors"] = self.metrics.fleet(reply.metrics["buffer/actors_seen"])
        row["rollout/nodes_lost"] = self.metrics.nodes_lost()
        return row

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """The weights of now in Hugging Face names on rank 0 ({} on the others): collective
        under FSDP, gathered `weights.bucket_mib` at a time (`hf_state_dict`)."""
        bucket = self.cfg.weights.bucket_mib * 2**20
        return hf_state_dict(self.model, self.cfg.model, bucket, keep=self.dp.is_main)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the weights of now (rank 0 evaluates; {} on the others)."""
        weights = self.hf_weights()
        if self.publisher is None:
            return {}
        result = self.evaluator(weights)
        self.model.train()
        return {"eval/accuracy": result.avg_at_k, "eval/greedy_accuracy": result.greedy}

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
        self._check_started()
        every, steps = self.cfg.run.eval_every, self.cfg.run.num_steps

        def emit(row: dict) -> None:  # rank 0's rows; the other ranks' are empty
            if self.publisher is not None:
                self.metrics.write(row)
                if on_metrics is not None:
                    on_metrics(row)

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
            if checkpoints_at(self.cfg, self.version):
                self.checkpoint(wait=False)
        if self.version > self.saved:  # stopped: it resumes where it stopped
            self.checkpoint(wait=False)
        # the last version and checkpoint are complete when the learner is done
        if self.publisher is not None:
            self.publisher.wait()
        self.saver.wait()

    def close(self) -> None:
        """Close what `start()` opened (as far as it got); nothing for a learner never started."""
        if not self.started:
            return
        try:
            if self.publisher is not None:
                self.publisher.thread.close()  # what is in flight is finished first
            self.saver.close()
        finally:
            # a fetch waiting for a batch gives up within a second; a batch fetched ahead and
            # not trained is served again to the learner that resumes this run
            self.stopping.set()
            for part in (self.publisher, self.feed, self.metrics):
                if part is not None:
                    part.close()
            shutdown()


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
    learner.start()
    learner.run(lambda m: log.info("version %d: %s", m["version"], m))  # SIGTERM: checkpoints
    learner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
