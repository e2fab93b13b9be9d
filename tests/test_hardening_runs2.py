"""Issue 22, data lost or silently wrong (runs, checkpoints, weights files, ensembles): a run's
finished weights are never overwritten by --resume, a resumed run checks its store and names the
flags it ignores, every checkpoint and weights file is verified (checksum, finite values, sane
preprocessing) when loaded, a killed writer's temporary files go, an ensemble names its broken
member, and a diverged run does not claim a checkpoint it does not have. Each test fails on the
code before the issue."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alexnet.data as data
from alexnet import checkpoint
from alexnet.checkpoint import stats_tensors, weights_metadata
from alexnet.commands import main as cli_main
from alexnet.config import get_profile
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_networks, predict_networks
from alexnet.fileio import atomic_write
from alexnet.model import build_model
from conftest import TRAIN_ARGS as ARGS
from conftest import one_line_error

SRC = Path(__file__).resolve().parents[1] / "src"


def copy_run(reference_run: Path, to: Path) -> Path:
    shutil.copytree(reference_run, to)
    return to


def overwrite_bytes_of(path: Path, tensor: torch.Tensor, new: bytes) -> None:
    """Overwrite the start of `tensor`'s bytes where they lie in `path` (a torch.save zip or a
    safetensors file: both store tensors uncompressed), as damage on disk would."""
    needle = tensor.contiguous().view(-1)[:64].numpy().tobytes()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(needle)
        assert at >= 0 and m.find(needle, at + 1) < 0, "the tensor's bytes, once"
        m[at : at + len(new)] = new


@pytest.fixture(scope="module")
def paper_weights(tiny_store, tmp_path_factory):
    """paper_weights(name, change=None, profile=None): a weights file of one fresh paper net for
    the tiny store; `change(tensors)` edits its tensors before they are written (checksum and
    all, as a file that was written that way), `profile` replaces its metadata's profile."""
    store = data.open_store(tiny_store)
    torch.manual_seed(0)
    base = dict(build_model("paper", num_classes=3).state_dict())
    folder = tmp_path_factory.mktemp("paper-weights")

    def make(name, change=None, profile=None):
        tensors = {k: v.clone() for k, v in base.items()}
        tensors.update(stats_tensors(store.stats))
        if change is not None:
            change(tensors)
        meta = weights_metadata(profile or get_profile("paper"), store.classes)
        return checkpoint.save_weights(folder / f"{name}.safetensors", tensors, meta)

    return make


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(path)
    return path


# --- a run whose state.pt was removed is not started over ---------------------------------------


def test_resume_of_a_run_without_state_pt_refuses_and_keeps_its_weights_and_history(
    reference_run, tiny_store, tmp_path, capsys
):
    out = copy_run(reference_run, tmp_path / "run")
    (out / "state.pt").unlink()  # 455 MB of a finished paper run: the file one deletes
    kept = {name: (out / name).read_bytes() for name in ("model.safetensors", "metrics.jsonl")}
    # (--max-steps bounds the run the code before the issue started over)
    assert cli_main(["train", "--resume", str(out), "--epochs", "2", "--max-steps", "1"]) == 2
    line = one_line_error(capsys.readouterr().err, out / "state.pt", f"--init {out}")
    assert "overwrite" in line
    # The command line that made the run (a torchrun restart's way in) is refused alike.
    cfg = json.loads((out / "config.json").read_text())
    cfg["run"]["out"] = str(out)  # (as if it had been made here)
    (out / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["train", "--data", str(tiny_store), "--out", str(out), *ARGS]) == 2
    one_line_error(capsys.readouterr().err, out / "state.pt", f"--init {out}")
    for name, content in kept.items():
        assert (out / name).read_bytes() == content, name
    assert not (out / "state.pt").exists()


# --- a resumed run checks its store --------------------------------------------------------------


def _resume_on(run: Path, store: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["run"]["data"] = cfg["derived"]["store"] = str(store)
    (run / "config.json").write_text(json.dumps(cfg))


def test_resume_refuses_a_store_prepared_again_with_other_classes_or_statistics(
    reference_run, tiny_store, tmp_path, capsys
):
    classes = data.open_store(tiny_store).classes
    assert classes == ["circle", "square", "stripes"]
    # The store at the run's path prepared again: the same images, the classes in another
    # order (labels follow the new order: as the run sees it, every label swapped).
    swapped = shutil.copytree(tiny_store, tmp_path / "swapped")
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["classes"] = ["square", "circle", "stripes"]
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    run = copy_run(reference_run, tmp_path / "run")
    _resume_on(run, swapped)
    resume = ["train", "--resume", str(run), "--epochs", "3", "--max-steps", "9"]
    assert cli_main(resume) == 2
    one_line_error(capsys.readouterr().err, run, swapped, "'circle'", "'square'")
    # Prepared again with the same classes but other images: other statistics.
    other = shutil.copytree(tiny_store, tmp_path / "other")
    with np.load(other / "stats.npz") as z:
        stats = dict(z)
    stats["mean_image"] = stats["mean_image"] + 5.0
    np.savez(other / "stats.npz", **stats)
    _resume_on(run, other)
    assert cli_main(resume) == 2
    one_line_error(capsys.readouterr().err, other, "statistics", run)
    assert json.loads((run / "config.json").read_text())["run"]["data"] == str(other)


# --- --resume names what it ignores; a relative --data resumes from anywhere ----------------------


def test_resume_names_each_given_flag_it_ignores_and_none_that_agree(
    reference_run, tmp_path, capsys
):
    run = copy_run(reference_run, tmp_path / "run")
    config_before = json.loads((run / "config.json").read_text())
    # Flags that agree with the run's config.json (ARGS made it), then flags that do not.
    assert ARGS[-2:] == ["--set", "train.lr=0.001"]  # (it would override --lr)
    argv = ["train", "--resume", str(run), *ARGS[:-2],
            "--lr", "0.5", "--batch-size", "4", "--set", "model.dropout=0.1", "--seed", "9",
            "--profile", "caffe", "--init", str(run), "--checkpoint-every", "3"]  # fmt: skip
    assert cli_main(argv) == 0  # (finished: nothing left to train)
    err = capsys.readouterr().err
    warnings = [x for x in err.splitlines() if x.startswith("warning: --resume")]
    assert len(warnings) == 1, err
    line = warnings[0]
    for named in ("--lr 0.5", "--batch-size 4", "--set model.dropout=0.1", "--seed 9",
                  "--profile caffe", f"--init {run}", "--checkpoint-every 3"):  # fmt: skip
        assert named in line, (named, line)
    assert "the run's: 0.001" in line and "--init" in line.split("ignored:")[1]
    for agreeing in ("--log-every", "--val-limit", "--no-fast", "--epochs", "--workers"):
        assert agreeing not in line, (agreeing, line)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["profile"] == config_before["profile"]  # nothing of it applied
    assert cfg["run"]["seed"] == 3 and cfg["run"]["init"] == ""
    # The run's own command line again (as a torchrun restart gives it): no warning.
    assert cli_main(["train", "--resume", str(run), *ARGS]) == 0
    assert "warning: --resume" not in capsys.readouterr().err


def test_a_run_made_with_a_relative_data_path_resumes_from_another_directory(
    tiny_store, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    monkeypatch.chdir(tiny_store.parent)
    argv = ["train", "--data", tiny_store.name, "--out", str(out), *ARGS, "--max-steps", "0"]
    assert cli_main(argv) == 0
    assert json.loads((out / "config.json").read_text())["run"]["data"] == tiny_store.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(out), "--max-steps", "0"]) == 0, (
        capsys.readouterr().err
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["data"] == cfg["derived"]["store"] == str(tiny_store.resolve())


# --- checksums, finite values and sane metadata, verified on load --------------------------------


def test_a_damaged_weights_file_is_refused_in_one_line_naming_it(
    paper_weights, tiny_store, tmp_path, capsys
):
    good = paper_weights("good")
    damaged = tmp_path / "damaged.safetensors"
    shutil.copy(good, damaged)
    fc6 = checkpoint.load_weights(good)[0]["fc6.weight"]
    overwrite_bytes_of(damaged, fc6, b"\x7f\x7f\x7f\x7f")  # fc6.weight[0, 0] = 3.4e38, finite
    with pytest.raises(BadInput, match="damaged"):
        checkpoint.load_weights(damaged)
    argv = ["evaluate", str(damaged), "--data", str(tiny_store), "--workers", "0", "--limit", "3"]
    assert cli_main([*argv, "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, damaged, "damaged")
    assert cli_main(["predict", str(damaged), str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, damaged, "damaged")
    # The metadata is covered too: a changed class name is damage, not another network.
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(good.read_bytes().replace(b"stripes", b"stripez", 1))
    with pytest.raises(BadInput, match="damaged"):
        checkpoint.load_weights(renamed)
    state, _ = checkpoint.load_weights(good)  # the file as written loads
    assert torch.equal(state["fc6.weight"], fc6)


def test_a_damaged_checkpoint_is_refused_on_resume(reference_run, tmp_path, capsys):
    run = copy_run(reference_run, tmp_path / "run")
    state = checkpoint.load_state(run / "state.pt")
    overwrite_bytes_of(run / "state.pt", state["model"]["fc6.weight"], b"\x7f\x7f\x7f\x7f")
    before = (run / "state.pt").read_bytes()
    assert cli_main(["train", "--resume", str(run), "--epochs", "3", "--max-steps", "9"]) == 2
    one_line_error(capsys.readouterr().err, run / "state.pt", "damaged")
    assert (run / "state.pt").read_bytes() == before  # nothing carried into a new checkpoint


def test_save_and_load_state_verify_the_checksum_and_finiteness(tmp_path):
    path = tmp_path / "state.pt"
    weights = torch.arange(1000, dtype=torch.float32)
    checkpoint.save_state(path, {"model": {"w": weights}, "step": 4})
    assert checkpoint.load_state(path)["step"] == 4
    overwrite_bytes_of(path, weights, np.float32(7.5).tobytes())
    with pytest.raises(BadInput) as e:
        checkpoint.load_state(path)
    assert str(path) in str(e.value) and "damaged" in str(e.value) and "\n" not in str(e.value)
    checkpoint.save_state(path, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    with pytest.raises(BadInput, match=r"model/w holds NaN"):
        checkpoint.load_state(path)


def _nan_fc8(t):
    t["fc8.weight"][1, 7] = float("nan")


def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(
    paper_weights, tiny_store, image, capsys
):
    nan = paper_weights("nan", _nan_fc8)
    inf = paper_weights("inf", lambda t: t["conv1.bias"].__setitem__(0, float("inf")))
    for path, tensor, what in ((nan, "fc8.weight", "NaN"), (inf, "conv1.bias", "infinite")):
        for cmd in (["evaluate", str(path), "--data", str(tiny_store), "--workers", "0",
                     "--limit", "3"], ["predict", str(path), str(image)]):  # fmt: skip
            assert cli_main([*cmd, "--device", "cpu"]) == 2, (cmd, tensor)
            one_line_error(capsys.readouterr().err, path, tensor, what)


@pytest.mark.slow
def test_preprocessing_metadata_out_of_range_is_refused_before_use(paper_weights, image, capsys):
    paper = get_profile("paper")

    def with_data(**changes):
        return dataclasses.replace(paper, data=dataclasses.replace(paper.data, **changes))

    cases = {
        "huge": (with_data(image_size=2000), "data.image_size=2000"),
        "nan-scale": (with_data(input_scale=float("nan")), "data.input_scale=nan"),
        "zero-scale": (with_data(input_scale=0.0), "data.input_scale=0"),
        "small-mean": (with_data(image_size=240), "mean_image"),
    }
    for name, (profile, what) in cases.items():
        weights = paper_weights(name, profile=profile)
        t0 = time.perf_counter()
        assert cli_main(["predict", str(weights), str(image), "--device", "cpu"]) == 2, name
        one_line_error(capsys.readouterr().err, weights, what)
        assert time.perf_counter() - t0 < 60, name
    std = paper_weights("zero-std", lambda t: t["preprocess.channel_std"].zero_())
    assert cli_main(["predict", str(std), str(image), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, std, "channel_std")


# --- a killed writer's temporary files -----------------------------------------------------------

_WRITER = """
import sys, time
from alexnet.fileio import atomic_write
def write(f):
    f.write(b"x" * 4096)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], write)
"""


def _writer(target: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer_of_its_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    killed = _writer(folder / "state.pt")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 1 and left[0].startswith(".state.pt.") and left[0].endswith(".tmp")
    live = _writer(folder / "model.safetensors")  # a writer still at work
    try:
        live_tmp = [p for p in folder.iterdir() if p.name.startswith(".model.safetensors.")]
        assert len(live_tmp) == 1
        others = [folder / ".notes.tmp", folder / "keep.tmp", folder / ".lock"]
        for p in others:
            p.write_text("not a temporary file of a writer")
        atomic_write(folder / "metrics.jsonl", lambda f: f.write(b"{}\n"))
        names = {p.name for p in folder.iterdir()}
        assert left[0] not in names  # the killed writer's, removed
        assert live_tmp[0].name in names  # the live writer's, kept
        assert {p.name for p in others} <= names and "metrics.jsonl" in names
    finally:
        live.kill()
        live.wait()


# --- an ensemble names its broken member ---------------------------------------------------------


@pytest.mark.slow
def test_an_ensemble_names_the_member_whose_weights_are_broken(paper_weights, tiny_store, image):
    good = paper_weights("member-good")
    nan = paper_weights("member-nan", _nan_fc8)
    # Finite weights whose outputs overflow: the logits are inf, the softmax NaN.
    huge = paper_weights("member-huge", lambda t: t["fc8.weight"].fill_(3e38))
    kw = dict(views=1, workers=0, limit=3, fast=False)
    for broken, what in ((nan, "fc8.weight holds NaN"), (huge, "network 2 of the ensemble's 3")):
        members = [good, broken, good]
        with pytest.raises(BadInput) as e:
            evaluate_networks(members, tiny_store, **kw)
        msg = str(e.value)
        assert str(broken) in msg and what in msg and "\n" not in msg, msg
        with pytest.raises(BadInput) as e:
            predict_networks(members, [str(image)])
        assert str(broken) in str(e.value) and what in str(e.value)
    r = evaluate_networks([good, good], tiny_store, **kw)  # whole members: figures, no error
    assert np.isfinite(r["loss"]) and r["ensemble"]["networks"] == 2


# --- a diverged run without a checkpoint does not claim one --------------------------------------


def test_divergence_before_the_first_checkpoint_does_not_claim_one(
    tiny_store, paper_weights, tmp_path, capsys
):
    assert ARGS[-2:] == ["--set", "train.lr=0.001"]  # (it would override --lr)
    out = tmp_path / "lr"
    argv = ["train", "--data", str(tiny_store), "--out", str(out), *ARGS[:-2], "--lr", "1e30",
            "--max-steps", "3"]  # fmt: skip
    assert cli_main(argv) == 3
    err = capsys.readouterr().err
    assert "keeps the last good checkpoint" not in err
    assert "holds no checkpoint" in err and str(out) in err
    assert not (out / "state.pt").exists()
    # NaN --init weights: refused before the first step, naming the file and the tensor.
    nan = paper_weights("init-nan", _nan_fc8)
    out = tmp_path / "init"
    argv = ["train", "--data", str(tiny_store), "--out", str(out), *ARGS, "--init", str(nan)]
    assert cli_main(argv) == 2
    line = one_line_error(capsys.readouterr().err, nan, "fc8.weight", "NaN")
    assert "state.pt" not in line
    assert not (out / "state.pt").exists()
