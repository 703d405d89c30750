"""A reward function of the user's own, named in the config as
`task.reward = "examples/word_problems/reward.py:score"` (README, "Rewards of your own").

1 for a final `\\boxed{...}` answer that math-verify finds equal to the reference (so
`\\frac{6}{8}`, `0.75` and `\\frac{3}{4}` all score for `\\frac{3}{4}`), plus a 0.1 format
bonus for ending with a boxed answer at all. The two parts are logged as
`rollout/reward/correct` and `rollout/reward/format`.

math-verify's own timeouts are off (`None`): they use a signal, which works only in a main
thread, and the actor's reward pool already ends a call at `task.reward_timeout_s`.
"""

from math_verify import LatexExtractionConfig, parse, verify


def score(completion, answer):
    boxed = completion.rstrip().endswith("}") and "\\boxed{" in completion
    gold = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    found = parse(completion, extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    correct = float(bool(found) and verify(gold, found, timeout_seconds=None))
    return {"reward": correct + 0.1 * boxed, "correct": correct, "format": float(boxed)}
