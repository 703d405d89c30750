"""The run's control plane, on top of everything: `async-rl train` and what keeps it going.

    driver      the driver's loop and the metrics tail (`async-rl train`)
    workers     the Ray actors' bodies (buffer, learner ranks, actors)
    cluster     Ray start-up and placement
    supervisor  one record per process: start, ping, restart
    fleet       the fleet size (`async-rl scale`, the autoscaler)
    autopilot   the staleness autopilot (buffer.autopilot)
    evaluation  held-out accuracy through the embedded engine

Only `async_rl.run`, `async_rl.tools` and `async_rl.cli` may import `actors` and `learner`
together with the core; nothing below imports them.
"""
