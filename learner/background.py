"""`Background`: the learner's jobs off the training path (fetching the next batch, publishing a
version, writing a checkpoint), one at a time per thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future


class Background:
    """Jobs run one at a time on a thread of their own, at most one in flight.

    `submit` first waits for the job before it; `wait` returns the job's result. An error of a
    job is raised in the learner's thread by the next `submit` or `wait`. The threads are
    daemons: a process that exits (Ctrl-C, SIGTERM) never waits for a fetch asking a buffer
    that is gone. What they write is safe to cut short: checkpoints and weight versions
    appear whole (renamed, manifest last) or not at all.
    """

    def __init__(self, name: str):
        self.name = name
        self.pending: Future | None = None
        self.thread: threading.Thread | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        future: Future = Future()

        def run():
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # raised in the learner's thread by `wait`
                future.set_exception(e)

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        self.pending = future

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        finally:  # the job is done: its thread ends now, so none is left to a normal exit
            self.thread.join()

    def close(self) -> None:
        self.wait()
