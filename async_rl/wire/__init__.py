"""The wire: what crosses a process boundary, and how.

    messages    every message between processes, typed, with its encode/decode (no pickle)
    transport   ZeroMQ sockets and the run's socket addresses
    security    CURVE keys and the loopback rule for binds
    clients     the actors' `RolloutSink` and the learner's `BatchSource`, over ZeroMQ

It imports nothing of the buffer: the buffer service answers these messages.
"""
