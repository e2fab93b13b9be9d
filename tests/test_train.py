"""The training loop: end to end on a tiny store, exact resume after SIGKILL and Ctrl-C, NaN stop,
config and outputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alexnet import checkpoint
from alexnet.commands import main as cli_main
from alexnet.config import apply_overrides, get_profile
from alexnet.train import RunConfig, Trainer
from conftest import TRAIN_ARGS as ARGS
from conftest import tensorboard_steps


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "model.safetensors").items() if "preprocess" not in k}


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines if r["kind"] == "step"), default=0)


@pytest.mark.slow
def test_end_to_end_outputs(reference_run, tiny_store):
    run = reference_run
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "state.pt", "curves.png"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard event file"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["profile"]["train"]["batch_size"] == 8
    assert cfg["profile"]["train"]["lr"] == 0.001
    assert cfg["run"]["seed"] == 3
    assert any("train.lr" in d for d in cfg["derived"]["deviations_from_paper"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert 0 <= r["val_top1_error"] <= 1 and 0 <= r["val_top5_error"] <= r["val_top1_error"]
        assert r["val_images"] == 6
    assert max(r["step"] for r in recs if r["kind"] == "step") == 8
    # The weights file names its classes and profile, and loads for evaluation.
    _, meta = checkpoint.load_weights(run / "model.safetensors")
    assert meta["profile"] == "paper"
    assert json.loads(meta["classes"]) == ["circle", "square", "stripes"]


def _spawn(tiny_store, out):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "alexnet", "train", "--data", str(tiny_store), "--out", str(out)]
    return subprocess.Popen(
        cmd + ARGS + ["--checkpoint-every", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(proc, out, step, timeout=240):
    t0 = time.time()
    while steps_logged(out) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(reference_run, tiny_store, tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(tiny_store, out)
    kill_at = int(os.environ.get("KILL_AT", 0)) or random.Random().randint(1, 6)  # any step
    _wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli_main(["train", "--resume", str(out)]) == 0
    ref, got = weights(reference_run), weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after a kill at step {kill_at}"
    # TensorBoard shows each step once: the events of the steps run again were purged (issue 11),
    # whether the kill came before the first checkpoint (the run started over) or after one.
    assert tensorboard_steps(out) == list(range(1, 9)), f"a kill at step {kill_at}"
    assert tensorboard_steps(out, "val/top1_error") == [1, 2]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_is_bit_exact(reference_run, tiny_store, tmp_path):
    out = tmp_path / "interrupted"
    proc = _spawn(tiny_store, out)
    _wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, text
    assert "--resume" in text
    state = checkpoint.load_state(out / "state.pt")
    assert 2 <= state["position"]["step"] < 8  # saved where it stopped, not at an epoch end
    assert cli_main(["train", "--resume", str(out)]) == 0
    ref, got = weights(reference_run), weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path):
    profile = apply_overrides(get_profile("paper"), ["train.batch_size=8", "train.epochs=1"])
    run = RunConfig(
        data=str(tiny_store), out=str(tmp_path / "nan"), fast=False, checkpoint_every=1,
        log_every=1, workers=0, val_limit=4,
    )  # fmt: skip
    trainer = Trainer(profile, run)
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        # The two-tower layers pass a list of per-device parts.
        return [o * float("nan") for o in output] if calls["n"] == 3 else output

    trainer.model.fc8.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match="at step 3"):
        trainer.fit()
    state = checkpoint.load_state(tmp_path / "nan" / "state.pt")
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_existing_run_folder_is_not_overwritten(reference_run, tiny_store, capsys):
    before = (reference_run / "state.pt").stat().st_mtime_ns
    rc = cli_main(["train", "--data", str(tiny_store), "--out", str(reference_run), *ARGS])
    assert rc == 2
    assert "--resume" in capsys.readouterr().err
    assert (reference_run / "state.pt").stat().st_mtime_ns == before


def test_bad_arguments_are_clear_errors(tiny_store, tmp_path, capsys):
    assert cli_main(["train", "--data", str(tiny_store), "--out", str(tmp_path / "r"),
                     "--set", "model.nope=1"]) == 2  # fmt: skip
    assert "valid:" in capsys.readouterr().err
    assert (
        cli_main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    )
    assert cli_main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert cli_main(["train", "--data", str(tiny_store), "--out", str(tmp_path / "r3"),
                     "--val-limit", "0"]) == 2  # fmt: skip
    assert "--val-limit must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


@pytest.mark.slow
def test_a_run_at_chance_keeps_its_lr_and_warns(tiny_store, tmp_path):
    """Issue 10: with lr 0 the net stays at chance; the plateau rule (patience 1 here) must not
    divide the lr, and from epoch 2 (chance_warning_epochs) every epoch record, the log and
    TensorBoard carry the warning."""
    out = tmp_path / "run"
    sets = ["train.lr=0", "train.plateau_patience=1", "train.chance_warning_epochs=2"]
    argv = ["train", "--data", str(tiny_store), "--out", str(out), "--profile", "paper",
            "--epochs", "3", "--batch-size", "8", "--no-fast", "--workers", "0"]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    assert cli_main(argv) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all(r["val_top1_error"] > 2 / 3 - 0.05 for r in epochs)  # at chance (3 classes)
    assert not any(r["lr_dropped"] for r in epochs) and epochs[-1]["lr_drops"] == []
    assert "warning" not in epochs[0]
    assert all("still at chance" in r["warning"] for r in epochs[1:])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val/at_chance")] == [1.0, 1.0, 1.0]
