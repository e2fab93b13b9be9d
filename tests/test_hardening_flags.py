"""Issue 22, flags and paths: every value is checked before anything is written, every path a
command cannot write is one line at the start, a full disk while logging is one line, loader
workers leave SIGTERM/SIGINT to the trainer (which checkpoints), and fine-tuning flags that
would train nothing say so. Each test fails on the code before issue 22 (named in its
docstring)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import alexnet.data as data
from alexnet import checkpoint
from alexnet.checkpoint import stats_tensors, weights_metadata
from alexnet.commands import main as cli_main
from alexnet.config import check_profile, get_profile
from alexnet.model import build_model
from conftest import TRAIN_ARGS as ARGS
from conftest import one_line_error


def train_argv(store, out, *extra) -> list[str]:
    """The reference run's flags; its lr (a --set, which wins over --lr) left out for --lr."""
    args = ARGS[:-2] if "--lr" in extra else ARGS
    assert ARGS[-2:] == ["--set", "train.lr=0.001"]
    return ["train", "--data", str(store), "--out", str(out), *args, *extra]


def refused(capsys, argv: list[str], *names: str) -> str:
    """The command exits with status 2 and one error line naming each of `names`."""
    assert cli_main(argv) == 2
    return one_line_error(capsys.readouterr().err, *names)


# --- values checked before anything is written ---------------------------------------------


@pytest.mark.parametrize(
    "flags,names",
    [
        (["--lr", "1e308"], ["train.lr", "float32"]),
        # checked before the --init weights are even looked for
        (["--init", "no-such.safetensors", "--init-lr-mult", "1e308"], ["init_lr_mult"]),
    ],
)
def test_an_lr_beyond_float32_is_refused_before_anything_is_written_and_a_rerun_goes(
    tiny_store, tmp_path, capsys, flags, names
):
    """Before: config.json was written, the first step failed with a traceback ("value cannot
    be converted to type float without overflow"), and the corrected rerun was refused as
    "already holds a run"."""
    out = tmp_path / "run"
    refused(capsys, train_argv(tiny_store, out, *flags, "--max-steps", "1"), *names)
    assert not out.exists()
    assert cli_main(train_argv(tiny_store, out, "--max-steps", "0")) == 0  # the corrected run
    assert (out / "config.json").exists()


@pytest.mark.parametrize(
    "setting,names",
    [
        ("train.milestones=5", ["train.milestones", "[25,51,79]"]),
        ('train.milestones="abc"', ["train.milestones"]),
        ("train.milestones=[10,-1]", ["train.milestones", "-1"]),
        ("train.conv1_lr_schedule=5", ["train.conv1_lr_schedule"]),
        ("train.conv1_lr_schedule=[5]", ["train.conv1_lr_schedule", "(epoch, lr) pair"]),
        ("train.lighting_off_epoch=abc", ["train.lighting_off_epoch"]),
        # NaN turned PCA lighting off for the whole run (epoch < nan is never true)
        ("train.lighting_off_epoch=nan", ["train.lighting_off_epoch", "nan"]),
    ],
)
def test_schedule_values_are_checked_before_anything_is_written(
    tiny_store, tmp_path, capsys, setting, names
):
    """Before: tracebacks (TypeError, ValueError) after config.json was written, or (NaN) a run
    without PCA lighting and no word."""
    out = tmp_path / "run"
    refused(capsys, train_argv(tiny_store, out, "--set", setting, "--max-steps", "0"), *names)
    assert not out.exists()


def test_correct_schedules_still_pass():
    p = get_profile("cuda-convnet")
    assert check_profile(p) is p  # milestones, the conv1 schedule, lighting off at 67
    assert check_profile(get_profile("caffe")) is not None


def test_an_input_size_the_network_cannot_take_is_one_line_in_train_and_summary(
    tiny_store, tmp_path, capsys
):
    """Before: `train --set model.input_size=100` failed at the first step and `summary` in
    the forward pass, each with a traceback."""
    out = tmp_path / "run"
    argv = train_argv(tiny_store, out, "--set", "model.input_size=100", "--max-steps", "1")
    refused(capsys, argv, "model.input_size=100", "224 to 255")
    assert not out.exists()
    refused(capsys, ["summary", "--set", "model.input_size=100"], "model.input_size", "6x6")
    refused(capsys, ["summary", "--input", "100"], "--input 100")
    # An input size the net takes, with views of that size, is one it runs on.
    argv = train_argv(tiny_store, out, "--set", "model.input_size=230")
    refused(capsys, [*argv, "--max-steps", "0"], "data.crop_size 224", "model.input_size 230")
    argv += ["--set", "data.crop_size=230", "--max-steps", "0"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(["summary", "--input", "230", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == [3, 230, 230]
    assert cli_main(["summary", "--profile", "caffe"]) == 0  # 227


def test_the_input_sizes_said_to_fit_are_those_the_network_runs_on():
    """The range the check gives (config.pool5_side), at both ends, against the network."""
    from alexnet.config import pool5_side

    for pool in ("overlap", "nonoverlap"):
        cfg = dataclasses.replace(get_profile("paper").model, pool=pool)
        fits = [n for n in range(63, 400) if pool5_side(cfg, n) == 6]
        assert fits == list(range(fits[0], fits[-1] + 1)) and 224 in fits, (pool, fits)
        for size in (fits[0], fits[-1]):
            net = build_model("paper", num_classes=2, pool=pool, input_size=size).eval()
            with torch.no_grad():
                assert net(torch.zeros(1, 3, size, size)).shape == (1, 2), (pool, size)
        for size in (fits[0] - 1, fits[-1] + 1):
            with pytest.raises(ValueError, match="input_size"):
                build_model("paper", num_classes=2, pool=pool, input_size=size)


# --- evaluate and predict flags ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["evaluate", "w.safetensors", "--workers", "-2"], "--workers"),
        (["evaluate", "w.safetensors", "--batch-size", "0"], "--batch-size"),  # was: 128
        (["evaluate", "w.safetensors", "--limit", "0"], "--val-limit"),  # the old name
        (["predict", "w.safetensors", "img.jpg", "--topk", "-3"], "--topk"),
    ],
)
def test_evaluate_and_predict_refuse_bad_numbers_first(tmp_path, capsys, monkeypatch, argv, flag):
    """Before: a DataLoader traceback (--workers -2), 128 for --batch-size 0, a traceback for
    --topk -3; each only after the weights were loaded (here: a missing file, named instead)."""
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, flag)


# --- output paths --------------------------------------------------------------------------


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    return f


def _fake_run(tmp_path) -> Path:
    run = tmp_path / "fake-run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    return run


def _torchvision_state_dict(tmp_path) -> Path:
    """torchvision's AlexNet state_dict, in a few bytes (every tensor a view of one zero)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    path = tmp_path / "alexnet-tv.pth"
    torch.save({k: torch.zeros(1).expand(s) for k, s in shapes.items()}, path)
    return path


def _outputs(tiny_store, tmp_path, where: Path) -> list[tuple[list[str], str]]:
    """(argv, the flag named) of each command writing to `where`."""
    return [
        (train_argv(tiny_store, where / "run", "--max-steps", "0"), "--out"),
        (["prepare", str(tmp_path / "no-src"), str(where / "store"), "-q"], "OUT"),
        (["import-torchvision", str(_torchvision_state_dict(tmp_path)), str(where / "w")], "OUT"),
        (["report", str(_fake_run(tmp_path)), "--out", str(where / "r")], "--out"),
    ]


def test_an_output_under_a_file_is_one_line_before_any_work(tiny_store, tmp_path, a_file, capsys):
    """Before: NotADirectoryError tracebacks from mkdir (train, prepare, import-torchvision,
    report)."""
    for argv, flag in _outputs(tiny_store, tmp_path, a_file):
        refused(capsys, argv, flag, a_file, "is a file, not a folder")
    # A file where the run folder should be.
    refused(capsys, train_argv(tiny_store, a_file, "--max-steps", "0"), "--out", "is a file")
    refused(capsys, ["import-torchvision", "x.pth", str(a_file)], "OUT", "is a file")


def _read_only(folder: Path) -> list[str] | None:
    """A command prefix that runs with `folder` on a read-only filesystem (a read-only bind
    mount in user and mount namespaces of its own), or None where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    script = f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"'
    wrap = [unshare, "-rm", "sh", "-c", script, "sh"]
    probe = subprocess.run([*wrap, "touch", str(folder / "probe")], capture_output=True)
    if probe.returncode == 0 or b"Read-only" not in probe.stderr:
        return None
    return wrap


@pytest.mark.slow
def test_an_output_on_a_read_only_filesystem_is_one_line(tiny_store, tmp_path):
    """Before: OSError (EROFS) tracebacks from mkdir, after the work was done."""
    ro = tmp_path / "ro"
    ro.mkdir()
    wrap = _read_only(ro)
    if wrap is None:
        pytest.skip("no user and mount namespaces here to make a read-only filesystem")
    # The four commands at once (each is mostly Python's start-up: the suite's time).
    procs = [(subprocess.Popen([*wrap, sys.executable, "-m", "alexnet", *argv], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE), flag)
             for argv, flag in _outputs(tiny_store, tmp_path, ro)]  # fmt: skip
    for proc, flag in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        one_line_error(err, flag, "read-only filesystem")


def test_a_filesystem_error_anywhere_is_one_line_naming_the_path(monkeypatch, capsys):
    """What no early check foresaw (the disk filling during a command): the command's line,
    naming the path, exit status 2."""
    import alexnet.commands.summary as summary_command

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/out/file")

    monkeypatch.setattr(summary_command, "run_summary", disk_full)
    refused(capsys, ["summary"], "/some/out/file", "No space left on device")


def test_train_out_a_store_is_refused(tiny_store, tmp_path, capsys):
    """Before: the run (config.json, events, checkpoints) was written into the store."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    before = sorted(p.name for p in store.iterdir())
    refused(capsys, train_argv(store, store, "--max-steps", "0"), "--out", "prepared store")
    refused(capsys, train_argv(store, store / "runs" / "a", "--max-steps", "0"), "prepared store")
    assert sorted(p.name for p in store.iterdir()) == before


# --- a full disk at the first TensorBoard write ----------------------------------------------


class _FullDisk(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_first_tensorboard_write_is_one_line(
    tiny_store, tmp_path, monkeypatch, capsys
):
    """Before: TensorBoard's writer thread died with a traceback, then the training loop with
    another at its next log line."""
    real_open = io.open

    def full_for_events(file, mode="r", *args, **kwargs):
        if "tfevents" in str(file) and any(c in mode for c in "wax"):
            real_open(file, mode, *args, **kwargs).close()  # the file is made; no byte fits
            return io.BufferedWriter(_FullDisk())
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", full_for_events)
    monkeypatch.setattr("builtins.open", full_for_events)
    out = tmp_path / "run"
    refused(capsys, train_argv(tiny_store, out, "--max-steps", "2"), "tfevents", "No space left")


# --- fine-tuning flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,names",
    [
        (["--budgets", "-5"], ["-5", "one batch"]),
        (["--budgets", "128,16"], ["16", "one batch"]),
        (["--pretrain-images", "0"], ["--pretrain-images 0"]),
        (["--init-lr-mult", "1e308"], ["init_lr_mult"]),
        (["--init-lr-mult", "nan"], ["init_lr_mult"]),
    ],
)
def test_finetune_checks_its_values_before_preparing_or_pre_training(
    tmp_path, capsys, flags, names
):
    """Before: the stores were prepared and the 30,000-image pre-training run before a budget
    below one batch (or the --init-lr-mult) was refused."""
    out = tmp_path / "ft"
    argv = ["finetune", "--quick", "--out", str(out), "--fashion-mnist", str(tmp_path / "none")]
    refused(capsys, [*argv, *flags], *names)
    assert not out.exists()


@pytest.fixture
def same_classes_weights(tiny_store, tmp_path) -> Path:
    """A weights file for the tiny store's classes: --init loads every layer, fc8 too."""
    store = data.open_store(tiny_store)
    torch.manual_seed(0)
    tensors = dict(build_model("paper", num_classes=store.num_classes).state_dict())
    tensors.update(stats_tensors(store.stats))
    path = tmp_path / "same.safetensors"
    checkpoint.save_weights(path, tensors, weights_metadata(get_profile("paper"), store.classes))
    return path


def test_freeze_until_with_an_init_that_loads_every_layer_says_nothing_trains(
    tiny_store, tmp_path, same_classes_weights, capsys
):
    """Before: the run went on with every layer at lr 0, without a word."""
    init = ["--init", str(same_classes_weights), "--max-steps", "0"]
    out = tmp_path / "run"
    refused(capsys, train_argv(tiny_store, out, *init, "--freeze-until", "all"),
            "--freeze-until", "loaded every layer", "nothing would train")  # fmt: skip
    assert not (out / "config.json").exists()
    # Frozen for part of the run: a warning, and the run goes on (the same folder).
    assert cli_main(train_argv(tiny_store, out, *init, "--freeze-until", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "nothing trains until epoch 1" in err, err


# --- SIGTERM to the whole process group ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_saves_a_checkpoint_and_says_so_once(
    tiny_store, tmp_path, sig
):
    """As Slurm's scancel (SIGTERM) or Ctrl-C (SIGINT) signal every process of the job. Before:
    on SIGTERM the loader workers died first and the trainer with them ("DataLoader worker ...
    killed by signal", a traceback, no checkpoint); on SIGINT the interrupt line came once
    more per worker."""
    out = tmp_path / "run"
    argv = train_argv(tiny_store, out, "--epochs", "50", "--workers", "2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        t0 = time.time()
        while "step 2 " not in proc.stdout.readline():  # two steps logged: workers at work
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 300, "no step logged"
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 130, stderr
    assert stderr.count("interrupt: saving a checkpoint") == 1, stderr
    assert "interrupted; checkpoint saved" in stdout
    step = checkpoint.load_state(out / "state.pt")["position"]["step"]
    assert step >= 2
