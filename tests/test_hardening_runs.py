"""Issue 11, the run side: runs restart and resume whatever state they were left in, two
commands never write one run, nothing non-finite is saved, and every bad input is one line
(`alexnet CMD: error: ...`, exit status 2) that names the file. Each test names its item."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

import alexnet.data as data
from alexnet import checkpoint
from alexnet.checkpoint import stats_tensors, weights_metadata
from alexnet.commands import main as cli_main
from alexnet.config import apply_overrides, get_profile
from alexnet.errors import BadInput
from alexnet.fileio import atomic_write, write_bytes
from alexnet.model import build_model
from alexnet.train import RunConfig, Trainer
from conftest import TRAIN_ARGS as ARGS
from conftest import deadline, one_line_error, tensorboard_steps
from test_data_prepare import imagenet_like

ROOT = Path(__file__).resolve().parents[1]


def logged_steps(run: Path) -> list[int]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["step"] for r in recs if r["kind"] == "step"]


def train_argv(store, out, *extra) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def weights_of(tiny_store, tmp_path_factory):
    """weights_of(classes, tensors_of=None, preprocess=True): a weights file of a fresh paper
    net whose metadata names `classes` (its fc8 sized for `tensors_of` classes)."""
    stats = data.open_store(tiny_store).stats
    folder = tmp_path_factory.mktemp("weights")

    def make(classes, tensors_of=None, preprocess=True):
        torch.manual_seed(0)
        model = build_model("paper", num_classes=tensors_of or len(classes))
        tensors = dict(model.state_dict())
        if preprocess:
            tensors.update(stats_tensors(stats))
        path = folder / f"w{len(list(folder.iterdir()))}.safetensors"
        checkpoint.save_weights(path, tensors, weights_metadata(get_profile("paper"), classes))
        return path

    return make


def copy_store(tiny_store: Path, to: Path) -> Path:
    shutil.copytree(tiny_store, to)
    return to


# --- item 3: a run killed before its first checkpoint restarts ---------------------------------

_DIES_ONCE = """
import os, signal, sys
import alexnet.train as train
from alexnet.commands import main
real = train.Trainer.save_checkpoint
def die_before_the_first_checkpoint(self):
    # The first attempt dies at its first checkpoint, before writing it (a crash, an OOM kill);
    # torchrun --max-restarts starts the worker again with the same command line.
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    real(self)
train.Trainer.save_checkpoint = die_before_the_first_checkpoint
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_item3_a_torchrun_restart_before_the_first_checkpoint_starts_the_run_over(
    tiny_store, tmp_path
):
    out = tmp_path / "run"
    script = tmp_path / "dies_once.py"
    script.write_text(_DIES_ONCE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "--max-restarts=1", str(script), *train_argv(tiny_store, out), "--checkpoint-every",
           "2", "--max-steps", "3"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already holds a run" not in proc.stderr
    assert "no checkpoint yet; starting the run over" in proc.stderr
    assert checkpoint.load_state(out / "state.pt")["position"]["step"] == 3
    # What the first attempt logged (steps 1, 2) was dropped: each step once, in metrics and
    # in TensorBoard.
    assert logged_steps(out) == [1, 2, 3]
    assert tensorboard_steps(out) == [1, 2, 3]


def test_item3_only_the_same_command_line_restarts_a_run_without_checkpoint(
    tiny_store, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = train_argv(tiny_store, out, "--max-steps", "0")
    assert cli_main(argv) == 0  # config.json written, no step, no checkpoint
    assert (out / "config.json").exists() and not (out / "state.pt").exists()
    assert ARGS[-1] == "train.lr=0.001"
    other = ["train", "--data", str(tiny_store), "--out", str(out), *ARGS[:-1], "train.lr=0.002"]
    assert cli_main([*other, "--max-steps", "0"]) == 2
    one_line_error(capsys.readouterr().err, out, "already holds a run")
    assert cli_main(argv) == 0
    assert "no checkpoint yet; starting the run over" in capsys.readouterr().err


# --- item 4: one command per run folder ---------------------------------------------------------


@pytest.mark.slow
def test_item4_a_second_train_on_a_run_in_use_is_refused_and_the_first_is_undisturbed(
    reference_run, tiny_store, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)  # done at step 8; the first command adds an epoch
    cmd = [sys.executable, "-m", "alexnet", "train", "--resume", str(out), "--epochs", "3"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while (out / ".lock").read_text().strip() != str(first.pid):
            assert first.poll() is None, first.stdout.read()
            assert time.time() - t0 < 120
            time.sleep(0.05)
        t1 = time.perf_counter()
        assert cli_main(["train", "--resume", str(out)]) == 2
        assert time.perf_counter() - t1 < 10  # at once, not after the first
        one_line_error(capsys.readouterr().err, out, f"in use by process {first.pid}")
        # a new run into the same folder, and the demo's way in, are refused alike
        assert cli_main(train_argv(tiny_store, out)) == 2
        one_line_error(capsys.readouterr().err, out, "in use by process")
        text, _ = first.communicate(timeout=600)
        assert first.returncode == 0, text
    finally:
        first.kill()
    assert logged_steps(out) == list(range(1, 13))  # one writer: no line twice, none lost


# --- item 5: nothing non-finite is accepted or saved ---------------------------------------------


def test_item5_non_finite_and_out_of_range_settings_are_refused_before_anything_is_written(
    tiny_store, tmp_path, capsys
):
    cases = {
        "--lr nan": ["--lr", "nan"],
        "--lr inf": ["--lr", "inf"],
        "momentum": ["--set", "train.momentum=1.5"],
        "weight decay": ["--set", "train.weight_decay=-1"],
        "lrn": ["--set", "model.lrn_alpha=nan"],
        "checkpoint-every": ["--checkpoint-every", "-1"],
        "log-every": ["--log-every", "0"],
    }
    assert ARGS[-2:] == ["--set", "train.lr=0.001"]  # (it would override --lr)
    for name, flags in cases.items():
        out = tmp_path / name.replace(" ", "_")
        argv = ["train", "--data", str(tiny_store), "--out", str(out), *ARGS[:-2], *flags]
        assert cli_main(argv) == 2, name
        one_line_error(capsys.readouterr().err)
        assert not out.exists(), name
    # A config.json edited to hold a NaN is refused on --resume, naming the file.
    out = tmp_path / "edited"
    assert cli_main(train_argv(tiny_store, out, "--max-steps", "0")) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["profile"]["train"]["lr"] = float("nan")
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(out)]) == 2
    one_line_error(capsys.readouterr().err, out / "config.json", "train.lr=nan")


def test_item5_a_step_that_ruins_the_weights_is_never_saved(tiny_store, tmp_path):
    """The loss of step 3 is finite, its gradient is not: the weights after step 3 are NaN. The
    checkpoint after step 3 must not be written; state.pt keeps step 2."""
    profile = apply_overrides(get_profile("paper"), ["train.batch_size=8", "train.epochs=1"])
    run = RunConfig(data=str(tiny_store), out=str(tmp_path / "r"), fast=False,
                    checkpoint_every=1, log_every=1, workers=0, val_limit=4)  # fmt: skip
    trainer = Trainer(profile, run)
    calls = {"n": 0}

    def poison_gradient(_module, _inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output.register_hook(lambda g: g * float("inf"))
        return output

    trainer.model.fc8.register_forward_hook(poison_gradient)
    with pytest.raises(FloatingPointError, match="non-finite at step 3"):
        trainer.fit()
    assert all(np.isfinite(r["loss"]) for r in map(json.loads, open(tmp_path / "r" /
                                                                    "metrics.jsonl")))  # fmt: skip
    state = checkpoint.load_state(tmp_path / "r" / "state.pt")
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    w, _ = checkpoint.load_weights(tmp_path / "r" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


# --- item 7: a torn last line of metrics.jsonl --------------------------------------------------


def test_item7_a_torn_last_metrics_line_is_dropped_on_resume_a_bad_line_elsewhere_is_an_error(
    reference_run, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "step", "step": 9, "lo')  # a write cut short by a power loss
    with pytest.warns(UserWarning, match=re.escape(f"{metrics}: dropped a torn last line")):
        assert cli_main(["train", "--resume", str(out)]) == 0  # (nothing left to train)
    assert logged_steps(out) == list(range(1, 9))
    lines = metrics.read_text().splitlines()
    lines[3] = lines[3][:10]  # not the last line: an error naming the file and the line
    metrics.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    one_line_error(capsys.readouterr().err, metrics, "line 4")


# --- item 10: every bad input is one line ------------------------------------------------------


@pytest.mark.slow
def test_item10_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_old_checkpoint(
    reference_run, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    before = (out / "state.pt").read_bytes()

    def small_disk():  # writes past 64 MiB fail (EFBIG), as ENOSPC would on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, 64 * 2**20))

    # One more step (9, in an added epoch), then its checkpoint: state.pt is ~450 MB.
    cmd = [sys.executable, "-m", "alexnet", "train", "--resume", str(out), "--epochs", "3",
           "--max-steps", "9"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_disk, timeout=600)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr, out / "state.pt")
    assert "the previous state.pt is kept" in line
    assert (out / "state.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))  # no half-written temporary left


def test_item10_damaged_stores_are_one_line_naming_the_file(tiny_store, weights_of, tmp_path,
                                                            capsys):  # fmt: skip
    weights = weights_of(data.open_store(tiny_store).classes)

    def damaged(name, damage):
        store = copy_store(tiny_store, tmp_path / name)
        damage(store)
        return store

    def no_splits(s):
        m = json.loads((s / "manifest.json").read_text())
        del m["splits"]
        (s / "manifest.json").write_text(json.dumps(m))

    cases = {
        "manifest": (no_splits, "manifest.json", "'splits'"),
        "stats": (lambda s: (s / "stats.npz").write_bytes(b"PK\x03\x04 not a zip"), "stats.npz",
                  "corrupt"),
        "labels": (lambda s: (s / "val" / "labels.npy").write_bytes(b"\x93NUMPY garbage"),
                   "labels.npy", "corrupt"),
        "labels-range": (lambda s: np.save(s / "val" / "labels.npy",
                                           np.full(12, 7, np.int64)), "labels.npy", "0..2"),
    }  # fmt: skip
    for name, (damage, file, what) in cases.items():
        store = damaged(name, damage)
        assert cli_main(["evaluate", str(weights), "--data", str(store), "--workers", "0",
                         "--device", "cpu"]) == 2, name  # fmt: skip
        one_line_error(capsys.readouterr().err, store, file, what)
    store = tmp_path / "manifest"  # training reads it the same way
    assert cli_main(train_argv(store, tmp_path / "r")) == 2
    one_line_error(capsys.readouterr().err, "manifest.json", "'splits'")


def test_item10_weights_that_do_not_fit_are_one_line(tiny_store, weights_of, capsys):
    classes = data.open_store(tiny_store).classes
    cases = {
        "class list vs tensors": (weights_of(classes + ["x", "y"], tensors_of=3),
                                  "fc8.weight is (3, 4096) where the network has (5, 4096)"),
        "no preprocessing tensors": (weights_of(classes, preprocess=False),
                                     "without the preprocessing statistics"),
    }  # fmt: skip
    for name, (weights, what) in cases.items():
        for cmd in (["evaluate", str(weights), "--data", str(tiny_store)],
                    ["predict", str(weights), str(ROOT / "README.md")]):  # fmt: skip
            assert cli_main(cmd) == 2, name
            one_line_error(capsys.readouterr().err, weights, what)


def test_item10_an_empty_or_incomplete_config_json_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "run" / "config.json"
    cfg.parent.mkdir()
    for text in ("", "{", "[]", '{"format": "alexnet-run/1"}',
                 '{"format": "alexnet-run/1", "profile": {"name": "paper"}, "run": {}}',
                 '{"format": "alexnet-run/1", "profile": {"name": "paper", "model": {}, '
                 '"data": {}, "train": {}}, "run": {"bogus": 1}}',
                 '{"format": "alexnet-run/1", "profile": {"name": "paper", "model": {}, '
                 '"data": {}, "train": {}}, "run": {"data": ""}}'):  # fmt: skip
        cfg.write_text(text)
        assert cli_main(["train", "--resume", str(cfg.parent)]) == 2, text
        one_line_error(capsys.readouterr().err, cfg)


@pytest.mark.slow
def test_item10_a_corrupt_record_met_in_training_or_evaluation_names_store_split_and_index(
    tiny_store, weights_of, tmp_path, capsys
):
    store = copy_store(tiny_store, tmp_path / "store")
    for shard in (store / "train").glob("shard-*.bin"):  # every train record zeroed
        shard.write_bytes(bytes(shard.stat().st_size))
    for shard in (store / "val").glob("shard-*.bin"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    for workers in ("0", "1"):  # in this process, and in a loader worker process
        out = tmp_path / f"run{workers}"
        assert cli_main(train_argv(store, out, "--workers", workers)) == 2
        one_line_error(capsys.readouterr().err, store, "train record", "is corrupt")
        weights = weights_of(data.open_store(store).classes)
        assert cli_main(["evaluate", str(weights), "--data", str(store), "--workers", workers,
                         "--device", "cpu"]) == 2  # fmt: skip
        one_line_error(capsys.readouterr().err, store, "val record", "is corrupt")


_LEFT_OPEN = """
import gc, sys
gc.disable()  # nothing collected before exit: what a traceback or a cycle keeps stays alive
from alexnet import data
from alexnet.commands import main
store = data.open_store(sys.argv[1])
kept = data.make_eval_loader(store, data_config, batch_size=4, workers=1)
next(iter(kept))  # its worker started, and never closed
assert main(["evaluate", sys.argv[2], "--data", sys.argv[3], "--workers", "1",
             "--device", "cpu"]) == 2  # a corrupt val record met in a worker
print("exiting", flush=True)
"""


def test_a_process_with_loaders_left_open_exits(tiny_store, weights_of, tmp_path):
    """The full suite hung at exit (fresh CI, issue 21): a loader's workers ignore SIGTERM, so
    multiprocessing's exit handler (SIGTERM to daemonic children, then join) waited forever for
    the worker of an evaluation that failed on a corrupt record and was never closed. Now
    evaluate closes its loader whatever happens, and any loader still open is closed at exit:
    this process, which leaves both kinds behind with garbage collection off, ends."""
    bad = copy_store(tiny_store, tmp_path / "store")
    for shard in (bad / "val").glob("shard-*.bin"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    weights = weights_of(data.open_store(tiny_store).classes)
    script = _LEFT_OPEN.replace(
        "data_config", "__import__('alexnet.config').config.get_profile('paper').data"
    )
    r = subprocess.run([sys.executable, "-c", script, str(tiny_store), str(weights), str(bad)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "exiting" in r.stdout, r.stderr[-2000:]


def test_item10_only_user_errors_are_one_line_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import alexnet.commands.summary as summary_command

    def user_error(args):
        raise BadInput("a wrong flag")

    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(summary_command, "run_summary", user_error)  # (registered by main)
    assert cli_main(["summary"]) == 2
    one_line_error(capsys.readouterr().err, "a wrong flag")
    monkeypatch.setattr(summary_command, "run_summary", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli_main(["summary"])


# --- item 11: evaluate compares class names ------------------------------------------------------


def test_item11_evaluate_refuses_other_class_names_unless_told(tiny_store, weights_of, capsys):
    weights = weights_of(["T-shirt/top", "Trouser", "Pullover"])  # 3 classes, other names
    argv = ["evaluate", str(weights), "--data", str(tiny_store), "--workers", "0", "--limit", "3",
            "--device", "cpu", "--json"]  # fmt: skip
    assert cli_main(argv) == 2
    one_line_error(capsys.readouterr().err, weights, "'T-shirt/top'", "'circle'",
                   "--ignore-class-names")  # fmt: skip
    assert cli_main([*argv, "--ignore-class-names"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    assert cli_main(["evaluate", str(weights_of(["a"] * 5)), "--data", str(tiny_store),
                     "--ignore-class-names"]) == 2  # fmt: skip
    one_line_error(capsys.readouterr().err, "5 classes", "3")


# --- item 8, predict: a FIFO among the images ----------------------------------------------------


def test_item8_predict_skips_a_fifo_at_once_and_predicts_the_rest(tiny_store, weights_of,
                                                                  tmp_path, capsys):  # fmt: skip
    weights = weights_of(data.open_store(tiny_store).classes)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(photo)
    t0 = time.perf_counter()
    with deadline(120):
        rc = cli_main(["predict", str(weights), str(fifo), str(photo), "--device", "cpu"])
    took = time.perf_counter() - t0
    captured = capsys.readouterr()
    with capsys.disabled():
        print(f"\npredict of a FIFO and a photo: {took:.2f} s in all")
    assert rc == 1
    assert f"{fifo}: error: cannot open (not a regular file (a FIFO))" in captured.err
    assert str(photo) in captured.out


# --- Also: permissions, TensorBoard, optional dependencies --------------------------------------


def test_also_written_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        for name in ("a.json", "w.safetensors", "s.pt"):
            atomic_write(tmp_path / name, lambda f: f.write(b"x"))
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
        os.umask(0o022)
        checkpoint.save_state(tmp_path / "state.pt", {"a": torch.zeros(2)})
        checkpoint.save_weights(tmp_path / "model.safetensors", {"a": torch.zeros(2)})
        write_bytes(tmp_path / "shard.bin", b"x")
        for name in ("state.pt", "model.safetensors", "shard.bin"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)


def test_also_optional_dependencies_are_declared_and_named(monkeypatch, tmp_path, capsys):
    """`bench data` needs scikit-image, the ImageNet devkit's meta.mat needs scipy: each is an
    extra of pyproject.toml, named by the one-line error and documented in the README."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    imagenet_like(tmp_path / "inet")  # (its meta.mat written with scipy)
    for name in ("skimage", "skimage.data", "scipy", "scipy.io"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert cli_main(["bench", "data", "--images", "512", "--json"]) == 2
    bench_line = one_line_error(capsys.readouterr().err, "alexnet[bench]")
    assert cli_main(["prepare", str(tmp_path / "inet"), str(tmp_path / "s"), "-q"]) == 2
    inet_line = one_line_error(capsys.readouterr().err, "alexnet[imagenet]")
    for line, extra, package in ((bench_line, "bench", "scikit-image"),
                                 (inet_line, "imagenet", "scipy")):  # fmt: skip
        assert f"alexnet[{extra}]" in line
        assert any(dep.split("=")[0].split(">")[0] == package for dep in extras[extra]), extra
        assert f"pip install 'alexnet[{extra}]'" in readme
    assert {"pytest", "ruff==0.17.6", "scikit-image"} <= set(extras["dev"])
