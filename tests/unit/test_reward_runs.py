"""A user's reward in a run: a training run scored by a function from a file, whose failures
are counted and whose extra numbers become metrics; a process pool whose hung verifier is
killed; `async-rl train` refusing a bad reward before anything starts."""

import logging

from tests.helpers import pipeline_config, stored_groups, user_reward_file


def test_a_run_trains_with_a_reward_from_a_file(tmp_path, cold_start, train_in_threads, caplog):
    """Rewards, extras (`rollout/reward/short`) and failures (`rollout/reward_errors`, scored 0,
    the first traceback logged) of a function the package has never heard of, by name."""
    path = user_reward_file(tmp_path)
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
