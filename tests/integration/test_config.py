"""The integration half of `tests/unit/test_config.py`: what needs a subprocess or Ray."""

import subprocess
import sys

from tests.helpers import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "async_rl.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_dry_run_prints_resolved_config():
    out = _cli("train", "--dry-run", "algo.num_minibatches=4")
    assert out.returncode == 0, out.stderr
    assert "num_minibatches = 4" in out.stdout


def test_cli_never_imports_torch_for_help_or_dry_run():
    # What makes --help and --dry-run answer in a second: no torch, torchtitan or ray import.
    code = (
        "import sys; from async_rl.cli import main; main(['train', '--dry-run']); "
        "main(['eval', '--checkpoint', 'x', '--dry-run']); "
        "assert not {'torch', 'ray', 'torchtitan'} & set(sys.modules), 'heavy import'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_cli_config_error_exits_2_and_names_key():
    out = _cli("train", "--dry-run", "algo.tis_cap=0")
    assert out.returncode == 2
    assert "algo.tis_cap" in out.stderr


def test_cli_help_lists_config_keys():
    out = _cli("train", "--help")
    assert out.returncode == 0
    assert "algo.routing_replay" in out.stdout and "Routing Replay" in out.stdout
