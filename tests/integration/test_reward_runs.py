"""The integration half of `tests/unit/test_reward_runs.py`: what needs a subprocess or Ray."""

import functools
import subprocess
import sys
import time

import psutil

from actors.scoring import Scorer
from async_rl.rewards import score_named
from async_rl.tasks import Problem
from tests.helpers import ENV, ROOT, ManualClock, user_reward_file


def test_a_process_pool_kills_a_hung_verifier_and_goes_on(tmp_path):
    path = user_reward_file(tmp_path)
    score = functools.partial(score_named, f"{path}:length", "file")
    clock = ManualClock()
    scorer = Scorer(score, per_completion=True, workers=2, pool="process", timeout_s=5, clock=clock)
    problem = Problem("p", "say something", "")
    try:
        scorer.submit("a", problem, ["hang", "xyz"])
        assert scorer.ready(wait_s=3) == []  # "hang" is still running
        workers = [p.pid for p in scorer._pool._processes.values()]
        clock.now = 6.0
        ((key, scores),) = scorer.ready(wait_s=20)
        assert key == "a" and scores.rewards == [0.0, 3.0] and "timed out" in scores.errors[0]
        assert not _alive(workers)  # the hung worker was killed, not left behind
        scorer.submit("b", problem, ["ab"])
        assert scorer.ready(wait_s=30) == [("b", scorer_result([2.0]))]
    finally:
        scorer.close()


def _alive(pids: list[int], timeout_s: float = 30) -> list[int]:
    """The processes of `pids` still running (not gone, not a zombie) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_async_rl_train_refuses_a_bad_reward_before_anything_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "train", f"run.output_dir={tmp_path}",
         f"task.reward={tmp_path / 'absent.py'}:score"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"task.reward: {tmp_path / 'absent.py'}: no such file" in out.stderr
    assert not any(tmp_path.iterdir())  # no run directory, no cold start


def scorer_result(rewards):
    from async_rl.rewards import GroupScores

    return GroupScores(rewards, [{} for _ in rewards])
