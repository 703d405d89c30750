"""The entry points on top of everything: the CLI, the Ray driver, sweeps and plots.

Only this package may import `actors` and `learner` together with the core (`async_rl`).
"""
