"""The training loop: end to end on a tiny store, exact resume after SIGKILL and Ctrl-C, NaN stop,
config and outputs."""

from __future__ import annotations

import dataclasses
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
from alexnet.config import PROFILES, apply_overrides, get_profile, known_problems
from alexnet.model import build_model
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


@pytest.mark.slow
def test_workers_and_decoding_where_the_batch_is_used_change_nothing(reference_run, tiny_store,
                                                                     tmp_path):  # fmt: skip
    """The reference run (no workers, the CPU path) again with a worker process that lives
    across both epochs and validations, and the records decoded where the batch is used
    (--decode gpu: on a CPU, the GPU path's code with libjpeg-turbo): the same weights, bit for
    bit (the same pixels, the same float32 arithmetic, and the dropout masks untouched by the
    workers), and config.json records the decoding."""
    out = tmp_path / "gpu-path"
    args = [a for a in ARGS]
    args[args.index("--workers") + 1] = "1"
    cmd = ["train", "--data", str(tiny_store), "--out", str(out), *args, "--decode", "gpu"]
    assert cli_main(cmd) == 0
    assert json.loads((out / "config.json").read_text())["derived"]["decode"] == "gpu"
    ref, got = weights(reference_run), weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


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
    assert tensorboard_steps(out, "val/top1_error") == [4, 8]  # the steps where it ran


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
        return output * float("nan") if calls["n"] == 3 else output

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
    err = capsys.readouterr().err
    assert "--val-limit 0: run.val_limit=0 must be an integer >= 1" in err, err
    assert not (tmp_path / "r3").exists()


def test_known_problems_are_warned_and_recorded(tiny_store, tmp_path, capsys):
    """Issue 10: the measured pitfall (inverted dropout with the paper's init stays at chance)
    is a warning when training and a record in config.json; no shipped profile has it (the
    torchvision layout keeps PyTorch's default init, as torchvision does)."""
    assert [name for name in PROFILES if known_problems(get_profile(name))] == []
    out = tmp_path / "inv"
    argv = ["train", "--data", str(tiny_store), "--out", str(out), "--profile", "paper",
            "--set", "model.dropout_style=inverted", "--batch-size", "8", "--max-steps", "1",
            "--no-fast", "--workers", "0", "--val-limit", "4"]  # fmt: skip
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: inverted dropout with the paper's fc init" in err
    recorded = json.loads((out / "config.json").read_text())["derived"]["known_problems"]
    assert len(recorded) == 1 and "docs/recipes.md" in recorded[0]
    scaled = apply_overrides(get_profile("paper"), ["data.input_scale=0.00392156863"])
    assert ["[0, 1]" in p for p in known_problems(scaled)] == [True]
    assert known_problems(apply_overrides(get_profile("paper"), ["data.input_scale=0.5"])) == []


def test_a_log_file_shows_the_run_and_its_first_step_at_once(
    tiny_store, tmp_path, capsys, monkeypatch
):
    """Issue 20: `alexnet train > log.txt` (stdout not a terminal, as under capsys) printed no
    header, and its first step's line only after --log-every steps; the steps before
    --max-steps stopped it were never logged, and it said "done"."""
    # Not the checkpoint: writing 60M parameters and their momentum took 4 of this test's 5 s.
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: None)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_store), "--out", str(out), "--profile", "paper",
            "--batch-size", "8", "--max-steps", "3", "--log-every", "5", "--no-fast",
            "--workers", "0", "--val-limit", "4"]  # fmt: skip
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # the tiny store: 3 classes, 36 train images (4 steps of 8), 12 val of which 4 validate
    for what in ("profile paper", f"store {tiny_store}", "3 classes", "36 train images",
                 "4 val", "batch 8", "4 steps per epoch", "on cpu", f"run {out}"):  # fmt: skip
        assert what in lines[0], (what, lines[0])
    assert lines[1].startswith("epoch 0.250 step 1 loss "), lines
    assert lines[2].startswith("epoch 0.750 step 3 loss "), lines
    assert lines[3].startswith("stopped at step 3 (--max-steps)"), lines
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 3]
    # Each record says how many steps its mean covers (step 1 alone, then 2-3): issue 21.
    assert [r["steps"] for r in recs if r["kind"] == "step"] == [1, 2]


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


@pytest.fixture(scope="module")
def two_class_store(tmp_path_factory):
    """Another tiny store: two classes (the fine-tuning target, other classes)."""
    from alexnet.data import prepare_store
    from conftest import make_image_tree

    root = tmp_path_factory.mktemp("two")
    make_image_tree(root / "src", classes=("square", "stripes"), per_class=12, seed=5)
    prepare_store(root / "src", root / "store", kind="folder", workers=1, progress=False)
    return root / "store"


def _finetune(store, out, init, sets=(), **run_kw):
    profile = apply_overrides(get_profile("paper"), ["train.batch_size=8", *sets])
    run = RunConfig(data=str(store), out=str(out), seed=1, fast=False, workers=0, log_every=1,
                    init=str(init), **run_kw)  # fmt: skip
    return Trainer(profile, run)


@pytest.mark.slow
def test_init_loads_matching_tensors_bit_for_bit_and_reinitialises_fc8(
    reference_run, two_class_store, tmp_path
):
    """train --init (issue 13): every tensor of the same name and shape comes from the weights
    file exactly; fc8 (3 classes there, 2 here) keeps the paper's N(0, 0.01) init, biases 0."""
    source = load_file(reference_run / "model.safetensors")
    trainer = _finetune(two_class_store, tmp_path / "ft", reference_run)
    state = trainer.model.state_dict()
    for key, value in state.items():
        if key.startswith("fc8."):
            continue
        assert torch.equal(value, source[key]), key
    w, b = state["fc8.weight"], state["fc8.bias"]
    assert w.shape == (2, 4096) and abs(w.double().std().item() / 0.01 - 1) < 0.03
    assert torch.all(b == 0)
    rep = trainer.init_report
    assert set(rep["not_loaded"]) == {"fc8.weight", "fc8.bias"} and not rep["classes_match"]
    assert "3 classes there, 2 here" in rep["not_loaded"]["fc8.weight"]
    assert len(rep["loaded"]) == len(state) - 2 and rep["stats"] == "store"
    # The run records it, and the loaded layers' groups are marked.
    trainer.fit_config = trainer.resolved_config()
    assert trainer.fit_config["derived"]["init"]["loaded"] == rep["loaded"]
    names = {g["name"] for g in trainer.optimizer.param_groups}
    assert {"init:weights", "init:biases", "init:conv1.weight", "weights", "biases"} <= names


@pytest.mark.slow
def test_frozen_layers_do_not_change_and_new_ones_learn(reference_run, two_class_store, tmp_path):
    source = load_file(reference_run / "model.safetensors")
    trainer = _finetune(two_class_store, tmp_path / "fz", reference_run,
                        sets=["train.freeze_until=1", "train.lr=0.01"], max_steps=3)  # fmt: skip
    before_fc8 = trainer.model.state_dict()["fc8.weight"].clone()
    trainer.fit()
    state = trainer.model.state_dict()
    for key in trainer.init_report["loaded"]:
        assert torch.equal(state[key], source[key]), key
    assert not torch.equal(state["fc8.weight"], before_fc8)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["init:weights"] == 0.0 and lrs["weights"] == pytest.approx(0.01)


@pytest.mark.slow
def test_init_lr_mult_and_layout_mismatch(reference_run, tmp_path, capsys):
    from alexnet.optim import param_groups

    net = build_model("paper", num_classes=3)
    train = dataclasses.replace(get_profile("paper").train, init_lr_mult=0.1)
    groups = {g["name"]: g for g in param_groups(net, train, loaded={"conv2.weight"})}
    assert groups["init:weights"]["lr"] == pytest.approx(0.001)
    assert groups["init:weights"]["params"] == [net.conv2.weight]
    assert groups["weights"]["lr"] == pytest.approx(0.01)
    # torchvision's layout cannot start from two-tower weights: one line, exit 2.
    rc = cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--profile",
                   "torchvision", "--init", str(reference_run)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1


def test_a_run_that_ends_at_chance_says_so_at_the_end(tiny_store, tmp_path, capsys):
    """lr 0: the net cannot leave chance (66.7% on 3 balanced classes); the finished run's
    result and stderr say so, with what to try; a run with --init is pointed to the finetune
    profile."""
    profile = apply_overrides(get_profile("paper"), ["train.epochs=1", "train.batch_size=8",
                                                     "train.lr=0"])  # fmt: skip
    run = RunConfig(data=str(tiny_store), out=str(tmp_path / "r"), fast=False, workers=0)
    trainer = Trainer(profile, run)
    result = trainer.fit()
    err = result["last_epoch"]["val_top1_error"]
    assert err >= 1 - 1 / 3 - 0.05  # at chance, as lr 0 must leave it
    assert "ended at chance" in result["warning"] and "--lr" in result["warning"]
    assert "warning: the run ended at chance" in capsys.readouterr().err
    trainer.run = dataclasses.replace(run, init="runs/demo")  # as if fine-tuned
    assert "--profile finetune" in trainer.ended_at_chance()
    trainer.history[-1] = {**trainer.history[-1], "val_top1_error": 0.5}  # below chance - 5%
    assert trainer.ended_at_chance() is None
