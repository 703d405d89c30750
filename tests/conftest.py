"""Fixtures the test modules share; plain builders are in `tests/helpers.py`.

- `start`: a Hugging Face checkpoint of a randomly initialised tiny model (version 0 of runs);
- `cold_start`: a briefly cold-started one (right on some prompts: advantages are not all 0);
- `buffer_service`: a run's buffer service in a thread, and a client of it;
- `run_services`: the buffer service (in a thread), a learner and an actor of one run;
- `train_in_threads`: those three, training the run to its end;
- `make_step`: a `TrainStep` on a model, configured by dotted overrides.

Tiers: `tests/unit/` runs in one process (no Ray, no subprocess; `tests/unit/test_layout.py`
checks it): `pytest tests/unit` is the inner loop, about a minute on two cores;
`tests/integration/` has real processes, Ray and whole runs. `pytest` runs both, what CI runs
(all but `heavy`); `slow` marks the long ones.
"""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from async_rl.buffer.service import BufferService
from async_rl.config import ModelConfig, load_config
from tests import helpers
from tests.helpers import BufferClient, pipeline_config, run_config, services_in_threads


@pytest.fixture(scope="session")
def start(tmp_path_factory):
    from async_rl.tokenizer import Tokenizer
    from learner.hf import export_hf
    from learner.model import build_model

    out = tmp_path_factory.mktemp("start") / "ckpt"
    return export_hf(build_model(ModelConfig(), seed=0), ModelConfig(), Tokenizer.arithmetic(), out)


@pytest.fixture(scope="session")
def cold_start(tmp_path_factory):
    """80 steps of the cold start on one-digit sums (`helpers.pipeline_config`)."""
    from async_rl.tasks import task_from_config
    from async_rl.tokenizer import Tokenizer
    from learner.sft import run_sft

    tmp = tmp_path_factory.mktemp("cold_start")
    cfg = pipeline_config(tmp, "sft")
    torch.manual_seed(0)
    out = tmp / "sft"
    run_sft(cfg, Tokenizer.arithmetic(), task_from_config(cfg), out, log=lambda *_: None)
    return out


@pytest.fixture
def buffer_service(tmp_path):
    """A buffer service of `helpers.run_config` in a thread, and a client of it."""
    cfg = run_config(tmp_path)
    svc = BufferService(cfg, cfg.run_dir, ctx=zmq.Context())
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    client = BufferClient(cfg.run_dir, ctx=svc.ctx)
    yield svc, client
    client.close()
    svc.stop()
    thread.join(10)


@pytest.fixture
def run_services():
    """`with run_services(cfg, start) as (learner, actor):` (`helpers.services_in_threads`)."""
    return services_in_threads


@pytest.fixture
def train_in_threads():
    """`rows, learner, actor = train_in_threads(cfg, start)` (`helpers.train_in_threads`)."""
    return helpers.train_in_threads


@pytest.fixture
def make_step():
    """`make_step(model, "algo.num_minibatches=2", ..., optimizer=None)`: a `TrainStep` with
    the config's AdamW unless `optimizer` is given."""
    from learner.optim import build_optimizer
    from learner.train import TrainStep

    def build(model, *overrides, optimizer=None, dp=None):
        cfg = load_config(None, list(overrides))
        optimizer = optimizer or build_optimizer(model, cfg.learner)
        return TrainStep(model, optimizer, cfg, dp=dp)

    return build
