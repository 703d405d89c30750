"""The learner process: take a global batch, train, publish the next version, repeat.

    version v = 0 (the starting checkpoint), or the version of the newest learner checkpoint
    loop until run.num_steps:
        batch  <- buffer.sample(v)           waits; staleness <= K is the buffer's guarantee
        metrics <- TrainStep(pack(batch))    prox pass + N mini-batch updates
        v <- v + 1; publish v (WeightStore), announce it (zmq PUB), tell the buffer
        checkpoint every learner.checkpoint_every steps; collect weights no actor uses

It never waits for actors. A resumed learner asks the buffer for the same versions again and
gets the same groups (the buffer's consumption log), so with a fixed seed on CPU the resumed
loss trace equals the uninterrupted one.

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
from pathlib import Path

import torch
import zmq

from async_rl.buffer_service import BufferClient
from async_rl.config import Config, load_config
from async_rl.losses import group_advantages, minirl_loss
from async_rl.security import curve_for
from async_rl.tasks import task_from_config
from async_rl.tokenizer import load_tokenizer
from async_rl.transport import publish_endpoints, read_endpoints
from async_rl.types import RoutingSpec
from async_rl.weights import WeightAnnouncer, weight_store
from learner.batch import pack
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.evaluate import evaluate
from learner.hf import hf_state_dict, import_hf
from learner.train import TrainStep

log = logging.getLogger(__name__)


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
        self.buffer = BufferClient(
            self.run_dir,
            ctx=self.ctx,
            curve=self.curve,
            retry_s=cfg.buffer.wait_timeout_s,
            stopping=self.stopping,
        )
        self.buffer.publish(self.version)

    def next_batch(self):
        start = time.monotonic()
        deadline = start + self.cfg.buffer.wait_timeout_s
        while not self.stopping.is_set():
            try:
                table, info = self.buffer.sample(self.version, wait_s=1.0)
            except TimeoutError:  # asked again for wait_timeout_s already
                if self.stopping.is_set():
                    break
                raise
            if table is not None:
                return table, info, time.monotonic() - start
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no global batch for version {self.version} within "
                    f"buffer.wait_timeout_s = {self.cfg.buffer.wait_timeout_s:.0f}s "
                    f"({info.get('buffer/groups', 0)} fresh groups waiting; are actors running?)"
                )
        return None, {}, time.monotonic() - start

    def train_one(self) -> dict | None:
        table, info, waited = self.next_batch()
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
        metrics = self.step(packed)
        self.version += 1
        published = time.monotonic()
        self.store.publish(self.version, hf_state_dict(self.model, cfg.model))
        self.announcer.announce(self.version)
        self.buffer.publish(self.version)
        metrics["publish_time_s"] = time.monotonic() - published
        self.store.collect(set(info.get("versions_in_use", [])))
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
        return row

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

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.run_dir / "checkpoints" / "learner",
            self.version,
            self.model,
            self.optimizer,
            {"version": self.version, "updates": self.step.updates},
        )

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
                    self.checkpoint()

    def close(self) -> None:
        self.announcer.close()
        self.buffer.close()


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
