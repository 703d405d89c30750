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


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # the process ended or is not ours to read
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append(cols[1])
    return found


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(children)
        frontier.extend(children)
    return found


def session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux /proc")
def test_the_local_ray_instance_listens_on_loopback_only(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, sys, time, ray\n"
        "from async_rl.config import load_config\n"
        "from async_rl.run.cluster import init_ray\n"
        "init_ray(load_config(None, []), None)\n"
        "@ray.remote\n"
        "class Probe:\n"
        "    def pid(self): return os.getpid()\n"
        "p = Probe.remote(); ray.get(p.pid.remote())\n"
        "print('ready', flush=True); sys.stdin.readline(); ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        # Ray's GCS, raylet, workers and the driver: the processes of the new session
        pids = {p for p in descendants(1) if session(p) == proc.pid} | descendants(proc.pid)
        addresses = listening_addresses(pids)
        assert len(addresses) >= 3  # GCS, raylet, a worker at least
        exposed = [a for a in addresses if a.split(":")[0] not in LOOPBACK_HEX]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
