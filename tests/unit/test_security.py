"""Transport security: CURVE keys, refusing unauthenticated non-loopback binds and bad clients."""

import os
import stat
import threading

import pytest
import zmq

from async_rl.buffer.service import BufferService
from async_rl.cli import main
from async_rl.config import ConfigError, load_config
from async_rl.wire.messages import Counters, Stats
from async_rl.wire.security import create_keys
from tests.helpers import BufferClient, run_config


def test_keys_command_writes_private_secret_files(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k")]) == 0
    assert "run.curve_keys" in capsys.readouterr().out
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((tmp_path / "k" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert main(["keys", str(tmp_path / "k")]) == 2  # never overwrites keys


def test_non_loopback_bind_needs_keys_with_private_secrets(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.bind_host=0.0.0.0"])
    assert e.value.key == "run.bind_host" and "async-rl keys" in str(e.value)
    keys = create_keys(tmp_path / "k")
    load_config(None, ["run.bind_host=0.0.0.0", f"run.curve_keys={keys}"])
    os.chmod(keys / "client.key_secret", 0o644)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.bind_host=0.0.0.0", f"run.curve_keys={keys}"])
    assert e.value.key == "run.curve_keys" and "chmod 600" in str(e.value)


def test_the_unauthenticated_collective_weight_path_stays_on_loopback_unless_trusted(tmp_path):
    keys = create_keys(tmp_path / "k")
    remote = ["run.bind_host=0.0.0.0", f"run.curve_keys={keys}", "weights.store=collective"]
    with pytest.raises(ConfigError) as e:
        load_config(None, remote)
    assert e.value.key == "weights.collective_trusted_network" and "no authentication" in str(
        e.value
    )
    load_config(None, [*remote, "weights.collective_trusted_network=true"])
    load_config(None, ["weights.store=collective"])  # loopback: fine


def test_only_clients_with_the_run_key_get_in_and_refusals_are_counted(tmp_path):
    from async_rl.wire.security import Curve

    keys = create_keys(tmp_path / "keys")
    cfg = run_config(tmp_path, f"run.curve_keys={keys}")
    svc = BufferService(cfg, cfg.run_dir, ctx=zmq.Context())
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        good = BufferClient(cfg.run_dir, ctx=zmq.Context(), curve=Curve(keys))
        assert good.stats()["buffer/auth_denied"] == 0
        intruder_keys = create_keys(tmp_path / "other")
        intruder = Curve(intruder_keys)
        intruder.server_public = Curve(keys).server_public  # knows the server, not the client key
        bad = BufferClient(cfg.run_dir, ctx=zmq.Context(), curve=intruder)
        with pytest.raises(TimeoutError):
            bad.ask(Stats(), Counters, timeout_s=1.0)
        plain = BufferClient(cfg.run_dir, ctx=zmq.Context())
        with pytest.raises(TimeoutError):
            plain.ask(Stats(), Counters, timeout_s=1.0)
        assert good.stats()["buffer/auth_denied"] >= 1
        for c in (good, bad, plain):
            c.close()
    finally:
        svc.stop()
        thread.join(10)
