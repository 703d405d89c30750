"""The integration half of `tests/unit/test_buffer_service.py`: what needs a subprocess or Ray."""

import os
import signal
import subprocess
import sys

import pytest
import zmq

from tests.helpers import ROOT, BufferClient, G, make_group, run_config, wait_ingested


def test_sigkill_loses_no_accepted_group_and_serves_none_twice(tmp_path):
    polars = pytest.importorskip("polars")
    cfg = run_config(tmp_path)

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "async_rl.buffer.service", str(cfg.run_dir)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    proc = start()
    ctx = zmq.Context()
    try:
        client = BufferClient(cfg.run_dir, ctx=ctx)
        for i in range(10):
            client.push(make_group(f"g{i}", 0, seed=i))
        wait_ingested(client, 10)
        first, _ = client.sample(0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert list((cfg.run_dir / "buffer").glob("*.open"))  # killed mid-segment
        proc = start()
        # the restarted service binds the same ports: the old client reconnects on its own
        again, info = client.sample(0, wait_s=5)
        assert again.equals(first)
        served = set(first.column("group_id").to_pylist())
        for v in range(1, 5):
            table, _ = client.sample(v, wait_s=5)
            ids = set(table.column("group_id").to_pylist())
            assert not ids & served
            served |= ids
        assert served == {f"g{i}" for i in range(10)}
        assert client.sample(5, wait_s=0.1)[0] is None
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read().decode()
    segments = sorted((cfg.run_dir / "buffer").glob("segment-*.arrow"))
    assert not list((cfg.run_dir / "buffer").glob("*.open"))
    frame = polars.concat([polars.read_ipc(f) for f in segments])
    assert frame.height == 10 * G and frame["group_id"].n_unique() == 10
