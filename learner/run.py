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

Run on its own: `python -m learner.run RUN_DIR` (reads `RUN_DIR/config.toml`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import torch
import zmq

from async_rl.buffer_service import BufferClient
from async_rl.config import Config, load_config
from async_rl.losses import group_advantages, minirl_loss
from async_rl.security import curve_for
from async_rl.tasks import task_from_config
from async_rl.tokenizer import load_tokenizer
from async_rl.transport import actors_file, publish_endpoints, read_endpoints
from async_rl.types import RoutingSpec
from async_rl.weights import WeightAnnouncer, weight_store
from learner.batch import pack
from learner.checkpoint import Snapshot, latest_checkpoint, load_checkpoint
from learner.evaluate import evaluate
from learner.hf import hf_state_dict, import_hf
from learner.train import TrainStep

log = logging.getLogger(__name__)


class Background:
    """Jobs run one at a time on a thread of their own, at most one in flight.

    `submit` first waits for the job before it; `wait` returns the job's result. An error of a
    job is raised in the learner's thread by the next `submit` or `wait`.
    """

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.pending: Future | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


class Learner:
    def __init__(self, cfg: Config, run_dir: Path, start: Path, ctx: zmq.Context | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        torch.manual_seed(cfg.run.seed)
        self.model, _ = import_hf(start, cfg.model)
        self.tokenizer = load_tokenizer(str(start))
        self.pad_id = self.tokenizer.pad_id
        self.task = task_from_config(cfg)
        learner, algo = cfg.learner, cfg.algo
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=learner.lr,
            betas=(learner.adam_beta1, learner.adam_beta2),
            weight_decay=learner.weight_decay,
        )
        self.step = TrainStep(
            self.model,
            self.optimizer,
            functools.partial(minirl_loss, cfg=algo),
            num_minibatches=algo.num_minibatches,
            routing_replay=algo.routing_replay,
            temperature=cfg.actor.temperature,
            grad_clip=learner.grad_clip,
            lr=learner.lr,
            warmup_steps=learner.warmup_steps,
            lr_schedule=learner.lr_schedule,
            total_updates=cfg.run.num_steps * algo.num_minibatches,
        )
        self.version = 0
        checkpoint = latest_checkpoint(self.run_dir / "checkpoints" / "learner")
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.model, self.optimizer)
            self.version, self.step.updates = state["version"], state["updates"]
            log.info("resumed from %s at version %d", checkpoint, self.version)
        self.store = weight_store(cfg, self.run_dir, start, create=True)
        latest = self.store.latest()
        if latest is None or latest < self.version:
            self.store.publish(self.version, hf_state_dict(self.model, cfg.model))
        self.ctx = ctx or zmq.Context.instance()
        self.curve = curve_for(cfg)
        previous = (read_endpoints(self.run_dir, "learner") or {}).get("weights")
        self.announcer = WeightAnnouncer(self.ctx, cfg.run.bind_host, self.curve, previous)
        publish_endpoints(self.run_dir, "learner", {"weights": self.announcer.address})
        self.stopping = threading.Event()
        self.buffer = self._buffer_client()
        self.buffer.publish(self.version)
        # The buffer's socket belongs to the fetch thread from here on: it asks for the next
        # global batch while the learner trains on this one.
        self.fetcher = Background("fetch")
        # the publish thread has a socket of its own (zmq sockets are not thread-safe)
        self.publisher, self.saver = Background("publish"), Background("checkpoint")
        self.publish_buffer = self._buffer_client()

    def _buffer_client(self) -> BufferClient:
        return BufferClient(
            self.run_dir,
            ctx=self.ctx,
            curve=self.curve,
            retry_s=self.cfg.buffer.wait_timeout_s,
            stopping=self.stopping,
        )

    def next_batch(self, version: int) -> tuple[pa.Table | None, dict]:
        """The buffer's global batch for `version` (None when the learner is stopping)."""
        deadline = time.monotonic() + self.cfg.buffer.wait_timeout_s
        while not self.stopping.is_set():
            try:
                table, info = self.buffer.sample(version, wait_s=1.0)
            except TimeoutError:  # asked again for wait_timeout_s already
                if self.stopping.is_set():
                    break
                raise
            if table is not None:
                return table, info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no global batch for version {version} within "
                    f"buffer.wait_timeout_s = {self.cfg.buffer.wait_timeout_s:.0f}s "
                    f"({info.get('buffer/groups', 0)} fresh groups waiting; are actors running?)"
                )
        return None, {}

    def fetch(self, version: int):
        """On the fetch thread: the global batch for `version`, packed, and the buffer's info."""
        table, info = self.next_batch(version)
        if table is None:
            return None
        cfg = self.cfg
        packed = pack(
            table,
            RoutingSpec.of(cfg.model),
            cfg.algo.group_size,
            functools.partial(group_advantages, std_norm=cfg.algo.adv_std_norm),
            self.pad_id,
        )
        return packed, info

    def publish(self, version: int, hf_state: dict[str, torch.Tensor], in_use: set[int]):
        """On the publish thread: the store writes the version (manifest last), the
        announcement goes out, the buffer learns it (admission), old versions are collected."""
        self.store.publish(version, hf_state)
        self.announcer.announce(version)
        self.publish_buffer.publish(version)
        self.store.collect(in_use)

    def train_one(self) -> dict | None:
        start = time.monotonic()
        if self.fetcher.pending is None:  # else the previous step asked for this version
            self.fetcher.submit(self.fetch, self.version)
        got = self.fetcher.wait()
        waited = time.monotonic() - start
        if got is None:
            return None
        packed, info = got
        cfg = self.cfg
        if self.version + 1 < cfg.run.num_steps:
            self.fetcher.submit(self.fetch, self.version + 1)  # fetched while this step trains
        metrics = self.step(packed)
        self.version += 1
        published = time.monotonic()  # the learner's share: a copy (and a slow previous one)
        self.publisher.submit(
            self.publish,
            self.version,
            {k: v.clone() for k, v in hf_state_dict(self.model, cfg.model).items()},
            set(info.get("versions_in_use", [])),
        )
        metrics["publish_time_s"] = time.monotonic() - published
        rollout = ("reward_mean", "response_len_mean")
        row = {"version": self.version}
        row.update({f"rollout/{k}": metrics.pop(k) for k in rollout})
        row.update({f"learner/{k}": v for k, v in metrics.items()})
        row.update(
            {
                "learner/version": self.version,
                "learner/wait_time_s": waited,
                "learner/staleness_mean": info["staleness_mean"],
                "learner/staleness_max": info["staleness_max"],
                "learner/tokens_per_s": metrics["num_tokens"] / max(metrics["step_time_s"], 1e-9),
                **{k: v for k, v in info.items() if k.startswith(("buffer/", "rollout/"))},
            }
        )
        fleet = self.fleet_size()
        if fleet is not None:  # else the buffer's count of actors seen in the last seconds
            row["rollout/actors"] = fleet
        return row

    def fleet_size(self) -> int | None:
        """The fleet size the driver last set (`control/actors.json`), if a driver runs this."""
        try:
            return int(json.loads(actors_file(self.run_dir).read_bytes())["actors"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        result = evaluate(
            self.model,
            self.tokenizer,
            self.task,
            k=cfg.run.eval_k,
            temperature=cfg.actor.temperature,
            max_new_tokens=cfg.actor.max_new_tokens,
            seed=cfg.run.seed,
        )
        self.model.train()
        return {"eval/accuracy": result.avg_at_k, "eval/greedy_accuracy": result.greedy}

    def checkpoint(self, wait: bool = True) -> None:
        """Checkpoint this version; with `wait=False` it is written while training goes on."""
        snapshot = Snapshot.take(
            self.version,
            self.model,
            self.optimizer,
            {"version": self.version, "updates": self.step.updates},
        )
        self.saver.submit(snapshot.write, self.run_dir / "checkpoints" / "learner")
        if wait:
            self.saver.wait()

    def run(self, on_metrics=None) -> None:
        every, steps = self.cfg.run.eval_every, self.cfg.run.num_steps
        save_every = self.cfg.learner.checkpoint_every
        with (self.run_dir / "metrics.jsonl").open("a+b") as out:
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

            if every and self.version == 0:
                emit({"version": 0, **self.evaluate()})
            while self.version < steps and not self.stopping.is_set():
                row = self.train_one()
                if row is None:
                    break
                if every and (self.version % every == 0 or self.version == steps):
                    row.update(self.evaluate())
                emit(row)
                # after its metrics: a learner resumed from this checkpoint logs every version
                if (save_every and self.version % save_every == 0) or self.version == steps:
                    self.checkpoint(wait=False)
            # the last version and checkpoint are complete when the learner is done
            self.publisher.wait()
            self.saver.wait()

    def close(self) -> None:
        try:
            self.publisher.close()  # what is in flight is finished first
            self.saver.close()
        finally:
            # a fetch waiting for a batch gives up within a second; a batch fetched ahead and
            # not trained is served again to the learner that resumes this run
            self.stopping.set()
            self.fetcher.pool.shutdown()
            for socket in (self.announcer, self.publish_buffer, self.buffer):
                socket.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a run directory's learner.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--start", type=Path, required=True, help="starting HF checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(message)s")
    cfg = load_config(args.run_dir / "config.toml")
    torch.set_num_threads(cfg.run.num_threads)
    learner = Learner(cfg, args.run_dir, args.start)
    signal.signal(signal.SIGTERM, lambda *_: learner.stopping.set())
    learner.run(lambda m: log.info("version %d: %s", m["version"], m))
    if learner.stopping.is_set() and learner.step.updates:
        learner.checkpoint()  # a SIGTERMed learner resumes where it stopped
    learner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
