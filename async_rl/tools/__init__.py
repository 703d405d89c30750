"""Offline tools over runs and configs: `async-rl plan`, `plot`, `diagnose`, `sweep`, `replay`.

They sit beside the run (`async_rl.run`), on top of the core, the actors and the learner.
"""
