"""Rewards by name (`async_rl.rewards`) and the actor's reward pool (`actors.scoring`):
resolution and its errors at start-up, what a function may return, and scoring beside
generation with failures, timeouts and the order of groups kept."""

import textwrap
import threading

import pytest

from actors.scoring import Scorer
from async_rl.config import ConfigError, load_config
from async_rl.rewards import GroupScores, load_reward, score_group, score_named
from async_rl.tasks import Problem
from tests.helpers import ManualClock

PROBLEM = Problem("file-row-3", "What is 1/2 + 1/4?", "3/4")


def _file(tmp_path, body: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


REWARDS = """
    import math

    def plain(prompt, completion, answer, metadata):
        return float(completion.strip() == answer)

    def with_format(completion, answer):
        return {"reward": float(answer in completion), "format": float(completion.endswith("."))}

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        score = float(solution_str == ground_truth)
        return {"score": score, "source_is_file": data_source == "file"}

    def group(prompts, completions, answers, metadatas):
        best = max(len(c) for c in completions)
        return [float(len(c) == best) for c in completions]

    def everything(**kwargs):
        return float(kwargs["metadata"]["prompt_id"] == "file-row-3")

    def flaky(completion):
        if completion == "boom":
            raise ZeroDivisionError("the verifier divided by zero")
        if completion == "nan":
            return math.nan
        if completion == "text":
            return "1.0"
        return 1.0

    def short(completions):
        return [1.0]

    def needs_more(completion, tokenizer):
        return 0.0

    def blind(prompt, answer):
        return 0.0

    NOT_A_FUNCTION = 3
"""


# ------------------------------------------------------------------------- resolution
def test_a_reward_by_file_or_module_name_resolves_and_is_checked(tmp_path, monkeypatch):
    path = _file(tmp_path, REWARDS)
    assert not load_reward(f"{path}:plain").batched
    assert load_reward(f"{path}:group").batched
    assert load_reward(f"{path}:compute_score").params == (
        "data_source",
        "solution_str",
        "ground_truth",
        "extra_info",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:with_format").params == ("completion", "answer")
    assert set(load_reward("my_rewards:everything").params) == {
        "prompt",
        "completion",
        "answer",
        "metadata",
    }


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "neither a built-in"),
        ("no/such/file.py:score", "no such file"),
        ("no_such_module_anywhere:score", "cannot import 'no_such_module_anywhere'"),
        ("{file}:missing", "has no attribute 'missing'"),
        ("{file}:NOT_A_FUNCTION", "not callable"),
        ("{file}:needs_more", "needs tokenizer"),
        ("{file}:blind", "neither `completion`"),
        ("{broken}:score", "failed to import: SyntaxError"),
    ],
)
def test_a_bad_reward_stops_the_run_at_start_naming_task_reward(tmp_path, name, message):
    file, broken = _file(tmp_path, REWARDS), _file(tmp_path, "def score(:\n", "broken.py")
    name = name.format(file=file, broken=broken)
    with pytest.raises(ConfigError, match="task.reward") as e:
        load_config(None, [f"task.reward={name}"])
    assert message in str(e.value)


def test_a_file_reward_is_made_absolute_and_builtins_need_threads(tmp_path, monkeypatch):
    _file(tmp_path, REWARDS)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["task.reward=my_rewards.py:plain"])
    assert cfg.task.reward == f"{tmp_path / 'my_rewards.py'}:plain"  # every process finds it
    with pytest.raises(ConfigError, match="task.reward_pool.*async_rl.rewards:exact_match"):
        load_config(None, ["task.reward_pool=process"])
    named = load_config(
        None, ["task.reward=async_rl.rewards:exact_match", "task.reward_pool=process"]
    )
    assert named.task.reward_pool == "process"


# ------------------------------------------------------------------------- what it returns
def _score(path, fn, completions, answer="3/4"):
    return score_group(
        load_reward(f"{path}:{fn}"), "p", completions, answer, {"prompt_id": "x"}, "file"
    )


def test_numbers_dicts_verl_and_groups(tmp_path):
    path = _file(tmp_path, REWARDS)
    assert _score(path, "plain", ["3/4", "1/2"]).rewards == [1.0, 0.0]
    scores = _score(path, "with_format", ["it is 3/4.", "3/4"])
    assert scores.rewards == [1.0, 1.0] and scores.extras == [{"format": 1.0}, {"format": 0.0}]
    verl = _score(path, "compute_score", ["3/4"])  # verl's own signature and 'score' key
    assert verl.rewards == [1.0] and verl.extras == [{"source_is_file": 1.0}]
    assert _score(path, "group", ["a", "abc", "ab"]).rewards == [0.0, 1.0, 0.0]
    assert score_named(f"{path}:everything", "file", PROBLEM, ["x"]).rewards == [1.0]
    assert not verl.errors


def test_a_failing_reward_scores_zero_and_says_why(tmp_path):
    path = _file(tmp_path, REWARDS)
    scores = _score(path, "flaky", ["ok", "boom", "nan", "text", "ok"])
    assert scores.rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert len(scores.errors) == scores.failed == 3
    assert "completion 1" in scores.errors[0] and "ZeroDivisionError" in scores.errors[0]
    assert "Traceback" in scores.errors[0]  # the log gets the first one whole
    assert "not finite" in scores.errors[1] and "not a number" in scores.errors[2]
    short = _score(path, "short", ["a", "b"])  # a batched reward with too few results
    assert short.rewards == [0.0, 0.0] and "1 results for 2" in short.errors[0]
    assert short.failed == 2  # a whole group's call failed: both completions count


# ------------------------------------------------------------------------- the pool
def _scores(*rewards) -> GroupScores:
    return GroupScores(list(rewards), [{} for _ in rewards])


def test_groups_come_back_in_submit_order_and_a_hung_reward_times_out():
    """Threads: the second group's reward finishes first but waits behind the first; a call
    that never returns is timed out on the scorer's clock (scored 0, an error), its pool
    replaced, and groups submitted after it are still scored."""
    release, hang = threading.Event(), threading.Event()

    def score(problem, completions, first):
        if completions == ["slow"]:
            release.wait(30)
        if completions == ["hang"]:
            hang.wait(60)  # until the test ends
        return _scores(*[float(len(c)) for c in completions])

    clock = ManualClock()
    scorer = Scorer(score, per_completion=True, workers=2, pool="thread", timeout_s=5, clock=clock)
    try:
        scorer.submit("a", PROBLEM, ["slow", "x"])
        scorer.submit("b", PROBLEM, ["yy"])
        assert scorer.ready(wait_s=0.2) == []  # b is done, a is not: nothing yet
        release.set()
        (a, b) = scorer.ready(wait_s=10) + scorer.ready(wait_s=10)
        assert [a[0], b[0]] == ["a", "b"] and a[1].rewards == [4.0, 1.0]

        scorer.submit("c", PROBLEM, ["hang", "zz"])
        assert scorer.ready(wait_s=0.3) == []  # running, within its time
        clock.now = 5.5
        ((key, c),) = scorer.ready(wait_s=10)
        assert key == "c" and c.rewards == [0.0, 2.0]
        assert "completion 0: timed out after 5 s" in c.errors[0]
        assert scorer.errors == 1 and scorer.restarts == 1
        scorer.submit("d", PROBLEM, ["www"])
        assert scorer.ready(wait_s=10)[0][1].rewards == [3.0]
    finally:
        hang.set()
        scorer.close()


def test_a_pools_threads_load_a_file_reward_once_and_whole(tmp_path):
    """The first groups of a run reach a thread pool together: every thread must find the
    function, none a half-imported module."""
    path = _file(tmp_path, "import time\ntime.sleep(0.2)\n" + textwrap.dedent(REWARDS), "slow.py")
    results = []

    def call():
        results.append(score_named(f"{path}:plain", "file", PROBLEM, ["3/4"]))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.rewards for r in results] == [[1.0]] * 8 and not any(r.errors for r in results)
