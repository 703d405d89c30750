"""`async-rl replay`: a recorded run's learner again, on its data, with its settings or others."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from async_rl.buffer.segments import SegmentStore
from async_rl.cli import main
from tests.helpers import ENV, ROOT, SPEC, json_lines, launch, make_group, run_config, wait_for


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "async_rl.cli", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(run_dir) -> dict[int, dict]:
    return {r["version"]: r for r in json_lines(run_dir / "metrics.jsonl")}


def _weights(run_dir, version: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "weights" / f"v{version:06d}" / "model.safetensors")


LEARNER = ("learner/loss", "learner/grad_norm", "learner/clip_frac", "learner/train_infer_kl")


@pytest.mark.slow
def test_a_replay_with_the_recorded_settings_is_the_recorded_learner_bit_for_bit(
    tmp_path, cold_start
):
    """A real `async-rl train` (Ray, an actor, the buffer), then its replay: every learner
    metric, the held-out accuracy and the final weights are equal; a replay with another
    learning rate starts from the same loss and then departs; plot reads both."""
    steps = 10
    common = [
        f"run.output_dir={tmp_path}",
        'task.ops=["+"]',
        "task.max_digits=1",
        "task.heldout_size=20",
        "actor.max_new_tokens=4",
        "actor.quantization=fp32",
        "algo.group_size=4",
        "algo.prompts_per_minibatch=2",
        "learner.lr=1e-3",
        "logging.progress=false",
    ]
    recorded = tmp_path / "rec"
    log = tmp_path / "rec.log"
    proc = launch(
        log,
        *common,
        "run.name=rec",
        f"run.init_checkpoint={cold_start}",
        f"run.num_steps={steps}",
        "run.eval_every=5",
        "learner.checkpoint_every=4",
    )
    wait_for(lambda: proc.poll() is not None, 300)
    assert proc.returncode == 0, log.read_text()[-3000:]

    out = _cli("replay", str(recorded), "logging.progress=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the data stays the recorded policy's" in out.stdout
    replayed = tmp_path / "rec-replay"
    a, b = _rows(recorded), _rows(replayed)
    assert sorted(a) == sorted(b) == list(range(steps + 1))
    for v in range(1, steps + 1):
        for key in LEARNER:
            assert a[v][key] == b[v][key], (v, key)
    assert any(a[v]["learner/loss"] != 0 for v in a if v), "advantages all 0: nothing checked"
    assert [a[v].get("eval/accuracy") for v in a] == [b[v].get("eval/accuracy") for v in b]
    wa, wb = _weights(recorded, steps), _weights(replayed, steps)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    marker = json.loads((replayed / "replay.json").read_text())
    assert marker["replay_of"] == str(recorded.resolve())
    assert marker["overrides"] == ["logging.progress=false"]

    out = _cli("replay", str(recorded), "learner.lr=1e-2", "run.name=lr", "run.eval_every=0")
    assert out.returncode == 0, out.stderr[-3000:]
    c = _rows(tmp_path / "lr")
    assert c[1]["learner/loss"] == a[1]["learner/loss"]  # same weights, same first batch
    assert any(c[v]["learner/loss"] != a[v]["learner/loss"] for v in range(2, steps + 1))
    wc = _weights(tmp_path / "lr", steps)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # plot's variants: the recorded run's, and its replays by the settings they changed
    variants = {
        d: json.loads((d / "variant.json").read_text())["variant"]
        for d in (replayed, tmp_path / "lr")
    }
    assert variants == {replayed: "rec replay", tmp_path / "lr": "rec replay learner.lr=1e-2"}

    out = _cli("plot", str(recorded), str(replayed), "--out", str(tmp_path / "fig.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "fig.png").stat().st_size > 0
    out = _cli("diagnose", str(replayed), "--versions", "8", "--staleness", "0", "--groups", "2")
    assert out.returncode == 0 and "| 8 | 0 | r3 |" in out.stdout, out.stderr[-3000:]


def _recorded_run(tmp_path, routing: bool = True):
    """A run directory as `train` leaves it: its config and a buffer whose learner was served
    versions 0 and 1 (two groups each)."""
    cfg = run_config(tmp_path, f"run.init_checkpoint={tmp_path / 'absent'}", "run.num_steps=2")
    store = SegmentStore(
        cfg.run_dir / "buffer", SPEC, group_size=4, global_batch_groups=2, max_staleness=9
    )
    store.append([make_group(f"g{i}", 0, seed=i, routing=routing) for i in range(4)])
    assert store.sample(0) is not None and store.sample(1) is not None
    store.close()
    return cfg.run_dir


def _refused(capsys, *args: str) -> str:
    assert main(["replay", *args]) == 2
    return capsys.readouterr().err


def test_a_replay_refuses_what_the_recorded_data_cannot_serve(tmp_path, capsys):
    run = _recorded_run(tmp_path, routing=False)
    before = {p.name: p.read_bytes() for p in (run / "buffer").iterdir()}
    err = _refused(capsys, str(run), "algo.routing_replay=r3")
    assert "algo.routing_replay" in err and str(run) in err and "no routing trace" in err
    err = _refused(capsys, str(run), "algo.group_size=8")
    assert "algo.group_size" in err and str(run) in err
    err = _refused(capsys, str(run), "actor.temperature=0.5")
    assert "actor.temperature" in err and "recorded data" in err
    err = _refused(capsys, str(run), "algo.prompts_per_minibatch=3")
    assert "algo.prompts_per_minibatch" in err and "global batches of 2" in err
    err = _refused(capsys, str(run), "run.num_steps=3")
    assert "run.num_steps" in err and "versions 0..1" in err
    err = _refused(capsys, str(run))  # the data serves, the starting checkpoint is gone
    assert "starting checkpoint" in err and "absent" in err
    assert {p.name: p.read_bytes() for p in (run / "buffer").iterdir()} == before  # untouched
    assert not (tmp_path / "r-replay").exists()

    for segment in (run / "buffer").glob("segment-*"):
        segment.unlink()
    err = _refused(capsys, str(run))
    assert "lacks the segments of 4 group(s)" in err and str(run) in err
    shutil.rmtree(run / "buffer")
    err = _refused(capsys, str(run))
    assert "no recorded buffer" in err
    err = _refused(capsys, str(tmp_path / "nowhere"))
    assert "not a run directory" in err
