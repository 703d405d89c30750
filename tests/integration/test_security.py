"""The integration half of `tests/unit/test_security.py`: what needs a subprocess or Ray."""

import os

import pytest

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
