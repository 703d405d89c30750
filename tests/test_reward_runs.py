"""A user's reward in a run: a training run scored by a function from a file, whose failures
are counted and whose extra numbers become metrics; a process pool whose hung verifier is
killed; `async-rl train` refusing a bad reward before anything starts."""

import functools
import logging
import subprocess
import sys
import textwrap
import time

import psutil

from actors.scoring import Scorer
from async_rl.rewards import score_named
from async_rl.tasks import Problem
from tests.helpers import ENV, ROOT, ManualClock, pipeline_config, stored_groups

REWARD = """
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


def _reward_file(tmp_path):
    path = tmp_path / "user_reward.py"
    path.write_text(textwrap.dedent(REWARD))
    return path


def test_a_run_trains_with_a_reward_from_a_file(tmp_path, cold_start, train_in_threads, caplog):
    """Rewards, extras (`rollout/reward/short`) and failures (`rollout/reward_errors`, scored 0,
    the first traceback logged) of a function the package has never heard of, by name."""
    path = _reward_file(tmp_path)
    cfg = pipeline_config(tmp_path, "user-reward", "run.num_steps=3", f"task.reward={path}:score")
    with caplog.at_level(logging.WARNING, logger="actors.scoring"):
        rows, _, actor = train_in_threads(cfg, cold_start)
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["rollout/reward/short"] <= 1.0 for r in rows)
    groups = stored_groups(cfg.run_dir) or []
    stored = [(row["reward"], row["reward_extras"]) for g in groups for row in g.to_pylist()]
    assert stored and all(dict(extras).keys() <= {"short"} for _, extras in stored)
    assert any(r > 0 for r, _ in stored)  # the cold start answers some sums right
    failed = sum(1 for r, extras in stored if not extras)  # a failed call returns no extras
    assert actor.stats.reward_errors >= failed > 0
    assert rows[-1]["rollout/reward_errors"] > 0
    warnings = [r for r in caplog.records if "a reward failed" in r.getMessage()]
    assert len(warnings) == 1 and "cannot read a leading 1" in warnings[0].getMessage()


def test_a_process_pool_kills_a_hung_verifier_and_goes_on(tmp_path):
    path = _reward_file(tmp_path)
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


def scorer_result(rewards):
    from async_rl.rewards import GroupScores

    return GroupScores(rewards, [{} for _ in rewards])


def test_async_rl_train_refuses_a_bad_reward_before_anything_starts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "async_rl.cli", "train", f"run.output_dir={tmp_path}",
         f"task.reward={tmp_path / 'absent.py'}:score"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"task.reward: {tmp_path / 'absent.py'}: no such file" in out.stderr
    assert not any(tmp_path.iterdir())  # no run directory, no cold start
